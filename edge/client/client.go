// Package client is the Go client of the device protocol: a device
// connects to an edge over QUIC, WebTransport (HTTP/3) or a WebSocket
// (TCP, for networks that block UDP), as Config.Transport selects, proves
// its key, sends events with acknowledgement and receives the events of
// its user's other devices in per-sender order, each once while the
// process lives (the window of event ids it drops duplicates with is in
// memory). It reconnects by itself (resume tickets, backoff with jitter)
// and resends what was not acknowledged.
//
// A device needs the edge's address, its user and device ids, its
// Ed25519 key and a way to trust the edge's certificate. The package
// example (example_device_test.go, a file to copy) builds that Config
// from what a deployment hands out: the key file `relayctl device
// register --generate-key` writes (the standard base64 of the key's
// 32-byte seed, for ed25519.NewKeyFromSeed), the revision the
// registration returned (Config.MinRevision), and the certificate hashes
// the edge serves at /.well-known/relay/certificate-hashes
// (Config.CertHashes).
package client

import (
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/edge-relay/relay/edge/devconn"
	"github.com/edge-relay/relay/edge/frame"
	"github.com/edge-relay/relay/edge/idwindow"
	"github.com/edge-relay/relay/edge/proof"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// Transport selects how the client reaches the edge.
type Transport int

// Transports.
const (
	// QUIC is native QUIC (UDP) with the relay's own ALPN (the default).
	QUIC Transport = iota
	// WebTransport is HTTP/3 WebTransport (UDP), what browsers use.
	WebTransport
	// WebSocket is the fallback over TCP (TLS), for networks that block
	// UDP. No datagrams; the client sends keep-alive pings.
	WebSocket
)

func (t Transport) String() string {
	switch t {
	case WebTransport:
		return devconn.TransportWebTransport
	case WebSocket:
		return devconn.TransportWebSocket
	}
	return devconn.TransportQUIC
}

// Config configures a Client. Zero fields take the defaults in brackets.
type Config struct {
	// Addr is the edge's address, host:port; required. It is a UDP
	// address for QUIC and WebTransport and a TCP one (the edge's HTTPS
	// port) for WebSocket; an edge listens on both with the same port
	// number, so one address serves every transport.
	Addr string
	// OtherAddrs are further edges, host:port as Addr: after a failed
	// connection attempt, or when an edge goes away, the client moves to
	// the next, in an order each client draws at random (so the devices
	// of an edge that died spread over the others), after Addr (resume
	// tickets work on every edge of the cluster).
	OtherAddrs []string
	// UserID and DeviceID name the device; Key is its Ed25519 private
	// key. Required.
	UserID, DeviceID string
	Key              ed25519.PrivateKey
	// Transport is how the client reaches the edge: QUIC, WebTransport
	// or WebSocket [QUIC]. All of them go to Addr (and OtherAddrs).
	Transport Transport
	// TLS verifies the edge: RootCAs and ServerName as for any TLS
	// client. Ignored for verification when CertHashes is set.
	TLS *tls.Config
	// CertHashes pins the edge's certificate by the SHA-256 of its DER
	// encoding, 32 bytes each. An edge with a self-signed certificate
	// publishes its current ones, each the standard base64 of the hash, in
	// the JSON document {"hashes": [{"algorithm": "sha-256", "value":
	// BASE64, "notAfter": TIME}]} at
	// https://EDGE/.well-known/relay/certificate-hashes and on its admin
	// port, and logs each as it makes it. Pin every edge's (see
	// docs/protocol.md, "TLS session tickets"), and fetch them again when
	// the edge renews its certificate.
	CertHashes [][]byte
	// IdleTimeout is how long a silent edge is given before the client
	// counts the connection as broken and reconnects; keep-alives go at a
	// third of it [30s].
	IdleTimeout time.Duration
	// ReconnectMin and ReconnectMax bound the backoff between attempts
	// [100ms, 10s]; each wait is drawn at random between half the current
	// bound and the bound, which doubles with each failed attempt and each
	// session that ended within 30 seconds of its start (or as
	// RATE_LIMITED), and starts again from ReconnectMin after a session
	// that lasted. The first attempt after such a session waits a moment
	// drawn at random up to ReconnectMin or a second, whichever is longer
	// (the devices of an edge that died do not all come back in the same
	// instant); an edge that goes away says itself when to come back.
	ReconnectMin, ReconnectMax time.Duration
	// ReceiveBuffer is how many received events wait in the Events
	// channel [1024]. An event is acknowledged to the edge (and so to its
	// sender, and never stored for this device again) once it is in the
	// channel; those beyond wait, unacknowledged, until the application
	// makes room (the edge sends no more than its unacknowledged limit).
	// A negative value makes the channel unbuffered: an event is then
	// acknowledged only once the application received it, so a process
	// killed with events in the buffer (a mobile app in the background)
	// loses none; they come again on the next connection.
	ReceiveBuffer int
	// DedupWindow is how many event ids per sender are remembered to
	// drop duplicates [4096].
	DedupWindow int
	// QUICTransport, if set, carries the client's QUIC connections, over
	// QUIC and over WebTransport alike (one UDP socket shared by many
	// clients, as load drivers do); the client never closes it. A
	// WebSocket does not use it.
	QUICTransport *quic.Transport
	// ResumeTicket, from ResumeTicket of an earlier client of this
	// device, lets the first handshake skip the signature.
	ResumeTicket []byte
	// NoDatagrams sends ephemeral events on the session stream instead of
	// as QUIC datagrams, and tells the edge so, which then keeps no
	// datagram reader for the session. Ephemeral events then wait behind
	// the stream's other frames. Without it the edge starts that reader
	// only at a session's first ephemeral event (see SendEphemeral), so
	// an idle device costs the same either way.
	NoDatagrams bool
	// MinRevision is a control-plane revision the device knows of, such
	// as RegisterDeviceResponse.revision: every Hello names it, and an
	// edge that has not caught up with it yet waits (a few seconds at
	// most) before it looks the device up, so a device that connects
	// right after its registration is not refused as unknown. 0: none.
	MinRevision uint64
	// MaxPending bounds the Send calls under way [1024]: a Send beyond it
	// waits, on its context, for an earlier one to finish, so an
	// application sending faster than the edge acknowledges is held back
	// instead of queueing without bound in memory. (A Send whose context
	// ends before its event was written takes the event back: it is never
	// sent. One whose context ends after that gives its slot back at once;
	// its event may still be on its way, not counted.)
	MaxPending int
	// TLSSessions keeps TLS session tickets, so a reconnect resumes the
	// TLS handshake too (no certificate signature to make or check) [a
	// cache of this client's own]. Share one between clients of a
	// process that reconnect to the same edges.
	TLSSessions tls.ClientSessionCache
	// QUICTokens keeps the address-validation tokens edges hand out after
	// a QUIC handshake (NEW_TOKEN), so a reconnect from the same address
	// to an edge that makes unknown addresses prove themselves with a
	// Retry (it does under load) skips that round trip [a store of this
	// client's own]. Used by the QUIC and WebTransport transports.
	QUICTokens quic.TokenStore
	// OnSession, if set, is called each time a session is up: the first
	// and every reconnect, after the events still unacknowledged were sent
	// again. It runs on the client's own goroutine, which serves the
	// session (its datagrams, its end, the next reconnect) only once it
	// returns (the stream is read meanwhile): keep it short, and do not
	// call Send (it may wait for a session that goroutine would make) or
	// Close (it waits for that goroutine) from it; SendEphemeral is fine.
	// Start longer work on a goroutine of its own.
	OnSession func(SessionInfo)
	// OnSessionLost, if set, is called each time a session ends and the
	// client goes on reconnecting, with why it ended (an *Error when the
	// edge said), on the client's goroutine as OnSession is and with the
	// same rules. It is not called for Close or an end for good (Err then
	// says why).
	OnSessionLost func(SessionLost)
	// Logger [slog.Default()].
	Logger *slog.Logger
}

// SessionLost describes a session that just ended.
type SessionLost struct {
	Edge      string // the edge's address
	SessionID string
	Err       error
}

// SessionInfo describes a session that just came up.
type SessionInfo struct {
	Edge      string // the edge's address
	SessionID string
	Resumed   bool // the handshake used a resume ticket
}

func (c *Config) setDefaults() error {
	if c.Addr == "" || c.UserID == "" || c.DeviceID == "" || len(c.Key) != ed25519.PrivateKeySize {
		return errors.New("client: Addr, UserID, DeviceID and an Ed25519 Key are required")
	}
	if c.IdleTimeout <= 0 {
		c.IdleTimeout = 30 * time.Second
	}
	if c.ReconnectMin <= 0 {
		c.ReconnectMin = 100 * time.Millisecond
		if c.ReconnectMax > 0 {
			// A ReconnectMax alone below the default minimum is taken
			// as asked, not raised to the 10 s default.
			c.ReconnectMin = min(c.ReconnectMin, c.ReconnectMax)
		}
	}
	if c.ReconnectMax < c.ReconnectMin {
		c.ReconnectMax = max(10*time.Second, c.ReconnectMin)
	}
	if c.TLSSessions == nil {
		c.TLSSessions = tls.NewLRUClientSessionCache(8)
	}
	if c.QUICTokens == nil {
		c.QUICTokens = quic.NewLRUTokenStore(8, 4)
	}
	switch {
	case c.ReceiveBuffer == 0:
		c.ReceiveBuffer = 1024
	case c.ReceiveBuffer < 0:
		c.ReceiveBuffer = 0 // unbuffered
	}
	if c.MaxPending <= 0 {
		c.MaxPending = 1024
	}
	if c.DedupWindow <= 0 {
		c.DedupWindow = 4096
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return nil
}

// Message is an event to send.
type Message struct {
	// ID identifies the event for dedup and acks; one is made when empty.
	// Sending the same ID again (after an error) never delivers twice, so
	// an application that may retry a send (after a timeout, across a
	// restart of its process) sets the ID itself: a made one is not
	// returned.
	ID string
	// Targets are device ids of the same user; empty: all other devices.
	Targets []string
	Type    string
	Payload []byte
	// TTL is how long the event lives, counted from its creation in whole
	// milliseconds [DefaultTTL, 1 minute]: a target that is offline when
	// it is sent receives it (from its mailbox) if it connects in time.
	// The edge adds its clock-skew tolerance (5 minutes, the Welcome's
	// skew_tolerance_ms; docs/protocol.md, "Validation") before it drops
	// the event, so a target may still receive it up to TTL plus 5
	// minutes after it was sent (the TTL is the least time the event is
	// kept, not the most). Zero takes the default; a negative TTL, or a
	// positive one under a millisecond, is refused before anything is
	// sent (an *Error with MALFORMED_FRAME), and one above the edge's
	// maximum (7 days, the Welcome's max_ttl_ms) by the edge
	// (TTL_TOO_LONG).
	TTL time.Duration
	// AnyOne delivers the event to any one of the targets (a call, a
	// task): every target receives it, the first to take it keeps it, the
	// others get a cancellation. Not with SendEphemeral.
	AnyOne bool
}

// Event is an event received from another device of the user.
type Event struct {
	ID        string
	Sender    string // device id
	Seq       uint64
	Type      string
	Payload   []byte
	CreatedAt time.Time // the sender's clock, corrected by its offset
	TTL       time.Duration
	Ephemeral bool
	// AnyOne: this device may have to give the event up; a later Event
	// with Cancelled set says another device took it.
	AnyOne bool
	// Cancelled: another device took this "any one" event (ID, Sender);
	// the other fields are empty.
	Cancelled bool
}

// Presence says another device of the user came online or went offline.
type Presence struct {
	DeviceID string
	Online   bool
}

// Error is a protocol error from the edge: an event refused (Reject) or
// the session closed (Close), with its code.
type Error struct {
	Code    relayv1.ErrorCode
	Message string
	// ReconnectAfter is the edge's hint for GOING_AWAY.
	ReconnectAfter time.Duration
	// ReplacedBy is, for REPLACED, the client instance that took over.
	ReplacedBy string
}

func (e *Error) Error() string { return fmt.Sprintf("%s: %s", e.Code, e.Message) }

// Is makes errors.Is(err, &Error{Code: c}) match any Error with code c.
func (e *Error) Is(target error) bool {
	var t *Error
	return errors.As(target, &t) && t.Code == e.Code && t.Message == ""
}

// Retryable reports whether sending the same message again later may
// succeed.
func (e *Error) Retryable() bool {
	switch e.Code {
	case relayv1.ErrorCode_ERROR_CODE_QUEUE_FULL, relayv1.ErrorCode_ERROR_CODE_RATE_LIMITED,
		relayv1.ErrorCode_ERROR_CODE_TARGET_OFFLINE, relayv1.ErrorCode_ERROR_CODE_INTERNAL,
		relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, relayv1.ErrorCode_ERROR_CODE_MAILBOX_FULL:
		return true
	}
	return false
}

// ErrClosed is returned for operations on a closed client. From Send it
// does not mean the event was not sent: one already written when Close
// ran (or written with the goodbye, which carries what was written
// before it) may still be delivered, its ack never seen. To make sure an
// event arrives, send it again, from a new client of the same device,
// with the same Message.ID: receivers drop the second copy.
var ErrClosed = errors.New("client closed")

// ErrAlreadySending is returned (wrapped, with the id) by a Send whose
// Message.ID is that of a Send still under way: the edge would drop the
// second as a duplicate, so its caller would wait for an ack that is the
// first one's.
var ErrAlreadySending = errors.New("client: an event with this id is already being sent")

// sendLock is a mutex whose waiter can give up when its context ends;
// the zero value is unlocked.
type sendLock struct {
	once sync.Once
	ch   chan struct{} // holds a token while locked
}

func (l *sendLock) init() { l.once.Do(func() { l.ch = make(chan struct{}, 1) }) }

// Lock waits for the lock.
func (l *sendLock) Lock() {
	l.init()
	l.ch <- struct{}{}
}

// lockContext waits for the lock until ctx ends, then returns its error.
func (l *sendLock) lockContext(ctx context.Context) error {
	l.init()
	if err := ctx.Err(); err != nil {
		return err
	}
	select {
	case l.ch <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Unlock releases the lock.
func (l *sendLock) Unlock() { <-l.ch }

// Client is a device's connection to the relay. It is safe for concurrent
// use.
type Client struct {
	cfg Config
	log *slog.Logger

	events   chan Event
	presence chan Presence

	ctx    context.Context // ends with Close
	cancel context.CancelFunc
	done   chan struct{} // closed when the connection loop ended

	// sends holds a token per Send under way (Config.MaxPending).
	sends chan struct{}
	// maxFrame is the edge's frame limit, from the last Welcome (0: none
	// yet).
	maxFrame atomic.Int64

	// sendMu serialises seq assignment with the write, so events reach
	// the edge in seq order. A reconnect holds it for its resend, which
	// may take long (an edge that paces the device, a network that just
	// went): Send waits for it only as long as its context lets it.
	sendMu sendLock

	mu      sync.Mutex // guards the fields below
	cur     *conn
	ready   chan struct{} // closed while cur != nil
	ticket  []byte
	seq     uint64
	pending map[string]*pendingSend
	order   []*pendingSend // pending in seq order
	online  map[string]bool
	offset  time.Duration
	// offsetErr bounds how far offset may be off: half the round trip
	// it was learnt over.
	offsetErr time.Duration
	// skew is the edge's clock-skew tolerance, from the last Welcome (0:
	// none given).
	skew      time.Duration
	sessionID string
	resumed   bool
	err       error // why the client stopped, once it did

	addr int // index into addrs() of the edge to try next; guarded by mu
	// edges are Addr, then OtherAddrs in an order of this client's
	// (Config.OtherAddrs); fixed at Dial.
	edges []string

	// instance names this client in its Hellos (see Hello.instance).
	instance string

	dedupMu sync.Mutex                          // guards seen and handing
	seen    map[string]*idwindow.Window[string] // by sender
	// handing are the events a reader is handing to the application
	// (claim), not seen until it took them (settle).
	handing map[eventKey]struct{}
	seed    maphash.Seed // the windows' hash seed
}

// eventKey names an event: its sender's device id and its id.
type eventKey struct{ sender, id string }

func (c *Client) addrs() []string { return c.edges }

// edgeOrder is Addr, then the other edges in an order drawn at random:
// the devices of an edge that dies do not all move to the same next one.
func edgeOrder(addr string, others []string) []string {
	out := append([]string{addr}, others...)
	mrand.Shuffle(len(others), func(i, j int) { out[1+i], out[1+j] = out[1+j], out[1+i] })
	return out
}

// edgeAddr is the edge to connect to now.
func (c *Client) edgeAddr() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	a := c.addrs()
	return a[c.addr%len(a)]
}

// moveOn makes the next connection attempt go to the next edge.
func (c *Client) moveOn() {
	c.mu.Lock()
	c.addr++
	c.mu.Unlock()
}

// Edge is the address of the edge the client connects to: while a
// session is up, that session's edge; between sessions, the edge it will
// try next, having moved on to the next of Addr and OtherAddrs when the
// edge went away (GOING_AWAY), the connection broke, or an attempt to
// connect failed. SessionLost.Edge names the edge a lost session was on.
func (c *Client) Edge() string { return c.edgeAddr() }

type pendingSend struct {
	enc  []byte     // the event's frame, encoded with its seq
	done chan error // buffered: one result
	// id, createdMs and ttlMs are the event's, for the resend's expiry
	// check (expired).
	id               string
	createdMs, ttlMs int64
}

// Dial connects to the edge (Addr, else each of OtherAddrs in turn) and
// completes the handshake, then keeps the connection up until Close.
// When no edge takes the device, the last failure is returned as is (for
// example an *Error with AUTH_FAILED).
func Dial(ctx context.Context, cfg Config) (*Client, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	c := &Client{
		cfg:      cfg,
		log:      cfg.Logger.With("device", cfg.DeviceID),
		events:   make(chan Event, cfg.ReceiveBuffer),
		presence: make(chan Presence, 256),
		done:     make(chan struct{}),
		sends:    make(chan struct{}, cfg.MaxPending),
		ready:    make(chan struct{}),
		pending:  map[string]*pendingSend{},
		online:   map[string]bool{},
		seen:     map[string]*idwindow.Window[string]{},
		seed:     maphash.MakeSeed(),
		ticket:   cfg.ResumeTicket,
		instance: newID(),
		edges:    edgeOrder(cfg.Addr, cfg.OtherAddrs),
		// Sequence numbers continue upwards across restarts of the
		// process: they start from the clock.
		seq: uint64(time.Now().UnixMicro()),
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	var cn *conn
	var err error
	for range len(c.addrs()) {
		if cn, err = c.connect(ctx); err == nil || fatal(err) || ctx.Err() != nil {
			break
		}
		c.moveOn()
	}
	if err != nil {
		c.cancel()
		return nil, err
	}
	go c.loop(cn)
	if err := c.WaitConnected(ctx); err != nil {
		_ = c.Close()
		return nil, err
	}
	return c, nil
}

// SessionID is the current session's id ("" while reconnecting).
func (c *Client) SessionID() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cur == nil {
		return ""
	}
	return c.sessionID
}

// ResumeTicket is the latest resume ticket the edge gave this device: a
// device may keep it (it is a secret) to resume after a restart.
func (c *Client) ResumeTicket() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ticket
}

// Resumed reports whether the last handshake used a resume ticket
// instead of a signature.
func (c *Client) Resumed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.resumed
}

// ClockOffset is how far the edge's clock is ahead of this machine's, as
// learnt in the last handshake. Event times sent are corrected by it.
func (c *Client) ClockOffset() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.offset
}

// Online returns the user's other devices currently online, as the edge
// last said.
func (c *Client) Online() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]string, 0, len(c.online))
	for id, on := range c.online {
		if on {
			out = append(out, id)
		}
	}
	slices.Sort(out)
	return out
}

// Events delivers received events, each once, in per-sender order. It is
// closed after Close. An application that stops reading holds back the
// events beyond ReceiveBuffer, unacknowledged (the edge stops sending at
// its unacknowledged limit), while the client goes on reading the rest of
// what the edge sends: acks of its sends, the edge's challenges, a close.
// So Send may be called from the loop that reads Events. The events in
// the channel are acknowledged to the edge (and so to their senders) all
// the same; see Config.ReceiveBuffer for an application that must not
// lose them to a killed process.
func (c *Client) Events() <-chan Event { return c.events }

// Presence delivers changes of the other devices' presence. Changes the
// application does not read in time are dropped; Online is always
// current. When a session ends, every device it reported online is
// reported offline (the next session reports again who is online). It
// is closed after Close, as Events.
func (c *Client) Presence() <-chan Presence { return c.presence }

// Receive waits for the next event.
func (c *Client) Receive(ctx context.Context) (Event, error) {
	select {
	case ev, ok := <-c.events:
		if !ok {
			return Event{}, c.Err()
		}
		return ev, nil
	case <-ctx.Done():
		return Event{}, ctx.Err()
	}
}

// Err is why the client stopped (ErrClosed after Close), or nil while it
// runs.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// newID returns 96 random bits in hex. Event ids must be unique per
// sender, not secret, so the runtime's generator (ChaCha8, seeded by the
// system) is enough and costs no system call per event.
func newID() string {
	var b [12]byte
	binary.LittleEndian.PutUint64(b[:8], mrand.Uint64())
	binary.LittleEndian.PutUint32(b[8:], mrand.Uint32())
	return hex.EncodeToString(b[:])
}

// DefaultTTL is the TTL of a Message that sets none.
const DefaultTTL = time.Minute

// ttlMillis is the ttl_ms a Message's TTL is sent as (Message.TTL): the
// edge counts in whole milliseconds and refuses a TTL that is not
// positive, so a negative one, or one that would be sent as 0 ms, is
// refused here as the edge would (MALFORMED_FRAME) rather than replaced
// by the default: its sender asked for something else.
func ttlMillis(ttl time.Duration) (int64, error) {
	switch {
	case ttl == 0:
		return DefaultTTL.Milliseconds(), nil
	case ttl < 0:
		return 0, &Error{Code: relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME,
			Message: fmt.Sprintf("TTL %s is negative (0 takes the default, %s)", ttl, DefaultTTL)}
	case ttl < time.Millisecond:
		return 0, &Error{Code: relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME,
			Message: fmt.Sprintf("TTL %s is under a millisecond, the edge's unit (0 takes the default, %s)", ttl, DefaultTTL)}
	}
	return ttl.Milliseconds(), nil
}

// build makes the event of m, or refuses m (an *Error) before anything
// is sent.
func (c *Client) build(m Message, ephemeral bool) (*relayv1.Event, error) {
	ttl, err := ttlMillis(m.TTL)
	if err != nil {
		return nil, err
	}
	id := m.ID
	if id == "" {
		id = newID()
	}
	c.mu.Lock()
	off := c.offset
	c.mu.Unlock()
	return &relayv1.Event{
		Id: id, Targets: m.Targets, CreatedAtMs: time.Now().Add(off).UnixMilli(), TtlMs: ttl,
		Type: m.Type, Payload: m.Payload, Ephemeral: ephemeral, AnyOne: m.AnyOne && !ephemeral,
	}, nil
}

// Send sends a durable event and waits until every target has it (nil),
// the edge refuses it (an *Error, see Retryable), or ctx ends. An event
// the edge would refuse for its form is refused before it is sent, with
// the *Error the edge would give: a TTL it cannot take (MALFORMED_FRAME,
// see Message.TTL), a frame above its limit (FRAME_TOO_LARGE), invalid
// UTF-8 (MALFORMED_FRAME). While
// disconnected the event waits and is sent after the reconnect; an event
// sent but not acknowledged is sent again then (receivers drop the
// duplicate), unless the new edge would certainly refuse it: one that
// expired meanwhile (its TTL and the edge's skew tolerance passed, by
// the edge's clock as the handshake told it) fails with EXPIRED, one
// longer than the new edge's frame limit with FRAME_TOO_LARGE, each
// without being sent. At most Config.MaxPending sends are under way at once; a
// further one first waits for a slot. An error from ctx means the event
// may or may not have been delivered: if ctx ended while the event was
// still waiting for the stream it is never sent, but the Send that writes
// the queued events waits for that write (the edge's flow control) past
// ctx, as a blocked write cannot be called back.
func (c *Client) Send(ctx context.Context, m Message) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	select {
	case c.sends <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	case <-c.done:
		return c.Err()
	}
	// A send is done with its slot when it returns: by then its event was
	// acknowledged, refused, given up (forget) or failed with the client.
	defer func() { <-c.sends }()
	ev, err := c.build(m, false)
	if err != nil {
		return err
	}
	if err := c.sendMu.lockContext(ctx); err != nil {
		return err
	}
	enc, err := c.encode(ev)
	if err != nil {
		// It could never be sent (and would hold back the resend of later
		// events after a reconnect).
		c.sendMu.Unlock()
		return err
	}
	p := &pendingSend{enc: enc, done: make(chan error, 1), id: ev.GetId(), createdMs: ev.GetCreatedAtMs(), ttlMs: ev.GetTtlMs()}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		c.sendMu.Unlock()
		return err
	}
	if _, dup := c.pending[ev.GetId()]; dup {
		c.mu.Unlock()
		c.sendMu.Unlock()
		return fmt.Errorf("event %s: %w", ev.GetId(), ErrAlreadySending)
	}
	c.seq = ev.Seq
	c.pending[ev.GetId()] = p
	c.order = append(c.order, p)
	cur := c.cur
	// Other sends waiting for their acks are likely to send again when
	// those come, together: worth a yield before writing.
	yield := len(c.pending) > 1
	c.mu.Unlock()
	// Queued in seq order (under sendMu) and written with whatever other
	// sends queued meanwhile. A failed write ends that connection; the
	// event is resent on the next.
	var ticket uint64
	flush := false
	if cur != nil {
		ticket, flush = cur.queue(enc)
	}
	c.sendMu.Unlock()
	if flush {
		_ = cur.flush(yield)
	}
	select {
	case err := <-p.done:
		return err
	case <-ctx.Done():
		c.forget(ev.GetId())
		// Not written yet (the stream is held up): it never will be, so
		// what sends gave up does not pile up behind the stream.
		if cur != nil {
			cur.unqueue(ticket)
		}
		return ctx.Err()
	}
}

// encode gives ev the next seq and encodes its frame; sendMu held (the
// seq changes only under it). An event that cannot be encoded within the
// edge's frame limit (from the last Welcome; frame.DefaultMaxFrame before
// the first) is refused here, rather than have the edge end the session
// for it: an *Error with FRAME_TOO_LARGE, or MALFORMED_FRAME when
// protobuf could not encode it (invalid UTF-8).
func (c *Client) encode(ev *relayv1.Event) ([]byte, error) {
	ev.Seq = c.seq + 1
	limit := int(c.maxFrame.Load())
	if limit <= 0 {
		limit = frame.DefaultMaxFrame
	}
	enc, err := frame.AppendEventFrame(nil, ev, limit)
	if err != nil {
		var fe *frame.Error
		if errors.As(err, &fe) {
			return nil, &Error{Code: fe.Code, Message: fe.Msg}
		}
		return nil, &Error{Code: relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME, Message: err.Error()}
	}
	return enc, nil
}

// SendEphemeral sends an ephemeral event: never stored, never
// acknowledged, dropped where a receiver is slow; as a datagram when it
// fits, but for the first of each connection, which goes on the stream
// (the edge reads a session's datagrams from then on, so a device that
// sends none costs it no datagram reader). It does not wait for a slot
// (Config.MaxPending) but may wait for the stream, which the edge paces.
// It fails when the client is disconnected (an *Error with TARGET_OFFLINE)
// or closed, when the event cannot be encoded (an *Error with
// FRAME_TOO_LARGE, or MALFORMED_FRAME for invalid UTF-8 or a TTL the edge
// cannot take, see Message.TTL), or when the
// write fails (the connection is then lost and the client reconnects);
// a nil error says it was handed to the connection, not that it arrived.
func (c *Client) SendEphemeral(m Message) error {
	ev, err := c.build(m, true)
	if err != nil {
		return err
	}
	c.sendMu.Lock()
	defer c.sendMu.Unlock()
	enc, err := c.encode(ev)
	if err != nil {
		return err
	}
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return c.err
	}
	c.seq = ev.Seq
	cur := c.cur
	c.mu.Unlock()
	if cur == nil {
		return &Error{Code: relayv1.ErrorCode_ERROR_CODE_TARGET_OFFLINE, Message: "not connected"}
	}
	if cur.datagramsOpen && cur.sendDatagram(enc) {
		return nil
	}
	// Written now, under sendMu: a sender of ephemeral events waits while
	// the stream is blocked (the edge paces a fast device this way)
	// instead of piling frames up in memory.
	if err := cur.writeEncoded(enc); err != nil {
		return err
	}
	cur.datagramsOpen = true
	return nil
}

// forget drops a pending send (its caller gave up).
func (c *Client) forget(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if p := c.pending[id]; p != nil {
		delete(c.pending, id)
		c.order = slices.DeleteFunc(c.order, func(q *pendingSend) bool { return q == p })
	}
}

// resolve finishes a pending send with its result.
func (c *Client) resolve(id string, err error) {
	c.mu.Lock()
	p := c.pending[id]
	if p != nil {
		delete(c.pending, id)
		if len(c.order) > 0 && c.order[0] == p {
			c.order[0] = nil // the backing array keeps no acknowledged send
			c.order = c.order[1:]
		} else {
			c.order = slices.DeleteFunc(c.order, func(q *pendingSend) bool { return q == p })
		}
	}
	c.mu.Unlock()
	if p != nil {
		p.done <- err
	}
}

// Close ends the session and stops reconnecting. Sends still waiting
// return ErrClosed, which does not say their events were not delivered
// (see ErrClosed). What was written before it (an ephemeral event sent
// just before, say, also from other goroutines) still reaches the edge:
// Close says goodbye and waits for the edge to hang up, at most a second
// in all on QUIC and WebTransport (a WebSocket's close handshake may take
// a second more); events that arrive meanwhile are not given (a durable
// one stays in the mailbox).
func (c *Client) Close() error {
	c.cancel()
	<-c.done
	return nil
}

// cancelled is told that the edge cancelled an event id from sender (an
// "any one" event another device took) and reports whether the
// application has it or is being given it (held for it, or on its way):
// then the cancellation must follow it. Else the id is remembered as
// seen, so a late copy is dropped as a duplicate. (The edge relays no
// event without an id.)
func (c *Client) cancelled(sender, id string) (given bool) {
	if id == "" {
		return false
	}
	c.dedupMu.Lock()
	defer c.dedupMu.Unlock()
	w := c.window(sender)
	if w.Get(id) != "" {
		return true
	}
	if _, busy := c.handing[eventKey{sender, id}]; busy {
		return true
	}
	w.Add(id)
	return false
}

// claim reports whether an event id from sender is new and not being
// handed over already (the stream's and the datagrams' readers run
// apart), and if so marks it as being handed over; settle must follow.
func (c *Client) claim(sender, id string) bool {
	if id == "" {
		return true
	}
	k := eventKey{sender, id}
	c.dedupMu.Lock()
	defer c.dedupMu.Unlock()
	if c.window(sender).Get(id) != "" {
		return false
	}
	if _, busy := c.handing[k]; busy {
		return false
	}
	if c.handing == nil {
		c.handing = map[eventKey]struct{}{}
	}
	c.handing[k] = struct{}{}
	return true
}

// settle ends a claim: the event is seen from now on if the application
// took it, else forgotten, so that the copy the edge sends again is
// given.
func (c *Client) settle(sender, id string, taken bool) {
	if id == "" {
		return
	}
	c.dedupMu.Lock()
	defer c.dedupMu.Unlock()
	delete(c.handing, eventKey{sender, id})
	if taken {
		c.window(sender).Add(id)
	}
}

// window is sender's window of event ids seen; dedupMu held.
func (c *Client) window(sender string) *idwindow.Window[string] {
	w := c.seen[sender]
	if w == nil {
		w = idwindow.New(c.seed, c.cfg.DedupWindow, func(id string) string { return id })
		c.seen[sender] = w
	}
	return w
}

// tlsConfig returns the TLS configuration for an edge: verified as usual,
// or by certificate hash when pins are given.
func (c *Client) tlsConfig(alpn, addr string) *tls.Config {
	var conf *tls.Config
	if c.cfg.TLS != nil {
		conf = c.cfg.TLS.Clone()
	} else {
		conf = &tls.Config{}
	}
	conf.NextProtos = []string{alpn}
	conf.MinVersion = tls.VersionTLS13
	if conf.ClientSessionCache == nil {
		conf.ClientSessionCache = c.cfg.TLSSessions
	}
	if len(c.cfg.CertHashes) > 0 {
		pins := c.cfg.CertHashes
		conf.InsecureSkipVerify = true // replaced by the pin check below
		conf.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("edge sent no certificate")
			}
			leaf := cs.PeerCertificates[0]
			sum := sha256.Sum256(leaf.Raw)
			for _, p := range pins {
				if string(p) == string(sum[:]) {
					now := time.Now()
					if now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
						return x509.CertificateInvalidError{Cert: leaf, Reason: x509.Expired}
					}
					return nil
				}
			}
			return notPinned(addr, sum[:], pins)
		}
	}
	// Also with pins (which check no name): the name is the TLS session
	// cache's key, and without one nothing is resumed.
	if conf.ServerName == "" {
		if host, _, err := net.SplitHostPort(addr); err == nil {
			conf.ServerName = host
		}
	}
	return conf
}

// notPinned is the error for an edge at addr whose certificate hashes to
// sum, none of pins. It names the hashes in the encoding the edge
// publishes and logs them in (standard base64 of the SHA-256), so they
// can be compared with what the deployment shows, and says where the
// edge's current ones are.
func notPinned(addr string, sum []byte, pins [][]byte) error {
	pinned := make([]string, len(pins))
	for i, p := range pins {
		pinned[i] = base64.StdEncoding.EncodeToString(p)
	}
	return fmt.Errorf("edge certificate not pinned: the edge at %s presented a certificate whose SHA-256 is %s (base64), "+
		"not one of Config.CertHashes [%s]; the edge serves its current hashes at https://%s%s (and on its admin port) "+
		"and logs each as it makes it (\"self-signed certificate\")",
		addr, base64.StdEncoding.EncodeToString(sum), strings.Join(pinned, " "), addr, devconn.CertHashesPath)
}

// transcriptFor is what this device signs for a challenge on the
// connection whose channel binding is binding.
func transcriptFor(h *relayv1.Hello, ch *relayv1.Challenge, binding []byte) proof.Transcript {
	return proof.Transcript{
		UserID: h.GetUserId(), DeviceID: h.GetDeviceId(), ProtocolVersion: h.GetProtocolVersion(),
		ClientTimeMs: h.GetClientTimeMs(), EdgeID: ch.GetEdgeId(), Nonce: ch.GetNonce(), ServerTimeMs: ch.GetServerTimeMs(),
		Binding: binding,
	}
}
