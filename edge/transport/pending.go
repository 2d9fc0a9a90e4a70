package transport

import (
	"context"
	"log/slog"
	"net/netip"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"

	"github.com/edge-relay/relay/internal/connbound"
	"github.com/edge-relay/relay/internal/oldest"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// DefaultMaxPendingQUIC is Config.MaxPendingQUIC's default, and
// MaxPendingQUICFor's for an edge whose sessions are not bounded. A
// pending connection that has not reached the hub costs the edge some
// 51 KiB (native, waiting for its stream) to 63 KiB (HTTP/3, waiting for
// a WebTransport session) of heap and goroutine stacks
// (docs/benchmarks.md, "QUIC connections that never become a session");
// one in the session's handshake has taken one of the hub's MaxSessions
// places, and counts there too. What such a peer sends that the edge
// has not read is held within the connection's InitialConnectionReceiveWindow
// (96 KiB). So a flood holds at most some 160 MiB.
const DefaultMaxPendingQUIC = 1024

// MaxPendingQUICFor is the bound of pending QUIC connections for an edge
// that takes at most maxSessions sessions (0: no bound): a sixty-fourth
// of them, at least 64 and at most DefaultMaxPendingQUIC. A pending
// connection costs at most some 160 KiB with what its peer may have sent
// (an idle session about 100 KiB), so the bound adds at most 2.5% to the
// memory the session cap was sized for, and grows with the edge: the devices of a reconnect storm come
// in proportion to its sessions. Legitimate ones each stay pending for a
// few round trips, the time of their handshakes, and the hub takes at
// most 20 new sessions a second from one address (HandshakesPerSecond),
// well within a source's share (connbound.PerSourceShare: 16 and more).
func MaxPendingQUICFor(maxSessions int) int {
	if maxSessions <= 0 {
		return DefaultMaxPendingQUIC
	}
	return min(max(maxSessions/64, 64), DefaultMaxPendingQUIC)
}

// pendingQUIC bounds the device port's QUIC connections that are not a
// device session: from Accept (the client's first flight: the listener
// accepts early) until the hub admits a session on them, with the share
// of one source (an IPv4 address, an IPv6 /64) bounded as the HTTPS
// port's (connbound.PerSourceShare). Neither the hub's per-address rate
// nor MaxSessions sees a connection that never opens its session stream,
// and MaxUnvalidatedHandshakes counts only handshakes from unvalidated
// addresses until they complete: a host that completes its handshakes
// from its real address and then stays silent held each connection for
// the stream timeout, as many as it opened. At the bound the oldest is
// closed; a connection moves behind those that never opened their
// session stream once it did (as connbound.Promoting does a connection
// that carried a request), so a flood of silent connections, from any
// number of sources, cannot push out a device whose stream is in.
type pendingQUIC struct {
	list    *oldest.List[netip.Addr, *quic.Conn]
	gauge   prometheus.Gauge   // the list's length, exported
	evicted prometheus.Counter // connections closed to keep a bound
	// closeConn closes an evicted connection; the listener runs it on a
	// goroutine it waits for (CloseWithError waits for quic-go's loop).
	closeConn func(func())
	// log says, at most every 10 s, whose connection was closed.
	log     *slog.Logger
	logSome rate.Sometimes
}

// pendingConn is one connection on the list until it is admitted, ends
// or is evicted.
type pendingConn struct {
	p     *pendingQUIC
	entry *oldest.Entry[netip.Addr, *quic.Conn]
	stop  func() bool // stops the removal when the connection ends
	// done is set once the hub admitted a session on the connection.
	done atomic.Bool
}

func newPendingQUIC(limit int, log *slog.Logger) *pendingQUIC {
	limit = max(limit, 1)
	return &pendingQUIC{log: log, logSome: rate.Sometimes{Interval: 10 * time.Second},
		list: oldest.New[netip.Addr, *quic.Conn](limit, connbound.PerSourceShare(limit)),
		gauge: prometheus.NewGauge(prometheus.GaugeOpts{Name: "relay_edge_quic_pending_connections",
			Help: "Device port QUIC connections (native and HTTP/3) that are not a device session: in their handshake, waiting for their session stream or WebTransport session, or in the session's handshake."}),
		evicted: prometheus.NewCounter(prometheus.CounterOpts{Name: "relay_edge_quic_pending_evicted_total",
			Help: "Device port QUIC connections closed because MaxPendingQUIC others were pending, or their source's share of them (the oldest goes, those that never opened a session stream first)."}),
	}
}

// add puts an accepted connection on the list, closing the one the list
// drops, if any.
func (p *pendingQUIC) add(conn *quic.Conn) *pendingConn {
	src := connbound.SourceOf(conn.RemoteAddr())
	e, old := p.list.Add(conn, src)
	p.gauge.Inc()
	pc := &pendingConn{p: p, entry: e}
	pc.stop = context.AfterFunc(conn.Context(), pc.leave)
	if old != nil {
		p.gauge.Dec()
		p.evicted.Inc()
		// The source's own oldest goes once it holds its share; else the
		// oldest of all, whoever's: a device told to go elsewhere.
		code, msg, reason := relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, "too many connections pending on this edge; try another edge", "edge_bound"
		oldSrc := connbound.SourceOf(old.Value.RemoteAddr())
		if oldSrc == src {
			code, msg, reason = relayv1.ErrorCode_ERROR_CODE_RATE_LIMITED, "too many connections pending from this address", "source_share"
		}
		p.logSome.Do(func() {
			p.log.Warn("closed a pending QUIC connection to stay within a bound (logged at most every 10s; relay_edge_quic_pending_evicted_total counts them all)",
				"reason", reason, "source", oldSrc.String(), "newest_from", src.String())
		})
		p.closeConn(func() { _ = old.Value.CloseWithError(quic.ApplicationErrorCode(code), msg) })
	}
	return pc
}

// leave takes the connection off the list, if it is still on it.
func (pc *pendingConn) leave() {
	if pc.p.list.Remove(pc.entry) {
		pc.p.gauge.Dec()
	}
}

// promote moves the connection behind those that never opened a session
// stream: its stream (or its WebTransport session's) came.
func (pc *pendingConn) promote() { pc.p.list.Promote(pc.entry) }

// admitted takes the connection off the list for good: the hub admitted
// its session, which MaxSessions bounds from then on.
func (pc *pendingConn) admitted() {
	pc.done.Store(true)
	pc.stop()
	pc.leave()
}

// wasAdmitted reports whether the hub admitted a session on the
// connection.
func (pc *pendingConn) wasAdmitted() bool { return pc.done.Load() }
