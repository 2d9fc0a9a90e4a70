package api

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
)

// Defaults of FetchLimits.
const (
	DefaultMaxFetches        = 64
	DefaultFetchWait         = 2 * time.Second
	DefaultFetchWriteTimeout = 10 * time.Second
)

// FetchLimits bound the FetchMailbox calls one node reads and answers at
// once. A call holds its page (up to fsm.MaxMailboxPageBytes, 1 MiB)
// several times over from the moment it reads it until its answer is
// written (the entries, the encoded answer, gzip's state and output:
// some 4 MiB), and every session an edge starts fetches: in a reconnect
// storm, unbounded, a node held hundreds of pages at once, and an edge
// that stopped reading held its pages for as long as its connection
// lived.
//
// A call takes its place once its read barrier passed (the round trip to
// the leader holds nothing worth bounding) and keeps it until its answer
// is written or its write deadline passed; a call that finds every place
// taken waits for one, then is answered unavailable with Retry-After
// (an edge then reads from another node, and the session retries
// without refusing the deliveries it holds meanwhile).
type FetchLimits struct {
	// Max is how many calls the node reads and answers at once
	// [DefaultMaxFetches].
	Max int
	// PerSource is how many of them one source (an edge's address,
	// exactly) may hold [Max/4, at least 1], so that an edge that stopped
	// reading cannot take them all.
	PerSource int
	// Wait is how long a call waits for a place before it is answered
	// unavailable [DefaultFetchWait].
	Wait time.Duration
	// WriteTimeout bounds the time from taking a place to the answer's
	// last byte [DefaultFetchWriteTimeout]; a reader that does not take
	// the answer by then has its stream reset and its place freed (an
	// edge gives up on a fetch after 5 s anyway). A connection whose TCP
	// window stays shut is closed after Limits.WriteByteTimeout instead:
	// the reset cannot get out before.
	WriteTimeout time.Duration
}

func (l *FetchLimits) applyDefaults() {
	if l.Max <= 0 {
		l.Max = DefaultMaxFetches
	}
	if l.PerSource <= 0 {
		l.PerSource = max(l.Max/4, 1)
	}
	l.PerSource = min(l.PerSource, l.Max)
	if l.Wait <= 0 {
		l.Wait = DefaultFetchWait
	}
	if l.WriteTimeout <= 0 {
		l.WriteTimeout = DefaultFetchWriteTimeout
	}
}

// fetchLimiter is FetchLimits at work.
type fetchLimiter struct {
	cfg     FetchLimits
	slots   chan struct{}
	refused *prometheus.CounterVec
	inUse   prometheus.GaugeFunc

	mu      sync.Mutex // guards sources
	sources map[netip.Addr]*fetchSource
}

// fetchSource is one source's places, while it has calls holding or
// waiting for one.
type fetchSource struct {
	slots chan struct{}
	users int // guarded by fetchLimiter.mu
}

func newFetchLimiter(cfg FetchLimits) *fetchLimiter {
	cfg.applyDefaults()
	l := &fetchLimiter{cfg: cfg, slots: make(chan struct{}, cfg.Max), sources: map[netip.Addr]*fetchSource{},
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_control_mailbox_fetches_refused_total",
			Help: "FetchMailbox calls answered unavailable because every place to read and answer one was taken for the whole wait, by reason: node (the node's), source (the calling edge's share).",
		}, []string{"reason"}),
	}
	l.inUse = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "relay_control_mailbox_fetches_in_flight",
		Help: "FetchMailbox calls holding a place: reading their page or writing their answer.",
	}, func() float64 { return float64(len(l.slots)) })
	l.refused.WithLabelValues("node")
	l.refused.WithLabelValues("source")
	return l
}

func (l *fetchLimiter) register(reg prometheus.Registerer) {
	if reg != nil {
		reg.MustRegister(l.refused, l.inUse)
	}
}

// fetchHoldKey carries a *fetchHold in a request's context.
type fetchHoldKey struct{}

// fetchHold is one FetchMailbox request's place, taken by the handler
// and given back by wrap once the answer is written.
type fetchHold struct {
	src     netip.Addr
	rc      *http.ResponseController
	release func()
}

// wrap gives each FetchMailbox request under h a hold: the place its
// handler takes is kept until the answer is written (the page's copies
// live until then), and only then given back.
func (l *fetchLimiter) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != edgev1connect.MailboxServiceFetchMailboxProcedure {
			h.ServeHTTP(w, r)
			return
		}
		hold := &fetchHold{rc: http.NewResponseController(w)}
		if ap, err := netip.ParseAddrPort(r.RemoteAddr); err == nil {
			hold.src = ap.Addr().Unmap()
		}
		defer func() {
			if hold.release != nil {
				hold.release()
			}
		}()
		h.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), fetchHoldKey{}, hold)))
	})
}

// BusyHeader marks a call refused for load, to be made again shortly
// (with Retry-After), apart from any other unavailable answer: a proxy's
// 503 in an outage is not a node that is busy but answering.
const BusyHeader = "Relay-Busy"

// errFetchesBusy is the message of a fetch refused for want of a place.
var errFetchesBusy = errors.New("this node reads as many mailboxes as it may at once")

// acquire takes a place for the FetchMailbox call of ctx, waiting at most
// the configured wait. Under wrap, the place is kept until the answer is
// written, and done does nothing; else done gives it back (call it when
// the handler returns).
func (l *fetchLimiter) acquire(ctx context.Context) (done func(), _ error) {
	hold, _ := ctx.Value(fetchHoldKey{}).(*fetchHold)
	var src netip.Addr
	if hold != nil {
		src = hold.src
	}
	release, reason := l.take(ctx, src)
	if release == nil {
		if ctx.Err() != nil {
			return nil, connect.NewError(connect.CodeCanceled, ctx.Err())
		}
		l.refused.WithLabelValues(reason).Inc()
		err := connect.NewError(connect.CodeUnavailable, fmt.Errorf("%w (%d, %d per edge); read from another node, or again shortly", errFetchesBusy, l.cfg.Max, l.cfg.PerSource))
		err.Meta().Set("Retry-After", "1")
		err.Meta().Set(BusyHeader, "mailbox-fetches")
		return nil, err
	}
	if hold == nil {
		return release, nil
	}
	hold.release = release
	_ = hold.rc.SetWriteDeadline(time.Now().Add(l.cfg.WriteTimeout))
	return func() {}, nil
}

// take takes a place of the source's, then one of the node's, waiting at
// most the configured wait for both; without one, reason says whose was
// missing.
func (l *fetchLimiter) take(ctx context.Context, src netip.Addr) (release func(), reason string) {
	l.mu.Lock()
	s := l.sources[src]
	if s == nil {
		s = &fetchSource{slots: make(chan struct{}, l.cfg.PerSource)}
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
	t := time.NewTimer(l.cfg.Wait)
	defer t.Stop()
	select {
	case s.slots <- struct{}{}:
	case <-ctx.Done():
		leave()
		return nil, "source"
	case <-t.C:
		leave()
		return nil, "source"
	}
	select {
	case l.slots <- struct{}{}:
	case <-ctx.Done():
		<-s.slots
		leave()
		return nil, "node"
	case <-t.C:
		<-s.slots
		leave()
		return nil, "node"
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			<-l.slots
			<-s.slots
			leave()
		})
	}, ""
}
