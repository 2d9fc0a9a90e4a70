// Package connbound bounds the connections a listener holds open for
// peers that have not proven who they are, and those of peers that have.
//
// Whoever reaches a port can open connections without an account; each
// holds a goroutine and buffers until a timeout ends it. A Listener puts
// every connection it accepts on a list of pending ones, and at
// Config.MaxPending closes the oldest, those that never carried a
// request first: Promoting, around an http.Server's handler, promotes a
// connection once a request's headers were read on it, past its TLS
// handshake (which costs the sender a key exchange). So a flood of
// connections that stay silent, or stall in their handshake or before
// a request's headers, cannot push out a real client, whose handshake
// and request come at once; one of connections that each send a request
// and then stall keeps a client out only if it fills the bound faster
// than the client's handshake and first request take, a round trip or
// two. One source (an IPv4 address, an IPv6 /64) holds
// at most a sixteenth of the bound (PerSourceShare): beyond it its own
// oldest goes, so a flood from a few hosts pushes out only its own
// connections.
//
// The server vouches for a connection (Conn.Vouch) once a call on it
// proved who makes it, naming the account: it leaves the pending list
// for the vouched one, bounded per account (Config.MaxVouchedPerKey) and
// in all (Config.MaxVouched), so that an account's holder cannot exhaust
// the server either; past a bound the oldest goes, of the account or of
// all. A connection whose caller the server trusts (Conn.Trust: another
// server of its own, an edge) goes on a list of its own instead
// (Config.MaxTrusted, a sixteenth of it per source), out of reach of
// everyone else's connections.
package connbound

import (
	"context"
	"crypto/tls"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/edge-relay/relay/internal/oldest"
)

// Config sets a Listener's bounds.
type Config struct {
	// MaxPending bounds the connections not vouched for nor trusted; at
	// the bound the oldest is closed. At least 1.
	MaxPending int
	// MaxVouchedPerKey bounds the vouched connections of one key (an
	// account); beyond it, the key's oldest is closed. 0: vouched
	// connections are not bounded nor counted, and MaxVouched is ignored.
	MaxVouchedPerKey int
	// MaxVouched bounds all vouched connections; beyond it, the oldest is
	// closed. 0: only the share per key bounds them.
	MaxVouched int
	// MaxTrusted bounds the trusted connections; beyond it, the oldest is
	// closed, and one source holds at most a sixteenth of it
	// (PerSourceShare), beyond which its own oldest is. 0: they are not
	// bounded nor counted.
	MaxTrusted int
	// Evicted, if set, is called for every connection the Listener closes
	// to keep a bound: from which list, and whose (its source) it was.
	Evicted func(from State, source netip.Addr)
}

// State is where a connection stands.
type State uint8

// A connection is Pending from its accept until vouched for, trusted or
// closed; Vouched until trusted or closed.
const (
	Pending State = iota
	Vouched
	Trusted
	Closed // or evicted
)

// String names the state, as metrics label it.
func (s State) String() string {
	switch s {
	case Pending:
		return "pending"
	case Vouched:
		return "vouched"
	case Trusted:
		return "trusted"
	}
	return "closed"
}

// Listener is a net.Listener whose connections are bounded as the
// package says. Its Accept returns *Conn.
type Listener struct {
	net.Listener
	cfg     Config
	pending *oldest.List[netip.Addr, *Conn]
	vouched *oldest.List[string, *Conn]     // by account; nil: not bounded
	trusted *oldest.List[netip.Addr, *Conn] // by source; nil: not bounded
}

// PerSourceShare is the share of a bound of pending connections one
// source may hold: a sixteenth, and at least 16 (or the bound, when it
// is lower).
func PerSourceShare(limit int) int { return max(limit/16, min(limit, 16)) }

// unbounded stands for "no bound in all" on a list bounded per key.
const unbounded = int(^uint(0) >> 1)

// NewListener bounds ln's connections as cfg says.
func NewListener(ln net.Listener, cfg Config) *Listener {
	cfg.MaxPending = max(cfg.MaxPending, 1)
	l := &Listener{Listener: ln, cfg: cfg,
		pending: oldest.New[netip.Addr, *Conn](cfg.MaxPending, PerSourceShare(cfg.MaxPending))}
	if cfg.MaxVouchedPerKey > 0 {
		total := cfg.MaxVouched
		if total <= 0 {
			total = unbounded
		}
		l.vouched = oldest.New[string, *Conn](total, cfg.MaxVouchedPerKey)
	}
	if cfg.MaxTrusted > 0 {
		l.trusted = oldest.New[netip.Addr, *Conn](cfg.MaxTrusted, PerSourceShare(cfg.MaxTrusted))
	}
	return l
}

// Pending is the number of connections not vouched for nor trusted.
func (l *Listener) Pending() int { return l.pending.Len() }

// Vouched is the number of vouched connections open, when they are
// bounded (0 when not).
func (l *Listener) Vouched() int {
	if l.vouched == nil {
		return 0
	}
	return l.vouched.Len()
}

// Trusted is the number of trusted connections open, when they are
// bounded (0 when not).
func (l *Listener) Trusted() int {
	if l.trusted == nil {
		return 0
	}
	return l.trusted.Len()
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
	// Under bc.mu: an Accept beside this one may evict bc at once.
	var old *oldest.Entry[netip.Addr, *Conn]
	bc.mu.Lock()
	bc.pendingAt, old = l.pending.Add(bc, bc.source)
	bc.mu.Unlock()
	if old != nil {
		l.evict(old.Value, Pending)
	}
	return bc, nil
}

// evict closes a connection a list dropped. Its owner (the server
// reading it) then sees its reads and writes fail and ends it.
func (l *Listener) evict(c *Conn, from State) {
	c.mu.Lock()
	c.state, c.pendingAt, c.vouchedAt, c.trustedAt = Closed, nil, nil, nil
	c.mu.Unlock()
	if l.cfg.Evicted != nil {
		l.cfg.Evicted(from, c.source)
	}
	_ = c.Conn.Close()
}

// Conn is a connection a Listener accepted, on the list its state names
// (if that one is bounded).
type Conn struct {
	net.Conn
	l      *Listener
	source netip.Addr

	promoted atomic.Bool // a request was served on it

	mu        sync.Mutex // guards the fields below
	state     State
	pendingAt *oldest.Entry[netip.Addr, *Conn] // while Pending
	vouchedAt *oldest.Entry[string, *Conn]     // while Vouched, when that list is bounded
	trustedAt *oldest.Entry[netip.Addr, *Conn] // while Trusted, when that list is bounded
}

// Source is the source the connection counts against (SourceOf).
func (c *Conn) Source() netip.Addr { return c.source }

// State says where the connection stands.
func (c *Conn) State() State {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state
}

// Promote moves a pending connection behind those that have not carried
// a request yet (oldest.List.Promote): they go first. Only the first
// call does anything.
func (c *Conn) Promote() {
	if c.promoted.Load() || c.promoted.Swap(true) {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state == Pending {
		c.l.pending.Promote(c.pendingAt)
	}
}

// Vouch takes a pending connection off the pending list, and puts it on
// the vouched list under key (an account) when that one is bounded,
// which may close the oldest there, of the key or of all. A call on a
// connection not pending (vouched for, trusted, closed, evicted) does
// nothing: the first call that proved itself decides.
func (c *Conn) Vouch(key string) { c.prove(Vouched, key) }

// Trust takes a pending or vouched connection off its list, and puts it
// on the trusted list when that one is bounded, which may close the
// oldest trusted connection, of its source or of all. A call on one
// trusted, closed or evicted does nothing.
func (c *Conn) Trust() { c.prove(Trusted, "") }

func (c *Conn) prove(to State, key string) {
	c.mu.Lock()
	if c.state >= to || (to == Vouched && c.state != Pending) {
		c.mu.Unlock()
		return
	}
	if !c.leaveLocked() {
		c.mu.Unlock() // evicted: it is being closed
		return
	}
	c.state = to
	var old *Conn
	switch {
	case to == Vouched && c.l.vouched != nil:
		var e *oldest.Entry[string, *Conn]
		if c.vouchedAt, e = c.l.vouched.Add(c, key); e != nil {
			old = e.Value
		}
	case to == Trusted && c.l.trusted != nil:
		var e *oldest.Entry[netip.Addr, *Conn]
		if c.trustedAt, e = c.l.trusted.Add(c, c.source); e != nil {
			old = e.Value
		}
	}
	c.mu.Unlock()
	if old != nil {
		c.l.evict(old, to)
	}
}

// leaveLocked takes the connection off the list it is on, and reports
// whether it was still there (not evicted); an evicted one is Closed
// from then on. mu is held.
func (c *Conn) leaveLocked() bool {
	on := true
	switch {
	case c.state == Pending:
		on = c.l.pending.Remove(c.pendingAt)
		c.pendingAt = nil
	case c.vouchedAt != nil:
		on = c.l.vouched.Remove(c.vouchedAt)
		c.vouchedAt = nil
	case c.trustedAt != nil:
		on = c.l.trusted.Remove(c.trustedAt)
		c.trustedAt = nil
	case c.state == Closed:
		on = false
	}
	if !on {
		c.state = Closed
	}
	return on
}

// Close takes the connection off its list and closes it.
func (c *Conn) Close() error {
	c.mu.Lock()
	c.leaveLocked()
	c.state = Closed
	c.mu.Unlock()
	return c.Conn.Close()
}

// Of returns the Conn c is or carries (through a *tls.Conn), if any.
func Of(c net.Conn) (*Conn, bool) {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	bc, ok := c.(*Conn)
	return bc, ok
}

// Vouch vouches for the Conn c is or carries (through a *tls.Conn), with
// no key, and reports whether there was one.
func Vouch(c net.Conn) bool {
	bc, ok := Of(c)
	if ok {
		bc.Vouch("")
	}
	return ok
}

// Promoting promotes the connection of every request next serves, once
// its headers were read (past the TLS handshake; on HTTP/2, a stream's
// HEADERS, not the connection's preface). Its http.Server needs
// ConnContext: ContextWithConn.
func Promoting(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if c, ok := FromContext(r.Context()); ok {
			c.Promote()
		}
		next.ServeHTTP(w, r)
	})
}

type connKey struct{}

// ContextWithConn returns ctx carrying the Conn c is or carries, for
// FromContext; ctx itself when there is none. Give it to an http.Server
// as its ConnContext.
func ContextWithConn(ctx context.Context, c net.Conn) context.Context {
	if bc, ok := Of(c); ok {
		return context.WithValue(ctx, connKey{}, bc)
	}
	return ctx
}

// FromContext returns the Conn of a request whose context derives from
// ContextWithConn's, if any.
func FromContext(ctx context.Context) (*Conn, bool) {
	bc, ok := ctx.Value(connKey{}).(*Conn)
	return bc, ok
}
