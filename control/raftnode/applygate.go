package raftnode

import (
	"cmp"
	"context"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	"golang.org/x/time/rate"

	"github.com/edge-relay/relay/storage/raftlog"
)

// DefaultMaxUnappliedBytes is Tuning.MaxUnappliedBytes's default.
const DefaultMaxUnappliedBytes = 256 << 20

// applyGateMaxWait bounds one wait of the gate, under the Raft RPC
// timeout: the leader's AppendEntries to a waiting follower must not
// time out (the leader would send the batch again, and the follower hold
// it twice), and a follower that waits answers no vote meanwhile. A
// state machine that does not catch up in that long lets one more
// append in, then the gate waits again.
const applyGateMaxWait = raftNetTimeout / 2

// entryOverhead is what a log entry handed to the FSM holds beyond its
// data: the raft.Log and the batch's slot for it.
const entryOverhead = 128

// applyGate bounds the bytes of committed entries hashicorp/raft has
// handed to the FSM and the FSM has not applied yet. Raft queues up to
// 128 batches of MaxAppendEntries entries for the FSM, each read back
// from the log store on a follower: an FSM slower than the log (a slow
// state disk, a follower catching up on large mailbox writes) would hold
// thousands of entries of up to a megabyte each. The gate sits in front
// of the log store: StoreLogs, which Raft calls from its main loop on
// leader and follower alike, waits while more than limit bytes were
// handed over and are not applied, so a slow FSM makes its node fall
// behind rather than fill its memory.
//
// Only a follower waits. A leader's queue holds its proposals' own
// entries (held by their futures, not read back from the log), and a
// leader that waited would stop committing, and checking its lease,
// leadership transfers and read indexes with it.
//
// It cannot deadlock: what it waits for is already in the FSM's queue,
// which the FSM drains without Raft's main loop. Raft counts an entry as
// applied (AppliedIndex) once it is queued, so the bytes between that
// index and the FSM's applied index are what the queue holds (and the
// batch being applied). Heartbeats take Raft's fast path meanwhile; a
// follower whose store waits longer than the leader's RPC timeout gets
// the entries again (harmless: the same index and term). Entries that
// were in the log when the process started are not counted: the gate
// knows the sizes of what it stored.
type applyGate struct {
	limit  uint64
	log    *slog.Logger
	ctx    context.Context
	cancel context.CancelFunc
	// warnSome spaces the warnings of waits that reached their cap.
	warnSome rate.Sometimes

	mu sync.Mutex
	// raft and fsm are set once Raft runs; until then nothing waits.
	raft *raft.Raft
	fsm  appliedWaiter
	// The entries stored and not yet known applied, in index order;
	// base is the bytes stored up to the first.
	stored []storedEntry
	base   uint64
	// Waits: whether StoreLogs waits now and since when, and the time
	// spent in waits that ended.
	waiting bool
	since   time.Time
	waited  time.Duration
}

// appliedWaiter is what the gate needs of the FSM (*fsm.FSM).
type appliedWaiter interface {
	AppliedIndex() uint64
	WaitApplied(ctx context.Context, index uint64) error
}

// storedEntry is an entry the gate counts: its index, and the bytes
// stored up to and including it.
type storedEntry struct{ index, upTo uint64 }

func newApplyGate(limit uint64, log *slog.Logger) *applyGate {
	g := &applyGate{limit: limit, log: log, warnSome: rate.Sometimes{Interval: time.Minute}}
	g.ctx, g.cancel = context.WithCancel(context.Background())
	return g
}

// start makes the gate wait on r and f from here on.
func (g *applyGate) start(r *raft.Raft, f appliedWaiter) {
	g.mu.Lock()
	g.raft, g.fsm = r, f
	g.mu.Unlock()
}

// stop ends any wait at once; the gate waits no more.
func (g *applyGate) stop() { g.cancel() }

// stats returns the bytes the FSM's queue holds (handed over, not
// applied), whether StoreLogs waits now, and how long it waited in all.
func (g *applyGate) stats() (held uint64, waiting bool, waited time.Duration) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.raft != nil {
		held = g.heldLocked(g.fsm.AppliedIndex(), g.raft.AppliedIndex())
	}
	waited = g.waited
	if g.waiting {
		waited += time.Since(g.since)
	}
	return held, g.waiting, waited
}

// heldLocked is the bytes of the entries after applied up to handed
// (g.mu held).
func (g *applyGate) heldLocked(applied, handed uint64) uint64 {
	if handed <= applied {
		return 0
	}
	return g.bytesUpTo(handed) - g.bytesUpTo(applied)
}

// find is the position of the first entry at or after index i (g.mu
// held), and whether it is i's.
func (g *applyGate) find(i uint64) (int, bool) {
	return slices.BinarySearchFunc(g.stored, i, func(e storedEntry, i uint64) int { return cmp.Compare(e.index, i) })
}

// bytesUpTo is the bytes stored up to index i (g.mu held).
func (g *applyGate) bytesUpTo(i uint64) uint64 {
	k, found := g.find(i)
	if found {
		k++
	}
	if k == 0 {
		return g.base
	}
	return g.stored[k-1].upTo
}

// forget drops what the FSM applied (g.mu held).
func (g *applyGate) forget(applied uint64) {
	g.base = g.bytesUpTo(applied)
	k, found := g.find(applied)
	if found {
		k++
	}
	g.stored = slices.Delete(g.stored, 0, k)
}

// record counts logs, once stored, and forgets what the FSM applied: on
// a leader, which never waits, this is where the books are kept short.
func (g *applyGate) record(logs []*raft.Log) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.fsm != nil {
		g.forget(g.fsm.AppliedIndex())
	}
	g.truncate(logs[0].Index) // a replaced tail, if any
	total := g.bytesUpTo(logs[0].Index)
	for _, l := range logs {
		total += uint64(len(l.Data)+len(l.Extensions)) + entryOverhead
		g.stored = append(g.stored, storedEntry{l.Index, total})
	}
}

// truncate drops the entries from index min on (g.mu held).
func (g *applyGate) truncate(min uint64) {
	k, _ := g.find(min)
	g.stored = g.stored[:k]
}

// wait blocks while the FSM's queue holds more than the limit, at most
// applyGateMaxWait.
func (g *applyGate) wait() {
	g.mu.Lock()
	defer g.mu.Unlock()
	defer func() {
		if g.waiting {
			g.waiting = false
			g.waited += time.Since(g.since)
		}
	}()
	for g.raft != nil && g.raft.State() != raft.Leader {
		applied, handed := g.fsm.AppliedIndex(), g.raft.AppliedIndex()
		g.forget(applied)
		held := g.heldLocked(applied, handed)
		if held <= g.limit {
			return
		}
		// The first entry whose application brings the queue under the
		// limit (held > limit, so top > limit).
		top := g.bytesUpTo(handed)
		k, _ := slices.BinarySearchFunc(g.stored, top-g.limit, func(e storedEntry, b uint64) int { return cmp.Compare(e.upTo, b) })
		target := handed
		if k < len(g.stored) {
			target = min(g.stored[k].index, handed)
		}
		if !g.waiting {
			g.waiting, g.since = true, time.Now()
		}
		left := applyGateMaxWait - time.Since(g.since)
		if left <= 0 {
			g.warnSome.Do(func() {
				g.log.Warn("the state machine is far behind the Raft log; storing entries without waiting for it any longer",
					"held_bytes", held, "limit_bytes", g.limit, "applied_index", applied, "handed_index", handed)
			})
			return
		}
		g.mu.Unlock()
		ctx, cancel := context.WithTimeout(g.ctx, left)
		err := g.fsm.WaitApplied(ctx, target)
		cancel()
		g.mu.Lock()
		if err != nil && g.ctx.Err() != nil {
			return // the node stops
		}
	}
}

// gatedLogs is the node's log store behind its apply gate.
type gatedLogs struct {
	*raftlog.Store
	gate *applyGate
}

// StoreLog stores one entry (raft.LogStore).
func (g gatedLogs) StoreLog(l *raft.Log) error { return g.StoreLogs([]*raft.Log{l}) }

// StoreLogs waits for the gate, then stores logs (raft.LogStore).
func (g gatedLogs) StoreLogs(logs []*raft.Log) error {
	if len(logs) == 0 {
		return nil
	}
	g.gate.wait()
	if err := g.Store.StoreLogs(logs); err != nil {
		return err
	}
	g.gate.record(logs)
	return nil
}

// DeleteRange deletes entries [minIdx, maxIdx] (raft.LogStore).
func (g gatedLogs) DeleteRange(minIdx, maxIdx uint64) error {
	if err := g.Store.DeleteRange(minIdx, maxIdx); err != nil {
		return err
	}
	g.gate.mu.Lock()
	if n := len(g.gate.stored); n > 0 && minIdx <= g.gate.stored[n-1].index && g.gate.stored[n-1].index <= maxIdx {
		g.gate.truncate(minIdx) // a conflicting tail
	}
	g.gate.mu.Unlock()
	return nil
}
