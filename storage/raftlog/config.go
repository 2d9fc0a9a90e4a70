package raftlog

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
)

// Defaults applied by Open for zero-valued Config fields.
const (
	// DefaultCacheSize is the Pebble block cache size. Raft reads mostly
	// recent entries (replication, FSM apply), which are usually still in
	// the memtable, so the block cache only needs to cover followers
	// catching up.
	DefaultCacheSize int64 = 8 << 20

	// DefaultMemTableSize is the size of one Pebble memtable. Up to two can
	// exist at once. Entries are short-lived (truncated after each raft
	// snapshot); a memtable that holds a few thousand of them means entries
	// truncated soon after being written are often dropped by the flush
	// instead of being written out to sstables and compacted later.
	DefaultMemTableSize uint64 = 16 << 20

	// DefaultMaxOpenFiles caps the file descriptors Pebble keeps open. A raft
	// log has few live sstables; the Pebble default of 1000 is sized for
	// large databases.
	DefaultMaxOpenFiles = 256
)

// formatMajorVersion is pinned so that a Pebble upgrade never silently
// ratchets the on-disk format (which would prevent rolling the binary back).
// Bump it deliberately, after the old release is out of support.
const formatMajorVersion = pebble.FormatValueSeparation

// Config configures Open. The zero value of every field except Dir is valid
// and means "use the default".
type Config struct {
	// Dir is the directory holding the Pebble database. Required. It is
	// created if missing and must not be shared with anything else.
	Dir string

	// Logger receives the store's messages. Pebble's informational messages
	// (flushes, compactions, WAL rotation) are logged at Debug; Pebble's
	// errors at Error. Nil means slog.Default().
	Logger *slog.Logger

	// CacheSize is the Pebble block cache size in bytes. Zero means
	// DefaultCacheSize.
	CacheSize int64

	// MemTableSize is the size of a Pebble memtable in bytes. Zero means
	// DefaultMemTableSize.
	MemTableSize uint64

	// MaxOpenFiles is a soft limit on files Pebble keeps open. Zero means
	// DefaultMaxOpenFiles.
	MaxOpenFiles int
}

// withDefaults validates cfg and fills in zero fields. It is the only place
// defaults are applied.
func (cfg Config) withDefaults() (Config, error) {
	if cfg.Dir == "" {
		return cfg, errors.New("raftlog: Config.Dir is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.CacheSize < 0 {
		return cfg, fmt.Errorf("raftlog: Config.CacheSize %d is negative", cfg.CacheSize)
	}
	if cfg.CacheSize == 0 {
		cfg.CacheSize = DefaultCacheSize
	}
	if cfg.MemTableSize == 0 {
		cfg.MemTableSize = DefaultMemTableSize
	}
	if cfg.MaxOpenFiles < 0 {
		return cfg, fmt.Errorf("raftlog: Config.MaxOpenFiles %d is negative", cfg.MaxOpenFiles)
	}
	if cfg.MaxOpenFiles == 0 {
		cfg.MaxOpenFiles = DefaultMaxOpenFiles
	}
	return cfg, nil
}

// diskSlowThreshold is how long a single disk operation may take before
// Pebble's disk-health checker reports it. For a raft log a stalled fsync
// means missed heartbeats, so it is worth a warning.
const diskSlowThreshold = 5 * time.Second

// pebbleOptions builds the Pebble options for a defaulted Config. The
// returned closer stops the disk-health checker wrapped around the
// filesystem; the caller closes it after the database is closed, or after
// pebble.Open fails (Pebble v2.1.7 leaks its own checker goroutine when
// Open fails, so we provide the checked FS ourselves).
func (cfg Config) pebbleOptions() (*pebble.Options, io.Closer) {
	logger := cfg.Logger.With("component", "pebble")
	fs, fsCloser := vfs.WithDiskHealthChecks(vfs.Default, diskSlowThreshold, nil, func(info vfs.DiskSlowInfo) {
		logger.Warn("slow disk operation", "path", info.Path, "op", info.OpType.String(), "duration", info.Duration)
	})
	opts := &pebble.Options{
		FS:                 fs,
		CacheSize:          cfg.CacheSize,
		MemTableSize:       cfg.MemTableSize,
		MaxOpenFiles:       cfg.MaxOpenFiles,
		FormatMajorVersion: formatMajorVersion,
		Logger:             pebbleLogger{logger},
		EventListener: &pebble.EventListener{
			// A write stall blocks StoreLogs; say so at Warn.
			WriteStallBegin: func(info pebble.WriteStallBeginInfo) {
				logger.Warn("write stall begin", "reason", info.Reason)
			},
			WriteStallEnd: func() { logger.Warn("write stall end") },
		},
	}
	return opts, fsCloser
}

// pebbleLogger routes Pebble's printf-style logging into slog.
type pebbleLogger struct{ l *slog.Logger }

func (p pebbleLogger) Infof(format string, args ...any) {
	if p.l.Enabled(context.Background(), slog.LevelDebug) {
		p.l.Debug(fmt.Sprintf(format, args...))
	}
}

func (p pebbleLogger) Errorf(format string, args ...any) {
	p.l.Error(fmt.Sprintf(format, args...))
}

// Fatalf is called by Pebble for conditions it cannot continue from (for
// example detected data corruption). Pebble's own default exits the process;
// we log and panic so the stack is visible and deferred handlers run.
func (p pebbleLogger) Fatalf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	p.l.Error(msg, "fatal", true)
	panic("raftlog: pebble fatal error: " + msg)
}
