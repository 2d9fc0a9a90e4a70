package raftnode

import (
	"context"
	"errors"
	"testing"
	"time"
)

// Without a leader, retry gives up after leaderWait with ErrNoLeader
// (keeping ErrUnknownOutcome when an attempt may have taken effect),
// long before a distant caller deadline; with a leader found in time it
// goes on.
func TestRetryBoundsTheWaitForALeader(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start := time.Now()
	_, err := retry(ctx, 200*time.Millisecond, func() (int, error) { return 0, ErrNoLeader })
	if !errors.Is(err, ErrNoLeader) || errors.Is(err, ErrUnknownOutcome) {
		t.Fatalf("err = %v, want ErrNoLeader alone", err)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Fatalf("gave up after %v", took)
	}

	// A first attempt of unknown outcome, then a final error: whatever
	// ends the retries, the error says an attempt may have taken effect.
	for _, tc := range []struct {
		name       string
		ctxTimeout time.Duration // 0: the minute-long ctx
		leaderWait time.Duration
		then, want error
	}{
		{"leader wait ends it", 0, 200 * time.Millisecond, ErrNoLeader, ErrNoLeader},
		{"a final error ends it", 0, time.Minute, ErrShutdown, ErrShutdown},
		{"the caller's deadline ends it", 300 * time.Millisecond, time.Minute, ErrNoLeader, ErrNoLeader},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cctx := ctx
			if tc.ctxTimeout > 0 {
				var cancel context.CancelFunc
				cctx, cancel = context.WithTimeout(ctx, tc.ctxTimeout)
				defer cancel()
			}
			calls := 0
			_, err := retry(cctx, tc.leaderWait, func() (int, error) {
				calls++
				if calls == 1 {
					return 0, ErrUnknownOutcome
				}
				return 0, tc.then
			})
			if !errors.Is(err, tc.want) || !errors.Is(err, ErrUnknownOutcome) {
				t.Fatalf("err = %v, want %v and ErrUnknownOutcome", err, tc.want)
			}
		})
	}

	calls := 0
	v, err := retry(ctx, 200*time.Millisecond, func() (int, error) {
		calls++
		if calls < 3 {
			return 0, ErrNoLeader
		}
		return 7, nil
	})
	if err != nil || v != 7 {
		t.Fatalf("retry = %d, %v", v, err)
	}
}
