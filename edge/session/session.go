package session

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"hash/maphash"
	"io"
	"log/slog"
	"slices"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/time/rate"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/edge/frame"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// Session is one authenticated device connection on this edge.
type Session struct {
	hub    *Hub
	conn   Conn
	id     string
	log    *slog.Logger
	out    *queue
	reader *frame.Reader

	// Set by the handshake, then read-only.
	userID, deviceID string
	room             *room // set by register

	// Guards the handshake state, shared by the reader (answers) and the
	// writer (re-authentication challenges).
	authMu      sync.Mutex
	hs          handshake // hs.authAt: when the key was last proven; not done: a re-authentication is pending
	authChanged chan struct{}

	// Event intake; the stream reader and the datagram reader share it.
	evMu      sync.Mutex
	lastSeq   uint64
	dedup     map[string]*inflight
	dedupRing []*inflight
	dedupNext int
	events    *rate.Limiter
	bytes     *rate.Limiter

	// Deliveries to this device that it has not acknowledged yet.
	awaitMu  sync.Mutex
	awaiting map[uint64]await

	// As a sender: mailbox writes in flight and the last seq stored, per
	// target device, so a later event for the same target never overtakes
	// an earlier one that went to the mailbox.
	routeMu    sync.Mutex
	mbPending  map[string]int
	mbLast     map[string]uint64
	fwdPending map[string]pendingForward

	// since is when the session was registered (it is announced to other
	// edges; the newer session of a device wins).
	since time.Time
	// instance is the client instance the device's Hello named.
	instance string

	// As a receiver: this device's mailbox (see mailbox.go).
	mb mailboxState

	closeOnce   sync.Once
	closeReason *CloseError
	reconnectIn time.Duration
	closing     chan struct{} // closed by closeWith
	linger      *time.Timer
	writerDone  chan struct{}
}

func newSession(h *Hub, c Conn) *Session {
	l := h.cfg.Limits
	s := &Session{
		hub:         h,
		conn:        c,
		out:         newQueue(h.cfg.QueueLen, h.cfg.QueueBytes, h.cfg.ControlQueueLen),
		reader:      frame.NewReaderSize(c, l.MaxFrameBytes, 2<<10),
		authChanged: make(chan struct{}, 1),
		closing:     make(chan struct{}),
		writerDone:  make(chan struct{}),
		events:      rate.NewLimiter(rate.Limit(l.EventsPerSecond), max(l.EventsPerSecond, 1)),
		bytes:       rate.NewLimiter(rate.Limit(l.BytesPerSecond), max(l.BytesPerSecond, l.MaxPayloadBytes)),
	}
	s.hs = handshake{
		edgeID: h.cfg.EdgeID, dir: h.cfg.Directory, ring: h.cfg.Ring, now: h.cfg.Now,
		random: h.cfg.Random, maxAge: h.cfg.MaxSessionAge,
	}
	var id [16]byte
	_, _ = io.ReadFull(h.cfg.Random, id[:])
	s.id = hex.EncodeToString(id[:])
	s.log = h.cfg.Logger.With("session", s.id, "transport", c.Transport(), "remote", addrString(c))
	return s
}

func addrString(c Conn) string {
	if a := c.RemoteAddr(); a != nil {
		return a.String()
	}
	return ""
}

// ID is the session id told to the device in its Welcome.
func (s *Session) ID() string { return s.id }

func (s *Session) run(ctx context.Context) error {
	m := s.hub.cfg.Metrics
	start := s.hub.cfg.Now()
	ctx, span := s.hub.cfg.Tracer.Start(ctx, "relay.handshake", trace.WithAttributes(attribute.String("relay.transport", s.conn.Transport())))
	err := s.handshake(ctx)
	if err != nil {
		ce := asCloseError(err)
		m.handshakes.WithLabelValues(codeLabel(ce.Code)).Inc()
		span.SetStatus(codes.Error, ce.Error())
		span.End()
		s.log.Debug("handshake failed", "err", err)
		writeClose(s.conn, ce, 0)
		_ = s.conn.Close(ce.Code, ce.Msg)
		return ce
	}
	result := "full"
	if s.hs.resumed {
		result = "resumed"
	}
	m.handshakes.WithLabelValues(result).Inc()
	m.handshakeTime.Observe(s.hub.cfg.Now().Sub(start).Seconds())
	span.SetAttributes(attribute.String("relay.device", s.deviceID), attribute.Bool("relay.resumed", s.hs.resumed))
	span.End()
	s.log = s.log.With("user", s.userID, "device", s.deviceID)
	s.log.Debug("session open", "resumed", s.hs.resumed)

	m.sessions.WithLabelValues(s.conn.Transport()).Inc()
	defer m.sessions.WithLabelValues(s.conn.Transport()).Dec()

	s.primeMailbox(ctx)
	if !s.hub.register(s) {
		ce := closeErr(relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, "edge is shutting down")
		writeClose(s.conn, ce, 0)
		_ = s.conn.Close(ce.Code, ce.Msg)
		return ErrDraining
	}
	if err := s.writeWelcome(); err != nil {
		s.closeWith(&CloseError{Code: relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, Msg: "write welcome: " + err.Error()}, 0)
	}
	var wg sync.WaitGroup
	wg.Go(s.writeLoop)
	dctx, stopDatagrams := context.WithCancel(ctx)
	wg.Go(func() { s.datagramLoop(dctx) })
	// The owner's context ending closes the session like any other reason
	// (without a goroutine per idle session).
	stopWatch := context.AfterFunc(ctx, func() {
		s.closeWith(closeErr(relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, "edge is shutting down"), 0)
	})
	defer stopWatch()

	// Anything stored while this session was being set up is fetched now
	// that the session is reachable.
	s.kickMailbox(0)
	s.readLoop(ctx)
	// The reader ended: the device left, or closeWith cut the connection.
	s.closeWith(&CloseError{Code: relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, Msg: "connection closed"}, 0)
	stopDatagrams()
	wg.Wait()
	s.linger.Stop()
	s.stopMailbox()
	// Hand what the device did not acknowledge to its mailbox before the
	// session leaves the routing table: until then, later events for it
	// are refused (queue closed), so none can overtake these.
	s.handOff()
	s.hub.unregister(s)
	reason := s.closeReason
	m.closes.WithLabelValues(codeLabel(reason.Code)).Inc()
	s.log.Debug("session closed", "code", reason.Code.String(), "reason", reason.Msg)
	if reason.Code == relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED {
		return nil
	}
	return reason
}

func asCloseError(err error) *CloseError {
	var ce *CloseError
	if errors.As(err, &ce) {
		return ce
	}
	var fe *frame.Error
	if errors.As(err, &fe) {
		return &CloseError{Code: fe.Code, Msg: fe.Msg}
	}
	return &CloseError{Code: relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, Msg: err.Error()}
}

// handshake runs the handshake on the stream, bounded by
// HandshakeTimeout, and writes the Welcome.
func (s *Session) handshake(ctx context.Context) error {
	timer := time.AfterFunc(s.hub.cfg.HandshakeTimeout, func() {
		_ = s.conn.Close(relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED, "handshake timed out")
	})
	defer timer.Stop()
	w := frame.NewWriter(s.conn, s.hub.cfg.Limits.MaxFrameBytes)
	var f relayv1.Frame
	for !s.hs.done() {
		if err := s.reader.Read(&f); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || !isProtocolError(err) {
				return closeErr(relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED, "connection ended during the handshake: %v", err)
			}
			return err
		}
		reply, err := s.hs.step(&f)
		if err != nil {
			return err
		}
		if reply != nil {
			if err := w.Write(reply); err != nil {
				return closeErr(relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED, "write challenge: %v", err)
			}
		}
	}
	if ctx.Err() != nil {
		return closeErr(relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, "edge is shutting down")
	}
	s.userID, s.deviceID = s.hs.hello.GetUserId(), s.hs.hello.GetDeviceId()
	s.instance = s.hs.hello.GetInstance()
	return nil
}

// writeWelcome completes the handshake. The session is registered by
// then, so a device that holds its Welcome is reachable.
func (s *Session) writeWelcome() error {
	now := s.hub.cfg.Now()
	welcome := &relayv1.Welcome{
		SessionId: s.id, ServerTimeMs: now.UnixMilli(), Limits: s.hub.cfg.Limits.Proto(), Resumed: s.hs.resumed,
	}
	if tk, exp, ok := s.sealTicket(now); ok {
		welcome.ResumeTicket, welcome.TicketExpiresAtMs = tk, exp.UnixMilli()
	}
	b, err := frame.Append(nil, &relayv1.Frame{Kind: &relayv1.Frame_Welcome{Welcome: welcome}})
	if err == nil {
		_, err = s.conn.Write(b)
	}
	return err
}

func isProtocolError(err error) bool {
	var fe *frame.Error
	return errors.As(err, &fe)
}

// ticketExpiry is when a ticket sealed now would expire: never after the
// proof of key it carries runs out.
func (s *Session) ticketExpiry(now, authAt time.Time) time.Time {
	exp := now.Add(s.hub.cfg.TicketTTL)
	if limit := authAt.Add(s.hub.cfg.MaxSessionAge); limit.Before(exp) {
		exp = limit
	}
	return exp
}

// sendTicket queues a fresh resume ticket, when one can be made.
func (s *Session) sendTicket(now time.Time) {
	if tk, exp, ok := s.sealTicket(now); ok {
		s.control(&relayv1.Frame{Kind: &relayv1.Frame_Ticket{Ticket: &relayv1.Ticket{ResumeTicket: tk, ExpiresAtMs: exp.UnixMilli()}}})
	}
}

func (s *Session) sealTicket(now time.Time) ([]byte, time.Time, bool) {
	s.authMu.Lock()
	authAt := s.hs.authAt
	s.authMu.Unlock()
	exp := s.ticketExpiry(now, authAt)
	if !exp.After(now) {
		return nil, time.Time{}, false
	}
	tk, err := s.hub.cfg.Ring.Seal(Ticket{UserID: s.userID, DeviceID: s.deviceID, AuthAt: authAt, ExpiresAt: exp})
	if err != nil {
		// No session key yet: the device simply cannot resume.
		s.log.Warn("cannot seal a resume ticket", "err", err)
		return nil, time.Time{}, false
	}
	return tk, exp, true
}

// closeWith ends the session with a reason (the first reason wins): the
// writer sends what is queued and then the Close frame, and the
// connection is cut after CloseLinger at the latest, even if the device
// stopped reading.
func (s *Session) closeWith(reason *CloseError, reconnectIn time.Duration) {
	s.closeOnce.Do(func() {
		s.closeReason, s.reconnectIn = reason, reconnectIn
		s.linger = time.AfterFunc(s.hub.cfg.CloseLinger, func() { _ = s.conn.Close(reason.Code, reason.Msg) })
		close(s.closing)
		s.out.close()
	})
}

// writeClose writes a Close frame straight to a connection (before the
// writer runs, or instead of it).
func writeClose(c Conn, ce *CloseError, reconnectIn time.Duration) {
	if ce.Code == relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED {
		return
	}
	b, err := frame.Append(nil, closeFrame(ce, reconnectIn))
	if err == nil {
		_, _ = c.Write(b)
	}
}

func closeFrame(ce *CloseError, reconnectIn time.Duration) *relayv1.Frame {
	return &relayv1.Frame{Kind: &relayv1.Frame_Close{Close: &relayv1.Close{
		Code: ce.Code, Message: ce.Msg, ReconnectAfterMs: reconnectIn.Milliseconds(), ReplacingInstance: ce.ReplacedBy,
	}}}
}

func (s *Session) readLoop(ctx context.Context) {
	f := &relayv1.Frame{}
	for {
		err := s.reader.Read(f)
		if err != nil {
			if isProtocolError(err) {
				s.closeWith(asCloseError(err), 0)
			}
			return
		}
		if !s.handle(ctx, f, false) {
			return
		}
		// A Frame keeps pointers to its parts; handlers may keep the
		// event, so the next read starts from a new Frame.
		f = &relayv1.Frame{}
	}
}

// handle acts on one frame from the device; false ends the session.
func (s *Session) handle(ctx context.Context, f *relayv1.Frame, datagram bool) bool {
	switch k := f.GetKind().(type) {
	case *relayv1.Frame_Event:
		if datagram && !k.Event.GetEphemeral() {
			s.closeWith(closeErr(relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME, "a datagram may only carry an ephemeral event"), 0)
			return false
		}
		s.handleEvent(ctx, k.Event)
	case *relayv1.Frame_Received:
		if datagram {
			break
		}
		s.handleReceived(k.Received.GetDeliveryIds())
	case *relayv1.Frame_Ping:
		s.control(&relayv1.Frame{Kind: &relayv1.Frame_Pong{Pong: &relayv1.Pong{Nonce: k.Ping.GetNonce()}}})
	case *relayv1.Frame_Pong:
	case *relayv1.Frame_Authenticate:
		if datagram {
			break
		}
		return s.handleReauth(f)
	case *relayv1.Frame_Close:
		s.closeWith(&CloseError{Code: relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, Msg: "closed by the device"}, 0)
		return false
	default:
		s.closeWith(closeErr(relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME, "unexpected %T from a device", k), 0)
		return false
	}
	return true
}

// control queues a control frame; a device that let them pile up is
// closed.
func (s *Session) control(f *relayv1.Frame) {
	if !s.out.control(f) {
		s.closeWith(closeErr(relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER, "the device stopped reading"), 0)
	}
}

func (s *Session) datagramLoop(ctx context.Context) {
	for {
		b, err := s.conn.ReceiveDatagram(ctx)
		if err != nil {
			return
		}
		var f relayv1.Frame
		if err := frame.Decode(b, s.hub.cfg.Limits.MaxFrameBytes, &f); err != nil {
			s.closeWith(asCloseError(err), 0)
			return
		}
		if !s.handle(ctx, &f, true) {
			return
		}
	}
}

// writeLoop owns writes to the connection once the session is open: it
// drains the queue in batches (one write per batch), refreshes the resume
// ticket, runs re-authentication at the maximum age, and finally sends
// the Close frame and closes the connection.
func (s *Session) writeLoop() {
	defer close(s.writerDone)
	cfg := &s.hub.cfg
	var buf, dg []byte
	ticketT := time.NewTimer(s.nextTicketRefresh(cfg.Now()))
	defer ticketT.Stop()
	ageT := time.NewTimer(s.untilMaxAge(cfg.Now()))
	defer ageT.Stop()
	reauthT := time.NewTimer(time.Hour)
	reauthT.Stop()
	defer reauthT.Stop()
	m := cfg.Metrics
	for {
		select {
		case <-s.out.wake:
		case <-ticketT.C:
			now := cfg.Now()
			s.sendTicket(now)
			ticketT.Reset(s.nextTicketRefresh(now))
			continue
		case <-ageT.C:
			s.authMu.Lock()
			ch, err := s.hs.reauth()
			s.authMu.Unlock()
			if err != nil {
				s.closeWith(closeErr(relayv1.ErrorCode_ERROR_CODE_INTERNAL, "re-authentication: %v", err), 0)
			} else {
				s.control(&relayv1.Frame{Kind: &relayv1.Frame_Challenge{Challenge: ch}})
				reauthT.Reset(cfg.HandshakeTimeout)
			}
			continue
		case <-reauthT.C:
			s.authMu.Lock()
			pending := !s.hs.done()
			s.authMu.Unlock()
			if pending {
				s.closeWith(closeErr(relayv1.ErrorCode_ERROR_CODE_SESSION_EXPIRED, "the session reached its maximum age and did not authenticate again"), 0)
			}
			continue
		case <-s.authChanged:
			now := cfg.Now()
			reauthT.Stop()
			ageT.Reset(s.untilMaxAge(now))
			s.sendTicket(now)
			ticketT.Reset(s.nextTicketRefresh(now))
			continue
		}
		batch, closed, overflow := s.out.take()
		if overflow {
			s.closeWith(closeErr(relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER, "the device stopped reading"), 0)
			closed = true
		}
		buf = buf[:0]
		var durable, ephemeral int
		for i := range batch {
			it := &batch[i]
			if it.frame != nil {
				buf, _ = frame.Append(buf, it.frame)
				it.frame = nil
				continue
			}
			if it.delivery != 0 {
				durable++
			} else {
				ephemeral++
			}
			if it.datagram {
				dg = appendDeliverBody(dg[:0], it.event, 0)
				if err := s.conn.SendDatagram(dg); err == nil {
					it.event = nil
					continue
				}
			}
			buf = appendFramed(buf, it.event, it.delivery)
			it.event = nil
		}
		if durable > 0 {
			m.deliveredDurable.Add(float64(durable))
		}
		if ephemeral > 0 {
			m.deliveredEphemeral.Add(float64(ephemeral))
		}
		if closed && s.closeReason.Code != relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED {
			buf, _ = frame.Append(buf, closeFrame(s.closeReason, s.reconnectIn))
		}
		if len(buf) > 0 {
			if _, err := s.conn.Write(buf); err != nil {
				s.closeWith(&CloseError{Code: relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, Msg: "write failed: " + err.Error()}, 0)
				closed = true
			}
		}
		if closed {
			_ = s.conn.Close(s.closeReason.Code, s.closeReason.Msg)
			return
		}
	}
}

// appendFramed appends a length-prefixed Deliver frame.
func appendFramed(dst, event []byte, id uint64) []byte {
	n := deliverBodySize(len(event), id)
	dst = binary.AppendUvarint(dst, uint64(n))
	return appendDeliverBody(dst, event, id)
}

func (s *Session) nextTicketRefresh(now time.Time) time.Duration {
	s.authMu.Lock()
	authAt := s.hs.authAt
	s.authMu.Unlock()
	limit := authAt.Add(s.hub.cfg.MaxSessionAge)
	if !limit.After(now.Add(s.hub.cfg.TicketTTL)) {
		// A new ticket could not outlive the current one's cap: the
		// re-authentication at the maximum age brings the next.
		return s.untilMaxAge(now) + s.hub.cfg.TicketTTL
	}
	return s.ticketExpiry(now, authAt).Sub(now) * 2 / 3
}

func (s *Session) untilMaxAge(now time.Time) time.Duration {
	s.authMu.Lock()
	defer s.authMu.Unlock()
	d := s.hs.authAt.Add(s.hub.cfg.MaxSessionAge).Sub(now)
	if d < 0 {
		d = 0
	}
	return d
}

// handleReauth checks the answer to a re-authentication challenge.
func (s *Session) handleReauth(f *relayv1.Frame) bool {
	s.authMu.Lock()
	_, err := s.hs.step(f) // refused unless a challenge is pending
	if err != nil {
		s.authMu.Unlock()
		s.closeWith(asCloseError(err), 0)
		return false
	}
	s.authMu.Unlock()
	s.hub.cfg.Metrics.handshakes.WithLabelValues("reauthenticated").Inc()
	select {
	case s.authChanged <- struct{}{}:
	default:
	}
	return true
}

// inflight is a durable event on its way to its targets on this edge:
// the sender's Ack goes out when every target acknowledged it.
type inflight struct {
	sender  *Session // nil for an event forwarded from another edge
	eventID string
	digest  uint64
	arrived time.Time
	expires time.Time // when it may no longer be delivered (TTL plus skew)
	// fwd reports the outcome of an event another edge forwarded here.
	fwd func(edgev1.ForwardOutcome)
	// An "any one" event: the first copy delivered (or stored) completes
	// it, and it fails only when every copy did. claim identifies it for
	// the control plane's claims.
	anyOne bool
	claim  *edgev1.EventClaim

	mu        sync.Mutex // guards the fields below
	remaining int
	failures  int
	done      bool
	failed    bool
}

// finish marks the event done (once); false when it already was.
func (f *inflight) finish(failed bool) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.done {
		return false
	}
	f.done, f.failed = true, failed
	return true
}

// confirm records one target's acknowledgement.
func (f *inflight) confirm() {
	f.mu.Lock()
	if f.done {
		f.mu.Unlock()
		return
	}
	f.remaining--
	if f.remaining > 0 && !f.anyOne {
		f.mu.Unlock()
		return
	}
	f.done = true
	f.mu.Unlock()
	if f.fwd != nil {
		f.fwd(edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED)
		return
	}
	f.sender.acked(f)
}

// fail refuses the event to its sender (once); an "any one" event only
// when its last copy failed.
func (f *inflight) fail(code relayv1.ErrorCode, msg string) {
	if f.anyOne {
		f.mu.Lock()
		f.failures++
		last := f.failures >= f.remaining
		f.mu.Unlock()
		if !last {
			return
		}
	}
	if !f.finish(true) {
		return
	}
	if f.fwd != nil {
		switch code {
		case relayv1.ErrorCode_ERROR_CODE_QUEUE_FULL:
			f.fwd(edgev1.ForwardOutcome_FORWARD_OUTCOME_QUEUE_FULL)
		case relayv1.ErrorCode_ERROR_CODE_TARGET_DELETED:
			f.fwd(edgev1.ForwardOutcome_FORWARD_OUTCOME_TARGET_GONE)
		default:
			f.fwd(edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED)
		}
		return
	}
	f.sender.reject(f.eventID, &RejectError{Code: code, Msg: msg})
}

// state returns (done, failed).
func (f *inflight) state() (bool, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.done, f.failed
}

func (s *Session) acked(f *inflight) {
	s.hub.cfg.Metrics.ackLatency.Observe(s.hub.cfg.Now().Sub(f.arrived).Seconds())
	s.control(&relayv1.Frame{Kind: &relayv1.Frame_Ack{Ack: &relayv1.Ack{EventId: f.eventID}}})
}

func (s *Session) reject(eventID string, r *RejectError) {
	s.hub.cfg.Metrics.reject(r.Code)
	s.control(&relayv1.Frame{Kind: &relayv1.Frame_Reject{Reject: &relayv1.Reject{EventId: eventID, Code: r.Code, Message: r.Msg}}})
}

// handleEvent validates an event and hands it to its targets on this
// edge. It runs on the sender's reader goroutine, so the events of one
// sender reach every receiver's queue in the order they were sent.
func (s *Session) handleEvent(ctx context.Context, ev *relayv1.Event) {
	cfg := &s.hub.cfg
	_, span := cfg.Tracer.Start(ctx, "relay.event")
	defer span.End()
	now := cfg.Now()
	expires, rej := ValidateEvent(ev, cfg.Limits, now)
	if rej != nil {
		span.SetStatus(codes.Error, rej.Error())
		s.reject(ev.GetId(), rej)
		return
	}
	s.evMu.Lock()
	defer s.evMu.Unlock()
	durable := !ev.GetEphemeral()
	var digest uint64
	if durable {
		digest = eventDigest(s.hub.seed, ev)
		if prev := s.dedup[ev.GetId()]; prev != nil {
			done, failed := prev.state()
			switch {
			case prev.digest != digest:
				s.reject(ev.GetId(), reject(relayv1.ErrorCode_ERROR_CODE_DUPLICATE_ID, "event id %s was used for a different event", ev.GetId()))
				return
			case !failed:
				// Acked already, or its Ack will come: not relayed again.
				cfg.Metrics.duplicate.Inc()
				if done {
					s.control(&relayv1.Frame{Kind: &relayv1.Frame_Ack{Ack: &relayv1.Ack{EventId: ev.GetId()}}})
				}
				return
			}
			// A refused event may be sent again.
		}
		if ev.GetSeq() <= s.lastSeq {
			s.reject(ev.GetId(), reject(relayv1.ErrorCode_ERROR_CODE_SEQ_OUT_OF_ORDER, "event %s: seq %d not above %d", ev.GetId(), ev.GetSeq(), s.lastSeq))
			return
		}
	}
	if d := cfg.Directory.LookupDevice(s.deviceID); d.State != DeviceActive || !cfg.Directory.UserActive(s.userID) {
		s.reject(ev.GetId(), reject(relayv1.ErrorCode_ERROR_CODE_SENDER_REVOKED, "this device was revoked"))
		return
	}
	if !s.events.AllowN(now, 1) || !s.bytes.AllowN(now, len(ev.GetPayload())) {
		s.reject(ev.GetId(), reject(relayv1.ErrorCode_ERROR_CODE_RATE_LIMITED, "event %s: above %d events/s or %d bytes/s", ev.GetId(), cfg.Limits.EventsPerSecond, cfg.Limits.BytesPerSecond))
		return
	}
	routes, rej := s.resolveTargets(ev, durable)
	if rej != nil {
		s.reject(ev.GetId(), rej)
		return
	}
	ev.SenderDeviceId = s.deviceID
	enc, err := marshalDeterministic.Marshal(ev)
	if err != nil {
		s.reject(ev.GetId(), reject(relayv1.ErrorCode_ERROR_CODE_INTERNAL, "encode event: %v", err))
		return
	}
	span.SetAttributes(attribute.Int("relay.targets", len(routes)), attribute.Bool("relay.ephemeral", !durable))
	if !durable {
		for _, r := range routes {
			if r.edge != "" {
				cfg.Remote.Forward(r.edge, &edgev1.Forward{DeviceId: r.device, UserId: s.userID, Event: enc}, nil)
				continue
			}
			if r.to != nil && r.to.out.offer(enc, false, true, nil) == queueFull {
				cfg.Metrics.droppedQueueFull.Inc()
			}
		}
		cfg.Metrics.accepted.Inc()
		return
	}
	f := &inflight{sender: s, eventID: ev.GetId(), digest: digest, arrived: now, expires: expires, remaining: len(routes), anyOne: ev.GetAnyOne()}
	if f.anyOne {
		f.claim = &edgev1.EventClaim{SenderDeviceId: s.deviceID, EventId: ev.GetId(), UserId: s.userID, ExpiresAtMs: expires.UnixMilli()}
	}
	s.remember(f)
	s.lastSeq = ev.GetSeq()
	cfg.Metrics.accepted.Inc()
	if len(routes) == 0 {
		f.remaining = 1
		f.confirm()
		return
	}
	for _, r := range routes {
		if r.edge != "" {
			s.forward(f, r, enc, expires)
			continue
		}
		if r.to == nil {
			s.storeMailbox(f, r.device, enc, expires)
			continue
		}
		switch r.to.deliverLive(enc, f, r.need) {
		case queueFull:
			f.fail(relayv1.ErrorCode_ERROR_CODE_QUEUE_FULL, "a target's queue is full; retry later")
		case queueClosed:
			f.fail(relayv1.ErrorCode_ERROR_CODE_TARGET_OFFLINE, "a target went offline; retry later")
		}
	}
}

// route is where an event goes for one target: a session here (to), or
// the target's mailbox (to == nil). need is the target's mailbox seq the
// device must have been given first.
type route struct {
	to     *Session
	edge   string // another edge holds the device (to == nil)
	device string
	need   uint64
}

// resolveTargets finds where an event goes. Every explicit target must be
// an active device of the sender's user. With mailboxes, a durable event
// reaches every target: the connected ones live, the others through
// their mailboxes; without, a durable event for a target that is not
// connected is refused whole, before anything is delivered.
func (s *Session) resolveTargets(ev *relayv1.Event, durable bool) ([]route, *RejectError) {
	dir := s.hub.cfg.Directory
	mailboxes := durable && s.hub.cfg.Mailbox != nil
	r := s.room
	var out []route
	if len(ev.GetTargets()) == 0 {
		if mailboxes {
			devs := dir.UserDevices(s.userID)
			out = make([]route, 0, len(devs))
			r.mu.RLock()
			for _, id := range devs {
				if id != s.deviceID {
					out = append(out, route{to: r.devices[id], device: id})
				}
			}
			r.mu.RUnlock()
			s.locateRemote(out)
		} else {
			r.mu.RLock()
			out = make([]route, 0, len(r.devices))
			for id, o := range r.devices {
				if id != s.deviceID {
					out = append(out, route{to: o, device: id})
				}
			}
			r.mu.RUnlock()
		}
	} else {
		out = make([]route, 0, len(ev.GetTargets()))
		for i, t := range ev.GetTargets() {
			for _, prev := range ev.GetTargets()[:i] {
				if prev == t {
					return nil, reject(relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME, "event %s: target %q listed twice", ev.GetId(), t)
				}
			}
			if t == s.deviceID {
				return nil, reject(relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME, "event %s: a device cannot target itself", ev.GetId())
			}
			d := dir.LookupDevice(t)
			if d.State == DeviceUnknown || d.UserID != s.userID {
				// One answer for "another user's" and "no such device".
				return nil, reject(relayv1.ErrorCode_ERROR_CODE_UNKNOWN_TARGET, "event %s: %q is not one of your devices", ev.GetId(), t)
			}
			if d.State != DeviceActive {
				return nil, reject(relayv1.ErrorCode_ERROR_CODE_TARGET_DELETED, "event %s: device %q was deleted or revoked", ev.GetId(), t)
			}
			r.mu.RLock()
			o := r.devices[t]
			r.mu.RUnlock()
			rt := route{to: o, device: t}
			if o == nil {
				rt.edge = s.locate(t)
			}
			if o == nil && rt.edge == "" && durable && !mailboxes {
				return nil, reject(relayv1.ErrorCode_ERROR_CODE_TARGET_OFFLINE, "event %s: device %q is offline", ev.GetId(), t)
			}
			out = append(out, rt)
		}
	}
	if !durable {
		// Ephemeral events go to connected devices only, in no order.
		n := 0
		for _, rt := range out {
			if rt.to != nil || rt.edge != "" {
				out[n] = rt
				n++
			}
		}
		return out[:n], nil
	}
	if mailboxes {
		// Nothing may overtake this sender's earlier events for a target:
		// while some are on their way to its mailbox, this one follows
		// them there; while some are forwarded to an edge, this one goes
		// the same way (that edge answers in order). A target reached live
		// must first be given what this sender stored for it.
		s.routeMu.Lock()
		for i := range out {
			rt := &out[i]
			if s.mbPending[rt.device] > 0 {
				rt.to, rt.edge = nil, ""
			} else if pf, ok := s.fwdPending[rt.device]; ok {
				rt.to, rt.edge = nil, pf.edge
			}
			rt.need = s.mbLast[rt.device]
		}
		s.routeMu.Unlock()
	}
	return out, nil
}

// locate says which other edge holds a device ("" for none).
func (s *Session) locate(device string) string {
	if s.hub.cfg.Remote == nil {
		return ""
	}
	e, _ := s.hub.cfg.Remote.Locate(device)
	return e
}

// locateRemote fills in the edge of routes whose device is not here.
func (s *Session) locateRemote(rs []route) {
	for i := range rs {
		if rs[i].to == nil {
			rs[i].edge = s.locate(rs[i].device)
		}
	}
}

// remember records a durable event for duplicate detection, forgetting
// the oldest beyond DedupWindow.
func (s *Session) remember(f *inflight) {
	if s.dedup == nil {
		s.dedup = make(map[string]*inflight)
		s.dedupRing = make([]*inflight, s.hub.cfg.DedupWindow)
	}
	// The slot's event leaves the window, unless its id was sent again
	// since (a refused event resent): then a newer slot holds it.
	if old := s.dedupRing[s.dedupNext]; old != nil && s.dedup[old.eventID] == old {
		delete(s.dedup, old.eventID)
	}
	s.dedupRing[s.dedupNext] = f
	s.dedupNext = (s.dedupNext + 1) % len(s.dedupRing)
	s.dedup[f.eventID] = f
}

// eventDigest identifies an event's content to tell a duplicate from a
// reused id: its targets, type, payload and TTL. Not its seq, which a
// resend may change, nor its creation time: a sender retrying a refused
// event (QUEUE_FULL, TARGET_OFFLINE) builds it again a moment later.
func eventDigest(seed maphash.Seed, ev *relayv1.Event) uint64 {
	var h maphash.Hash
	h.SetSeed(seed)
	for _, t := range ev.GetTargets() {
		_, _ = h.WriteString(t)
		_ = h.WriteByte(0)
	}
	_ = h.WriteByte(1)
	_, _ = h.WriteString(ev.GetType())
	_ = h.WriteByte(0)
	_, _ = h.Write(ev.GetPayload())
	var n [8]byte
	for i := range 8 {
		n[i] = byte(uint64(ev.GetTtlMs()) >> (8 * i))
	}
	_, _ = h.Write(n[:])
	return h.Sum64()
}

// await is a delivery the device has not acknowledged yet: a live event
// (f, with its encoding for a hand-off to the mailbox) or a mailbox entry
// (mbSeq).
type await struct {
	f     *inflight
	event []byte
	mbSeq uint64
	// For an "any one" event: what to claim when the device acknowledges.
	claim *edgev1.EventClaim
}

// track records a delivery this device must acknowledge.
func (s *Session) track(id uint64, a await) {
	s.awaitMu.Lock()
	if s.awaiting == nil {
		s.awaiting = make(map[uint64]await)
	}
	s.awaiting[id] = a
	s.awaitMu.Unlock()
}

// handleReceived takes the device's acknowledgements.
func (s *Session) handleReceived(ids []uint64) {
	var acked []uint64
	for _, id := range ids {
		s.awaitMu.Lock()
		a, ok := s.awaiting[id]
		delete(s.awaiting, id)
		s.awaitMu.Unlock()
		switch {
		case !ok:
		case a.claim != nil && s.hub.cfg.Mailbox != nil:
			s.claim(a)
		case a.mbSeq != 0:
			acked = append(acked, a.mbSeq)
		default:
			a.f.confirm()
		}
	}
	if len(acked) > 0 {
		s.hub.cfg.Mailbox.Ack(s.deviceID, acked...)
		s.mailboxAcked(len(acked))
	}
}

// claim asks the control plane whether this device is the one that takes
// an "any one" event it acknowledged. Either way the delivery counts as
// done (the event was taken care of); a device that lost gets a Cancel.
func (s *Session) claim(a await) {
	c := proto.Clone(a.claim).(*edgev1.EventClaim)
	c.DeviceId, c.UserId = s.deviceID, s.userID
	s.hub.cfg.Mailbox.Claim(c, func(won bool) {
		if !won {
			s.out.control(&relayv1.Frame{Kind: &relayv1.Frame_Cancel{Cancel: &relayv1.Cancel{EventId: c.GetEventId(), SenderDeviceId: c.GetSenderDeviceId()}}})
		}
		if a.mbSeq != 0 {
			s.hub.cfg.Mailbox.Ack(s.deviceID, a.mbSeq)
			s.mailboxAcked(1)
			return
		}
		a.f.confirm()
	})
}

// handOff gives the events this device never acknowledged to its
// mailbox (they count as delivered once stored), or, without mailboxes
// or when the device was revoked, refuses them to their senders: they
// must not count as delivered.
func (s *Session) handOff() {
	s.awaitMu.Lock()
	pending := s.awaiting
	s.awaiting = nil
	s.awaitMu.Unlock()
	held := s.takeHeld()
	ids := make([]uint64, 0, len(pending))
	for id, a := range pending {
		if a.f != nil {
			ids = append(ids, id)
		}
	}
	// In the order they were queued, so each sender's order holds in the
	// mailbox.
	slices.Sort(ids)
	revoked := s.closeReason.Code == relayv1.ErrorCode_ERROR_CODE_REVOKED
	give := func(f *inflight, event []byte) {
		switch {
		case f.fwd != nil:
			// The sending edge stores it (keeping its sender's order).
			if revoked {
				f.fail(relayv1.ErrorCode_ERROR_CODE_TARGET_DELETED, "")
			} else {
				f.fail(relayv1.ErrorCode_ERROR_CODE_TARGET_OFFLINE, "")
			}
		case revoked:
			f.fail(relayv1.ErrorCode_ERROR_CODE_TARGET_DELETED, "a target was revoked or deleted")
		case s.hub.cfg.Mailbox == nil:
			f.fail(relayv1.ErrorCode_ERROR_CODE_TARGET_OFFLINE, "a target went offline before receiving it; retry later")
		default:
			f.sender.storeMailbox(f, s.deviceID, event, f.expires)
		}
	}
	for _, id := range ids {
		a := pending[id]
		give(a.f, a.event)
	}
	for _, h := range held {
		give(h.f, h.event)
	}
}
