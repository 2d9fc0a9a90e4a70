package api

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/fsm"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// The refresher runs one barrier at a time, shares it with the callers
// that arrive meanwhile, runs at most one per interval, and bounds each
// by its timeout.
func TestKeyRefresherIsBounded(t *testing.T) {
	var (
		calls   atomic.Int32
		started = make(chan struct{}, 1)
		release = make(chan struct{})
		now     = time.Unix(1000, 0)
		mu      sync.Mutex // guards now
	)
	k := &catchUp{every: time.Second, timeout: time.Hour,
		barrier: func(ctx context.Context) error {
			calls.Add(1)
			started <- struct{}{}
			select {
			case <-release:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		},
		now: func() time.Time { mu.Lock(); defer mu.Unlock(); return now },
	}
	// Ten callers at once: one barrier, all of them told to check again.
	var wg sync.WaitGroup
	var shared atomic.Int32
	for range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if k.refresh(context.Background()) {
				shared.Add(1)
			}
		}()
	}
	<-started // the first caller runs the barrier; the others wait for it
	close(release)
	wg.Wait()
	if calls.Load() != 1 || shared.Load() == 0 {
		t.Fatalf("ten concurrent refreshes: %d barriers, %d callers told to retry; want 1 barrier", calls.Load(), shared.Load())
	}
	// Within the interval: no barrier, the caller is told not to retry.
	if k.refresh(context.Background()) || calls.Load() != 1 {
		t.Fatalf("refresh within the interval ran a barrier (%d)", calls.Load())
	}
	// After it: one more.
	mu.Lock()
	now = now.Add(time.Second)
	mu.Unlock()
	if !k.refresh(context.Background()) || calls.Load() != 2 {
		t.Fatalf("refresh after the interval: %d barriers, want 2", calls.Load())
	}
	<-started
	// A barrier that hangs ends at the timeout and counts as failed.
	k.timeout = 10 * time.Millisecond
	k.barrier = func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }
	mu.Lock()
	now = now.Add(time.Second)
	mu.Unlock()
	if k.refresh(context.Background()) {
		t.Fatal("a refresh that timed out reported success")
	}
	// A waiter whose own context ends stops waiting.
	block := make(chan struct{})
	k.timeout = time.Hour
	k.barrier = func(ctx context.Context) error { started <- struct{}{}; <-block; return errors.New("done") }
	mu.Lock()
	now = now.Add(time.Second)
	mu.Unlock()
	go k.refresh(context.Background())
	<-started
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if k.refresh(ctx) {
		t.Fatal("a waiter with a cancelled context reported a refresh")
	}
	close(block)
}

// Whatever the configuration, the throttle policy is one apply accepts.
func TestThrottleDefaultsAreValid(t *testing.T) {
	for _, in := range []Throttle{{}, {AddrFree: 1 << 30, LoginFree: 1 << 30, LoginCeiling: 1 << 30, Window: 1 << 62, Trust: 1 << 62, MaxDelay: 1 << 62, BaseDelay: 1 << 62},
		{BaseDelay: time.Hour, MaxDelay: time.Second, Window: time.Millisecond}} {
		in.applyDefaults()
		for _, ceiling := range []bool{false, true} {
			at := &statev1.LoginAttempt{Login: "x", AddrHash: addrHash("192.0.2.1"), Policy: in.policy(ceiling)}
			if err := fsm.ValidateLoginAttempt(at); err != nil {
				t.Errorf("%+v, ceiling %v: %v", in, ceiling, err)
			}
		}
	}
	if a, b := addrHash("2001:db8::1"), addrHash("2001:db8::2"); string(a) != string(b) {
		t.Error("two addresses of one /64 count apart")
	}
	if a, b := addrHash("192.0.2.1"), addrHash("::ffff:192.0.2.1"); string(a) != string(b) {
		t.Error("an IPv4 address and its IPv6-mapped form count apart")
	}
}
