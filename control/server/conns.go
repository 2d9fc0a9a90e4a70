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

// DefaultMaxAPIConnsPerSource is Config.MaxAPIConnsPerSource's default:
// far more than relayctl or a script that reuses its connections needs,
// and a bound on what one host holding an account can keep open.
const DefaultMaxAPIConnsPerSource = 256

// DefaultMaxAPIConns is Config.MaxAPIConns's default.
const DefaultMaxAPIConns = 4096

// apiConnBounds are the API port's connection bounds (Config's fields of
// the same names).
type apiConnBounds struct {
	MaxPending, MaxPerSource, Max int
}

// boundAPIConns bounds the API port's connections (connbound). Whoever
// reaches the port can open connections without an account, each
// holding a goroutine and buffers until the TLS handshake's or the idle
// timeout (10 s, 2 min) ends it: a flood at R connections a second held
// up to 120R of them. A connection stays pending until a call on it
// presents a token or client certificate that verifies (api's Guard
// vouches for it): a flood of silent or idle connections pushes out only
// other pending ones, oldest first. Edges' and other nodes' connections
// are then trusted: never closed to make room, so that nobody who shares
// an edge's address can cut its watch stream. People's are bounded per
// source and in all, so that an account's holder cannot exhaust the
// node either.
func boundAPIConns(ln net.Listener, b apiConnBounds, reg prometheus.Registerer, log *slog.Logger) (net.Listener, error) {
	evicted := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "relay_control_api_connections_evicted_total",
		Help: "API port connections closed to keep a bound, by reason: pending (--max-pending-api-conns others had not yet carried a call whose credentials verified, or their source's share of them), authenticated (the source held --max-api-conns-per-source connections that had, or all sources --max-api-conns)."},
		[]string{"reason"})
	logSome := rate.Sometimes{Interval: 10 * time.Second}
	bl := connbound.NewListener(ln, connbound.Config{MaxPending: b.MaxPending, MaxVouchedPerSource: b.MaxPerSource, MaxVouched: b.Max,
		Evicted: func(vouched bool, source netip.Addr) {
			reason := "pending"
			if vouched {
				reason = "authenticated"
			}
			evicted.WithLabelValues(reason).Inc()
			logSome.Do(func() {
				log.Warn("closed an API connection to stay within a bound (logged at most every 10s; relay_control_api_connections_evicted_total counts them all)",
					"reason", reason, "source", source.String())
			})
		}})
	for _, reason := range []string{"pending", "authenticated"} {
		evicted.WithLabelValues(reason)
	}
	gauge := func(name, help string, f func() int) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, func() float64 { return float64(f()) })
	}
	for _, c := range []prometheus.Collector{evicted,
		gauge("relay_control_api_pending_connections",
			"API port connections that have not yet carried a call whose credentials verified: in their TLS handshake, logging in, idle or silent.", bl.Pending),
		gauge("relay_control_api_authenticated_connections",
			"API port connections of accounts other than edges that carried a call whose credentials verified (edges' and nodes' are not counted).", bl.Vouched),
	} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return bl, nil
}
