package session

import (
	"math"
	"sync"
	"time"
)

// budget is what a device may send: frames, events and bytes per second,
// each a token bucket that starts full. The stream reader reserves what a
// frame takes and waits out any debt (take); the datagram reader takes a
// datagram only if all three have room, else drops it (admit). One mutex
// and one clock reading serve the three buckets: three x/time/rate
// limiters took three of each per frame, 7% of the edge's CPU at 200k
// ephemeral events/s.
type budget struct {
	mu                    sync.Mutex
	last                  time.Time // when the buckets were last refilled
	frames, events, bytes bucket
}

// bucket holds tokens, refilled at rate per second up to burst; a
// reservation may leave it in debt (negative).
type bucket struct {
	tokens, rate, burst float64
}

func newBudget(now time.Time, framesPerSec, eventsPerSec, bytesPerSec, framesBurst, eventsBurst, bytesBurst int) *budget {
	b := func(rate, burst int) bucket {
		return bucket{tokens: float64(burst), rate: float64(rate), burst: float64(burst)}
	}
	return &budget{last: now, frames: b(framesPerSec, framesBurst), events: b(eventsPerSec, eventsBurst), bytes: b(bytesPerSec, bytesBurst)}
}

// refill adds what accrued since the last refill; mu held.
func (b *budget) refill(now time.Time) {
	dt := now.Sub(b.last).Seconds()
	if dt <= 0 {
		return
	}
	b.last = now
	for _, k := range [...]*bucket{&b.frames, &b.events, &b.bytes} {
		k.tokens = min(k.burst, k.tokens+dt*k.rate)
	}
}

// take reserves a frame of size bytes (an event or not) and returns how
// long to wait before acting on it: 0 when the buckets had room.
func (b *budget) take(now time.Time, event bool, size int) time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refill(now)
	wait := b.frames.reserve(1)
	if event {
		wait = max(wait, b.events.reserve(1))
	}
	return max(wait, b.bytes.reserve(float64(size)))
}

// charge counts events and size bytes more against the event and byte
// buckets, as work a frame already let through causes (its event stored
// in several mailboxes): nothing waits now, the reader repays the debt
// before its next frame.
func (b *budget) charge(now time.Time, events, size int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refill(now)
	b.events.reserve(float64(events))
	b.bytes.reserve(float64(size))
}

// admit takes an event frame of size bytes only if every bucket has room
// for it now.
func (b *budget) admit(now time.Time, size int) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refill(now)
	n := float64(size)
	if b.frames.tokens < 1 || b.events.tokens < 1 || b.bytes.tokens < n {
		return false
	}
	b.frames.tokens--
	b.events.tokens--
	b.bytes.tokens -= n
	return true
}

// reserve takes n tokens and returns how long until the debt, if any, is
// paid: without a rate, or beyond what a Duration holds, for ever.
func (k *bucket) reserve(n float64) time.Duration {
	k.tokens -= n
	if k.tokens >= 0 {
		return 0
	}
	if k.rate <= 0 {
		return math.MaxInt64
	}
	wait := -k.tokens / k.rate * float64(time.Second)
	if wait >= math.MaxInt64 {
		return math.MaxInt64
	}
	return time.Duration(wait)
}
