package raftnode

import (
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/edge-relay/relay/control/fsm"
)

// metrics are the node's Prometheus metrics. A nil registerer gives a
// metrics value whose observers do nothing.
type metrics struct {
	commit    prometheus.Histogram
	apply     prometheus.Histogram
	applied   prometheus.Counter
	read      prometheus.Histogram
	snapshots *prometheus.CounterVec
	snapTime  prometheus.Histogram
	restores  *prometheus.CounterVec
	refused   *prometheus.CounterVec
	ignored   *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer, n *Node) *metrics {
	if reg == nil {
		return &metrics{}
	}
	buckets := prometheus.ExponentialBuckets(0.0001, 2, 16) // 100us .. ~3.3s
	m := &metrics{
		commit: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "relay_control_raft_commit_seconds", Buckets: buckets,
			Help: "Time from proposing a command on the leader to its result (committed and applied).",
		}),
		apply: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "relay_control_fsm_apply_seconds", Buckets: buckets,
			Help: "Time the state machine took to apply one batch of entries.",
		}),
		applied: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "relay_control_fsm_applied_entries_total",
			Help: "Log entries applied by the state machine.",
		}),
		read: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "relay_control_read_barrier_seconds", Buckets: buckets,
			Help: "Time to establish a linearizable read (read index and wait for apply).",
		}),
		snapshots: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_control_snapshots_total",
			Help: "Snapshots persisted, by result.",
		}, []string{"result"}),
		snapTime: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "relay_control_snapshot_seconds", Buckets: prometheus.ExponentialBuckets(0.001, 2, 16),
			Help: "Time to persist one snapshot.",
		}),
	}
	m.restores = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "relay_control_snapshot_restores_total",
		Help: "State restored from a snapshot (installed from the leader, or a local one at start), by result.",
	}, []string{"result"})
	m.refused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "relay_control_raft_connections_refused_total",
		Help: "Raft connections refused by the cluster check, dialed or accepted, by reason: other_cluster (the peer's state belongs to another cluster), not_joined (this node joins and has not yet learnt its cluster), no_hello (a peer without the check where every member has it), bad_hello, busy (256 accepted connections were still in their hello or TLS handshake: the oldest was closed).",
	}, []string{"reason"})
	m.ignored = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "relay_control_features_ignored_total",
		Help: "Commands this node applied without a feature's fields because a node record did not list the feature (gated apply): written by a node whose replica had not yet seen a member's withdrawal. Every replica ignores them alike.",
	}, []string{"feature"})
	for _, f := range fsm.FeaturesGatedAtApply() {
		m.ignored.WithLabelValues(f)
	}
	// Every result exists from the start, so increase() sees the first
	// failure.
	for _, r := range []string{"ok", "error"} {
		m.snapshots.WithLabelValues(r)
		m.restores.WithLabelValues(r)
	}
	for _, r := range []string{"other_cluster", "not_joined", "no_hello", "bad_hello", "busy"} {
		m.refused.WithLabelValues(r)
	}
	reg.MustRegister(m.commit, m.apply, m.applied, m.read, m.snapshots, m.snapTime, m.restores, m.refused, m.ignored, &raftCollector{n: n}, &diskCollector{n: n, logs: n.logs})
	return m
}

func (m *metrics) observeIgnored(feature string) {
	if m.ignored != nil {
		m.ignored.WithLabelValues(feature).Inc()
	}
}

func (m *metrics) observeRefused(reason string) {
	if m.refused != nil {
		m.refused.WithLabelValues(reason).Inc()
	}
}

func (m *metrics) observeCommit(d time.Duration) {
	if m.commit != nil {
		m.commit.Observe(d.Seconds())
	}
}

func (m *metrics) observeApply(d time.Duration, entries int) {
	if m.apply != nil {
		m.apply.Observe(d.Seconds())
		m.applied.Add(float64(entries))
	}
}

func (m *metrics) observeRead(d time.Duration) {
	if m.read != nil {
		m.read.Observe(d.Seconds())
	}
}

func (m *metrics) observeSnapshot(d time.Duration, _ uint64, err error) {
	if m.snapshots == nil {
		return
	}
	if err != nil {
		m.snapshots.WithLabelValues("error").Inc()
		return
	}
	m.snapshots.WithLabelValues("ok").Inc()
	m.snapTime.Observe(d.Seconds())
}

func (m *metrics) observeRestore(_ time.Duration, err error) {
	if m.restores == nil {
		return
	}
	if err != nil {
		m.restores.WithLabelValues("error").Inc()
		return
	}
	m.restores.WithLabelValues("ok").Inc()
}

// raftCollector reads Raft's state at scrape time.
type raftCollector struct{ n *Node }

var (
	descState = prometheus.NewDesc("relay_control_raft_state",
		"1 for the Raft state this node is in.", []string{"state"}, nil)
	descTerm = prometheus.NewDesc("relay_control_raft_term",
		"Current Raft term.", nil, nil)
	descCommit = prometheus.NewDesc("relay_control_raft_commit_index",
		"Raft commit index known to this node.", nil, nil)
	descApplied = prometheus.NewDesc("relay_control_fsm_applied_index",
		"Index of the last entry the state machine applied.", nil, nil)
	descLeader = prometheus.NewDesc("relay_control_raft_has_leader",
		"1 when this node knows a leader.", nil, nil)
	descReady = prometheus.NewDesc("relay_control_ready",
		"1 when the node is ready (sees a leader and caught up at start).", nil, nil)
	descVoters = prometheus.NewDesc("relay_control_raft_voters",
		"Voters in the latest Raft configuration this node knows, running or not: what a quorum is counted against.", nil, nil)
	descVoter = prometheus.NewDesc("relay_control_raft_voter",
		"1 when this node is a voter in the latest Raft configuration it knows (0: joining, removed, or a non-voter).", nil, nil)
	descQueued = prometheus.NewDesc("relay_control_fsm_queued_bytes",
		"Bytes of committed entries Raft handed to the state machine that it has not applied yet (on a follower bounded by the node's MaxUnappliedBytes, 256 MiB by default).", nil, nil)
	descStoreWait = prometheus.NewDesc("relay_control_raft_store_wait_seconds_total",
		"Time Raft waited to store entries because the state machine's queue was over its bound: the state machine applies more slowly than the log stores.", nil, nil)
)

func (c *raftCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descState, descTerm, descCommit, descApplied, descLeader, descReady, descVoters, descVoter, descQueued, descStoreWait} {
		ch <- d
	}
}

func (c *raftCollector) Collect(ch chan<- prometheus.Metric) {
	n := c.n
	if n.raft == nil || n.shutdown.Load() {
		return
	}
	cur := n.raft.State()
	for _, s := range []raft.RaftState{raft.Follower, raft.Candidate, raft.Leader, raft.Shutdown} {
		v := 0.0
		if s == cur {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(descState, prometheus.GaugeValue, v, s.String())
	}
	ch <- prometheus.MustNewConstMetric(descTerm, prometheus.GaugeValue, float64(n.currentTerm()))
	ch <- prometheus.MustNewConstMetric(descCommit, prometheus.GaugeValue, float64(n.commitIndex()))
	ch <- prometheus.MustNewConstMetric(descApplied, prometheus.GaugeValue, float64(n.fsm.AppliedIndex()))
	held, _, waited := n.gate.stats()
	ch <- prometheus.MustNewConstMetric(descQueued, prometheus.GaugeValue, float64(held))
	ch <- prometheus.MustNewConstMetric(descStoreWait, prometheus.CounterValue, waited.Seconds())
	b2f := func(b bool) float64 {
		if b {
			return 1
		}
		return 0
	}
	lid, _ := n.Leader()
	ch <- prometheus.MustNewConstMetric(descLeader, prometheus.GaugeValue, b2f(lid != ""))
	ch <- prometheus.MustNewConstMetric(descReady, prometheus.GaugeValue, b2f(n.Ready()))
	// GetConfiguration answers from Raft's copy of the latest
	// configuration, without a trip through its main loop.
	if cf := n.raft.GetConfiguration(); cf.Error() == nil {
		voters, self := 0, false
		for _, s := range cf.Configuration().Servers {
			if s.Suffrage == raft.Voter {
				voters++
				self = self || string(s.ID) == n.cfg.NodeID
			}
		}
		ch <- prometheus.MustNewConstMetric(descVoters, prometheus.GaugeValue, float64(voters))
		ch <- prometheus.MustNewConstMetric(descVoter, prometheus.GaugeValue, b2f(self))
	}
}
