// Package backup owns the control plane's backup files: it writes a
// consistent backup on a schedule while this node leads, encrypts it when a
// key is configured, verifies it by reading it back, renames it into place
// atomically, prunes old ones and exports metrics; and it reads backups
// back for restore and for offline verification (relayctl backup verify).
//
// A backup file is a state export (storage/state), either as it is or
// encrypted with age (see Open).
package backup

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/edge-relay/relay/internal/dirsync"
)

// Source writes a consistent copy of the state (a state export) to w. The
// control server's source waits for a linearizable read barrier first, so
// a backup holds every write acknowledged before it started.
type Source func(ctx context.Context, w io.Writer) error

// Config configures scheduled backups.
type Config struct {
	// Dir receives the backups; created (mode 0700) if missing. Required.
	Dir string
	// Every is the time between two backups. Required.
	Every time.Duration
	// Keep is how many backups stay in Dir; older ones are removed after
	// each new one verified. Default 7.
	Keep int
	// Key, if set, encrypts every backup (age). Without it backups are
	// plaintext, and hold password hashes, signing and session keys.
	Key *Key
	// Source writes the state. Required.
	Source Source
	// Leading reports whether this node leads: only the leader writes
	// backups. Required.
	Leading func() bool
	// CheckEvery is how often the scheduler looks whether a backup is due
	// (so a new leader whose Dir has no recent backup writes one soon).
	// Default Every/10, at most a minute.
	CheckEvery time.Duration
	// Timeout bounds one backup. Default 10 minutes, or Every if longer.
	Timeout time.Duration
	// Logger; default slog.Default().
	Logger *slog.Logger
	// Metrics registers the backup metrics; nil disables them.
	Metrics prometheus.Registerer
	// Now is the clock; default time.Now.
	Now func() time.Time
}

func (c *Config) applyDefaults() error {
	if c.Dir == "" {
		return errors.New("backup: a directory is required (--backup-dir)")
	}
	if c.Every <= 0 {
		return errors.New("backup: the interval must be positive (--backup-every)")
	}
	if c.Source == nil || c.Leading == nil {
		return errors.New("backup: Source and Leading are required")
	}
	if c.Keep <= 0 {
		c.Keep = 7
	}
	if c.CheckEvery <= 0 {
		c.CheckEvery = min(c.Every/10, time.Minute)
		if c.CheckEvery <= 0 {
			c.CheckEvery = c.Every
		}
	}
	if c.Timeout <= 0 {
		c.Timeout = max(10*time.Minute, c.Every)
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return nil
}

// File names: a fixed prefix, the UTC start time (fixed width, so names
// sort by time), and ".bin" or ".bin.age". Temporary files start with a
// dot and end in ".tmp".
const (
	namePrefix = "relay-backup-"
	nameTime   = "20060102T150405.000Z"
	plainExt   = ".bin"
	sealedExt  = ".bin.age"
	tmpPattern = ".relay-backup-*.tmp"
)

// StreamChunkBytes is the size of one message of the control API's
// Backup stream (ClusterService.Backup), which carries a backup's
// plaintext export: the server (control/api) cuts the export into
// messages of this size, and a client bounds the messages it accepts by
// it (relayctl takes a few times as much, and refuses more), so the two
// sides are sized in one place.
const StreamChunkBytes = 256 << 10

// FileName is the name of a backup started at t.
func FileName(t time.Time, encrypted bool) string {
	ext := plainExt
	if encrypted {
		ext = sealedExt
	}
	return namePrefix + t.UTC().Format(nameTime) + ext
}

// File is a backup in a directory.
type File struct {
	Path      string
	Time      time.Time // when it was started
	Encrypted bool
}

// List returns the backups in dir, oldest first. Files that do not look
// like backups are ignored.
func List(dir string) ([]File, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("list backups: %w", err)
	}
	var out []File
	for _, e := range ents {
		name := e.Name()
		if !e.Type().IsRegular() || !strings.HasPrefix(name, namePrefix) {
			continue
		}
		rest := strings.TrimPrefix(name, namePrefix)
		enc := strings.HasSuffix(rest, sealedExt)
		switch {
		case enc:
			rest = strings.TrimSuffix(rest, sealedExt)
		case strings.HasSuffix(rest, plainExt):
			rest = strings.TrimSuffix(rest, plainExt)
		default:
			continue
		}
		t, err := time.Parse(nameTime, rest)
		if err != nil {
			continue
		}
		out = append(out, File{Path: filepath.Join(dir, name), Time: t, Encrypted: enc})
	}
	slices.SortFunc(out, func(a, b File) int { return a.Time.Compare(b.Time) })
	return out, nil
}

// Scheduler writes backups on schedule while this node leads. It owns one
// goroutine, stopped by Close.
type Scheduler struct {
	cfg    Config
	log    *slog.Logger
	m      *metrics
	cancel context.CancelFunc
	done   chan struct{}

	writeMu sync.Mutex // held while a backup is written and pruned

	mu   sync.Mutex // guards last
	last time.Time  // start time of the newest backup in Dir
}

// Start checks the directory, removes temporary files a crash left
// behind, and starts the schedule.
func Start(cfg Config) (*Scheduler, error) {
	if err := cfg.applyDefaults(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("backup dir: %w", err)
	}
	stale, _ := filepath.Glob(filepath.Join(cfg.Dir, tmpPattern))
	for _, p := range stale {
		_ = os.Remove(p)
	}
	files, err := List(cfg.Dir)
	if err != nil {
		return nil, err
	}
	s := &Scheduler{cfg: cfg, log: cfg.Logger.With("component", "backup"), done: make(chan struct{})}
	s.m = newMetrics(cfg.Metrics, cfg.Every)
	// The newest backup not named in the future: one that is was written
	// while this node's clock was ahead (and was stepped back since); its
	// time says nothing of how long ago it was written, and counted, it
	// would hold the schedule (and the staleness alert) off until the
	// clock passes it.
	past := pastFiles(files, cfg.Now())
	if len(past) > 0 {
		s.last = past[len(past)-1].Time
		s.m.lastSuccess.Set(float64(s.last.UnixMilli()) / 1e3)
	}
	if n := len(files) - len(past); n > 0 {
		s.log.Warn("backups named in the future: this node's clock was ahead when it wrote them; they are pruned first", "files", n, "newest", files[len(files)-1].Time)
	}
	s.m.files.Set(float64(len(files)))
	if cfg.Key == nil {
		s.log.Warn("scheduled backups are NOT encrypted: they hold password hashes, token signing keys and session keys; configure --backup-key-file",
			"dir", cfg.Dir, "every", cfg.Every, "keep", cfg.Keep)
	} else {
		s.log.Info("scheduled backups on", "dir", cfg.Dir, "every", cfg.Every, "keep", cfg.Keep, "recipient", cfg.Key.Recipient())
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	go s.run(ctx)
	return s, nil
}

// Close stops the schedule, cancelling a backup in progress (its
// temporary file is removed), and waits for it.
func (s *Scheduler) Close() error {
	s.cancel()
	<-s.done
	return nil
}

func (s *Scheduler) run(ctx context.Context) {
	defer close(s.done)
	tick := time.NewTicker(s.cfg.CheckEvery)
	defer tick.Stop()
	for {
		if s.due() {
			_, _ = s.Backup(ctx)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// due reports whether this node leads and its newest backup is at least
// Every old, or newer than the clock by more than futureSlack (the clock
// was stepped back since: when it was written is not known).
func (s *Scheduler) due() bool {
	if !s.cfg.Leading() {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	age := s.cfg.Now().Sub(s.last)
	return s.last.IsZero() || age >= s.cfg.Every || age < -futureSlack
}

// futureSlack is how far in the future a backup's name may be before it
// counts as written under a clock that was ahead.
const futureSlack = time.Minute

// pastFiles is files (oldest first) without those named more than
// futureSlack after now.
func pastFiles(files []File, now time.Time) []File {
	i := len(files)
	for i > 0 && files[i-1].Time.After(now.Add(futureSlack)) {
		i--
	}
	return files[:i]
}

// Result describes a backup written by Backup.
type Result struct {
	File     File
	Info     Info
	Duration time.Duration
}

// Backup writes one backup now (whether or not this node leads; the
// source decides whether it can), verifies it and prunes old ones. The
// schedule calls it; so may a caller that wants a backup at once.
func (s *Scheduler) Backup(ctx context.Context) (Result, error) {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	start := s.cfg.Now()
	ctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	defer cancel()
	res, err := s.write(ctx, start)
	res.Duration = s.cfg.Now().Sub(start)
	if err != nil {
		// A backup cut short by Close (the node stops) is no failure.
		if ctx.Err() == nil || !errors.Is(err, context.Canceled) {
			s.m.failures.Inc()
			s.log.Error("scheduled backup failed", "err", err, "duration", res.Duration)
		}
		return res, err
	}
	s.mu.Lock()
	s.last = start
	s.mu.Unlock()
	s.m.successes.Inc()
	s.m.lastSuccess.Set(float64(start.UnixMilli()) / 1e3)
	s.m.size.Set(float64(res.Info.Size))
	s.m.records.Set(float64(res.Info.Records))
	s.m.duration.Set(res.Duration.Seconds())
	// The plaintext's SHA-256 (relayctl backup verify -o json prints the
	// same for a file): encryption does not tell who wrote a backup, since
	// anyone with the recipient can write one, so the log is what shows a
	// file about to be restored is one this cluster wrote.
	s.log.Info("wrote a verified backup", "file", res.File.Path, "bytes", res.Info.Size, "records", res.Info.Records,
		"applied_index", res.Info.AppliedIndex, "encrypted", res.Info.Encrypted, "sha256", hex.EncodeToString(res.Info.PlainSHA256[:]),
		"duration", res.Duration)
	if err := s.prune(); err != nil {
		s.log.Warn("prune old backups", "err", err)
	}
	return res, nil
}

// write writes the source's export as the backup of start (WriteFile).
func (s *Scheduler) write(ctx context.Context, start time.Time) (Result, error) {
	f := File{Path: filepath.Join(s.cfg.Dir, FileName(start, s.cfg.Key != nil)), Time: start, Encrypted: s.cfg.Key != nil}
	info, err := WriteFile(ctx, f.Path, s.cfg.Key, func(w io.Writer) error {
		if err := s.cfg.Source(ctx, w); err != nil {
			return fmt.Errorf("read state: %w", err)
		}
		return nil
	})
	if err != nil {
		return Result{}, err
	}
	return Result{File: f, Info: info}, nil
}

// WriteFile writes a backup to path, so that path never holds a partial
// or unverified one: write streams the export (through the encryption
// when key is set) into a temporary file beside path, which is synced,
// read back whole (decrypting, checking every record and the export's
// checksum, and that the plaintext is the one written), and only then
// renamed to path, with the directory synced after. On error the
// temporary file is removed and path is untouched. The scheduler and
// `relayctl backup` both write through it. ctx ends the read-back too
// (a shutdown does not wait for the whole file to be read again); write
// must watch it itself.
func WriteFile(ctx context.Context, path string, key *Key, write func(io.Writer) error) (info Info, err error) {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, tmpPattern)
	if err != nil {
		return info, fmt.Errorf("backup: %w", err)
	}
	defer func() {
		if err != nil {
			_ = tmp.Close()
			_ = os.Remove(tmp.Name())
		}
	}()
	sealer, err := Seal(tmp, key)
	if err != nil {
		return info, err
	}
	sum := sha256.New()
	if err := write(io.MultiWriter(sealer, sum)); err != nil {
		return info, fmt.Errorf("backup: %w", err)
	}
	if err := sealer.Close(); err != nil {
		return info, fmt.Errorf("backup: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return info, fmt.Errorf("backup: sync %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return info, fmt.Errorf("backup: %w", err)
	}
	info, err = verifyFile(ctx, tmp.Name(), key)
	if err != nil {
		return info, fmt.Errorf("backup: written file does not verify: %w", err)
	}
	var want [32]byte
	sum.Sum(want[:0])
	if info.PlainSHA256 != want {
		return info, errors.New("backup: written file does not verify: its content differs from the export written")
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return info, fmt.Errorf("backup: %w", err)
	}
	if err := dirsync.Sync(dir); err != nil {
		return info, fmt.Errorf("backup: %w", err)
	}
	return info, nil
}

// prune removes all but the newest Keep backups. Backups named in the
// future (written while the clock was ahead) go first: they hold older
// state than the one just written, whose name is earlier.
func (s *Scheduler) prune() error {
	files, err := List(s.cfg.Dir)
	if err != nil {
		return err
	}
	past := pastFiles(files, s.cfg.Now())
	files = append(slices.Clone(files[len(past):]), past...)
	var errs []error
	removed := 0
	for len(files)-removed > s.cfg.Keep {
		if err := os.Remove(files[removed].Path); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
		removed++
	}
	s.m.files.Set(float64(len(files) - removed))
	if removed > 0 {
		errs = append(errs, dirsync.Sync(s.cfg.Dir))
	}
	return errors.Join(errs...)
}

type metrics struct {
	lastSuccess, size, records, duration, files prometheus.Gauge
	successes, failures                         prometheus.Counter
}

func newMetrics(reg prometheus.Registerer, every time.Duration) *metrics {
	m := &metrics{
		lastSuccess: prometheus.NewGauge(prometheus.GaugeOpts{Name: "relay_backup_last_success_timestamp_seconds",
			Help: "Start time of the newest verified backup in this node's backup directory (0: none)."}),
		size: prometheus.NewGauge(prometheus.GaugeOpts{Name: "relay_backup_last_size_bytes",
			Help: "Size of the last backup this node wrote, as stored (encrypted when a key is set)."}),
		records: prometheus.NewGauge(prometheus.GaugeOpts{Name: "relay_backup_last_records",
			Help: "State records in the last backup this node wrote."}),
		duration: prometheus.NewGauge(prometheus.GaugeOpts{Name: "relay_backup_last_duration_seconds",
			Help: "Time the last successful backup took, from reading the state to the verified file in place."}),
		files: prometheus.NewGauge(prometheus.GaugeOpts{Name: "relay_backup_files",
			Help: "Backups kept in this node's backup directory."}),
		successes: prometheus.NewCounter(prometheus.CounterOpts{Name: "relay_backups_total",
			Help: "Scheduled backups written and verified by this node."}),
		failures: prometheus.NewCounter(prometheus.CounterOpts{Name: "relay_backup_failures_total",
			Help: "Scheduled backups this node started that failed (state not readable, write, verification)."}),
	}
	interval := prometheus.NewGauge(prometheus.GaugeOpts{Name: "relay_backup_interval_seconds",
		Help: "The configured time between two scheduled backups (--backup-every)."})
	interval.Set(every.Seconds())
	if reg != nil {
		reg.MustRegister(m.lastSuccess, m.size, m.records, m.duration, m.files, m.successes, m.failures, interval)
	}
	return m
}
