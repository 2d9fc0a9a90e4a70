package server

import (
	"strings"
	"testing"
)

// Why an edge is not ready: the public reason is one of a few fixed
// words whatever the state holds (a registration error naming the
// control plane's URL, the peers it steps aside for), and the detail
// for the admin port says it all.
func TestReadinessReasons(t *testing.T) {
	const url = "https://control-0.relay.internal:7400"
	up := readiness{listening: true, synced: true, registered: true}
	for _, c := range []struct {
		name      string
		st        readiness
		reason    string
		detailHas []string
	}{
		{"ready", up, "", nil},
		{"before the listeners", readiness{}, notReadyStarting, []string{"listeners not up"}},
		{"shutting down", readiness{listening: false, stopping: true, synced: true, registered: true}, notReadyDraining, []string{"shutting down"}},
		{"feed not synced", readiness{listening: true}, notReadyStarting, []string{"watch feed not synced"}},
		{"not registered", readiness{listening: true, synced: true}, notReadyStarting, []string{"not registered"}},
		{"registration failed", readiness{listening: true, synced: true, regErr: "unavailable: dial " + url + ": connection refused"},
			notReadyStarting, []string{"not registered", url}},
		{"a device port down", readiness{listening: true, synced: true, registered: true, portDown: "quic port: accept: use of closed network connection"},
			notReadyPort, []string{"device port down", "quic port", "restart"}},
		{"stepping aside", readiness{listening: true, synced: true, registered: true, stepAsideFor: []string{"edge-b", "edge-c"}},
			notReadyControl, []string{"peer edges hear it", "edge-b, edge-c"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			reason, detail := c.st.why()
			if reason != c.reason {
				t.Errorf("public reason %q, want %q", reason, c.reason)
			}
			if (reason == "") != (detail == "") {
				t.Errorf("reason %q but detail %q", reason, detail)
			}
			for _, w := range c.detailHas {
				if !strings.Contains(detail, w) {
					t.Errorf("detail %q, want %q in it", detail, w)
				}
			}
		})
	}
}
