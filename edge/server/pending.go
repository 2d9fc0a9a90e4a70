package server

import (
	"container/list"
	"net"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
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
type pendingConns struct {
	limit   int
	gauge   prometheus.Gauge
	evicted prometheus.Counter

	mu    sync.Mutex
	conns list.List // of *pendingConn, oldest first
}

func newPendingConns(limit int, reg prometheus.Registerer) (*pendingConns, error) {
	p := &pendingConns{limit: limit,
		gauge: prometheus.NewGauge(prometheus.GaugeOpts{Name: "relay_edge_https_pending_connections",
			Help: "HTTPS port connections that are not a device session: in their TLS handshake, serving a request or idle between requests."}),
		evicted: prometheus.NewCounter(prometheus.CounterOpts{Name: "relay_edge_https_pending_evicted_total",
			Help: "HTTPS port connections closed because MaxPendingHTTPS others were pending (the oldest goes)."}),
	}
	for _, c := range []prometheus.Collector{p.gauge, p.evicted} {
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

// enter lists c and, at the bound, takes the oldest off the list and
// returns it to be closed.
func (p *pendingConns) enter(c *pendingConn) (evicted *pendingConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conns.Len() >= p.limit {
		if front := p.conns.Front(); front != nil {
			evicted = p.conns.Remove(front).(*pendingConn)
			evicted.elem = nil
		}
	}
	c.elem = p.conns.PushBack(c)
	p.gauge.Set(float64(p.conns.Len()))
	return evicted
}

// leave takes c off the list, if it is still on it.
func (p *pendingConns) leave(c *pendingConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c.elem != nil {
		p.conns.Remove(c.elem)
		c.elem = nil
		p.gauge.Set(float64(p.conns.Len()))
	}
}

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
	if old := l.p.enter(pc); old != nil {
		// Closed outside the lock: a session admitted in between (the
		// oldest of thousands finishing its handshake in this instant)
		// goes too, and its device reconnects.
		l.p.evicted.Inc()
		_ = old.Conn.Close() // its reads and writes fail; net/http ends it
	}
	return pc, nil
}

// pendingConn is an accepted connection on the list until it is closed
// or its WebSocket session is admitted.
type pendingConn struct {
	net.Conn
	p    *pendingConns
	elem *list.Element // guarded by p.mu
}

// Admitted takes the connection off the list: the hub admitted the
// session of the WebSocket on it (devconn.Admitter).
func (c *pendingConn) Admitted() { c.p.leave(c) }

func (c *pendingConn) Close() error {
	c.p.leave(c)
	return c.Conn.Close()
}
