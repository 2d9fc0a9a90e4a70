package server_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
	"slices"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/server"
	"github.com/edge-relay/relay/internal/testcerts"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

// Nodes of a cluster with TLS client certificates join with their
// certificates, no token, through the leader or a follower, also with a
// certificate whose name is not their id (one that serves every node);
// but a certificate of the cluster CA cannot move a member: a holder of
// one (a removed node, a spare) asking to add a member's id at its own
// address would take that member's place in the Raft configuration, its
// votes and the log sent to it.
func TestANodeCertificateCannotMoveAMember(t *testing.T) {
	ca, err := testcerts.NewCA(t.TempDir(), "cluster")
	if err != nil {
		t.Fatal(err)
	}
	c := clustertest.Empty(t, clustertest.Options{Configure: func(cfg *server.Config) {
		name := cfg.NodeID
		if name == "n3" {
			// One certificate may serve every node (it names them all):
			// its name is then no node's id.
			name = "relay-control"
		}
		cert, key, err := ca.Issue(name)
		if err != nil {
			t.Fatal(err)
		}
		cfg.CertFile, cfg.KeyFile, cfg.CAFile = cert, key, ca.CertFile
	}})
	n1 := c.StartNode(func(cfg *server.Config) { cfg.Bootstrap = true })
	c.WaitReady()
	c.StartNode(func(cfg *server.Config) { cfg.Join = []string{n1.Server.APIAddr()} })
	c.WaitReady()
	raftAddrOf := func(i int, id string) string {
		st, err := c.Nodes[i].Server.Node().Status()
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range st.Members {
			if m.ID == id && m.Voter {
				return m.RaftAddr
			}
		}
		return ""
	}
	clustertest.Eventually(t, 30*time.Second, func() error {
		if got := c.VoterIDs(0); !slices.Equal(got, []string{"n1", "n2"}) {
			return fmt.Errorf("voters %v, want n1 and n2 (n2 joined with its certificate)", got)
		}
		return nil
	})
	// n3 through n2, a follower, which forwards the join to the leader
	// speaking as itself, a member.
	n2 := c.Nodes[1]
	c.StartNode(func(cfg *server.Config) { cfg.Join = []string{n2.Server.APIAddr()} })
	c.WaitReady()
	clustertest.Eventually(t, 30*time.Second, func() error {
		if got := c.VoterIDs(0); !slices.Equal(got, []string{"n1", "n2", "n3"}) {
			return fmt.Errorf("voters %v, want n1, n2 and n3 (n3 joined through n2, its certificate named relay-control)", got)
		}
		return nil
	})
	n2Addr := raftAddrOf(0, "n2")

	pem, err := os.ReadFile(ca.CertFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	pair, err := ca.IssuePair("n9")
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, Certificates: []tls.Certificate{pair}}, ForceAttemptHTTP2: true}
	t.Cleanup(tr.CloseIdleConnections)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, n := range c.Nodes {
		cl := controlv1connect.NewClusterServiceClient(&http.Client{Transport: tr}, "https://"+n.Server.APIAddr())
		_, err := cl.AddVoter(ctx, connect.NewRequest(&controlv1.AddVoterRequest{Id: "n2", RaftAddr: "127.0.0.1:9"}))
		if connect.CodeOf(err) != connect.CodePermissionDenied {
			t.Fatalf("node n9's certificate adding n2 at another address through %s: %v, want permission_denied", n.ID, err)
		}
		// At its own address: a join whose answer was lost, asked again.
		if _, err := cl.AddVoter(ctx, connect.NewRequest(&controlv1.AddVoterRequest{Id: "n2", RaftAddr: n2Addr})); err != nil {
			t.Fatalf("n2 asked again at its own address through %s: %v", n.ID, err)
		}
	}
	for i := range c.Nodes {
		if got := raftAddrOf(i, "n2"); got != n2Addr {
			t.Fatalf("n2's Raft address on %s is %q, want %q", c.Nodes[i].ID, got, n2Addr)
		}
	}
}
