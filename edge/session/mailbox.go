package session

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/edge-relay/relay/internal/jitter"
	"github.com/edge-relay/relay/internal/telemetry"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// MailboxResult is the outcome of storing one mailbox entry.
type MailboxResult struct {
	Status edgev1.MailboxStatus
	Seq    uint64 // the entry's seq in its device's mailbox, when stored
	// Err: not stored. The control plane could not be reached in time
	// (the sender may retry), or the entry can never be stored
	// (ErrMailboxEventTooLarge).
	Err error
}

// ErrMailboxEventTooLarge is the Err of a MailboxResult (wrapped, as
// edge/mailbox's ErrTooLarge) for an event larger than a mailbox stores:
// the sender is told PAYLOAD_TOO_LARGE, not to retry what cannot succeed.
var ErrMailboxEventTooLarge = errors.New("event larger than a mailbox entry holds")

// ErrMailboxBusy marks (wrapped) a Fetch the control plane refused for
// load: it reads as many mailboxes as it may at once. The session reads
// again shortly, and the live deliveries held behind the mailbox keep
// waiting meanwhile, for up to Config.MailboxBusyGrace, rather than being
// refused as after other failures: a busy control plane is answering.
var ErrMailboxBusy = errors.New("the control plane reads as many mailboxes as it may at once")

// Mailbox is the control plane's mailboxes as the session core uses them
// (edge/mailbox provides it).
type Mailbox interface {
	// Store queues an entry; done is called once with the outcome. Entries
	// are stored in the order Store was called.
	Store(e *edgev1.MailboxEntry, done func(MailboxResult))
	// Fetch reads a device's entries after seq, oldest first, with a
	// linearizable read: at most limit, and at most maxBytes of events
	// (at least one entry; 0: as many as a page holds).
	Fetch(ctx context.Context, deviceID string, after uint64, limit, maxBytes int) (MailboxPage, error)
	// Ack deletes entries the device received, from pages of history
	// (MailboxPage.History).
	Ack(deviceID, history string, seqs ...uint64)
	// Claim asks whether a device takes an "any one" event; done is
	// called once (won is true also when the control plane could not
	// decide: a duplicate is better than a loss).
	Claim(c *edgev1.EventClaim, done func(won bool))
}

// MailboxPage is one read of a device's mailbox.
type MailboxPage struct {
	Entries []*edgev1.MailboxEntry
	// More entries follow the last one.
	More bool
	// Revision is a control-plane revision the read covers: every entry
	// stored at or before it (after the seq asked for, and still there)
	// is in this page or after it. 0 when the control plane does not say.
	Revision uint64
	// History names the control plane's history the page was read in, as
	// known before the read ("": unknown); the entries' acks name it.
	History string
}

// mailboxState is a session's view of its device's mailbox: what has been
// queued to the device, what is known to exist, and live deliveries that
// must wait until the mailbox entries before them are queued.
//
// Two guarantees keep a sender's order when some of its events went to
// the mailbox: a live event from the session that stored entries waits
// for those (need, the seq of the sender's last stored entry); and a
// live event from a session that started at revision rev waits until
// everything its device's earlier sessions stored is queued: until a
// complete fetch covered rev, or this edge's feed has passed rev (so the
// entries were announced) and nothing announced or due is left to fetch.
type mailboxState struct {
	mu      sync.Mutex // guards the fields below
	cursor  uint64     // highest seq queued to the device
	wanted  uint64     // highest seq known to exist
	more    bool       // the last fetch was not complete, or one is due
	unacked int        // mailbox deliveries not acknowledged yet
	running bool       // the pump goroutine runs
	// blocked: the queue refused the last entry offered, as of its
	// freed count blockedAt; until that moves there is no room, and the
	// pump does not read the mailbox (however often it is woken).
	blocked   bool
	blockedAt uint64
	stopped   bool
	held      []heldDelivery
	// heldBytes is the bytes of the held deliveries' events, bounded like
	// the queue's.
	heldBytes int
	fence     uint64 // highest revision a held delivery waits for a fetch to cover
	primed    bool   // the first read was complete and all of it queued
	// epoch is the directory's count of full copies that announced no
	// mailboxes, as of the last complete fetch (see fenced).
	epoch uint64
	// failing is set when a fetch failed: deliveries that would wait are
	// refused until a fetch completes, rather than held without bound.
	failing bool
	// floor is the highest seq the session this one replaced here handed
	// to the mailbox: every live delivery waits until it is queued. gate
	// is set while that session's hand-off stores are in flight.
	// floorBy is floor by the events' senders (see releaseHeldAhead).
	floor   uint64
	floorBy map[string]uint64
	gate    bool
	// passOn, set while gate is, is told what the replaced session
	// stored once it says: this session's own hand-off waits for it
	// (handOff), so that what it tells its successor covers both.
	passOn func(handedOff)

	// covered is a revision every entry stored by then was queued for
	// (or is gone): a complete fetch covers the revision it read, and the
	// feed check of fenced covers the revision it passed; it only grows.
	// slow is set while every live delivery must take mu: something is
	// held, or gate or floor stops them all (see syncSlowLocked). Both are
	// written with mu held and read without it on the fast path of a live
	// delivery.
	covered atomic.Uint64
	slow    atomic.Bool

	wake   chan struct{} // capacity 1: acks arrived or work appeared
	rearm  chan struct{} // capacity 1: a delivery was held (a waiting pump sees when it expires)
	done   chan struct{} // closed when the pump goroutine ends
	cancel context.CancelFunc
}

type heldDelivery struct {
	f     *inflight
	event []byte
	need  uint64 // the mailbox seq that must be queued first
	rev   uint64 // the sender session's start revision
}

// storeMailbox stores an event for a device that is not reachable live;
// f counts it delivered once stored. While it is in flight, this sender's
// later events for the same device follow it into the mailbox.
//
// stored, if not nil, is called once the store is answered, with the
// entry's seq (0 when it was not stored), after the sender's bookkeeping.
func (s *Session) storeMailbox(f *inflight, device string, event []byte, expires time.Time, stored func(seq uint64)) {
	s.routeMu.Lock()
	if s.mbPending == nil {
		s.mbPending, s.mbLast = map[string]int{}, map[string]uint64{}
	}
	s.mbPending[device]++
	s.routeMu.Unlock()
	tr := f.trace.child(s.hub.cfg.Tracer, "relay.mailbox.store", trace.SpanKindProducer, attribute.String("relay.device", telemetry.HashID(device)))
	e := &edgev1.MailboxEntry{
		DeviceId: device, UserId: s.userID, Event: event, EventId: f.eventID,
		SenderDeviceId: s.deviceID, ExpiresAtMs: expires.UnixMilli(), AnyOne: f.anyOne, Traceparent: tr.traceparent(),
	}
	s.hub.cfg.Mailbox.Store(e, func(r MailboxResult) {
		if tr.span != nil {
			tr.span.SetAttributes(attribute.String("relay.mailbox.status", r.Status.String()))
		}
		tr.end(relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED)
		s.routeMu.Lock()
		if s.mbPending[device]--; s.mbPending[device] <= 0 {
			delete(s.mbPending, device)
		}
		if r.Err == nil && r.Status == edgev1.MailboxStatus_MAILBOX_STATUS_STORED && r.Seq > s.mbLast[device] {
			s.mbLast[device] = r.Seq
		}
		s.routeMu.Unlock()
		if stored != nil {
			seq := uint64(0)
			if r.Err == nil && r.Status == edgev1.MailboxStatus_MAILBOX_STATUS_STORED {
				seq = r.Seq
			}
			stored(seq)
		}
		switch {
		case errors.Is(r.Err, ErrMailboxEventTooLarge):
			f.fail(relayv1.ErrorCode_ERROR_CODE_PAYLOAD_TOO_LARGE, "the event is larger than an offline target's mailbox holds")
		case r.Err != nil:
			f.fail(relayv1.ErrorCode_ERROR_CODE_INTERNAL, "could not store the event for an offline target; retry")
		case r.Status == edgev1.MailboxStatus_MAILBOX_STATUS_TAKEN:
			// An "any one" event another device already took.
			f.confirm(s.hub.cfg.Now())
		case r.Status == edgev1.MailboxStatus_MAILBOX_STATUS_STORED:
			// The device may have connected here meanwhile: tell its
			// session (the watch feed will too).
			s.hub.MailboxChanged(s.userID, device, r.Seq)
			f.confirm(s.hub.cfg.Now())
		case r.Status == edgev1.MailboxStatus_MAILBOX_STATUS_FULL:
			f.fail(relayv1.ErrorCode_ERROR_CODE_MAILBOX_FULL, "an offline target's mailbox is full; retry later")
		case r.Status == edgev1.MailboxStatus_MAILBOX_STATUS_EXPIRED:
			f.fail(relayv1.ErrorCode_ERROR_CODE_EXPIRED, "the event expired before it could be stored")
		default:
			f.fail(relayv1.ErrorCode_ERROR_CODE_TARGET_DELETED, "a target was deleted or revoked")
		}
	})
}

// deliverLive queues a live event for this device, or holds it until the
// mailbox entries it must follow are queued: up to need, and what the
// sender's earlier sessions stored before rev (see mailboxState).
func (s *Session) deliverLive(event []byte, f *inflight, need, rev uint64) offerResult {
	m := &s.mb
	if s.hub.cfg.Mailbox == nil {
		need, rev = 0, 0 // no mailboxes here: nothing to wait for
	}
	if need > 0 || rev > m.covered.Load() || m.slow.Load() {
		m.mu.Lock()
		if s.mustHold(need, rev) {
			if m.stopped {
				m.mu.Unlock()
				return queueClosed
			}
			if m.failing {
				// The mailbox cannot be read: waiting could last as long
				// as the control plane is away. Refused (retryable; a
				// forwarded event goes to the mailbox from its edge).
				m.mu.Unlock()
				f.fail(relayv1.ErrorCode_ERROR_CODE_INTERNAL, errUnreadableMailbox)
				return offered
			}
			if len(m.held) >= s.hub.cfg.QueueLen || (len(m.held) > 0 && m.heldBytes+len(event) > s.hub.cfg.QueueBytes) {
				m.mu.Unlock()
				return queueFull
			}
			m.held = append(m.held, heldDelivery{f: f, event: event, need: need, rev: rev})
			m.heldBytes += len(event)
			signal(m.rearm)
			m.syncSlowLocked()
			if rev > m.covered.Load() && rev > m.fence {
				// The pump fetches until a complete read covers it.
				m.fence = rev
			}
			s.wantLocked(need)
			m.mu.Unlock()
			return offered
		}
		m.mu.Unlock()
	}
	if f.fwd != nil && s.hub.cfg.Mailbox != nil && s.hub.refuseForward(s.userID, f.origin, need, s.hub.cfg.Now()) {
		// An earlier forward of its sender was handed back to be stored
		// (refuseForward, DeliverForwarded): this one follows it to the
		// mailbox, as releaseHeld does for a held one; delivered live, it
		// would overtake it. Looked at here, after the gate was seen open
		// above, it sees the replaced session's hand-off too, which fails
		// its forwards before it opens this session's gate.
		f.fail(relayv1.ErrorCode_ERROR_CODE_TARGET_OFFLINE, "")
		return offered
	}
	return s.out.offer(event, true, false, func(id uint64) { s.track(id, await{f: f, event: event, claim: f.claim, size: len(event)}) })
}

// mustHold reports whether a live delivery must wait (with m.mu held):
// behind held ones (they keep their order), for the sender's own stored
// entries (need), or for entries of the sender's earlier sessions (rev).
func (s *Session) mustHold(need, rev uint64) bool {
	m := &s.mb
	return m.blocksAllLocked() || need > m.cursor || s.fenced(rev)
}

// blocksAllLocked reports whether every live delivery must wait (with
// m.mu held): behind held ones (they keep their order), or behind what a
// replaced session handed off.
func (m *mailboxState) blocksAllLocked() bool {
	return len(m.held) > 0 || m.behindPredecessorLocked()
}

// behindPredecessorLocked reports whether what a replaced session handed
// off is not stored, or not queued, yet (with m.mu held).
func (m *mailboxState) behindPredecessorLocked() bool {
	return m.gate || m.floor > m.cursor
}

// syncSlowLocked sets slow from the fields it derives from (with m.mu
// held), after any of them changed. (cursor only grows, so where it moved
// without a sync, slow can only be set needlessly, never clear wrongly.)
func (m *mailboxState) syncSlowLocked() {
	m.slow.Store(m.blocksAllLocked())
}

// predecessorStored is told by the session this one replaced here that
// what it handed off is stored (seq 0: nothing): live deliveries wait
// until the mailbox up to the highest seq is queued, so none overtakes
// those.
func (s *Session) predecessorStored(stored handedOff) {
	m := &s.mb
	m.mu.Lock()
	m.floor, m.gate = max(m.floor, stored.max), false
	for sender, seq := range stored.bySender {
		if m.floorBy == nil {
			m.floorBy = map[string]uint64{}
		}
		m.floorBy[sender] = max(m.floorBy[sender], seq)
	}
	s.releaseHeld()
	s.wantLocked(stored.max)
	passOn := m.passOn
	m.passOn = nil
	m.mu.Unlock()
	if passOn != nil {
		passOn(stored)
	}
}

// fenced reports whether entries stored before rev may still be missing
// from what was queued (with m.mu held).
func (s *Session) fenced(rev uint64) bool {
	m := &s.mb
	if rev <= m.covered.Load() {
		return false
	}
	// Entries stored up to rev were announced once the feed passed rev:
	// to this session if it was registered (wanted), or before it was,
	// and then the fetch due since registration (more) finds them;
	// unless a full copy of the feed since the last complete fetch
	// announced none (from an older control plane).
	announced, blind := s.hub.cfg.Directory.AnnouncedRevision()
	if m.more || m.wanted > m.cursor || announced < rev || blind > m.epoch {
		return true
	}
	// Later announcements are of later revisions: rev stays covered.
	m.covered.Store(rev)
	return false
}

// errUnreadableMailbox refuses a live event that must wait for the
// target's mailbox while it cannot be read.
const errUnreadableMailbox = "the target's mailbox cannot be read to keep the sender's order; retry later"

// failHeld refuses the held deliveries, and those that would wait until a
// fetch completes, after a fetch failed.
func (s *Session) failHeld() {
	m := &s.mb
	m.mu.Lock()
	m.failing = true // from here nothing more is held
	m.mu.Unlock()
	for _, h := range s.takeHeld() {
		h.f.fail(relayv1.ErrorCode_ERROR_CODE_INTERNAL, errUnreadableMailbox)
	}
}

// primeMailbox queues the first page of the device's mailbox before the
// session is registered, so stored events come before live ones.
func (s *Session) primeMailbox(ctx context.Context) {
	mb := s.hub.cfg.Mailbox
	if mb == nil {
		return
	}
	m := &s.mb
	m.wake, m.rearm, m.done = make(chan struct{}, 1), make(chan struct{}, 1), make(chan struct{})
	close(m.done) // no pump yet
	s.listen()
	_, blind := s.hub.cfg.Directory.AnnouncedRevision()
	fctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	_, bytes := s.out.room()
	page, err := mb.Fetch(fctx, s.deviceID, 0, s.hub.cfg.MailboxWindow, bytes)
	cancel()
	m.mu.Lock()
	defer m.mu.Unlock()
	// Entries stored between this read and the registration are announced
	// while no session of the device is here to hear it (listen marks it):
	// until settleMailbox has looked, live deliveries that must follow
	// stored entries wait (fenced).
	defer func() { m.more = true }()
	if err != nil {
		level := slog.LevelWarn
		if errors.Is(err, ErrMailboxBusy) {
			level = slog.LevelDebug // edge/mailbox tells the operator, edge-wide
		}
		s.logAt(level, "mailbox fetch failed; retrying in the background", "err", err)
		return
	}
	s.noteStart(page.Revision)
	m.primed = s.queueEntries(page, 0, 0, blind) && !page.More
}

// queueEntries queues fetched entries (with m.mu held). known is the
// highest seq known to exist when the fetch was sent, fence the highest
// revision a held delivery waited for then, and blind the directory's
// count of full copies that announced no mailboxes: a complete fetch
// covers all three. It reports false when the queue took no more.
func (s *Session) queueEntries(page MailboxPage, known, fence, blind uint64) bool {
	m := &s.mb
	for _, e := range page.Entries {
		if e.GetSeq() <= m.cursor {
			continue
		}
		seq := e.GetSeq()
		if len(m.held) > 0 {
			s.releaseHeldAhead(e.GetSenderDeviceId(), seq)
		}
		if !s.hub.cfg.Limits.deliverable(len(e.GetEvent())) {
			// Stored by an edge with a larger limit: delivered, it would
			// end the session. It stays in the mailbox (not acknowledged)
			// for an edge that can deliver it, or until it expires; what
			// follows it is delivered.
			s.hub.undeliverable(s.hub.cfg.Metrics.tooLargeMailbox, "mailbox", len(e.GetEvent()))
			m.cursor = seq
			continue
		}
		var claim *edgev1.EventClaim
		if e.GetAnyOne() {
			claim = &edgev1.EventClaim{SenderDeviceId: e.GetSenderDeviceId(), EventId: e.GetEventId(), ExpiresAtMs: e.GetExpiresAtMs()}
		}
		if tp := e.GetTraceparent(); tp != "" {
			// The entry's delivery, later: a trace of its own, linked to
			// the event's.
			s.hub.remoteTrace("relay.mailbox.deliver", tp, false,
				attribute.String("relay.device", telemetry.HashID(s.deviceID)), attribute.Int64("relay.mailbox.seq", int64(seq))).
				end(relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED)
		}
		switch s.out.offer(e.GetEvent(), true, false, func(id uint64) {
			s.track(id, await{mbSeq: seq, mbHistory: page.History, claim: claim, size: len(e.GetEvent())})
		}) {
		case offered:
			m.cursor = seq
			m.unacked++
		default:
			m.more = true
			return false
		}
	}
	m.more = page.More
	if !page.More {
		if known > m.cursor {
			// A complete fetch (a linearizable read) returned everything
			// committed before it was sent: what else was announced by
			// then was acked or expired. Entries announced while it was in
			// flight may be newer than what it saw; they are fetched next.
			m.cursor = known
		}
		// For the same reason it covers the revisions held deliveries
		// waited for when it was sent, also from a control plane that
		// does not report its revision.
		if rev := max(page.Revision, fence); rev > m.covered.Load() {
			m.covered.Store(rev)
		}
		m.epoch = max(m.epoch, blind)
		m.failing = false
	}
	s.releaseHeld()
	return true
}

// releaseHeldAhead queues, ahead of the mailbox entry seq of sender, the
// held live deliveries of that sender that must come before it (with
// m.mu held). Without this, a page holding both would be queued whole
// before the held delivery was released (releaseHeld).
//
// A held delivery whose sender's start revision is covered (every entry
// stored by then is queued, so the entry was stored after it) went live
// when its sender's session had nothing on its way to the device's
// mailbox and had stored up to its need: an entry of the same sender
// with a higher seq, which this session's predecessor did not hand off
// (its seq is above what that one stored for the sender), was stored
// after the delivery was sent, and follows it. What the delivery waits
// for has lower seqs and is queued by now. Held deliveries of other
// senders keep waiting; those of this one keep their order.
func (s *Session) releaseHeldAhead(sender string, seq uint64) {
	m := &s.mb
	if m.gate || seq <= m.floorBy[sender] {
		return
	}
	s.expireHeldLocked()
	n, kept := 0, false
	for _, h := range m.held {
		if kept || h.sender() != sender || seq <= h.need || s.fenced(h.rev) || !s.offerHeld(h) {
			kept = kept || h.sender() == sender
			m.held[n] = h
			n++
		}
	}
	if n < len(m.held) {
		m.keepHeldLocked(n)
		m.syncSlowLocked()
	}
}

// keepHeldLocked keeps the first n held deliveries (with m.mu held).
func (m *mailboxState) keepHeldLocked(n int) {
	clear(m.held[n:])
	m.held = m.held[:n]
	m.heldBytes = 0
	for _, h := range m.held {
		m.heldBytes += len(h.event)
	}
}

// sender is the device that sent a held delivery's event.
func (h heldDelivery) sender() string {
	if h.f.sender != nil {
		return h.f.sender.deviceID
	}
	return h.f.origin.sender
}

// offerHeld queues a held delivery that may go now, or refuses it; it
// reports false when the session's queue is closed (the delivery stays
// held for the hand-off).
func (s *Session) offerHeld(h heldDelivery) bool {
	if h.f.fwd != nil && s.hub.cfg.Mailbox != nil && s.hub.refuseForward(s.userID, h.f.origin, h.need, s.hub.cfg.Now()) {
		// An earlier forward of its sender was handed back to be stored
		// meanwhile (the old session's hand-off): this one follows it
		// there.
		h.f.fail(relayv1.ErrorCode_ERROR_CODE_TARGET_OFFLINE, "")
		return true
	}
	switch s.out.offer(h.event, true, false, func(id uint64) { s.track(id, await{f: h.f, event: h.event, claim: h.f.claim, size: len(h.event)}) }) {
	case queueFull:
		h.f.fail(relayv1.ErrorCode_ERROR_CODE_QUEUE_FULL, "a target's queue is full; retry later")
	case queueClosed:
		return false
	}
	return true
}

// releaseHeld queues held live deliveries whose mailbox predecessors are
// queued (with m.mu held).
func (s *Session) releaseHeld() {
	m := &s.mb
	defer m.syncSlowLocked()
	s.expireHeldLocked()
	if m.behindPredecessorLocked() {
		return
	}
	n := 0
	for i, h := range m.held {
		if h.need > m.cursor || s.fenced(h.rev) {
			// Keep order: a later one waits behind an earlier one.
			n = copy(m.held, m.held[i:])
			break
		}
		if !s.offerHeld(h) {
			n = copy(m.held, m.held[i:])
			break
		}
	}
	m.keepHeldLocked(n)
}

// expireHeldLocked refuses the held deliveries whose events expired
// (with m.mu held): one may wait as long as the device takes to
// acknowledge what is before it, and none is delivered after its time.
// It returns how long until the first one left expires (an hour when
// none does). (A forward from an edge that did not say when its event
// expires waits without this bound.)
func (s *Session) expireHeldLocked() (next time.Duration) {
	m := &s.mb
	next = time.Hour
	if len(m.held) == 0 {
		return next
	}
	now := s.hub.cfg.Now()
	n := 0
	for _, h := range m.held {
		if !h.f.expires.IsZero() {
			left := h.f.expires.Sub(now)
			if left <= 0 {
				h.f.fail(relayv1.ErrorCode_ERROR_CODE_EXPIRED, "the event expired while it waited for the target's mailbox to be delivered first")
				m.heldBytes -= len(h.event)
				continue
			}
			next = min(next, left)
		}
		m.held[n] = h
		n++
	}
	clear(m.held[n:])
	m.held = m.held[:n]
	return next
}

// kickMailbox notes that the mailbox holds entries up to seq (0: unknown,
// look anyway) and starts the pump if it is not running.
func (s *Session) kickMailbox(seq uint64) {
	if s.hub.cfg.Mailbox == nil {
		return
	}
	m := &s.mb
	m.mu.Lock()
	defer m.mu.Unlock()
	if seq == 0 {
		m.more = true
	}
	s.wantLocked(seq)
}

// wantLocked notes that the mailbox holds entries up to seq and starts
// the pump if a fetch is due (with m.mu held).
func (s *Session) wantLocked(seq uint64) {
	m := &s.mb
	m.wanted = max(m.wanted, seq)
	s.startPumpLocked()
}

// startPumpLocked starts the pump, or wakes it, when a fetch is due (with
// m.mu held).
func (s *Session) startPumpLocked() {
	m := &s.mb
	if s.hub.cfg.Mailbox == nil || m.stopped || !m.dueLocked() {
		return
	}
	if m.running {
		signal(m.wake)
		return
	}
	m.running = true
	m.done = make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	m.cancel = cancel
	go s.pump(ctx, m.done)
}

// dueLocked reports whether a fetch is due (with m.mu held): entries are
// known or may exist beyond what was queued, or a held delivery waits for
// a complete fetch to cover its sender's revision.
func (m *mailboxState) dueLocked() bool {
	return m.wanted > m.cursor || m.more || m.fence > m.covered.Load()
}

func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// pump fetches and queues mailbox entries while there are some, at most
// MailboxWindow unacknowledged at a time.
func (s *Session) pump(pctx context.Context, done chan struct{}) {
	defer close(done)
	m := &s.mb
	window := s.hub.cfg.MailboxWindow
	backoff := 50 * time.Millisecond
	var busySince time.Time // since when every read was refused as busy
	// wait waits for a wake, or d; meanwhile held deliveries are refused
	// as they expire, so their senders learn it then.
	wait := func(d time.Duration) bool {
		end := time.Now().Add(d)
		t := time.NewTimer(d)
		defer t.Stop()
		for {
			m.mu.Lock()
			next := min(time.Until(end), s.expireHeldLocked())
			m.syncSlowLocked()
			m.mu.Unlock()
			t.Reset(max(next, 0))
			select {
			case <-m.wake:
				return true
			case <-m.rearm: // something was held: it may expire sooner
			case <-t.C:
				if !time.Now().Before(end) {
					return true
				}
			case <-s.closing:
				return false
			}
		}
	}
	for {
		m.mu.Lock()
		switch {
		case m.stopped:
			m.running = false
			m.mu.Unlock()
			return
		case m.unacked >= window:
			m.mu.Unlock()
			if !wait(time.Minute) {
				return
			}
			continue
		case !m.dueLocked():
			m.running = false
			m.mu.Unlock()
			return
		case m.blocked && s.out.freedCount() == m.blockedAt:
			// Woken (an announcement, a held delivery) with no room made:
			// a read now would be refused whole.
			m.mu.Unlock()
			if !wait(time.Minute) {
				return
			}
			continue
		}
		m.blocked = false
		after, known, fence := m.cursor, m.wanted, m.fence
		// No more than the window and the queue have room for (what the
		// queue refuses is read again later); at least one entry.
		items, bytes := s.out.room()
		limit := max(min(window-m.unacked, items), 1)
		m.mu.Unlock()
		_, blind := s.hub.cfg.Directory.AnnouncedRevision()
		ctx, cancel := context.WithTimeout(pctx, 5*time.Second)
		page, err := s.hub.cfg.Mailbox.Fetch(ctx, s.deviceID, after, limit, max(bytes, 1))
		cancel()
		if err != nil {
			if pctx.Err() != nil {
				return // the session ended: not a failure
			}
			busy := errors.Is(err, ErrMailboxBusy)
			if busy && busySince.IsZero() {
				busySince = time.Now()
			}
			if busy && time.Since(busySince) < s.hub.cfg.MailboxBusyGrace {
				// Edge-wide, edge/mailbox tells the operator.
				s.logAt(slog.LevelDebug, "mailbox fetch refused as busy", "err", err, "backoff", backoff)
			} else {
				s.logAt(slog.LevelWarn, "mailbox fetch failed", "err", err, "backoff", backoff)
				s.failHeld()
			}
			if !wait(jitter.Spread(backoff)) {
				return
			}
			backoff = min(2*backoff, 5*time.Second)
			continue
		}
		backoff, busySince = 50*time.Millisecond, time.Time{}
		if !s.openKnown.Load() {
			// The first read failed: this one bounds the session's start.
			s.noteStart(page.Revision)
		}
		// Before the offers: room made while they run counts as made.
		freed := s.out.freedCount()
		m.mu.Lock()
		full := !s.queueEntries(page, known, fence, blind)
		m.blocked, m.blockedAt = full, freed
		m.mu.Unlock()
		// A full queue has room once the writer takes what it holds (the
		// queue's roomed wakes the pump then), and deliveries the device
		// does not acknowledge free theirs once it does (handleReceived
		// does), however long either takes: the pump waits for that, not
		// polling the control plane for a device that reads slowly.
		if full && !wait(time.Minute) {
			return
		}
	}
}

// mailboxAcked notes acknowledged mailbox deliveries (the pump may go on).
func (s *Session) mailboxAcked(n int) {
	m := &s.mb
	m.mu.Lock()
	m.unacked -= n
	m.mu.Unlock()
	signal(m.wake)
}

// stopMailbox stops the pump and waits for it.
func (s *Session) stopMailbox() {
	if s.hub.cfg.Mailbox == nil {
		return
	}
	m := &s.mb
	m.mu.Lock()
	m.stopped = true
	done, cancel := m.done, m.cancel
	m.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	signal(m.wake)
	if done != nil {
		<-done
	}
}

// takeHeld returns and forgets the held live deliveries.
func (s *Session) takeHeld() []heldDelivery {
	m := &s.mb
	m.mu.Lock()
	defer m.mu.Unlock()
	h := m.held
	m.held, m.heldBytes = nil, 0
	m.syncSlowLocked()
	return h
}

// MailboxChanged tells the session of a device, if it is here, that its
// mailbox holds entries up to seq (the watch feed says so). A session
// still being set up is marked, and fetches once registered.
func (h *Hub) MailboxChanged(userID, deviceID string, seq uint64) {
	sh := h.shardOf(userID)
	sh.mu.Lock()
	for _, s := range sh.listening[deviceID] {
		s.heard.Store(true)
	}
	sh.mu.Unlock()
	for _, s := range h.sessionsOf(userID, deviceID) {
		s.kickMailbox(seq)
	}
}

// noteStart records the revision of the session's first successful
// mailbox read, which its live events carry (see Session.openRev).
func (s *Session) noteStart(rev uint64) {
	s.openRev.Store(rev)
	s.openKnown.Store(true)
}

// listen starts marking the session when its device's mailbox is
// announced (before its first read, so that whatever that read misses is
// announced later).
func (s *Session) listen() {
	sh := s.hub.shardOf(s.userID)
	sh.mu.Lock()
	sh.listening[s.deviceID] = append(sh.listening[s.deviceID], s)
	sh.mu.Unlock()
}

// stopListening ends what listen started (once the session is
// registered, announcements reach it) and reports whether one came.
func (s *Session) stopListening() bool {
	sh := s.hub.shardOf(s.userID)
	sh.mu.Lock()
	l := slices.DeleteFunc(sh.listening[s.deviceID], func(o *Session) bool { return o == s })
	if len(l) == 0 {
		delete(sh.listening, s.deviceID)
	} else {
		sh.listening[s.deviceID] = l
	}
	sh.mu.Unlock()
	return s.heard.Load()
}

// settleMailbox runs once the session is registered: a fetch is due when
// the first read was not complete or failed, or when the mailbox was
// announced since it was sent (the entry may be newer than what it saw);
// otherwise the first read covered everything stored before the session
// became reachable, and what is stored later is announced to it.
func (s *Session) settleMailbox() {
	if s.hub.cfg.Mailbox == nil {
		return
	}
	m := &s.mb
	heard := s.stopListening()
	m.mu.Lock()
	if heard || !m.primed {
		m.mu.Unlock()
		s.kickMailbox(0)
		return
	}
	m.more = false
	s.releaseHeld()
	m.mu.Unlock()
}
