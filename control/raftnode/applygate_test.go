package raftnode_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
	"github.com/edge-relay/relay/control/server"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// gateCluster is a cluster of three whose state machines bound their
// queue at limit bytes, with perAppend entries per AppendEntries, and
// one of which can be made to stop applying.
type gateCluster struct {
	*clustertest.Cluster
	slowID   atomic.Value // the node whose state machine stops after its next batch
	release  chan struct{}
	released sync.Once
}

func startGateCluster(t *testing.T, limit uint64, perAppend int) *gateCluster {
	gc := &gateCluster{release: make(chan struct{})}
	gc.slowID.Store("")
	tuning := clustertest.FastRaft()
	tuning.MaxUnappliedBytes, tuning.MaxAppendEntries = limit, perAppend
	gc.Cluster = clustertest.Start(t, 3, clustertest.Options{Raft: tuning, Configure: func(cfg *server.Config) {
		id := cfg.NodeID
		cfg.FSM.OnApply = func(time.Duration, int) {
			if gc.slowID.Load() == id {
				<-gc.release
			}
		}
	}})
	// Before the cluster stops (cleanups run last first): its stop waits
	// for the state machines.
	t.Cleanup(gc.resume)
	ctx := ctxT(t, time.Minute)
	li := gc.Leader()
	if _, err := gc.CreateUser(ctx, li, "u"); err != nil {
		t.Fatal(err)
	}
	if _, err := gc.RegisterDevice(ctx, li, "u", "d"); err != nil {
		t.Fatal(err)
	}
	return gc
}

// stall makes node i's state machine stop after its next batch.
func (gc *gateCluster) stall(i int) { gc.slowID.Store(gc.Nodes[i].ID) }

// resume lets the stalled state machine apply again.
func (gc *gateCluster) resume() { gc.released.Do(func() { close(gc.release) }) }

// put stores one mailbox entry of size bytes through the leader.
func put(ctx context.Context, leader *raftnode.Node, i, size int) error {
	_, err := leader.Apply(ctx, &statev1.Command{ProposedAtMs: time.Now().UnixMilli(), Op: &statev1.Command_PutMailbox{PutMailbox: &statev1.PutMailbox{
		Entries:             []*statev1.MailboxEntry{{UserId: "u", DeviceId: "d", SenderDeviceId: "s", EventId: fmt.Sprint(i), Event: make([]byte, size), ExpiresAtMs: time.Now().Add(time.Hour).UnixMilli()}},
		MaxEntriesPerDevice: fsm.MaxMailboxQuotaEntries, MaxBytesPerDevice: fsm.MaxMailboxQuotaBytes}}})
	return err
}

// inTerm runs attempt, which reports whether the term it ran in held to
// its end, up to three times until one does: the properties below hold
// for a node's role, and an election in the middle (FastRaft's timings
// on a loaded machine) voids an attempt rather than failing it.
func inTerm(t *testing.T, attempt func() bool) {
	t.Helper()
	for i := 1; ; i++ {
		if attempt() {
			return
		}
		if i == 3 {
			t.Fatal("an election interrupted each of 3 attempts")
		}
		t.Logf("attempt %d: an election interrupted it; again", i)
	}
}

// termOf returns a function reporting whether leader still leads in the
// term it leads now.
func termOf(t *testing.T, leader *raftnode.Node) (held func() bool) {
	t.Helper()
	st, err := leader.Status()
	if err != nil {
		t.Fatal(err)
	}
	return func() bool {
		now, err := leader.Status()
		return err == nil && now.Term == st.Term && leader.IsLeader()
	}
}

// until waits, at most 30 s, for cond or for the term to end; it reports
// whether the term held.
func until(t *testing.T, what string, held func() bool, cond func() bool) bool {
	t.Helper()
	clustertest.Eventually(t, 30*time.Second, func() error {
		if !held() || cond() {
			return nil
		}
		return fmt.Errorf("still waiting for %s", what)
	})
	return held()
}

// A follower whose state machine stops applying stores no more Raft
// entries once those Raft handed it and it has not applied hold more
// than MaxUnappliedBytes (1 MiB here), instead of queueing every
// committed entry it is sent (Raft's queue holds up to 128 batches of
// up to 64 entries, each up to a megabyte); the leader and the other
// follower commit on meanwhile, and once the state machine applies
// again the follower catches up on everything. At most one append's
// entries (MaxAppendEntries, 4 here) beyond the bound get in between two
// checks, two with an append's commit arriving late: 32 entries of
// 128 KiB (4 MiB) are proposed against a bound of 1 MiB plus 8 entries.
func TestASlowStateMachineHoldsItsQueueInBytes(t *testing.T) {
	const limit, size, entries, perAppend = 1 << 20, 128 << 10, 32, 4
	inTerm(t, func() bool {
		gc := startGateCluster(t, limit, perAppend)
		defer gc.resume() // also when an election voids the attempt
		ctx := ctxT(t, 2*time.Minute)
		leader := gc.Nodes[gc.Leader()].Server.Node()
		held := termOf(t, leader)
		f := gc.Follower()
		follower := gc.Nodes[f].Server.Node()
		gc.stall(f)
		for i := range entries {
			if err := put(ctx, leader, i, size); err != nil {
				if !held() {
					return false
				}
				t.Fatalf("entry %d: the cluster did not commit on while a follower's state machine stood still: %v", i, err)
			}
		}
		want := leader.FSM().AppliedIndex()
		if !until(t, "the slow follower's log store to wait", held, func() bool { _, waiting := raftnode.ApplyGate(follower); return waiting }) {
			return false
		}
		const bound = limit + 2*perAppend*(size+1<<10)
		if h, _ := raftnode.ApplyGate(follower); h > bound {
			t.Fatalf("the slow follower's state machine was handed %d bytes it has not applied, over %d", h, bound)
		}
		if st, err := follower.Status(); err != nil || st.CommitIndex >= want {
			t.Fatalf("the slow follower committed up to %d of %d (%v): it should have stopped taking entries", st.CommitIndex, want, err)
		}
		gc.resume()
		if err := follower.FSM().WaitApplied(ctx, want); err != nil {
			t.Fatalf("the follower did not catch up once it applied again: %v", err)
		}
		clustertest.Eventually(t, 30*time.Second, func() error {
			if h, waiting := raftnode.ApplyGate(follower); h != 0 || waiting {
				return fmt.Errorf("the follower still holds %d bytes (waiting: %v)", h, waiting)
			}
			return nil
		})
		gc.WaitConverged()
		return true
	})
}

// A leader does not wait for its own state machine: its queue holds its
// proposals' own entries, and a leader whose log store waited would
// commit nothing meanwhile (nor check its lease, hand leadership over or
// answer read indexes). With the leader's state machine stopped and more
// than the bound handed to it, the followers still get and apply every
// entry proposed after that, and the leader's log store never waited;
// once the state machine applied them, the gate forgets them.
func TestALeaderDoesNotWaitForItsStateMachine(t *testing.T) {
	const limit, size, entries, perAppend = 1 << 20, 128 << 10, 24, 4
	inTerm(t, func() bool {
		gc := startGateCluster(t, limit, perAppend)
		ctx := ctxT(t, 2*time.Minute)
		li := gc.Leader()
		leader := gc.Nodes[li].Server.Node()
		held := termOf(t, leader)
		base := leader.FSM().AppliedIndex()
		gc.stall(li)
		// Each proposal returns once the leader has applied it: only
		// after resume.
		var wg sync.WaitGroup
		errs := make(chan error, entries)
		defer func() { gc.resume(); wg.Wait() }()
		propose := func(from, to int) {
			for i := from; i < to; i++ {
				wg.Go(func() { errs <- put(ctx, leader, i, size) })
			}
		}
		// Half, until the leader's state machine holds more than the
		// bound; then the rest, which the leader stores with its queue
		// over it.
		propose(0, entries/2)
		if !until(t, "the leader's state machine to hold more than the bound", held, func() bool { h, _ := raftnode.ApplyGate(leader); return h > limit }) {
			return false
		}
		propose(entries/2, entries)
		for j, nd := range gc.Nodes {
			if j == li {
				continue
			}
			if !until(t, "follower "+nd.ID+" to apply what the stalled leader proposed", held, func() bool { return nd.Server.Node().FSM().AppliedIndex() >= base+entries }) {
				return false
			}
		}
		if !held() {
			return false
		}
		if h, waiting := raftnode.ApplyGate(leader); h <= limit || waiting {
			t.Fatalf("the leader holds %d bytes for its state machine (bound %d), waiting: %v", h, limit, waiting)
		}
		if w := clustertest.MetricValue(t, gc.Nodes[li].Server.Registry(), "relay_control_raft_store_wait_seconds_total"); w != 0 {
			t.Fatalf("the leader's log store waited %v s", w)
		}
		gc.resume()
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatalf("a proposal failed: %v", err)
			}
		}
		// A leader's books are kept short too: once its state machine
		// applied everything, the next store forgets it.
		if err := put(ctx, leader, entries, 1); err != nil {
			t.Fatal(err)
		}
		if n := raftnode.ApplyGateBooks(leader); n > 2 {
			t.Fatalf("the leader's gate still counts %d entries its state machine applied", n)
		}
		return true
	})
}
