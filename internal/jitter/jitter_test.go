package jitter

import (
	"testing"
	"time"
)

// Spread stays within [d/2, d] and spreads: a thousand draws of a second
// fall in both halves of the range, none outside it.
func TestSpreadStaysWithinHalfTheWait(t *testing.T) {
	for _, d := range []time.Duration{0, 1, 2, 3, time.Second} {
		low, high := 0, 0
		for range 1000 {
			j := Spread(d)
			if j < d/2 || j > d {
				t.Fatalf("Spread(%v) = %v, outside [%v, %v]", d, j, d/2, d)
			}
			if j < d/2+d/4 {
				low++
			} else {
				high++
			}
		}
		if d == time.Second && (low < 100 || high < 100) {
			t.Fatalf("Spread(1s) does not spread: %d draws in the lower half of its range, %d in the upper", low, high)
		}
	}
}
