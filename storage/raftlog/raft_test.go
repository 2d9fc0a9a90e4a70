package raftlog

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
)

const (
	raftNodeID   = raft.ServerID("node1")
	raftNodeAddr = raft.ServerAddress("node1")
	raftWait     = 20 * time.Second // generous: -race on 2 cores, fsync per entry
)

// listFSM records the data of every command it applies.
type listFSM struct {
	mu      sync.Mutex
	cmds    []string
	changed chan struct{} // closed and replaced whenever cmds changes
}

func newListFSM() *listFSM { return &listFSM{changed: make(chan struct{})} }

func (f *listFSM) Apply(l *raft.Log) any {
	f.mu.Lock()
	defer f.mu.Unlock()
	if l.Type == raft.LogCommand {
		f.cmds = append(f.cmds, string(l.Data))
		close(f.changed)
		f.changed = make(chan struct{})
	}
	return l.Index
}

func (f *listFSM) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return listSnapshot(slices.Clone(f.cmds)), nil
}

func (f *listFSM) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	var cmds []string
	if err := json.NewDecoder(rc).Decode(&cmds); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cmds = cmds
	close(f.changed)
	f.changed = make(chan struct{})
	return nil
}

func (f *listFSM) list() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.cmds)
}

// waitLen waits until the FSM holds at least n commands.
func (f *listFSM) waitLen(t *testing.T, n int) {
	t.Helper()
	deadline := time.NewTimer(raftWait)
	defer deadline.Stop()
	for {
		f.mu.Lock()
		have, ch := len(f.cmds), f.changed
		f.mu.Unlock()
		if have >= n {
			return
		}
		select {
		case <-ch:
		case <-deadline.C:
			t.Fatalf("FSM has %d commands after %v, want %d", have, raftWait, n)
		}
	}
}

type listSnapshot []string

func (s listSnapshot) Persist(sink raft.SnapshotSink) error {
	if err := json.NewEncoder(sink).Encode([]string(s)); err != nil {
		_ = sink.Cancel()
		return err
	}
	return sink.Close()
}

func (listSnapshot) Release() {}

// raftNode is one single-voter raft.Raft over a Store.
type raftNode struct {
	r     *raft.Raft
	trans *raft.InmemTransport
	fsm   *listFSM
}

func fastRaftConfig() *raft.Config {
	c := raft.DefaultConfig()
	c.LocalID = raftNodeID
	c.HeartbeatTimeout = 50 * time.Millisecond
	c.ElectionTimeout = 50 * time.Millisecond
	c.LeaderLeaseTimeout = 50 * time.Millisecond
	c.CommitTimeout = 5 * time.Millisecond
	c.SnapshotThreshold = 1 << 30 // snapshots only when the test asks
	c.SnapshotInterval = time.Hour
	c.Logger = hclog.NewNullLogger()
	return c
}

func startRaft(t *testing.T, conf *raft.Config, s *Store, snaps raft.SnapshotStore) *raftNode {
	t.Helper()
	_, trans := raft.NewInmemTransport(raftNodeAddr)
	fsm := newListFSM()
	r, err := raft.NewRaft(conf, fsm, s, s, snaps, trans)
	if err != nil {
		trans.Close()
		t.Fatalf("NewRaft: %v", err)
	}
	return &raftNode{r: r, trans: trans, fsm: fsm}
}

func (n *raftNode) stop(t *testing.T) {
	t.Helper()
	if err := n.r.Shutdown().Error(); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := n.trans.Close(); err != nil {
		t.Fatalf("close transport: %v", err)
	}
}

func (n *raftNode) waitLeader(t *testing.T) {
	t.Helper()
	deadline := time.NewTimer(raftWait)
	defer deadline.Stop()
	for n.r.State() != raft.Leader {
		select {
		case <-n.r.LeaderCh():
		case <-deadline.C:
			t.Fatalf("no leadership after %v (state %v)", raftWait, n.r.State())
		}
	}
}

// apply applies cmds, pipelined, and returns the index of the last one.
func (n *raftNode) apply(t *testing.T, cmds ...string) uint64 {
	t.Helper()
	futures := make([]raft.ApplyFuture, len(cmds))
	for i, c := range cmds {
		futures[i] = n.r.Apply([]byte(c), raftWait)
	}
	var last uint64
	for i, f := range futures {
		if err := f.Error(); err != nil {
			t.Fatalf("Apply(%q): %v", cmds[i], err)
		}
		last = f.Index()
	}
	return last
}

func (n *raftNode) barrier(t *testing.T) {
	t.Helper()
	if err := n.r.Barrier(raftWait).Error(); err != nil {
		t.Fatalf("Barrier: %v", err)
	}
}

func cmdRange(prefix string, from, to int) []string {
	var out []string
	for i := from; i <= to; i++ {
		out = append(out, fmt.Sprintf("%s-%d", prefix, i))
	}
	return out
}

func lastTerm(t *testing.T, s *Store) (uint64, uint64) {
	t.Helper()
	last, err := s.LastIndex()
	if err != nil {
		t.Fatal(err)
	}
	var l raft.Log
	if err := s.GetLog(last, &l); err != nil {
		t.Fatalf("GetLog(last=%d): %v", last, err)
	}
	return last, l.Term
}

func bootstrap(t *testing.T, n *raftNode) {
	t.Helper()
	cfg := raft.Configuration{Servers: []raft.Server{{ID: raftNodeID, Address: raftNodeAddr}}}
	if err := n.r.BootstrapCluster(cfg).Error(); err != nil {
		t.Fatalf("BootstrapCluster: %v", err)
	}
}

// TestRaftRestart runs a real single-node raft.Raft on the store, restarts
// it over a reopened store and checks it resumes at the same index and
// term and rebuilds the same FSM state.
func TestRaftRestart(t *testing.T) {
	dir, snapDir := t.TempDir(), t.TempDir()
	snaps, err := raft.NewFileSnapshotStoreWithLogger(snapDir, 2, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}

	s, err := Open(Config{Dir: dir, Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	n := startRaft(t, fastRaftConfig(), s, snaps)
	bootstrap(t, n)
	n.waitLeader(t)
	want := cmdRange("cmd", 1, 50)
	n.apply(t, want...)
	wantLast, wantTerm := n.r.LastIndex(), uint64(0)
	n.stop(t)
	if got, term := lastTerm(t, s); got != wantLast {
		t.Fatalf("store last index %d, raft reported %d", got, wantLast)
	} else {
		wantTerm = term
	}
	if cur, err := s.GetUint64([]byte("CurrentTerm")); err != nil || cur != wantTerm {
		t.Fatalf("CurrentTerm = %d, %v; want %d", cur, err, wantTerm)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = openStore(t, dir)
	if got, term := lastTerm(t, s); got != wantLast || term != wantTerm {
		t.Fatalf("after reopen last = %d/%d, want %d/%d", got, term, wantLast, wantTerm)
	}
	if has, err := raft.HasExistingState(s, s, snaps); err != nil || !has {
		t.Fatalf("HasExistingState = %v, %v; want true", has, err)
	}
	n = startRaft(t, fastRaftConfig(), s, snaps)
	if got := n.r.LastIndex(); got != wantLast {
		t.Fatalf("restarted raft LastIndex = %d, want %d", got, wantLast)
	}
	if got := n.r.Stats()["last_log_term"]; got != fmt.Sprint(wantTerm) {
		t.Fatalf("restarted raft last_log_term = %s, want %d", got, wantTerm)
	}
	// A second bootstrap is refused: the store reports existing state.
	if err := n.r.BootstrapCluster(raft.Configuration{Servers: []raft.Server{{ID: raftNodeID, Address: raftNodeAddr}}}).Error(); err != raft.ErrCantBootstrap {
		t.Fatalf("second BootstrapCluster: %v, want ErrCantBootstrap", err)
	}
	n.waitLeader(t)
	n.barrier(t)
	if got := n.fsm.list(); !slices.Equal(got, want) {
		t.Fatalf("FSM after restart replayed %d commands, want %d", len(got), len(want))
	}
	n.apply(t, "after-restart")
	n.stop(t)
	if _, term := lastTerm(t, s); term <= wantTerm {
		t.Fatalf("term after re-election = %d, want > %d", term, wantTerm)
	}
}

// TestRaftSnapshotsTruncateLog checks raft's compaction (prefix delete)
// after a snapshot, restart from snapshot plus log, and a user snapshot
// restore, after which raft deletes the whole log because the store is
// monotonic.
func TestRaftSnapshotsTruncateLog(t *testing.T) {
	dir, snapDir := t.TempDir(), t.TempDir()
	snaps, err := raft.NewFileSnapshotStoreWithLogger(snapDir, 2, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	s := openStore(t, dir)
	conf := fastRaftConfig()
	conf.TrailingLogs = 5

	n := startRaft(t, conf, s, snaps)
	bootstrap(t, n)
	n.waitLeader(t)
	want := cmdRange("a", 1, 30)
	last := n.apply(t, want...)
	if err := n.r.Snapshot().Error(); err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	requireBounds(t, s, last-conf.TrailingLogs+1, last)
	n.stop(t)

	n = startRaft(t, conf, s, snaps)
	n.waitLeader(t)
	n.barrier(t)
	if got := n.fsm.list(); !slices.Equal(got, want) {
		t.Fatalf("FSM after restart from snapshot = %d commands, want %d", len(got), len(want))
	}

	// Restore a user snapshot holding different state.
	var buf bytes.Buffer
	restored := []string{"restored-1", "restored-2"}
	if err := json.NewEncoder(&buf).Encode(restored); err != nil {
		t.Fatal(err)
	}
	lastBefore, _ := s.LastIndex()
	meta := &raft.SnapshotMeta{Version: raft.SnapshotVersionMax, Index: 1, Term: 1, Size: int64(buf.Len())}
	if err := n.r.Restore(meta, &buf, raftWait); err != nil {
		t.Fatalf("Restore: %v", err)
	}
	first, _ := s.FirstIndex()
	if first <= lastBefore {
		t.Fatalf("after Restore FirstIndex = %d; raft should have removed all logs up to %d", first, lastBefore)
	}
	n.apply(t, "b-1", "b-2")
	n.stop(t)

	n = startRaft(t, conf, s, snaps)
	n.waitLeader(t)
	n.barrier(t)
	if got, want := n.fsm.list(), append(restored, "b-1", "b-2"); !slices.Equal(got, want) {
		t.Fatalf("FSM after restore and restart = %q, want %q", got, want)
	}
	n.stop(t)
}
