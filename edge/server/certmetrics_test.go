package server_test

import (
	"testing"
	"time"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/internal/relaytest"
)

// An edge reports the validity of its device certificate, its mesh
// certificate and the cluster CA, and how current its watch feed is.
func TestCertificateAndWatchMetrics(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{})
	e := r.Edges[0]
	start := time.Now()
	mfs, err := e.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	bounds := map[string][2]float64{} // certificate -> not before, expiry
	gauges := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			switch mf.GetName() {
			case "relay_edge_certificate_not_before_timestamp_seconds", "relay_edge_certificate_expiry_timestamp_seconds":
				cert := m.GetLabel()[0].GetValue()
				b := bounds[cert]
				if mf.GetName() == "relay_edge_certificate_expiry_timestamp_seconds" {
					b[1] = m.GetGauge().GetValue()
				} else {
					b[0] = m.GetGauge().GetValue()
				}
				bounds[cert] = b
			case "relay_edge_watch_revision", "relay_edge_watch_current_timestamp_seconds":
				gauges[mf.GetName()] = m.GetGauge().GetValue()
			}
		}
	}
	if len(bounds) != 3 {
		t.Fatalf("certificates reported: %v", bounds)
	}
	now := float64(start.Unix())
	if want := float64(e.CertHashes()[0].NotAfter.Unix()); bounds["device"][1] != want {
		t.Errorf("device certificate expires at %v, its published hash says %v", bounds["device"][1], want)
	}
	// The mesh certificate lives a day by default; the CA ten years.
	if b := bounds["mesh"]; b[0] > now || b[1] < now+23*3600 || b[1] > now+25*3600 {
		t.Errorf("mesh certificate valid %v..%v, now %v", b[0], b[1], now)
	}
	if b := bounds["cluster_ca"]; b[1]-b[0] < api.CAValidity.Seconds() {
		t.Errorf("cluster CA valid %v..%v, shorter than %v", b[0], b[1], api.CAValidity)
	}
	if gauges["relay_edge_watch_revision"] == 0 {
		t.Errorf("watch revision 0 on a synced edge")
	}
	if ts := gauges["relay_edge_watch_current_timestamp_seconds"]; ts > float64(time.Now().Unix())+1 || ts < now-60 {
		t.Errorf("watch feed confirmed at %v, now %v", ts, now)
	}
}
