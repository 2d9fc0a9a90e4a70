package state

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"
	"testing/iotest"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("github.com/cockroachdb/pebble/v2/internal/cache.(*shard).releaseLoop"))
}

func open(t testing.TB) *Store {
	t.Helper()
	s, err := Open(Config{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func dump(t testing.TB, r Reader) map[string]string {
	t.Helper()
	out := map[string]string{}
	if err := r.Iterate(nil, nil, func(k, v []byte) (bool, error) {
		out[string(k)] = string(v)
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

func put(t testing.TB, s *Store, kv ...string) {
	t.Helper()
	b := s.NewBatch()
	for i := 0; i < len(kv); i += 2 {
		if err := b.Set([]byte(kv[i]), []byte(kv[i+1])); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
}

func TestStoreBasics(t *testing.T) {
	if _, err := Open(Config{}); err == nil {
		t.Fatal("opened without a dir")
	}
	dir := t.TempDir()
	s, err := Open(Config{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	put(t, s, "a:1", "one", "a:2", "", "b:1", "x")
	if _, err := s.Get([]byte("zz")); !errors.Is(err, ErrNotFound) {
		t.Fatal(err)
	}
	v, err := s.Get([]byte("a:2"))
	if err != nil || v == nil || len(v) != 0 {
		t.Fatalf("empty value: %q %v", v, err)
	}
	v, _ = s.Get([]byte("a:1"))
	v[0] = 'X'
	if again, _ := s.Get([]byte("a:1")); string(again) != "one" {
		t.Fatal("Get did not return a copy")
	}
	// Batch reads see pending writes; the store does not until commit.
	b := s.NewBatch()
	_ = b.Set([]byte("a:3"), []byte("three"))
	_ = b.Delete([]byte("a:1"))
	if v, _ := b.Get([]byte("a:3")); string(v) != "three" {
		t.Fatal("batch read")
	}
	if _, err := s.Get([]byte("a:3")); !errors.Is(err, ErrNotFound) {
		t.Fatal("uncommitted write visible")
	}
	snap := s.Snapshot()
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	if _, err := snap.Get([]byte("a:3")); !errors.Is(err, ErrNotFound) {
		t.Fatal("snapshot sees a later commit")
	}
	_ = snap.Close()
	d := s.NewBatch()
	_ = d.DeleteRange([]byte("b:"), []byte("b;"))
	_ = d.Set([]byte("c:1"), nil)
	d.Discard()
	if _, err := s.Get([]byte("b:1")); err != nil {
		t.Fatal("discarded batch applied")
	}
	// Iterate: bounds, order, early stop, error propagation.
	var keys []string
	_ = s.Iterate([]byte("a:"), []byte("a;"), func(k, _ []byte) (bool, error) {
		keys = append(keys, string(k))
		return true, nil
	})
	if fmt.Sprint(keys) != "[a:2 a:3]" {
		t.Fatalf("keys %v", keys)
	}
	n := 0
	_ = s.Iterate(nil, nil, func(_, _ []byte) (bool, error) { n++; return false, nil })
	if n != 1 {
		t.Fatal("early stop")
	}
	boom := errors.New("boom")
	if err := s.Iterate(nil, nil, func(_, _ []byte) (bool, error) { return false, boom }); !errors.Is(err, boom) {
		t.Fatal(err)
	}
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	before := dump(t, s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(Config{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if fmt.Sprint(dump(t, s2)) != fmt.Sprint(before) {
		t.Fatal("reopen lost data")
	}
}

func export(t testing.TB, s *Store) []byte {
	t.Helper()
	snap := s.Snapshot()
	defer snap.Close()
	var b bytes.Buffer
	if _, err := Export(&b, snap); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func TestExportImport(t *testing.T) {
	src := open(t)
	kv := []string{"a:\x00bin\xff", "\x00\x01\x02", "a:empty", ""}
	big := bytes.Repeat([]byte("v"), 1<<20)
	for i := 0; i < 500; i++ {
		kv = append(kv, fmt.Sprintf("k:%04d", i), fmt.Sprint("value ", i))
	}
	put(t, src, kv...)
	put(t, src, "z:big", string(big))
	data := export(t, src)

	dst := open(t)
	put(t, dst, "q:stale", "gone after import")
	n, err := dst.Import(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	if n != 503 {
		t.Fatalf("imported %d records", n)
	}
	if fmt.Sprint(dump(t, dst)) != fmt.Sprint(dump(t, src)) {
		t.Fatal("import differs from the source")
	}
	if !bytes.Equal(export(t, dst), data) {
		t.Fatal("re-export differs")
	}
	empty := export(t, open(t))
	if n, err := open(t).Import(bytes.NewReader(empty)); err != nil || n != 0 {
		t.Fatal(n, err)
	}
}

// cancelOnWrite cancels its context at its first write and counts writes.
type cancelOnWrite struct {
	cancel context.CancelFunc
	writes int
}

func (w *cancelOnWrite) Write(p []byte) (int, error) {
	w.writes++
	w.cancel()
	return len(p), nil
}

// An export whose context ends stops at the next record with the
// context's error: nothing more reaches the writer.
func TestExportStopsWhenItsContextEnds(t *testing.T) {
	src := open(t)
	value := string(bytes.Repeat([]byte("v"), 1<<10))
	for i := 0; i < 1000; i++ { // 1 MiB: several of the export's buffers
		put(t, src, fmt.Sprintf("k:%04d", i), value)
	}
	snap := src.Snapshot()
	defer snap.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w := &cancelOnWrite{cancel: cancel}
	if _, err := ExportContext(ctx, w, snap); !errors.Is(err, context.Canceled) {
		t.Fatalf("export whose context ended: %v", err)
	}
	if w.writes != 1 {
		t.Fatalf("%d writes, want only the one during which the context ended", w.writes)
	}
}

// Any damage to an export is refused and leaves the target untouched.
func TestImportRefusesCorruptExports(t *testing.T) {
	src := open(t)
	put(t, src, "a:1", "one", "a:2", "two", "b:1", "three")
	data := export(t, src)
	dst := open(t)
	put(t, dst, "x:keep", "me")
	want := fmt.Sprint(dump(t, dst))
	check := func(name string, b []byte) {
		t.Helper()
		if _, err := dst.Import(bytes.NewReader(b)); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("%s: got %v, want ErrCorrupt", name, err)
		}
		if fmt.Sprint(dump(t, dst)) != want {
			t.Fatalf("%s: the store changed", name)
		}
	}
	for i := 0; i < len(data); i++ {
		check(fmt.Sprintf("truncated at %d", i), data[:i])
		flipped := bytes.Clone(data)
		flipped[i] ^= 0x40
		check(fmt.Sprintf("byte %d flipped", i), flipped)
	}
	check("trailing bytes", append(bytes.Clone(data), 0))
	check("bad magic", append([]byte("NOTSTATE"), data[8:]...))
	check("huge key length", append([]byte(exportMagic), 0xff, 0xff, 0xff, 0xff, 0x0f))
	// Out-of-order keys with a valid checksum.
	var b bytes.Buffer
	if _, err := Export(&b, fakeReader{{"b", "1"}, {"a", "2"}}); err != nil {
		t.Fatal(err)
	}
	check("keys out of order", b.Bytes())
	b.Reset()
	_, _ = Export(&b, fakeReader{{"\xffbad", "1"}})
	if _, err := dst.Import(bytes.NewReader(b.Bytes())); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("key outside the key space: %v", err)
	}
}

// A read error is not damage: one that falls on the checksum, as
// anywhere else, comes back as itself, not as ErrCorrupt. A record the
// caller's check refuses fails the import with nothing ingested; Clear
// empties the store.
func TestImportErrorsKeepTheirType(t *testing.T) {
	src := open(t)
	put(t, src, "a:1", "one", "a:2", "two")
	data := export(t, src)
	dst := open(t)
	put(t, dst, "x:keep", "me")
	want := fmt.Sprint(dump(t, dst))
	eio := errors.New("input/output error")
	for _, at := range []int{len(data) - 4, len(data) - 1, 10} {
		r := io.MultiReader(bytes.NewReader(data[:at]), iotest.ErrReader(eio))
		if _, err := dst.Import(r); !errors.Is(err, eio) || errors.Is(err, ErrCorrupt) {
			t.Fatalf("a read error at byte %d of %d: %v", at, len(data), err)
		}
	}
	refused := errors.New("not this one")
	_, err := dst.ImportChecked(bytes.NewReader(data), func(k, _ []byte) error {
		if string(k) == "a:2" {
			return refused
		}
		return nil
	})
	if !errors.Is(err, refused) {
		t.Fatalf("a refused record: %v", err)
	}
	if fmt.Sprint(dump(t, dst)) != want {
		t.Fatal("a failed import changed the store")
	}
	if err := dst.Clear(); err != nil {
		t.Fatal(err)
	}
	if got := dump(t, dst); len(got) != 0 {
		t.Fatalf("after Clear: %v", got)
	}
}

// fakeReader is a Reader over fixed pairs, in the given order.
type fakeReader [][2]string

func (f fakeReader) Get([]byte) ([]byte, error) { return nil, ErrNotFound }
func (f fakeReader) Iterate(_, _ []byte, fn func(k, v []byte) (bool, error)) error {
	for _, kv := range f {
		if more, err := fn([]byte(kv[0]), []byte(kv[1])); err != nil || !more {
			return err
		}
	}
	return nil
}

func FuzzDecoder(f *testing.F) {
	var valid, empty bytes.Buffer
	_, _ = Export(&valid, fakeReader{{"a:1", "one"}, {"a:2", ""}, {"b", "\x00\xff"}})
	_, _ = Export(&empty, fakeReader{})
	f.Add(valid.Bytes())
	f.Add(empty.Bytes())
	f.Add(valid.Bytes()[:10])
	f.Add([]byte("RLYSTAT1\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"))
	f.Fuzz(func(t *testing.T, data []byte) {
		dec := NewDecoder(bytes.NewReader(data))
		var got fakeReader
		for {
			k, v, err := dec.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return
			}
			got = append(got, [2]string{string(k), string(v)})
		}
		// Accepted input is exactly what Export writes for its records.
		var again bytes.Buffer
		if _, err := Export(&again, got); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(again.Bytes(), data) {
			t.Fatalf("accepted %x but it re-encodes as %x", data, again.Bytes())
		}
	})
}

func BenchmarkExportImport(b *testing.B) {
	s := open(b)
	bt := s.NewBatch()
	for i := 0; i < 100_000; i++ {
		_ = bt.Set([]byte(fmt.Sprintf("k:%08d", i)), bytes.Repeat([]byte{byte(i)}, 90))
	}
	_ = bt.Commit()
	data := export(b, s)
	dst := open(b)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		_ = export(b, s)
		if _, err := dst.Import(bytes.NewReader(data)); err != nil {
			b.Fatal(err)
		}
	}
}

// A record length is read from the export, which may be hostile: a short
// file claiming a MaxValueLen value is refused as truncated without the
// decoder allocating anything near that length first.
func TestDecoderDoesNotTrustLengths(t *testing.T) {
	in := []byte(exportMagic)
	in = binary.AppendUvarint(in, 1)
	in = append(in, 'k')
	in = binary.AppendUvarint(in, MaxValueLen)
	in = append(in, "only a few bytes"...)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, _, err := NewDecoder(bytes.NewReader(in)).Next()
	runtime.ReadMemStats(&after)
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("err = %v, want ErrCorrupt", err)
	}
	if got := after.TotalAlloc - before.TotalAlloc; got > 4<<20 {
		t.Fatalf("decoding a %d-byte export allocated %d bytes", len(in), got)
	}
}

// A store opened read-only reads what the last writer left, its log
// included, refuses writes, and leaves the directory as it found it: it
// may be a stopped node's last copy of the state.
func TestAReadOnlyStoreReadsAndChangesNothing(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(Config{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	b := s.NewBatch()
	if err := b.Set([]byte("k"), []byte("v")); err != nil {
		t.Fatal(err)
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	before := listing(t, dir)
	ro, err := Open(Config{Dir: dir, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if v, err := ro.Get([]byte("k")); err != nil || string(v) != "v" {
		t.Fatalf("read-only Get: %q, %v", v, err)
	}
	w := ro.NewBatch()
	_ = w.Set([]byte("k2"), []byte("v2"))
	if err := w.Commit(); err == nil {
		t.Fatal("a read-only store took a write")
	}
	if err := ro.Close(); err != nil {
		t.Fatal(err)
	}
	if after := listing(t, dir); !maps.Equal(before, after) {
		t.Fatalf("the directory changed under a read-only store:\nbefore %v\nafter  %v", before, after)
	}
}

// listing maps each file in dir to its size.
func listing(t *testing.T, dir string) map[string]int64 {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int64{}
	for _, e := range entries {
		fi, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = fi.Size()
	}
	return out
}

// A Scan keeps no iterator open while its fn runs: memtables flushed
// meanwhile are freed at once, not kept for it (Pebble counts a flushed
// memtable still referenced as a zombie; Iterate's fn, run with its
// iterator open, keeps one). Across its read-aheads it yields exactly the
// snapshot's records in order, whatever is written meanwhile, and it
// stops when fn says so.
func TestAScanPinsNoMemtable(t *testing.T) {
	s := open(t)
	var kv []string
	want := map[string]string{}
	for i := range 600 {
		k, v := fmt.Sprintf("k%04d", i), fmt.Sprintf("v%d", i)
		if i%100 == 7 {
			v = strings.Repeat(v, 100<<10) // some records of several hundred KiB: read-aheads end by bytes too
		}
		kv = append(kv, k, v)
		want[k] = v
	}
	put(t, s, kv...)
	snap := s.Snapshot()
	defer snap.Close()
	// Pebble keeps the last flushed memtable for reuse, counted as a
	// zombie: what a scan pins comes on top of it.
	if err := s.db.Flush(); err != nil {
		t.Fatal(err)
	}
	base := s.PebbleMetrics().MemTable.ZombieCount
	zombies := func() int64 { return s.PebbleMetrics().MemTable.ZombieCount - base }
	// fn writes and flushes now and then, and reports the zombies it saw.
	run := func(scan func([]byte, []byte, func(k, v []byte) (bool, error)) error) (map[string]string, []string, int64) {
		got := map[string]string{}
		var order []string
		var most int64
		err := scan([]byte("k"), []byte("l"), func(k, v []byte) (bool, error) {
			got[string(k)] = string(v)
			order = append(order, string(k))
			if len(order)%50 == 1 {
				put(t, s, fmt.Sprintf("k%04d-later", len(order)), "written during the scan")
				if err := s.db.Flush(); err != nil {
					return false, err
				}
				most = max(most, zombies())
			}
			return true, nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return got, order, most
	}
	if _, _, pinned := run(snap.Iterate); pinned == 0 {
		t.Fatal("Iterate's fn saw no zombie memtable: this test cannot tell a pinning scan")
	}
	got, order, pinned := run(snap.Scan)
	if pinned != 0 {
		t.Fatalf("Scan's fn saw %d zombie memtables: an iterator was open while it ran", pinned)
	}
	if !maps.Equal(got, want) || !slices.IsSorted(order) || len(order) != len(want) {
		t.Fatalf("Scan yielded %d records (sorted: %v), want the snapshot's %d", len(order), slices.IsSorted(order), len(want))
	}
	var seen int
	if err := snap.Scan(nil, nil, func(k, v []byte) (bool, error) {
		seen++
		return seen < 300, nil
	}); err != nil || seen != 300 {
		t.Fatalf("a Scan stopped by fn at 300 records went on to %d (%v)", seen, err)
	}
	boom := errors.New("boom")
	if err := snap.Scan(nil, nil, func(k, v []byte) (bool, error) { return true, boom }); !errors.Is(err, boom) {
		t.Fatalf("fn's error: %v", err)
	}
}
