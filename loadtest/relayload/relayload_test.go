package main

import (
	"bytes"
	"context"
	"encoding/json"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/edge/session"
	"github.com/edge-relay/relay/internal/relaytest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		goleak.IgnoreTopFunction("github.com/cockroachdb/pebble/v2/internal/cache.(*shard).releaseLoop"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
	)
}

// The driver's scenarios against a real relay: each reports what it
// measured, and the figures are consistent with what was asked.
func TestScenarios(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
		cfg.AdminAddr = "127.0.0.1:0"
		cfg.Session.Limits = session.DefaultLimits()
		cfg.Session.Limits.EventsPerSecond = 1e6
	}})
	e := r.Edges[0]
	// The first run logs in with the password; the others use a token, as
	// repeated runs should (logins are throttled per account).
	token := r.Cluster.AdminToken()
	runs := 0
	getenv := func(k string) string {
		switch {
		case k == "RELAY_ADMIN_PASSWORD":
			return clustertest.AdminPassword
		case k == "RELAYCTL_TOKEN" && runs > 1:
			return token
		}
		return ""
	}
	common := []string{"--control", r.ControlURLs()[0], "--edge", e.Addr(), "--edge-admin", e.AdminURL(), "--json"}
	runScenario := func(args ...string) map[string]any {
		t.Helper()
		runs++
		var out, errOut bytes.Buffer
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := run(ctx, append(append([]string{}, common...), args...), &out, &errOut, getenv); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, errOut.String())
		}
		var res map[string]any
		if err := json.Unmarshal(out.Bytes(), &res); err != nil {
			t.Fatalf("%v printed %q: %v", args, out.String(), err)
		}
		return res
	}
	for _, tr := range []string{"quic", "webtransport"} {
		res := runScenario("--transport", tr, "rtt", "--count", "50")
		if res["round_trips"] != 50.0 || res["p50_us"].(float64) <= 0 || res["p99_us"].(float64) < res["p50_us"].(float64) {
			t.Fatalf("rtt over %s: %v", tr, res)
		}
	}
	res := runScenario("rate", "--pairs", "4", "--rate", "100", "--duration", "1s")
	if res["sent"] != 100.0 || res["acked"] != 100.0 || res["received"] != 100.0 {
		t.Fatalf("rate: %v", res)
	}
	res = runScenario("sessions", "--sessions", "20", "--hold", "10ms")
	if res["sessions"] != 20.0 || res["edge_heap_per_session_bytes"] == nil {
		t.Fatalf("sessions: %v", res)
	}
}
