package devconn

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"
	"golang.org/x/time/rate"

	"github.com/edge-relay/relay/edge/frame"
	"github.com/edge-relay/relay/edge/proof"
	"github.com/edge-relay/relay/internal/connbound"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// WebSocketPath is the path of the WebSocket fallback on the edge's HTTPS
// port, for browsers where UDP is blocked.
const WebSocketPath = "/relay/v1/ws"

// WebSocketCloseBase is added to a protocol error code to make the
// WebSocket close code (the 4000-4999 range is the application's).
const WebSocketCloseBase = 4000

// wsConn carries the session stream over a WebSocket: each binary
// message is one frame body (the message boundary is its length, so the
// uvarint prefix of the stream is not sent). There are no datagrams:
// ephemeral events go on the stream.
//
// The WebSocket layer closes the connection when the context of a read
// ends, which would leave no way to send a close code after a deadline.
// So one goroutine (pump) reads messages with the connection's own
// context and hands them over one at a time; Read waits for the next
// with its deadline and the idle timeout, and the connection survives
// both. A message is read whole by the WebSocket layer, bounded by the
// read limit, so a frame never arrives in part.
type wsConn struct {
	c *websocket.Conn
	// raw is the connection under the WebSocket (the edge's, hijacked; a
	// client's, from RecordDials): Close and Abort close it themselves
	// where the WebSocket library would wait (nil: they cannot).
	raw io.Closer
	// tls is the state of the TLS connection that carries the WebSocket
	// (nil: TLS does not end here).
	tls *tls.ConnectionState
	// closeWait is how long Close waits for the peer's close frame
	// (the package's closeWait; tests lengthen it).
	closeWait time.Duration
	// wire counts what the edge reads under the WebSocket (nil in a
	// client). The pump owns payload and charged: the bytes of the
	// messages read so far, and those beside them already charged. over
	// is what was charged and not yet taken (TakeOverhead); Read's
	// goroutine owns it.
	wire             *wireConn
	payload, charged int64
	over             int
	remote           net.Addr
	idle             time.Duration
	ctx              context.Context // ends with Close or Abort
	cancel           context.CancelFunc
	rdl              deadline
	wdl              deadline
	msgs             chan wsMessage // from pump, unbuffered: one message read ahead at most
	pumped           chan struct{}  // closed when pump returns
	idleT            *time.Timer    // Read's idle timer (Read is never concurrent)

	// The current message as Read returns it: its length prefix (hdr,
	// of which hoff bytes were returned) and what is left of its body.
	// Read keeps no buffer of its own: a session that once received a
	// large frame holds nothing of it once it was read.
	hdr  [binary.MaxVarintLen64]byte
	hlen int
	hoff int
	body []byte
	wbuf []byte // written bytes not yet a whole frame (reused)
	once sync.Once
}

type wsMessage struct {
	b    []byte
	over int // bytes carried beside b since the message before
	err  error
}

// Admitter is a connection told once the edge admitted its session: the
// handshake passed and the session is registered. The edge's HTTPS port
// counts a connection until then (edge/server's bound on connections
// that are not a session), so a WebSocket that was upgraded but never
// authenticates still counts.
type Admitter interface{ Admitted() }

// Admitted vouches for the connection beneath an edge's WebSocket
// (through its TLS), if the HTTPS port's bound counts it (connbound).
func (w *wsConn) Admitted() {
	if w.wire != nil {
		connbound.Vouch(w.wire.Conn)
	}
}

// WebSocketLimits bound what a WebSocket connection reads.
type WebSocketLimits struct {
	// Idle: a peer silent for longer (no message at all; clients send
	// Ping frames) counts as gone.
	Idle time.Duration
	// MaxFrame is the largest frame (message) read.
	MaxFrame int
	// FrameTimeout bounds a message from its first byte under the
	// WebSocket to its last, as the session bounds a frame on QUIC (the
	// frame reader cannot: it sees a message only once it is whole).
	// Counted on an edge's connection only (AcceptWebSocket's); 0: no
	// bound but Idle.
	FrameTimeout time.Duration
}

// NewWebSocketConn adapts a WebSocket, carried by raw (AcceptWebSocket's
// connection, or the one RecordDials kept for a client) over the TLS
// connection whose state is tlsState (the request's on the edge, the
// upgrade response's in a client; nil where TLS does not end at this
// end: then the connection has no ChannelBinding), within limits.
func NewWebSocketConn(c *websocket.Conn, raw io.Closer, tlsState *tls.ConnectionState, remote net.Addr, limits WebSocketLimits) Conn {
	ctx, cancel := context.WithCancel(context.Background())
	c.SetReadLimit(int64(limits.MaxFrame) + 16)
	wire, _ := raw.(*wireConn) // an edge's (AcceptWebSocket)
	if wire != nil {
		wire.setLimit(limits.MaxFrame)
		wire.frameTimeout = limits.FrameTimeout // before the pump reads
	}
	idle := limits.Idle
	w := &wsConn{c: c, raw: raw, tls: tlsState, closeWait: closeWait, wire: wire, remote: remote, idle: idle, ctx: ctx, cancel: cancel,
		msgs: make(chan wsMessage), pumped: make(chan struct{}), idleT: time.NewTimer(idle)}
	w.idleT.Stop()
	w.rdl.init(ctx)
	w.wdl.init(ctx)
	go w.pump()
	return w
}

// SetMaxFrame sets the largest frame the connection reads (the Go
// client follows the frame limit its edge announces); a larger message
// ends the connection.
func (w *wsConn) SetMaxFrame(n int) {
	w.c.SetReadLimit(int64(n) + 16)
	if w.wire != nil {
		w.wire.setLimit(n)
	}
}

// TakeOverhead returns the bytes the connection carried beside the
// frames read since the last call: WebSocket frame headers (a message may
// come in any number of fragments), pings and pongs, all of which the
// edge reads and unmasks. The session counts them against the device's
// byte budget with the frames. Call it from the goroutine that reads.
func (w *wsConn) TakeOverhead() int {
	n := w.over
	w.over = 0
	return n
}

// wireConn is the connection under an edge's WebSocket, which counts the
// bytes read from it and fails a read once more arrived since the last
// message than one message may carry: its read limit, and
// wireAllowance for its frame headers and the pings and pongs beside it.
// The library's own limit counts message payload only: empty
// fragments, or pings between messages, would pass it without end.
type wireConn struct {
	net.Conn
	read  atomic.Int64 // bytes read
	mark  atomic.Int64 // read when the last message was complete
	limit atomic.Int64 // the most read past mark

	// ctl takes the pings and pongs the peer sends (controlFrameBurst
	// at once, controlFramesPerSecond after): past it, ctlOver is set and
	// the next read fails (RATE_LIMITED). Each costs the WebSocket
	// library a timer and a context, some 2-5 µs, where the bytes they
	// carry, the only charge against the device's budget, cost the peer 6:
	// a peer sending nothing else kept an edge core busy within its byte
	// budget, and before any Hello.
	ctl     *rate.Limiter
	ctlOver atomic.Bool

	// frameTimeout bounds a message from the first bytes read of it
	// (WebSocketLimits.FrameTimeout; 0: no bound). armed says the
	// connection's read deadline is set for the
	// message under way, from its first bytes on, until the message or a
	// control frame is whole (a ping between messages must not start a
	// message's clock; one inside a message restarts it, within Idle).
	frameTimeout time.Duration
	armed        atomic.Bool
}

// newWireConn counts what is read from c.
func newWireConn(c net.Conn) *wireConn {
	return &wireConn{Conn: c, ctl: rate.NewLimiter(controlFramesPerSecond, controlFrameBurst)}
}

// The peer's pings and pongs: none come from the relay's clients (their
// keep-alive is the protocol's Ping frame, and the edge sends no pings
// to answer); an intermediary's keep-alives come seconds apart.
const (
	controlFrameBurst      = 16
	controlFramesPerSecond = 2
)

// controlFrame takes a ping or pong the peer sent, at now.
func (c *wireConn) controlFrame(now time.Time) {
	if !c.ctl.AllowN(now, 1) {
		c.ctlOver.Store(true)
	}
	c.disarm()
}

// disarm lifts the deadline of a message once it, or a control frame,
// is whole: the next bytes read start the clock again.
func (c *wireConn) disarm() {
	// Atomic: the library reads on Close's goroutine too (its close
	// handshake) while the pump marks a message's end.
	if c.armed.CompareAndSwap(true, false) {
		_ = c.Conn.SetReadDeadline(time.Time{})
	}
}

// wireAllowance is what one message may carry beside its payload and
// what a reader reads ahead of it: frame headers of its fragments, pings
// and pongs (none come from the relay's clients, whose keep-alive is
// their own Ping frame; intermediaries may send a few), and a buffer of
// read-ahead.
const wireAllowance = 64 << 10

func (c *wireConn) setLimit(maxFrame int) { c.limit.Store(int64(maxFrame) + 16 + wireAllowance) }

func (c *wireConn) Read(p []byte) (int, error) {
	if c.ctlOver.Load() {
		return 0, &frame.Error{Code: relayv1.ErrorCode_ERROR_CODE_RATE_LIMITED,
			Msg: fmt.Sprintf("more than %d WebSocket pings and pongs at once, or %d a second", controlFrameBurst, controlFramesPerSecond)}
	}
	n, err := c.Conn.Read(p)
	if over, limit := c.read.Add(int64(n))-c.mark.Load(), c.limit.Load(); over > limit {
		return n, &frame.Error{Code: relayv1.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE,
			Msg: fmt.Sprintf("%d bytes on the WebSocket for one message, more than %d: frame headers, pings and pongs count", over, limit)}
	}
	if err != nil && c.armed.Load() && errors.Is(err, os.ErrDeadlineExceeded) {
		return n, &frame.Error{Code: relayv1.ErrorCode_ERROR_CODE_TIMEOUT,
			Msg: fmt.Sprintf("a WebSocket message not whole %s after its first bytes", c.frameTimeout)}
	}
	if n > 0 && c.frameTimeout > 0 && c.armed.CompareAndSwap(false, true) {
		_ = c.Conn.SetReadDeadline(time.Now().Add(c.frameTimeout))
	}
	return n, err
}

// message marks the end of a message and returns the bytes read so far.
func (c *wireConn) message() int64 {
	c.disarm()
	read := c.read.Load()
	c.mark.Store(read)
	return read
}

// pump reads messages until the connection ends. It is owned by the
// wsConn: Close and Abort end it and wait for it.
func (w *wsConn) pump() {
	defer close(w.pumped)
	for {
		typ, msg, err := w.c.Read(w.ctx)
		switch {
		case err != nil:
			err = readError(err)
		case typ != websocket.MessageBinary:
			err = &frame.Error{Code: relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME, Msg: "a text message: frames are binary messages"}
		}
		var over int
		if w.wire != nil {
			// What was read beyond the payloads, less what was charged:
			// a running balance, since a read for one message also takes
			// in those queued behind it (counted with the first, they
			// would be counted again as their own payload).
			w.payload += int64(len(msg))
			if o := w.wire.message() - w.payload - w.charged; o > 0 {
				over = int(o)
				w.charged += o
			}
		}
		select {
		case w.msgs <- wsMessage{b: msg, over: over, err: err}:
		case <-w.ctx.Done():
			return
		}
		if err != nil {
			return
		}
	}
}

// readError types what a read of the WebSocket layer failed with: a
// message over the read limit is FRAME_TOO_LARGE, a breach of the
// WebSocket protocol (an unmasked client frame, reserved bits, an
// unknown opcode, a control frame too long) MALFORMED_FRAME, so that the
// session ends with its code (where the library sent no close frame of
// its own, the peer gets it too) and counts it as such. The connection's
// own ends and failures, and errors already typed, pass as they are.
func readError(err error) error {
	var fe *frame.Error
	var ce websocket.CloseError
	var ne net.Error
	switch {
	case errors.As(err, &fe), errors.As(err, &ce):
		return err
	case errors.Is(err, websocket.ErrMessageTooBig):
		return &frame.Error{Code: relayv1.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE, Msg: err.Error()}
	case errors.As(err, &ne), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed),
		errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return err
	}
	return &frame.Error{Code: relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME, Msg: err.Error()}
}

func (w *wsConn) Read(p []byte) (int, error) {
	for w.hoff == w.hlen && len(w.body) == 0 {
		w.idleT.Reset(w.idle)
		var m wsMessage
		select {
		case m = <-w.msgs:
		case <-w.rdl.context().Done():
			w.idleT.Stop()
			return 0, fmt.Errorf("websocket read: %w", os.ErrDeadlineExceeded)
		case <-w.idleT.C:
			return 0, &frame.Error{Code: relayv1.ErrorCode_ERROR_CODE_TIMEOUT, Msg: fmt.Sprintf("no message for %s on the WebSocket", w.idle)}
		case <-w.pumped:
			w.idleT.Stop()
			return 0, net.ErrClosed
		}
		w.idleT.Stop()
		if m.err != nil {
			return 0, m.err
		}
		w.over += m.over
		w.hlen, w.hoff, w.body = binary.PutUvarint(w.hdr[:], uint64(len(m.b))), 0, m.b
	}
	n := copy(p, w.hdr[w.hoff:w.hlen])
	w.hoff += n
	k := copy(p[n:], w.body)
	if w.body = w.body[k:]; len(w.body) == 0 {
		w.body = nil // the message is the garbage collector's
	}
	return n + k, nil
}

// Write takes length-prefixed frames (the session stream) and sends each
// frame body as one message. Whole frames go straight from p; only an
// incomplete tail is kept for the next Write. A write deadline that
// passes closes the WebSocket (a half-written message cannot be taken
// back).
func (w *wsConn) Write(p []byte) (int, error) {
	data := p
	if len(w.wbuf) > 0 {
		w.wbuf = append(w.wbuf, p...)
		data = w.wbuf
	}
	off := 0
	for {
		n, k := binary.Uvarint(data[off:])
		if k <= 0 || uint64(len(data)-off-k) < n {
			break
		}
		body := data[off+k : off+k+int(n)]
		dctx := w.wdl.context()
		if err := w.c.Write(dctx, websocket.MessageBinary, body); err != nil {
			if dctx.Err() != nil && w.ctx.Err() == nil {
				return 0, fmt.Errorf("websocket write: %w", os.ErrDeadlineExceeded)
			}
			return 0, err
		}
		off += k + int(n)
	}
	// copy moves the tail to the front (the regions may overlap).
	w.wbuf = append(w.wbuf[:0], data[off:]...)
	return len(p), nil
}

func (w *wsConn) SetReadDeadline(t time.Time) error  { w.rdl.set(t); return nil }
func (w *wsConn) SetWriteDeadline(t time.Time) error { w.wdl.set(t); return nil }

func (w *wsConn) SendDatagram([]byte) error { return ErrNoDatagrams }
func (w *wsConn) ReceiveDatagram(context.Context) ([]byte, error) {
	return nil, ErrNoDatagrams
}
func (w *wsConn) RemoteAddr() net.Addr { return w.remote }
func (w *wsConn) Transport() string    { return TransportWebSocket }

// ChannelBinding is the binding of the TLS connection under the
// WebSocket (nil without one).
func (w *wsConn) ChannelBinding() []byte {
	b, _ := proof.Binding(w.tls)
	return b
}

// AcceptWebSocket accepts a WebSocket as websocket.Accept does, and
// returns with it the connection it took over from the HTTP server, for
// NewWebSocketConn: a wireConn, which counts what is read from it, and
// the peer's pings and pongs (opts' callbacks for them still run).
func AcceptWebSocket(w http.ResponseWriter, r *http.Request, opts *websocket.AcceptOptions) (*websocket.Conn, net.Conn, error) {
	hw := &hijackRecorder{ResponseWriter: w}
	// The peer's pings and pongs are counted on the connection the
	// upgrade hijacks (hw.conn, set before any frame is read).
	o := websocket.AcceptOptions{}
	if opts != nil {
		o = *opts
	}
	onPing, onPong := o.OnPingReceived, o.OnPongReceived
	o.OnPingReceived = func(ctx context.Context, b []byte) bool {
		hw.conn.controlFrame(time.Now())
		return onPing == nil || onPing(ctx, b)
	}
	o.OnPongReceived = func(ctx context.Context, b []byte) {
		hw.conn.controlFrame(time.Now())
		if onPong != nil {
			onPong(ctx, b)
		}
	}
	c, err := websocket.Accept(hw, r, &o)
	if hw.conn == nil {
		return c, nil, err // no typed nil in the interface
	}
	return c, hw.conn, err
}

// RecordDials makes tr remember the connections it dials, and returns
// the last one (nil before the first): a client's WebSocket dialed
// through its own transport gets the connection under it that way, for
// NewWebSocketConn. (websocket.Dial keeps the upgrade's response body,
// which would close it, to itself.)
func RecordDials(tr *http.Transport) (last func() net.Conn) {
	var mu sync.Mutex
	var conn net.Conn
	dial := tr.DialContext
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err == nil {
			mu.Lock()
			conn = c
			mu.Unlock()
		}
		return c, err
	}
	return func() net.Conn {
		mu.Lock()
		defer mu.Unlock()
		return conn
	}
}

// hijackRecorder keeps the connection a WebSocket upgrade hijacks, and
// hands the library a wireConn over it.
type hijackRecorder struct {
	http.ResponseWriter
	conn *wireConn
}

func (h *hijackRecorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, rw, err := http.NewResponseController(h.ResponseWriter).Hijack()
	if err != nil {
		return c, rw, err
	}
	h.conn = newWireConn(c)
	h.conn.setLimit(1 << 20) // until NewWebSocketConn sets the session's
	return h.conn, rw, nil
}

// Close sends the WebSocket close frame with the protocol code (4000 +
// code) and waits at most closeWait for the peer's. (The library's own
// close handshake waits up to 5 s for each of the two, and its CloseNow
// waits for a Close under way rather than end it: past closeWait the
// connection under the WebSocket is closed.)
func (w *wsConn) Close(code relayv1.ErrorCode, msg string) error {
	w.once.Do(func() {
		status := websocket.StatusNormalClosure
		if code != relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED {
			status = websocket.StatusCode(WebSocketCloseBase + int(code))
		}
		msg = closeReason(msg)
		done := make(chan struct{})
		go func() {
			defer close(done)
			_ = w.c.Close(status, msg)
		}()
		t := time.NewTimer(w.closeWait)
		select {
		case <-done:
		case <-t.C:
			w.closeRaw()
			_ = w.c.CloseNow()
			<-done
		}
		t.Stop()
		w.stop()
	})
	return nil
}

// Abort drops the connection at once (a peer that is not reading could
// not take a close frame anyway), a Close under way included.
func (w *wsConn) Abort(relayv1.ErrorCode, string) error {
	w.closeRaw()
	err := w.c.CloseNow()
	w.stop()
	return err
}

// closeRaw closes the connection under the WebSocket: every read and
// write on it, the library's close handshake among them, fails at once.
// Under an edge's TLS it closes the TCP connection itself: closing the
// TLS connection would first send a close_notify alert, which, to a peer
// that stopped reading with its window full, waits crypto/tls's 5 s.
func (w *wsConn) closeRaw() {
	if w.raw == nil {
		return
	}
	if wc, ok := w.raw.(*wireConn); ok {
		if tc, ok := wc.Conn.(*tls.Conn); ok {
			_ = tc.NetConn().Close()
			return
		}
	}
	_ = w.raw.Close()
}

// stop ends the pump and the deadlines once the WebSocket is closed.
func (w *wsConn) stop() {
	w.cancel()
	<-w.pumped
	w.rdl.set(time.Time{})
	w.wdl.set(time.Time{})
}

// deadline is a net.Conn-style deadline as a context that ends when it
// passes.
type deadline struct {
	parent context.Context

	mu     sync.Mutex // guards the fields below
	ctx    context.Context
	cancel context.CancelFunc
	timer  *time.Timer
}

func (d *deadline) init(parent context.Context) {
	d.parent = parent
	d.ctx, d.cancel = context.WithCancel(parent)
}

// context is the context of the current deadline.
func (d *deadline) context() context.Context {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.ctx
}

// set moves the deadline; the zero time removes it.
func (d *deadline) set(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.timer != nil {
		d.timer.Stop()
		d.timer = nil
	}
	if d.ctx.Err() != nil {
		// The last deadline passed: start afresh (a WebSocket closed by
		// it stays closed, but the context may be asked again).
		d.ctx, d.cancel = context.WithCancel(d.parent)
	}
	if t.IsZero() {
		return
	}
	if dur := time.Until(t); dur > 0 {
		d.timer = time.AfterFunc(dur, d.cancel)
	} else {
		d.cancel()
	}
}

// maxCloseReason is the longest close reason sent: a close frame's
// payload is at most 125 bytes, two of them the code.
const maxCloseReason = 120

// closeReason is msg cut to maxCloseReason bytes at a character's start:
// a browser fails a connection whose close reason is not valid UTF-8,
// and the close code goes with it.
func closeReason(msg string) string {
	if len(msg) <= maxCloseReason {
		return msg
	}
	n := maxCloseReason
	for n > 0 && !utf8.RuneStart(msg[n]) {
		n--
	}
	return msg[:n]
}

// WebSocketCode returns the protocol error code a WebSocket close
// carried, if it was one. A message over the edge's read limit is closed
// by the WebSocket layer itself with 1009 (message too big): that is
// FRAME_TOO_LARGE; a breach of the WebSocket protocol with 1002
// (protocol error): MALFORMED_FRAME.
func WebSocketCode(err error) (relayv1.ErrorCode, string, bool) {
	var ce websocket.CloseError
	if !errors.As(err, &ce) {
		return 0, "", false
	}
	switch {
	case int(ce.Code) > WebSocketCloseBase && int(ce.Code) < WebSocketCloseBase+1000:
		return relayv1.ErrorCode(int(ce.Code) - WebSocketCloseBase), ce.Reason, true
	case ce.Code == websocket.StatusMessageTooBig:
		return relayv1.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE, ce.Reason, true
	case ce.Code == websocket.StatusProtocolError:
		// The WebSocket layer's own close for a breach of its protocol.
		return relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME, ce.Reason, true
	}
	return 0, "", false
}
