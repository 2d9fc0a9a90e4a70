package raftlog

import (
	"errors"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// Every synced append shows in the fsync histogram, in seconds, with
// cumulative buckets; a closed store answers ErrClosed.
func TestFsyncLatency(t *testing.T) {
	s, err := Open(Config{Dir: t.TempDir(), Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	desc := prometheus.NewDesc("test_fsync_seconds", "test", nil, nil)
	read := func() *dto.Histogram {
		t.Helper()
		m, err := s.FsyncLatency(desc)
		if err != nil {
			t.Fatal(err)
		}
		var out dto.Metric
		if err := m.Write(&out); err != nil {
			t.Fatal(err)
		}
		return out.GetHistogram()
	}
	before := read().GetSampleCount()
	for i := uint64(1); i <= 5; i++ {
		mustStore(t, s, testLog(i))
	}
	// Pebble records an fsync's latency after it wakes the writers
	// waiting on it, so the last one may show a moment later.
	h := read()
	for deadline := time.Now().Add(10 * time.Second); h.GetSampleCount()-before < 5; h = read() {
		if time.Now().After(deadline) {
			t.Fatalf("%d fsyncs counted for 5 synced appends", h.GetSampleCount()-before)
		}
		time.Sleep(time.Millisecond) // polling interval
	}
	if h.GetSampleSum() <= 0 || h.GetSampleSum() > float64(h.GetSampleCount())*10 {
		t.Fatalf("sum %v s for %d fsyncs: not in seconds", h.GetSampleSum(), h.GetSampleCount())
	}
	if len(h.GetBucket()) != len(fsyncBounds) {
		t.Fatalf("%d buckets, want %d", len(h.GetBucket()), len(fsyncBounds))
	}
	prev := uint64(0)
	for i, b := range h.GetBucket() {
		if b.GetUpperBound() != fsyncBounds[i] || b.GetCumulativeCount() < prev || b.GetCumulativeCount() > h.GetSampleCount() {
			t.Fatalf("bucket %d: %v (previous count %d, total %d)", i, b, prev, h.GetSampleCount())
		}
		prev = b.GetCumulativeCount()
	}
	if last := fsyncBounds[len(fsyncBounds)-1]; prev != h.GetSampleCount() && last < 9.9 {
		t.Fatalf("the last bound %v s holds %d of %d", last, prev, h.GetSampleCount())
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.FsyncLatency(desc); !errors.Is(err, ErrClosed) {
		t.Fatalf("after Close: %v, want ErrClosed", err)
	}
}

// The buckets are exact subsets of Pebble's: strictly increasing, from
// 100 us to 10 s.
func TestFsyncBounds(t *testing.T) {
	if len(fsyncBounds) < 10 || fsyncBounds[0] != 100e-6 || fsyncBounds[len(fsyncBounds)-1] < 9.99 {
		t.Fatalf("bounds %v", fsyncBounds)
	}
	for i := 1; i < len(fsyncBounds); i++ {
		if fsyncBounds[i] <= fsyncBounds[i-1] {
			t.Fatalf("bounds not increasing: %v", fsyncBounds)
		}
	}
}
