package raftnode

import (
	"context"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/raft"

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
	limit uint64
	log   interface {
		Warn(msg string, args ...any)
	}
	ctx    context.Context
	cancel context.CancelFunc

	mu sync.Mutex
	// raft and fsm are set once Raft runs; until then nothing waits.
	raft *raft.Raft
	fsm  interface {
		AppliedIndex() uint64
		WaitApplied(ctx context.Context, index uint64) error
	}
	// The entries stored and not yet known applied, in index order, with
	// the bytes stored up to and including each; base is the bytes up to
	// the first.
	idx, cum []uint64
	base     uint64
	waiting  bool          // StoreLogs waits now
	waited   time.Duration // time spent in waits that ended
	since    time.Time     // when the current wait began
	warned   time.Time     // when a wait that timed out was last logged
}

func newApplyGate(limit uint64, log interface{ Warn(string, ...any) }) *applyGate {
	g := &applyGate{limit: limit, log: log}
	g.ctx, g.cancel = context.WithCancel(context.Background())
	return g
}

// start makes the gate wait on r and f from here on.
func (g *applyGate) start(r *raft.Raft, f interface {
	AppliedIndex() uint64
	WaitApplied(ctx context.Context, index uint64) error
}) {
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

// bytesUpTo is the bytes stored up to index i (g.mu held).
func (g *applyGate) bytesUpTo(i uint64) uint64 {
	k, found := slices.BinarySearch(g.idx, i)
	if found {
		return g.cum[k]
	}
	if k == 0 {
		return g.base
	}
	return g.cum[k-1]
}

// forget drops what the FSM applied (g.mu held).
func (g *applyGate) forget(applied uint64) {
	k, found := slices.BinarySearch(g.idx, applied)
	if found {
		k++
	}
	if k == 0 {
		return
	}
	g.base = g.cum[k-1]
	g.idx, g.cum = append(g.idx[:0], g.idx[k:]...), append(g.cum[:0], g.cum[k:]...)
}

// stored records the sizes of logs, once stored.
func (g *applyGate) stored(logs []*raft.Log) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if n := len(g.idx); n > 0 && g.idx[n-1] >= logs[0].Index {
		g.truncate(logs[0].Index) // the log's tail is being replaced
	}
	total := g.base
	if n := len(g.cum); n > 0 {
		total = g.cum[n-1]
	}
	for _, l := range logs {
		total += uint64(len(l.Data)+len(l.Extensions)) + entryOverhead
		g.idx, g.cum = append(g.idx, l.Index), append(g.cum, total)
	}
}

// truncate drops the entries from index min on (g.mu held).
func (g *applyGate) truncate(min uint64) {
	k, _ := slices.BinarySearch(g.idx, min)
	g.idx, g.cum = g.idx[:k], g.cum[:k]
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
		k, _ := slices.BinarySearch(g.cum, top-g.limit)
		target := handed
		if k < len(g.idx) {
			target = min(g.idx[k], handed)
		}
		if !g.waiting {
			g.waiting, g.since = true, time.Now()
		}
		left := applyGateMaxWait - time.Since(g.since)
		if left <= 0 {
			if time.Since(g.warned) < time.Minute {
				return
			}
			g.warned = time.Now()
			g.log.Warn("the state machine is far behind the Raft log; storing entries without waiting for it any longer",
				"held_bytes", held, "limit_bytes", g.limit, "applied_index", applied, "handed_index", handed)
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
	g.gate.stored(logs)
	return nil
}

// DeleteRange deletes entries [minIdx, maxIdx] (raft.LogStore).
func (g gatedLogs) DeleteRange(minIdx, maxIdx uint64) error {
	if err := g.Store.DeleteRange(minIdx, maxIdx); err != nil {
		return err
	}
	g.gate.mu.Lock()
	if n := len(g.gate.idx); n > 0 && g.gate.idx[n-1] <= maxIdx && minIdx <= g.gate.idx[n-1] {
		g.gate.truncate(minIdx) // a conflicting tail
	}
	g.gate.mu.Unlock()
	return nil
}
