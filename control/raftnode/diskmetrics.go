package raftnode

import (
	"sync"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/storage/raftlog"
)

var (
	descFsync = prometheus.NewDesc("relay_control_raft_log_fsync_seconds",
		"Latency of the fsyncs of the Raft log's write-ahead log: the durable step of every append (Pebble's measure).", nil, nil)
	descMailboxEntries = prometheus.NewDesc("relay_control_mailbox_entries",
		"Events stored in the mailboxes of offline devices (this replica's state).", nil, nil)
	descMailboxBytes = prometheus.NewDesc("relay_control_mailbox_bytes",
		"Event bytes stored in mailboxes (this replica's state).", nil, nil)
	descMailboxDevices = prometheus.NewDesc("relay_control_mailbox_devices",
		"Devices with at least one stored mailbox entry (this replica's state).", nil, nil)
	descPebbleMemory = prometheus.NewDesc("relay_control_pebble_memory_bytes",
		"Memory the node's Pebble stores hold as Pebble counts it, outside the Go heap: by db (state, log) and kind (memtables: memtables and large batches kept as such, zombies included; zombie_memtables: of them those kept only for open iterators, and one kept for reuse; block_cache).", []string{"db", "kind"}, nil)
	descMailboxPurging = prometheus.NewDesc("relay_control_mailbox_purging_devices",
		"Deleted or revoked devices whose mailboxes the leader is still emptying, a few thousand entries per command (this replica's state).", nil, nil)
)

// mailboxScanEvery bounds how often a scrape sums the mailboxes: the sum
// reads one record per device that ever had a mailbox.
const mailboxScanEvery = 10 * time.Second

// diskCollector reports what the node keeps on disk: the Raft log's fsync
// latency and the mailboxes' totals.
type diskCollector struct {
	n    *Node
	logs *raftlog.Store // captured: closeStores clears n.logs

	mu      sync.Mutex // guards the fields below
	totals  fsm.MailboxTotals
	scanned time.Time
}

func (c *diskCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descFsync, descPebbleMemory, descMailboxEntries, descMailboxBytes, descMailboxDevices, descMailboxPurging} {
		ch <- d
	}
}

func (c *diskCollector) Collect(ch chan<- prometheus.Metric) {
	if m, err := c.logs.FsyncLatency(descFsync); err == nil { // ErrClosed once stopped
		ch <- m
	}
	if m, err := c.logs.PebbleMetrics(); err == nil {
		pebbleMemory(ch, "log", m)
	}
	var sm *pebble.Metrics
	if c.withStores(func(n *Node) { sm = n.state.PebbleMetrics() }) == nil {
		pebbleMemory(ch, "state", sm)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if time.Since(c.scanned) >= mailboxScanEvery {
		t, err := c.scanMailboxes()
		if err != nil {
			return // stopping, or logged
		}
		c.totals, c.scanned = t, time.Now()
	}
	ch <- prometheus.MustNewConstMetric(descMailboxEntries, prometheus.GaugeValue, float64(c.totals.Entries))
	ch <- prometheus.MustNewConstMetric(descMailboxBytes, prometheus.GaugeValue, float64(c.totals.Bytes))
	ch <- prometheus.MustNewConstMetric(descMailboxDevices, prometheus.GaugeValue, float64(c.totals.Devices))
	ch <- prometheus.MustNewConstMetric(descMailboxPurging, prometheus.GaugeValue, float64(c.totals.Purging))
}

// pebbleMemory reports what a Pebble store holds in memory (outside the
// Go heap with cgo) as relay_control_pebble_memory_bytes.
func pebbleMemory(ch chan<- prometheus.Metric, db string, m *pebble.Metrics) {
	ch <- prometheus.MustNewConstMetric(descPebbleMemory, prometheus.GaugeValue, float64(m.MemTable.Size), db, "memtables")
	ch <- prometheus.MustNewConstMetric(descPebbleMemory, prometheus.GaugeValue, float64(zombieBytes(m)), db, "zombie_memtables")
	ch <- prometheus.MustNewConstMetric(descPebbleMemory, prometheus.GaugeValue, float64(m.BlockCache.Size), db, "block_cache")
}

// zombieBytes is Pebble's MemTable.ZombieSize, which it computes as the
// bytes reserved for memtables minus MemTable.Size: large batches queued
// as memtables count in the second only, so the difference wraps below
// zero while one is queued. Read as signed and kept at 0 or more; a large
// batch an iterator keeps after its flush is not counted at all.
func zombieBytes(m *pebble.Metrics) uint64 {
	return uint64(max(int64(m.MemTable.ZombieSize), 0))
}

// withStores runs fn as an in-flight operation of the node, as
// ApplyLocal does: stop waits for it before it closes the stores.
func (c *diskCollector) withStores(fn func(n *Node)) error {
	n := c.n
	n.applyMu.Lock()
	if n.shutdown.Load() || n.fsm == nil || n.state == nil {
		n.applyMu.Unlock()
		return ErrShutdown
	}
	n.applies.Add(1)
	n.applyMu.Unlock()
	defer n.applies.Done()
	fn(n)
	return nil
}

// scanMailboxes sums the mailboxes.
func (c *diskCollector) scanMailboxes() (t fsm.MailboxTotals, err error) {
	if serr := c.withStores(func(n *Node) { t, err = n.fsm.MailboxTotals() }); serr != nil {
		return t, serr
	}
	if err != nil {
		c.n.log.Warn("metrics: sum mailboxes", "err", err)
	}
	return t, err
}
