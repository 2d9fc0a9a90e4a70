// Package connbound bounds the connections a listener holds open for
// peers that have not proven who they are, and for each source those
// that have.
//
// Whoever reaches a port can open connections without an account; each
// holds a goroutine and buffers until a timeout ends it. A Listener puts
// every connection it accepts on a list of pending ones, and at
// Config.MaxPending closes the oldest, those whose peer never sent a
// byte first (Conn.Read): a flood of connections that stay silent
// cannot push out a real client, which speaks at once; one of
// connections that send something and stall (a TLS ClientHello) cannot
// keep a real client out unless it fills the bound faster than the
// client's handshake and first request take, a round trip or two. One source (an IPv4 address, an IPv6 /64) holds at most a
// sixteenth of the bound (PerSourceShare): beyond it its own oldest goes,
// so a flood from a few hosts pushes out only its own connections.
//
// The server vouches for a connection (Conn.Vouch, or VouchContext from a
// request's context) once it proved itself: a session admitted, a call
// whose credentials verified. It then leaves the pending list. Vouched
// connections are bounded per source when Config.MaxVouchedPerSource is
// set (beyond it, the source's oldest vouched connection goes), and in
// all by Config.MaxVouched, so that an account holder who opens
// connections cannot exhaust the server either. A connection whose
// caller the server trusts (Conn.Trust: another server of its own, an
// edge) leaves both lists: it is never closed to make room, so that
// whoever shares its source address cannot cut it.
package connbound

import (
	"context"
	"crypto/tls"
	"math"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/edge-relay/relay/internal/oldest"
)

// Config sets a Listener's bounds.
type Config struct {
	// MaxPending bounds the connections not vouched for; at the bound the
	// oldest is closed. At least 1.
	MaxPending int
	// MaxVouchedPerSource bounds one source's vouched connections; beyond
	// it, the source's oldest vouched connection is closed. 0: vouched
	// connections are not bounded (nor counted), and MaxVouched is
	// ignored.
	MaxVouchedPerSource int
	// MaxVouched bounds all vouched connections; beyond it, the oldest is
	// closed. 0: only the share per source bounds them.
	MaxVouched int
	// Evicted, if set, is called for every connection the Listener closes
	// to keep a bound: vouched says which list, source whose connection
	// it was.
	Evicted func(vouched bool, source netip.Addr)
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
		total := cfg.MaxVouched
		if total <= 0 {
			total = math.MaxInt
		}
		l.vouched = oldest.New[*Conn](total, cfg.MaxVouchedPerSource)
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
		l.cfg.Evicted(vouched, e.Value.source)
	}
	_ = e.Value.Conn.Close()
}

// Conn is a connection a Listener accepted: on its pending list until
// vouched for, trusted or closed; once vouched for, on its vouched list
// (if bounded) until trusted or closed.
type Conn struct {
	net.Conn
	l      *Listener
	source netip.Addr
	spoke  atomic.Bool // its peer sent a byte

	mu    sync.Mutex           // guards the fields below
	entry *oldest.Entry[*Conn] // its place on the list state names; nil once off both
	state connState
}

type connState uint8

const (
	statePending connState = iota
	stateVouched
	stateTrusted // off both lists for good
	stateClosed
)

// Vouch takes the connection off the pending list, and puts it on the
// vouched list when those are bounded (which may close the oldest there,
// of its source or of all). A call on a connection vouched for, trusted,
// closed or evicted does nothing.
func (c *Conn) Vouch() {
	c.mu.Lock()
	if c.state != statePending {
		c.mu.Unlock()
		return
	}
	if !c.leaveLocked() {
		c.mu.Unlock() // evicted: it is being closed
		return
	}
	c.state = stateVouched
	var old *oldest.Entry[*Conn]
	if c.l.vouched != nil {
		c.entry, old = c.l.vouched.Add(c, c.source)
	}
	c.mu.Unlock()
	c.l.evict(old, true)
}

// Trust takes the connection off the list it is on for good: it is not
// counted, and never closed to make room. A call on a connection closed
// or evicted does nothing.
func (c *Conn) Trust() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state == stateTrusted || c.state == stateClosed {
		return
	}
	if c.leaveLocked() {
		c.state = stateTrusted
	}
}

// leaveLocked takes the connection off the list it is on, and reports
// whether it was still there (not evicted). mu is held.
func (c *Conn) leaveLocked() bool {
	if c.entry == nil {
		return c.state == stateVouched // vouched, unbounded: on no list
	}
	list := c.l.pending
	if c.state == stateVouched {
		list = c.l.vouched
	}
	on := list.Remove(c.entry)
	c.entry = nil
	return on
}

// Read reads from the connection. The first byte its peer sends
// promotes it on the pending list (oldest.List.Promote): connections
// whose peer never sent anything go first. A TLS or HTTP client speaks
// at once, so a flood of connections that stay silent, the cheapest
// there is, cannot push out a real one however fast it comes; one that
// sends a TLS ClientHello and stalls costs its sender a handshake.
func (c *Conn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 && !c.spoke.Load() {
		c.spoke.Store(true)
		c.mu.Lock()
		if c.state == statePending {
			c.l.pending.Promote(c.entry)
		}
		c.mu.Unlock()
	}
	return n, err
}

// Close takes the connection off its list and closes it.
func (c *Conn) Close() error {
	c.mu.Lock()
	c.leaveLocked()
	c.state = stateClosed
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

// TrustContext trusts the connection of a request whose context derives
// from ContextWithConn's; a context without one is ignored.
func TrustContext(ctx context.Context) {
	if bc, ok := ctx.Value(connKey{}).(*Conn); ok {
		bc.Trust()
	}
}
