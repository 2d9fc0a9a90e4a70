package state

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"
)

// importDirs lists the temporary import directories in the store's directory.
func importDirs(t testing.TB, s *Store) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(s.dir, importDirPrefix+"*"))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// fill writes n records "k:<i>" for i = first, first+step, ... with values
// that name gen, and returns the store's export.
func fill(t testing.TB, s *Store, gen string, first, step, n int) []byte {
	t.Helper()
	b := s.NewBatch()
	for i := range n {
		k := fmt.Sprintf("k:%06d", first+i*step)
		if err := b.Set([]byte(k), []byte(gen+" "+k+" "+string(bytes.Repeat([]byte{'.'}, 80)))); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	return export(t, s)
}

// oldAndNew returns a store holding an "old" state, which imports into it
// split into many small tables, and the export of a different "new" state
// that shares none of its records.
func oldAndNew(t testing.TB) (dst *Store, oldState, newState []byte) {
	t.Helper()
	newState = fill(t, open(t), "new", 1, 2, 4000)
	dst = open(t)
	dst.importTableBytes = 8 << 10
	oldState = fill(t, dst, "old", 0, 3, 3000)
	return dst, oldState, newState
}

func tablesIngested(s *Store) uint64 {
	m := s.db.Metrics()
	return m.Total().TablesIngested
}

// An export spread over many tables is refused as a whole when its damage
// shows only after some tables are written, and the store is left byte for
// byte as it was, with no temporary files.
func TestImportIsAtomicAcrossTables(t *testing.T) {
	dst, before, data := oldAndNew(t)

	var reordered bytes.Buffer
	recs := make(fakeReader, 0, 3000)
	for i := range 3000 {
		recs = append(recs, [2]string{fmt.Sprintf("k:%06d", i), "v"})
	}
	recs[2000], recs[2001] = recs[2001], recs[2000]
	if _, err := Export(&reordered, recs); err != nil {
		t.Fatal(err)
	}
	var outside bytes.Buffer
	if _, err := Export(&outside, append(recs[:1000:1000], [2]string{"\xff", "v"})); err != nil {
		t.Fatal(err)
	}
	badSum := bytes.Clone(data)
	badSum[len(badSum)-1] ^= 1
	badCount := bytes.Clone(data)
	badCount[len(badCount)-5]++
	for _, tc := range []struct {
		name string
		in   []byte
	}{
		{"bad checksum", badSum},
		{"bad record count", badCount},
		{"truncated before checksum", data[:len(data)-1]},
		{"truncated in the middle", data[:len(data)/2]},
		{"keys out of order in the middle", reordered.Bytes()},
		{"key outside the key space at the end", outside.Bytes()},
	} {
		if _, err := dst.Import(bytes.NewReader(tc.in)); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("%s: got %v, want ErrCorrupt", tc.name, err)
		}
		if !bytes.Equal(export(t, dst), before) {
			t.Fatalf("%s: the store changed", tc.name)
		}
		if left := importDirs(t, dst); len(left) > 0 {
			t.Fatalf("%s: left %v behind", tc.name, left)
		}
	}
	if n := tablesIngested(dst); n != 0 {
		t.Fatalf("%d tables ingested by refused imports", n)
	}

	n, err := dst.Import(bytes.NewReader(data))
	if err != nil || n != 4000 {
		t.Fatalf("import: %d records, %v", n, err)
	}
	if !bytes.Equal(export(t, dst), data) {
		t.Fatal("the store differs from the export")
	}
	if got := tablesIngested(dst); got < 5 {
		t.Fatalf("the import was written as %d tables; the test means to cover many", got)
	}
	if left := importDirs(t, dst); len(left) > 0 {
		t.Fatalf("left %v behind", left)
	}
}

// Readers during an import see the whole old state or the whole new one,
// and a snapshot or iteration begun before it keeps seeing the old state.
func TestImportReadersSeeOldOrNew(t *testing.T) {
	dst, oldState, newState := oldAndNew(t)

	held := dst.Snapshot()
	defer held.Close()

	// An iteration that pauses after its first key until the imports are
	// done, then reads the rest.
	pausedAt := make(chan struct{})
	resume := make(chan struct{})
	paused := make(chan []byte, 1)
	go func() {
		var seen fakeReader
		first := true
		err := dst.Iterate(nil, nil, func(k, v []byte) (bool, error) {
			seen = append(seen, [2]string{string(k), string(v)})
			if first {
				first = false
				close(pausedAt)
				<-resume
			}
			return true, nil
		})
		var b bytes.Buffer
		if err == nil {
			_, err = Export(&b, seen)
		}
		if err != nil {
			t.Error(err)
		}
		paused <- b.Bytes()
	}()
	<-pausedAt

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex // guards views
	views := map[string]int{}
	for range 2 {
		wg.Go(func() {
			for done := false; !done; {
				select {
				case <-stop:
					done = true // one more look after the imports
				default:
				}
				snap := dst.Snapshot()
				var viaSnap, viaStore bytes.Buffer
				_, err1 := Export(&viaSnap, snap)
				_ = snap.Close()
				_, err2 := Export(&viaStore, dst)
				if err := errors.Join(err1, err2); err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				for _, v := range [][]byte{viaSnap.Bytes(), viaStore.Bytes()} {
					switch {
					case bytes.Equal(v, oldState):
						views["old"]++
					case bytes.Equal(v, newState):
						views["new"]++
					default:
						views["other"]++
					}
				}
				mu.Unlock()
			}
		})
	}
	for range 3 {
		if _, err := dst.Import(bytes.NewReader(newState)); err != nil {
			t.Fatal(err)
		}
		if _, err := dst.Import(bytes.NewReader(oldState)); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	close(resume)

	t.Logf("views seen during the imports: %v", views)
	if views["other"] > 0 {
		t.Fatalf("readers saw neither the old nor the new state %d times", views["other"])
	}
	var viaHeld bytes.Buffer
	if _, err := Export(&viaHeld, held); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(viaHeld.Bytes(), oldState) {
		t.Fatal("a snapshot taken before the imports changed")
	}
	if !bytes.Equal(<-paused, oldState) {
		t.Fatal("an iteration begun before the imports did not finish on the old state")
	}

	// An empty export clears the store, in one step too.
	held2 := dst.Snapshot()
	defer held2.Close()
	emptyState := export(t, open(t))
	if n, err := dst.Import(bytes.NewReader(emptyState)); err != nil || n != 0 {
		t.Fatalf("empty import: %d records, %v", n, err)
	}
	if !bytes.Equal(export(t, dst), emptyState) {
		t.Fatal("an empty export did not clear the store")
	}
	viaHeld.Reset()
	if _, err := Export(&viaHeld, held2); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(viaHeld.Bytes(), oldState) {
		t.Fatal("a snapshot taken before the empty import changed")
	}
}

// genReader is a Reader over n records made up as they are read, so that
// an export of any size can be streamed without existing anywhere whole.
type genReader struct {
	n, valueLen int
}

func (g genReader) Get([]byte) ([]byte, error) { return nil, ErrNotFound }

func (g genReader) Iterate(_, _ []byte, fn func(k, v []byte) (bool, error)) error {
	key := make([]byte, 0, 16)
	value := make([]byte, g.valueLen)
	x := uint64(0x9e3779b97f4a7c15)
	for i := range g.n {
		key = fmt.Appendf(key[:0], "m:%010d", i)
		// Half random, half zeros: compresses like real values do, somewhat.
		for j := 0; j+8 <= len(value)/2; j += 8 {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			binary.LittleEndian.PutUint64(value[j:], x)
		}
		if more, err := fn(key, value); err != nil || !more {
			return err
		}
	}
	return nil
}

// importGenerated imports an export of n generated records into s and
// returns the peak growth of the Go heap in use while it ran.
func importGenerated(t testing.TB, s *Store, n, valueLen int) (peak uint64) {
	t.Helper()
	pr, pw := io.Pipe()
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() {
		_, err := Export(pw, genReader{n: n, valueLen: valueLen})
		_ = pw.CloseWithError(err)
	})
	defer pr.Close() // unblocks the writer if the import stops early

	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base := ms.HeapInuse
	stop := make(chan struct{})
	wg.Go(func() {
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > base {
				peak = max(peak, ms.HeapInuse-base)
			}
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	})
	got, err := s.Import(pr)
	close(stop)
	if err != nil {
		t.Fatal(err)
	}
	if got != uint64(n) {
		t.Fatalf("imported %d records, want %d", got, n)
	}
	return peak
}

// The import streams: memory does not grow with the export. (A single
// batch held all of it, and failed outright at 4 GiB.)
func TestImportMemoryIsBounded(t *testing.T) {
	const n, valueLen = 64 << 10, 1 << 10 // a 64 MiB export
	s := open(t)
	put(t, s, "x:old", "gone after the import")
	peak := importGenerated(t, s, n, valueLen)
	t.Logf("importing a %d MiB export grew the heap in use by at most %.1f MiB", n*valueLen>>20, float64(peak)/(1<<20))
	if peak > 16<<20 {
		t.Fatalf("the heap grew by %d bytes importing a %d-byte export", peak, n*valueLen)
	}
	var count int
	var last string
	if err := s.Iterate(nil, nil, func(k, _ []byte) (bool, error) {
		count++
		last = string(k)
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	if count != n || last != fmt.Sprintf("m:%010d", n-1) {
		t.Fatalf("store holds %d records, last %q", count, last)
	}
}

// A crash during an import leaves its tables behind; the next Open
// removes them.
func TestOpenRemovesInterruptedImport(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(Config{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	put(t, s, "a", "1")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(dir, importDirPrefix+"123")
	if err := os.Mkdir(stale, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(stale, "000000.sst"), []byte("partial"), 0o644); err != nil {
		t.Fatal(err)
	}
	s, err = Open(Config{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if left := importDirs(t, s); len(left) > 0 {
		t.Fatalf("left %v behind", left)
	}
	if v, err := s.Get([]byte("a")); err != nil || string(v) != "1" {
		t.Fatalf("data after reopen: %q %v", v, err)
	}
}

// BenchmarkImportLarge imports a 512 MiB export generated on the fly and
// reports the peak growth of the heap in use.
func BenchmarkImportLarge(b *testing.B) {
	const n, valueLen = 512 << 10, 1 << 10
	s := open(b)
	b.SetBytes(n * valueLen)
	var peak uint64
	for b.Loop() {
		peak = max(peak, importGenerated(b, s, n, valueLen))
	}
	b.ReportMetric(float64(peak)/(1<<20), "peak-heap-MiB")
}
