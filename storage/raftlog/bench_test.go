package raftlog

import (
	"bytes"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
)

// benchPayload is the Data of every benchmark entry, the same for both
// stores.
var benchPayload = bytes.Repeat([]byte{0x5a}, 128)

type benchStore interface {
	StoreLogs([]*raft.Log) error
	GetLog(uint64, *raft.Log) error
	Close() error
}

// benchStores opens each store under comparison, durable (fsync per
// StoreLogs) in both cases and with default settings. "boltdb" is
// github.com/hashicorp/raft-boltdb/v2 v2.3.1, used only by this benchmark.
var benchStores = []struct {
	name string
	open func(b *testing.B) benchStore
}{
	{"pebble", func(b *testing.B) benchStore {
		s, err := Open(Config{Dir: b.TempDir(), Logger: discardLogger()})
		if err != nil {
			b.Fatal(err)
		}
		return s
	}},
	{"boltdb", func(b *testing.B) benchStore {
		s, err := raftboltdb.NewBoltStore(filepath.Join(b.TempDir(), "raft.db"))
		if err != nil {
			b.Fatal(err)
		}
		return s
	}},
}

func benchEntries(first uint64, n int, now time.Time) []*raft.Log {
	logs := make([]*raft.Log, n)
	for i := range logs {
		logs[i] = &raft.Log{
			Index:      first + uint64(i),
			Term:       1,
			Type:       raft.LogCommand,
			Data:       benchPayload,
			AppendedAt: now,
		}
	}
	return logs
}

// BenchmarkStoreLogs measures one StoreLogs call (one durable batch) per
// op, appending after what is already there.
func BenchmarkStoreLogs(b *testing.B) {
	for _, st := range benchStores {
		for _, size := range []int{1, 16, 256} {
			b.Run(fmt.Sprintf("%s/batch=%d", st.name, size), func(b *testing.B) {
				s := st.open(b)
				defer s.Close()
				now := time.Now()
				// Build batches outside the timed loop; only their indexes
				// change between calls.
				batch := benchEntries(1, size, now)
				next := uint64(1)
				b.ReportAllocs()
				b.SetBytes(int64(size * len(benchPayload)))
				for b.Loop() {
					for i, l := range batch {
						l.Index = next + uint64(i)
					}
					if err := s.StoreLogs(batch); err != nil {
						b.Fatal(err)
					}
					next += uint64(size)
				}
				b.ReportMetric(float64(b.N*size)/b.Elapsed().Seconds(), "entries/s")
			})
		}
	}
}

// BenchmarkGetLog measures reading one entry at a pseudo-random index out
// of 10,000, all recently written (as raft reads them during replication
// and FSM apply).
func BenchmarkGetLog(b *testing.B) {
	const n = 10_000
	for _, st := range benchStores {
		b.Run(st.name, func(b *testing.B) {
			s := st.open(b)
			defer s.Close()
			now := time.Now()
			for first := uint64(1); first <= n; first += 1000 {
				if err := s.StoreLogs(benchEntries(first, 1000, now)); err != nil {
					b.Fatal(err)
				}
			}
			var l raft.Log
			i := uint64(0)
			b.ReportAllocs()
			for b.Loop() {
				i = (i + 7919) % n
				if err := s.GetLog(i+1, &l); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
