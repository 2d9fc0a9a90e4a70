package raftnode

import (
	"testing"

	"github.com/cockroachdb/pebble/v2"
)

// Pebble computes ZombieSize as reserved memtable bytes minus
// MemTable.Size, which counts queued large batches too: while one is
// queued the difference wraps below zero, and the metric must not report
// 16 EiB of zombies.
func TestZombieBytesDoNotWrap(t *testing.T) {
	var m pebble.Metrics
	reserved, size := uint64(4<<20), uint64(68<<20) // a 64 MiB batch queued beside a 4 MiB memtable
	m.MemTable.ZombieSize = reserved - size
	if got := zombieBytes(&m); got != 0 {
		t.Fatalf("zombieBytes = %d with a large batch queued, want 0", got)
	}
	m.MemTable.ZombieSize = 256 << 10
	if got := zombieBytes(&m); got != 256<<10 {
		t.Fatalf("zombieBytes = %d, want %d", got, 256<<10)
	}
}
