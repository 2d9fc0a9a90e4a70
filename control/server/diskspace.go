package server

import (
	"log/slog"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// diskSpace reports, at every scrape, the space of the filesystems that
// hold the node's directories: a control node whose data disk fills up
// stops (Pebble cannot write its log), so operators are warned before.
type diskSpace struct {
	dirs        []diskDir
	avail, size *prometheus.Desc
	log         *slog.Logger
	warned      sync.Map // dir label -> struct{}: a failing statfs is logged once
}

// diskDir is a directory and the value of its "dir" label.
type diskDir struct{ label, path string }

func newDiskSpace(log *slog.Logger, dirs ...diskDir) *diskSpace {
	return &diskSpace{
		dirs: dirs,
		avail: prometheus.NewDesc("relay_control_disk_avail_bytes",
			"Bytes available to the node (free ones, less those reserved for root) on the filesystem of one of its directories: data (state and Raft log) or backups.",
			[]string{"dir"}, nil),
		size: prometheus.NewDesc("relay_control_disk_size_bytes",
			"Size in bytes of the filesystem of one of the node's directories: data or backups.",
			[]string{"dir"}, nil),
		log: log,
	}
}

// Describe implements prometheus.Collector.
func (d *diskSpace) Describe(ch chan<- *prometheus.Desc) {
	ch <- d.avail
	ch <- d.size
}

// Collect implements prometheus.Collector. A directory whose filesystem
// cannot be read is left out of the scrape (and logged once), rather than
// failing the whole scrape.
func (d *diskSpace) Collect(ch chan<- prometheus.Metric) {
	for _, dir := range d.dirs {
		avail, size, err := statDisk(dir.path)
		if err != nil {
			if _, logged := d.warned.LoadOrStore(dir.label, struct{}{}); !logged {
				d.log.Warn("cannot read the space of a directory's filesystem; relay_control_disk_* leave it out", "dir", dir.path, "err", err)
			}
			continue
		}
		ch <- prometheus.MustNewConstMetric(d.avail, prometheus.GaugeValue, float64(avail), dir.label)
		ch <- prometheus.MustNewConstMetric(d.size, prometheus.GaugeValue, float64(size), dir.label)
	}
}
