package raftnode_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// Writes through any node; a linearizable read on every node right after
// each write sees it.
func TestThreeNodesWriteAnywhereReadLinearizable(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	ctx := ctxT(t, time.Minute)
	for i := 0; i < 30; i++ {
		via := i % 3
		id := fmt.Sprintf("u%d", i)
		res, err := c.CreateUser(ctx, via, id)
		if err != nil {
			t.Fatalf("create %s via %s: %v", id, c.Nodes[via].ID, err)
		}
		if res.GetRevision() == 0 || res.GetUser().GetId() != id {
			t.Fatalf("create %s: unexpected result %v", id, res)
		}
		for j, n := range c.Nodes {
			node := n.Server.Node()
			if err := node.Barrier(ctx); err != nil {
				t.Fatalf("barrier on node %d: %v", j, err)
			}
			if _, err := node.FSM().GetUser(id); err != nil {
				t.Fatalf("linearizable read of %s on %s after write via %s: %v", id, n.ID, c.Nodes[via].ID, err)
			}
		}
	}
	// A rejected command surfaces its typed error on every path.
	if _, err := c.CreateUser(ctx, c.Follower(), "u0"); !errors.Is(err, fsm.ErrAlreadyExists) {
		t.Fatalf("duplicate create via follower: got %v, want ErrAlreadyExists", err)
	}
	c.WaitConverged()
}

// The leader dies without warning during a stream of writes: every write
// that returned success is present once a new leader is elected, and
// writes continue within the election time: the first write started
// after the crash is acknowledged within a bound derived from the Raft
// timeouts (a correctness property, with a generous factor; not a
// benchmark).
func TestKillLeaderDuringWrites(t *testing.T) {
	tuning := clustertest.FastRaft()
	c := clustertest.Start(t, 3, clustertest.Options{Raft: tuning})
	ctx := ctxT(t, 2*time.Minute)
	leader := c.Leader()

	type ack struct {
		id         string
		start, end time.Time
	}
	var (
		mu    sync.Mutex
		acked []ack
		seq   atomic.Int64
	)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 3; w++ {
		if w == leader {
			continue
		}
		wg.Add(1)
		go func(via int) {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				id := fmt.Sprintf("w%d", seq.Add(1))
				start := time.Now()
				wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				_, err := c.CreateUser(wctx, via, id)
				cancel()
				if err == nil {
					mu.Lock()
					acked = append(acked, ack{id, start, time.Now()})
					mu.Unlock()
				}
			}
		}(w)
	}
	count := func() int { mu.Lock(); defer mu.Unlock(); return len(acked) }
	clustertest.Eventually(t, 30*time.Second, func() error {
		if count() < 50 {
			return fmt.Errorf("%d writes acked", count())
		}
		return nil
	})
	killedAt := time.Now()
	c.Kill(leader)
	killed := time.Now()
	ackedAtKill := count()
	// Writes continue under the new leader.
	clustertest.Eventually(t, 30*time.Second, func() error {
		if count() < ackedAtKill+50 {
			return fmt.Errorf("%d writes acked, %d at kill", count(), ackedAtKill)
		}
		return nil
	})
	close(stop)
	wg.Wait()
	newLeader := c.Leader()
	if newLeader == leader {
		t.Fatal("killed node still leader")
	}

	// A follower notices the silence after at most 2 heartbeat timeouts
	// and wins an election after at most 2 election timeouts (a split
	// vote adds one more); the first write started after the crash may
	// wait for a write in flight to finish its retries, whose backoff
	// grows to 640 ms. On a loaded 2-core machine under -race that adds
	// up to seconds: the bound is generous (ten times the larger timeout,
	// at least 10 s) and catches a failover that hangs, not a slow one;
	// the time it took is logged.
	bound := max(10*time.Second, 10*max(tuning.HeartbeatTimeout, tuning.ElectionTimeout))
	var first *ack
	for i := range acked {
		if a := &acked[i]; a.start.After(killed) && (first == nil || a.end.Before(first.end)) {
			first = a
		}
	}
	if first == nil {
		t.Fatal("no write started after the crash was acknowledged")
	}
	if took := first.end.Sub(killedAt); took > bound {
		t.Fatalf("first write after the leader crash acknowledged %v after it, want within %v", took, bound)
	} else {
		t.Logf("first write after the crash acknowledged %v after it (bound %v)", took, bound)
	}

	node := c.Nodes[newLeader].Server.Node()
	if err := node.Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	for _, a := range acked {
		if _, err := node.FSM().GetUser(a.id); err != nil {
			t.Fatalf("acknowledged write %s lost after leader crash: %v", a.id, err)
		}
	}
	t.Logf("%d acknowledged writes, all present", len(acked))

	// The crashed node comes back from disk and catches up.
	c.Restart(leader)
	c.WaitReady()
	c.WaitConverged()
}

// All nodes stop and start again from their data dirs: the same state.
// What the restart itself writes is the nodes' own: each node withdraws
// its features as it stops and records them again once back (with the
// change feed and request ids of those writes). Every other record is
// unchanged, and the node records end as they were.
func TestRestartAllFromDisk(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	ctx := ctxT(t, time.Minute)
	for i := 0; i < 50; i++ {
		if _, err := c.CreateUser(ctx, i%3, fmt.Sprintf("r%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	c.WaitConverged()
	records := func() map[string]string {
		var b bytes.Buffer
		if _, err := c.Nodes[0].Server.Node().FSM().WriteBackup(&b); err != nil {
			t.Fatal(err)
		}
		return clustertest.Records(t, b.Bytes())
	}
	before := records()
	applied := c.Nodes[0].Server.Node().FSM().AppliedIndex()
	for i := range c.Nodes {
		c.Shutdown(i)
	}
	for i := range c.Nodes {
		c.Restart(i)
	}
	c.WaitReady()
	clustertest.Eventually(t, 30*time.Second, func() error {
		c.WaitConverged()
		after := records()
		for k, v := range before {
			if k == "m:applied" {
				continue
			}
			if got, ok := after[k]; !ok || got != v {
				return fmt.Errorf("record %q changed across the restart (present after: %v)", k, ok)
			}
		}
		for k := range after {
			if _, ok := before[k]; !ok && !strings.HasPrefix(k, "c:") && !strings.HasPrefix(k, "q:") && !strings.HasPrefix(k, "Q:") {
				return fmt.Errorf("record %q appeared across the restart", k)
			}
		}
		return nil
	})
	// The restarted cluster keeps working and revisions keep growing.
	res, err := c.CreateUser(ctx, 1, "after-restart")
	if err != nil {
		t.Fatal(err)
	}
	if res.GetRevision() <= applied {
		t.Fatalf("revision went back: %d after restart, %d before", res.GetRevision(), applied)
	}
}

// Every node that stops gracefully withdraws its features, also after
// another member did (whose record then says it withdrew them, not that
// its release has none); each records them again once it runs.
func TestGracefulStopsWithdrawFeatures(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	want := strings.Join(fsm.Features(), ",")
	recorded := func(on int, ids ...string) func() error {
		return func() error {
			for _, id := range ids {
				rec, err := c.Nodes[on].Server.Node().FSM().GetNode(id)
				if err != nil {
					return err
				}
				if got := strings.Join(rec.GetFeatures(), ","); got != want || rec.GetFeaturesWithdrawn() {
					return fmt.Errorf("%s's record on %s: features %q, withdrawn %v", id, c.Nodes[on].ID, got, rec.GetFeaturesWithdrawn())
				}
			}
			return nil
		}
	}
	clustertest.Eventually(t, 30*time.Second, recorded(2, "n1", "n2", "n3"))
	c.Shutdown(0)
	c.Shutdown(1)
	clustertest.Eventually(t, 30*time.Second, func() error {
		for _, id := range []string{"n1", "n2"} {
			rec, err := c.Nodes[2].Server.Node().FSM().GetNode(id)
			if err != nil {
				return err
			}
			if len(rec.GetFeatures()) != 0 || !rec.GetFeaturesWithdrawn() || rec.GetApiAddr() == "" {
				return fmt.Errorf("%s's record after its graceful stop: %v", id, rec)
			}
		}
		return nil
	})
	c.Restart(0)
	c.Restart(1)
	c.WaitReady()
	clustertest.Eventually(t, 30*time.Second, recorded(2, "n1", "n2", "n3"))
}

// A registration that lands after a stopping node's withdrawal has
// committed (one proposed before it, still in flight) records the node's
// features again; the node then withdraws them a second time, under a
// request id of its own, so that its record ends without them.
func TestWithdrawalRepeatsWhenFeaturesReturn(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	ctx := ctxT(t, 2*time.Minute)
	stopping := c.Follower()
	id := c.Nodes[stopping].ID
	node := c.Nodes[stopping].Server.Node()
	leader := c.Nodes[c.Leader()].Server.Node()
	// Every member has recorded its features, as the stopping node sees
	// it: the withdrawal is sent only then.
	clustertest.Eventually(t, 30*time.Second, func() error {
		for _, m := range c.Nodes {
			rec, err := node.FSM().GetNode(m.ID)
			if err != nil {
				return err
			}
			if len(rec.GetFeatures()) == 0 {
				return fmt.Errorf("%s's features are not recorded on %s yet", m.ID, id)
			}
		}
		return nil
	})
	// The hook runs inside the node's stop, under the withdrawal's own
	// deadline (3 s for both attempts): it reports with Errorf, never
	// Fatal, so that the stop still ends and closes the stores.
	var attempts []int
	raftnode.SetAfterWithdraw(node, func(attempt int) {
		attempts = append(attempts, attempt)
		if attempt != 0 {
			return
		}
		rec, err := node.FSM().GetNode(id)
		if err != nil || len(rec.GetFeatures()) != 0 || !rec.GetFeaturesWithdrawn() {
			t.Errorf("%s's record after its first withdrawal: %v (%v)", id, rec, err)
			return
		}
		// What a registration of this node writes, landing late.
		late := &statev1.Node{Id: id, RaftAddr: rec.GetRaftAddr(), ApiAddr: rec.GetApiAddr(), Features: fsm.Features()}
		actx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		res, err := leader.Apply(actx, &statev1.Command{Op: &statev1.Command_PutNode{PutNode: &statev1.PutNode{Node: late}}})
		if err != nil {
			t.Errorf("late registration: %v", err)
			return
		}
		// The stopping node has applied it once it is at its index.
		if err := node.FSM().WaitApplied(actx, res.GetRevision()); err != nil {
			t.Errorf("the late registration did not reach %s: %v", id, err)
		}
	})
	c.Shutdown(stopping)
	if len(attempts) != 2 || attempts[0] != 0 || attempts[1] != 1 {
		t.Fatalf("withdrawal attempts %v, want [0 1]", attempts)
	}
	clustertest.Eventually(t, 30*time.Second, func() error {
		rec, err := leader.FSM().GetNode(id)
		if err != nil {
			return err
		}
		if len(rec.GetFeatures()) != 0 || !rec.GetFeaturesWithdrawn() || rec.GetApiAddr() == "" {
			return fmt.Errorf("%s's record after its graceful stop: %v", id, rec)
		}
		return nil
	})
}

// A node that was down while the leader compacted its log catches up by
// snapshot install.
func TestLaggingNodeCatchesUpBySnapshot(t *testing.T) {
	raft := clustertest.FastRaft()
	raft.TrailingLogs = 10
	raft.SnapshotThreshold = 50
	raft.SnapshotInterval = 50 * time.Millisecond
	c := clustertest.Start(t, 3, clustertest.Options{Raft: raft})
	ctx := ctxT(t, 2*time.Minute)
	lag := c.Follower()
	lagApplied := c.Nodes[lag].Server.Node().FSM().AppliedIndex()
	c.Shutdown(lag)
	via := c.Leader()
	for i := 0; i < 300; i++ {
		if _, err := c.CreateUser(ctx, via, fmt.Sprintf("s%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	leader := c.Nodes[via].Server.Node()
	if err := leader.Snapshot(); err != nil {
		t.Fatal(err)
	}
	st, err := leader.Status()
	if err != nil {
		t.Fatal(err)
	}
	if st.LastSnapshotIndex < 250 {
		t.Fatalf("leader's last snapshot at %d, want the log compacted past 250", st.LastSnapshotIndex)
	}
	if lagApplied+1 >= st.LastSnapshotIndex-raft.TrailingLogs {
		t.Fatalf("stopped node at %d: not behind the leader's compacted log (snapshot %d)", lagApplied, st.LastSnapshotIndex)
	}
	c.Restart(lag)
	lagNode := c.Nodes[lag].Server.Node()
	c.WaitReady()
	c.WaitConverged()
	// The entries the node missed are gone from the leader's log, so it
	// can only have caught up through the leader's snapshot: its
	// snapshot store now holds one at least as new as the leader's, and
	// its state machine was restored from a snapshot exactly once (the
	// install; at start it had nothing newer than its own state).
	// (Raft records the installed snapshot after the state machine has
	// restored it, which is when the node counts as converged: wait.)
	clustertest.Eventually(t, 10*time.Second, func() error {
		lst, err := lagNode.Status()
		if err != nil {
			return err
		}
		if lst.LastSnapshotIndex < st.LastSnapshotIndex {
			return fmt.Errorf("lagging node's last snapshot at %d, the leader's at %d: no snapshot was installed", lst.LastSnapshotIndex, st.LastSnapshotIndex)
		}
		return nil
	})
	if got := counterValue(t, c.Nodes[lag], "relay_control_snapshot_restores_total", "ok"); got != 1 {
		t.Fatalf("lagging node restored from a snapshot %v times, want 1 (the install)", got)
	}
	if got := counterValue(t, c.Nodes[via], "relay_control_snapshot_restores_total", "ok"); got != 0 {
		t.Fatalf("leader restored from a snapshot %v times", got)
	}
	if _, err := lagNode.FSM().GetUser("s0"); err != nil {
		t.Fatalf("state from the snapshot missing: %v", err)
	}
}

// counterValue returns a counter of node n with the given result label
// (0 when absent).
func counterValue(t *testing.T, n *clustertest.Node, name, result string) float64 {
	t.Helper()
	return clustertest.GatherSum(t, n.Server.Registry(), name, "result", result)
}

// Voters are added up to five, one is removed, leadership moves.
func TestMembershipChanges(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	ctx := ctxT(t, 2*time.Minute)
	c.AddNode()
	c.AddNode()
	c.WaitReady()
	if got := c.VoterIDs(c.Leader()); len(got) != 5 {
		t.Fatalf("voters %v, want 5", got)
	}
	if _, err := c.CreateUser(ctx, 4, "five"); err != nil {
		t.Fatal(err)
	}
	c.WaitConverged()

	// Remove a follower through the leader.
	l := c.Leader()
	victim := c.Follower()
	if _, err := c.Nodes[l].Server.Node().RemoveServer(ctx, c.Nodes[victim].ID); err != nil {
		t.Fatal(err)
	}
	c.Shutdown(victim)
	if got := c.VoterIDs(l); len(got) != 4 {
		t.Fatalf("voters after remove %v, want 4", got)
	}
	// Its node record is forgotten too.
	clustertest.Eventually(t, 10*time.Second, func() error {
		if _, err := c.Nodes[l].Server.Node().FSM().GetNode(c.Nodes[victim].ID); !errors.Is(err, fsm.ErrNotFound) {
			return fmt.Errorf("node record of removed member: %v", err)
		}
		return nil
	})

	// Transfer leadership to a chosen voter.
	var target int
	for i, n := range c.Nodes {
		if i != l && n.Server != nil {
			target = i
		}
	}
	c.TransferLeadership(ctx, target)
	if nl := c.Leader(); nl != target {
		t.Fatalf("leader is %s, want %s", c.Nodes[nl].ID, c.Nodes[target].ID)
	}
	// Writes through the old leader are forwarded to the new one.
	if _, err := c.CreateUser(ctx, l, "after-transfer"); err != nil {
		t.Fatal(err)
	}
	c.WaitConverged()
}

// A member removed from the cluster and started again on its data dir
// (it cannot be ready: no member answers it) says so: Removed, an error
// in its log naming the fix, and /readyz; it withdraws no features on
// the way out, since the cluster counts none of its. Also when it was
// down as it was removed, so that its own log still names it a member
// (the members that know a leader do not). The cluster is unaffected.
func TestARemovedNodeStartedAgainSaysSo(t *testing.T) {
	raft := clustertest.FastRaft()
	raft.RemovedAfter = 500 * time.Millisecond
	rec := clustertest.NewLogRecorder()
	c := clustertest.Start(t, 3, clustertest.Options{Raft: raft, Logger: slog.New(rec)})
	c.AddNode()
	c.WaitReady()
	ctx := ctxT(t, 3*time.Minute)
	removed := func(i int) {
		t.Helper()
		if _, err := c.Nodes[c.Leader()].Server.Node().RemoveServer(ctx, c.Nodes[i].ID); err != nil {
			t.Fatal(err)
		}
	}
	saysSo := func(i int) {
		t.Helper()
		id := c.Nodes[i].ID
		node := c.Nodes[i].Server.Node()
		clustertest.Eventually(t, time.Minute, func() error {
			if !node.Removed() {
				return fmt.Errorf("%s, removed and started again, does not report it", id)
			}
			return nil
		})
		said := rec.Find("this node is not a member of the cluster its data dir belongs to: it was removed (relayctl cluster remove) "+
			"and is not ready until it is added again; to bring it back, stop it, empty its data dir and start it with --join (RELAY_JOIN) "+
			"to a member, or, if it should be gone, stop it", func(r clustertest.Record) bool { return r.Attrs["test_node"].String() == id })
		if len(said) != 1 {
			t.Fatalf("%s logged its state %d times, want once", id, len(said))
		}
		resp, err := http.Get("http://" + c.Nodes[i].Server.AdminAddr() + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "removed from the cluster") {
			t.Fatalf("/readyz of %s: %d %q", id, resp.StatusCode, body)
		}
		if _, err := c.CreateUser(ctx, c.Leader(), "after-removal-of-"+id); err != nil {
			t.Fatal(err)
		}
		c.Shutdown(i)
		if w := rec.Find("could not withdraw this node's features before shutdown: until it records them again, the cluster counts on them",
			func(r clustertest.Record) bool { return r.Attrs["test_node"].String() == id }); len(w) != 0 {
			t.Fatalf("%s tried to withdraw features it does not have: %v", id, w[0].Attrs["err"])
		}
	}

	// Removed while it ran: it may or may not have received its removal
	// (the leader sends it once, as it commits it).
	ran := c.Follower()
	removed(ran)
	c.Shutdown(ran)
	c.Restart(ran)
	saysSo(ran)

	// It was down when it was removed: its log still names it. Its Raft
	// traffic stays cut: the leader, as it stops replicating to a
	// removed server, sends it the log up to its removal once more, after
	// a backoff for the failures while it was down, and a node back by
	// then would learn of its removal from its own log (the case above).
	down := c.Follower()
	c.Shutdown(down)
	removed(down)
	c.Isolate(down)
	c.Restart(down)
	if ids := c.VoterIDs(down); !slices.Contains(ids, c.Nodes[down].ID) {
		t.Fatalf("%s, removed while down, does not list itself (%v): the case is not the one meant", c.Nodes[down].ID, ids)
	}
	saysSo(down)
}

// A single-node cluster works on its own.
func TestSingleNode(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	ctx := ctxT(t, 30*time.Second)
	if _, err := c.CreateUser(ctx, 0, "solo"); err != nil {
		t.Fatal(err)
	}
	res, err := c.Nodes[0].Server.Node().Apply(ctx, &statev1.Command{Op: &statev1.Command_RegisterDevice{
		RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: "d1", UserId: "solo", Name: "phone", PublicKey: make([]byte, 32)}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if res.GetDevice().GetId() != "d1" {
		t.Fatalf("unexpected result %v", res)
	}
}

// A follower that restarts behind the leader records its addresses and
// features once. Its write, forwarded, returns once the leader committed
// it, before the follower has applied the log up to it; a node that then
// read its own stale record proposed it again and again until it caught
// up, hundreds of entries per restart (and more to catch up with at the
// next).
func TestARestartedFollowerRecordsItselfOnce(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	lag, via := c.StopBehind(ctxT(t, 2*time.Minute), 300, "b")
	leader := c.Nodes[via].Server.Node()
	before := leader.FSM().AppliedIndex()
	id := c.Nodes[lag].ID
	c.Restart(lag)
	c.WaitReady()
	want := strings.Join(fsm.Features(), ",")
	clustertest.Eventually(t, 30*time.Second, func() error {
		rec, err := c.Nodes[lag].Server.Node().FSM().GetNode(id)
		if err != nil {
			return err
		}
		if got := strings.Join(rec.GetFeatures(), ","); got != want || rec.GetFeaturesWithdrawn() {
			return fmt.Errorf("%s's own record: features %q, withdrawn %v", id, got, rec.GetFeaturesWithdrawn())
		}
		return nil
	})
	c.WaitConverged()
	// Its one write, and a little room for a write the test does not
	// make (none is expected).
	if wrote := leader.FSM().AppliedIndex() - before; wrote > 3 {
		t.Fatalf("the restarted follower's registration took %d entries, want 1", wrote)
	}
}

// A graceful stop logs no error: the connections its peers had open to
// it close under hashicorp/raft's reader, which calls that a failure to
// decode a command; it is logged at debug level.
func TestAGracefulStopLogsNoError(t *testing.T) {
	rec := clustertest.NewLogRecorder()
	c := clustertest.Start(t, 3, clustertest.Options{Logger: slog.New(rec)})
	if _, err := c.CreateUser(ctxT(t, time.Minute), 0, "before-stop"); err != nil {
		t.Fatal(err)
	}
	c.WaitConverged()
	c.Shutdown(c.Follower())
	c.Shutdown(c.Leader())
	decode := func(level slog.Level) []clustertest.Record {
		return rec.Find("failed to decode incoming command", func(r clustertest.Record) bool { return r.Level == level })
	}
	if errs := decode(slog.LevelError); len(errs) != 0 {
		t.Fatalf("a graceful stop logged %d errors, the first: %v", len(errs), errs[0].Attrs["error"])
	}
}

// A member that is down does not fill the leader's log with errors:
// hashicorp/raft reports every failed heartbeat (here ten a second) at
// ERROR; the first for that member comes at WARN, the rest at DEBUG
// until a minute has passed.
func TestADownMemberIsLoggedOnceAMinute(t *testing.T) {
	rec := clustertest.NewLogRecorder()
	c := clustertest.Start(t, 3, clustertest.Options{Logger: slog.New(rec)})
	leader := c.Leader()
	down := c.Follower()
	peer := c.Nodes[down].Server.Node().RaftAddr()
	heartbeats := func(match func(clustertest.Record) bool) []clustertest.Record {
		return rec.Find("failed to heartbeat to", func(r clustertest.Record) bool {
			return r.Attrs["test_node"].String() == c.Nodes[leader].ID && r.Attrs["peer"].String() == peer && (match == nil || match(r))
		})
	}
	at := func(l slog.Level) int {
		return len(heartbeats(func(r clustertest.Record) bool { return r.Level == l }))
	}
	before, warnBefore := len(heartbeats(nil)), at(slog.LevelWarn) // from the cluster's start
	start := time.Now()
	c.Shutdown(down)
	clustertest.Eventually(t, 30*time.Second, func() error {
		if n := len(heartbeats(nil)) - before; n < 10 {
			return fmt.Errorf("%d failed heartbeats logged", n)
		}
		return nil
	})
	if n := at(slog.LevelError); n != 0 {
		t.Fatalf("%d failed heartbeats at ERROR", n)
	}
	// One run: one at WARN, and one more for each minute it lasted. (A
	// run of the cluster's start ended less than 10 s before goes on:
	// its WARN counts.)
	warn := at(slog.LevelWarn)
	if n, most := warn-warnBefore, 1+int(time.Since(start)/time.Minute); warn < 1 || n > most {
		t.Fatalf("%d failed heartbeats at WARN (%d since the stop), want 1 to %d since", warn, n, most)
	}
}

// A restarted node that has not heard from a leader yet reports as
// committed what its state applied before the restart, not the 0
// hashicorp/raft knows until a leader tells it (cluster status, the
// relay_control_raft_commit_index gauge).
func TestARestartedNodeKnowsWhatItHadCommitted(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	if _, err := c.CreateUser(ctxT(t, time.Minute), 0, "before-restart"); err != nil {
		t.Fatal(err)
	}
	c.WaitConverged()
	f := c.Follower()
	c.Shutdown(f)
	c.Isolate(f) // it hears no leader after the restart
	c.Restart(f)
	nd := c.Nodes[f]
	st, err := nd.Server.Node().Status()
	if err != nil {
		t.Fatal(err)
	}
	if st.LeaderID != "" {
		t.Fatalf("the isolated node knows a leader, %s: the test needs one that has not heard from it", st.LeaderID)
	}
	if st.AppliedIndex == 0 || st.CommitIndex < st.AppliedIndex {
		t.Fatalf("after the restart: commit index %d, applied %d; want commit >= applied > 0", st.CommitIndex, st.AppliedIndex)
	}
	if g := nd.Metric(t, "relay_control_raft_commit_index"); g < float64(st.AppliedIndex) {
		t.Fatalf("relay_control_raft_commit_index %v, want at least the applied index %d", g, st.AppliedIndex)
	}
	c.Heal(f)
	clustertest.Eventually(t, 30*time.Second, func() error {
		st, err := nd.Server.Node().Status()
		if err != nil || st.LeaderID == "" {
			return fmt.Errorf("no leader known yet (%v)", err)
		}
		return nil
	})
}

// A leader whose first entry never commits (here its no-op writes fail)
// and which then loses its leadership (cut off) ends the linearizable
// reads waiting on it with ErrNoLeader, which callers retry on the next
// leader; they used to wait for their own deadline, for good without one.
func TestAReadOnALeaderThatNeverCommittedEndsWithItsLeadership(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	ctx := ctxT(t, 2*time.Minute)
	target := c.Follower()
	c.Nodes[target].Faults.FailWrites("noop", 1<<30)
	t.Cleanup(func() { c.Nodes[target].Faults.FailWrites("noop", 0) })
	node := c.Nodes[target].Server.Node()
	clustertest.Eventually(t, 60*time.Second, func() error {
		if node.IsLeader() {
			return nil
		}
		for _, n := range c.Running() {
			if n.Server.Node().IsLeader() {
				if _, err := n.Server.Node().TransferLeadership(ctx, c.Nodes[target].ID); err != nil {
					return err
				}
			}
		}
		return errors.New("not leader yet")
	})
	read := make(chan error, 1)
	go func() {
		_, err := node.ReadIndexLocal(ctx)
		read <- err
	}()
	c.Isolate(target)
	t.Cleanup(func() { c.Heal(target) })
	select {
	case err := <-read:
		if !errors.Is(err, raftnode.ErrNoLeader) {
			t.Fatalf("the read ended with %v, want ErrNoLeader", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the read still waits on a leadership that ended")
	}
}

// A follower cut off from Raft right after it got a read index from its
// leader never applies it: the read ends Unavailable-bound (ErrNoLeader)
// within LeaderWait, which callers retry on another node, instead of
// waiting for its caller's own deadline.
func TestAReadOnACutOffFollowerEndsWithinLeaderWait(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	ctx := ctxT(t, 2*time.Minute)
	f := c.Follower()
	c.Isolate(f) // Raft traffic only: its API, and its forwarding, still work
	t.Cleanup(func() { c.Heal(f) })
	// Committed by the other two, which the cut-off follower never gets.
	if _, err := c.CreateUser(ctx, c.Leader(), "behind-the-cut"); err != nil {
		t.Fatal(err)
	}
	read := make(chan error, 1)
	go func() { read <- c.Nodes[f].Server.Node().Barrier(ctx) }()
	select {
	case err := <-read:
		if !errors.Is(err, raftnode.ErrNoLeader) {
			t.Fatalf("the read on the cut-off follower: %v, want ErrNoLeader", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("the read on the cut-off follower still waits after a minute (LeaderWait is 5 s)")
	}
}
