package directory

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
)

func watchMetrics(t *testing.T, d *Directory) map[string]float64 {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(d.Collector())
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		out[mf.GetName()] = mf.GetMetric()[0].GetGauge().GetValue()
	}
	return out
}

// The revision follows the feed; the confirmation time appears with the
// end of the first full copy, moves with progress messages and stays put
// while a new full copy is under way.
func TestWatchMetrics(t *testing.T) {
	d := New(Config{})
	if m := watchMetrics(t, d); m["relay_edge_watch_revision"] != 0 || len(m) != 1 {
		t.Fatalf("before any message: %v", m)
	}
	start := time.Now()
	d.Apply(&edgev1.WatchResponse{Revision: 7, Kind: &edgev1.WatchResponse_Resync{Resync: &edgev1.Resync{}}})
	if m := watchMetrics(t, d); len(m) != 1 {
		t.Fatalf("during the first full copy: %v", m)
	}
	d.Apply(&edgev1.WatchResponse{Revision: 7, Kind: &edgev1.WatchResponse_SnapshotDone{SnapshotDone: &edgev1.SnapshotDone{}}})
	m := watchMetrics(t, d)
	synced := m["relay_edge_watch_current_timestamp_seconds"]
	if m["relay_edge_watch_revision"] != 7 || synced < float64(start.UnixNano())/1e9 || synced > float64(time.Now().UnixNano())/1e9 {
		t.Fatalf("after the full copy: %v (started at %v)", m, start)
	}
	d.Apply(&edgev1.WatchResponse{Revision: 9, Kind: &edgev1.WatchResponse_Event{Event: &edgev1.WatchEvent{Kind: &edgev1.WatchEvent_UserDeleted{UserDeleted: "u"}}}})
	if m := watchMetrics(t, d); m["relay_edge_watch_revision"] != 8 || m["relay_edge_watch_current_timestamp_seconds"] != synced {
		t.Fatalf("after an event of revision 9: %v", m)
	}
	for time.Now().Equal(time.Unix(0, int64(synced*1e9))) {
		time.Sleep(time.Microsecond) // let the clock move
	}
	d.Apply(&edgev1.WatchResponse{Revision: 9, Kind: &edgev1.WatchResponse_Progress{Progress: &edgev1.Progress{}}})
	m = watchMetrics(t, d)
	progressed := m["relay_edge_watch_current_timestamp_seconds"]
	if m["relay_edge_watch_revision"] != 9 || progressed <= synced {
		t.Fatalf("after progress: %v (synced at %v)", m, synced)
	}
	d.Apply(&edgev1.WatchResponse{Revision: 20, Kind: &edgev1.WatchResponse_Resync{Resync: &edgev1.Resync{}}})
	d.Apply(&edgev1.WatchResponse{Revision: 20, Kind: &edgev1.WatchResponse_Progress{Progress: &edgev1.Progress{}}})
	if m := watchMetrics(t, d); m["relay_edge_watch_current_timestamp_seconds"] != progressed {
		t.Fatalf("progress during a full copy moved the confirmation: %v", m)
	}
}
