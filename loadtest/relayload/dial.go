package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/edge-relay/relay/edge/client"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// pacer bounds the session attempts in flight by what the edge
// accepts, additive increase, multiplicative decrease (as TCP's
// congestion window): every attempt that comes up quickly lets one more
// start; a failure, or one slower than slow, halves the window. Firing
// a fixed number of parallel dials at an edge that is busy with TLS
// handshakes only makes attempts time out after the edge has paid for
// them.
type pacer struct {
	slow time.Duration
	max  float64

	mu       sync.Mutex // guards the fields below
	window   float64
	inflight int
	wake     chan struct{} // closed and replaced when a slot frees
}

func newPacer(maxInFlight int, slow time.Duration) *pacer {
	return &pacer{slow: slow, max: float64(max(maxInFlight, 1)), window: min(4, float64(max(maxInFlight, 1))), wake: make(chan struct{})}
}

// acquire waits for a slot.
func (p *pacer) acquire(ctx context.Context) error {
	for {
		p.mu.Lock()
		if float64(p.inflight) < p.window {
			p.inflight++
			p.mu.Unlock()
			return nil
		}
		wake := p.wake
		p.mu.Unlock()
		select {
		case <-wake:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// release frees the slot and adjusts the window by how the attempt went.
func (p *pacer) release(ok bool, took time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.inflight--
	if ok && took < p.slow {
		p.window = min(p.max, p.window+1/p.window*4)
	} else {
		p.window = max(1, p.window/2)
	}
	close(p.wake)
	p.wake = make(chan struct{})
}

func (p *pacer) current() float64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.window
}

// cause names why a session attempt failed, for the failures-by-cause
// report: the edge's protocol code when it sent one, else what the
// transport saw.
func cause(err error) string {
	var ce *client.Error
	var ae *quic.ApplicationError
	var te *quic.TransportError
	var ite *quic.IdleTimeoutError
	var hte *quic.HandshakeTimeoutError
	var ne net.Error
	switch {
	case errors.As(err, &ce):
		return strings.TrimPrefix(ce.Code.String(), "ERROR_CODE_")
	case errors.As(err, &hte):
		return "quic_handshake_timeout"
	case errors.As(err, &ite):
		return "quic_idle_timeout"
	case errors.As(err, &ae):
		if ae.ErrorMessage != "" {
			return "closed_by_edge: " + ae.ErrorMessage
		}
		return fmt.Sprintf("closed_by_edge: code %d", ae.ErrorCode)
	case errors.As(err, &te):
		return "quic_transport: " + te.ErrorCode.String()
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, context.Canceled):
		return "canceled"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection_refused"
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	}
	return "other"
}

// retryable: worth another attempt after a pause. The edge's verdicts
// on the device (AUTH_FAILED, REVOKED, ...) are not.
func retryable(err error) bool {
	var ce *client.Error
	if errors.As(err, &ce) {
		return ce.Retryable() || ce.Code == relayv1.ErrorCode_ERROR_CODE_SESSION_EXPIRED
	}
	return !errors.Is(err, context.Canceled)
}

// connect brings one device's session up: paced, retried with
// exponential backoff and jitter, every failed attempt counted by cause
// in r (as "<cause>"), and the successful attempt's time (dial to
// Welcome, not the wait for a slot) observed as latency `metric`.
func (dl *dialer) connect(ctx context.Context, p *pacer, r *result, metric string, dev device, ticket []byte) (*client.Client, error) {
	backoff := 100 * time.Millisecond
	var last error
	for attempt := 0; attempt < max(dl.d.retries, 1); attempt++ {
		if attempt > 0 {
			r.count("retries", 1)
			t := time.NewTimer(backoff/2 + rand.N(backoff/2+1))
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return nil, ctx.Err()
			}
			backoff = min(backoff*2, 5*time.Second)
		}
		if err := p.acquire(ctx); err != nil {
			return nil, err
		}
		t0 := time.Now()
		c, err := dl.dialTicket(ctx, dev, ticket)
		p.release(err == nil, time.Since(t0))
		if err == nil {
			r.observe(metric, time.Since(t0))
			return c, nil
		}
		last = err
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		r.fail(cause(err))
		if !retryable(err) {
			break
		}
	}
	return nil, last
}
