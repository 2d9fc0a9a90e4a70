package raftnode

import (
	"log/slog"
	"testing"

	"github.com/hashicorp/raft"
)

// The gate's books: the bytes between two indexes are those of the
// entries stored in between, whatever was applied and forgotten before,
// and a tail that is stored again (a follower's conflicting entries,
// replaced by the leader's) counts once, with its new sizes.
func TestApplyGateCountsWhatWasStored(t *testing.T) {
	g := newApplyGate(1<<20, slog.New(slog.DiscardHandler))
	entries := func(first, last uint64, size int) []*raft.Log {
		var logs []*raft.Log
		for i := first; i <= last; i++ {
			logs = append(logs, &raft.Log{Index: i, Data: make([]byte, size)})
		}
		return logs
	}
	const e100, e300 = 100 + entryOverhead, 300 + entryOverhead
	g.record(entries(1, 5, 100)) // no Raft yet: nothing waits
	for _, c := range []struct {
		applied, handed, want uint64
	}{{0, 5, 5 * e100}, {2, 4, 2 * e100}, {4, 4, 0}, {5, 2, 0}, {3, 9, 2 * e100}} {
		if got := g.heldLocked(c.applied, c.handed); got != c.want {
			t.Errorf("held after %d up to %d: %d, want %d", c.applied, c.handed, got, c.want)
		}
	}
	g.record(entries(4, 6, 300)) // 4 and 5 replaced
	if got, want := g.heldLocked(0, 6), 3*e100+3*e300; got != uint64(want) {
		t.Errorf("held after a replaced tail: %d, want %d", got, want)
	}
	g.forget(3)
	if len(g.stored) != 3 || g.stored[0].index != 4 {
		t.Fatalf("after forgetting up to 3 the gate keeps %v", g.stored)
	}
	if got, want := g.heldLocked(3, 6), 3*e300; got != uint64(want) {
		t.Errorf("held after forgetting: %d, want %d", got, want)
	}
	if got, want := g.heldLocked(0, 6), 3*e300; got != uint64(want) {
		t.Errorf("what was forgotten counts as applied: %d, want %d", got, want)
	}
	g.truncate(6)
	g.record(entries(6, 7, 100))
	if got, want := g.heldLocked(3, 7), 2*e300+2*e100; got != uint64(want) {
		t.Errorf("held after a truncated tail: %d, want %d", got, want)
	}
	g.forget(10)
	if len(g.stored) != 0 || g.heldLocked(10, 12) != 0 {
		t.Fatalf("after forgetting everything the gate keeps %v", g.stored)
	}
	g.stop()
}
