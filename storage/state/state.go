// Package state is the control plane's state store: an ordered key-value
// store on Pebble with atomic batches, consistent point-in-time views and a
// self-checking export format used for Raft snapshots and backups.
//
// The store knows nothing about what the keys mean; control/fsm owns the
// layout. It does own durability: batches are committed without fsync
// (the Raft log is the durable record and replays anything lost), and Sync
// makes every earlier write durable before a snapshot is taken.
package state

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"

	"github.com/cockroachdb/pebble/v2"
)

// ErrNotFound is returned by Get when a key does not exist.
var ErrNotFound = errors.New("state: key not found")

// Config configures a Store.
type Config struct {
	// Dir is the Pebble directory; created if missing. Required.
	Dir string
	// Logger receives Pebble's own messages at debug level. Default: slog.Default().
	Logger *slog.Logger
	// CacheBytes is Pebble's block cache size. Default: 64 MiB.
	CacheBytes int64
	// ReadOnly opens an existing store without writing to it (no WAL
	// replay into tables, no compactions): for reading a stopped node's
	// state, which may be the last copy.
	ReadOnly bool
}

func (c *Config) applyDefaults() error {
	if c.Dir == "" {
		return errors.New("state: Config.Dir is required")
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.CacheBytes <= 0 {
		c.CacheBytes = 64 << 20
	}
	return nil
}

// Store is the state machine's Pebble database. It is safe for concurrent
// use; the FSM is its only writer.
type Store struct {
	db   *pebble.DB
	opts *pebble.Options // as opened, with defaults; Import writes tables with them
	dir  string
	log  *slog.Logger
	// importTableBytes is where Import starts a new table; tests lower it.
	importTableBytes uint64
}

// Open opens (or creates) the store in cfg.Dir.
func Open(cfg Config) (*Store, error) {
	if err := cfg.applyDefaults(); err != nil {
		return nil, err
	}
	cache := pebble.NewCache(cfg.CacheBytes)
	defer cache.Unref()
	opts := &pebble.Options{
		Cache:  cache,
		Logger: pebbleLogger{l: cfg.Logger.With("component", "pebble", "db", "state")},
		// Pinned so that a Pebble upgrade never ratchets the on-disk format
		// by itself (which would prevent rolling the binary back).
		FormatMajorVersion: pebble.FormatValueSeparation,
	}
	opts.ReadOnly = cfg.ReadOnly
	opts.EnsureDefaults()
	db, err := pebble.Open(cfg.Dir, opts)
	if err != nil {
		return nil, fmt.Errorf("open state store at %s: %w", cfg.Dir, err)
	}
	// Pebble's lock is held now, so no import is running in this
	// directory; a reader leaves what it finds.
	if !cfg.ReadOnly {
		if err := removeImportDirs(cfg.Dir); err != nil {
			_ = db.Close()
			return nil, fmt.Errorf("open state store at %s: remove an interrupted import: %w", cfg.Dir, err)
		}
	}
	return &Store{db: db, opts: opts, dir: cfg.Dir, log: cfg.Logger, importTableBytes: defaultImportTableBytes}, nil
}

// Close closes the database.
func (s *Store) Close() error {
	if err := s.db.Close(); err != nil {
		return fmt.Errorf("close state store at %s: %w", s.dir, err)
	}
	return nil
}

// Get returns a copy of the value stored under key, or ErrNotFound.
func (s *Store) Get(key []byte) ([]byte, error) {
	return get(s.db, key)
}

// Iterate calls fn for every key in [start, end) in key order, stopping
// early when fn returns false or an error. The key and value passed to fn
// are only valid during the call. The iteration sees one consistent
// point-in-time view.
func (s *Store) Iterate(start, end []byte, fn func(key, value []byte) (bool, error)) error {
	return iterate(s.db, start, end, fn)
}

// Sync makes every write committed so far durable.
func (s *Store) Sync() error {
	if err := s.db.LogData(nil, pebble.Sync); err != nil {
		return fmt.Errorf("sync state store: %w", err)
	}
	return nil
}

// Clear removes every record, durably: the store is as a new one.
func (s *Store) Clear() error {
	b := s.db.NewBatch()
	defer b.Close()
	// The FSM's key space, as Import's tables tile it.
	if err := b.DeleteRange([]byte{0x00}, []byte{0xff}, nil); err != nil {
		return fmt.Errorf("clear state store: %w", err)
	}
	if err := b.Commit(pebble.Sync); err != nil {
		return fmt.Errorf("clear state store: %w", err)
	}
	return nil
}

// PebbleMetrics returns Pebble's metrics of the store (memtables, block
// cache...); the caller keeps the store open meanwhile.
func (s *Store) PebbleMetrics() *pebble.Metrics { return s.db.Metrics() }

// NewBatch starts an atomic write batch.
func (s *Store) NewBatch() *Batch {
	return &Batch{b: s.db.NewIndexedBatch()}
}

// Snapshot returns a consistent read-only view of the store as it is now.
// The caller must Close it.
func (s *Store) Snapshot() *Snapshot {
	return &Snapshot{snap: s.db.NewSnapshot()}
}

// Batch is an atomic set of writes. Reads through the batch see its own
// pending writes on top of the store.
type Batch struct {
	b *pebble.Batch
}

// Set stores value under key.
func (b *Batch) Set(key, value []byte) error {
	if err := b.b.Set(key, value, nil); err != nil {
		return fmt.Errorf("batch set: %w", err)
	}
	return nil
}

// Delete removes key.
func (b *Batch) Delete(key []byte) error {
	if err := b.b.Delete(key, nil); err != nil {
		return fmt.Errorf("batch delete: %w", err)
	}
	return nil
}

// DeleteRange removes every key in [start, end).
func (b *Batch) DeleteRange(start, end []byte) error {
	if err := b.b.DeleteRange(start, end, nil); err != nil {
		return fmt.Errorf("batch delete range: %w", err)
	}
	return nil
}

// Get reads key as the batch would leave it.
func (b *Batch) Get(key []byte) ([]byte, error) {
	return get(b.b, key)
}

// Iterate is Store.Iterate over the store with the batch's writes applied.
func (b *Batch) Iterate(start, end []byte, fn func(key, value []byte) (bool, error)) error {
	return iterate(b.b, start, end, fn)
}

// Commit writes the batch atomically, without waiting for fsync (see the
// package comment), and releases it.
func (b *Batch) Commit() error {
	defer b.b.Close()
	if err := b.b.Commit(pebble.NoSync); err != nil {
		return fmt.Errorf("commit state batch: %w", err)
	}
	return nil
}

// Discard drops the batch without writing it.
func (b *Batch) Discard() {
	_ = b.b.Close()
}

// Snapshot is a consistent point-in-time view of the store.
type Snapshot struct {
	snap *pebble.Snapshot
}

// Get reads key in the snapshot.
func (s *Snapshot) Get(key []byte) ([]byte, error) {
	return get(s.snap, key)
}

// Iterate is Store.Iterate over the snapshot.
func (s *Snapshot) Iterate(start, end []byte, fn func(key, value []byte) (bool, error)) error {
	return iterate(s.snap, start, end, fn)
}

// The most Snapshot.Scan reads ahead of its callback.
const (
	scanAheadRecords = 256
	scanAheadBytes   = 1 << 20
)

// Scan is Iterate for callers whose fn may wait (on a slow network
// reader: a watch's full copy, a backup's stream). An open iterator pins
// the memtables, and the large batches Pebble keeps as memtables of
// their own, that existed when it opened: held for as long as fn waits,
// many slow readers would each keep the state's recent writes in memory.
// Scan reads at most 256 records or 1 MiB (at least one record) with an
// iterator into one buffer, closes it, then calls fn on them, and goes
// on from the next key with a new iterator on the same snapshot, so what
// fn sees is the snapshot's, as with Iterate, and no iterator stays open
// while fn runs. As with Iterate, the key and value passed to fn are
// only valid during the call (the buffer is reused).
func (s *Snapshot) Scan(start, end []byte, fn func(key, value []byte) (bool, error)) error {
	type record struct{ keyEnd, end int } // in buf, after the last record's end
	var (
		buf   []byte
		ahead []record
		next  []byte // where the next read starts; nil: at end
	)
	for {
		buf, ahead, next = buf[:0], ahead[:0], nil
		err := iterate(s.snap, start, end, func(k, v []byte) (bool, error) {
			if len(ahead) == scanAheadRecords || (len(ahead) > 0 && len(buf)+len(k)+len(v) > scanAheadBytes) {
				next = bytes.Clone(k)
				return false, nil
			}
			buf = append(buf, k...)
			keyEnd := len(buf)
			buf = append(buf, v...)
			ahead = append(ahead, record{keyEnd, len(buf)})
			return true, nil
		})
		if err != nil {
			return err
		}
		from := 0
		for _, r := range ahead {
			more, err := fn(buf[from:r.keyEnd:r.keyEnd], buf[r.keyEnd:r.end:r.end])
			if err != nil || !more {
				return err
			}
			from = r.end
		}
		if next == nil {
			return nil
		}
		start = next
	}
}

// Close releases the snapshot.
func (s *Snapshot) Close() error {
	return s.snap.Close()
}

// Reader is what Store, Batch and Snapshot have in common for reading.
type Reader interface {
	Get(key []byte) ([]byte, error)
	Iterate(start, end []byte, fn func(key, value []byte) (bool, error)) error
}

var (
	_ Reader = (*Store)(nil)
	_ Reader = (*Batch)(nil)
	_ Reader = (*Snapshot)(nil)
)

func get(r pebble.Reader, key []byte) ([]byte, error) {
	v, closer, err := r.Get(key)
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("get %q: %w", key, err)
	}
	out := bytes.Clone(v)
	if out == nil {
		out = []byte{}
	}
	_ = closer.Close()
	return out, nil
}

func iterate(r pebble.Reader, start, end []byte, fn func(key, value []byte) (bool, error)) error {
	it, err := r.NewIter(&pebble.IterOptions{LowerBound: start, UpperBound: end})
	if err != nil {
		return fmt.Errorf("new iterator: %w", err)
	}
	for ok := it.First(); ok; ok = it.Next() {
		v, err := it.ValueAndErr()
		if err != nil {
			// The key before Close: Close gives the iterator's memory back
			// to Pebble's pool.
			err = fmt.Errorf("read value of %q: %w", it.Key(), err)
			_ = it.Close()
			return err
		}
		more, err := fn(it.Key(), v)
		if err != nil {
			_ = it.Close()
			return err
		}
		if !more {
			break
		}
	}
	if err := it.Close(); err != nil {
		return fmt.Errorf("iterate: %w", err)
	}
	return nil
}

// pebbleLogger routes Pebble's messages to slog.
type pebbleLogger struct{ l *slog.Logger }

func (p pebbleLogger) Infof(format string, args ...any)  { p.l.Debug(fmt.Sprintf(format, args...)) }
func (p pebbleLogger) Errorf(format string, args ...any) { p.l.Error(fmt.Sprintf(format, args...)) }
func (p pebbleLogger) Fatalf(format string, args ...any) {
	p.l.Error(fmt.Sprintf(format, args...))
	panic(fmt.Sprintf(format, args...))
}

var _ io.Closer = (*Snapshot)(nil)
