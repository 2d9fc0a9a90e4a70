package api

import (
	"sync"
	"time"
)

// DefaultTokensPerMinute is AuthConfig.TokensPerMinute's default.
const DefaultTokensPerMinute = 30

// issueLimit bounds the logins and refreshes one account completes on
// this node: each writes records (a session, a refresh token) that stay
// for weeks, so an account's owner, or whoever holds its password or a
// refresh token, looping on them would grow the replicated state
// without bound. A bucket of perMinute per account, refilled evenly;
// only completed ones take from it (a wrong password or secret costs the
// account nothing, so nobody else can use up its bucket). Buckets that
// are full again are dropped, so memory follows the accounts active in
// the last minute.
type issueLimit struct {
	perMinute int // <= 0: no limit
	mu        sync.Mutex
	buckets   map[string]*issueBucket
	sweepAt   int // len(buckets) that makes take drop the full ones
}

type issueBucket struct {
	tokens float64
	at     time.Time
}

// minSweep is the fewest buckets that make take sweep.
const minSweep = 1024

func newIssueLimit(perMinute int) *issueLimit {
	return &issueLimit{perMinute: perMinute, buckets: map[string]*issueBucket{}, sweepAt: minSweep}
}

// level returns b's tokens at now (refilled since b.at, at most full).
func (l *issueLimit) level(b *issueBucket, now time.Time) float64 {
	full := float64(l.perMinute)
	return min(full, b.tokens+max(0, now.Sub(b.at).Minutes())*full)
}

// wait returns how long account must wait before it may complete one
// more, 0 when it may now. It takes nothing.
func (l *issueLimit) wait(account string, now time.Time) time.Duration {
	if l.perMinute <= 0 {
		return 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	b, ok := l.buckets[account]
	if !ok {
		return 0
	}
	lvl := l.level(b, now)
	if lvl >= 1 {
		return 0
	}
	return time.Duration((1 - lvl) / float64(l.perMinute) * float64(time.Minute))
}

// take counts one completed for account at now.
func (l *issueLimit) take(account string, now time.Time) {
	if l.perMinute <= 0 {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	b, ok := l.buckets[account]
	if !ok {
		if len(l.buckets) >= l.sweepAt {
			l.sweep(now)
		}
		b = &issueBucket{tokens: float64(l.perMinute), at: now}
		l.buckets[account] = b
	}
	// Concurrent calls that all passed wait may take it below zero: the
	// next ones wait the longer. A clock that stepped back leaves b.at
	// as it was (else that stretch would refill twice).
	b.tokens = l.level(b, now) - 1
	if now.After(b.at) {
		b.at = now
	}
}

// sweep drops the buckets that are full again (with l.mu held), and sets
// the size that brings the next sweep: twice what is left, so that its
// cost spreads over as many takes as it walks buckets.
func (l *issueLimit) sweep(now time.Time) {
	for k, b := range l.buckets {
		if l.level(b, now) >= float64(l.perMinute) {
			delete(l.buckets, k)
		}
	}
	l.sweepAt = max(minSweep, 2*len(l.buckets))
}
