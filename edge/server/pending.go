package server

import (
	"net"
	"net/netip"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/edge-relay/relay/internal/oldest"
)

// DefaultMaxPendingHTTPS is Config.MaxPendingHTTPS's default.
// (Some 110 MiB at most: about 27 KiB of heap and stack for an idle
// connection, docs/benchmarks.md.)
const DefaultMaxPendingHTTPS = 4096

// pendingConns bounds the HTTPS port's connections that are not a device
// session: in their TLS handshake, reading or serving a request, idle
// between requests, or upgraded to a WebSocket whose session the hub has
// not admitted yet (its handshake, or a refusal's linger). Whoever
// reaches the port can open them without an account, and each holds a
// goroutine and buffers until a timeout closes it. At the bound the
// oldest is closed: a real client's handshake, upgrade and session
// handshake take a few round trips, so a flood cannot keep it out unless
// it fills the bound faster than those take; and it holds at most the
// bound. A WebSocket leaves the list once the hub admitted its session
// (devconn.Admitter): from then on it is a session.
//
// One source (an IPv4 address, an IPv6 /64, as the session handshakes'
// rate limit counts them) holds at most perSourceShare of them: beyond,
// its own oldest goes, so a flood from a few hosts pushes out only its
// own connections, never the bound's worth of everyone else's.
type pendingConns struct {
	conns   *oldest.List[*pendingConn]
	evicted prometheus.Counter
}

// perSourceShare is the share of the bound one source may hold: a
// sixteenth, and at least 16 (or the bound, when it is lower).
func perSourceShare(limit int) int { return max(limit/16, min(limit, 16)) }

// sourceOf is the source a connection counts against: its IPv4 address,
// or its IPv6 address's /64 (a host may pick any address in it).
func sourceOf(addr net.Addr) netip.Addr {
	ap, err := netip.ParseAddrPort(addr.String())
	if err != nil {
		return netip.Addr{}
	}
	ip := ap.Addr().Unmap()
	if ip.Is6() {
		p, _ := ip.Prefix(64)
		ip = p.Addr()
	}
	return ip
}

func newPendingConns(limit int, reg prometheus.Registerer) (*pendingConns, error) {
	p := &pendingConns{conns: oldest.New[*pendingConn](limit, perSourceShare(limit)),
		evicted: prometheus.NewCounter(prometheus.CounterOpts{Name: "relay_edge_https_pending_evicted_total",
			Help: "HTTPS port connections closed because MaxPendingHTTPS others were pending, or their source's share of them (the oldest goes)."}),
	}
	gauge := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "relay_edge_https_pending_connections",
		Help: "HTTPS port connections that are not a device session: in their TLS handshake, serving a request, idle between requests, or a WebSocket not yet admitted."},
		func() float64 { return float64(p.conns.Len()) })
	for _, c := range []prometheus.Collector{gauge, p.evicted} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// listener wraps ln so that every connection it accepts is counted.
func (p *pendingConns) listener(ln net.Listener) net.Listener {
	return &pendingListener{Listener: ln, p: p}
}

// leave takes c off the list, if it is still on it.
func (p *pendingConns) leave(c *pendingConn) { p.conns.Remove(c.entry) }

type pendingListener struct {
	net.Listener
	p *pendingConns
}

func (l *pendingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	pc := &pendingConn{Conn: c, p: l.p}
	var old *oldest.Entry[*pendingConn]
	pc.entry, old = l.p.conns.Add(pc, sourceOf(c.RemoteAddr()))
	if old != nil {
		// Closed outside the lock: a session admitted in between (the
		// oldest of thousands finishing its handshake in this instant)
		// goes too, and its device reconnects.
		l.p.evicted.Inc()
		_ = old.Value.Conn.Close() // its reads and writes fail; net/http ends it
	}
	return pc, nil
}

// pendingConn is an accepted connection on the list until it is closed
// or its WebSocket session is admitted.
type pendingConn struct {
	net.Conn
	p     *pendingConns
	entry *oldest.Entry[*pendingConn] // its place on p.conns
}

// Admitted takes the connection off the list: the hub admitted the
// session of the WebSocket on it (devconn.Admitter).
func (c *pendingConn) Admitted() { c.p.leave(c) }

func (c *pendingConn) Close() error {
	c.p.leave(c)
	return c.Conn.Close()
}
