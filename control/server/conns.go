package server

import (
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"

	"github.com/edge-relay/relay/internal/connbound"
)

// DefaultMaxPendingAPIConns is Config.MaxPendingAPIConns's default.
// (Some 30-60 MiB at most: about 27 KiB of heap and stack for an idle
// TLS connection held by net/http, more for an HTTP/2 one.)
const DefaultMaxPendingAPIConns = 1024

// MaxAPIReceiveBuffer is the flow-control window the API port grants an
// HTTP/2 connection, and each of its streams: what request bodies a
// connection can make the node hold before a handler reads them.
// net/http's default, 1 MiB of each, let a client that gives the node no
// window of its own (the port has no write timeout: watch and backup
// streams live long) park 1 MiB on each of its connections, some 1 GiB
// at DefaultMaxPendingAPIConns. The window also paces a body that is
// read as it comes, to a window a round trip: the largest the API takes
// (api.Limits.MaxBulkMessage, 32 MiB, a peer's forwarded write) arrives
// within api.Limits.BodyTimeout (30 s) over round trips up to some
// 230 ms at 256 KiB, and an edge's mailbox batch (8 MiB at most) in 32
// round trips. Below it those would not fit, above it a pending
// connection holds more: 256 KiB, 256 MiB at the default bound.
const MaxAPIReceiveBuffer = 256 << 10

// DefaultMaxAPIConnsPerAccount is Config.MaxAPIConnsPerAccount's
// default: far more than relayctl or a script that reuses its
// connections needs, and a bound on what one account's holder can keep
// open.
const DefaultMaxAPIConnsPerAccount = 256

// DefaultMaxAPIConns is Config.MaxAPIConns's default.
const DefaultMaxAPIConns = 4096

// DefaultMaxTrustedAPIConns is Config.MaxTrustedAPIConns's default: an
// edge holds one HTTP/2 connection per control node (a few while it has
// more than 250 calls in flight), the other nodes one each.
const DefaultMaxTrustedAPIConns = 4096

// apiConnBounds are the API port's connection bounds (Config's fields of
// the same names).
type apiConnBounds struct {
	MaxPending, MaxPerAccount, Max, MaxTrusted int
}

// boundAPIConns bounds the API port's connections (connbound). Whoever
// reaches the port can open connections without an account, each
// holding a goroutine and buffers until the TLS handshake's or the idle
// timeout (10 s, 2 min) ends it: a flood at R connections a second held
// up to 120R of them. A connection stays pending until a call on it
// passed authentication and authorization (the Authenticator vouches for
// it): a flood of connections that never carry such a call pushes out
// only other pending ones, oldest first, those that never carried a
// request before those that did. Edges' and other nodes' connections are
// then trusted, bounded on their own, so that nobody else can cut an
// edge's watch stream; people's are bounded per account and in all, so
// that an account's holder cannot exhaust the node either.
func boundAPIConns(ln net.Listener, b apiConnBounds, reg prometheus.Registerer, log *slog.Logger) (net.Listener, error) {
	evicted := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "relay_control_api_connections_evicted_total",
		Help: "API port connections closed to keep a bound, by reason: pending (--max-pending-api-conns others had not yet carried a call that passed authentication, or their source's share of them), authenticated (people's: the account held --max-api-conns-per-account, or all accounts --max-api-conns), trusted (edges' and nodes': --max-trusted-api-conns)."},
		[]string{"reason"})
	reasons := map[connbound.State]string{connbound.Pending: "pending", connbound.Vouched: "authenticated", connbound.Trusted: "trusted"}
	logSome := rate.Sometimes{Interval: 10 * time.Second}
	bl := connbound.NewListener(ln, connbound.Config{MaxPending: b.MaxPending, MaxVouchedPerKey: b.MaxPerAccount, MaxVouched: b.Max,
		MaxTrusted: b.MaxTrusted,
		Evicted: func(from connbound.State, source netip.Addr) {
			evicted.WithLabelValues(reasons[from]).Inc()
			logSome.Do(func() {
				log.Warn("closed an API connection to stay within a bound (logged at most every 10s; relay_control_api_connections_evicted_total counts them all)",
					"reason", reasons[from], "source", source.String())
			})
		}})
	for _, r := range reasons {
		evicted.WithLabelValues(r)
	}
	gauge := func(name, help string, f func() int) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, func() float64 { return float64(f()) })
	}
	for _, c := range []prometheus.Collector{evicted,
		gauge("relay_control_api_pending_connections",
			"API port connections that have not yet carried a call that passed authentication: in their TLS handshake, logging in, idle or silent.", bl.Pending),
		gauge("relay_control_api_authenticated_connections",
			"API port connections of people (accounts other than edges) that carried a call that passed authentication.", bl.Vouched),
		gauge("relay_control_api_trusted_connections",
			"API port connections of edges and other control nodes.", bl.Trusted),
	} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return bl, nil
}
