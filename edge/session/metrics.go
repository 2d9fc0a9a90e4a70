package session

import (
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/edge-relay/relay/edge/devconn"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// Metrics are the session core's Prometheus metrics.
type Metrics struct {
	sessions      *prometheus.GaugeVec
	handshakes    *prometheus.CounterVec
	closes        *prometheus.CounterVec
	events        *prometheus.CounterVec
	rejects       *prometheus.CounterVec
	deliveries    *prometheus.CounterVec
	dropped       *prometheus.CounterVec
	undeliverable *prometheus.CounterVec
	proofs        *prometheus.CounterVec
	ackLatency    prometheus.Histogram
	handshakeTime prometheus.Histogram

	// The series the per-event path counts, looked up once.
	accepted, duplicate                  prometheus.Counter
	rejected                             map[relayv1.ErrorCode]prometheus.Counter // events_total by refusal code
	rejectsByCode                        map[relayv1.ErrorCode]prometheus.Counter
	deliveredDurable, deliveredEphemeral prometheus.Counter
	droppedQueueFull                     prometheus.Counter
	droppedRate, droppedNotEphemeral     prometheus.Counter
	droppedTooLarge                      prometheus.Counter
	tooLargeForward, tooLargeMailbox     prometheus.Counter
	paced                                prometheus.Counter
}

// NewMetrics creates the metrics and registers them with reg (nil: not
// registered, as in tests).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		sessions: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "relay_edge_sessions", Help: "Device sessions open on this edge, by transport.",
		}, []string{"transport"}),
		handshakes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_edge_handshakes_total", Help: "Handshakes by outcome: full, resumed, reauthenticated (a live session signed again at its maximum age), edge_full (refused at the session limit), going_away (refused by an edge that is not ready), or the protocol error code that ended them.",
		}, []string{"result"}),
		closes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_edge_session_closes_total", Help: "Sessions closed after the handshake, by reason code.",
		}, []string{"code"}),
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_edge_events_total", Help: "Events received from devices, once each, by what the edge did on arrival: accepted, duplicate, or the code it refused them with (an accepted event that fails later counts in relay_edge_rejects_total only).",
		}, []string{"result"}),
		rejects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_edge_rejects_total", Help: "Rejects sent to devices, by code: events refused on arrival, and accepted events that failed later (queue_full, target_offline, mailbox_full, internal, ...).",
		}, []string{"code"}),
		deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_edge_deliveries_total", Help: "Events queued to receiving devices on this edge.",
		}, []string{"kind"}),
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_edge_dropped_total", Help: "Ephemeral events dropped, by reason: queue_full (the receiver's queue was full), rate_limited (a datagram above the sender's rate), not_ephemeral (a datagram that did not carry an ephemeral event), too_large (relayed by an edge with a larger frame limit: see relay_edge_undeliverable_total).",
		}, []string{"reason"}),
		undeliverable: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_edge_undeliverable_total", Help: "Durable events this edge did not deliver because their Deliver frame would exceed the frame limit its devices read (max_frame_bytes plus 1 KiB): accepted by an edge with a larger limit. By source: forward (answered not delivered: the sending edge stores it in the mailbox) or mailbox (left there, skipped, until it expires or an edge with a larger limit delivers it). Edges of one cluster should share their limits.",
		}, []string{"source"}),
		proofs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_edge_handshake_proofs_total", Help: "Handshakes that passed (full and resumed), by transport and by whether the device's proof was bound to the TLS connection: binding tls_exporter (protocol version 2, the Go client) or none (version 1: browsers and older clients). With --cluster-tls-tickets a holder of a session key can pose as an edge to a device whose proofs are not bound, and pass them on (docs/protocol.md).",
		}, []string{"binding", "transport"}),
		ackLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "relay_edge_ack_seconds",
			Help:    "From an event's arrival at the edge to its sender's Ack (every target received it).",
			Buckets: prometheus.ExponentialBuckets(50e-6, 2, 16),
		}),
		paced: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "relay_edge_paced_seconds_total", Help: "Time the edge held back reading from devices that sent above their rate (a flooding device shows here, not as rejects).",
		}),
		handshakeTime: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "relay_edge_handshake_seconds",
			Help:    "From the first byte of a session to its Welcome.",
			Buckets: prometheus.ExponentialBuckets(100e-6, 2, 16),
		}),
	}
	if reg != nil {
		reg.MustRegister(m.sessions, m.handshakes, m.closes, m.events, m.rejects, m.deliveries, m.dropped, m.undeliverable, m.proofs, m.ackLatency, m.handshakeTime, m.paced)
	}
	m.accepted = m.events.WithLabelValues("accepted")
	m.duplicate = m.events.WithLabelValues("duplicate")
	m.rejected = make(map[relayv1.ErrorCode]prometheus.Counter, len(relayv1.ErrorCode_name))
	m.rejectsByCode = make(map[relayv1.ErrorCode]prometheus.Counter, len(relayv1.ErrorCode_name))
	for c := range relayv1.ErrorCode_name {
		code := relayv1.ErrorCode(c)
		m.rejected[code] = m.events.WithLabelValues(codeLabel(code))
		m.rejectsByCode[code] = m.rejects.WithLabelValues(codeLabel(code))
	}
	m.deliveredDurable = m.deliveries.WithLabelValues("durable")
	m.deliveredEphemeral = m.deliveries.WithLabelValues("ephemeral")
	m.droppedQueueFull = m.dropped.WithLabelValues("queue_full")
	m.droppedRate = m.dropped.WithLabelValues("rate_limited")
	m.droppedNotEphemeral = m.dropped.WithLabelValues("not_ephemeral")
	m.droppedTooLarge = m.dropped.WithLabelValues("too_large")
	// Every series from the start, so a dashboard shows 0 rather than
	// no data before the first handshake of each kind.
	for _, bound := range []bool{false, true} {
		for _, tr := range devconn.Transports() {
			m.proof(bound, tr)
		}
	}
	m.tooLargeForward = m.undeliverable.WithLabelValues("forward")
	m.tooLargeMailbox = m.undeliverable.WithLabelValues("mailbox")
	return m
}

// proof is the counter of passed handshakes whose proof was bound or not,
// on a transport.
func (m *Metrics) proof(bound bool, transport string) prometheus.Counter {
	binding := "none"
	if bound {
		binding = "tls_exporter"
	}
	return m.proofs.WithLabelValues(binding, transport)
}

// refuse counts an event refused on arrival with code: its result, and
// the Reject sent.
func (m *Metrics) refuse(code relayv1.ErrorCode) {
	if c, ok := m.rejected[code]; ok {
		c.Inc()
	} else {
		m.events.WithLabelValues(codeLabel(code)).Inc() // a code newer than this table
	}
	m.reject(code)
}

// reject counts a Reject sent with code (for an accepted event that
// failed later, only that: its arrival counted as accepted).
func (m *Metrics) reject(code relayv1.ErrorCode) {
	if c, ok := m.rejectsByCode[code]; ok {
		c.Inc()
		return
	}
	m.rejects.WithLabelValues(codeLabel(code)).Inc()
}

// codeLabel is a short, stable label for a protocol code.
func codeLabel(c relayv1.ErrorCode) string {
	if c == relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED {
		return "none"
	}
	return strings.ToLower(strings.TrimPrefix(c.String(), "ERROR_CODE_"))
}
