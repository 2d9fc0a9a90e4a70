package api_test

import (
	"net"
	"slices"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/clustertest"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
)

// A voter is added only where it answers as itself. Added where nothing
// listens, it would count in every majority from then on: a cluster of
// one would lose its leader for good (a typo in `relayctl cluster join`,
// a firewalled port, a default loopback address). AddVoter answers
// unavailable where nothing answers and failed_precondition where
// another node does (here the leader's own address), and the cluster
// keeps its one voter and takes writes.
func TestAVoterIsAddedOnlyWhereItAnswers(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	ctx := ctxT(t, time.Minute)
	cl := client(t, c, c.Nodes[0])
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	nothing := ln.Addr().String()
	_ = ln.Close()
	st, err := c.Nodes[0].Server.Node().Status()
	if err != nil || len(st.Members) != 1 {
		t.Fatalf("status: %+v %v", st, err)
	}
	for _, tc := range []struct {
		what, addr string
		want       connect.Code
	}{
		{"where nothing listens", nothing, connect.CodeUnavailable},
		{"at the leader's own address", st.Members[0].RaftAddr, connect.CodeFailedPrecondition},
	} {
		_, err := cl.AddVoter(ctx, connect.NewRequest(&controlv1.AddVoterRequest{Id: "n2", RaftAddr: tc.addr}))
		if connect.CodeOf(err) != tc.want {
			t.Fatalf("n2 added %s: %v, want %v", tc.what, err, tc.want)
		}
		t.Logf("n2 added %s: %v", tc.what, err)
	}
	if got := c.VoterIDs(0); !slices.Equal(got, []string{"n1"}) {
		t.Fatalf("voters %v, want n1 alone", got)
	}
	if _, err := c.CreateUser(ctx, 0, "after"); err != nil {
		t.Fatalf("a write after the refused joins: %v", err)
	}
}
