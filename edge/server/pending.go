package server

import (
	"net"
	"net/netip"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/edge-relay/relay/internal/connbound"
)

// DefaultMaxPendingHTTPS is Config.MaxPendingHTTPS's default for an edge
// whose sessions are not bounded, and the most MaxPendingHTTPSFor gives.
// (Some 110 MiB at most: about 27 KiB of heap and stack for an idle
// connection, docs/benchmarks.md.)
const DefaultMaxPendingHTTPS = 4096

// MaxPendingHTTPSFor is Config.MaxPendingHTTPS's default for an edge that
// takes at most maxSessions sessions (0: no bound): an eighth of them, at
// least 64 and at most DefaultMaxPendingHTTPS. A WebSocket in its
// session's handshake is pending here and holds one of the hub's
// MaxSessions places meanwhile: with a bound at or above the session
// cap, WebSockets that never finish their handshakes (a few addresses'
// worth, within the hub's rate per address) could hold every place, and
// every device would be told the edge is full. An eighth leaves them at
// most that share, with room for a reconnect storm's handshakes.
func MaxPendingHTTPSFor(maxSessions int) int {
	if maxSessions <= 0 {
		return DefaultMaxPendingHTTPS
	}
	return min(max(maxSessions/8, 64), DefaultMaxPendingHTTPS)
}

// pendingHTTPS bounds the HTTPS port's connections that are not a device
// session: in their TLS handshake, reading or serving a request, idle
// between requests, or upgraded to a WebSocket whose session the hub has
// not admitted yet (its handshake, or a refusal's linger). At the bound
// the oldest is closed, and one source holds at most its share
// (connbound). A WebSocket leaves the list once the hub admitted its
// session (devconn.Admitter vouches for it): from then on it is a
// session, which MaxSessions bounds.
func pendingHTTPS(ln net.Listener, limit int, reg prometheus.Registerer) (*connbound.Listener, error) {
	evicted := prometheus.NewCounter(prometheus.CounterOpts{Name: "relay_edge_https_pending_evicted_total",
		Help: "HTTPS port connections closed because MaxPendingHTTPS others were pending, or their source's share of them (the oldest goes)."})
	bl := connbound.NewListener(ln, connbound.Config{MaxPending: limit, Evicted: func(connbound.State, netip.Addr) { evicted.Inc() }})
	gauge := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "relay_edge_https_pending_connections",
		Help: "HTTPS port connections that are not a device session: in their TLS handshake, serving a request, idle between requests, or a WebSocket not yet admitted."},
		func() float64 { return float64(bl.Pending()) })
	for _, c := range []prometheus.Collector{gauge, evicted} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return bl, nil
}
