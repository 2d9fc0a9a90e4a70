package raftnode

import (
	"sync"
	"time"

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
	for _, d := range []*prometheus.Desc{descFsync, descMailboxEntries, descMailboxBytes, descMailboxDevices, descMailboxPurging} {
		ch <- d
	}
}

func (c *diskCollector) Collect(ch chan<- prometheus.Metric) {
	if m, err := c.logs.FsyncLatency(descFsync); err == nil { // ErrClosed once stopped
		ch <- m
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

// scanMailboxes sums the mailboxes as an in-flight operation of the node,
// as ApplyLocal does: stop waits for it before it closes the state store.
func (c *diskCollector) scanMailboxes() (fsm.MailboxTotals, error) {
	n := c.n
	n.applyMu.Lock()
	if n.shutdown.Load() || n.fsm == nil {
		n.applyMu.Unlock()
		return fsm.MailboxTotals{}, ErrShutdown
	}
	n.applies.Add(1)
	n.applyMu.Unlock()
	defer n.applies.Done()
	t, err := n.fsm.MailboxTotals()
	if err != nil {
		n.log.Warn("metrics: sum mailboxes", "err", err)
	}
	return t, err
}
