// Package jitter spreads retries over time.
package jitter

import (
	"math/rand/v2"
	"time"
)

// Spread returns a random duration in [d/2, d]. Many clients that failed
// together (an edge's sessions refused by a busy control node, edges
// whose watch streams a restarting node cut, devices of an edge that
// died) and back off by the same schedule would otherwise retry
// together, in waves, each a storm of its own; with jitter, each wave
// spreads over half its wait.
func Spread(d time.Duration) time.Duration {
	if d <= 1 {
		return d
	}
	return d/2 + rand.N(d-d/2+1)
}
