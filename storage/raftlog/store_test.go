package raftlog

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/hashicorp/raft"
)

// testLog builds a deterministic entry for index i that uses every field.
func testLog(i uint64) *raft.Log {
	l := &raft.Log{
		Index:      i,
		Term:       i/10 + 1,
		Type:       raft.LogType(i % 6),
		Data:       []byte(fmt.Sprintf("data-%d", i)),
		Extensions: []byte(fmt.Sprintf("ext-%d", i)),
		AppendedAt: time.Unix(1_700_000_000+int64(i), int64(i)*7919%1e9),
	}
	return l
}

func testLogs(from, to uint64) []*raft.Log {
	var out []*raft.Log
	for i := from; i <= to; i++ {
		out = append(out, testLog(i))
	}
	return out
}

func logsEqual(a, b *raft.Log) bool {
	return a.Index == b.Index && a.Term == b.Term && a.Type == b.Type &&
		bytes.Equal(a.Data, b.Data) && bytes.Equal(a.Extensions, b.Extensions) &&
		a.AppendedAt.Equal(b.AppendedAt)
}

func requireBounds(t *testing.T, s *Store, first, last uint64) {
	t.Helper()
	f, err := s.FirstIndex()
	if err != nil {
		t.Fatalf("FirstIndex: %v", err)
	}
	l, err := s.LastIndex()
	if err != nil {
		t.Fatalf("LastIndex: %v", err)
	}
	if f != first || l != last {
		t.Fatalf("bounds = %d..%d, want %d..%d", f, l, first, last)
	}
}

func requireLog(t *testing.T, s *Store, want *raft.Log) {
	t.Helper()
	var got raft.Log
	if err := s.GetLog(want.Index, &got); err != nil {
		t.Fatalf("GetLog(%d): %v", want.Index, err)
	}
	if !logsEqual(&got, want) {
		t.Fatalf("GetLog(%d) = %+v, want %+v", want.Index, got, *want)
	}
}

func requireNoLog(t *testing.T, s *Store, index uint64) {
	t.Helper()
	var got raft.Log
	// raft compares with ==, so the sentinel must not be wrapped.
	if err := s.GetLog(index, &got); err != raft.ErrLogNotFound {
		t.Fatalf("GetLog(%d) error = %v, want raft.ErrLogNotFound", index, err)
	}
}

func mustStore(t *testing.T, s *Store, logs ...*raft.Log) {
	t.Helper()
	if err := s.StoreLogs(logs); err != nil {
		t.Fatalf("StoreLogs: %v", err)
	}
}

func TestEmptyStore(t *testing.T) {
	s := openStore(t, t.TempDir())
	requireBounds(t, s, 0, 0)
	for _, i := range []uint64{0, 1, 1 << 63} {
		requireNoLog(t, s, i)
	}
	if err := s.DeleteRange(1, 100); err != nil {
		t.Fatalf("DeleteRange on empty: %v", err)
	}
	if err := s.StoreLogs(nil); err != nil {
		t.Fatalf("StoreLogs(nil): %v", err)
	}
	requireBounds(t, s, 0, 0)
	if !s.IsMonotonic() {
		t.Fatal("IsMonotonic = false")
	}
}

func TestMissingStableKeys(t *testing.T) {
	s := openStore(t, t.TempDir())
	v, err := s.Get([]byte("CurrentTerm"))
	if err != ErrKeyNotFound || v != nil {
		t.Fatalf("Get(missing) = %q, %v; want nil, ErrKeyNotFound", v, err)
	}
	// hashicorp/raft (api.go, raft.go) matches on the message text.
	if err.Error() != "not found" {
		t.Fatalf("missing-key error text = %q, raft requires %q", err.Error(), "not found")
	}
	n, err := s.GetUint64([]byte("CurrentTerm"))
	if err != ErrKeyNotFound || n != 0 {
		t.Fatalf("GetUint64(missing) = %d, %v; want 0, ErrKeyNotFound", n, err)
	}
	// raft's own check, verbatim: a fresh store has no existing state.
	has, err := raft.HasExistingState(s, s, raft.NewInmemSnapshotStore())
	if err != nil || has {
		t.Fatalf("HasExistingState = %v, %v; want false, nil", has, err)
	}
}

func TestRoundTripAllFields(t *testing.T) {
	s := openStore(t, t.TempDir())
	logs := []*raft.Log{
		{Index: 1, Term: 1, Type: raft.LogConfiguration, Data: []byte{0, 1, 2}},
		{Index: 2, Term: 1, Type: raft.LogNoop},
		{Index: 3, Term: 2, Type: raft.LogCommand, Data: bytes.Repeat([]byte{0xab}, 1<<16), Extensions: []byte("chunk:1/3")},
		{Index: 4, Term: 2, Type: raft.LogBarrier, Extensions: []byte{0xff}},
		{Index: 5, Term: 1<<64 - 1, Type: raft.LogType(200), Data: []byte("x"),
			AppendedAt: time.Date(2025, 3, 4, 5, 6, 7, 123456789, time.FixedZone("X", 3600))},
		{Index: 6, Term: 3, Type: raft.LogCommand, Data: []byte{}, Extensions: []byte{},
			AppendedAt: time.Date(1969, 12, 31, 23, 59, 59, 1, time.UTC)}, // negative Unix seconds
		{Index: 7, Term: 3, AppendedAt: time.Now()}, // carries a monotonic reading
	}
	if err := s.StoreLog(logs[0]); err != nil {
		t.Fatalf("StoreLog: %v", err)
	}
	mustStore(t, s, logs[1:]...)
	requireBounds(t, s, 1, 7)
	for _, l := range logs {
		requireLog(t, s, l)
	}

	// GetLog overwrites every field of a reused struct.
	reused := raft.Log{Index: 99, Data: []byte("stale"), Extensions: []byte("stale"), AppendedAt: time.Now()}
	if err := s.GetLog(2, &reused); err != nil {
		t.Fatal(err)
	}
	if reused.Data != nil || reused.Extensions != nil || !reused.AppendedAt.IsZero() {
		t.Fatalf("GetLog left stale fields: %+v", reused)
	}

	// Returned slices are copies: changing them changes nothing stored.
	var a raft.Log
	if err := s.GetLog(3, &a); err != nil {
		t.Fatal(err)
	}
	a.Data[0], a.Extensions[0] = 0, 0
	a.Data = append(a.Data, 1) // must not run into Extensions
	requireLog(t, s, logs[2])
	if a.Extensions[0] != 0 || string(a.Extensions[1:]) != "hunk:1/3" {
		t.Fatalf("appending to Data clobbered Extensions: %q", a.Extensions)
	}
}

func TestGetLogOutOfRange(t *testing.T) {
	s := openStore(t, t.TempDir())
	mustStore(t, s, testLogs(10, 20)...)
	requireBounds(t, s, 10, 20)
	for _, i := range []uint64{0, 1, 9, 21, 1<<64 - 1} {
		requireNoLog(t, s, i)
	}
	for i := uint64(10); i <= 20; i++ {
		requireLog(t, s, testLog(i))
	}
}

func TestStoreLogsRejectsGaps(t *testing.T) {
	s := openStore(t, t.TempDir())
	mustStore(t, s, testLogs(1, 5)...)

	cases := map[string][]*raft.Log{
		"gap after last":      {testLog(7)},
		"overlaps last":       {testLog(5)},
		"rewrites the past":   {testLog(2), testLog(3)},
		"gap inside batch":    {testLog(6), testLog(8)},
		"descending in batch": {testLog(6), testLog(5)},
		"duplicate in batch":  {testLog(6), testLog(6)},
	}
	for name, batch := range cases {
		if err := s.StoreLogs(batch); !errors.Is(err, ErrNonContiguous) {
			t.Errorf("%s: StoreLogs error = %v, want ErrNonContiguous", name, err)
		}
	}
	if err := s.StoreLogs([]*raft.Log{testLog(6), nil}); err == nil {
		t.Error("StoreLogs with nil entry succeeded")
	}
	requireBounds(t, s, 1, 5)
	requireNoLog(t, s, 6)

	empty := openStore(t, t.TempDir())
	if err := empty.StoreLog(&raft.Log{Index: 0}); !errors.Is(err, ErrNonContiguous) {
		t.Errorf("StoreLog(index 0) error = %v, want ErrNonContiguous", err)
	}
	last := &raft.Log{Index: 1<<64 - 1}
	if err := empty.StoreLogs([]*raft.Log{last, {Index: 0}}); !errors.Is(err, ErrNonContiguous) {
		t.Errorf("StoreLogs wrapping past MaxUint64 error = %v, want ErrNonContiguous", err)
	}
	// An empty log accepts any starting index (raft starts after a snapshot).
	mustStore(t, empty, testLogs(1000, 1002)...)
	requireBounds(t, empty, 1000, 1002)
}

func TestDeleteRange(t *testing.T) {
	type step struct{ min, max uint64 }
	cases := []struct {
		name        string
		steps       []step
		first, last uint64
	}{
		{"prefix (compaction)", []step{{1, 40}}, 41, 100},
		{"prefix from below first", []step{{0, 10}}, 11, 100},
		{"suffix (conflict)", []step{{61, 100}}, 1, 60},
		{"suffix past last", []step{{61, 1<<64 - 1}}, 1, 60},
		{"everything", []step{{1, 100}}, 0, 0},
		{"everything, wider", []step{{0, 1<<64 - 1}}, 0, 0},
		{"single first", []step{{1, 1}}, 2, 100},
		{"single last", []step{{100, 100}}, 1, 99},
		{"outside, above", []step{{101, 200}}, 1, 100},
		{"min > max", []step{{50, 40}}, 1, 100},
		{"prefix then suffix", []step{{1, 30}, {90, 100}}, 31, 89},
		{"prefix then everything", []step{{1, 30}, {1, 100}}, 0, 0},
		{"outside, below after prefix", []step{{1, 30}, {5, 20}}, 31, 100},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, dir)
			mustStore(t, s, testLogs(1, 100)...)
			for _, st := range tc.steps {
				if err := s.DeleteRange(st.min, st.max); err != nil {
					t.Fatalf("DeleteRange(%d, %d): %v", st.min, st.max, err)
				}
			}
			requireBounds(t, s, tc.first, tc.last)
			for i := uint64(1); i <= 100; i++ {
				if tc.last != 0 && i >= tc.first && i <= tc.last {
					requireLog(t, s, testLog(i))
				} else {
					requireNoLog(t, s, i)
				}
			}
			// The bounds found by seeking at open agree with the cache.
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			requireBounds(t, openStore(t, dir), tc.first, tc.last)
		})
	}
}

func TestDeleteRangeRejectsGap(t *testing.T) {
	s := openStore(t, t.TempDir())
	mustStore(t, s, testLogs(1, 10)...)
	if err := s.DeleteRange(3, 7); !errors.Is(err, ErrNonContiguous) {
		t.Fatalf("DeleteRange(3, 7) error = %v, want ErrNonContiguous", err)
	}
	requireBounds(t, s, 1, 10)
	for i := uint64(1); i <= 10; i++ {
		requireLog(t, s, testLog(i))
	}
}

func TestAppendAfterTruncation(t *testing.T) {
	s := openStore(t, t.TempDir())
	mustStore(t, s, testLogs(1, 10)...)

	// A follower drops a conflicting suffix and appends the leader's entries.
	if err := s.DeleteRange(8, 10); err != nil {
		t.Fatal(err)
	}
	replacement := testLog(8)
	replacement.Term = 99
	replacement.Data = []byte("from new leader")
	mustStore(t, s, replacement)
	requireBounds(t, s, 1, 8)
	requireLog(t, s, replacement)

	// After a snapshot install raft deletes everything and resumes after the
	// snapshot's index.
	if err := s.DeleteRange(1, 8); err != nil {
		t.Fatal(err)
	}
	mustStore(t, s, testLogs(500, 510)...)
	requireBounds(t, s, 500, 510)
	requireNoLog(t, s, 8)
	requireLog(t, s, testLog(505))
}

func TestStableStore(t *testing.T) {
	s := openStore(t, t.TempDir())
	if err := s.Set([]byte("k"), []byte("v1")); err != nil {
		t.Fatal(err)
	}
	if err := s.Set([]byte("k"), []byte("v2")); err != nil {
		t.Fatal(err)
	}
	v, err := s.Get([]byte("k"))
	if err != nil || string(v) != "v2" {
		t.Fatalf("Get(k) = %q, %v", v, err)
	}
	v[0] = 'X' // the returned slice is the caller's
	if v, _ := s.Get([]byte("k")); string(v) != "v2" {
		t.Fatalf("Get(k) after mutating previous result = %q", v)
	}

	// Empty values and empty keys are values like any other.
	if err := s.Set([]byte("empty"), nil); err != nil {
		t.Fatal(err)
	}
	if v, err := s.Get([]byte("empty")); err != nil || v == nil || len(v) != 0 {
		t.Fatalf("Get(empty) = %#v, %v; want non-nil empty", v, err)
	}
	if err := s.Set(nil, []byte("nil key")); err != nil {
		t.Fatal(err)
	}
	if v, err := s.Get([]byte{}); err != nil || string(v) != "nil key" {
		t.Fatalf("Get(\"\") = %q, %v", v, err)
	}

	// Stable keys never collide with log or metadata keys.
	mustStore(t, s, testLog(1))
	if err := s.Set(logKey(1), []byte("not a log")); err != nil {
		t.Fatal(err)
	}
	if err := s.Set([]byte(metaLayoutKey), []byte("not meta")); err != nil {
		t.Fatal(err)
	}
	requireLog(t, s, testLog(1))
	if v, err := s.getMeta(metaLayoutKey); err != nil || v != layoutVersion {
		t.Fatalf("layout version = %d, %v; want %d", v, err, layoutVersion)
	}

	for _, n := range []uint64{0, 1, 1 << 32, 1<<64 - 1} {
		if err := s.SetUint64([]byte("CurrentTerm"), n); err != nil {
			t.Fatal(err)
		}
		got, err := s.GetUint64([]byte("CurrentTerm"))
		if err != nil || got != n {
			t.Fatalf("GetUint64 = %d, %v; want %d", got, err, n)
		}
	}
	// A value not written by SetUint64 is reported, not misread.
	if _, err := s.GetUint64([]byte("k")); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("GetUint64 of a 2-byte value: error = %v, want ErrCorrupt", err)
	}
}

func TestReopenKeepsEverything(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(Config{Dir: dir, Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	mustStore(t, s, testLogs(1, 50)...)
	if err := s.DeleteRange(1, 9); err != nil {
		t.Fatal(err)
	}
	mustStore(t, s, testLogs(51, 60)...)
	if err := s.SetUint64([]byte("CurrentTerm"), 7); err != nil {
		t.Fatal(err)
	}
	if err := s.Set([]byte("LastVoteCand"), []byte("node-2")); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = openStore(t, dir)
	requireBounds(t, s, 10, 60)
	for i := uint64(10); i <= 60; i++ {
		requireLog(t, s, testLog(i))
	}
	if n, err := s.GetUint64([]byte("CurrentTerm")); err != nil || n != 7 {
		t.Fatalf("CurrentTerm = %d, %v", n, err)
	}
	if v, err := s.Get([]byte("LastVoteCand")); err != nil || string(v) != "node-2" {
		t.Fatalf("LastVoteCand = %q, %v", v, err)
	}
	// Appending continues where it left off.
	mustStore(t, s, testLog(61))
	requireBounds(t, s, 10, 61)
}

func TestClosedStore(t *testing.T) {
	s, err := Open(Config{Dir: t.TempDir(), Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	var l raft.Log
	checks := map[string]error{
		"StoreLog":    s.StoreLog(testLog(1)),
		"StoreLogs":   s.StoreLogs(testLogs(1, 2)),
		"GetLog":      s.GetLog(1, &l),
		"DeleteRange": s.DeleteRange(1, 2),
		"Set":         s.Set([]byte("k"), nil),
		"SetUint64":   s.SetUint64([]byte("k"), 1),
	}
	_, checks["FirstIndex"] = s.FirstIndex()
	_, checks["LastIndex"] = s.LastIndex()
	_, checks["Get"] = s.Get([]byte("k"))
	_, checks["GetUint64"] = s.GetUint64([]byte("k"))
	for name, err := range checks {
		if !errors.Is(err, ErrClosed) {
			t.Errorf("%s after Close: error = %v, want ErrClosed", name, err)
		}
	}
}

func TestOpenErrors(t *testing.T) {
	if _, err := Open(Config{}); err == nil || !strings.Contains(err.Error(), "Dir") {
		t.Errorf("Open without Dir: error = %v", err)
	}
	if _, err := Open(Config{Dir: t.TempDir(), CacheSize: -1}); err == nil {
		t.Error("Open with negative CacheSize succeeded")
	}
	if _, err := Open(Config{Dir: t.TempDir(), MaxOpenFiles: -1}); err == nil {
		t.Error("Open with negative MaxOpenFiles succeeded")
	}

	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Open(Config{Dir: file, Logger: discardLogger()})
	if err == nil || !strings.Contains(err.Error(), "open raft log at "+file) {
		t.Errorf("Open on a file: error = %v, want context naming the path", err)
	}

	// Pebble's directory lock keeps a second opener out.
	dir := t.TempDir()
	openStore(t, dir)
	if s, err := Open(Config{Dir: dir, Logger: discardLogger()}); err == nil {
		s.Close()
		t.Error("second Open of the same directory succeeded")
	}
}

// rawWrite writes directly into a closed store's Pebble database, to plant
// data the Store itself would never write.
func rawWrite(t *testing.T, dir string, kvs ...[]byte) {
	t.Helper()
	db, err := pebble.Open(dir, &pebble.Options{Logger: pebbleLogger{discardLogger()}})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(kvs); i += 2 {
		if err := db.Set(kvs[i], kvs[i+1], pebble.Sync); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestOpenRejectsUnknownLayout(t *testing.T) {
	for name, val := range map[string][]byte{
		"newer version": putUint64(layoutVersion + 1),
		"garbage":       []byte("v1"),
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			rawWrite(t, dir, []byte(metaLayoutKey), val)
			if s, err := Open(Config{Dir: dir, Logger: discardLogger()}); err == nil {
				s.Close()
				t.Fatal("Open succeeded")
			} else if !strings.Contains(err.Error(), "layout version") {
				t.Fatalf("Open error = %v", err)
			}
		})
	}
}

func TestOpenRejectsMalformedLogKey(t *testing.T) {
	dir := t.TempDir()
	rawWrite(t, dir, []byte{logPrefix, 1, 2}, []byte("x"))
	if s, err := Open(Config{Dir: dir, Logger: discardLogger()}); !errors.Is(err, ErrCorrupt) {
		if s != nil {
			s.Close()
		}
		t.Fatalf("Open error = %v, want ErrCorrupt", err)
	}
}

// Builds on hashicorp/raft v1.8 reserved "\x03commit" for a commit index
// (8 bytes, big-endian). A store that has one opens, its log is intact,
// appending goes on, and the key is left as it was, so that a build that
// reads it finds it unchanged after a rollback.
func TestOpenIgnoresCommitIndexOfEarlierBuilds(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir)
	mustStore(t, s, testLogs(1, 3)...)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	commitKey, commit := []byte("\x03commit"), putUint64(2)
	rawWrite(t, dir, commitKey, commit)
	s = openStore(t, dir)
	requireBounds(t, s, 1, 3)
	for i := uint64(1); i <= 3; i++ {
		requireLog(t, s, testLog(i))
	}
	mustStore(t, s, testLog(4))
	requireBounds(t, s, 1, 4)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	db, err := pebble.Open(dir, &pebble.Options{Logger: pebbleLogger{discardLogger()}})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	v, closer, err := db.Get(commitKey)
	if err != nil {
		t.Fatalf("the earlier builds' commit index after reopening and appending: %v", err)
	}
	defer closer.Close()
	if !bytes.Equal(v, commit) {
		t.Fatalf("commit index = %x, want it left as %x", v, commit)
	}
}

func TestGetLogCorruptEntry(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(Config{Dir: dir, Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	mustStore(t, s, testLogs(1, 3)...)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	wrongIndex := make([]byte, encodedLen(testLog(9)))
	encodeLog(wrongIndex, testLog(9))
	rawWrite(t, dir,
		logKey(2), []byte{encodingV1, 0, 2}, // truncated
		logKey(3), wrongIndex, // decodes, but under the wrong key
	)

	s = openStore(t, dir)
	requireLog(t, s, testLog(1))
	for _, i := range []uint64{2, 3} {
		var l raft.Log
		err := s.GetLog(i, &l)
		var ce *CorruptError
		if !errors.Is(err, ErrCorrupt) || !errors.As(err, &ce) || ce.Index != i {
			t.Fatalf("GetLog(%d) error = %v, want *CorruptError for index %d", i, err, i)
		}
		if l.Index != 0 || l.Data != nil {
			t.Fatalf("GetLog(%d) left partial data in the entry: %+v", i, l)
		}
	}
}

// TestConcurrentUse mirrors raft's access pattern: one appender (main
// goroutine), a compactor deleting prefixes (snapshot goroutine), and
// readers (replication, FSM apply). Run under -race.
func TestConcurrentUse(t *testing.T) {
	s := openStore(t, t.TempDir())
	const total = 400
	var wg sync.WaitGroup
	appended := make(chan uint64, total)

	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(appended)
		for i := uint64(1); i <= total; i += 4 {
			if err := s.StoreLogs(testLogs(i, i+3)); err != nil {
				t.Error(err)
				return
			}
			appended <- i + 3
		}
	}()

	wg.Add(1)
	go func() {
		defer wg.Done()
		for last := range appended {
			if last%40 == 0 {
				first, _ := s.FirstIndex()
				if err := s.DeleteRange(first, last-20); err != nil {
					t.Error(err)
					return
				}
			}
		}
	}()

	for r := 0; r < 2; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; n < 2000; n++ {
				first, _ := s.FirstIndex()
				last, _ := s.LastIndex()
				if last == 0 {
					continue
				}
				var l raft.Log
				idx := last - uint64(n)%(last-first+1)
				err := s.GetLog(idx, &l)
				if err == raft.ErrLogNotFound {
					continue // truncated between reading the bounds and the entry
				}
				if err != nil {
					t.Error(err)
					return
				}
				if !logsEqual(&l, testLog(idx)) {
					t.Errorf("GetLog(%d) = %+v", idx, l)
					return
				}
			}
		}()
	}
	wg.Wait()

	first, _ := s.FirstIndex()
	requireBounds(t, s, first, total)
	for i := first; i <= total; i++ {
		requireLog(t, s, testLog(i))
	}
}
