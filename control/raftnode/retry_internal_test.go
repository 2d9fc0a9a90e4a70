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

	calls := 0
	_, err = retry(ctx, 200*time.Millisecond, func() (int, error) {
		calls++
		if calls == 1 {
			return 0, ErrUnknownOutcome
		}
		return 0, ErrNoLeader
	})
	if !errors.Is(err, ErrNoLeader) || !errors.Is(err, ErrUnknownOutcome) {
		t.Fatalf("err = %v, want ErrNoLeader and ErrUnknownOutcome", err)
	}

	// A final error after an attempt of unknown outcome says so too.
	calls = 0
	_, err = retry(ctx, time.Minute, func() (int, error) {
		calls++
		if calls == 1 {
			return 0, ErrUnknownOutcome
		}
		return 0, ErrShutdown
	})
	if !errors.Is(err, ErrShutdown) || !errors.Is(err, ErrUnknownOutcome) {
		t.Fatalf("err = %v, want ErrShutdown and ErrUnknownOutcome", err)
	}
	// And when the caller's deadline ends it.
	short, cancelShort := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancelShort()
	calls = 0
	_, err = retry(short, time.Minute, func() (int, error) {
		calls++
		if calls == 1 {
			return 0, ErrUnknownOutcome
		}
		return 0, ErrNoLeader
	})
	if !errors.Is(err, ErrNoLeader) || !errors.Is(err, ErrUnknownOutcome) {
		t.Fatalf("err = %v, want ErrNoLeader and ErrUnknownOutcome", err)
	}

	calls = 0
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
