package directory

import "github.com/prometheus/client_golang/prometheus"

// How far behind the control plane the edge's copy is. The control plane
// sends a progress message after every burst of changes and every few
// seconds when idle, so on a healthy feed the time since the last one
// stays within that interval; it grows while the feed is cut, stalled, or
// the edge works through a backlog (pages of changes carry no progress
// until the edge has caught up). The revision is compared with the
// control plane's relay_control_fsm_applied_index on dashboards.
var (
	descRevision = prometheus.NewDesc("relay_edge_watch_revision",
		"Last revision of the control plane's watch feed the edge applied completely.", nil, nil)
	descCurrent = prometheus.NewDesc("relay_edge_watch_current_timestamp_seconds",
		"When the control plane last confirmed the edge's copy complete (Unix time; a progress message or the end of a full copy). Absent until the first sync.", nil, nil)
)

// Collector returns the directory's metrics, read at scrape time.
func (d *Directory) Collector() prometheus.Collector { return collector{d} }

type collector struct{ d *Directory }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descRevision
	ch <- descCurrent
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	c.d.mu.RLock()
	rev, current := c.d.revision, c.d.current
	c.d.mu.RUnlock()
	ch <- prometheus.MustNewConstMetric(descRevision, prometheus.GaugeValue, float64(rev))
	if !current.IsZero() {
		ch <- prometheus.MustNewConstMetric(descCurrent, prometheus.GaugeValue, float64(current.UnixNano())/1e9)
	}
}
