package raftlog

import (
	"fmt"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// fsyncBounds are the upper bounds, in seconds, of the buckets
// FsyncLatency reports: a subset of Pebble's own bucket bounds, so the
// counts are exact, from 100 us (an NVMe disk) to 10 s (a disk in
// trouble).
var fsyncBounds = pickFsyncBounds()

func pickFsyncBounds() []float64 {
	want := []time.Duration{100 * time.Microsecond, 200 * time.Microsecond, 500 * time.Microsecond,
		time.Millisecond, 2 * time.Millisecond, 4 * time.Millisecond,
		10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond,
		250 * time.Millisecond, 500 * time.Millisecond, time.Second, 2500 * time.Millisecond, 10 * time.Second}
	// Pebble's bounds are in nanoseconds; take, for each wanted bound,
	// Pebble's largest bound at or below it.
	var out []float64
	for _, w := range want {
		best := -1.0
		for _, b := range pebble.FsyncLatencyBuckets {
			if b <= float64(w) && b > best {
				best = b
			}
		}
		if s := best / 1e9; best > 0 && (len(out) == 0 || s > out[len(out)-1]) {
			out = append(out, s)
		}
	}
	return out
}

// FsyncLatency returns the latency of the fsyncs of the log's write-ahead
// log, the durable step of every append Raft makes, as a histogram metric
// for desc in seconds. Pebble measures it; ErrClosed once the store is
// closed.
func (s *Store) FsyncLatency(desc *prometheus.Desc) (prometheus.Metric, error) {
	pm, err := s.PebbleMetrics()
	if err != nil {
		return nil, err
	}
	h := pm.LogWriter.FsyncLatency
	var m dto.Metric
	if h == nil {
		return prometheus.NewConstHistogram(desc, 0, 0, zeroBuckets())
	}
	if err := h.Write(&m); err != nil {
		return nil, fmt.Errorf("read fsync latency: %w", err)
	}
	ph := m.GetHistogram()
	buckets := zeroBuckets()
	// Pebble's buckets are cumulative: the count at a bound is the count
	// of its own bucket with that upper bound.
	for _, b := range ph.GetBucket() {
		ub := b.GetUpperBound() / 1e9
		if _, ok := buckets[ub]; ok {
			buckets[ub] = b.GetCumulativeCount()
		}
	}
	return prometheus.NewConstHistogram(desc, ph.GetSampleCount(), ph.GetSampleSum()/1e9, buckets)
}

// PebbleMetrics returns Pebble's metrics of the log; ErrClosed once the
// store is closed.
func (s *Store) PebbleMetrics() (*pebble.Metrics, error) {
	if err := s.enter(); err != nil {
		return nil, err
	}
	defer s.exit()
	return s.db.Metrics(), nil
}

func zeroBuckets() map[float64]uint64 {
	m := make(map[float64]uint64, len(fsyncBounds))
	for _, b := range fsyncBounds {
		m[b] = 0
	}
	return m
}
