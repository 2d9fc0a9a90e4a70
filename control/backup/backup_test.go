package backup_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/edge-relay/relay/control/backup"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/storage/state"
)

// Test keys (never used outside tests).
const (
	testKey  = "AGE-SECRET-KEY-1X43GLUTKFAQLLT8RC22CRLUHXX2KNKVGNE3Q3J5Z08YE7DHF0V9QU6QVPR"
	otherKey = "AGE-SECRET-KEY-14VZEHMMLLWDPS8QPNANDVE7YVZA55LKVNTUP2FQPW0V5ZNKN0NFQ46LZ79"
)

// memState is a state.Reader over a map: enough of a control-plane state
// for the backup code (it needs the applied index record).
type memState map[string]string

func (m memState) Get(k []byte) ([]byte, error) {
	v, ok := m[string(k)]
	if !ok {
		return nil, state.ErrNotFound
	}
	return []byte(v), nil
}

func (m memState) Iterate(start, end []byte, fn func(k, v []byte) (bool, error)) error {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if more, err := fn([]byte(k), []byte(m[k])); err != nil || !more {
			return err
		}
	}
	return nil
}

func newState(index uint64, users int) memState {
	var applied [16]byte
	binary.BigEndian.PutUint64(applied[:], index)
	binary.BigEndian.PutUint64(applied[8:], 3)
	m := memState{"m:applied": string(applied[:])}
	for i := range users {
		m[fmt.Sprintf("u:user%04d", i)] = strings.Repeat("x", 100)
	}
	return m
}

func exportOf(t testing.TB, m memState) []byte {
	t.Helper()
	var b bytes.Buffer
	if _, err := state.Export(&b, m); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func mustKey(t testing.TB, s string) *backup.Key {
	t.Helper()
	k, err := backup.ParseKey("# test key\n" + s + "\n")
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func gauge(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			m := mf.GetMetric()[0]
			return m.GetGauge().GetValue() + m.GetCounter().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// Backups are written only while the node leads, on schedule, each one
// verified and renamed into place; the newest Keep stay; the metrics say
// when the last one succeeded and how big it was.
func TestScheduleLeaderOnlyPruneAndMetrics(t *testing.T) {
	dir := t.TempDir()
	st := newState(42, 50)
	var leading atomic.Bool
	var asked, wrote atomic.Int64
	reg := prometheus.NewRegistry()
	s, err := backup.Start(backup.Config{
		Dir: dir, Every: 30 * time.Millisecond, CheckEvery: 5 * time.Millisecond, Keep: 2,
		Source: func(_ context.Context, w io.Writer) error {
			wrote.Add(1)
			_, err := state.Export(w, st)
			return err
		},
		Leading: func() bool { asked.Add(1); return leading.Load() },
		Logger:  quiet, Metrics: reg,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	// A follower looks, and writes nothing.
	clustertest.Eventually(t, 10*time.Second, func() error {
		if asked.Load() < 5 {
			return fmt.Errorf("leadership asked %d times", asked.Load())
		}
		return nil
	})
	if wrote.Load() != 0 {
		t.Fatalf("a follower read the state for a backup %d times", wrote.Load())
	}
	if v := gauge(t, reg, "relay_backup_last_success_timestamp_seconds"); v != 0 {
		t.Fatalf("last success %v with no backup", v)
	}
	if v := gauge(t, reg, "relay_backup_interval_seconds"); v != 0.03 {
		t.Fatalf("interval gauge %v", v)
	}

	before := time.Now()
	leading.Store(true)
	clustertest.Eventually(t, 20*time.Second, func() error {
		if n := gauge(t, reg, "relay_backups_total"); n < 4 {
			return fmt.Errorf("%v backups", n)
		}
		return nil
	})
	s.Close()
	files, err := backup.List(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 2 {
		t.Fatalf("%d backups kept, want 2: %v", len(files), files)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 2 {
		t.Fatalf("directory holds %d entries, want the 2 backups only", len(ents))
	}
	for _, f := range files {
		if f.Encrypted || !strings.HasSuffix(f.Path, ".bin") {
			t.Fatalf("unencrypted schedule wrote %+v", f)
		}
		info, err := backup.VerifyFile(f.Path, nil)
		if err != nil {
			t.Fatal(err)
		}
		if info.AppliedIndex != 42 || info.Records != 51 || info.Encrypted {
			t.Fatalf("backup info %+v", info)
		}
		if fi, _ := os.Stat(f.Path); fi.Mode().Perm() != 0o600 {
			t.Fatalf("backup mode %v, want 0600", fi.Mode().Perm())
		}
	}
	last := gauge(t, reg, "relay_backup_last_success_timestamp_seconds")
	if got := time.UnixMilli(int64(last * 1e3)); got.Before(before.Add(-time.Millisecond)) || !got.Equal(files[1].Time) {
		t.Fatalf("last success %v, newest file %v", got, files[1].Time)
	}
	if size := gauge(t, reg, "relay_backup_last_size_bytes"); size != float64(len(exportOf(t, st))) {
		t.Fatalf("size gauge %v, export is %d bytes", size, len(exportOf(t, st)))
	}
	if n := gauge(t, reg, "relay_backup_files"); n != 2 {
		t.Fatalf("files gauge %v", n)
	}
	if n := gauge(t, reg, "relay_backup_failures_total"); n != 0 {
		t.Fatalf("%v failures", n)
	}
}

// A restarted scheduler (or a new leader) knows its newest backup from the
// directory: it neither reports "never" nor writes again before it is due,
// and it removes temporary files a crash left behind.
func TestStartReadsDirectory(t *testing.T) {
	dir := t.TempDir()
	newest := time.Now().Add(-time.Minute).Truncate(time.Millisecond)
	for _, name := range []string{backup.FileName(newest.Add(-time.Hour), false), backup.FileName(newest, true), "notes.txt"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, ".relay-backup-123.tmp"), []byte("half"), 0o600); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	var asked atomic.Int64
	s, err := backup.Start(backup.Config{Dir: dir, Every: time.Hour, CheckEvery: 5 * time.Millisecond, Logger: quiet, Metrics: reg,
		Source:  func(context.Context, io.Writer) error { t.Error("backup written before it was due"); return nil },
		Leading: func() bool { asked.Add(1); return true }})
	if err != nil {
		t.Fatal(err)
	}
	clustertest.Eventually(t, 10*time.Second, func() error {
		if asked.Load() < 3 {
			return errors.New("not asked yet")
		}
		return nil
	})
	s.Close()
	if got := gauge(t, reg, "relay_backup_last_success_timestamp_seconds"); got != float64(newest.UnixMilli())/1e3 {
		t.Fatalf("last success %v, want %v", got, float64(newest.UnixMilli())/1e3)
	}
	if _, err := os.Stat(filepath.Join(dir, ".relay-backup-123.tmp")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("stale temporary file kept: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "notes.txt")); err != nil {
		t.Fatalf("a file that is not a backup was touched: %v", err)
	}
}

// A backup that cannot be read, or that does not verify once written,
// counts as a failure and leaves nothing in the directory.
func TestFailuresLeaveNothing(t *testing.T) {
	good := exportOf(t, newState(7, 3))
	for name, src := range map[string]backup.Source{
		"source error": func(context.Context, io.Writer) error { return errors.New("no leader") },
		"corrupt export": func(_ context.Context, w io.Writer) error {
			b := bytes.Clone(good)
			b[12] ^= 1
			_, err := w.Write(b)
			return err
		},
		"truncated export": func(_ context.Context, w io.Writer) error {
			_, err := w.Write(good[:len(good)-3])
			return err
		},
		"no applied index": func(_ context.Context, w io.Writer) error {
			_, err := state.Export(w, memState{"u:a": "b"})
			return err
		},
	} {
		t.Run(name, func(t *testing.T) {
			for _, key := range []*backup.Key{nil, mustKey(t, testKey)} {
				dir := t.TempDir()
				reg := prometheus.NewRegistry()
				s, err := backup.Start(backup.Config{Dir: dir, Every: time.Hour, Key: key, Logger: quiet, Metrics: reg,
					Source: src, Leading: func() bool { return false }})
				if err != nil {
					t.Fatal(err)
				}
				_, err = s.Backup(context.Background())
				s.Close()
				if err == nil {
					t.Fatal("backup succeeded")
				}
				if gauge(t, reg, "relay_backup_failures_total") != 1 || gauge(t, reg, "relay_backups_total") != 0 ||
					gauge(t, reg, "relay_backup_last_success_timestamp_seconds") != 0 {
					t.Fatal("metrics do not show one failure")
				}
				if ents, _ := os.ReadDir(dir); len(ents) != 0 {
					t.Fatalf("failed backup left %v", ents)
				}
			}
		})
	}
}

// With a key, backups are age files that only that key opens; a wrong
// key, no key, a modified or a truncated file each fail with their own
// error, before any state is handed out.
func TestEncryptedBackups(t *testing.T) {
	dir := t.TempDir()
	key := mustKey(t, testKey)
	st := newState(99, 20)
	res := backupOnce(t, dir, key, quiet, st)
	if !res.File.Encrypted || !strings.HasSuffix(res.File.Path, ".bin.age") {
		t.Fatalf("encrypted backup named %s", res.File.Path)
	}
	raw, err := os.ReadFile(res.File.Path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(raw, []byte("age-encryption.org/v1\n")) || bytes.Contains(raw, []byte("user0001")) || bytes.Contains(raw, []byte("RLYSTAT1")) {
		t.Fatal("the file is not an age file, or shows plaintext")
	}
	info, err := backup.VerifyFile(res.File.Path, key)
	if err != nil {
		t.Fatal(err)
	}
	if !info.Encrypted || info.AppliedIndex != 99 || info.Records != 21 || info.Size != int64(len(raw)) {
		t.Fatalf("info %+v", info)
	}
	// The restore path reads the same plaintext the state exported.
	rc, err := backup.OpenFile(res.File.Path, key)
	if err != nil {
		t.Fatal(err)
	}
	plain, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(plain, exportOf(t, st)) {
		t.Fatalf("decrypted backup differs from the export (err %v)", err)
	}

	check := func(name string, data []byte, k *backup.Key, want error) {
		t.Helper()
		_, err := backup.Verify(bytes.NewReader(data), k)
		if !errors.Is(err, want) {
			t.Errorf("%s: err %v, want %v", name, err, want)
		}
	}
	check("no key", raw, nil, backup.ErrKeyRequired)
	// The error names neither relayd's flag nor relayctl's (each binary
	// adds its own where it reports it), and says which file.
	path := filepath.Join(t.TempDir(), "b.bin.age")
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	for name, open := range map[string]func() error{
		"VerifyFile": func() error { _, err := backup.VerifyFile(path, nil); return err },
		"OpenFile": func() error {
			rc, err := backup.OpenFile(path, nil)
			if err == nil {
				rc.Close()
			}
			return err
		},
	} {
		err := open()
		if !errors.Is(err, backup.ErrKeyRequired) {
			t.Fatalf("%s without a key: %v, want ErrKeyRequired", name, err)
		}
		msg := err.Error()
		if rest := strings.ReplaceAll(msg, path, ""); rest == msg || strings.Contains(rest, "--") || strings.Contains(rest, "RELAY") {
			t.Errorf("%s without a key: %q names a binary's flag, or not the file", name, msg)
		}
	}
	check("wrong key", raw, mustKey(t, otherKey), backup.ErrWrongKey)
	tampered := bytes.Clone(raw)
	tampered[len(tampered)-20] ^= 0x40
	check("payload modified", tampered, key, backup.ErrTampered)
	check("truncated", raw[:len(raw)-17], key, backup.ErrTampered)
	hdr := bytes.Clone(raw)
	hdr[bytes.Index(hdr, []byte("\n---"))+5] ^= 1 // a byte of the header MAC
	check("header MAC modified", hdr, key, backup.ErrTampered)
	check("not a backup", []byte("hello world, not a backup at all"), key, backup.ErrNotBackup)

	// A plaintext backup verifies without a key, and its own checksum
	// catches corruption.
	plainExport := exportOf(t, st)
	check("plaintext, no key", plainExport, nil, nil)
	bad := bytes.Clone(plainExport)
	bad[len(bad)/2] ^= 1
	check("plaintext corrupted", bad, nil, state.ErrCorrupt)
}

// Each scheduled backup's log line carries the SHA-256 of its plaintext,
// the one verifying the file gives: encryption does not tell who wrote a
// file (anyone with the recipient can), so comparing the two is how an
// operator tells a backup this cluster wrote from one put in its place.
func TestTheLogNamesEachBackupsDigest(t *testing.T) {
	key := mustKey(t, testKey)
	st := newState(7, 3)
	rec := clustertest.NewLogRecorder()
	res := backupOnce(t, t.TempDir(), key, slog.New(rec), st)
	info, err := backup.VerifyFile(res.File.Path, key)
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("%x", info.PlainSHA256)
	logged := rec.Find("wrote a verified backup", nil)
	if len(logged) != 1 || logged[0].Attrs["sha256"].String() != want || logged[0].Attrs["file"].String() != res.File.Path {
		t.Fatalf("backup log %+v, want file %s with sha256 %s", logged, res.File.Path, want)
	}
}

// Where a key is configured, a plaintext backup is refused: its CRC-32C
// is no authentication, and anyone who can write where the backups are
// kept could have made it (with their own admin hash, signing and CA
// keys). It is read only when the caller allows it (AllowPlaintext: an
// operator restoring an export they made without a key), and a file
// named .age that is not encrypted says so.
func TestAKeyRefusesAPlaintextBackup(t *testing.T) {
	key := mustKey(t, testKey)
	plainExport := exportOf(t, newState(99, 20))
	if _, err := backup.Verify(bytes.NewReader(plainExport), key); !errors.Is(err, backup.ErrPlaintext) {
		t.Fatalf("plaintext verified with a key: %v, want ErrPlaintext", err)
	}
	if _, _, err := backup.Open(bytes.NewReader(plainExport), key); !errors.Is(err, backup.ErrPlaintext) {
		t.Fatalf("plaintext opened with a key: %v, want ErrPlaintext", err)
	}
	if info, err := backup.Verify(bytes.NewReader(plainExport), key, backup.AllowPlaintext(true)); err != nil || info.Encrypted || info.AppliedIndex != 99 {
		t.Fatalf("plaintext allowed, key given: %+v, %v", info, err)
	}
	if _, err := backup.Verify(bytes.NewReader(plainExport), key, backup.AllowPlaintext(false)); !errors.Is(err, backup.ErrPlaintext) {
		t.Fatalf("AllowPlaintext(false): %v, want ErrPlaintext", err)
	}

	dir := t.TempDir()
	for _, name := range []string{"relay-backup.bin", "relay-backup.bin.age"} {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, plainExport, 0o600); err != nil {
			t.Fatal(err)
		}
		for what, open := range map[string]func(...backup.ReadOption) error{
			"VerifyFile": func(opts ...backup.ReadOption) error { _, err := backup.VerifyFile(path, key, opts...); return err },
			"OpenFile": func(opts ...backup.ReadOption) error {
				rc, err := backup.OpenFile(path, key, opts...)
				if err == nil {
					rc.Close()
				}
				return err
			},
		} {
			err := open()
			if !errors.Is(err, backup.ErrPlaintext) {
				t.Fatalf("%s %s with a key: %v, want ErrPlaintext", what, name, err)
			}
			if says := strings.Contains(err.Error(), "NOT encrypted"); says != backup.NamedEncrypted(path) {
				t.Errorf("%s %s: %q; want it to say it is not encrypted exactly when named .age", what, name, err)
			}
			if err := open(backup.AllowPlaintext(true)); err != nil {
				t.Errorf("%s %s allowed: %v", what, name, err)
			}
		}
	}
}

func TestKeys(t *testing.T) {
	k, secret, err := backup.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	again, err := backup.ParseKey(secret)
	if err != nil || again.Recipient() != k.Recipient() || !strings.HasPrefix(k.Recipient(), "age1") {
		t.Fatalf("round trip of a generated key: %v %q %q", err, again.Recipient(), k.Recipient())
	}
	for _, bad := range []string{"", "# only a comment\n", "AGE-SECRET-KEY-1NOTAKEY", testKey + "\n" + otherKey + "\n"} {
		if _, err := backup.ParseKey(bad); err == nil {
			t.Errorf("ParseKey(%q) accepted", bad)
		}
	}
	dir := t.TempDir()
	p := filepath.Join(dir, "key")
	if err := os.WriteFile(p, []byte(testKey+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := backup.LoadKey(p); err == nil || !strings.Contains(err.Error(), "chmod o-rwx") {
		t.Fatalf("world-readable key file: %v", err)
	}
	if err := os.Chmod(p, 0o640); err != nil {
		t.Fatal(err)
	}
	if k, err := backup.LoadKey(p); err != nil || k.Recipient() != mustKey(t, testKey).Recipient() {
		t.Fatalf("load key: %v", err)
	}
}

func TestConfigErrors(t *testing.T) {
	src := func(context.Context, io.Writer) error { return nil }
	lead := func() bool { return false }
	for name, cfg := range map[string]backup.Config{
		"no dir":      {Every: time.Hour, Source: src, Leading: lead},
		"no interval": {Dir: t.TempDir(), Source: src, Leading: lead},
		"no source":   {Dir: t.TempDir(), Every: time.Hour, Leading: lead},
	} {
		if _, err := backup.Start(cfg); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// Close cancels a backup in progress: its temporary file goes, and a
// backup cut short by a stopping node is not counted as a failure.
func TestCloseCancelsBackupInProgress(t *testing.T) {
	dir := t.TempDir()
	reg := prometheus.NewRegistry()
	started := make(chan struct{})
	s, err := backup.Start(backup.Config{Dir: dir, Every: time.Hour, Logger: quiet, Metrics: reg,
		Source: func(ctx context.Context, w io.Writer) error {
			_, _ = w.Write([]byte("RLYSTAT1 partial"))
			close(started)
			<-ctx.Done()
			return ctx.Err()
		},
		Leading: func() bool { return true }})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-started:
	case <-time.After(30 * time.Second):
		t.Fatal("the schedule did not start a backup")
	}
	s.Close()
	if n := gauge(t, reg, "relay_backup_failures_total"); n != 0 {
		t.Fatalf("%v failures counted for a cancelled backup", n)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("a cancelled backup left %v", ents)
	}
}

// A backup whose context ends once its export is written stops in the
// read-back, which reads the whole file again: a node that stops does not
// wait for it. Nothing is left, and the backup is not renamed into place.
func TestWriteFileStopsItsReadBackWithItsContext(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "b.relaybackup")
	export := exportOf(t, newState(7, 100))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	_, err := backup.WriteFile(ctx, path, nil, func(w io.Writer) error {
		_, err := w.Write(export)
		cancel() // the node stops while the file is read back
		return err
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("WriteFile: %v, want the context's cancellation", err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("a backup stopped in its read-back left %v", ents)
	}
	// The same export with a live context is written and verified.
	info, err := backup.WriteFile(context.Background(), path, nil, func(w io.Writer) error {
		_, err := w.Write(export)
		return err
	})
	if err != nil || info.AppliedIndex != 7 {
		t.Fatalf("WriteFile: %+v, %v", info, err)
	}
}

// A node whose clock was a day ahead (then stepped back by NTP) named its
// backups in the future. Started again, it does not take them for fresh:
// the schedule writes a backup at once rather than once the clock passes
// their names, the last-success metric is not in the future (which would
// keep RelayBackupStale, a max over the job, quiet), and pruning removes
// the future-named ones, which hold older state, before the backup just
// written, whose name is earlier.
func TestAClockSteppedBackKeepsTheNewestBackup(t *testing.T) {
	dir := t.TempDir()
	real := time.Now()
	var now atomic.Pointer[time.Time]
	ahead := real.Add(24 * time.Hour)
	now.Store(&ahead)
	var index atomic.Uint64
	index.Store(100)
	var leading atomic.Bool
	cfg := backup.Config{Dir: dir, Every: time.Hour, Keep: 2, CheckEvery: 5 * time.Millisecond, Logger: quiet,
		Source: func(_ context.Context, w io.Writer) error {
			_, err := state.Export(w, newState(index.Load(), 3))
			return err
		},
		Leading: leading.Load, Now: func() time.Time { return *now.Load() }}
	s, err := backup.Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		at := ahead.Add(time.Duration(i) * time.Minute)
		now.Store(&at)
		if _, err := s.Backup(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()

	now.Store(&real) // NTP steps the clock back; the state moves on
	index.Store(200)
	leading.Store(true)
	reg := prometheus.NewRegistry()
	cfg.Metrics = reg
	s, err = backup.Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got := gauge(t, reg, "relay_backup_last_success_timestamp_seconds"); got > float64(real.Unix()+1) {
		t.Fatalf("last success reported %.0f s in the future", got-float64(real.Unix()))
	}
	clustertest.Eventually(t, 30*time.Second, func() error {
		files, err := backup.List(dir)
		if err != nil {
			return err
		}
		var indexes []uint64
		for _, f := range files {
			info, err := backup.VerifyFile(f.Path, nil)
			if err != nil {
				return err
			}
			indexes = append(indexes, info.AppliedIndex)
		}
		if !slices.Contains(indexes, 200) || len(indexes) != 2 {
			return fmt.Errorf("backups of applied indexes %v, want the new one (200) kept beside one older", indexes)
		}
		return nil
	})

	// The same with the clock stepped back while the schedule runs.
	s.Close()
	cfg.Dir, cfg.Metrics = t.TempDir(), nil
	now.Store(&ahead)
	leading.Store(false)
	index.Store(300)
	s, err = backup.Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Backup(t.Context()); err != nil {
		t.Fatal(err)
	}
	index.Store(400)
	now.Store(&real)
	leading.Store(true)
	clustertest.Eventually(t, 30*time.Second, func() error {
		files, err := backup.List(cfg.Dir)
		if err != nil {
			return err
		}
		for _, f := range files {
			if info, err := backup.VerifyFile(f.Path, nil); err == nil && info.AppliedIndex == 400 {
				return nil
			}
		}
		return fmt.Errorf("no scheduled backup since the clock stepped back (%d files)", len(files))
	})
}

// A backup verifies only if a restore would take it: one of a state
// format a newer release wrote fails verification as it would fail the
// restore, not after the operator relied on it.
func TestVerifyRefusesWhatRestoreWould(t *testing.T) {
	m := newState(7, 2)
	var format [8]byte
	binary.BigEndian.PutUint64(format[:], fsm.StateFormat+1)
	m["m:format"] = string(format[:])
	if _, err := backup.Verify(bytes.NewReader(exportOf(t, m)), nil); !errors.Is(err, fsm.ErrNewerFormat) {
		t.Fatalf("verify of a newer release's backup: %v, want ErrNewerFormat", err)
	}
	binary.BigEndian.PutUint64(format[:], fsm.StateFormat)
	m["m:format"] = string(format[:])
	if _, err := backup.Verify(bytes.NewReader(exportOf(t, m)), nil); err != nil {
		t.Fatalf("verify of this release's format: %v", err)
	}
}

// backupOnce writes one backup of st into dir (encrypted to key, when
// set) through a scheduler that does not run on its own, and returns it.
func backupOnce(t *testing.T, dir string, key *backup.Key, log *slog.Logger, st memState) backup.Result {
	t.Helper()
	s, err := backup.Start(backup.Config{Dir: dir, Every: time.Hour, Key: key, Logger: log,
		Source:  func(_ context.Context, w io.Writer) error { _, err := state.Export(w, st); return err },
		Leading: func() bool { return false }})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	res, err := s.Backup(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return res
}
