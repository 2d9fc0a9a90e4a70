package raftnode_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
)

// Without a quorum, a linearizable read fails with a retryable error while
// a stale read still answers from the node's own state.
func TestReadModesWithoutQuorum(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := c.CreateUser(ctx, 0, "before"); err != nil {
		t.Fatal(err)
	}
	c.WaitConverged()
	survivor := c.Follower()
	for i := range c.Nodes {
		if i != survivor {
			c.Kill(i)
		}
	}
	node := c.Nodes[survivor].Server.Node()

	rctx, rcancel := context.WithTimeout(ctx, 2*time.Second)
	defer rcancel()
	_, err := node.Read(rctx, raftnode.Linearizable)
	if !errors.Is(err, raftnode.ErrNoLeader) && !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("linearizable read without quorum: got %v, want ErrNoLeader or deadline", err)
	}
	if err == nil {
		t.Fatal("linearizable read succeeded without a quorum")
	}
	f, err := node.Read(ctx, raftnode.Stale)
	if err != nil {
		t.Fatalf("stale read: %v", err)
	}
	if _, err := f.GetUser("before"); err != nil {
		t.Fatalf("stale read lost a committed write: %v", err)
	}
	if _, err := f.GetUser("never"); !errors.Is(err, fsm.ErrNotFound) {
		t.Fatalf("stale read of a missing user: %v", err)
	}
	// Writes fail cleanly (retryable), never hang past the deadline.
	wctx, wcancel := context.WithTimeout(ctx, time.Second)
	defer wcancel()
	if _, err := c.CreateUser(wctx, survivor, "during-outage"); err == nil {
		t.Fatal("write committed without a quorum")
	}
	if raftnode.Linearizable.String() != "linearizable" || raftnode.Stale.String() != "stale" {
		t.Fatal("mode names")
	}
}
