package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"image/png"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
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

type driverEnv struct {
	t      *testing.T
	r      *relaytest.Relay
	common []string
	getenv func(string) string
}

func newDriverEnv(t *testing.T) *driverEnv {
	r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
		cfg.AdminAddr = "127.0.0.1:0"
		cfg.ClusterTLSTickets = true // resume --other-edge counts TLS resumptions across edges
		cfg.Session.HandshakesPerSecond, cfg.Session.HandshakeBurst = 1e6, 1e6
		cfg.Session.Limits = session.DefaultLimits()
		cfg.Session.Limits.EventsPerSecond = 1e6
		// What relayd registers: the Go runtime's and the process's gauges.
		cfg.Registry = prometheus.NewRegistry()
		cfg.Registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}})
	e := r.Edges[0]
	// Repeated runs use a token, as they should (logins are throttled per
	// account); TestScenarios logs in with the password once.
	token := r.Cluster.AdminToken()
	return &driverEnv{t: t, r: r,
		common: []string{"--control", r.ControlURLs()[0], "--edge", e.Addr(), "--edge-admin", e.AdminURL(), "--json", "--progress", "50ms"},
		getenv: func(k string) string {
			if k == "RELAYCTL_TOKEN" {
				return token
			}
			return ""
		}}
}

// run runs relayload with args; err is what run returned.
func (e *driverEnv) run(args ...string) (map[string]any, string, error) {
	e.t.Helper()
	var out, errOut bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	err := run(ctx, append(append([]string{}, e.common...), args...), &out, &errOut, e.getenv)
	if err != nil && !errors.Is(err, errThresholds) {
		e.t.Fatalf("%v: %v\n%s", args, err, errOut.String())
	}
	var res map[string]any
	if jerr := json.Unmarshal(out.Bytes(), &res); jerr != nil {
		e.t.Fatalf("%v printed %q: %v", args, out.String(), jerr)
	}
	return res, errOut.String(), err
}

func (e *driverEnv) mustRun(args ...string) map[string]any {
	e.t.Helper()
	res, _, err := e.run(args...)
	if err != nil {
		e.t.Fatalf("%v: %v", args, err)
	}
	return res
}

func num(m map[string]any, section, key string) float64 {
	s, _ := m[section].(map[string]any)
	f, _ := s[key].(float64)
	return f
}

// The driver's scenarios against a real relay: each reports what it
// measured, and the figures are consistent with what was asked.
func TestScenarios(t *testing.T) {
	e := newDriverEnv(t)
	// The first run logs in with the password.
	pw := e.getenv
	e.getenv = func(k string) string {
		if k == "RELAY_ADMIN_PASSWORD" {
			return clustertest.AdminPassword
		}
		return ""
	}
	res := e.mustRun("--transport", "quic", "rtt", "--count", "50")
	e.getenv = pw
	if num(res, "counts", "round_trips") != 50 || num(res, "figures", "rtt_p50_ms") <= 0 || num(res, "figures", "rtt_p99_ms") < num(res, "figures", "rtt_p50_ms") {
		t.Fatalf("rtt over quic: %v", res)
	}
	res = e.mustRun("--transport", "webtransport", "rtt", "--count", "50")
	if res["transport"] != "webtransport" || num(res, "counts", "round_trips") != 50 {
		t.Fatalf("rtt over webtransport: %v", res)
	}

	res, stderr, err := e.run("--threshold", "ack_p99_ms<60000", "--threshold", "error_rate<=0", "--threshold", "drop_rate<=0", "rate", "--pairs", "4", "--rate", "100", "--duration", "1s")
	if err != nil || num(res, "counts", "attempts") != 100 || num(res, "counts", "acked") != 100 || num(res, "counts", "received") != 100 {
		t.Fatalf("rate: %v %v", err, res)
	}
	if th, _ := res["thresholds"].(map[string]any); th["ack_p99_ms<60000"] != true || th["error_rate<=0"] != true || th["drop_rate<=0"] != true {
		t.Fatalf("rate thresholds: %v", res["thresholds"])
	}
	if !strings.Contains(stderr, "acked=") {
		t.Errorf("no progress line on stderr: %q", stderr)
	}
	// Open loop faster than one event's round trip, with one outstanding
	// event allowed: the turns that find it still waiting are dropped,
	// not queued, and every attempt is accounted for.
	res = e.mustRun("rate", "--pairs", "1", "--rate", "5000", "--duration", "400ms", "--max-outstanding", "1")
	if att, acked, dropped := num(res, "counts", "attempts"), num(res, "counts", "acked"), num(res, "counts", "dropped"); att != 2000 || acked < 1 || dropped < 1 ||
		acked+dropped+num(res, "counts", "failed") != att {
		t.Fatalf("rate with one outstanding event: %v", res)
	}
	if err := run(context.Background(), append(append([]string{}, e.common...), "rate", "--max-outstanding", "0"), io.Discard, io.Discard, e.getenv); err == nil || !strings.Contains(err.Error(), "--max-outstanding") {
		t.Fatalf("--max-outstanding 0: %v", err)
	}

	// Steps of 50, 100 and 150 events/s, each held (the limit is wide):
	// the sustained rate is the last.
	res = e.mustRun("breakpoint", "--pairs", "2", "--start", "50", "--step", "50", "--max-rate", "150", "--step-duration", "400ms", "--p99", "1m")
	if steps, _ := res["steps"].([]any); len(steps) != 3 || num(res, "peaks", "sustained_rate") != 150 || num(res, "counts", "acked") != 20+40+60 {
		t.Fatalf("breakpoint: %v", res)
	}
	// A limit nothing meets breaks at the first step.
	res = e.mustRun("breakpoint", "--pairs", "2", "--start", "50", "--step", "50", "--step-duration", "200ms", "--p99", "1ns")
	if num(res, "peaks", "first_broken_rate") != 50 || num(res, "peaks", "sustained_rate") != 0 {
		t.Fatalf("breakpoint that breaks: %v", res)
	}

	res = e.mustRun("sessions", "--sessions", "40", "--hold", "10ms")
	if num(res, "counts", "opened") != 40 || num(res, "peaks", "edge_sessions") < 40 || num(res, "peaks", "edge_heap_per_session_bytes") == 0 {
		t.Fatalf("sessions: %v", res)
	}
	res = e.mustRun("sessions", "--no-datagrams", "--sessions", "20", "--hold", "10ms")
	if num(res, "counts", "opened") != 20 || num(res, "params", "no_datagrams") != 1 {
		t.Fatalf("sessions --no-datagrams: %v", res)
	}

	// Connections to the HTTPS port that never become a session: what
	// each costs the edge. (Here the edge shares its process, and its
	// heap figures, with the driver and the control plane: only the
	// goroutine each connection holds is told apart.)
	res = e.mustRun("pending", "--conns", "20", "--mode", "idle")
	peaks, _ := res["peaks"].(map[string]any)
	if _, ok := peaks["edge_heap_per_conn_bytes"]; !ok || num(res, "counts", "opened") != 20 || num(res, "peaks", "edge_pending") < 20 ||
		num(res, "peaks", "edge_goroutines_per_conn") < 0.5 || num(res, "peaks", "edge_goroutines_per_conn") > 3 ||
		num(res, "counts", "closed_by_edge") != 0 {
		t.Fatalf("pending idle: %v", res)
	}
	res = e.mustRun("pending", "--conns", "10", "--mode", "silent", "--from", "127.0.0.2,127.0.0.3")
	if num(res, "counts", "opened") != 10 || num(res, "peaks", "edge_pending") < 10 {
		t.Fatalf("pending silent: %v", res)
	}
	// QUIC connections to the device port that open no stream, native
	// and HTTP/3 (the edge's and the driver's goroutines both count here:
	// quic-go's two for each end, and the edge's own).
	for _, mode := range []string{"quic", "h3"} {
		res = e.mustRun("pending", "--conns", "10", "--mode", mode, "--from", "127.0.0.2,127.0.0.3")
		if num(res, "counts", "opened") != 10 || num(res, "peaks", "edge_pending") < 10 || num(res, "peaks", "edge_goroutines_per_conn") < 1 ||
			num(res, "counts", "closed_by_edge") != 0 {
			t.Fatalf("pending %s: %v", mode, res)
		}
	}

	// Connections to the control API after one authenticated call each:
	// what each costs the node that answers --control (its goroutines;
	// the heap is shared here too, and so are the goroutines: the
	// driver's end of each connection, one, is in this process as well,
	// beside the node's two, and anything else the process starts or
	// ends meanwhile counts too).
	res = e.mustRun("apiconns", "--conns", "20", "--control-admin", "http://"+e.r.Cluster.Running()[0].Server.AdminAddr())
	if num(res, "counts", "opened") != 20 || num(res, "peaks", "control_authenticated_connections") < 20 ||
		num(res, "peaks", "control_goroutines_per_conn") < 0.5 || num(res, "peaks", "control_goroutines_per_conn") > 4 {
		t.Fatalf("apiconns: %v", res)
	}

	res = e.mustRun("resume", "--devices", "4", "--duration", "500ms")
	if num(res, "counts", "resumed") == 0 || num(res, "counts", "full") != 0 || num(res, "counts", "failed") != 0 || num(res, "figures", "resume_p50_ms") <= 0 ||
		num(res, "peaks", "edge_cpu_us_per_session") <= 0 || num(res, "counts", "tls_resumed") == 0 {
		t.Fatalf("resume: %v", res)
	}
	// Resuming on two edges in turn: every resume lands on the edge the
	// device was not on, and its TLS session resumes there all the same
	// (but for a ticket that had not arrived when the device hung up).
	other := e.r.StartEdge(1)
	res = e.mustRun("resume", "--devices", "4", "--duration", "500ms", "--other-edge", other.Addr(), "--other-edge-admin", other.AdminURL())
	if resumed := num(res, "counts", "resumed"); resumed == 0 || num(res, "counts", "full") != 0 || num(res, "counts", "failed") != 0 ||
		num(res, "params", "edges") != 2 || num(res, "counts", "tls_resumed") < resumed/2 {
		t.Fatalf("resume on two edges: %v", res)
	}
	if err := run(context.Background(), append(append([]string{}, e.common...), "resume", "--other-edge", other.Addr()), io.Discard, io.Discard, e.getenv); err == nil || !strings.Contains(err.Error(), "go together") {
		t.Fatalf("--other-edge without its admin URL: %v", err)
	}

	res = e.mustRun("--threshold", "failed==0", "storm", "--devices", "20")
	// Every device back on its ticket (the edge may still count the lost
	// sessions it is closing as replaced).
	if num(res, "counts", "back") != 20 || num(res, "counts", "resumed") != 20 || num(res, "peaks", "all_back_s") <= 0 || num(res, "peaks", "edge_sessions_after") < 20 {
		t.Fatalf("storm: %v", res)
	}
}

// The floor comparison (make bench-compare): the bare quic-go server, the
// one-way scenario through it and through the relay, the sink's CPU per
// message, and the closed-loop rate.
func TestFloorScenarios(t *testing.T) {
	e := newDriverEnv(t)
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	floorDone := make(chan error, 1)
	go func() {
		floorDone <- floorCommand(ctx, []string{"--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"}, pw)
		_ = pw.Close()
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-floorDone; err != nil {
			t.Errorf("floor: %v", err)
		}
	})
	var quicAddr, adminAddr string
	if _, err := fmt.Fscanf(pr, "floor listening on %s (QUIC) and %s (/cpu)\n", &quicAddr, &adminAddr); err != nil {
		t.Fatalf("floor's first line: %v", err)
	}
	go func() { _, _ = io.Copy(io.Discard, pr) }()

	res := e.mustRun("oneway", "--floor", quicAddr, "--floor-admin", "http://"+adminAddr, "--count", "200", "--rate", "2000")
	if figs, _ := res["figures"].(map[string]any); res["transport"] != "floor" || num(res, "counts", "messages") != 200 || num(res, "figures", "oneway_p50_ms") <= 0 ||
		num(res, "peaks", "server_cpu_us_per_message") <= 0 || figs["send_lag_p99_ms"] == nil {
		t.Fatalf("oneway through the floor: %v", res)
	}
	res = e.mustRun("oneway", "--floor", quicAddr, "--count", "20", "--rate", "2000")
	if peaks, _ := res["peaks"].(map[string]any); peaks["server_cpu_us_per_message"] != nil {
		t.Fatalf("oneway through the floor without --floor-admin measured a CPU: %v", res)
	}
	res = e.mustRun("oneway", "--count", "200", "--rate", "2000")
	if res["transport"] != "quic" || num(res, "counts", "messages") != 200 || num(res, "figures", "oneway_p50_ms") <= 0 ||
		num(res, "peaks", "server_cpu_us_per_message") <= 0 {
		t.Fatalf("oneway through the relay: %v", res)
	}
	res = e.mustRun("stream", "--floor", quicAddr, "--floor-admin", "http://"+adminAddr, "--count", "20000")
	if num(res, "counts", "messages") != 20000 || num(res, "peaks", "server_cpu_us_per_message") <= 0 {
		t.Fatalf("stream into the floor: %v", res)
	}
	res = e.mustRun("stream", "--forward", "--floor", quicAddr, "--floor-admin", "http://"+adminAddr, "--count", "20000")
	if num(res, "counts", "messages") != 20000 || num(res, "params", "forward") != 1 || num(res, "peaks", "server_cpu_us_per_message") <= 0 {
		t.Fatalf("stream through the floor's forwarder: %v", res)
	}
	// Closed loop over three pairs, an uneven split: every receiver must
	// get all of its own pair's messages for the run to end.
	res = e.mustRun("stream", "--forward", "--pairs", "3", "--inflight", "8", "--floor", quicAddr, "--floor-admin", "http://"+adminAddr, "--count", "3001")
	if num(res, "counts", "messages") != 3001 || num(res, "params", "pairs") != 3 || num(res, "params", "inflight") != 8 ||
		num(res, "peaks", "server_cpu_us_per_message") <= 0 {
		t.Fatalf("closed-loop stream through the floor's forwarder: %v", res)
	}
	for bad, says := range map[string]string{"--pairs 2": "go with --forward", "--forward --pairs 0": "--pairs", "--forward --pairs 257": "--pairs",
		"--forward --pairs 11": "--pairs", "--forward --inflight -1": "--inflight", "--count 0": "--count"} {
		args := append(append([]string{}, e.common...), "stream", "--floor", quicAddr, "--floor-admin", "http://"+adminAddr, "--count", "10")
		if err := run(context.Background(), append(args, strings.Fields(bad)...), io.Discard, io.Discard, e.getenv); err == nil || !strings.Contains(err.Error(), says) {
			t.Errorf("stream %s: %v", bad, err)
		}
	}
	res = e.mustRun("--threshold", "failed==0", "rate", "--pairs", "2", "--inflight", "4", "--duration", "500ms")
	if acked := num(res, "counts", "acked"); acked == 0 || acked != num(res, "counts", "attempts") || num(res, "counts", "received") != acked ||
		num(res, "params", "inflight") != 4 || num(res, "peaks", "edge_cpu_us_per_event") <= 0 ||
		num(res, "peaks", "edge_ack_p50_ms") <= 0 || num(res, "peaks", "edge_ack_p99_ms") < num(res, "peaks", "edge_ack_p50_ms") {
		t.Fatalf("closed-loop rate: %v", res)
	}
	// Ephemeral events, closed loop on deliveries: what is sent is
	// delivered, with its one-way latency.
	res = e.mustRun("--threshold", "failed==0", "rate", "--ephemeral", "--pairs", "2", "--inflight", "4", "--duration", "500ms")
	// (A delivery the edge sent as a datagram may be lost, rarely.)
	if sent, got := num(res, "counts", "attempts"), num(res, "counts", "received"); sent == 0 || got < sent*0.9 || got > sent || num(res, "counts", "acked") != 0 ||
		num(res, "params", "ephemeral") != 1 || num(res, "figures", "delivery_p50_ms") <= 0 || num(res, "peaks", "edge_cpu_us_per_event") <= 0 {
		t.Fatalf("closed-loop ephemeral rate: %v", res)
	}
	// And open loop, as datagrams: some may be lost, most arrive.
	res = e.mustRun("--threshold", "failed==0", "rate", "--ephemeral", "--pairs", "2", "--rate", "200", "--duration", "500ms")
	if sent, got := num(res, "counts", "attempts"), num(res, "counts", "received"); sent < 50 || got < sent/2 || got > sent || num(res, "peaks", "edge_cpu_us_per_event") <= 0 {
		t.Fatalf("open-loop ephemeral rate: %v", res)
	}
	// The mailbox path: receivers offline, every event stored and acked
	// by the control plane, nothing received.
	res = e.mustRun("--control-admin", "http://"+e.r.Cluster.Nodes[0].Server.AdminAddr(), "rate", "--offline", "--pairs", "2", "--inflight", "4", "--duration", "500ms")
	if acked := num(res, "counts", "acked"); acked == 0 || num(res, "counts", "received") != 0 || num(res, "params", "offline") != 1 ||
		num(res, "peaks", "edge_cpu_us_per_event") <= 0 || num(res, "peaks", "control_cpu_us_per_event") <= 0 {
		t.Fatalf("rate to offline receivers: %v", res)
	}
	// The mesh hop: receivers on a second edge.
	rxEdge := e.r.StartEdge(1)
	res = e.mustRun("rate", "--rx-edge", rxEdge.Addr(), "--rx-edge-admin", rxEdge.AdminURL(), "--pairs", "2", "--inflight", "4", "--duration", "500ms")
	if acked := num(res, "counts", "acked"); acked == 0 || num(res, "counts", "received") == 0 || num(res, "params", "mesh_hop") != 1 ||
		num(res, "peaks", "edge_cpu_us_per_event") <= 0 || num(res, "peaks", "rx_edge_cpu_us_per_event") <= 0 {
		t.Fatalf("rate across two edges: %v", res)
	}
}

// A threshold that does not hold fails the run (exit 99 in main) and
// says which; a threshold on something the scenario does not measure is
// an error, not a pass.
func TestThresholds(t *testing.T) {
	e := newDriverEnv(t)
	res, _, err := e.run("--threshold", "rtt_p50_ms<0.000001,round_trips>=10", "rtt", "--count", "10")
	if !errors.Is(err, errThresholds) {
		t.Fatalf("want a threshold failure, got %v", err)
	}
	if th, _ := res["thresholds"].(map[string]any); th["rtt_p50_ms<0.000001"] != false || th["round_trips>=10"] != true {
		t.Fatalf("verdicts: %v", res["thresholds"])
	}
	var out, errOut bytes.Buffer
	err = run(context.Background(), append(append([]string{}, e.common...), "--threshold", "ack_p99<1", "rtt", "--count", "5"), &out, &errOut, e.getenv)
	if err == nil || errors.Is(err, errThresholds) || !strings.Contains(err.Error(), `no "ack_p99"`) {
		t.Fatalf("a threshold on nothing: %v", err)
	}
	for _, bad := range []string{"p99", "ack_p99_ms<", "ack_p99_ms=<5", "Ack<1"} {
		var th thresholds
		if err := th.Set(bad); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

// A soak samples the edge's gauges into a CSV and plots them to a PNG;
// plot draws the same CSV again.
func TestSoak(t *testing.T) {
	e := newDriverEnv(t)
	dir := t.TempDir()
	csvPath, pngPath := filepath.Join(dir, "soak.csv"), filepath.Join(dir, "soak.png")
	res := e.mustRun("soak", "--duration", "2s", "--sample", "200ms", "--pairs", "2", "--rate", "50", "--churn", "4", "--csv", csvPath, "--png", pngPath)
	if num(res, "counts", "acked") != 100 || num(res, "counts", "churned") == 0 || num(res, "peaks", "edge_goroutines_max") == 0 {
		t.Fatalf("soak: %v", res)
	}
	f, err := os.Open(csvPath)
	if err != nil {
		t.Fatal(err)
	}
	samples, err := readSoakCSV(f)
	_ = f.Close()
	if err != nil || len(samples) < 5 {
		t.Fatalf("%d samples: %v", len(samples), err)
	}
	for _, row := range samples {
		if row[1] <= 0 || row[3] <= 0 { // heap, goroutines
			t.Fatalf("sample %v", row)
		}
	}
	again := filepath.Join(dir, "again.png")
	if err := plotCommand([]string{csvPath, again}); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{pngPath, again} {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		img, err := png.Decode(f)
		_ = f.Close()
		if err != nil || img.Bounds().Dx() < 500 {
			t.Fatalf("%s: %v", p, err)
		}
	}
}

// Results of several pods add up: counts and failures sum, histograms
// merge (so percentiles are of the whole), and thresholds apply to the
// sum.
func TestMerge(t *testing.T) {
	mk := func(acked float64, lat time.Duration, failures int) *result {
		r := newResult("rate", "quic")
		r.Seconds = 10
		r.Counts["acked"], r.Counts["attempts"], r.Counts["failed"] = acked, acked+float64(failures), float64(failures)
		if failures > 0 {
			r.Errors["QUEUE_FULL"] = failures
		}
		for range int(acked) {
			r.observe("ack", lat)
		}
		r.derive()
		return r
	}
	dir := t.TempDir()
	var files []string
	for i, r := range []*result{mk(900, time.Millisecond, 0), mk(100, 100*time.Millisecond, 10)} {
		p := filepath.Join(dir, "pod"+string(rune('a'+i))+".json")
		var b bytes.Buffer
		b.WriteString("relayload 2.0s a progress line, as in kubectl logs\n")
		if err := r.write(&b, true); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, b.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
		files = append(files, p)
	}
	var out bytes.Buffer
	d := &driverConfig{out: &out, asJSON: true}
	err := d.merge(append([]string{"--threshold", "ack_p99_ms<50", "--threshold", "acked_per_s>=100"}, files...))
	if !errors.Is(err, errThresholds) {
		t.Fatalf("merge: %v", err)
	}
	var m result
	if err := json.Unmarshal(out.Bytes(), &m); err != nil {
		t.Fatal(err)
	}
	if m.Runs != 2 || m.Counts["acked"] != 1000 || m.Errors["QUEUE_FULL"] != 10 || m.Figures["acked_per_s"] != 100 {
		t.Fatalf("merged: %v %v %v", m.Runs, m.Counts, m.Figures)
	}
	// 10% of the samples took 100 ms: p50 is 1 ms, p99 100 ms (within a bucket).
	if p50, p99 := m.Figures["ack_p50_ms"], m.Figures["ack_p99_ms"]; math.Abs(p50-1) > 0.03 || math.Abs(p99-100) > 2 {
		t.Fatalf("p50 %v, p99 %v", p50, p99)
	}
	if math.Abs(m.Figures["error_rate"]-10.0/1010) > 1e-9 {
		t.Fatalf("error rate %v", m.Figures["error_rate"])
	}
	if m.Thresholds["ack_p99_ms<50"] || !m.Thresholds["acked_per_s>=100"] {
		t.Fatalf("thresholds %v", m.Thresholds)
	}
	// Results of different scenarios do not merge.
	other := newResult("storm", "quic")
	if _, err := mergeResults([]*result{mk(1, time.Millisecond, 0), other}); err == nil {
		t.Fatal("merged a storm into a rate")
	}
}

// bucketQuantile reads a quantile from the difference of two readings of
// a Prometheus histogram as histogram_quantile does.
func TestBucketQuantile(t *testing.T) {
	inf := math.Inf(1)
	before := map[float64]float64{0.001: 5, 0.002: 5, 0.004: 5, inf: 5}
	after := map[float64]float64{0.001: 55, 0.002: 95, 0.004: 104, inf: 105}
	// 100 counted between them: 50 up to 1 ms, 40 in (1, 2] ms, 9 in
	// (2, 4] ms, 1 above.
	for _, c := range []struct{ q, want float64 }{
		{0.25, 0.0005}, // halfway into the first bucket, from 0
		{0.5, 0.001},   // its upper bound
		{0.7, 0.0015},  // halfway into the second
		{0.99, 0.004},  // the last finite bound
		{0.995, 0.004}, // in +Inf: the highest finite bound
	} {
		if got, ok := bucketQuantile(c.q, before, after); !ok || math.Abs(got-c.want) > 1e-12 {
			t.Errorf("q %v: %v %v, want %v", c.q, got, ok, c.want)
		}
	}
	if _, ok := bucketQuantile(0.5, after, after); ok {
		t.Error("nothing counted between two equal readings, yet a quantile")
	}
	// From no earlier reading: 105 counted, the median 52.5 of the first
	// bucket's 55.
	if got, ok := bucketQuantile(0.5, nil, after); !ok || math.Abs(got-0.001*52.5/55) > 1e-12 {
		t.Errorf("from nothing: %v %v, want %v", got, ok, 0.001*52.5/55)
	}
}

func TestHistogram(t *testing.T) {
	h := newHistogram()
	for i := 1; i <= 1000; i++ {
		h.add(time.Duration(i) * time.Microsecond)
	}
	for _, q := range []float64{0.5, 0.9, 0.99} {
		got, want := h.quantile(q), q*1000
		if math.Abs(got-want)/want > 0.025 {
			t.Errorf("q%v = %v, want %v within 2.5%%", q, got, want)
		}
	}
	if h.quantile(1) != 1000 || h.N != 1000 {
		t.Errorf("max %v, n %d", h.quantile(1), h.N)
	}
}
