package api

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/edge-relay/relay/internal/connbound"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
)

// Defaults of FetchLimits.
const (
	DefaultMaxFetches = 64
	DefaultFetchWait  = 2 * time.Second
)

// FetchLimits bound the FetchMailbox calls one node serves at once. A
// call holds a page of up to fsm.MaxMailboxPageBytes (1 MiB) several
// times over while it is read, encoded, compressed and written (some
// 4 MiB), and each session an edge starts for a device with stored
// entries fetches: in a reconnect storm, unbounded, a node held hundreds
// of them at once.
type FetchLimits struct {
	// Max is how many calls the node serves at once [DefaultMaxFetches];
	// one source (an edge's IPv4 address, or IPv6 /64) holds at most a
	// quarter of them, so one edge that stopped reading cannot take them
	// all.
	Max int
	// Wait is how long a call beyond them waits for a place before it is
	// answered unavailable [DefaultFetchWait]; the edge then fetches from
	// another node, and its session retries in the background.
	Wait time.Duration
}

func (l *FetchLimits) applyDefaults() {
	if l.Max <= 0 {
		l.Max = DefaultMaxFetches
	}
	if l.Wait <= 0 {
		l.Wait = DefaultFetchWait
	}
}

// fetchLimiter is FetchLimits at work.
type fetchLimiter struct {
	next      http.Handler
	wait      time.Duration
	perSource int
	slots     chan struct{}
	refused   prometheus.Counter

	mu      sync.Mutex // guards sources
	sources map[netip.Addr]*fetchSource
}

// fetchSource is one source's places, while it has calls.
type fetchSource struct {
	slots chan struct{}
	users int // calls holding or waiting for a place; guarded by mu
}

// LimitFetches wraps MailboxService's handler (path and h from
// edgev1connect.NewMailboxServiceHandler) with lim; its refusals count
// on relay_control_mailbox_fetches_refused_total in reg (nil: none).
// Mounted behind the authentication guard, only callers that presented
// valid credentials wait for a place.
func LimitFetches(h http.Handler, lim FetchLimits, reg prometheus.Registerer) http.Handler {
	lim.applyDefaults()
	l := &fetchLimiter{next: h, wait: lim.Wait, perSource: max(lim.Max/4, 1), slots: make(chan struct{}, lim.Max),
		sources: map[netip.Addr]*fetchSource{},
		refused: prometheus.NewCounter(prometheus.CounterOpts{Name: "relay_control_mailbox_fetches_refused_total",
			Help: "FetchMailbox calls answered unavailable because this node served as many as it may at once (or their source a quarter of them) for the whole wait; edges then fetch from another node."}),
	}
	if reg != nil {
		reg.MustRegister(l.refused)
	}
	return l
}

var errFetchesBusy = errors.New("this node serves as many mailbox fetches as it may at once: fetch from another node, or again shortly")

func (l *fetchLimiter) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != edgev1connect.MailboxServiceFetchMailboxProcedure {
		l.next.ServeHTTP(w, r)
		return
	}
	release, ok := l.acquire(r.Context(), sourceOf(r.RemoteAddr))
	if !ok {
		l.refused.Inc()
		_ = connect.NewErrorWriter().Write(w, r, connect.NewError(connect.CodeUnavailable, errFetchesBusy))
		return
	}
	defer release()
	// The place is held until the answer is written: the page's copies
	// live until then.
	l.next.ServeHTTP(w, r)
}

// acquire takes a place of the source's, then one of the node's, waiting
// at most l.wait for both.
func (l *fetchLimiter) acquire(ctx context.Context, src netip.Addr) (release func(), ok bool) {
	l.mu.Lock()
	s := l.sources[src]
	if s == nil {
		s = &fetchSource{slots: make(chan struct{}, l.perSource)}
		l.sources[src] = s
	}
	s.users++
	l.mu.Unlock()
	leave := func() {
		l.mu.Lock()
		if s.users--; s.users == 0 {
			delete(l.sources, src)
		}
		l.mu.Unlock()
	}
	t := time.NewTimer(l.wait)
	defer t.Stop()
	select {
	case s.slots <- struct{}{}:
	case <-ctx.Done():
		leave()
		return nil, false
	case <-t.C:
		leave()
		return nil, false
	}
	select {
	case l.slots <- struct{}{}:
	case <-ctx.Done():
		<-s.slots
		leave()
		return nil, false
	case <-t.C:
		<-s.slots
		leave()
		return nil, false
	}
	return func() {
		<-l.slots
		<-s.slots
		leave()
	}, true
}

// sourceOf is the source an HTTP request's remote address counts against
// (connbound.SourceOf).
func sourceOf(remote string) netip.Addr {
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		return netip.Addr{}
	}
	return connbound.SourceOf(net.TCPAddrFromAddrPort(ap))
}
