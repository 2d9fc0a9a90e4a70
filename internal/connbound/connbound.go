// Package connbound bounds the connections a listener holds open for
// peers that have not proven who they are, and for each source those
// that have.
//
// Whoever reaches a port can open connections without an account; each
// holds a goroutine and buffers until a timeout ends it. A Listener puts
// every connection it accepts on a list of pending ones, and at
// Config.MaxPending closes the oldest: a real client's handshake and
// first request take a round trip or two, so a flood of silent
// connections cannot keep it out unless it fills the bound faster than
// that. One source (an IPv4 address, an IPv6 /64) holds at most a
// sixteenth of the bound (PerSourceShare): beyond it its own oldest goes,
// so a flood from a few hosts pushes out only its own connections.
//
// The server vouches for a connection (Conn.Vouch, or VouchContext from a
// request's context) once it proved itself: a session admitted, a call
// whose credentials verified. It then leaves the pending list. Vouched
// connections are bounded per source when Config.MaxVouchedPerSource is
// set (beyond it, the source's oldest vouched connection goes), so that
// an account holder who opens connections from one host cannot exhaust
// the server either; they can only close their own.
package connbound

import (
	"context"
	"crypto/tls"
	"math"
	"net"
	"net/netip"
	"sync"

	"github.com/edge-relay/relay/internal/oldest"
)

// Config sets a Listener's bounds.
type Config struct {
	// MaxPending bounds the connections not vouched for; at the bound the
	// oldest is closed. At least 1.
	MaxPending int
	// MaxVouchedPerSource bounds one source's vouched connections; beyond
	// it, the source's oldest vouched connection is closed. 0: vouched
	// connections are not bounded (nor counted).
	MaxVouchedPerSource int
	// Evicted, if set, is called for every connection the Listener closes
	// to keep a bound: vouched says which.
	Evicted func(vouched bool)
}

// Listener is a net.Listener whose connections are bounded as the
// package says. Its Accept returns *Conn.
type Listener struct {
	net.Listener
	cfg     Config
	pending *oldest.List[*Conn]
	vouched *oldest.List[*Conn] // nil: not bounded
}

// PerSourceShare is the share of a bound of pending connections one
// source may hold: a sixteenth, and at least 16 (or the bound, when it
// is lower).
func PerSourceShare(limit int) int { return max(limit/16, min(limit, 16)) }

// NewListener bounds ln's connections as cfg says.
func NewListener(ln net.Listener, cfg Config) *Listener {
	cfg.MaxPending = max(cfg.MaxPending, 1)
	l := &Listener{Listener: ln, cfg: cfg,
		pending: oldest.New[*Conn](cfg.MaxPending, PerSourceShare(cfg.MaxPending))}
	if cfg.MaxVouchedPerSource > 0 {
		l.vouched = oldest.New[*Conn](math.MaxInt, cfg.MaxVouchedPerSource)
	}
	return l
}

// Pending is the number of connections not vouched for.
func (l *Listener) Pending() int { return l.pending.Len() }

// Vouched is the number of vouched connections open, when they are
// bounded (0 when not).
func (l *Listener) Vouched() int {
	if l.vouched == nil {
		return 0
	}
	return l.vouched.Len()
}

// SourceOf is the source a connection from addr counts against: its IPv4
// address, or its IPv6 address's /64 (a host may pick any address in
// it). An address that is not an IP address counts as the zero Addr.
func SourceOf(addr net.Addr) netip.Addr {
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

// Accept waits for a connection and puts it on the pending list,
// closing the one that list drops, if any.
func (l *Listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	bc := &Conn{Conn: c, l: l, source: SourceOf(c.RemoteAddr())}
	// bc.entry is set before anyone else holds bc: the list hands out
	// only e.Value.Conn, which evict closes.
	var old *oldest.Entry[*Conn]
	bc.entry, old = l.pending.Add(bc, bc.source)
	l.evict(old, false)
	return bc, nil
}

// evict closes the connection a list dropped, if any. Its owner (the
// server reading it) then sees its reads and writes fail and ends it.
func (l *Listener) evict(e *oldest.Entry[*Conn], vouched bool) {
	if e == nil {
		return
	}
	if l.cfg.Evicted != nil {
		l.cfg.Evicted(vouched)
	}
	_ = e.Value.Conn.Close()
}

// Conn is a connection a Listener accepted: on its pending list until
// vouched for or closed, then on its vouched list (if bounded) until
// closed.
type Conn struct {
	net.Conn
	l      *Listener
	source netip.Addr

	mu      sync.Mutex           // guards the fields below
	entry   *oldest.Entry[*Conn] // its place on the list it is on; nil once off both
	vouched bool
	closed  bool
}

// Vouch takes the connection off the pending list, and puts it on its
// source's vouched list when those are bounded (which may close the
// source's oldest). A second call, or one after the connection was
// closed or evicted, does nothing.
func (c *Conn) Vouch() {
	c.mu.Lock()
	if c.vouched || c.closed {
		c.mu.Unlock()
		return
	}
	c.vouched = true
	if !c.l.pending.Remove(c.entry) {
		// Evicted: it is being closed.
		c.entry = nil
		c.mu.Unlock()
		return
	}
	c.entry = nil
	var old *oldest.Entry[*Conn]
	if c.l.vouched != nil {
		c.entry, old = c.l.vouched.Add(c, c.source)
	}
	c.mu.Unlock()
	c.l.evict(old, true)
}

// Close takes the connection off its list and closes it.
func (c *Conn) Close() error {
	c.mu.Lock()
	c.closed = true
	if c.entry != nil {
		if c.vouched {
			c.l.vouched.Remove(c.entry)
		} else {
			c.l.pending.Remove(c.entry)
		}
		c.entry = nil
	}
	c.mu.Unlock()
	return c.Conn.Close()
}

// Vouch vouches for the Conn c is or carries (through a *tls.Conn), and
// reports whether there was one.
func Vouch(c net.Conn) bool {
	bc := unwrap(c)
	if bc == nil {
		return false
	}
	bc.Vouch()
	return true
}

func unwrap(c net.Conn) *Conn {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	bc, _ := c.(*Conn)
	return bc
}

type connKey struct{}

// ContextWithConn returns ctx carrying the Conn c is or carries, for
// VouchContext; ctx itself when there is none. Give it to an
// http.Server as its ConnContext.
func ContextWithConn(ctx context.Context, c net.Conn) context.Context {
	if bc := unwrap(c); bc != nil {
		return context.WithValue(ctx, connKey{}, bc)
	}
	return ctx
}

// VouchContext vouches for the connection of a request whose context
// derives from ContextWithConn's; a context without one is ignored.
func VouchContext(ctx context.Context) {
	if bc, ok := ctx.Value(connKey{}).(*Conn); ok {
		bc.Vouch()
	}
}
