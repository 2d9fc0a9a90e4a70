// Package mailbox is the edge's client of the control plane's mailboxes.
// Entries from every session of the edge go through one writer that
// batches them into ordered PutMailbox calls (one Raft entry each: at
// most MaxBatchBytes, what the control plane proposes at once), so
// many sessions share a commit and a sender's entries keep their order;
// acknowledged entries are deleted in batches too.
package mailbox

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/time/rate"

	"github.com/edge-relay/relay/edge/session"
	"github.com/edge-relay/relay/internal/jitter"
	"github.com/edge-relay/relay/internal/telemetry"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
)

// API is the part of the control plane's MailboxService the client uses
// (edge/controlconn provides it).
type API interface {
	PutMailbox(ctx context.Context, entries []*edgev1.MailboxEntry) (*edgev1.PutMailboxResponse, error)
	FetchMailbox(ctx context.Context, deviceID string, after uint64, limit, maxBytes uint32) (*edgev1.FetchMailboxResponse, error)
	// AckMailbox deletes a device's entries, by their seqs in history
	// (refused when the control plane's is another).
	AckMailbox(ctx context.Context, deviceID, history string, seqs []uint64) error
	ClaimEvents(ctx context.Context, claims []*edgev1.EventClaim) (*edgev1.ClaimEventsResponse, error)
}

// Result is the outcome of storing one entry: the session core's type,
// so that a Client is a session.Mailbox as it is.
type Result = session.MailboxResult

var _ session.Mailbox = (*Client)(nil)

// ErrOverloaded is the result of Store when too many entries wait.
var ErrOverloaded = errors.New("mailbox writer overloaded")

// ErrStopped is the result of Store, and Flush's error, once the writer
// has stopped (its Run returned), and of what was still queued then.
var ErrStopped = errors.New("mailbox writer stopped")

// ErrUnavailable is the result (wrapped, with the cause) of an entry the
// control plane did not take within RetryFor of its Store, and of Store
// while calls are known to fail (see Config.ProbeAfter).
var ErrUnavailable = errors.New("control plane unavailable")

// ErrTooLarge is the result of Store for an entry whose event is larger
// than the control plane stores (MaxEventBytes): refused alone, before it
// could fail the batch it would have gone in. It is a
// session.ErrMailboxEventTooLarge, which the session core tells the
// sender as PAYLOAD_TOO_LARGE (a retry cannot succeed).
var ErrTooLarge = fmt.Errorf("mailbox entry's event over %d bytes: %w", MaxEventBytes, session.ErrMailboxEventTooLarge)

// MaxEventBytes is the largest event a mailbox stores (the control
// plane's fsm.MaxMailboxEventBytes).
const MaxEventBytes = 256 << 10

// MaxEntryTTL is the longest an entry may live from when the edge stores
// it: the control plane refuses an expiry more than fsm.MaxMailboxTTLMs
// (366 days) after its own clock, and refuses the whole call with it; a
// day less leaves room for the two clocks to differ. An edge's MaxTTL
// plus SkewTolerance must stay within it (relayd edge checks at start).
const MaxEntryTTL = 365 * 24 * time.Hour

// Config configures a Client. Zero fields take the defaults in brackets.
type Config struct {
	API API
	// MaxBatch bounds the entries of one PutMailbox [256].
	MaxBatch int
	// MaxPending bounds the entries waiting to be written [65536], and
	// MaxPendingBytes their events' bytes [256 MiB]: beyond either, Store
	// answers ErrOverloaded at once.
	MaxPending      int
	MaxPendingBytes int
	// MaxPendingClaims bounds the claims waiting to be sent [65536]:
	// beyond it (a control plane that has not answered for long) a claim
	// counts as won at once, as one the control plane cannot decide in
	// time does.
	MaxPendingClaims int
	// MaxBatchBytes bounds the events' bytes of one PutMailbox [1 MiB:
	// the most the control plane proposes in one Raft command
	// (api.MaxCommandEventBytes), so that a call is one command, stored
	// whole or not at all; a larger call is proposed in several, and a
	// retry after one of them failed may store again what was acked
	// meanwhile. The control plane refuses a call over 16 MiB whole].
	MaxBatchBytes int
	// History names the control plane's history (the watch feed's;
	// edge/directory's History) [none: acks unchecked]. A page fetched
	// carries the one named before it was read, and its entries' acks
	// are sent in it: an ack of an entry read before a restore is refused
	// after it, not applied to the restored history's entries of the same
	// seqs.
	History func() string
	// RetryFor bounds how long an entry or a claim waits for the control
	// plane, from its Store or Claim: its call is retried while the
	// control plane is unavailable (retries are safe: a stored entry is
	// stored once) until the oldest entry of the batch has waited this
	// long (the call under way then still gets at least a second: one cut
	// off sooner may commit all the same, and its entries come back as
	// resends), and one that has waited this long when its batch is taken
	// is answered without a call (ErrUnavailable; a claim as won) [30s].
	RetryFor time.Duration
	// ProbeAfter: once a batch gave up on a control plane that has not
	// answered for RetryFor, what is queued behind it is answered at once
	// (ErrUnavailable; claims as won), and so is every Store (Claim) for
	// this long; then the next batch is a probe, one attempt, which
	// either ends this (the control plane answered) or starts it again.
	// Puts and claims each have their own [1s].
	ProbeAfter time.Duration
	// Logger [slog.Default()]; Registerer for metrics [none]; Tracer
	// [none]: with one, a PutMailbox call is a span in the trace of its
	// first traced entry, linked to the others' (a batch serves many
	// events, a span has one parent).
	Logger     *slog.Logger
	Registerer prometheus.Registerer
	Tracer     trace.Tracer
}

// ackKey groups queued acks: a device's seqs in one history.
type ackKey struct{ device, history string }

type pending struct {
	entry  *edgev1.MailboxEntry
	done   func(Result)
	queued time.Time // when Store took it
}

func (p pending) bytes() int { return len(p.entry.GetEvent()) }

type pendingClaim struct {
	claim  *edgev1.EventClaim
	done   func(won bool)
	queued time.Time // when Claim took it
}

// circuit keeps the calls of one kind (puts, claims) from making each
// batch wait RetryFor on a control plane known to be out of reach.
type circuit struct {
	down     bool      // a batch gave up since the last answer
	until    time.Time // while down: answer at once until then, then probe
	cause    error     // the failure that gave up
	answered time.Time // the last answer to a call
}

// fastFail is the error to answer at once with, while the circuit is
// down and before its probe is due (with Client.mu held).
func (b *circuit) fastFail(now time.Time) error {
	if !b.down || !now.Before(b.until) {
		return nil
	}
	return fmt.Errorf("%w: %w", ErrUnavailable, b.cause)
}

// Client is safe for concurrent use; Run drives it.
type Client struct {
	cfg Config

	mu          sync.Mutex // guards the fields below
	queue       []pending
	queuedBytes int // of the events in queue
	// full remembers, per device, until when its mailbox is taken as
	// full: the control plane answered FULL, and no ack for it went out
	// since. Entries for it are answered FULL at once until then, not put
	// through Raft to be refused there: without it a device broadcasting
	// to many offline devices of its account would write every event into
	// the log of every control node long after their mailboxes filled.
	full map[string]time.Time
	// An ack lifts a device's mark twice: when it is queued, and once it
	// is written (the room is made then; a call made in between may have
	// been answered FULL, which marked the device again). sending holds
	// the devices of the entries in the call under way (the writer makes
	// one at a time), each true once an ack for it was written during the
	// call: a FULL the call gets for such a device marks nothing, as that
	// ack may have made the room the call did not find.
	sending map[string]bool
	claims  []pendingClaim
	acks    map[ackKey][]uint64
	// failed counts the entries whose call failed, lastFailure is the
	// last such error: Flush tells what failed while it waited.
	failed      uint64
	lastFailure error
	closed      bool
	wake        chan struct{} // capacity 1: entries queued
	ackNow      chan struct{} // capacity 1: acks queued
	claimNow    chan struct{} // capacity 1: claims queued
	puts        circuit
	claimCalls  circuit

	// busyRefused counts the reads refused as busy since the operator
	// was last told of them, which busyLog spaces.
	busyRefused atomic.Int64
	busyLog     rate.Sometimes

	batchSize prometheus.Histogram
	commit    prometheus.Histogram
	results   *prometheus.CounterVec
	fetches   *prometheus.CounterVec
}

// busyTellEvery spaces the warnings that mailbox reads were refused as
// busy: in a reconnect storm every session's first read may be.
const busyTellEvery = 10 * time.Second

// New returns a client; call Run to start it.
func New(cfg Config) (*Client, error) {
	if cfg.API == nil {
		return nil, errors.New("mailbox: API is required")
	}
	if cfg.MaxBatch <= 0 {
		cfg.MaxBatch = 256
	}
	if cfg.MaxPending <= 0 {
		cfg.MaxPending = 1 << 16
	}
	if cfg.MaxPendingBytes <= 0 {
		cfg.MaxPendingBytes = 256 << 20
	}
	if cfg.MaxPendingClaims <= 0 {
		cfg.MaxPendingClaims = 1 << 16
	}
	if cfg.MaxBatchBytes <= 0 {
		cfg.MaxBatchBytes = 1 << 20
	}
	if cfg.RetryFor <= 0 {
		cfg.RetryFor = 30 * time.Second
	}
	if cfg.ProbeAfter <= 0 {
		cfg.ProbeAfter = time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	c := &Client{
		cfg: cfg, acks: map[ackKey][]uint64{}, wake: make(chan struct{}, 1), ackNow: make(chan struct{}, 1), claimNow: make(chan struct{}, 1),
		busyLog: rate.Sometimes{Interval: busyTellEvery},
		batchSize: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "relay_edge_mailbox_batch_entries", Help: "Entries per PutMailbox call.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 10),
		}),
		commit: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "relay_edge_mailbox_commit_seconds", Help: "PutMailbox calls, from sending to the committed result.",
			Buckets: prometheus.ExponentialBuckets(250e-6, 2, 14),
		}),
		results: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_edge_mailbox_entries_total", Help: "Mailbox entries written, by outcome.",
		}, []string{"result"}),
		fetches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_edge_mailbox_fetches_total",
			Help: "Mailbox reads (FetchMailbox calls), by outcome: ok, busy (the control node read as many as it may at once; the session reads again shortly), error.",
		}, []string{"result"}),
	}
	for _, r := range []string{"ok", "busy", "error"} {
		c.fetches.WithLabelValues(r)
	}
	// Every outcome exists from the start, so rate() and increase() see
	// the first failure.
	c.results.WithLabelValues("error")
	for v := range edgev1.MailboxStatus_name {
		if st := edgev1.MailboxStatus(v); st != edgev1.MailboxStatus_MAILBOX_STATUS_UNSPECIFIED {
			c.results.WithLabelValues(statusLabel(st))
		}
	}
	if cfg.Registerer != nil {
		for _, m := range []prometheus.Collector{c.batchSize, c.commit, c.results, c.fetches} {
			if err := cfg.Registerer.Register(m); err != nil {
				return nil, err
			}
		}
	}
	return c, nil
}

func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// Store queues an entry; done is called exactly once, from the writer,
// with its outcome. Entries are written in the order Store was called.
func (c *Client) Store(e *edgev1.MailboxEntry, done func(Result)) {
	now := time.Now()
	p := pending{entry: e, done: done, queued: now}
	if p.bytes() > MaxEventBytes {
		c.results.WithLabelValues("error").Inc()
		done(Result{Err: ErrTooLarge})
		return
	}
	c.mu.Lock()
	if err := c.puts.fastFail(now); err != nil {
		c.mu.Unlock()
		c.results.WithLabelValues("error").Inc()
		done(Result{Err: err})
		return
	}
	if until, ok := c.full[e.GetDeviceId()]; ok && now.Before(until) {
		c.mu.Unlock()
		c.results.WithLabelValues(statusLabel(edgev1.MailboxStatus_MAILBOX_STATUS_FULL)).Inc()
		done(Result{Status: edgev1.MailboxStatus_MAILBOX_STATUS_FULL})
		return
	}
	if c.closed || len(c.queue) >= c.cfg.MaxPending || c.queuedBytes+p.bytes() > c.cfg.MaxPendingBytes {
		closed := c.closed
		c.mu.Unlock()
		err := ErrOverloaded
		if closed {
			err = ErrStopped
		}
		done(Result{Err: err})
		return
	}
	c.queue = append(c.queue, p)
	c.queuedBytes += p.bytes()
	c.mu.Unlock()
	signal(c.wake)
}

// Fetch reads a device's entries after seq. The page names the history
// known before the read: if the control plane moved to another one
// meanwhile, the acks of its entries are refused and they come again,
// rather than deleting another history's entries.
func (c *Client) Fetch(ctx context.Context, deviceID string, after uint64, limit, maxBytes int) (session.MailboxPage, error) {
	var history string
	if c.cfg.History != nil {
		history = c.cfg.History()
	}
	resp, err := c.cfg.API.FetchMailbox(ctx, deviceID, after, clampUint32(limit), clampUint32(maxBytes))
	switch {
	case busy(err):
		c.fetches.WithLabelValues("busy").Inc()
		c.tellBusy(err)
		return session.MailboxPage{}, fmt.Errorf("fetch mailbox of %s: %w: %w", deviceID, session.ErrMailboxBusy, err)
	case err != nil:
		c.fetches.WithLabelValues("error").Inc()
		return session.MailboxPage{}, fmt.Errorf("fetch mailbox of %s: %w", deviceID, err)
	}
	c.fetches.WithLabelValues("ok").Inc()
	return session.MailboxPage{Entries: resp.GetEntries(), More: resp.GetMore(), Revision: resp.GetRevision(), History: history}, nil
}

// busyHeader marks a call the control plane refused for load
// (control/api.BusyHeader; the edge does not link the control plane's
// packages).
const busyHeader = "Relay-Busy"

// busy reports whether the control plane refused a call for load, to be
// made again shortly (unavailable, marked busyHeader), as a node that
// reads as many mailboxes as it may at once does (control/api's
// FetchLimits): the call goes to the next node, and the session keeps
// what it holds behind the mailbox meanwhile. Any other unavailable
// answer (a proxy's 503 in an outage) is a failure.
func busy(err error) bool {
	var ce *connect.Error
	return errors.As(err, &ce) && ce.Code() == connect.CodeUnavailable && ce.Meta().Get(busyHeader) != ""
}

// tellBusy warns, at most every busyTellEvery, how many mailbox reads the
// control plane refused as busy; each session logs its own at debug.
func (c *Client) tellBusy(err error) {
	c.busyRefused.Add(1)
	c.busyLog.Do(func() {
		c.cfg.Logger.Warn("the control plane refused mailbox reads as busy; sessions read again shortly (see relay_control_mailbox_fetches_refused_total, --mailbox-fetches)",
			"refused_since_last", c.busyRefused.Swap(0), "err", err)
	})
}

// clampUint32 is n as a request's count, 0 for a negative n.
func clampUint32(n int) uint32 {
	return uint32(min(max(n, 0), math.MaxUint32))
}

// Ack queues deletions of a device's entries, read from a page of
// history (MailboxPage.History; "": unchecked), written in batches.
func (c *Client) Ack(deviceID, history string, seqs ...uint64) {
	if len(seqs) == 0 {
		return
	}
	k := ackKey{device: deviceID, history: history}
	c.mu.Lock()
	c.acks[k] = append(c.acks[k], seqs...)
	delete(c.full, deviceID) // the acks make room
	c.mu.Unlock()
	signal(c.ackNow)
}

// Run writes entries and acknowledgements until ctx ends, then fails what
// is still queued.
func (c *Client) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Go(func() { c.ackLoop(ctx) })
	wg.Go(func() { c.claimLoop(ctx) })
	c.writeLoop(ctx)
	wg.Wait()
	c.mu.Lock()
	c.closed = true
	rest, claims := c.queue, c.claims
	c.queue, c.claims, c.queuedBytes = nil, nil, 0
	c.mu.Unlock()
	for _, p := range rest {
		p.done(Result{Err: fmt.Errorf("edge shutting down: %w", ErrStopped)})
	}
	for _, p := range claims {
		p.done(true)
	}
}

// Claim asks the control plane whether a device takes an "any one"
// event; done gets the answer once (true too when the control plane
// could not be asked in time: a duplicate is better than a loss).
// Claims are sent in batches.
func (c *Client) Claim(cl *edgev1.EventClaim, done func(won bool)) {
	now := time.Now()
	c.mu.Lock()
	if c.closed || len(c.claims) >= c.cfg.MaxPendingClaims || c.claimCalls.fastFail(now) != nil {
		c.mu.Unlock()
		done(true)
		return
	}
	c.claims = append(c.claims, pendingClaim{claim: cl, done: done, queued: now})
	c.mu.Unlock()
	signal(c.claimNow)
}

func (c *Client) claimLoop(ctx context.Context) {
	drain(ctx, c, c.claimNow, &c.claims, nil, func(batch []pendingClaim) {
		// Those that waited RetryFor already count as won, uncalled.
		now := time.Now()
		late := 0
		for late < len(batch) && !now.Before(batch[late].queued.Add(c.cfg.RetryFor)) {
			batch[late].done(true)
			late++
		}
		if batch = batch[late:]; len(batch) == 0 {
			return
		}
		claims := make([]*edgev1.EventClaim, len(batch))
		for i, p := range batch {
			claims[i] = p.claim
		}
		resp, err := callUnder(ctx, c, &c.claimCalls, "claims", batch[0].queued.Add(c.cfg.RetryFor),
			func(ctx context.Context) (*edgev1.ClaimEventsResponse, error) {
				return c.cfg.API.ClaimEvents(ctx, claims)
			})
		switch {
		case errors.Is(err, ErrUnavailable):
			// callUnder logged that the control plane is out of reach.
			c.cfg.Logger.Debug("could not claim events; delivering them as claimed", "claims", len(batch), "err", err)
		case err != nil:
			c.cfg.Logger.Warn("could not claim events; delivering them as claimed", "claims", len(batch), "err", err)
		}
		won := resp.GetWon()
		for i, p := range batch {
			p.done(err != nil || (i < len(won) && won[i]))
		}
	})
}

// drain hands handle the queued items in batches of at most MaxBatch
// and, when size is set, MaxBatchBytes (but at least one item), one batch
// at a time, each time wake fires, until ctx ends. The bytes it takes
// off the queue come off queuedBytes.
func drain[T any](ctx context.Context, c *Client, wake chan struct{}, queue *[]T, size func(T) int, handle func([]T)) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-wake:
		}
		for {
			c.mu.Lock()
			n := min(len(*queue), c.cfg.MaxBatch)
			if size != nil {
				bytes := 0
				for i, it := range (*queue)[:n] {
					if bytes += size(it); bytes > c.cfg.MaxBatchBytes && i > 0 {
						n = i
						break
					}
				}
				for _, it := range (*queue)[:n] {
					c.queuedBytes -= size(it)
				}
			}
			batch := append([]T(nil), (*queue)[:n]...)
			*queue = (*queue)[n:]
			if len(*queue) == 0 {
				*queue = nil // let the backing array go
			}
			c.mu.Unlock()
			if n == 0 {
				break
			}
			handle(batch)
		}
	}
}

// callTimeout bounds one call to the control plane.
const callTimeout = 10 * time.Second

// callUnder makes a batch's call under its circuit (kind names the calls
// in logs): at once an error while the circuit is down and its probe not
// due; one attempt when it is due; else retries until deadline (when the
// batch's oldest item has waited RetryFor). A batch that gives up when
// the control plane has not answered for RetryFor puts the circuit down,
// so that what is queued behind it is answered at once rather than a
// RetryFor per batch; any answer lifts it. (A batch that gives up on a
// control plane that answered the batch before it, slowly, fails alone:
// the next batch's items have had their own wait.)
func callUnder[T any](ctx context.Context, c *Client, b *circuit, kind string, deadline time.Time, call func(context.Context) (T, error)) (T, error) {
	c.mu.Lock()
	now := time.Now()
	err, probe := b.fastFail(now), b.down
	c.mu.Unlock()
	if err != nil {
		var zero T
		return zero, err
	}
	resp, err := retry(ctx, c, deadline, probe, call)
	var wasDown, isDown bool
	c.mu.Lock()
	switch wasDown = b.down; {
	case err == nil || permanent(err):
		b.down, b.cause, b.answered = false, nil, time.Now()
	case ctx.Err() == nil:
		if now := time.Now(); b.down || now.Sub(b.answered) >= c.cfg.RetryFor {
			b.down, b.until, b.cause = true, now.Add(c.cfg.ProbeAfter), err
		}
		err = fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	isDown = b.down
	c.mu.Unlock()
	switch {
	case wasDown && !isDown:
		c.cfg.Logger.Info("control plane answers again", "calls", kind)
	case !wasDown && isDown:
		c.cfg.Logger.Warn("control plane unavailable: answering at once until a probe gets through",
			"calls", kind, "probe_after", c.cfg.ProbeAfter, "err", err)
	}
	return resp, err
}

// minCall is the least time a call to the control plane is given, even
// when its batch's deadline is nearer: a call cut off sooner may still
// commit on the control plane, and its entries, answered unavailable,
// would come back as resends.
const minCall = time.Second

// retry calls the control plane until it answers, while it is unavailable
// and until deadline (the calls are idempotent): no call starts after
// deadline, and each runs until deadline, or minCall, whichever is later
// (at most callTimeout); once only when once is set.
func retry[T any](ctx context.Context, c *Client, deadline time.Time, once bool, call func(context.Context) (T, error)) (T, error) {
	backoff := 20 * time.Millisecond
	for {
		now := time.Now()
		callDeadline := now.Add(callTimeout)
		if deadline.Before(callDeadline) {
			callDeadline = deadline
			if floor := now.Add(minCall); callDeadline.Before(floor) {
				callDeadline = floor
			}
		}
		cctx, cancel := context.WithDeadline(ctx, callDeadline)
		resp, err := call(cctx)
		cancel()
		if err == nil {
			return resp, nil
		}
		if permanent(err) {
			return resp, err
		}
		if once || ctx.Err() != nil || time.Now().Add(backoff).After(deadline) {
			return resp, err
		}
		c.cfg.Logger.Warn("control plane call failed; retrying", "err", err, "backoff", backoff)
		t := time.NewTimer(jitter.Spread(backoff))
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return resp, ctx.Err()
		}
		backoff = min(backoff*2, time.Second)
	}
}

// permanent reports whether a control-plane call failed for a reason a
// retry cannot mend: the request itself (invalid, not allowed, or of a
// history the control plane left). Anything else passes (no leader, a
// timeout, a refused token, which controlconn replaces).
func permanent(err error) bool {
	switch connect.CodeOf(err) {
	case connect.CodeInvalidArgument, connect.CodePermissionDenied, connect.CodeFailedPrecondition:
		return true
	}
	return false
}

// Flush waits until everything queued so far was answered (or ctx ends).
// Its marker joins the queue whatever the queue's bounds, which only
// refuse entries. It fails with ErrStopped when the writer has stopped,
// or stops before writing what is ahead of it, and when entries answered
// meanwhile were not stored because their call failed (the control plane
// out of reach for RetryFor, or a call refused), with the last error.
func (c *Client) Flush(ctx context.Context) error {
	done := make(chan error, 1)
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return ErrStopped
	}
	failed := c.failed
	c.queue = append(c.queue, pending{done: func(r Result) { done <- r.Err }})
	c.mu.Unlock()
	signal(c.wake)
	select {
	case err := <-done:
		if err != nil {
			return err
		}
	case <-ctx.Done():
		return ctx.Err()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if n := c.failed - failed; n > 0 {
		return fmt.Errorf("%d mailbox entries answered before the flush were not stored: %w", n, c.lastFailure)
	}
	return nil
}

// noteFailed counts an entry whose call failed.
func (c *Client) noteFailed(err error) {
	c.mu.Lock()
	c.failed++
	c.lastFailure = err
	c.mu.Unlock()
}

func (c *Client) writeLoop(ctx context.Context) {
	drain(ctx, c, c.wake, &c.queue, pending.bytes, func(batch []pending) { c.write(ctx, batch) })
}

// write stores one batch, retrying while the control plane is
// unavailable, and reports every entry's result in order.
// An entry that has waited RetryFor since its Store is answered
// ErrUnavailable without a call.
func (c *Client) write(ctx context.Context, batch []pending) {
	now := time.Now()
	results := make([]Result, len(batch))
	entries := make([]*edgev1.MailboxEntry, 0, len(batch))
	at := make([]int, 0, len(batch)) // the batch index of each of entries
	var deadline time.Time
	for i, p := range batch {
		switch {
		case p.entry == nil: // a Flush marker
		case !now.Before(p.queued.Add(c.cfg.RetryFor)):
			results[i].Err = fmt.Errorf("%w: not written within %v", ErrUnavailable, c.cfg.RetryFor)
		default:
			if len(entries) == 0 { // the oldest: the queue is in Store's order
				deadline = p.queued.Add(c.cfg.RetryFor)
			}
			entries, at = append(entries, p.entry), append(at, i)
		}
	}
	c.mu.Lock()
	if c.sending == nil {
		c.sending = map[string]bool{}
	}
	for _, e := range entries {
		c.sending[e.GetDeviceId()] = false
	}
	c.mu.Unlock()
	for j, r := range c.store(ctx, entries, deadline) {
		results[at[j]] = r
	}
	for i, p := range batch {
		if p.entry == nil {
			p.done(Result{}) // a Flush marker: what was ahead of it is answered
			continue
		}
		r := results[i]
		label := "error"
		if r.Err == nil {
			label = statusLabel(r.Status)
			c.noteFull(p.entry.GetDeviceId(), r.Status)
		} else {
			c.noteFailed(r.Err)
		}
		c.results.WithLabelValues(label).Inc()
		p.done(r)
	}
	c.mu.Lock()
	clear(c.sending)
	c.mu.Unlock()
}

// store writes entries in order and returns each one's result. The
// control plane refuses a whole call as invalid for one entry it finds
// malformed: such a call is split in halves, each written in turn, down
// to the entries at fault, so that one bad entry (an expiry beyond what
// the control plane allows, say) fails alone and not the other senders'
// entries that shared its call. log2(MaxBatch) levels bound the calls.
func (c *Client) store(ctx context.Context, entries []*edgev1.MailboxEntry, deadline time.Time) []Result {
	if len(entries) == 0 {
		return nil
	}
	resp, err := c.put(ctx, entries, deadline)
	if connect.CodeOf(err) == connect.CodeInvalidArgument && len(entries) > 1 {
		half := len(entries) / 2
		return append(c.store(ctx, entries[:half], deadline), c.store(ctx, entries[half:], deadline)...)
	}
	results := make([]Result, len(entries))
	for i := range results {
		switch {
		case err != nil:
			results[i].Err = err
		case i < len(resp.GetResults()):
			results[i].Status, results[i].Seq = resp.GetResults()[i].GetStatus(), resp.GetResults()[i].GetSeq()
		default:
			results[i].Err = errors.New("control plane returned fewer results than entries")
		}
	}
	return results
}

// fullFor is how long a device's mailbox is taken as full after the
// control plane said so (unless an ack for it goes out first): the acks
// of the device's session on another edge make room unseen from here.
const fullFor = 2 * time.Second

// maxFull bounds the devices remembered as full.
const maxFull = 1 << 16

// noteFull remembers whether a device's mailbox is full, from the status
// the control plane gave an entry for it in the call under way; not when
// an ack for the device went out during the call (see Client.sending).
func (c *Client) noteFull(device string, st edgev1.MailboxStatus) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if st != edgev1.MailboxStatus_MAILBOX_STATUS_FULL || c.sending[device] {
		delete(c.full, device)
		return
	}
	now := time.Now()
	if len(c.full) >= maxFull {
		maps.DeleteFunc(c.full, func(_ string, until time.Time) bool { return !now.Before(until) })
		if len(c.full) >= maxFull {
			return
		}
	}
	if c.full == nil {
		c.full = map[string]time.Time{}
	}
	c.full[device] = now.Add(fullFor)
}

func (c *Client) put(ctx context.Context, entries []*edgev1.MailboxEntry, deadline time.Time) (_ *edgev1.PutMailboxResponse, err error) {
	if c.cfg.Tracer != nil {
		var span trace.Span
		ctx, span = c.traceBatch(ctx, entries)
		if span != nil {
			defer func() {
				if err != nil {
					span.SetStatus(codes.Error, err.Error())
				}
				span.End()
			}()
		}
	}
	return callUnder(ctx, c, &c.puts, "mailbox writes", deadline, func(ctx context.Context) (*edgev1.PutMailboxResponse, error) {
		c.batchSize.Observe(float64(len(entries)))
		start := time.Now()
		resp, err := c.cfg.API.PutMailbox(ctx, entries)
		if err == nil {
			c.commit.Observe(time.Since(start).Seconds())
		}
		return resp, err
	})
}

// traceBatch starts the span of a PutMailbox call under its first traced
// entry, linked to the others; no span when no entry is traced.
func (c *Client) traceBatch(ctx context.Context, entries []*edgev1.MailboxEntry) (context.Context, trace.Span) {
	var parent trace.SpanContext
	var links []trace.Link
	for _, e := range entries {
		sc := telemetry.SpanContext(e.GetTraceparent())
		switch {
		case !sc.IsValid():
		case !parent.IsValid():
			parent = sc
		default:
			links = append(links, trace.Link{SpanContext: sc})
		}
	}
	if !parent.IsValid() {
		return ctx, nil
	}
	return c.cfg.Tracer.Start(trace.ContextWithRemoteSpanContext(ctx, parent), "relay.mailbox.put",
		trace.WithSpanKind(trace.SpanKindClient), trace.WithLinks(links...),
		trace.WithAttributes(attribute.Int("relay.mailbox.entries", len(entries))))
}

// maxAckSeqs is the most seqs one AckMailbox call carries (the control
// plane's fsm.MaxMailboxAck).
const maxAckSeqs = 4096

func (c *Client) ackLoop(ctx context.Context) {
	const minBackoff, maxBackoff = 100 * time.Millisecond, 5 * time.Second
	backoff := minBackoff
	var again <-chan time.Time // set while acks wait to be tried again
	for {
		select {
		case <-ctx.Done():
			// One deadline for the last flush, however many devices have
			// acks left: shutdown stays bounded.
			fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
			if c.flushAcks(fctx) {
				c.mu.Lock()
				left := 0
				for _, seqs := range c.acks {
					left += len(seqs)
				}
				c.mu.Unlock()
				c.cfg.Logger.Warn("mailbox acks not sent before shutdown: their entries are delivered again", "entries", left)
			}
			cancel()
			return
		case <-c.ackNow:
			if again != nil {
				// Backing off after a failed pass: new acks wait for the
				// retry with the others, or each would start a pass
				// against a control plane that just failed.
				continue
			}
		case <-again:
		}
		if c.flushAcks(ctx) {
			again, backoff = time.After(jitter.Spread(backoff)), min(2*backoff, maxBackoff)
		} else {
			again, backoff = nil, minBackoff
		}
	}
}

// flushAcks sends the queued acks, at most maxAckSeqs per call. A call
// that fails for a passing reason (no leader, a timeout, the context
// ending) ends the pass: its acks and every one not tried yet are queued
// again, and it reports that some were, so that the loop backs off
// rather than call for every other device a control plane that just
// failed (each call may wait 10 s). Queued again, the acks of a pass
// that shutdown cut short go in the last flush. An ack that is lost
// leaves its entry counting against the device's quota until it
// expires, and delivered again by its next session.
func (c *Client) flushAcks(ctx context.Context) (requeued bool) {
	c.mu.Lock()
	acks := c.acks
	c.acks = map[ackKey][]uint64{}
	c.mu.Unlock()
	keys := slices.SortedFunc(maps.Keys(acks), func(a, b ackKey) int {
		return cmp.Or(strings.Compare(a.device, b.device), strings.Compare(a.history, b.history))
	})
	for i, k := range keys {
		seqs := acks[k]
		for len(seqs) > 0 {
			n := min(len(seqs), maxAckSeqs)
			actx, cancel := context.WithTimeout(ctx, 10*time.Second)
			err := c.cfg.API.AckMailbox(actx, k.device, k.history, seqs[:n])
			cancel()
			if err == nil {
				seqs = seqs[n:]
				c.acked(k.device)
				continue
			}
			if permanent(err) {
				// Delivered again on the device's next fetch (and dropped
				// there as duplicates), or they expire; or, of a history
				// the control plane left (a restore), void.
				c.cfg.Logger.Warn("mailbox ack failed", "device", k.device, "entries", len(seqs), "err", err)
				break
			}
			acks[k] = seqs
			left := 0
			c.mu.Lock()
			for _, k := range keys[i:] {
				c.acks[k] = append(acks[k], c.acks[k]...)
				left += len(acks[k])
			}
			c.mu.Unlock()
			c.cfg.Logger.Debug("mailbox ack failed; retrying", "device", k.device, "entries", left, "err", err)
			return true
		}
	}
	return false
}

// acked lifts device's mark once acks for it were written (see
// Client.sending).
func (c *Client) acked(device string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.full, device)
	if _, ok := c.sending[device]; ok {
		c.sending[device] = true
	}
}

// statusLabel is a mailbox status as the metrics name it: "stored",
// "full", "target_gone", ...
func statusLabel(st edgev1.MailboxStatus) string {
	return strings.ToLower(strings.TrimPrefix(st.String(), "MAILBOX_STATUS_"))
}
