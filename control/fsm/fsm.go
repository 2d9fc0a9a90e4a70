// Package fsm is the control plane's replicated state machine: it applies
// the typed commands of the Raft log (proto state.v1) to the Pebble state
// store, deterministically, keeps the revisioned change feed that edges
// watch, and takes and restores snapshots.
//
// See DESIGN.md in this directory for the invariants.
package fsm

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	statev1 "github.com/edge-relay/relay/proto/state/v1"
	"github.com/edge-relay/relay/storage/state"
)

// Config configures an FSM.
type Config struct {
	// Store is the state store the FSM owns. Required.
	Store *state.Store
	// Logger for apply failures and snapshots. Default: slog.Default().
	Logger *slog.Logger
	// ChangeRetention is how many revisions of the change feed are kept
	// behind the newest one. Default 100000.
	ChangeRetention uint64
	// RequestRetention is how many revisions a request id is remembered
	// for deduplication. Default 100000.
	RequestRetention uint64
	// PruneEvery is the revision interval at which old changes and request
	// ids are pruned (at revisions divisible by it, so every replica prunes
	// the same entries). Default 1024.
	//
	// ChangeRetention, RequestRetention and PruneEvery decide what apply
	// writes, so they are part of the replicated state machine: every
	// member must use the same values. Nodes take the defaults (only
	// tests set them), and a release that changes a default changes
	// apply and must gate it like any such change (see Features), or a
	// rolling upgrade's members would forget different request ids.
	PruneEvery uint64
	// OnApply, if set, observes every applied batch of entries.
	OnApply func(took time.Duration, entries int)
	// OnSnapshot, if set, observes every persisted snapshot.
	OnSnapshot func(took time.Duration, records uint64, err error)
	// OnFeatureIgnored, if set, observes each feature whose fields a
	// command carried and apply ignored (gated apply: a node record did
	// not list it).
	OnFeatureIgnored func(feature string)
	// OnRestore, if set, observes every restore from a snapshot (one
	// installed from the leader, or the local one a node behind it starts
	// from).
	OnRestore func(took time.Duration, err error)
}

func (c *Config) applyDefaults() error {
	if c.Store == nil {
		return errors.New("fsm: Config.Store is required")
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.ChangeRetention == 0 {
		c.ChangeRetention = 100_000
	}
	if c.RequestRetention == 0 {
		c.RequestRetention = 100_000
	}
	if c.PruneEvery == 0 {
		c.PruneEvery = 1024
	}
	return nil
}

// FSM implements raft.BatchingFSM over the state store.
type FSM struct {
	cfg   Config
	store *state.Store
	log   *slog.Logger

	mu        sync.Mutex    // guards the fields below
	applied   uint64        // index of the last entry applied (durable with the state)
	term      uint64        // term of that entry
	appliedCh chan struct{} // closed and replaced whenever applied advances
	members   uint64        // counts batches that changed node records or the configuration
	// gates as the last batch left them, while members has not moved
	// since (a restore moves it): the next batch starts from them
	// instead of reading the node records again.
	gateCache   gates
	gateVersion uint64
}

var _ raft.BatchingFSM = (*FSM)(nil)

// New returns an FSM over cfg.Store, resuming from the applied index the
// store holds.
func New(cfg Config) (*FSM, error) {
	if err := cfg.applyDefaults(); err != nil {
		return nil, err
	}
	f := &FSM{cfg: cfg, store: cfg.Store, log: cfg.Logger, appliedCh: make(chan struct{})}
	idx, term, err := ReadApplied(cfg.Store)
	if err != nil {
		return nil, err
	}
	f.applied, f.term = idx, term
	return f, nil
}

// ReadApplied returns the applied index and term recorded in a state
// store (zero for an empty one).
func ReadApplied(r state.Reader) (index, term uint64, err error) {
	v, err := r.Get(keyApplied)
	if errors.Is(err, state.ErrNotFound) {
		return 0, 0, nil
	}
	if err != nil {
		return 0, 0, fmt.Errorf("read applied index: %w", err)
	}
	if len(v) != 16 {
		return 0, 0, fmt.Errorf("read applied index: %d bytes, want 16", len(v))
	}
	return binary.BigEndian.Uint64(v), binary.BigEndian.Uint64(v[8:]), nil
}

// StateFormat is the format of the state this release reads and writes:
// what its records mean. A release that changes the meaning of records
// it stores raises it, writes it into the state (key m:format, through a
// command used only once every member has the feature), and so makes
// older releases refuse that state's snapshots and backups rather than
// misread them. A state without the record is of format 1.
const StateFormat = 1

// ErrNewerFormat: a snapshot or backup holds a state of a format this
// release does not know (written by a newer one). Restore it with a
// release at least as new.
var ErrNewerFormat = errors.New("state written by a newer release")

// CheckRecord checks a record of a snapshot or backup before it is
// imported (state.Store.ImportChecked): the records the node reads as
// soon as the state is in place must be well formed, or the import would
// leave a state it cannot start from (a snapshot that fails after it was
// ingested stays in the snapshot store and fails again at every start);
// and the state's format must be one this release knows.
func CheckRecord(key, value []byte) error {
	switch {
	case bytes.Equal(key, keyFormat) && len(value) != 8:
		return fmt.Errorf("%w: state format record of %d bytes, want 8", state.ErrCorrupt, len(value))
	case bytes.Equal(key, keyFormat) && binary.BigEndian.Uint64(value) > StateFormat:
		return fmt.Errorf("%w: format %d, this release reads up to %d", ErrNewerFormat, binary.BigEndian.Uint64(value), StateFormat)
	case bytes.Equal(key, keyApplied) && len(value) != 16:
		return fmt.Errorf("%w: applied index record of %d bytes, want 16", state.ErrCorrupt, len(value))
	case bytes.Equal(key, keyHistory) && len(value) > MaxHistoryLen:
		return fmt.Errorf("%w: history id of %d bytes, at most %d", state.ErrCorrupt, len(value), MaxHistoryLen)
	// Records apply and the change feed read by their layout, on every
	// replica alike: a malformed one would fail (or panic) each of them
	// at the same entry, again at every replay.
	case bytes.Equal(key, keyHorizon) && len(value) != 8:
		return fmt.Errorf("%w: change feed horizon record of %d bytes, want 8", state.ErrCorrupt, len(value))
	case bytes.HasPrefix(key, prefixMailDedup) && len(value) != 8:
		return fmt.Errorf("%w: mailbox dedup record %q of %d bytes, want 8", state.ErrCorrupt, key, len(value))
	case bytes.HasPrefix(key, prefixMailExpiry) && !validKey(parseMailExpiryKey(key)):
		return fmt.Errorf("%w: malformed mailbox expiry key %q", state.ErrCorrupt, key)
	case bytes.HasPrefix(key, prefixClaimExpiry) && !validClaimExpiryKey(key):
		return fmt.Errorf("%w: malformed claim expiry key %q", state.ErrCorrupt, key)
	case bytes.HasPrefix(key, prefixEventIndex) && !validEventIndexKey(key):
		return fmt.Errorf("%w: malformed event index key %q", state.ErrCorrupt, key)
	}
	return nil
}

// validKey takes a key parser's results and reports whether it parsed.
func validKey(_ string, _ uint64, ok bool) bool { return ok }

func validClaimExpiryKey(k []byte) bool {
	_, ok := parseClaimExpiryKey(k)
	return ok
}

// validEventIndexKey reports whether k is an event index record's key:
// the event (sender, 0, the id's length, the id), then a device id, 0
// and a seq.
func validEventIndexKey(k []byte) bool {
	rest := k[len(prefixEventIndex):]
	i := bytes.IndexByte(rest, 0)
	if i < 0 || i+1 >= len(rest) {
		return false
	}
	n := int(rest[i+1])
	if i+2+n > len(rest) {
		return false
	}
	_, _, ok := parseEventIndexKey(k, k[:len(prefixEventIndex)+i+2+n])
	return ok
}

// MaxHistoryLen bounds a history id (the ones drawn are 32 bytes).
const MaxHistoryLen = 64

// ReadHistory returns the id of the history the state belongs to: the
// one its InitCluster drew ("" for a cluster initialized before ids were
// drawn), or a fresh random id once it was restored from a backup (see
// SetHistory). Revisions of two histories do not compare: after a
// restore they go on from the backup's, a cluster rebuilt from nothing
// starts again from 1, and a watcher that followed the cluster before
// must start from a full copy.
func ReadHistory(r state.Reader) (string, error) {
	v, err := r.Get(keyHistory)
	if errors.Is(err, state.ErrNotFound) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read history: %w", err)
	}
	return string(v), nil
}

// NewHistoryID draws a history id: for InitCluster, and for SetHistory
// on a restore.
func NewHistoryID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// SetHistory gives the state in s a new history id, outside the Raft
// log: only for a node restoring a backup, before it starts Raft (the
// snapshot it bootstraps from is exported from s afterwards, so every
// member gets the id).
func SetHistory(s *state.Store, id string) error {
	if id == "" || len(id) > MaxHistoryLen {
		return fmt.Errorf("set history: id of %d bytes, want 1 to %d", len(id), MaxHistoryLen)
	}
	b := s.NewBatch()
	if err := b.Set(keyHistory, []byte(id)); err != nil {
		b.Discard()
		return err
	}
	if err := b.Commit(); err != nil {
		return fmt.Errorf("set history: %w", err)
	}
	return s.Sync()
}

// ClearHistory removes a history id that s holds without any applied
// entry: one a bootstrap drew before it failed to start Raft. A node
// that then joins a cluster must not speak for it.
func ClearHistory(s *state.Store) error {
	if index, _, err := ReadApplied(s); err != nil {
		return fmt.Errorf("clear history: %w", err)
	} else if index != 0 {
		return fmt.Errorf("clear history: the state has applied index %d", index)
	}
	b := s.NewBatch()
	if err := b.Delete(keyHistory); err != nil {
		b.Discard()
		return err
	}
	if err := b.Commit(); err != nil {
		return fmt.Errorf("clear history: %w", err)
	}
	return s.Sync()
}

// History returns the id of the current state's history (see ReadHistory).
func (f *FSM) History() (string, error) { return ReadHistory(f.store) }

// AppliedIndex returns the index of the last log entry the FSM applied.
// Raft's own no-op entries (written at each election) are never shown to
// the FSM, so this can trail raft.AppliedIndex by those.
func (f *FSM) AppliedIndex() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.applied
}

// WaitApplied blocks until the FSM has applied index or ctx ends.
func (f *FSM) WaitApplied(ctx context.Context, index uint64) error {
	for {
		f.mu.Lock()
		applied, ch := f.applied, f.appliedCh
		f.mu.Unlock()
		if applied >= index {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("wait for index %d (applied %d): %w", index, applied, ctx.Err())
		}
	}
}

// MembersVersion counts the applied batches that changed a node record,
// the Raft configuration or the gated apply switch, and restores: what
// decides the features in use changed since a caller last read it when
// it reads another value.
func (f *FSM) MembersVersion() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.members
}

// Changed returns a channel that is closed the next time the applied index
// advances. Watchers read the change feed, then wait on it.
func (f *FSM) Changed() <-chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.appliedCh
}

// setApplied records the applied index and term. members says that what
// decides the gates changed (MembersVersion); g, if not nil, is the gates
// the batch left, which the next batch starts from.
func (f *FSM) setApplied(index, term uint64, members bool, g *gates) {
	f.mu.Lock()
	f.applied, f.term = index, term
	if members {
		f.members++
	}
	if g != nil {
		f.gateCache, f.gateVersion = *g, f.members // (invalid if an entry wrote a record last)
		f.gateCache.touched = false
	}
	close(f.appliedCh)
	f.appliedCh = make(chan struct{})
	f.mu.Unlock()
}

// Apply applies one committed entry. It returns a *statev1.Result for a
// command entry (nil for entries that carry none).
func (f *FSM) Apply(l *raft.Log) any {
	return f.ApplyBatch([]*raft.Log{l})[0]
}

// ApplyBatch applies committed entries in one atomic store batch together
// with the new applied index, so a crash never applies an entry twice or
// loses one the FSM reported applied.
func (f *FSM) ApplyBatch(logs []*raft.Log) []any {
	out := make([]any, len(logs))
	var g gates
	f.mu.Lock()
	applied := f.applied
	if f.gateVersion == f.members {
		g = f.gateCache
	}
	f.mu.Unlock()

	start := time.Now()
	b := f.store.NewBatch()
	var last *raft.Log
	for i, l := range logs {
		if l.Index <= applied {
			// Already applied before a restart: the store has its effect.
			continue
		}
		out[i] = f.applyEntry(b, &g, l)
		last = l
	}
	if last == nil {
		b.Discard()
		return out
	}
	var v [16]byte
	binary.BigEndian.PutUint64(v[:], last.Index)
	binary.BigEndian.PutUint64(v[8:], last.Term)
	if err := b.Set(keyApplied, v[:]); err != nil {
		f.fatal("record applied index", err)
	}
	if err := b.Commit(); err != nil {
		f.fatal("commit applied batch", err)
	}
	f.setApplied(last.Index, last.Term, g.touched, &g)
	if f.cfg.OnApply != nil {
		f.cfg.OnApply(time.Since(start), len(logs))
	}
	return out
}

// fatal stops the process: a replica that cannot write its state cannot
// stay deterministic, and restarting replays the log from the last durable
// applied index.
func (f *FSM) fatal(what string, err error) {
	f.log.Error("fsm: storage failure, stopping", "op", what, "err", err)
	panic(fmt.Sprintf("fsm: %s: %v", what, err))
}

func (f *FSM) applyEntry(b *state.Batch, g *gates, l *raft.Log) *statev1.Result {
	if l.Type != raft.LogCommand {
		// Configuration entries only advance the applied index (and
		// MembersVersion).
		g.touched = g.touched || l.Type == raft.LogConfiguration
		return nil
	}
	var cmd statev1.Command
	if err := proto.Unmarshal(l.Data, &cmd); err != nil {
		return &statev1.Result{
			Code:     statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT,
			Message:  "undecodable command: " + err.Error(),
			Revision: l.Index,
		}
	}
	tx := &txn{b: b, rev: l.Index, now: cmd.GetProposedAtMs(), gates: g}
	if id := cmd.GetRequestId(); id != "" {
		if prev, err := b.Get(requestKey(id)); err == nil {
			var r statev1.Result
			if err := proto.Unmarshal(prev, &r); err != nil {
				f.fatal("decode remembered result", err)
			}
			if !bytes.Equal(r.GetRequestDigest(), cmd.GetRequestDigest()) {
				// The same id for another request: a client's mistake,
				// answered without touching the first result.
				return &statev1.Result{Code: statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, Revision: l.Index,
					Message: fmt.Sprintf("request id %q was already used for a different request", id)}
			}
			return &r
		} else if !errors.Is(err, state.ErrNotFound) {
			f.fatal("read request id", err)
		}
	}
	ignored, err := g.ignoreShut(b, &cmd)
	if err != nil {
		f.fatal("read node records for gated apply", err)
	}
	if len(ignored) > 0 {
		f.log.Warn("applied a command without features some node record does not list, as a release without them would",
			"features", ignored, "revision", l.Index)
		if f.cfg.OnFeatureIgnored != nil {
			for _, ft := range ignored {
				f.cfg.OnFeatureIgnored(ft)
			}
		}
	}
	res, err := f.dispatch(tx, &cmd)
	if err != nil {
		var ae *applyError
		if !errors.As(err, &ae) {
			f.fatal("apply command", err)
		}
		res = &statev1.Result{Code: ae.code, Message: ae.msg}
	} else {
		res.Code = statev1.ResultCode_RESULT_CODE_OK
	}
	res.Revision = l.Index
	res.RequestDigest = cmd.GetRequestDigest()
	res.FeaturesIgnored = ignored
	if id := cmd.GetRequestId(); id != "" {
		if err := tx.put(requestKey(id), res); err != nil {
			f.fatal("remember request id", err)
		}
		if err := b.Set(requestRevKey(l.Index, id), nil); err != nil {
			f.fatal("index request id", err)
		}
	}
	if l.Index%f.cfg.PruneEvery == 0 {
		if err := f.prune(b, l.Index); err != nil {
			f.fatal("prune", err)
		}
		if err := tx.pruneTokens(); err != nil {
			f.fatal("prune refresh tokens", err)
		}
		if err := tx.pruneThrottle(); err != nil {
			f.fatal("prune login throttle records", err)
		}
	}
	return res
}

// prune drops change feed entries and remembered request ids that fell out
// of their retention windows. It runs at fixed revisions, so every replica
// drops exactly the same entries.
func (f *FSM) prune(b *state.Batch, rev uint64) error {
	if rev > f.cfg.ChangeRetention {
		horizon := rev - f.cfg.ChangeRetention
		if err := b.DeleteRange(prefixChange, changeKey(horizon, 0)); err != nil {
			return err
		}
		var v [8]byte
		binary.BigEndian.PutUint64(v[:], horizon)
		if err := b.Set(keyHorizon, v[:]); err != nil {
			return err
		}
	}
	if rev > f.cfg.RequestRetention {
		end := requestRevKey(rev-f.cfg.RequestRetention, "")
		ids, err := dueIDs(b, prefixRequestRev, end)
		if err != nil {
			return err
		}
		for _, id := range ids {
			if err := b.Delete(requestKey(id)); err != nil {
				return err
			}
		}
		if err := b.DeleteRange(prefixRequestRev, end); err != nil {
			return err
		}
	}
	return nil
}

// Snapshot captures a point-in-time view; the copying happens in Persist,
// concurrently with later applies.
func (f *FSM) Snapshot() (raft.FSMSnapshot, error) {
	// Applies commit without fsync. Raft may truncate its log once this
	// snapshot is persisted, so everything the snapshot covers must be
	// durable in the store first: one synced write flushes the WAL.
	if err := f.store.Sync(); err != nil {
		return nil, fmt.Errorf("fsm snapshot: %w", err)
	}
	return &snapshot{snap: f.store.Snapshot(), onDone: f.cfg.OnSnapshot}, nil
}

// Restore replaces the whole state with a snapshot's.
func (f *FSM) Restore(rc io.ReadCloser) (err error) {
	defer rc.Close()
	if f.cfg.OnRestore != nil {
		start := time.Now()
		defer func() { f.cfg.OnRestore(time.Since(start), err) }()
	}
	n, err := f.store.ImportChecked(rc, CheckRecord)
	if err != nil {
		return fmt.Errorf("fsm restore: %w", err)
	}
	idx, term, err := ReadApplied(f.store)
	if err != nil {
		// The records are the import's: what the FSM kept from the
		// state before must not outlive it (gateCache).
		f.mu.Lock()
		f.members++
		f.mu.Unlock()
		return fmt.Errorf("fsm restore: %w", err)
	}
	f.log.Info("fsm restored from snapshot", "records", n, "applied_index", idx)
	f.setApplied(idx, term, true, nil)
	return nil
}

// WriteBackup writes a consistent copy of the current state in the
// snapshot format to w and returns the applied index it reflects.
func (f *FSM) WriteBackup(w io.Writer) (uint64, error) {
	return f.WriteBackupContext(context.Background(), w)
}

// WriteBackupContext is WriteBackup that stops with ctx's error once ctx
// ends (state.ExportContext), having written part of the copy to w.
func (f *FSM) WriteBackupContext(ctx context.Context, w io.Writer) (uint64, error) {
	snap := f.store.Snapshot()
	defer snap.Close()
	idx, _, err := ReadApplied(snap)
	if err != nil {
		return 0, err
	}
	if _, err := state.ExportContext(ctx, w, snap); err != nil {
		return 0, fmt.Errorf("write backup: %w", err)
	}
	return idx, nil
}

type snapshot struct {
	snap   *state.Snapshot
	onDone func(time.Duration, uint64, error)
}

func (s *snapshot) Persist(sink raft.SnapshotSink) error {
	start := time.Now()
	n, err := state.Export(sink, s.snap)
	if err == nil {
		err = sink.Close()
	} else {
		_ = sink.Cancel()
	}
	if s.onDone != nil {
		s.onDone(time.Since(start), n, err)
	}
	if err != nil {
		return fmt.Errorf("persist snapshot: %w", err)
	}
	return nil
}

func (s *snapshot) Release() { _ = s.snap.Close() }

// AppliedFromRecord reads the applied index and term from one record of
// an export, for tools that look at a backup without importing it; ok is
// false for every other record.
func AppliedFromRecord(key, value []byte) (index, term uint64, ok bool) {
	if string(key) != string(keyApplied) || len(value) != 16 {
		return 0, 0, false
	}
	return binary.BigEndian.Uint64(value), binary.BigEndian.Uint64(value[8:]), true
}
