package api

import (
	"fmt"
	"testing"
	"time"
)

// A bucket of perMinute per account, refilled evenly; only takes empty
// it, accounts do not share one, and full buckets are swept away.
func TestIssueLimit(t *testing.T) {
	l := newIssueLimit(3)
	t0 := time.Unix(1_000_000, 0)
	for i := range 3 {
		if w := l.wait("a", t0); w != 0 {
			t.Fatalf("take %d: wait %v with tokens left", i, w)
		}
		l.take("a", t0)
	}
	// Empty: one comes back every 20 s.
	if w := l.wait("a", t0); w != 20*time.Second {
		t.Fatalf("empty bucket: wait %v, want 20s", w)
	}
	if w := l.wait("a", t0.Add(5*time.Second)); w != 15*time.Second {
		t.Fatalf("5 s later: wait %v, want 15s", w)
	}
	if w := l.wait("b", t0); w != 0 {
		t.Fatalf("another account waits %v", w)
	}
	if w := l.wait("a", t0.Add(20*time.Second)); w != 0 {
		t.Fatalf("20 s later: wait %v, want none", w)
	}
	// Takes that raced past wait leave it below zero: longer waits.
	l.take("a", t0.Add(20*time.Second))
	l.take("a", t0.Add(20*time.Second))
	if w := l.wait("a", t0.Add(20*time.Second)); w != 40*time.Second {
		t.Fatalf("below empty: wait %v, want 40s", w)
	}
	// A clock that steps back refills nothing and takes nothing away,
	// nor refills that stretch again once it is past.
	if w := l.wait("a", t0.Add(10*time.Second)); w != 40*time.Second {
		t.Fatalf("a clock 10 s back: wait %v, want 40s", w)
	}
	l.take("a", t0.Add(10*time.Second))
	if w := l.wait("a", t0.Add(20*time.Second)); w != time.Minute {
		t.Fatalf("back at 20 s after a take at 10 s: wait %v, want 1m0s", w)
	}
	// Nothing bounded without a limit.
	off := newIssueLimit(-1)
	for range 100 {
		off.take("a", t0)
	}
	if w := off.wait("a", t0); w != 0 || len(off.buckets) != 0 {
		t.Fatalf("no limit: wait %v, %d buckets", w, len(off.buckets))
	}
	// Buckets full again are dropped when the map grows: memory follows
	// the accounts of the last minute.
	l = newIssueLimit(3)
	for i := range minSweep {
		l.take(fmt.Sprint("old", i), t0)
	}
	l.take("new", t0.Add(time.Minute))
	if len(l.buckets) != 1 {
		t.Fatalf("%d buckets after a minute, want the new one only", len(l.buckets))
	}
	for i := range 1100 {
		l.take(fmt.Sprint("busy", i), t0.Add(time.Minute))
	}
	if len(l.buckets) != 1101 || l.sweepAt < len(l.buckets) {
		t.Fatalf("%d buckets, next sweep at %d", len(l.buckets), l.sweepAt)
	}
}
