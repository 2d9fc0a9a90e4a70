package raftnode_test

import (
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
	"github.com/edge-relay/relay/control/server"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

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
	var slowID atomic.Value // the node whose state machine stops
	slowID.Store("")
	release := make(chan struct{})
	tuning := clustertest.FastRaft()
	tuning.MaxUnappliedBytes, tuning.MaxAppendEntries = limit, perAppend
	c := clustertest.Start(t, 3, clustertest.Options{Raft: tuning, Configure: func(cfg *server.Config) {
		id := cfg.NodeID
		cfg.FSM.OnApply = func(time.Duration, int) {
			if slowID.Load() == id {
				<-release
			}
		}
	}})
	released := false
	defer func() {
		if !released {
			close(release) // the cluster's stop waits for the state machines
		}
	}()
	ctx := ctxT(t, 2*time.Minute)
	li := c.Leader()
	if _, err := c.CreateUser(ctx, li, "u"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.RegisterDevice(ctx, li, "u", "d"); err != nil {
		t.Fatal(err)
	}
	f := c.Follower()
	follower := c.Nodes[f].Server.Node()
	slowID.Store(c.Nodes[f].ID)
	leader := c.Nodes[li].Server.Node()
	event := make([]byte, size)
	exp := time.Now().Add(time.Hour).UnixMilli()
	for i := range entries {
		_, err := leader.Apply(ctx, &statev1.Command{ProposedAtMs: time.Now().UnixMilli(), Op: &statev1.Command_PutMailbox{PutMailbox: &statev1.PutMailbox{
			Entries:             []*statev1.MailboxEntry{{UserId: "u", DeviceId: "d", SenderDeviceId: "s", EventId: fmt.Sprint(i), Event: event, ExpiresAtMs: exp}},
			MaxEntriesPerDevice: fsm.MaxMailboxQuotaEntries, MaxBytesPerDevice: fsm.MaxMailboxQuotaBytes}}})
		if err != nil {
			t.Fatalf("entry %d: the cluster did not commit on while a follower's state machine stood still: %v", i, err)
		}
	}
	want := leader.FSM().AppliedIndex()
	clustertest.Eventually(t, 30*time.Second, func() error {
		if _, waiting := raftnode.ApplyGate(follower); !waiting {
			return fmt.Errorf("the slow follower's log store does not wait")
		}
		return nil
	})
	const bound = limit + 2*perAppend*(size+1<<10)
	if held, _ := raftnode.ApplyGate(follower); held > bound {
		t.Fatalf("the slow follower's state machine was handed %d bytes it has not applied, over %d", held, bound)
	}
	if st, err := follower.Status(); err != nil || st.CommitIndex >= want {
		t.Fatalf("the slow follower committed up to %d of %d (%v): it should have stopped taking entries", st.CommitIndex, want, err)
	}
	released = true
	close(release)
	if err := follower.FSM().WaitApplied(ctx, want); err != nil {
		t.Fatalf("the follower did not catch up once it applied again: %v", err)
	}
	clustertest.Eventually(t, 30*time.Second, func() error {
		if held, waiting := raftnode.ApplyGate(follower); held != 0 || waiting {
			return fmt.Errorf("the follower still holds %d bytes (waiting: %v)", held, waiting)
		}
		return nil
	})
	c.WaitConverged()
}
