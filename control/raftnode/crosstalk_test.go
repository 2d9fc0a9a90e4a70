package raftnode_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
	"github.com/edge-relay/relay/control/server"
)

// A member of cluster A is gone and its Raft address is taken by the only
// node of another cluster B, under the same node id (as when a host or a
// port is reused: tests on one machine name their nodes alike and take
// free ports). A's leader keeps dialing the address. Without TLS nothing
// in Raft tells the clusters apart, and B's node would follow A's leader
// (or push A's leader out with its own term). The cluster check refuses
// the connections on both sides; each cluster keeps its leader, its
// history and its own writes.
func TestAnotherClusterAtAMembersAddressIsRefused(t *testing.T) {
	ctx := ctxT(t, 3*time.Minute)
	a := clustertest.Start(t, 3, clustertest.Options{})
	gone := a.Follower()
	addr := a.Nodes[gone].Server.Node().RaftAddr()
	id := a.Nodes[gone].ID
	a.Kill(gone)
	aLeader := a.Leader()
	aHistory, err := a.Nodes[aLeader].Server.Node().FSM().History()
	if err != nil || aHistory == "" {
		t.Fatalf("A's history %q, %v", aHistory, err)
	}

	b := clustertest.Empty(t, clustertest.Options{})
	bn := b.StartNode(func(cfg *server.Config) {
		cfg.Bootstrap, cfg.RaftAddr, cfg.NodeID = true, addr, id
	})
	node := bn.Server.Node()
	// From its first moment B's node has a history of its own: no
	// window in which it would take anyone's traffic.
	bHistory, err := node.FSM().History()
	if err != nil || bHistory == "" || bHistory == aHistory {
		t.Fatalf("B's history at start %q (A's %q), %v", bHistory, aHistory, err)
	}

	// Watch B's node for as long as A's leader keeps knocking: it must
	// never stop leading its own cluster.
	var (
		mu       sync.Mutex
		followed []string
	)
	stop := make(chan struct{})
	watched := make(chan struct{})
	clustertest.Eventually(t, 30*time.Second, func() error {
		if !node.IsLeader() {
			return errors.New("B's node does not lead yet")
		}
		return nil
	})
	go func() {
		defer close(watched)
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			if !node.IsLeader() {
				leader, _ := node.Leader()
				mu.Lock()
				followed = append(followed, leader)
				mu.Unlock()
			}
		}
	}()
	const name = "relay_control_raft_connections_refused_total"
	clustertest.Eventually(t, 90*time.Second, func() error {
		if got, dialer := bn.Metric(t, name), a.Nodes[aLeader].Metric(t, name); got < 2 || dialer < 2 {
			return fmt.Errorf("refusals: %v by B's node, %v by A's leader; want 2 each", got, dialer)
		}
		return nil
	})
	close(stop)
	<-watched
	if len(followed) > 0 {
		t.Fatalf("B's node stopped leading %d times, following %q", len(followed), followed)
	}

	// Each cluster goes on with its own writes only.
	if _, err := a.CreateUser(ctx, aLeader, "only-in-a"); err != nil {
		t.Fatal(err)
	}
	if _, err := b.CreateUser(ctx, 0, "only-in-b"); err != nil {
		t.Fatal(err)
	}
	if h, err := node.FSM().History(); err != nil || h != bHistory {
		t.Fatalf("B's history now %q, %v; want %q", h, err, bHistory)
	}
	if _, err := node.FSM().GetUser("only-in-a"); !errors.Is(err, fsm.ErrNotFound) {
		t.Fatalf("A's write on B's node: %v", err)
	}
	for _, n := range a.Running() {
		if _, err := n.Server.Node().FSM().GetUser("only-in-b"); !errors.Is(err, fsm.ErrNotFound) {
			t.Fatalf("B's write on A's %s: %v", n.ID, err)
		}
	}
	if got := b.VoterIDs(0); len(got) != 1 || got[0] != id {
		t.Fatalf("B's voters %v", got)
	}
}

// A rolling upgrade from a release without the cluster check: while n1
// and n2 run the older release (its Raft connections carry no hello, and
// it reads one as an unknown RPC and hangs up), every node leads in turn
// and writes go through every node; n1 and n2 are then upgraded one at a
// time, and once every member records the check the cluster goes on as
// before. No connection is refused on the way.
func TestRollingUpgradeToTheClusterCheck(t *testing.T) {
	older := slices.DeleteFunc(fsm.Features(), func(f string) bool { return f == fsm.FeatureRaftClusterCheck })
	var mu sync.Mutex
	upgraded := map[string]bool{"n3": true}
	c := clustertest.Start(t, 3, clustertest.Options{Configure: func(cfg *server.Config) {
		mu.Lock()
		defer mu.Unlock()
		if !upgraded[cfg.NodeID] {
			cfg.Features = older
		}
	}})
	ctx := ctxT(t, 4*time.Minute)
	round := func(name string) {
		t.Helper()
		for target := range c.Nodes {
			c.TransferLeadership(ctx, target)
			for i := range c.Nodes {
				if _, err := c.CreateUser(ctx, i, fmt.Sprintf("%s-%d-%d", name, target, i)); err != nil {
					t.Fatalf("%s: write through %s while %s leads: %v", name, c.Nodes[i].ID, c.Nodes[target].ID, err)
				}
			}
		}
		c.WaitConverged()
	}
	round("mixed")

	for _, i := range []int{0, 1} {
		mu.Lock()
		upgraded[c.Nodes[i].ID] = true
		mu.Unlock()
		c.Shutdown(i)
		c.Restart(i)
		c.WaitReady()
	}
	c.WaitFeature(fsm.FeatureRaftClusterCheck)
	round("upgraded")
	for _, n := range c.Nodes {
		if got := n.Metric(t, "relay_control_raft_connections_refused_total"); got != 0 {
			t.Errorf("%s refused %v raft connections", n.ID, got)
		}
	}
}

// A new node that joins through the API has no state, so no history of
// its own: without more it would take the traffic of any leader that
// still dials the address it took over, and become that cluster's
// before its own join is through. It refuses every Raft connection
// until its join has asked a member which cluster it joins, and then
// refuses other clusters' nodes.
func TestAJoiningNodeTakesNoOtherClustersTraffic(t *testing.T) {
	ctx := ctxT(t, 2*time.Minute)
	a := clustertest.Start(t, 3, clustertest.Options{})
	gone := a.Follower()
	addr := a.Nodes[gone].Server.Node().RaftAddr()
	a.Kill(gone)
	aLeader := a.Leader()

	reg := prometheus.NewRegistry()
	n, err := raftnode.Open(ctx, raftnode.Config{
		NodeID: a.Nodes[gone].ID, DataDir: t.TempDir(), RaftBind: addr, APIAdvertise: "127.0.0.1:1",
		Joining: true, Metrics: reg, Raft: clustertest.FastRaft(), Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = n.Shutdown(context.Background()) }()
	refused := func(reason string) float64 {
		t.Helper()
		return labeledCounter(t, reg, "relay_control_raft_connections_refused_total", "reason", reason)
	}
	untouched := func() {
		t.Helper()
		if h, err := n.FSM().History(); err != nil || h != "" || n.FSM().AppliedIndex() != 0 {
			t.Fatalf("the joining node took cluster A's state: history %q, applied %d, %v", h, n.FSM().AppliedIndex(), err)
		}
	}
	// A's leader knocks before the node knows its cluster.
	clustertest.Eventually(t, 60*time.Second, func() error {
		untouched()
		if got := refused("not_joined"); got < 1 {
			return fmt.Errorf("%v connections refused as not joined", got)
		}
		return nil
	})
	untouched()
	// The node's join names another cluster: A is refused as such.
	n.ExpectHistory(fsm.NewHistoryID())
	clustertest.Eventually(t, 60*time.Second, func() error {
		untouched()
		if got, dialer := refused("other_cluster"), a.Nodes[aLeader].Metric(t, "relay_control_raft_connections_refused_total"); got < 1 || dialer < 2 {
			return fmt.Errorf("%v refused as another cluster's by the joining node, %v refusals by A's leader", got, dialer)
		}
		return nil
	})
	untouched()
}
