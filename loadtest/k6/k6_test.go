// Package k6 holds the relay's k6 suite (TypeScript in src/, bundles in
// dist/) and the tests that run every bundle against a live relay in a
// k6-like runtime (sim_test.go), so the scripts are proven without k6.
package k6

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

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

// hashFiles is build.mjs's hashFiles: files by path and content.
func hashFiles(t *testing.T, files []string) string {
	t.Helper()
	files = slices.Sorted(slices.Values(files))
	h := sha256.New()
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(b)
		_, _ = io.WriteString(h, f+"\n"+hex.EncodeToString(sum[:])+"\n")
	}
	return hex.EncodeToString(h.Sum(nil))
}

func walk(t *testing.T, dir string, keep func(string) bool) []string {
	t.Helper()
	var files []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && keep(p) {
			files = append(files, filepath.ToSlash(p))
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

func all(string) bool { return true }

// The committed bundles are built from the committed sources: run
// `make k6` after changing anything under loadtest/k6/src or the device
// protocol's proto. A hand edit of dist/ fails too.
func TestBundlesAreFresh(t *testing.T) {
	stamp, err := os.ReadFile("dist/SOURCES.sha256")
	if err != nil {
		t.Fatal(err)
	}
	sources := walk(t, "src", all)
	sources = append(sources, walk(t, "../../proto/relay/v1", func(p string) bool { return strings.HasSuffix(p, ".proto") })...)
	sources = append(sources, "build.mjs", "package-lock.json", "tsconfig.json")
	bundles := walk(t, "dist", func(p string) bool { return strings.HasSuffix(p, ".js") })
	want := fmt.Sprintf("sources %s\nbundle %s\n", hashFiles(t, sources), hashFiles(t, bundles))
	if string(stamp) != want {
		t.Fatalf("loadtest/k6/dist is stale: its stamp says\n%swhat is committed hashes to\n%srun make k6", stamp, want)
	}
	// Every scenario has its bundle.
	for _, src := range walk(t, "src/scenarios", all) {
		js := "dist/" + strings.TrimSuffix(filepath.Base(src), ".ts") + ".js"
		if !slices.Contains(bundles, js) {
			t.Errorf("%s has no bundle %s", src, js)
		}
	}
}

// testRelay starts a control node and an edge that admit the scripts'
// handshake rate from one address.
func testRelay(t testing.TB) *relaytest.Relay {
	return relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
		cfg.AdminAddr = "127.0.0.1:0"
		cfg.Session.HandshakesPerSecond, cfg.Session.HandshakeBurst = 1e6, 1e6
		cfg.Session.Limits = session.DefaultLimits()
		cfg.Session.Limits.EventsPerSecond = 1e6
	}})
}

func wsURL(e *server.Server) string {
	return "wss://" + strings.TrimPrefix(e.HTTPSURL(), "https://") + "/relay/v1/ws"
}

func runScenario(t testing.TB, r *relaytest.Relay, edgeURL, bundle string, vus, iterations int, env map[string]string) *simResult {
	t.Helper()
	dir := t.TempDir()
	e := map[string]string{
		"CONTROL_URL":  r.ControlURLs()[0],
		"EDGE_URL":     edgeURL,
		"RELAY_TOKEN":  r.Cluster.AdminToken(),
		"SUMMARY_JSON": "summary.json",
	}
	for k, v := range env {
		e[k] = v
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, err := runBundle(ctx, simRun{
		Bundle: filepath.Join("dist", bundle+".js"), Env: e, VUs: vus, Iterations: iterations,
		IterationTimeout: time.Minute, Dir: dir, Log: t.Logf,
	})
	if err != nil {
		t.Fatalf("%s: %v", bundle, err)
	}
	return res
}

// summaryOf reads the JSON handleSummary wrote for CI.
func summaryOf(t *testing.T, res *simResult) map[string]any {
	t.Helper()
	var s map[string]any
	if err := json.Unmarshal([]byte(res.Files["summary.json"]), &s); err != nil {
		t.Fatalf("summary.json: %v\n%s", err, res.Files["summary.json"])
	}
	return s
}

// Every bundled scenario, a few bounded iterations against a live relay:
// the scripts' own checks and thresholds must pass, and what they count
// must add up.
func TestScenarios(t *testing.T) {
	r := testRelay(t)
	edge := wsURL(r.Edges[0])
	// Thresholds on time are kept (so they are evaluated) but made wide:
	// a test asserts what the scripts count, not how fast a busy machine is.
	wide := map[string]string{"ACK_P95_MS": "10000", "ACK_P99_MS": "10000", "CALL_P95_MS": "10000", "STORM_MAX_BACK_MS": "120000"}
	small := map[string]string{"VUS": "1", "EVENTS": "5", "EVENT_RATE": "100"}
	cases := []struct {
		bundle     string
		vus, iters int
		env        map[string]string
		want       func(t *testing.T, res *simResult)
	}{
		{"smoke", 1, 2, map[string]string{"VUS": "1", "EVENTS": "10", "EVENT_RATE": "100"}, func(t *testing.T, res *simResult) {
			// 2 iterations x 2 devices x 10 events, each acked and delivered.
			if got := res.Metrics["relay_events_sent"]["count"]; got != 40 {
				t.Errorf("sent %v events, want 40", got)
			}
			if got := res.Metrics["relay_events_received"]["count"]; got != 40 {
				t.Errorf("received %v events, want 40", got)
			}
			// The second iteration resumed on the first one's tickets.
			if got := res.Metrics["relay_session_resumed"]["passes"]; got != 2 {
				t.Errorf("%v resumed sessions, want 2", got)
			}
		}},
		{"average", 1, 1, small, nil},
		{"stress", 1, 1, small, nil},
		{"spike", 1, 1, small, nil},
		{"soak", 1, 1, small, nil},
		{"breakpoint", 1, 1, small, nil},
		{"storm", 2, 1, map[string]string{"DEVICES": "4", "STORM_RAMP_MS": "2000"}, func(t *testing.T, res *simResult) {
			if got := res.Metrics["relay_storm_resumed"]; got["passes"] != 4 || got["fails"] != 0 {
				t.Errorf("storm: resumed %v", got)
			}
		}},
		{"control", 1, 3, map[string]string{"VUS": "1"}, func(t *testing.T, res *simResult) {
			if c := res.Checks["the new device is listed"]; c[0] != 3 {
				t.Errorf("listed checks %v, want 3 passes", c)
			}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.bundle, func(t *testing.T) {
			env := maps.Clone(wide)
			maps.Copy(env, tc.env)
			res := runScenario(t, r, edge, tc.bundle, tc.vus, tc.iters, env)
			t.Logf("%s", res.Stdout)
			if !res.Passed() {
				t.Fatalf("%s failed: errors %v, checks %v, thresholds %v", tc.bundle, res.Errors, res.Checks, res.Thresholds)
			}
			if len(res.Checks) == 0 || len(res.Thresholds) == 0 {
				t.Fatalf("%s ran no check or threshold: %v %v", tc.bundle, res.Checks, res.Thresholds)
			}
			s := summaryOf(t, res)
			if s["thresholdsOk"] != true || s["checksOk"] != true || s["scenario"] != tc.bundle {
				t.Fatalf("summary.json says %v", s)
			}
			if tc.want != nil {
				tc.want(t, res)
			}
		})
	}
}

// A scenario pointed at an edge that is down fails: its handshakes fail,
// its checks fail, its thresholds fail, and the JSON for CI says so.
func TestStoppedEdgeFails(t *testing.T) {
	r := testRelay(t)
	edge := wsURL(r.Edges[0])
	r.StopEdge(0)
	res := runScenario(t, r, edge, "smoke", 1, 1, map[string]string{"EVENTS": "3"})
	if res.Passed() {
		t.Fatalf("a run against a stopped edge passed: %v %v", res.Checks, res.Thresholds)
	}
	if c := res.Checks["every device's session is up"]; c[1] != 1 {
		t.Errorf("session check: %v", c)
	}
	if ok, seen := res.Thresholds["relay_handshake_failed: rate<0.01"]; !seen || ok {
		t.Errorf("handshake threshold: %v (seen %v)", ok, seen)
	}
	if s := summaryOf(t, res); s["thresholdsOk"] != false || s["checksOk"] != false {
		t.Errorf("summary.json says %v", s)
	}
	if !strings.Contains(res.Stdout, "thresholds FAILED") {
		t.Errorf("stdout summary: %s", res.Stdout)
	}
}

// The adapter offers what k6 offers and nothing more: a script that
// imports an unknown module or export, or uses a browser or Node global,
// fails.
func TestAdapterRefusesWhatK6DoesNotOffer(t *testing.T) {
	cases := map[string]string{
		"unknown module":     `import x from "k6/experimental/nope"; export default function () {}`,
		"unknown export":     `import { nope } from "k6"; export default function () {}`,
		"node module":        `import fs from "fs"; export default function () {}`,
		"Node's Buffer":      `export default function () { Buffer.from("x"); }`,
		"Node's process":     `export default function () { process.env.X; }`,
		"a browser's window": `export default function () { window.location; }`,
		"a browser's fetch":  `export default async function () { await fetch("http://127.0.0.1:1/"); }`,
	}
	for name, src := range cases {
		t.Run(name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "script.js")
			if err := os.WriteFile(p, []byte(src), 0o644); err != nil {
				t.Fatal(err)
			}
			res, err := runBundle(context.Background(), simRun{Bundle: p, VUs: 1, Iterations: 1, IterationTimeout: 10 * time.Second, Dir: t.TempDir()})
			if err == nil && res.Passed() {
				t.Fatalf("ran: %+v", res)
			}
			t.Logf("refused: %v %v", err, res)
		})
	}
	// And what it offers works: the same globals and modules k6 has.
	p := filepath.Join(t.TempDir(), "ok.js")
	src := `import { check } from "k6"; import { setTimeout } from "k6/timers"; import { sha256 } from "k6/crypto";
	import encoding from "k6/encoding"; import exec from "k6/execution";
	export const options = { thresholds: { checks: ["rate==1"] } };
	export default async function () {
		await new Promise((r) => setTimeout(r, 5));
		check(null, { "hash": () => sha256("abc", "hex").startsWith("ba7816bf"),
			"b64": () => encoding.b64encode("hi") === "aGk=", "vu": () => exec.vu.idInTest === __VU && __ITER === 0,
			"env": () => __ENV.X === "y" });
	}`
	if err := os.WriteFile(p, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	res, err := runBundle(context.Background(), simRun{Bundle: p, Env: map[string]string{"X": "y"}, VUs: 1, Iterations: 1, IterationTimeout: 10 * time.Second, Dir: t.TempDir()})
	if err != nil || !res.Passed() {
		t.Fatalf("%v %+v", err, res)
	}
}

// BenchmarkWebSocketEvents: the average scenario's sessions (two devices
// a user, each sending acknowledged events to the other at EVENT_RATE)
// over the edge's WebSocket, driven by the k6 script in the test
// runtime, K6_VUS users at once. It reports the acknowledged events per
// second and the ack latency's p99 as the script measured them (the
// runtime, one goroutine a VU, shares the cores with the relay).
//
//	K6_VUS=20 EVENT_RATE=50 go test -run '^$' -bench WebSocketEvents -benchtime 1x ./loadtest/k6/
func BenchmarkWebSocketEvents(b *testing.B) {
	vus := os.Getenv("K6_VUS")
	if vus == "" {
		vus = "10"
	}
	rate := os.Getenv("EVENT_RATE")
	if rate == "" {
		rate = "50"
	}
	n := 0
	_, _ = fmt.Sscan(vus, &n)
	r := testRelay(b)
	for b.Loop() {
		cpu0 := cpuTime()
		res := runScenario(b, r, wsURL(r.Edges[0]), "average", n, 1, map[string]string{
			"VUS": vus, "EVENT_RATE": rate, "EVENTS": os.Getenv("EVENTS"), "ACK_P95_MS": "1e9", "ACK_P99_MS": "1e9",
		})
		acked := res.Metrics["relay_event_failed"]["fails"]
		secs := res.Metrics["iteration_duration"]["max"] / 1e3
		b.ReportMetric(acked/secs, "acked/s")
		b.ReportMetric(res.Metrics["relay_ack_latency"]["p(99)"], "ack-p99-ms")
		b.ReportMetric(res.Metrics["relay_ack_latency"]["med"], "ack-p50-ms")
		b.ReportMetric(res.Metrics["relay_event_failed"]["rate"], "error-rate")
		// CPU of the whole process (script runtime, edge, control node)
		// per acknowledged event: what the figure costs, however busy the
		// machine is.
		b.ReportMetric((cpuTime()-cpu0).Seconds()*1e3/acked, "cpu-ms/event")
	}
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
