package raftnode_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
	"github.com/edge-relay/relay/control/server"
	"github.com/edge-relay/relay/storage/state"
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
	clustertest.Eventually(t, 90*time.Second, func() error {
		// Whoever leads A dials (leadership may move on a busy machine).
		if got, dialers := bn.Metric(t, refusedMetric), refusedByRunning(t, a); got < 2 || dialers < 2 {
			return fmt.Errorf("refusals: %v by B's node, %v by A's nodes; want 2 each", got, dialers)
		}
		return nil
	})
	close(stop)
	<-watched
	if len(followed) > 0 {
		t.Fatalf("B's node stopped leading %d times, following %q", len(followed), followed)
	}

	// Each cluster goes on with its own writes only.
	if _, err := a.CreateUser(ctx, a.Leader(), "only-in-a"); err != nil {
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

const refusedMetric = "relay_control_raft_connections_refused_total"

// refusedByRunning sums the cluster check's refusals over c's running nodes.
func refusedByRunning(t *testing.T, c *clustertest.Cluster) float64 {
	t.Helper()
	var sum float64
	for _, n := range c.Running() {
		sum += n.Metric(t, refusedMetric)
	}
	return sum
}

// A rolling upgrade from a release without the cluster check: while n1
// and n2 run the older release (its Raft connections carry no hello, and
// it reads one as an unknown RPC and hangs up), every node leads in turn
// and writes go through every node; n1 and n2 are then upgraded one at a
// time, and once every member records the check the cluster goes on as
// before. No connection is refused on the way.
func TestRollingUpgradeToTheClusterCheck(t *testing.T) {
	rel := newReleases(fsm.FeatureRaftClusterCheck, "n3")
	c := clustertest.Start(t, 3, clustertest.Options{Configure: rel.configure})
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
		rel.upgrade(c.Nodes[i].ID)
		c.Shutdown(i)
		c.Restart(i)
		c.WaitReady()
	}
	c.WaitFeature(fsm.FeatureRaftClusterCheck)
	round("upgraded")
	for _, n := range c.Nodes {
		if got := n.Metric(t, refusedMetric); got != 0 {
			t.Errorf("%s refused %v raft connections", n.ID, got)
		}
	}

	// Upgraded, the cluster refuses what only an older release sends: a
	// connection that starts with a Raft RPC, no hello.
	closedWithoutTheCheck(t, c.Nodes[0].Server.Node().RaftAddr())
	if got := counterOf(t, c.Nodes[0], "no_hello"); got != 1 {
		t.Fatalf("no_hello refusals %v, want 1", got)
	}
}

// releases runs a cluster of two releases: nodes not upgraded run one
// without a feature.
type releases struct {
	older    []string
	mu       sync.Mutex
	upgraded map[string]bool
}

// newReleases returns releases whose older one lacks feature, with the
// nodes ids upgraded already.
func newReleases(feature string, ids ...string) *releases {
	r := &releases{older: slices.DeleteFunc(fsm.Features(), func(f string) bool { return f == feature }), upgraded: map[string]bool{}}
	for _, id := range ids {
		r.upgraded[id] = true
	}
	return r
}

// configure is a clustertest.Options.Configure.
func (r *releases) configure(cfg *server.Config) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.upgraded[cfg.NodeID] {
		cfg.Features = r.older
	}
}

// upgrade makes node id start with the newer release from now on.
func (r *releases) upgrade(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.upgraded[id] = true
}

// closedWithoutTheCheck opens a Raft connection to addr as a node of an
// older release would, starting with an RPC's type byte, and wants it
// closed unanswered.
func closedWithoutTheCheck(t *testing.T, addr string) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte{1}); err != nil { // a vote request's type byte
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	if got, err := io.ReadAll(conn); len(got) != 0 || (err != nil && !errors.Is(err, syscall.ECONNRESET)) {
		t.Fatalf("a connection without the check: read %q, %v; want it closed", got, err)
	}
}

func counterOf(t *testing.T, n *clustertest.Node, reason string) float64 {
	t.Helper()
	return clustertest.GatherSum(t, n.Server.Registry(), refusedMetric, "reason", reason)
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
	a.Leader() // A goes on, and its leader keeps dialing the address

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
		return clustertest.GatherSum(t, reg, refusedMetric, "reason", reason)
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
	if err := n.ExpectHistory(strings.Repeat("h", fsm.MaxHistoryLen+1), true); err == nil {
		t.Fatal("an over-long history was taken")
	}
	if err := n.ExpectHistory(fsm.NewHistoryID(), true); err != nil {
		t.Fatal(err)
	}
	// Every member of the cluster it joins has the check: a connection
	// without it (an older release's, from elsewhere) is refused too.
	closedWithoutTheCheck(t, addr)
	if got := refused("no_hello"); got != 1 {
		t.Fatalf("no_hello refusals %v, want 1", got)
	}
	clustertest.Eventually(t, 60*time.Second, func() error {
		untouched()
		// A's nodes count other_cluster refusals, not not_joined ones.
		if got, dialers := refused("other_cluster"), refusedByRunning(t, a); got < 1 || dialers < 1 {
			return fmt.Errorf("%v refused as another cluster's by the joining node, %v refusals by A's nodes", got, dialers)
		}
		return nil
	})
	untouched()
}

// A voter joins only an initialized cluster: one added before could
// lead, if the first node lost the lead, and draw a history of its own,
// and the two would refuse each other for good.
func TestAVoterJoinsOnlyAnInitializedCluster(t *testing.T) {
	ctx := ctxT(t, time.Minute)
	// A bare node: no server, so no leader task initializes it.
	n, err := raftnode.Open(ctx, raftnode.Config{
		NodeID: "n1", DataDir: t.TempDir(), RaftBind: "127.0.0.1:0", APIAdvertise: "127.0.0.1:1",
		Bootstrap: true, Raft: clustertest.FastRaft(), Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = n.Shutdown(context.Background()) }()
	clustertest.Eventually(t, 30*time.Second, func() error {
		if !n.IsLeader() {
			return errors.New("not leading yet")
		}
		return nil
	})
	if h, err := n.FSM().History(); err != nil || len(h) != 32 {
		t.Fatalf("a bootstrapped node's history before it is initialized: %q, %v", h, err)
	}
	if _, err := n.AddVoter(ctx, "n2", "127.0.0.1:1", ""); !errors.Is(err, raftnode.ErrNotInitialized) {
		t.Fatalf("add voter before the cluster is initialized: %v, want ErrNotInitialized", err)
	}
}

// A history that a bootstrap drew before it failed to start Raft is not
// spoken for by the node started again to join: it would refuse the
// cluster it joins.
func TestALeftoverHistoryIsDropped(t *testing.T) {
	ctx := ctxT(t, time.Minute)
	dir := t.TempDir()
	st, err := state.Open(state.Config{Dir: filepath.Join(dir, "state"), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if err := fsm.SetHistory(st, "left-by-a-failed-bootstrap"); err != nil {
		t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	n, err := raftnode.Open(ctx, raftnode.Config{
		NodeID: "n2", DataDir: dir, RaftBind: "127.0.0.1:0", APIAdvertise: "127.0.0.1:1",
		Joining: true, Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = n.Shutdown(context.Background()) }()
	if h, err := n.FSM().History(); err != nil || h != "" {
		t.Fatalf("history after the start: %q, %v; want none", h, err)
	}
}

// A cluster made by a release before histories has none in any member's
// state. Restarted (upgraded) to this release, its members must still
// take each other's Raft connections: the refusal of a node that lost its
// data ("lost_data") is for a node with no Raft state, not for one with
// no history, which every member of such a cluster is.
func TestAClusterWithoutAHistoryRunsAfterARestart(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	ctx := ctxT(t, 2*time.Minute)
	if _, err := c.CreateUser(ctx, c.Leader(), "before"); err != nil {
		t.Fatal(err)
	}
	c.WaitConverged()
	for i := range c.Nodes {
		c.Shutdown(i)
	}
	for _, n := range c.Nodes {
		st, err := state.Open(state.Config{Dir: filepath.Join(n.DataDir, "data", "state"), Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		// As the state of a release before histories: no m:history
		// (fsm.ClearHistory refuses a state with entries applied).
		b := st.NewBatch()
		if err := b.Delete([]byte("m:history")); err != nil {
			t.Fatal(err)
		}
		if err := b.Commit(); err != nil {
			t.Fatal(err)
		}
		if h, err := fsm.ReadHistory(st); err != nil || h != "" {
			t.Fatalf("history %q, %v: the test's state still has one", h, err)
		}
		if err := st.Close(); err != nil {
			t.Fatal(err)
		}
	}
	for i := range c.Nodes {
		c.Restart(i)
	}
	c.WaitReady()
	for i := range c.Nodes {
		if _, err := c.CreateUser(ctx, i, fmt.Sprintf("after-%d", i)); err != nil {
			t.Fatalf("a write through %s after the restart: %v", c.Nodes[i].ID, err)
		}
	}
	c.WaitConverged()
	for _, n := range c.Nodes {
		if got := counterOf(t, n, "lost_data"); got != 0 {
			t.Errorf("%s refused %v connections as from a node that lost its data", n.ID, got)
		}
	}
}
