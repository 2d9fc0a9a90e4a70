// Package transport is the edge's device port: native QUIC connections
// (ALPN relay/1) and WebTransport sessions (HTTP/3) on one UDP socket, and
// the WebSocket fallback on the HTTPS port, each adapted by edge/devconn
// and served by the session core's Hub. It owns the UDP listener, the
// per-connection goroutines and the bound on QUIC connections that are
// not a session yet (pending.go); everything above the session stream is
// edge/session's.
package transport

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/quic-go/webtransport-go"

	"github.com/edge-relay/relay/edge/devconn"
	"github.com/edge-relay/relay/edge/session"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// Config configures a Listener.
type Config struct {
	// Addr is the UDP address to listen on ("127.0.0.1:0" picks a port).
	Addr string
	// TLS carries the certificate (Certificates or GetCertificate); the
	// listener sets NextProtos itself.
	TLS *tls.Config
	// Hub runs the sessions; required.
	Hub *session.Hub
	// Origins says which web pages may open WebTransport sessions [the
	// edge's own page only; see OriginPolicy].
	Origins OriginPolicy
	// StreamTimeout bounds the wait for a new connection's session stream,
	// and how long an HTTP/3 connection may go without a WebTransport
	// session [the hub's handshake timeout].
	StreamTimeout time.Duration
	// IdleTimeout closes connections that send nothing, not even
	// keep-alives [30s].
	IdleTimeout time.Duration
	// CloseTimeout bounds how long Close waits for the sessions to end
	// before it cuts every connection [10s].
	CloseTimeout time.Duration
	// MaxUnvalidatedHandshakes is how many QUIC handshakes from source
	// addresses not yet validated may be in progress before new
	// connections are sent a Retry first, which proves their address
	// and costs them a round trip; negative: every new connection is
	// [DefaultMaxUnvalidatedHandshakes].
	MaxUnvalidatedHandshakes int
	// MaxPendingQUIC bounds the QUIC connections, native and HTTP/3, that
	// are not a device session: from their accept (in their handshake)
	// until the hub admits a session on them; at the bound the oldest is
	// closed (those that never opened a session stream, or a WebTransport
	// session's, first), and one source (IPv4 address, IPv6 /64) holds at
	// most a sixteenth of it (at least 16), beyond which its own oldest
	// is [MaxPendingQUICFor the hub's MaxSessions].
	MaxPendingQUIC int
	// Logger [slog.Default()]; Registerer for metrics [none].
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

// Listener serves native QUIC and WebTransport on one UDP socket,
// telling them apart by ALPN.
type Listener struct {
	cfg     Config
	udp     net.PacketConn
	tr      *quic.Transport
	ln      *quic.EarlyListener
	wt      *webtransport.Server
	conns   *prometheus.CounterVec
	addrs   *addrValidation
	pending *pendingQUIC

	ctx    context.Context // ends when Close starts
	cancel context.CancelFunc
	wgMu   sync.Mutex     // orders starting goroutines against Close's wait
	closed bool           // Close began waiting: no goroutine starts (wgMu)
	wg     sync.WaitGroup // connection goroutines
	once   sync.Once

	h3mu    sync.Mutex // guards h3conns
	h3conns map[*quic.Conn]*h3Conn
}

// h3Conn is an HTTP/3 connection's WebTransport sessions, and its place
// on the pending list until one is admitted. A connection
// that carries none for StreamTimeout (it never opened one, or its last
// ended) is closed, so no peer holds a connection open without a session:
// only a session that was established (its stream came) counts, so
// requests that do not become one (a GET of the session path, a refused
// upgrade, an upgrade with no stream after it, any other path) do not
// keep the connection.
//
// An upgrade still waiting for its stream when the connection is due
// defers the reaping once, by StreamTimeout and refusedGrace: its own
// wait ends it first with a session close that carries TIMEOUT, which
// the client reads as such, where a close of the connection under it
// reaches a WebTransport client as a datagram error with the code lost
// (webtransport-go reports any failure of the CONNECT stream so). Once
// only, and by a fixed time, so upgrades in a row or overlapping cannot
// hold the connection.
type h3Conn struct {
	sessions int
	waiting  int  // upgrades waiting for their stream
	deferred bool // the reaping was deferred for one
	reap     *time.Timer
	pending  *pendingConn
}

// connKey carries a request's QUIC connection in its context.
type connKey struct{}

// Streams a device may have open at once on a device port. A native
// session is one bidirectional stream; a WebTransport session is the
// CONNECT request's stream and one stream inside the session, beside
// HTTP/3's control and QPACK streams (and a GREASE stream some browsers
// add). The edge reads no other stream, so these bound what a peer can
// leave in streams it is never read from: their receive windows.
const (
	MaxIncomingStreams    = 4
	MaxIncomingUniStreams = 4
)

// MaxHeaderBytes bounds the request headers the device port reads on
// HTTP/3 (a WebTransport CONNECT's; net/http's default, which http3
// takes, is 1 MiB), as the edge's HTTPS port does its own: a browser's
// CONNECT carries a few hundred bytes. The port announces it in its
// SETTINGS and answers a larger header block 431.
const MaxHeaderBytes = 64 << 10

// Receive windows of a device port's connections: what a device may have
// sent that the edge has not read yet. quic-go's defaults (512 KiB a
// stream and 768 KiB a connection, growing to 6 and 15 MiB) would let a
// peer that never authenticates leave 768 KiB in the streams of each
// pending connection, and a session whose reading is held to its byte
// budget keep megabytes there. A connection starts with room for a frame
// at the default --max-frame-bytes (64 KiB) and a half, so a pending one
// holds at most that; a stream the edge reads quickly enough grows
// (quic-go's window auto-tuning) to 512 KiB, which at a device's default
// 1 MiB/s budget covers round trips up to 500 ms. A larger frame arrives
// over several round trips.
const (
	InitialStreamReceiveWindow     = 64 << 10
	MaxStreamReceiveWindow         = 512 << 10
	InitialConnectionReceiveWindow = 96 << 10
	MaxConnectionReceiveWindow     = 768 << 10
)

// listenerQUICConfig is QUICConfig for a device port.
func listenerQUICConfig(idle time.Duration) *quic.Config {
	c := devconn.QUICConfig(idle)
	c.MaxIncomingStreams, c.MaxIncomingUniStreams = MaxIncomingStreams, MaxIncomingUniStreams
	c.InitialStreamReceiveWindow, c.MaxStreamReceiveWindow = InitialStreamReceiveWindow, MaxStreamReceiveWindow
	c.InitialConnectionReceiveWindow, c.MaxConnectionReceiveWindow = InitialConnectionReceiveWindow, MaxConnectionReceiveWindow
	return c
}

// Listen opens the UDP socket. Serve then accepts connections.
func Listen(cfg Config) (*Listener, error) {
	if cfg.Hub == nil || cfg.TLS == nil {
		return nil, errors.New("transport: Hub and TLS are required")
	}
	if cfg.StreamTimeout <= 0 {
		cfg.StreamTimeout = cfg.Hub.HandshakeTimeout()
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = 30 * time.Second
	}
	if cfg.CloseTimeout <= 0 {
		cfg.CloseTimeout = 10 * time.Second
	}
	if cfg.MaxUnvalidatedHandshakes == 0 {
		cfg.MaxUnvalidatedHandshakes = DefaultMaxUnvalidatedHandshakes
	}
	if cfg.MaxPendingQUIC <= 0 {
		cfg.MaxPendingQUIC = MaxPendingQUICFor(cfg.Hub.MaxSessions())
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	l := &Listener{cfg: cfg, h3conns: map[*quic.Conn]*h3Conn{}, addrs: &addrValidation{max: int64(cfg.MaxUnvalidatedHandshakes)},
		pending: newPendingQUIC(cfg.MaxPendingQUIC, cfg.Logger)}
	l.pending.closeConn = func(f func()) {
		if !l.goTracked(f) {
			f() // closing: the connection goes with the transport anyway
		}
	}
	l.conns = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "relay_edge_connections_total", Help: "QUIC connections accepted, by application protocol and TLS handshake (full, or resumed with a session ticket).",
	}, []string{"alpn", "tls"})
	l.addrs.retries = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "relay_edge_quic_retries_total", Help: "QUIC connection attempts from unvalidated addresses answered with a Retry (address validation) instead of a handshake.",
	})
	l.addrs.gauge = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "relay_edge_quic_unvalidated_handshakes", Help: "QUIC handshakes in progress from source addresses not yet validated; at the limit, new connections get a Retry.",
	})
	// A listener opened again (a port retry) keeps counting in the
	// collectors of the first.
	var err error
	if l.conns, err = registerOrReuse(cfg.Registerer, l.conns); err != nil {
		return nil, err
	}
	if l.addrs.retries, err = registerOrReuse(cfg.Registerer, l.addrs.retries); err != nil {
		return nil, err
	}
	if l.addrs.gauge, err = registerOrReuse(cfg.Registerer, l.addrs.gauge); err != nil {
		return nil, err
	}
	if l.pending.gauge, err = registerOrReuse(cfg.Registerer, l.pending.gauge); err != nil {
		return nil, err
	}
	if l.pending.evicted, err = registerOrReuse(cfg.Registerer, l.pending.evicted); err != nil {
		return nil, err
	}
	udp, err := net.ListenPacket("udp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("listen udp %s: %w", cfg.Addr, err)
	}
	tlsConf := cfg.TLS.Clone()
	tlsConf.NextProtos = []string{http3.NextProtoH3, devconn.ALPN}
	tlsConf.MinVersion = tls.VersionTLS13
	tr := &quic.Transport{Conn: udp, VerifySourceAddress: l.addrs.verify, ConnContext: l.addrs.connContext}
	ln, err := tr.ListenEarly(tlsConf, listenerQUICConfig(cfg.IdleTimeout))
	if err != nil {
		_ = udp.Close()
		return nil, fmt.Errorf("listen quic: %w", err)
	}
	l.udp, l.tr, l.ln = udp, tr, ln
	l.ctx, l.cancel = context.WithCancel(context.Background())
	mux := http.NewServeMux()
	mux.HandleFunc(devconn.WebTransportPath, l.serveWebTransport)
	l.wt = &webtransport.Server{
		H3: &http3.Server{Handler: mux, TLSConfig: tlsConf, QUICConfig: listenerQUICConfig(cfg.IdleTimeout), MaxHeaderBytes: MaxHeaderBytes,
			ConnContext: func(ctx context.Context, c *quic.Conn) context.Context { return context.WithValue(ctx, connKey{}, c) }},
		CheckOrigin:       l.checkOrigin,
		ReorderingTimeout: 5 * time.Second,
	}
	return l, nil
}

// registerOrReuse registers c with reg (none: nothing to do), or returns
// the collector registered before under its name.
func registerOrReuse[C prometheus.Collector](reg prometheus.Registerer, c C) (C, error) {
	if reg == nil {
		return c, nil
	}
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if !errors.As(err, &are) {
			return c, err
		}
		existing, ok := are.ExistingCollector.(C)
		if !ok {
			return c, err
		}
		return existing, nil
	}
	return c, nil
}

// TLSHandshake is how a connection's TLS handshake went, as the edge's
// metrics label it: "resumed" on a session ticket, else "full".
func TLSHandshake(st tls.ConnectionState) string {
	if st.DidResume {
		return "resumed"
	}
	return "full"
}

// Addr is the UDP address the listener is bound to.
func (l *Listener) Addr() net.Addr { return l.udp.LocalAddr() }

func (l *Listener) checkOrigin(r *http.Request) bool { return l.cfg.Origins.allows(r) }

// Serve accepts connections until Close. It returns nil after Close.
func (l *Listener) Serve() error {
	for {
		conn, err := l.ln.Accept(l.ctx)
		if err != nil {
			if l.ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		st := conn.ConnectionState().TLS
		alpn := st.NegotiatedProtocol
		l.conns.WithLabelValues(alpn, TLSHandshake(st)).Inc()
		if h := counted(conn); h != nil {
			if !l.goTracked(func() { waitHandshake(conn, h, l.ctx.Done()) }) {
				h.done()
			}
		}
		started := l.goTracked(func() {
			// Listed once its handshake is complete: until then its
			// address is unproven (a spoofed Initial gets no further), and
			// MaxUnvalidatedHandshakes and Retry bound such handshakes.
			// Listed at once, spoofed Initials from ever new addresses
			// evicted real devices, and each eviction freed its
			// handshake's place below Retry's threshold.
			select {
			case <-conn.HandshakeComplete():
			case <-conn.Context().Done():
				return
			case <-l.ctx.Done():
				return
			}
			pc := l.pending.add(conn)
			switch alpn {
			case devconn.ALPN:
				l.serveNative(conn, pc)
			case http3.NextProtoH3:
				l.h3Opened(conn, pc)
				if err := l.wt.ServeQUICConn(conn); err != nil && !errors.Is(err, http.ErrServerClosed) {
					l.cfg.Logger.Debug("http/3 connection ended", "remote", conn.RemoteAddr().String(), "err", err)
				}
				l.h3Closed(conn)
			default:
				_ = conn.CloseWithError(quic.ApplicationErrorCode(relayv1.ErrorCode_ERROR_CODE_UNSUPPORTED_VERSION), "unknown application protocol")
			}
		})
		if !started {
			// Accepted as Close began: it goes with the transport.
			_ = conn.CloseWithError(quic.ApplicationErrorCode(relayv1.ErrorCode_ERROR_CODE_GOING_AWAY), "edge is shutting down")
			return nil
		}
	}
}

// goTracked runs f on a goroutine Close waits for, unless Close already
// began waiting (then it reports false and f does not run): a WaitGroup
// must not gain a goroutine while it is being waited for.
func (l *Listener) goTracked(f func()) bool {
	l.wgMu.Lock()
	defer l.wgMu.Unlock()
	if l.closed {
		return false
	}
	l.wg.Go(f)
	return true
}

func (l *Listener) serveNative(conn *quic.Conn, pc *pendingConn) {
	ctx, cancel := context.WithTimeout(l.ctx, l.cfg.StreamTimeout)
	str, err := conn.AcceptStream(ctx)
	cancel()
	if err != nil {
		code, msg := noStream(l.ctx)
		_ = conn.CloseWithError(quic.ApplicationErrorCode(code), msg)
		return
	}
	pc.promote()
	_ = l.cfg.Hub.Serve(l.ctx, devconn.WhenAdmitted(devconn.NewQUICConn(conn, str), pc.admitted))
}

// noStream is the code and message a connection or WebTransport session
// whose session stream did not come is closed with: GOING_AWAY once the
// listener (whose context is ctx) is closing, so the device tries
// another edge at once, else TIMEOUT.
func noStream(ctx context.Context) (relayv1.ErrorCode, string) {
	if ctx.Err() != nil {
		return relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, "edge is shutting down"
	}
	return relayv1.ErrorCode_ERROR_CODE_TIMEOUT, "no session stream in time"
}

// h3Opened starts tracking an HTTP/3 connection, to be reaped unless a
// session comes.
func (l *Listener) h3Opened(conn *quic.Conn, pc *pendingConn) {
	l.h3mu.Lock()
	defer l.h3mu.Unlock()
	l.h3conns[conn] = &h3Conn{reap: time.AfterFunc(l.cfg.StreamTimeout, func() { l.reapH3(conn) }), pending: pc}
}

func (l *Listener) h3Closed(conn *quic.Conn) {
	l.h3mu.Lock()
	defer l.h3mu.Unlock()
	if c := l.h3conns[conn]; c != nil {
		c.reap.Stop()
		delete(l.h3conns, conn)
	}
}

// h3Session counts a WebTransport session starting (+1) or ending (-1)
// on conn, and returns the connection's place on the pending list (nil
// when it is not tracked) and the sessions left on it. A session starts
// once its stream came, which promotes the connection there. A
// connection whose last session ended after the hub admitted one is
// pending again: else a client that keeps it (and opens a session that
// never authenticates on it now and then) would hold it outside
// MaxPendingQUIC's bound for good.
func (l *Listener) h3Session(conn *quic.Conn, delta int) (*pendingConn, int) {
	l.h3mu.Lock()
	defer l.h3mu.Unlock()
	c := l.h3conns[conn]
	if c == nil {
		return nil, 0
	}
	if delta > 0 {
		c.pending.promote()
	}
	c.sessions += delta
	if c.sessions > 0 {
		c.reap.Stop()
	} else {
		c.reap.Reset(l.cfg.StreamTimeout)
		if delta < 0 && c.pending.wasAdmitted() {
			c.pending = l.pending.add(conn)
		}
	}
	return c.pending, c.sessions
}

// refusedGrace is how long an HTTP/3 connection whose WebTransport
// session the hub did not admit is kept, with no session on it, for the
// refusal to reach the client.
const refusedGrace = time.Second

// reapSoon reaps conn after refusedGrace unless a session is on it.
func (l *Listener) reapSoon(conn *quic.Conn) {
	l.h3mu.Lock()
	defer l.h3mu.Unlock()
	if c := l.h3conns[conn]; c != nil && c.sessions == 0 {
		c.reap.Reset(refusedGrace)
	}
}

// h3Waiting counts an upgrade on conn starting (+1) or ending (-1) its
// wait for the session's stream.
func (l *Listener) h3Waiting(conn *quic.Conn, delta int) {
	l.h3mu.Lock()
	defer l.h3mu.Unlock()
	if c := l.h3conns[conn]; c != nil {
		c.waiting += delta
	}
}

func (l *Listener) reapH3(conn *quic.Conn) {
	l.h3mu.Lock()
	c := l.h3conns[conn]
	idle := c != nil && c.sessions == 0
	if idle && c.waiting > 0 && !c.deferred {
		// The waiting upgrade began before now, so its wait ends within
		// StreamTimeout; then the reaping, whatever else waits (upgrades
		// overlapping one another must not hold the connection).
		c.deferred, idle = true, false
		c.reap.Reset(l.cfg.StreamTimeout + refusedGrace)
	}
	l.h3mu.Unlock()
	if idle {
		_ = conn.CloseWithError(quic.ApplicationErrorCode(relayv1.ErrorCode_ERROR_CODE_TIMEOUT), "no WebTransport session")
	}
}

func (l *Listener) serveWebTransport(w http.ResponseWriter, r *http.Request) {
	// Waiting from before the upgrade: the reaping may come while the
	// client already holds the session.
	conn, _ := r.Context().Value(connKey{}).(*quic.Conn)
	waited := func() {}
	if conn != nil {
		l.h3Waiting(conn, 1)
		// Once, on whichever way the wait ends (with its stream: after
		// the session is counted, so the connection never looks idle).
		waited = sync.OnceFunc(func() { l.h3Waiting(conn, -1) })
	}
	defer waited()
	sess, err := l.wt.Upgrade(w, r)
	if err != nil {
		l.cfg.Logger.Debug("webtransport upgrade refused", "remote", r.RemoteAddr, "err", err)
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	ctx, cancel := context.WithTimeout(l.ctx, l.cfg.StreamTimeout)
	str, err := sess.AcceptStream(ctx)
	cancel()
	if err != nil {
		code, msg := noStream(l.ctx)
		_ = sess.CloseWithError(webtransport.SessionErrorCode(code), msg)
		return
	}
	// Counted once its stream came: a session that never opens one
	// must not keep the connection (a client could otherwise hold it
	// with a fresh upgrade every StreamTimeout, never reaching the hub's
	// limits). A browser opens the stream right after the upgrade.
	var dc devconn.Conn = devconn.NewWebTransportConn(sess, str)
	if conn != nil {
		pc, _ := l.h3Session(conn, 1)
		waited()
		if pc != nil {
			dc = devconn.WhenAdmitted(dc, pc.admitted)
		}
		defer func() {
			l.h3Session(conn, -1)
			// A session the hub did not admit (refused, or it never got
			// through its handshake) left its connection promoted on the
			// pending list, free to try again for StreamTimeout: unless
			// another session is on it, the connection is reaped soon
			// (not at once: the session's refusal, with its code, is on
			// its way to the client).
			if pc != nil && !pc.wasAdmitted() {
				l.reapSoon(conn)
			}
		}()
	}
	_ = l.cfg.Hub.Serve(l.ctx, dc)
}

// Kill drops the UDP socket at once, as a crash would: devices learn of
// it only when their connections time out. For fault tests. Close still
// has to be called.
func (l *Listener) Kill() { _ = l.udp.Close() }

// Close stops accepting, ends every session (the hub should have been
// drained before, for a graceful stop) and waits for the connection
// goroutines: for CloseTimeout at most, then every connection is cut and
// the wait is short.
func (l *Listener) Close() error {
	var err error
	l.once.Do(func() {
		l.cancel()
		err = errors.Join(l.wt.Close(), l.ln.Close())
		l.wgMu.Lock()
		l.closed = true
		l.wgMu.Unlock()
		done := make(chan struct{})
		go func() {
			l.wg.Wait()
			close(done)
		}()
		t := time.NewTimer(l.cfg.CloseTimeout)
		defer t.Stop()
		select {
		case <-done:
		case <-t.C:
			l.cfg.Logger.Warn("connections still open after the close timeout; cutting them", "timeout", l.cfg.CloseTimeout)
			// Closing the transport closes every connection on it.
			_ = l.tr.Close()
			<-done
		}
		err = errors.Join(err, l.tr.Close(), l.udp.Close())
	})
	return err
}
