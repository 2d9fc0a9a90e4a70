package raftlog

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"sync"

	"github.com/cockroachdb/pebble/v2"
	"github.com/hashicorp/raft"
)

var (
	// ErrKeyNotFound is returned by Get and GetUint64 for a key that was never
	// set. hashicorp/raft recognises a missing stable key by comparing
	// err.Error() with "not found" (as raft-boltdb's ErrKeyNotFound reads), so
	// this error is returned as is, never wrapped, and its text must not
	// change.
	ErrKeyNotFound = errors.New("not found")

	// ErrClosed is returned by every method called after Close.
	ErrClosed = errors.New("raftlog: store is closed")

	// ErrNonContiguous is returned (wrapped) by StoreLogs and DeleteRange when
	// the operation would leave a gap in the log, and by StoreLogs for index
	// 0. The store promises raft it has no gaps (see IsMonotonic), so it
	// refuses to create one rather than corrupt that promise.
	ErrNonContiguous = errors.New("raftlog: log indexes must be contiguous")
)

// Store is a raft.LogStore, raft.StableStore and raft.MonotonicLogStore
// backed by Pebble. Create it with Open.
type Store struct {
	db       *pebble.DB
	fsCloser io.Closer // stops the disk-health checker; after db.Close
	dir      string
	logger   *slog.Logger

	// lifeMu is held shared by every operation and exclusively by Close, so
	// Close waits for in-flight operations and later calls get ErrClosed
	// instead of a Pebble panic.
	lifeMu sync.RWMutex
	closed bool

	// writeMu serialises writers (StoreLogs, DeleteRange) so the cached
	// indexes are updated in the same order the batches commit.
	writeMu sync.Mutex

	// idxMu guards the fields below. They are only modified with both
	// writeMu and idxMu held, so a writer may read them under writeMu alone.
	idxMu sync.RWMutex
	first uint64 // first index on disk; 0 when the log is empty
	last  uint64 // last index on disk; 0 when the log is empty
}

var (
	_ raft.LogStore          = (*Store)(nil)
	_ raft.StableStore       = (*Store)(nil)
	_ raft.MonotonicLogStore = (*Store)(nil)
)

// Open opens (creating if needed) the store in cfg.Dir.
func Open(cfg Config) (*Store, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	opts, fsCloser := cfg.pebbleOptions()
	db, err := pebble.Open(cfg.Dir, opts)
	if err != nil {
		_ = fsCloser.Close()
		return nil, fmt.Errorf("open raft log at %s: %w", cfg.Dir, err)
	}
	s := &Store{db: db, fsCloser: fsCloser, dir: cfg.Dir, logger: cfg.Logger}
	if err := s.load(); err != nil {
		_ = db.Close()
		_ = fsCloser.Close()
		return nil, fmt.Errorf("open raft log at %s: %w", cfg.Dir, err)
	}
	s.logger.Debug("raft log opened", "dir", cfg.Dir, "first_index", s.first, "last_index", s.last)
	return s, nil
}

// load checks the layout version and initialises the cached indexes.
func (s *Store) load() error {
	v, err := s.getMeta(metaLayoutKey)
	switch {
	case errors.Is(err, pebble.ErrNotFound):
		if err := s.db.Set([]byte(metaLayoutKey), putUint64(layoutVersion), pebble.Sync); err != nil {
			return fmt.Errorf("write layout version: %w", err)
		}
	case err != nil:
		return fmt.Errorf("read layout version: %w", err)
	case v != layoutVersion:
		return fmt.Errorf("on-disk layout version %d is not supported (want %d)", v, layoutVersion)
	}

	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte(logLowerBound), UpperBound: []byte(logUpperBound)})
	if err != nil {
		return fmt.Errorf("seek log bounds: %w", err)
	}
	defer it.Close()
	if it.First() {
		if s.first, err = logKeyIndex(it.Key()); err != nil {
			return err
		}
		if !it.Last() {
			return fmt.Errorf("seek last log entry: %w", errors.Join(it.Error(), errors.New("iterator exhausted")))
		}
		if s.last, err = logKeyIndex(it.Key()); err != nil {
			return err
		}
	}
	if err := it.Error(); err != nil {
		return fmt.Errorf("seek log bounds: %w", err)
	}
	return nil
}

// getMeta reads a uint64 metadata value; a missing key yields
// pebble.ErrNotFound.
func (s *Store) getMeta(key string) (uint64, error) {
	val, closer, err := s.db.Get([]byte(key))
	if err != nil {
		return 0, err
	}
	defer closer.Close()
	v, ok := getUint64(val)
	if !ok {
		return 0, &CorruptError{Offset: -1, Reason: fmt.Sprintf("metadata key %q holds %d bytes, want 8", key[1:], len(val))}
	}
	return v, nil
}

// enter marks the start of an operation; exit must follow if it succeeds.
func (s *Store) enter() error {
	s.lifeMu.RLock()
	if s.closed {
		s.lifeMu.RUnlock()
		return ErrClosed
	}
	return nil
}

func (s *Store) exit() { s.lifeMu.RUnlock() }

// Close waits for in-flight operations, then closes the database. Calling it
// more than once is harmless.
func (s *Store) Close() error {
	s.lifeMu.Lock()
	defer s.lifeMu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	err := s.db.Close()
	_ = s.fsCloser.Close()
	if err != nil {
		return fmt.Errorf("close raft log at %s: %w", s.dir, err)
	}
	return nil
}

// FirstIndex returns the first index in the log, or 0 if it is empty. It is
// served from memory.
func (s *Store) FirstIndex() (uint64, error) {
	if err := s.enter(); err != nil {
		return 0, err
	}
	defer s.exit()
	s.idxMu.RLock()
	defer s.idxMu.RUnlock()
	return s.first, nil
}

// LastIndex returns the last index in the log, or 0 if it is empty. It is
// served from memory.
func (s *Store) LastIndex() (uint64, error) {
	if err := s.enter(); err != nil {
		return 0, err
	}
	defer s.exit()
	s.idxMu.RLock()
	defer s.idxMu.RUnlock()
	return s.last, nil
}

// GetLog reads the entry at index into log. It returns raft.ErrLogNotFound
// (unwrapped, as raft compares it with ==) if there is no such entry.
func (s *Store) GetLog(index uint64, log *raft.Log) error {
	if err := s.enter(); err != nil {
		return err
	}
	defer s.exit()
	s.idxMu.RLock()
	first, last := s.first, s.last
	s.idxMu.RUnlock()
	if last == 0 || index < first || index > last {
		return raft.ErrLogNotFound
	}

	var key [logKeyLen]byte
	putLogKey(key[:], index)
	val, closer, err := s.db.Get(key[:])
	if errors.Is(err, pebble.ErrNotFound) {
		// A concurrent DeleteRange may have removed it after the bounds check.
		return raft.ErrLogNotFound
	}
	if err != nil {
		return fmt.Errorf("get raft log entry %d: %w", index, err)
	}
	defer closer.Close()
	if err := decodeLog(val, log); err != nil {
		var ce *CorruptError
		if errors.As(err, &ce) {
			ce.Index = index
		}
		return fmt.Errorf("get raft log entry %d: %w", index, err)
	}
	if log.Index != index {
		got := log.Index
		*log = raft.Log{}
		return fmt.Errorf("get raft log entry %d: %w", index,
			&CorruptError{Index: index, Offset: -1, Reason: fmt.Sprintf("entry stored under index %d claims index %d", index, got)})
	}
	return nil
}

// StoreLog stores one entry durably. See StoreLogs.
func (s *Store) StoreLog(log *raft.Log) error {
	return s.StoreLogs([]*raft.Log{log})
}

// StoreLogs stores entries durably in one atomic, fsynced batch. The entries
// must have consecutive indexes, and unless the log is empty the first must
// directly follow LastIndex; otherwise the error wraps ErrNonContiguous and
// nothing is written.
func (s *Store) StoreLogs(logs []*raft.Log) error {
	if len(logs) == 0 {
		return nil
	}
	if err := s.enter(); err != nil {
		return err
	}
	defer s.exit()
	s.writeMu.Lock()
	defer s.writeMu.Unlock()

	if err := s.checkAppend(logs); err != nil {
		return err
	}

	size := 0
	for _, l := range logs {
		size += logKeyLen + encodedLen(l) + 2*binaryUvarintMax // batch record overhead
	}
	b := s.db.NewBatchWithSize(size)
	defer b.Close()
	for _, l := range logs {
		op := b.SetDeferred(logKeyLen, encodedLen(l))
		putLogKey(op.Key, l.Index)
		encodeLog(op.Value, l)
		if err := op.Finish(); err != nil {
			return fmt.Errorf("store raft logs %d-%d: %w", logs[0].Index, logs[len(logs)-1].Index, err)
		}
	}
	if err := b.Commit(pebble.Sync); err != nil {
		return fmt.Errorf("store raft logs %d-%d: %w", logs[0].Index, logs[len(logs)-1].Index, err)
	}

	s.idxMu.Lock()
	if s.last == 0 {
		s.first = logs[0].Index
	}
	s.last = logs[len(logs)-1].Index
	s.idxMu.Unlock()
	return nil
}

// binaryUvarintMax bounds the varint length prefixes Pebble adds per record.
const binaryUvarintMax = 10

// checkAppend validates a batch against the current bounds. Caller holds
// writeMu.
func (s *Store) checkAppend(logs []*raft.Log) error {
	for i, l := range logs {
		if l == nil {
			return fmt.Errorf("store raft logs: entry %d of batch is nil", i)
		}
	}
	firstNew := logs[0].Index
	if firstNew == 0 {
		return fmt.Errorf("store raft logs: index 0 is not a valid raft index: %w", ErrNonContiguous)
	}
	if s.last != 0 && firstNew != s.last+1 {
		return fmt.Errorf("store raft logs: batch starts at %d but last index is %d: %w", firstNew, s.last, ErrNonContiguous)
	}
	for i := 1; i < len(logs); i++ {
		if prev := logs[i-1].Index; prev == math.MaxUint64 || logs[i].Index != prev+1 {
			return fmt.Errorf("store raft logs: index %d follows %d in batch: %w", logs[i].Index, prev, ErrNonContiguous)
		}
	}
	return nil
}

// DeleteRange durably deletes the entries with indexes in [minIdx, maxIdx].
// Raft only ever removes a prefix (compaction after a snapshot), a suffix
// (conflicting entries on a follower) or everything (after installing a
// snapshot); a range strictly inside the log would leave a gap and is
// refused with an error wrapping ErrNonContiguous. Ranges outside the log
// are a no-op.
func (s *Store) DeleteRange(minIdx, maxIdx uint64) error {
	if err := s.enter(); err != nil {
		return err
	}
	defer s.exit()
	s.writeMu.Lock()
	defer s.writeMu.Unlock()

	first, last := s.first, s.last
	if minIdx > maxIdx || last == 0 || maxIdx < first || minIdx > last {
		return nil
	}
	if minIdx > first && maxIdx < last {
		return fmt.Errorf("delete raft logs %d-%d: inside log %d-%d would leave a gap: %w", minIdx, maxIdx, first, last, ErrNonContiguous)
	}
	lo, hi := max(minIdx, first), min(maxIdx, last)

	// One range tombstone, whatever the size of the range.
	start := logKey(lo)
	end := []byte(logUpperBound)
	if hi < math.MaxUint64 {
		end = logKey(hi + 1)
	}
	if err := s.db.DeleteRange(start, end, pebble.Sync); err != nil {
		return fmt.Errorf("delete raft logs %d-%d: %w", lo, hi, err)
	}

	s.idxMu.Lock()
	switch {
	case lo == first && hi == last:
		s.first, s.last = 0, 0
	case lo == first:
		s.first = hi + 1
	default:
		s.last = lo - 1
	}
	s.idxMu.Unlock()
	return nil
}

// IsMonotonic implements raft.MonotonicLogStore and reports true: the store
// never holds a gap between FirstIndex and LastIndex (StoreLogs and
// DeleteRange refuse to create one). Raft then deletes the whole log after
// restoring a snapshot instead of relying on a gap to mark the
// discontinuity, which keeps the no-gap invariant true, lets GetLog answer
// out-of-range reads from the cached bounds, and lets DeleteRange be a
// single range tombstone whose effect on the bounds is known without a
// seek. (A crash between a snapshot install and that deletion leaves a
// log that ends before the snapshot: raftnode drops it at the next start,
// as raft would have.)
func (s *Store) IsMonotonic() bool { return true }

// Set durably stores val under key in the stable keyspace.
func (s *Store) Set(key, val []byte) error {
	if err := s.enter(); err != nil {
		return err
	}
	defer s.exit()
	if err := s.db.Set(stableKey(key), val, pebble.Sync); err != nil {
		return fmt.Errorf("set stable key %q: %w", key, err)
	}
	return nil
}

// Get returns a copy of the value stored under key, or ErrKeyNotFound (not
// wrapped; see ErrKeyNotFound) if there is none.
func (s *Store) Get(key []byte) ([]byte, error) {
	if err := s.enter(); err != nil {
		return nil, err
	}
	defer s.exit()
	val, closer, err := s.db.Get(stableKey(key))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, ErrKeyNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("get stable key %q: %w", key, err)
	}
	defer closer.Close()
	return append(make([]byte, 0, len(val)), val...), nil
}

// SetUint64 durably stores val (8 bytes, big-endian) under key.
func (s *Store) SetUint64(key []byte, val uint64) error {
	return s.Set(key, putUint64(val))
}

// GetUint64 returns the integer stored under key with SetUint64. For a key
// that was never set it returns 0 and ErrKeyNotFound, as raft-boltdb does;
// raft treats that as "no value yet".
func (s *Store) GetUint64(key []byte) (uint64, error) {
	val, err := s.Get(key)
	if err != nil {
		return 0, err
	}
	v, ok := getUint64(val)
	if !ok {
		return 0, fmt.Errorf("get stable key %q: %w", key,
			&CorruptError{Offset: -1, Reason: fmt.Sprintf("holds %d bytes, want 8 for a uint64", len(val))})
	}
	return v, nil
}
