package main

import (
	"context"
	"time"
)

// schedule waits for the due times of an open loop on one reusable
// timer. The runtime's timers may fire late (by up to about a
// millisecond when the process has nothing else to run); an open loop
// then sends what fell due meanwhile at once, keeping its rate in
// bursts. A busy wait instead would keep the process's network poller
// from running, and with it the driver's own receivers.
type schedule struct{ timer *time.Timer }

func newSchedule() *schedule {
	t := time.NewTimer(time.Hour)
	t.Stop()
	return &schedule{timer: t}
}

// stop releases the timer.
func (s *schedule) stop() { s.timer.Stop() }

// waitUntil returns at t or later, or when ctx ends.
func (s *schedule) waitUntil(ctx context.Context, t time.Time) {
	w := time.Until(t)
	if w <= 0 {
		return
	}
	s.timer.Reset(w)
	select {
	case <-s.timer.C:
	case <-ctx.Done():
		s.timer.Stop()
	}
}
