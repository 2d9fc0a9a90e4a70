package transport

import (
	"context"
	"net"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"
)

// DefaultMaxUnvalidatedHandshakes is Config.MaxUnvalidatedHandshakes
// unless set. A handshake from an address that never answers (a spoofed
// one) is held for the handshake timeout, 5 s: so Retries start once
// such Initials come faster than about 200 a second, and at most this
// many connections' state is ever held for them. Real clients reach it
// only in a reconnect storm (at 100 ms of round trip, 10,000 new
// connections a second), where the one round trip more that a Retry
// costs them is the lesser evil.
const DefaultMaxUnvalidatedHandshakes = 1024

// addrValidation decides which new QUIC connections must first prove,
// with a Retry (RFC 9000 section 8.1.2), that they receive at their
// source address: those that arrive while max handshakes from addresses
// not yet validated are in progress, every one when max is negative. A
// Retry costs the edge no state, and a client one round trip; below the
// bound clients pay nothing. The count is of unvalidated handshakes
// only, as quic-go's own former MaxUnvalidatedHandshakes was: those are
// what an off-path attacker can create at will, and an address that came
// back with a Retry token has shown it is real.
type addrValidation struct {
	max        int64
	inProgress atomic.Int64
	gauge      prometheus.Gauge   // inProgress, exported
	retries    prometheus.Counter // Initials answered with a Retry
}

// handshakeKey carries a counted handshake in its connection's context.
type handshakeKey struct{}

// handshake is one counted handshake; done uncounts it, once.
type handshake struct {
	v    *addrValidation
	over atomic.Bool
}

func (h *handshake) done() {
	if h.over.CompareAndSwap(false, true) {
		h.v.inProgress.Add(-1)
		h.v.gauge.Dec()
	}
}

// verify is quic.Transport.VerifySourceAddress. quic-go asks it on its
// packet loop for each Initial that carries no valid token, before it
// creates a connection; true sends a Retry instead.
func (v *addrValidation) verify(net.Addr) bool {
	if v.max >= 0 && v.inProgress.Load() < v.max {
		return false
	}
	v.retries.Inc()
	return true
}

// connContext is quic.Transport.ConnContext, called as quic-go creates
// a connection: a handshake from an unvalidated address is counted until
// it completes (waitHandshake) or its connection ends, whichever is
// first. Connections that quic-go refuses before the application sees
// them (a full accept queue) end, and so are uncounted too.
func (v *addrValidation) connContext(ctx context.Context, info *quic.ClientInfo) (context.Context, error) {
	if info.AddrVerified {
		return ctx, nil
	}
	h := &handshake{v: v}
	v.inProgress.Add(1)
	v.gauge.Inc()
	context.AfterFunc(ctx, h.done)
	return context.WithValue(ctx, handshakeKey{}, h), nil
}

// counted returns the counted handshake of an accepted connection, nil
// when it was not counted. The listener accepts connections early (as
// soon as the client's first flight is read, so HTTP/3 can send its
// SETTINGS at once), so a handshake may still be under way: its end is
// the caller's to wait for (waitHandshake).
func counted(conn *quic.Conn) *handshake {
	h, _ := conn.Context().Value(handshakeKey{}).(*handshake)
	return h
}

// waitHandshake uncounts h once conn's handshake completes, the
// connection ends, or stop does (the listener closing).
func waitHandshake(conn *quic.Conn, h *handshake, stop <-chan struct{}) {
	select {
	case <-conn.HandshakeComplete():
	case <-conn.Context().Done():
	case <-stop:
	}
	h.done()
}
