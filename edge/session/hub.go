package session

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
	"golang.org/x/time/rate"

	"github.com/edge-relay/relay/edge/devconn"
	"github.com/edge-relay/relay/edge/frame"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// Config configures a Hub. Zero fields take the defaults in brackets.
type Config struct {
	// EdgeID names this edge in challenges (and so in every signed
	// transcript); required.
	EdgeID string
	// Directory answers who devices and users are; required.
	Directory Directory
	// Ring seals and opens resume tickets; required.
	Ring *Ring
	// Limits are enforced per session and announced in the Welcome; each
	// field left zero takes its value from [DefaultLimits].
	Limits Limits
	// TicketTTL is how long a resume ticket is valid [1h]. A fresh one is
	// sent when two thirds of it have passed.
	TicketTTL time.Duration
	// RequireBoundProofs names the transports (devconn.TransportQUIC,
	// TransportWebTransport, TransportWebSocket) on which a device must
	// speak a protocol version whose proofs are bound to its TLS
	// connection (proof.Bound): a Hello of an older version is refused
	// UNSUPPORTED_VERSION there, a minimum protocol version. A version 1
	// proof names no transport, so only all three keep a middleman the
	// device trusts from passing it on; browsers speak version 1 only (no
	// browser API gives the TLS exporter), so list webtransport or
	// websocket only for an edge no browser uses. Empty: every version,
	// everywhere.
	RequireBoundProofs []string
	// MaxSessionAge is how long a proof of key lasts, across resumes
	// [24h]: then the session must sign a new challenge or is closed.
	MaxSessionAge time.Duration
	// HandshakeTimeout bounds the handshake, and the answer to a
	// re-authentication challenge [10s].
	HandshakeTimeout time.Duration
	// RevisionWait bounds how long a Hello's min_revision holds the
	// handshake while the Directory catches up with it [5s, at most
	// half of HandshakeTimeout]; then the handshake goes on with what
	// the Directory knows. Negative: never wait.
	RevisionWait time.Duration
	// MaxRevisionWaits bounds the handshakes waiting for a revision at
	// once [1024]; one beyond it goes on without waiting.
	MaxRevisionWaits int
	// QueueLen and QueueBytes bound a session's queue of deliveries
	// [256, 1 MiB]; ControlQueueLen bounds its acks, rejects and presence
	// frames [4096], beyond which the device counts as not reading.
	QueueLen, QueueBytes, ControlQueueLen int
	// UnackedLen and UnackedBytes bound a device's durable deliveries
	// queued or sent and not yet acknowledged [1024, 4 MiB]: beyond
	// either, further ones are refused as if its queue were full
	// (QUEUE_FULL to their senders), so a device that reads its
	// deliveries but never acknowledges them holds a bounded share of
	// the edge's memory.
	UnackedLen, UnackedBytes int
	// PendingForwardBytes bounds the bytes of a session's durable events
	// forwarded to other edges that it still holds: in flight to their
	// edge, or answered and waiting, in its target's order, behind an
	// earlier forward whose outcome has not come (the target's edge
	// holds it until the device acknowledges it) [4 MiB]. Beyond it a
	// forward is refused QUEUE_FULL. An outcome that stores nothing
	// (delivered, QUEUE_FULL, TARGET_GONE) frees its event at once.
	PendingForwardBytes int
	// Mailbox keeps durable events for devices that are not connected
	// here; nil: such events are refused with TARGET_OFFLINE.
	Mailbox Mailbox
	// Remote reaches devices on other edges; nil: this edge is alone.
	Remote Remote
	// MailboxWindow bounds a device's mailbox deliveries awaiting its
	// acknowledgement, and the entries fetched at once [64].
	MailboxWindow int
	// MailboxBusyGrace is how long a session's mailbox reads may be
	// refused as busy (ErrMailboxBusy) while the live deliveries held
	// behind the mailbox keep waiting; past it they are refused as after
	// any failed read [10s].
	MailboxBusyGrace time.Duration
	// DedupWindow is how many recent event ids per session are remembered
	// to ack duplicates without relaying them again [1024].
	DedupWindow int
	// MaxSessions bounds the sessions on this edge, handshakes included;
	// beyond it new ones are told to go to another edge (GOING_AWAY)
	// [0: no bound].
	MaxSessions int
	// HandshakesPerSecond and HandshakeBurst limit new sessions per
	// client IP address [20, 50].
	HandshakesPerSecond float64
	HandshakeBurst      int
	// WriterLinger is how long a session's writer waits for more to
	// write once its queue is empty before it ends [1s]: a busy session
	// keeps its writer, an idle one holds none.
	WriterLinger time.Duration
	// CloseLinger is how long a closing session waits for its last frames
	// to reach the device before the connection is cut [2s].
	CloseLinger time.Duration
	// WriteTimeout is how long one write to a device (at most 64 KiB of
	// a batch) may wait for the device to take it; a device that takes
	// less than that in this long is closed with SLOW_CONSUMER [20s].
	WriteTimeout time.Duration
	// RefusalsPerSecond and RefusalBurst bound the frames a device may
	// have refused for its own fault (invalid events, datagrams over its
	// rate); beyond them the session is closed with RATE_LIMITED
	// [10/s, 100].
	RefusalsPerSecond float64
	RefusalBurst      int
	// ResumeWindow is how far a resume proof's client time may be from
	// the edge's clock [30s] (clients stamp it with the offset they
	// learnt); MaxResumeProofs bounds the proofs remembered to refuse a
	// second use [200000].
	ResumeWindow    time.Duration
	MaxResumeProofs int
	// MaxEndedActivity bounds the activity of ended sessions kept until
	// the next TakeActivity [100000]; beyond it the oldest is dropped.
	MaxEndedActivity int
	// Ready, when set, says whether the edge can serve sessions (its
	// directory is synced); until it does, new sessions are told to go
	// away and come back or try another edge, rather than failing
	// authentication against an empty directory.
	Ready func() bool
	// Now is the clock [time.Now]; Random the randomness [crypto/rand].
	// Now must advance with real time (device budgets wait on timers for
	// what it says is due), as time.Now with its monotonic reading does.
	Now    func() time.Time
	Random io.Reader
	// Logger [slog.Default()]; Metrics [unregistered]; Tracer [none:
	// events get no spans, and cost nothing for it].
	Logger  *slog.Logger
	Metrics *Metrics
	Tracer  trace.Tracer

	// verify replaces ed25519.Verify in tests that count signature checks.
	verify func(pub, msg, sig []byte) bool
}

func (c *Config) setDefaults() error {
	if c.EdgeID == "" || c.Directory == nil || c.Ring == nil {
		return errors.New("session: EdgeID, Directory and Ring are required")
	}
	if err := devconn.CheckTransports(c.RequireBoundProofs); err != nil {
		return fmt.Errorf("session: RequireBoundProofs: %w", err)
	}
	c.Limits = c.Limits.WithDefaults()
	if c.Limits.MaxFrameBytes > frame.MaxFrameLimit {
		return fmt.Errorf("session: a frame limit of %d bytes is above the protocol's %d", c.Limits.MaxFrameBytes, frame.MaxFrameLimit)
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	defInt := func(d *int, v int) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.TicketTTL, time.Hour)
	def(&c.MaxSessionAge, 24*time.Hour)
	def(&c.HandshakeTimeout, 10*time.Second)
	if c.RevisionWait == 0 {
		c.RevisionWait = 5 * time.Second
	}
	c.RevisionWait = min(c.RevisionWait, c.HandshakeTimeout/2)
	defInt(&c.MaxRevisionWaits, 1024)
	def(&c.CloseLinger, 2*time.Second)
	def(&c.WriterLinger, time.Second)
	def(&c.WriteTimeout, 20*time.Second)
	def(&c.ResumeWindow, 30*time.Second)
	defInt(&c.RefusalBurst, 100)
	defInt(&c.MaxResumeProofs, 200_000)
	defInt(&c.MaxEndedActivity, 100_000)
	if c.RefusalsPerSecond <= 0 {
		c.RefusalsPerSecond = 10
	}
	defInt(&c.QueueLen, 256)
	defInt(&c.QueueBytes, 1<<20)
	defInt(&c.ControlQueueLen, 4096)
	defInt(&c.UnackedLen, 1024)
	defInt(&c.UnackedBytes, 4<<20)
	defInt(&c.PendingForwardBytes, 4<<20)
	defInt(&c.DedupWindow, 1024)
	defInt(&c.MailboxWindow, 64)
	def(&c.MailboxBusyGrace, 10*time.Second)
	defInt(&c.HandshakeBurst, 50)
	if c.HandshakesPerSecond <= 0 {
		c.HandshakesPerSecond = 20
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Random == nil {
		c.Random = rand.Reader
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Metrics == nil {
		c.Metrics = NewMetrics(nil)
	}
	if c.Tracer == nil {
		c.Tracer = noop.NewTracerProvider().Tracer("")
	}
	return nil
}

// ErrDraining is returned by Serve once the hub is draining or closed.
var ErrDraining = errors.New("edge is draining")

// errClosedInRoom is register's answer for a session it registered and
// closed at once (its device revoked meanwhile): the session runs to its
// end as any closed one does, handing back what was queued to it.
var errClosedInRoom = errors.New("session closed as it registered")

const shardCount = 64

// shard holds the rooms of the users hashing to it. The per-event path
// never takes a shard lock: a session keeps a pointer to its room.
type shard struct {
	mu    sync.Mutex // guards rooms and listening
	rooms map[string]*room
	// listening holds, per device id, its sessions between their first
	// mailbox read and their registration: announcements for the device
	// mark them (Session.heard) since none can reach them yet.
	listening map[string][]*Session

	// undelivered holds, per sender and target device, the forwards this
	// edge answered NOT_DELIVERED lately (see Hub.DeliverForwarded).
	// umu is a leaf: nothing else is locked while it is held.
	umu         sync.Mutex
	undelivered map[fwdKey]undelivered
}

// room is one user's sessions on this edge.
type room struct {
	userID string
	refs   int // sessions registered or registering; guarded by the shard's mu

	mu      sync.RWMutex // guards devices
	devices map[string]*Session
}

// Hub is the registry of the sessions on one edge and the router between
// them. Transports hand it connections (Serve); the directory tells it
// whose sessions must close (CloseDevice, CloseUser).
type Hub struct {
	cfg    Config
	seed   maphash.Seed
	shards [shardCount]shard
	addrs  *addrLimiter
	limits *relayv1.Limits // as announced in every Welcome; read-only
	// dummyKey is checked against when a device cannot sign in, so that
	// costs what a wrong signature of a real device costs.
	dummyKey []byte
	replays  *replayCache
	// started is when this hub began, rounded down to the millisecond
	// (client times are whole milliseconds): replays holds only the
	// resume proofs accepted since, so one signed earlier is refused
	// (see handshake.proofsSince).
	started time.Time
	// readBufs lends the sessions' stream readers their buffers while
	// frames are arriving; a session waiting for its next frame holds none.
	readBufs *frame.BufferPool
	// afterForwardArrived, set by tests only (before any forward
	// arrives), runs in DeliverForwarded before the device's session is
	// looked up: a test lands a hand-off between arrival and delivery.
	afterForwardArrived func()
	// beforeHandOff, set by tests only (before any session ends), runs
	// as a session that ended is about to hand off what its device did
	// not acknowledge.
	beforeHandOff func(*Session)
	// inRoom, set by tests only (before any session registers), runs in
	// register once the session is in its user's room, before it looks
	// again whether its device may stay.
	inRoom func(*Session)
	traced bool // a Tracer was configured: events get spans

	// tooLarge counts the events not delivered for their size since the
	// last warning, which tooLargeLog spaces (see undeliverable).
	tooLarge    atomic.Int64
	tooLargeLog rate.Sometimes

	mu       sync.Mutex // guards the fields below
	ended    []Activity // activity of sessions that ended since TakeActivity
	draining bool
	// epoch counts Restarts: a session started in an earlier one is not
	// registered (its state comes from the history Restart voided).
	epoch  uint64
	active int           // Serve calls running
	idle   chan struct{} // closed when draining and active reaches 0

	// drained is cancelled when Drain begins: handshakes waiting for a
	// revision stop waiting. revisionWaits counts those waiting.
	drained       context.Context
	drain         context.CancelFunc
	revisionWaits atomic.Int64
}

// NewHub returns a hub ready to serve.
func NewHub(cfg Config) (*Hub, error) {
	traced := cfg.Tracer != nil
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	dummy, _, err := ed25519.GenerateKey(cfg.Random)
	if err != nil {
		return nil, fmt.Errorf("session: dummy key: %w", err)
	}
	h := &Hub{cfg: cfg, seed: maphash.MakeSeed(), idle: make(chan struct{}), limits: cfg.Limits.Proto(),
		dummyKey: dummy, replays: newReplayCache(cfg.MaxResumeProofs), started: time.UnixMilli(cfg.Now().UnixMilli()), traced: traced,
		readBufs: frame.NewBufferPool(2 << 10), tooLargeLog: rate.Sometimes{Interval: time.Minute}}
	h.drained, h.drain = context.WithCancel(context.Background())
	for i := range h.shards {
		h.shards[i].rooms = map[string]*room{}
		h.shards[i].listening = map[string][]*Session{}
		h.shards[i].undelivered = map[fwdKey]undelivered{}
	}
	h.addrs = newAddrLimiter(rate.Limit(cfg.HandshakesPerSecond), cfg.HandshakeBurst)
	return h, nil
}

// undeliverable counts on c an event of size bytes not delivered because
// it is not deliverable, and warns of it, at most once a minute.
func (h *Hub) undeliverable(c prometheus.Counter, source string, size int) {
	c.Inc()
	h.tooLarge.Add(1)
	h.tooLargeLog.Do(func() {
		h.cfg.Logger.Warn("events larger than this edge's frame limit were not delivered: an edge with a larger limit accepted them (edges of one cluster should share their limits)",
			"source", source, "event_bytes", size, "max_frame_bytes", h.cfg.Limits.MaxFrameBytes, "since_last_warning", h.tooLarge.Swap(0))
	})
}

// Limits returns the limits sessions run under.
func (h *Hub) Limits() Limits { return h.cfg.Limits }

// HandshakeTimeout is how long a new session has to prove its device.
func (h *Hub) HandshakeTimeout() time.Duration { return h.cfg.HandshakeTimeout }

func (h *Hub) shardOf(userID string) *shard {
	return &h.shards[maphash.String(h.seed, userID)%shardCount]
}

// Serve runs one session on c until it ends, and returns why. The caller
// owns the goroutine; the hub closes c before Serve returns.
//
// A connection refused for its address's rate or because the edge is not
// ready is refused before it takes one of the MaxSessions places: the
// refusal lingers while the peer takes its Close (up to CloseLinger and
// the transport's close wait), and a peer that never does must not fill
// the edge for everybody else.
func (h *Hub) Serve(ctx context.Context, c devconn.Conn) error {
	if h.isDraining() {
		h.refuseDraining(c)
		return ErrDraining
	}
	if h.cfg.Ready != nil && !h.cfg.Ready() {
		h.cfg.Metrics.handshakes.WithLabelValues(codeLabel(relayv1.ErrorCode_ERROR_CODE_GOING_AWAY)).Inc()
		err := closeErr(relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, "edge not ready yet; try another edge or come back")
		refuse(c, err, time.Second, h.cfg.CloseLinger)
		return err
	}
	if !h.addrs.allow(c.RemoteAddr(), h.cfg.Now()) {
		h.cfg.Metrics.handshakes.WithLabelValues(codeLabel(relayv1.ErrorCode_ERROR_CODE_RATE_LIMITED)).Inc()
		err := closeErr(relayv1.ErrorCode_ERROR_CODE_RATE_LIMITED, "too many new sessions from this address")
		refuse(c, err, 0, h.cfg.CloseLinger)
		return err
	}
	res, epoch := h.enter()
	switch res {
	case enterDraining:
		h.refuseDraining(c)
		return ErrDraining
	case enterFull:
		h.cfg.Metrics.handshakes.WithLabelValues("edge_full").Inc()
		err := closeErr(relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, "edge full (%d sessions); try another edge", h.cfg.MaxSessions)
		refuse(c, err, time.Second, h.cfg.CloseLinger)
		return err
	}
	defer h.leave()
	s := newSession(h, c)
	s.epoch = epoch
	return s.run(ctx)
}

// refuseDraining tells a device that came while the hub drains to go to
// another edge: in a Close frame, which every transport carries (an
// abort's code reaches QUIC and WebTransport devices only; a WebSocket
// one saw a connection that broke, and backed off), lingering at most
// CloseLinger for it to be read.
func (h *Hub) refuseDraining(c devconn.Conn) {
	refuse(c, closeErr(relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, "edge is shutting down"), 0, h.cfg.CloseLinger)
}

// isDraining reports whether Drain began.
func (h *Hub) isDraining() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.draining
}

type enterResult int

const (
	entered enterResult = iota
	enterDraining
	enterFull
)

// enter admits a Serve call, and says in which epoch (see Restart).
func (h *Hub) enter() (enterResult, uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case h.draining:
		return enterDraining, h.epoch
	case h.cfg.MaxSessions > 0 && h.active >= h.cfg.MaxSessions:
		return enterFull, h.epoch
	}
	h.active++
	return entered, h.epoch
}

// MaxSessions is the bound on sessions (0: none).
func (h *Hub) MaxSessions() int { return h.cfg.MaxSessions }

func (h *Hub) leave() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.active--
	if h.draining && h.active == 0 {
		close(h.idle)
	}
}

// register adds s to its user's room, closing an older session of the
// same device (the newer wins), and tells the user's other devices and s
// who is online.
//
// It registers nothing and returns ErrDraining once the hub is draining,
// or a GOING_AWAY CloseError when s began before the latest Restart: a
// session that finished its handshake after Drain or Restart looked must
// not stay; or a REVOKED CloseError when the device or its user is no
// longer active.
func (h *Hub) register(s *Session) error {
	// Where another edge holds the device, the newer session wins, by
	// the start each edge announces; this one must be newer than what
	// the device had there, whatever the two clocks say (events tolerate
	// minutes of skew between them). Asked before any of the hub's
	// locks: the mesh calls LocalPresence with its own held.
	var elsewhere time.Time
	if h.cfg.Remote != nil {
		elsewhere, _ = h.cfg.Remote.Since(s.deviceID)
		// A peer whose clock is far ahead moves starts here only as far
		// as clocks are let be off (and never to an overflow).
		if bound := h.cfg.Now().Add(h.cfg.Limits.SkewTolerance); elsewhere.After(bound) {
			elsewhere = bound
		}
	}
	sh := h.shardOf(s.userID)
	h.mu.Lock()
	var refused error
	switch {
	case h.draining:
		refused = ErrDraining
	case s.epoch != h.epoch:
		refused = closeErr(relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, "the edge restarted its sessions; reconnect")
	}
	if refused == nil {
		// Under h.mu so Drain and Restart, which set draining or the
		// epoch first, then walk the rooms, either see this session or
		// refuse it.
		sh.mu.Lock()
	}
	h.mu.Unlock()
	if refused != nil {
		return refused
	}
	r := sh.rooms[s.userID]
	if r == nil {
		r = &room{userID: s.userID, devices: map[string]*Session{}}
		sh.rooms[s.userID] = r
	}
	r.refs++
	// r.mu before sh.mu is let go, and s in r.devices before r.mu is: a
	// Drain waiting for sh.mu walks the room after s is in it.
	r.mu.Lock()
	sh.mu.Unlock()

	old := r.devices[s.deviceID]
	if old != nil && s.hub.cfg.Mailbox != nil {
		// Until old's hand-off is stored, live events for the device wait
		// here, and then until it is queued: none may overtake those.
		old.succMu.Lock()
		if !old.handedOff {
			old.successor, s.predIssued = s, old.issued
			s.mb.mu.Lock()
			s.mb.gate = true
			s.mb.syncSlowLocked()
			s.mb.mu.Unlock()
		}
		old.succMu.Unlock()
	}
	r.devices[s.deviceID] = s
	s.room = r
	s.since = h.cfg.Now()
	if old != nil && !s.since.After(old.since) {
		s.since = old.since.Add(time.Nanosecond)
	}
	if !s.since.After(elsewhere) {
		s.since = elsewhere.Add(time.Nanosecond)
	}
	var others []*Session
	for id, o := range r.devices {
		if id != s.deviceID {
			others = append(others, o)
		}
	}
	r.mu.Unlock()

	// A revocation applied while s was between its handshake and here
	// (its first mailbox read) closed only the sessions listed then
	// (CloseDevice, CloseUser). The directory changes before it tells the
	// hub, and from here the hub finds s: one more look refuses what that
	// missed, before anyone is told s is online. old, which s replaced in
	// the list, goes too: a CloseDevice still to come would not find it.
	if h.inRoom != nil {
		h.inRoom(s)
	}
	if !s.hs.usable() {
		ce := closeErr(relayv1.ErrorCode_ERROR_CODE_REVOKED, "the device or its account is no longer active")
		if old != nil {
			old.closeWith(ce, 0)
		}
		// Senders may have queued events to s since it entered the room:
		// it stays registered, closed, and its end (run) answers them and
		// unregisters it, as for any session that ends.
		s.closeWith(ce, 0)
		return errClosedInRoom
	}

	if old != nil {
		ce := closeErr(relayv1.ErrorCode_ERROR_CODE_REPLACED, "a newer session of this device took over")
		ce.ReplacedBy = s.instance
		old.closeWith(ce, 0)
	}
	if h.cfg.Remote != nil {
		h.cfg.Remote.Announce(s.presence(), true)
		for _, d := range h.cfg.Remote.Online(s.userID) {
			if d != s.deviceID {
				s.out.control(presence(d, true))
			}
		}
	}
	for _, o := range others {
		s.out.control(presence(o.deviceID, true))
		if old == nil {
			o.out.control(presence(s.deviceID, true))
		}
	}
	return nil
}

// unregister removes s if it is still its device's session, and tells the
// others the device went offline. The room goes when its last session
// does, so nothing per user outlives the user's last session.
func (h *Hub) unregister(s *Session) {
	r := s.room
	if r == nil {
		return
	}
	r.mu.Lock()
	var others []*Session
	current := r.devices[s.deviceID] == s
	if current {
		delete(r.devices, s.deviceID)
		for _, o := range r.devices {
			others = append(others, o)
		}
	}
	r.mu.Unlock()
	if current && h.cfg.Remote != nil {
		h.cfg.Remote.Announce(s.presence(), false)
		if _, ok := h.cfg.Remote.Locate(s.deviceID); ok {
			// The device is online on another edge: it moved there, and
			// that edge's newer session closed this one. The others were
			// told it is online when the mesh learnt of it.
			others = nil
		}
	}
	for _, o := range others {
		o.out.control(presence(s.deviceID, false))
	}
	h.mu.Lock()
	if len(h.ended) >= h.cfg.MaxEndedActivity {
		h.ended = h.ended[1:]
	}
	h.ended = append(h.ended, s.activity())
	h.mu.Unlock()
	sh := h.shardOf(s.userID)
	sh.mu.Lock()
	r.refs--
	if r.refs == 0 {
		delete(sh.rooms, s.userID)
	}
	sh.mu.Unlock()
}

func presence(deviceID string, online bool) *relayv1.Frame {
	return &relayv1.Frame{Kind: &relayv1.Frame_Presence{Presence: &relayv1.Presence{DeviceId: deviceID, Online: online}}}
}

// sessionsOf returns the sessions of a user, or of one device when
// deviceID is not empty.
func (h *Hub) sessionsOf(userID, deviceID string) []*Session {
	sh := h.shardOf(userID)
	sh.mu.Lock()
	r := sh.rooms[userID]
	sh.mu.Unlock()
	if r == nil {
		return nil
	}
	r.mu.RLock()
	defer r.mu.RUnlock()
	if deviceID != "" {
		if s := r.devices[deviceID]; s != nil {
			return []*Session{s}
		}
		return nil
	}
	out := make([]*Session, 0, len(r.devices))
	for _, s := range r.devices {
		out = append(out, s)
	}
	return out
}

// CloseDevice closes the session of a device, if it has one here, with
// code (REVOKED when the device was revoked or deleted).
func (h *Hub) CloseDevice(userID, deviceID string, code relayv1.ErrorCode, msg string) {
	for _, s := range h.sessionsOf(userID, deviceID) {
		s.closeWith(closeErr(code, "%s", msg), 0)
	}
}

// CloseUser closes every session of a user here.
func (h *Hub) CloseUser(userID string, code relayv1.ErrorCode, msg string) {
	for _, s := range h.sessionsOf(userID, "") {
		s.closeWith(closeErr(code, "%s", msg), 0)
	}
}

// Activity is when a device was last active on this edge: its session
// started, or it sent an event.
type Activity struct {
	UserID, DeviceID string
	At               time.Time
}

// TakeActivity returns the activity of every device with a session here
// and of every session that ended since the last call, which it forgets:
// a device that connected, sent and left between two reports is still
// reported.
func (h *Hub) TakeActivity() []Activity {
	h.mu.Lock()
	out := h.ended
	h.ended = nil
	h.mu.Unlock()
	for i := range h.shards {
		sh := &h.shards[i]
		sh.mu.Lock()
		rooms := make([]*room, 0, len(sh.rooms))
		for _, r := range sh.rooms {
			rooms = append(rooms, r)
		}
		sh.mu.Unlock()
		for _, r := range rooms {
			r.mu.RLock()
			for _, s := range r.devices {
				out = append(out, s.activity())
			}
			r.mu.RUnlock()
		}
	}
	return out
}

// Stats are the sizes of the hub's tables, for leak checks and metrics.
type Stats struct {
	Sessions int // registered sessions
	Rooms    int // users with at least one session
	Serving  int // Serve calls running (handshaking or registered)
}

// Stats returns the current table sizes.
func (h *Hub) Stats() Stats {
	var st Stats
	for i := range h.shards {
		sh := &h.shards[i]
		sh.mu.Lock()
		st.Rooms += len(sh.rooms)
		for _, r := range sh.rooms {
			r.mu.RLock()
			st.Sessions += len(r.devices)
			r.mu.RUnlock()
		}
		sh.mu.Unlock()
	}
	h.mu.Lock()
	st.Serving = h.active
	h.mu.Unlock()
	return st
}

// Drain stops taking sessions and closes every open one with GOING_AWAY,
// each told to wait a random time below window before reconnecting (so
// thousands of clients do not come back in the same second). It returns
// when every session has ended or ctx is done.
func (h *Hub) Drain(ctx context.Context, window time.Duration) error {
	h.mu.Lock()
	if !h.draining {
		h.draining = true
		if h.active == 0 {
			close(h.idle)
		}
	}
	idle := h.idle
	h.mu.Unlock()
	h.drain()
	h.goAway(window, "edge is shutting down; reconnect")
	select {
	case <-idle:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("drain: %d sessions still open: %w", h.Stats().Serving, ctx.Err())
	}
}

// Restart closes every open session with GOING_AWAY, each told to come
// back within window as Drain does, and keeps taking new ones; a session
// whose handshake began before the call is not registered either. It is
// for when what sessions hold from the control plane's history is void:
// after the control plane was restored from an older backup, revisions and
// mailbox sequence numbers start again from the backup's, and a session's
// mailbox cursor would skip the entries stored since. It returns once
// every session was told; they end on their own.
func (h *Hub) Restart(window time.Duration, reason string) {
	h.mu.Lock()
	h.epoch++
	h.mu.Unlock()
	h.goAway(window, reason)
}

// goAway closes every registered session with GOING_AWAY and a random
// reconnect delay below window (so thousands of clients do not come back
// in the same second).
func (h *Hub) goAway(window time.Duration, reason string) {
	for i := range h.shards {
		sh := &h.shards[i]
		sh.mu.Lock()
		var all []*Session
		for _, r := range sh.rooms {
			r.mu.RLock()
			for _, s := range r.devices {
				all = append(all, s)
			}
			r.mu.RUnlock()
		}
		sh.mu.Unlock()
		for _, s := range all {
			var after time.Duration
			if window > 0 {
				n, err := rand.Int(h.cfg.Random, big.NewInt(int64(window)))
				if err == nil {
					after = time.Duration(n.Int64())
				}
			}
			s.closeWith(closeErr(relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, "%s", reason), after)
		}
	}
}

// addrLimiter limits new sessions per client IP address. Entries idle
// for a minute are swept on use, so it needs no goroutine of its own.
type addrLimiter struct {
	limit rate.Limit
	burst int

	mu        sync.Mutex // guards the fields below
	m         map[netip.Addr]*addrEntry
	lastSweep time.Time
}

type addrEntry struct {
	lim  *rate.Limiter
	seen time.Time
}

func newAddrLimiter(limit rate.Limit, burst int) *addrLimiter {
	return &addrLimiter{limit: limit, burst: burst, m: map[netip.Addr]*addrEntry{}}
}

func (l *addrLimiter) allow(addr net.Addr, now time.Time) bool {
	ip, ok := addrIP(addr)
	if !ok {
		return true
	}
	if ip.Is6() {
		// An IPv6 host is given a /64 (RFC 7421) and may pick any address
		// in it: its budget is the /64's.
		p, _ := ip.Prefix(64)
		ip = p.Addr()
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.lastSweep) > time.Minute {
		for k, e := range l.m {
			if now.Sub(e.seen) > time.Minute {
				delete(l.m, k)
			}
		}
		l.lastSweep = now
	}
	e := l.m[ip]
	if e == nil {
		e = &addrEntry{lim: rate.NewLimiter(l.limit, l.burst)}
		l.m[ip] = e
	}
	e.seen = now
	return e.lim.AllowN(now, 1)
}

func addrIP(a net.Addr) (netip.Addr, bool) {
	switch a := a.(type) {
	case *net.UDPAddr:
		ip, ok := netip.AddrFromSlice(a.IP)
		return ip.Unmap(), ok
	case *net.TCPAddr:
		ip, ok := netip.AddrFromSlice(a.IP)
		return ip.Unmap(), ok
	case nil:
		return netip.Addr{}, false
	}
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return netip.Addr{}, false
	}
	return ap.Addr().Unmap(), true
}
