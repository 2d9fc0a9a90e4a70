package session

import (
	"math"
	"testing"
	"time"
)

// The buckets start full, count what a frame takes, make the reader wait
// exactly as long as the debt takes to repay, refill with time up to the
// burst, and admit a datagram only when every bucket has room.
func TestBudget(t *testing.T) {
	t0 := time.Unix(1000, 0)
	// 10 frames/s, 2 events/s, 100 bytes/s; bursts of 10, 2 and 100.
	b := newBudget(t0, 10, 2, 100, 10, 2, 100)
	if w := b.take(t0, true, 10); w != 0 {
		t.Fatalf("first event waits %v", w)
	}
	if w := b.take(t0, false, 10); w != 0 {
		t.Fatalf("a non-event frame waits %v", w)
	}
	if w := b.take(t0, true, 10); w != 0 {
		t.Fatalf("second event (the burst) waits %v", w)
	}
	// The third event in the same instant is one event in debt: half a
	// second at 2 per second.
	if w := b.take(t0, true, 10); w != 500*time.Millisecond {
		t.Fatalf("third event waits %v, want 500ms", w)
	}
	if b.admit(t0, 1) {
		t.Fatal("a datagram admitted while the event bucket is in debt")
	}
	// 50 more bytes leave 10 of the 100; the events' debt is now two
	// events, a second.
	if w := b.take(t0, true, 50); w != time.Second {
		t.Fatalf("fourth event waits %v, want 1s", w)
	}
	// Two seconds later every bucket is full again, and no fuller: events
	// -2+4 capped at 2, bytes at 100, frames at 10.
	t2 := t0.Add(2 * time.Second)
	if !b.admit(t2, 100) {
		t.Fatal("a datagram of the whole byte burst refused after the refill")
	}
	if b.admit(t2, 1) {
		t.Fatal("a datagram admitted with the byte bucket empty")
	}
	if w := b.take(t2, false, 1); w != 10*time.Millisecond {
		t.Fatalf("one byte in debt waits %v, want 10ms", w)
	}
	// Time going backwards (it cannot with a monotonic clock, but a
	// zero duration must not add or remove anything) neither refills nor
	// moves the buckets' clock back, which would refill them later.
	if b.admit(t0, 1) {
		t.Fatal("an earlier time refilled the buckets")
	}
	// Another time before t2: still nothing accrues, one more byte is a
	// second byte in debt.
	if w := b.take(t0.Add(time.Second), false, 1); w != 20*time.Millisecond {
		t.Fatalf("after an earlier time, one more byte waits %v, want 20ms", w)
	}
}

// A bucket without a rate never repays a debt: the reader waits for ever
// (until the session closes) rather than reading on unpaced.
func TestBudgetWithoutARate(t *testing.T) {
	t0 := time.Unix(1000, 0)
	b := newBudget(t0, 10, 0, 100, 10, 1, 100)
	if w := b.take(t0, true, 1); w != 0 {
		t.Fatalf("the burst waits %v", w)
	}
	if w := b.take(t0.Add(time.Hour), true, 1); w != math.MaxInt64 {
		t.Fatalf("with no event rate the second event waits %v", w)
	}
}
