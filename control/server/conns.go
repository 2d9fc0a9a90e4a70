package server

import (
	"net"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/edge-relay/relay/internal/connbound"
)

// DefaultMaxPendingAPIConns is Config.MaxPendingAPIConns's default.
// (Some 30 MiB at most: about 27 KiB of heap and stack for an idle TLS
// connection held by net/http.)
const DefaultMaxPendingAPIConns = 1024

// DefaultMaxAPIConnsPerSource is Config.MaxAPIConnsPerSource's default:
// far more than an edge (one HTTP/2 connection per control node, a few
// when it has more than 250 calls in flight) or relayctl needs, and a
// bound on what one host holding an account can keep open.
const DefaultMaxAPIConnsPerSource = 256

// boundAPIConns bounds the API port's connections (connbound). Whoever
// reaches the port can open connections without an account, each
// holding a goroutine and buffers until the TLS handshake's or the idle
// timeout (10 s, 2 min) ends it: a flood at R connections a second held
// up to 120R of them. A connection stays pending until a call on it
// presents credentials that verify (api's Guard vouches for it); edges'
// watch streams and relayctl's calls do that on their first request, so
// a flood of silent or idle connections pushes out only other pending
// ones, oldest first. Vouched connections are bounded per source, so
// that an account's holder cannot keep open more than perSource from one
// host either.
func boundAPIConns(ln net.Listener, pending, perSource int, reg prometheus.Registerer) (net.Listener, error) {
	evicted := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "relay_control_api_connections_evicted_total",
		Help: "API port connections closed to keep a bound, by reason: pending (MaxPendingAPIConns others had not yet carried a verified call, or their source's share of them), per_source (the source held MaxAPIConnsPerSource connections that had)."},
		[]string{"reason"})
	bl := connbound.NewListener(ln, connbound.Config{MaxPending: pending, MaxVouchedPerSource: perSource,
		Evicted: func(vouched bool) {
			if vouched {
				evicted.WithLabelValues("per_source").Inc()
			} else {
				evicted.WithLabelValues("pending").Inc()
			}
		}})
	for _, reason := range []string{"pending", "per_source"} {
		evicted.WithLabelValues(reason)
	}
	gauge := func(name, help string, f func() int) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, func() float64 { return float64(f()) })
	}
	for _, c := range []prometheus.Collector{evicted,
		gauge("relay_control_api_pending_connections",
			"API port connections that have not yet carried a call whose credentials verified: in their TLS handshake, logging in, idle or silent.", bl.Pending),
		gauge("relay_control_api_authenticated_connections",
			"API port connections that carried a call whose credentials verified.", bl.Vouched),
	} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return bl, nil
}
