package raftnode_test

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/clustertest"
)

// Replication runs without hashicorp/raft's pipeline, which can deadlock
// (see raftTransport): the leader never switches a follower to it, and
// writes still reach every member.
func TestReplicationIsNotPipelined(t *testing.T) {
	rec := clustertest.NewLogRecorder()
	c := clustertest.Start(t, 3, clustertest.Options{Logger: slog.New(rec)})
	leader := c.Nodes[c.Leader()].Server.Node()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for range 50 {
		cmd := paddedNoop(256)
		cmd.RequestId = ""
		if _, err := leader.Apply(ctx, cmd); err != nil {
			t.Fatal(err)
		}
	}
	want := leader.FSM().AppliedIndex()
	clustertest.Eventually(t, 30*time.Second, func() error {
		for i, n := range c.Nodes {
			if got := n.Server.Node().FSM().AppliedIndex(); got < want {
				return fmt.Errorf("node %d applied %d of %d", i, got, want)
			}
		}
		return nil
	})
	if recs := rec.Find("pipelining replication", nil); len(recs) > 0 {
		t.Fatalf("the leader pipelined replication to %v", recs[0].Attrs["peer"])
	}
}
