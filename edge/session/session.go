package session

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/time/rate"

	"github.com/edge-relay/relay/edge/devconn"
	"github.com/edge-relay/relay/edge/frame"
	"github.com/edge-relay/relay/edge/idwindow"
	"github.com/edge-relay/relay/internal/telemetry"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// Session is one authenticated device connection on this edge.
type Session struct {
	hub    *Hub
	conn   devconn.Conn
	id     string
	out    *queue
	reader *frame.Reader

	// epoch is the hub's Restart count when the session began (set
	// before it runs).
	epoch uint64

	// Set by the handshake, then read-only.
	userID, deviceID string
	room             *room // set by register

	// Guards the handshake state, shared by the reader (answers) and the
	// writer (re-authentication challenges).
	authMu sync.Mutex
	hs     handshake // hs.authAt: when the key was last proven; not done: a re-authentication is pending

	// The writer's timers (ticket refresh, maximum age, the answer to a
	// re-authentication): each schedules work on the queue when it fires.
	timersMu               sync.Mutex
	ticketT, ageT, reauthT *time.Timer
	timersStopped          bool
	// writerDone is closed by the writer that ends the session.
	writerDone chan struct{}

	// Event intake; the stream reader and the datagram reader share it.
	evMu    sync.Mutex
	lastSeq uint64
	dedup   *idwindow.Window[*inflight]
	// dirCache keeps the directory's answers its events need (nil until
	// the first event).
	dirCache *dirCache

	// What the device may send: every frame counts against frames and
	// bytes, events also against events. Above the rate the reader waits
	// (pace), so a flood is slowed by the transport's own flow control;
	// refusals counts frames the edge refused for the device's own fault,
	// and running out of it ends the session (RATE_LIMITED).
	budget   *budget
	refusals *rate.Limiter
	paceT    *time.Timer // the reader's, reused
	// startDatagrams starts the datagram reader of a client that defers
	// its datagrams (Hello.defer_datagrams) at its first ephemeral event
	// on the stream; nil once started, or when there is none to start.
	// The stream reader's alone.
	startDatagrams func()

	// Deliveries to this device that it has not acknowledged yet.
	awaitMu  sync.Mutex
	awaiting map[uint64]await

	// As a sender: mailbox writes in flight and the last seq stored, per
	// target device, so a later event for the same target never overtakes
	// an earlier one that went to the mailbox.
	routeMu    sync.Mutex
	mbPending  map[string]int
	mbLast     map[string]uint64
	fwdPending map[string]*pendingForward
	// fwdBytes is what the events of fwdPending's slots weigh until their
	// outcomes are acted on, or decided not to need them (Config.PendingForwardBytes).
	fwdBytes int
	// openRev is a control-plane revision at or after this session
	// started (its first mailbox read): whatever the device's earlier
	// sessions stored in mailboxes was committed by then. Its live events
	// carry it so a target is first given those entries (0 until known).
	openRev   atomic.Uint64
	openKnown atomic.Bool // a mailbox read succeeded: openRev is set
	// heard is set when the device's mailbox is announced while the
	// session is being set up (see listen).
	heard atomic.Bool

	// since is when the session was registered (it is announced to other
	// edges; the newer session of a device wins), and later than its
	// device's session before it here or on another edge, whose clock
	// may be ahead.
	since time.Time
	// active is when the device last sent an event (Unix ms), for
	// activity reports; kept to the second.
	active atomic.Int64
	// instance is the client instance the device's Hello named.
	instance string

	// As a receiver: this device's mailbox (see mailbox.go).
	mb mailboxState

	// A newer session of the same device here that must wait until this
	// one has handed off (see Hub.register): succMu guards successor and
	// handedOff; issued is closed once this one's hand-off stores were all
	// issued, and predIssued is that of the session this one replaced, if
	// it had not handed off yet (the channel, not the session, so a chain
	// of reconnects keeps no old session alive).
	succMu     sync.Mutex
	successor  *Session
	handedOff  bool
	issued     chan struct{}
	predIssued chan struct{}

	// The one close path (closeWith): the first reason wins; closing is
	// closed then, and the connection's writes are bounded by
	// closeDeadline, after which the writer aborts the connection.
	closeOnce     sync.Once
	closeReason   *CloseError
	reconnectIn   time.Duration
	closeDeadline time.Time
	closing       chan struct{}
	abortT        *time.Timer // the last resort: abort if the writer did not end
}

func newSession(h *Hub, c devconn.Conn) *Session {
	l := h.cfg.Limits
	s := &Session{
		hub:  h,
		conn: c,
		out:  newQueue(h.cfg.QueueLen, h.cfg.QueueBytes, h.cfg.ControlQueueLen),
		reader: frame.NewReaderConfig(c, frame.ReaderConfig{
			Max: l.MaxFrameBytes, Pool: h.readBufs, FrameTimeout: l.FrameTimeout,
		}),
		writerDone: make(chan struct{}),
		issued:     make(chan struct{}),
		closing:    make(chan struct{}),
		// Bursts of a second's worth; a frame of the largest size always
		// fits the byte bucket.
		budget: newBudget(h.cfg.Now(), l.FramesPerSecond, l.EventsPerSecond, l.BytesPerSecond,
			l.FramesPerSecond, max(l.EventsPerSecond, 1), max(l.BytesPerSecond, l.MaxFrameBytes+binary.MaxVarintLen64)),
		refusals: rate.NewLimiter(rate.Limit(h.cfg.RefusalsPerSecond), h.cfg.RefusalBurst),
	}
	s.out.start = s.startWriter
	if h.cfg.Mailbox != nil {
		s.out.roomed = func() { signal(s.mb.wake) }
	}
	s.out.maxUnacked, s.out.maxUnackedBytes = h.cfg.UnackedLen, h.cfg.UnackedBytes
	s.hs = handshake{
		edgeID: h.cfg.EdgeID, dir: h.cfg.Directory, ring: h.cfg.Ring, now: h.cfg.Now,
		random: h.cfg.Random, maxAge: h.cfg.MaxSessionAge, dummyKey: h.dummyKey,
		resumeWindow: h.cfg.ResumeWindow, replays: h.replays, proofsSince: h.started, verify: h.cfg.verify, conn: c,
		requireBound: slices.Contains(h.cfg.RequireBoundProofs, c.Transport()),
	}
	var id [16]byte
	_, _ = io.ReadFull(h.cfg.Random, id[:])
	s.id = hex.EncodeToString(id[:])
	return s
}

// logAt logs msg at level with the session's attributes (and, once the
// handshake named them, its user and device), built only when the level
// is enabled: a logger per session (slog's With formats its attributes
// ahead) held about 0.75 KiB for every idle session.
func (s *Session) logAt(level slog.Level, msg string, args ...any) {
	l := s.hub.cfg.Logger
	if !l.Enabled(context.Background(), level) {
		return
	}
	var pc [1]uintptr
	runtime.Callers(2, pc[:]) // the caller's line, for handlers that show it
	r := slog.NewRecord(time.Now(), level, msg, pc[0])
	r.Add("session", s.id, "transport", s.conn.Transport(), "remote", addrString(s.conn))
	if s.userID != "" {
		r.Add("user", s.userID, "device", s.deviceID)
	}
	r.Add(args...)
	_ = l.Handler().Handle(context.Background(), r)
}

func addrString(c devconn.Conn) string {
	if a := c.RemoteAddr(); a != nil {
		return a.String()
	}
	return ""
}

// noteActive records that the device acted at now.
func (s *Session) noteActive(now time.Time) {
	ms := now.UnixMilli()
	if ms-s.active.Load() >= 1000 {
		s.active.Store(ms)
	}
}

// activity is the device's last activity: the start of the session or
// its last event.
func (s *Session) activity() Activity {
	at := s.since
	if now := s.hub.cfg.Now(); at.After(now) {
		at = now // moved past another edge's clock (register)
	}
	if ms := s.active.Load(); ms > at.UnixMilli() {
		at = time.UnixMilli(ms)
	}
	return Activity{UserID: s.userID, DeviceID: s.deviceID, At: at}
}

// ID is the session id told to the device in its Welcome.
func (s *Session) ID() string { return s.id }

// run runs the session to its end and returns why (nil for an ordinary
// goodbye). Whatever ends it, it ends through closeWith, and run returns
// within CloseLinger plus the transport's close wait.
func (s *Session) run(ctx context.Context) error {
	// Last: whatever way the session ends (mid-frame among them), its
	// reader gives back the buffer it borrowed; the session itself may
	// stay reachable a while (through its inflights' sender).
	defer s.reader.Release()
	// The opening (the key's proof, the first mailbox read, the
	// registration, the Welcome) runs on a goroutine of its own that ends
	// before this one goes on: its calls grow a stack to 8 KiB, and the
	// runtime gives a parked goroutine's stack back only while less than a
	// quarter of it is in use, which the reader parked in the transport
	// never is. This goroutine, which parks in the reader for the session's
	// life, keeps the smaller stack it started with (docs/benchmarks.md).
	var (
		hsSpan trace.SpanContext
		opened bool
		err    error
	)
	onOwnStack(func() { hsSpan, opened, err = s.open(ctx) })
	if !opened {
		return err
	}
	// The session's events link to its handshake span (traceEvent); the
	// context carries the span's identity, not the ended span itself.
	if hsSpan.IsValid() {
		ctx = trace.ContextWithSpanContext(ctx, hsSpan)
	}
	m := s.hub.cfg.Metrics
	defer m.sessions.WithLabelValues(s.conn.Transport()).Dec()

	// From here the queue starts a writer whenever it has something.
	s.startTimers()
	s.out.release()
	var wg sync.WaitGroup
	dctx, stopDatagrams := context.WithCancel(ctx)
	switch hello := s.hs.hello; {
	case hello.GetNoDatagrams():
		// A client that sends no datagrams gets no reader for them.
	case hello.GetDeferDatagrams():
		// Nor one that has sent none yet (see streamEphemeral); run
		// still waits for it, as it is started on this goroutine.
		s.startDatagrams = func() { wg.Go(func() { s.datagramLoop(dctx) }) }
	default:
		wg.Go(func() { s.datagramLoop(dctx) })
	}
	// The owner's context ending closes the session like any other reason
	// (without a goroutine per idle session).
	stopWatch := context.AfterFunc(ctx, func() {
		s.closeWith(closeErr(relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, "edge is shutting down"), 0)
	})
	defer stopWatch()

	// Anything stored while this session was being set up is fetched now
	// that the session is reachable, if it may have been missed.
	s.settleMailbox()
	s.closeWith(s.readLoop(ctx), 0)
	// The reader has stopped (closeWith stops it): hand what the device
	// did not acknowledge to its mailbox before the session leaves the
	// routing table. Until then later events for it are refused (its
	// queue is closed), so none can overtake these; after it, they go to
	// the mailbox behind them. The writer may still be flushing its last
	// frames: what it delivers twice, the client drops.
	s.stopMailbox()
	s.awaitPredecessor()
	if s.hub.beforeHandOff != nil {
		s.hub.beforeHandOff(s)
	}
	s.handOff(s.handedOffTo)
	close(s.issued)
	s.hub.unregister(s)
	stopDatagrams()
	wg.Wait()
	<-s.writerDone
	s.abortT.Stop()
	reason := s.closeReason
	m.closes.WithLabelValues(codeLabel(reason.Code)).Inc()
	s.logAt(slog.LevelDebug, "session closed", "code", reason.Code.String(), "reason", reason.Msg)
	if reason.Code == relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED {
		return nil
	}
	return reason
}

// open runs the handshake, reads the device's mailbox and registers the
// session, and returns the handshake span's context. opened false: the
// session ended (err says why, nil for a device that left); opened true:
// it is registered and counts in the sessions gauge, which run takes down
// when it ends.
func (s *Session) open(ctx context.Context) (hsSpan trace.SpanContext, opened bool, err error) {
	m := s.hub.cfg.Metrics
	start := s.hub.cfg.Now()
	ctx, span := s.hub.cfg.Tracer.Start(ctx, "relay.handshake", trace.WithAttributes(attribute.String("relay.transport", s.conn.Transport())))
	if err := s.handshake(ctx); err != nil {
		ce := asCloseError(err)
		m.handshakes.WithLabelValues(codeLabel(ce.Code)).Inc()
		span.SetStatus(codes.Error, ce.Error())
		span.End()
		s.logAt(slog.LevelDebug, "handshake failed", "err", err)
		refuse(s.conn, ce, 0, s.hub.cfg.CloseLinger)
		if ce.Code == relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED {
			return span.SpanContext(), false, nil // the device left, or the connection broke
		}
		return span.SpanContext(), false, ce
	}
	result := "full"
	if s.hs.resumed {
		result = "resumed"
	}
	m.handshakes.WithLabelValues(result).Inc()
	m.proof(s.hs.binding != nil, s.conn.Transport()).Inc()
	m.handshakeTime.Observe(s.hub.cfg.Now().Sub(start).Seconds())
	span.SetAttributes(attribute.String("relay.device", telemetry.HashID(s.deviceID)), attribute.Bool("relay.resumed", s.hs.resumed))
	span.End()
	s.logAt(slog.LevelDebug, "session open", "resumed", s.hs.resumed)

	s.primeMailbox(ctx)
	if err := s.hub.register(s); errors.Is(err, errClosedInRoom) {
		// The Close goes now, ahead of what senders queued meanwhile (the
		// device got no Welcome, and a revoked one gets no event); the
		// writer's later writes fail on the closed connection, and run
		// ends the session as any closed one, answering those senders.
		refuse(s.conn, s.closeReason, 0, s.hub.cfg.CloseLinger)
		m.sessions.WithLabelValues(s.conn.Transport()).Inc()
		return span.SpanContext(), true, nil
	} else if err != nil {
		s.stopListening()
		var ce *CloseError
		if !errors.As(err, &ce) { // ErrDraining
			ce = closeErr(relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, "edge is shutting down")
		}
		refuse(s.conn, ce, 0, s.hub.cfg.CloseLinger)
		return span.SpanContext(), false, err
	}
	m.sessions.WithLabelValues(s.conn.Transport()).Inc()
	if a, ok := s.conn.(devconn.Admitter); ok {
		a.Admitted()
	}
	if err := s.writeWelcome(); err != nil {
		s.closeWith(&CloseError{Code: relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, Msg: "write welcome: " + err.Error()}, 0)
	}
	return span.SpanContext(), true, nil
}

// onOwnStack runs f on a goroutine of its own and returns when f has
// returned, so that the stack f grows goes when f is done.
func onOwnStack(f func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	<-done
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
// HandshakeTimeout (reads and writes alike), and stopped by ctx.
func (s *Session) handshake(ctx context.Context) error {
	timeout := s.hub.cfg.HandshakeTimeout
	deadline := time.Now().Add(timeout)
	_ = s.reader.SetIdleDeadline(deadline)
	_ = s.conn.SetWriteDeadline(deadline)
	stop := context.AfterFunc(ctx, s.reader.Stop)
	defer stop()
	w := frame.NewWriter(s.conn, s.hub.cfg.Limits.MaxFrameBytes)
	var f relayv1.Frame
	waited := false
	for !s.hs.done() {
		if err := s.reader.Read(&f); err != nil {
			if ctx.Err() != nil {
				return closeErr(relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, "edge is shutting down")
			}
			if isTimeout(err) {
				return closeErr(relayv1.ErrorCode_ERROR_CODE_TIMEOUT, "handshake not completed within %s", timeout)
			}
			return readEnd(err)
		}
		// A Hello's min_revision is waited for once, before the device is
		// looked up for a proof: the Challenge goes out at once, so the
		// wait overlaps the device's signing and its clock reading is not
		// delayed (a resume waits before its Hello is checked).
		if rev := s.hs.lookupRevision(&f); rev > 0 && !waited {
			waited = true
			if err := s.waitRevision(ctx, rev, deadline); err != nil {
				return err
			}
		}
		reply, err := s.hs.step(&f)
		if err != nil {
			return err
		}
		if reply != nil {
			if err := w.Write(reply); err != nil {
				return &CloseError{Code: relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, Msg: "write challenge: " + err.Error()}
			}
		}
	}
	if ctx.Err() != nil {
		return closeErr(relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, "edge is shutting down")
	}
	_ = s.reader.SetIdleDeadline(time.Time{})
	_ = s.conn.SetWriteDeadline(time.Time{})
	s.hs.trimHello()
	s.userID, s.deviceID = s.hs.hello.GetUserId(), s.hs.hello.GetDeviceId()
	s.instance = s.hs.hello.GetInstance()
	return nil
}

// waitRevision holds the handshake, at most RevisionWait and never past
// deadline, until the directory has reached rev, the revision the Hello
// named (a device registered moments ago, whose registration may still
// be on its way to this edge). If it is not reached in time, or
// MaxRevisionWaits handshakes wait already, the handshake goes on with
// what the directory knows. The wait does not depend on the device (so
// it tells nothing about which ids exist), and is bounded by the
// handshake's own time, which a client that sends its frames slowly
// already has; it wakes when the directory's revision moves, not at
// every change. It ends, with GOING_AWAY, when the hub drains or ctx
// ends.
func (s *Session) waitRevision(ctx context.Context, rev uint64, deadline time.Time) error {
	h, dir := s.hub, s.hub.cfg.Directory
	at := dir.Revision()
	if at >= rev || h.cfg.RevisionWait < 0 {
		return nil
	}
	if h.revisionWaits.Add(1) > int64(h.cfg.MaxRevisionWaits) {
		h.revisionWaits.Add(-1)
		s.logAt(slog.LevelDebug, "handshake goes on without waiting for the hello's revision: too many wait", "min_revision", rev, "revision", at)
		return nil
	}
	defer h.revisionWaits.Add(-1)
	if until := time.Now().Add(h.cfg.RevisionWait); until.Before(deadline) {
		deadline = until
	}
	// Debug, as the lines below: any peer can name a revision, before it
	// has proved anything.
	s.logAt(slog.LevelDebug, "handshake waits for the directory to reach the hello's revision", "min_revision", rev, "revision", at)
	wctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	stop := context.AfterFunc(h.drained, cancel)
	defer stop()
	start := time.Now()
	err := dir.WaitRevision(wctx, rev)
	if ctx.Err() != nil || h.drained.Err() != nil {
		return closeErr(relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, "edge is shutting down")
	}
	if err != nil {
		s.logAt(slog.LevelDebug, "handshake went on before the directory reached the hello's revision", "min_revision", rev, "revision", dir.Revision(), "waited", time.Since(start))
	}
	return nil
}

// writeWelcome completes the handshake. The session is registered by
// then, so a device that holds its Welcome is reachable.
func (s *Session) writeWelcome() error {
	now := s.hub.cfg.Now()
	welcome := &relayv1.Welcome{
		SessionId: s.id, ServerTimeMs: now.UnixMilli(), Limits: s.hub.limits, Resumed: s.hs.resumed,
	}
	if tk, exp, ok := s.sealTicket(now); ok {
		welcome.ResumeTicket, welcome.TicketExpiresAtMs = tk, exp.UnixMilli()
	}
	b, err := frame.Append(nil, &relayv1.Frame{Kind: &relayv1.Frame_Welcome{Welcome: welcome}})
	if err == nil {
		_ = s.conn.SetWriteDeadline(time.Now().Add(s.hub.cfg.WriteTimeout))
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
		s.logAt(slog.LevelWarn, "cannot seal a resume ticket", "err", err)
		return nil, time.Time{}, false
	}
	return tk, exp, true
}

// closeWith ends the session with a reason; the first reason wins. It is
// the one way a session ends, whoever calls it (the reader, the writer,
// the hub, the directory, the owner's context) and whatever the
// transport:
//
//   - the queue takes nothing more and the reader stops at once, so the
//     session leaves the routing table without waiting for the device;
//   - the writer sends what is queued and then the Close frame, with its
//     writes bounded by CloseLinger from now: a Write blocked on a device
//     that stopped reading fails then, instead of the stream being closed
//     under it, and the writer aborts the connection;
//   - a last-resort timer aborts the connection should the writer not
//     have ended the session by CloseLinger plus abortGrace.
//
// It never blocks.
func (s *Session) closeWith(reason *CloseError, reconnectIn time.Duration) {
	if reason == nil {
		// A reader stopped with no reason recorded: the handshake's stop
		// (its context ending) fired after the handshake was done, and
		// before the session's own watch of that context closed it. The
		// writer, the abort and the metrics all read the reason.
		reason = closeErr(relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, "the session's reader was stopped")
	}
	s.closeOnce.Do(func() {
		linger := s.hub.cfg.CloseLinger
		s.closeReason, s.reconnectIn = reason, reconnectIn
		s.closeDeadline = time.Now().Add(linger)
		s.abortT = time.AfterFunc(linger+abortGrace, func() { _ = s.conn.Abort(reason.Code, reason.Msg) })
		close(s.closing)
		s.out.close()
		s.reader.Stop()
		// After closing is closed: the writer, which sets its own deadline
		// before it checks closing, cannot move this one later.
		_ = s.conn.SetWriteDeadline(s.closeDeadline)
	})
}

// abortGrace is how long after CloseLinger a session's connection is
// aborted if its writer has not closed it: the transport's graceful close
// waits about a second for the device to hang up.
const abortGrace = 3 * time.Second

// refuse ends a connection that never became a registered session (a
// failed handshake, a hub that is draining): the Close frame, written
// within linger, then the transport's graceful close, or an abort when
// the frame could not be written. The caller is the only writer.
func refuse(c devconn.Conn, ce *CloseError, reconnectIn, linger time.Duration) {
	if ce.Code != relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED {
		b, err := frame.Append(nil, closeFrame(ce, reconnectIn))
		if err == nil {
			_ = c.SetWriteDeadline(time.Now().Add(linger))
			_, err = c.Write(b)
		}
		if err != nil {
			_ = c.Abort(ce.Code, ce.Msg)
			return
		}
	}
	_ = c.Close(ce.Code, ce.Msg)
}

func closeFrame(ce *CloseError, reconnectIn time.Duration) *relayv1.Frame {
	return &relayv1.Frame{Kind: &relayv1.Frame_Close{Close: &relayv1.Close{
		Code: ce.Code, Message: ce.Msg, ReconnectAfterMs: reconnectIn.Milliseconds(), ReplacingInstance: ce.ReplacedBy,
	}}}
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

// handedOffTo tells the session that replaced this one, if any, that what
// this one handed off is stored.
func (s *Session) handedOffTo(stored handedOff) {
	s.succMu.Lock()
	s.handedOff = true
	succ := s.successor
	s.successor = nil
	s.succMu.Unlock()
	if succ != nil {
		succ.predecessorStored(stored)
	}
}

// awaitPredecessor waits (bounded) until the session this one replaced
// has issued its hand-off stores, before this one hands off in turn: the
// mailbox stores in the order it is asked, so what this one gives follows
// what that one gave.
func (s *Session) awaitPredecessor() {
	if s.predIssued == nil {
		return
	}
	t := time.NewTimer(predecessorWait)
	defer t.Stop()
	select {
	case <-s.predIssued:
	case <-t.C:
		s.logAt(slog.LevelWarn, "the replaced session did not hand off in time", "waited", predecessorWait)
	}
}

// predecessorWait bounds awaitPredecessor: a session's end, its hand-off
// included, is bounded by its close deadline, well below this.
const predecessorWait = 10 * time.Second
