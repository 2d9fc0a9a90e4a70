// Command relayload is the relay's native load driver. It provisions
// accounts and devices through the control API (as an admin), connects
// them to an edge with the Go client over QUIC or WebTransport, and
// measures an edge: round-trip latency, sustained event rates with their
// ack latency, sessions and the edge's memory per idle session (read from
// the edge's own /metrics, so the driver's memory does not count),
// resumes, reconnect storms and long soaks. Session attempts are paced by
// how fast the edge answers and retried with backoff; failures are
// reported by cause. --threshold makes a run pass or fail (exit 99, as
// k6 does); --json prints a result that `relayload merge` adds up with
// the results of other pods (deploy/loadtest runs it as a Kubernetes Job).
//
//	relayload [flags] rtt|rate|breakpoint|sessions|resume|storm|soak|pending [scenario flags]
//	relayload merge [--threshold ...] [--json] result.json...
//	relayload plot soak.csv soak.png
//
// It reaches the control API at --control: an http:// URL over HTTP/2
// without TLS, an https:// one (every deployment's) over HTTP/2 with TLS,
// checked against the CA in --control-ca. It logs in as admin with the
// password in RELAY_ADMIN_PASSWORD (or --admin-password-file), or uses
// the access token in RELAYCTL_TOKEN (relayctl token prints one), which
// spares the login throttle when it is run many times. Run it against a deployment whose edge allows the
// driver's handshake rate (relayd edge --handshakes-per-second).
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr, os.Getenv); err != nil {
		if errors.Is(err, errThresholds) {
			os.Exit(99)
		}
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "relayload:", err)
		}
		os.Exit(2)
	}
}

const usage = `Usage: relayload [flags] <scenario> [scenario flags]

Scenarios:
  rtt        one pair of devices, events back and forth one at a time: round-trip percentiles
  rate       pairs of devices, durable events at a fixed total rate, open loop: acked/s, ack latency, failures
  breakpoint the rate scenario in growing steps until the ack p99 passes a limit: the sustained rate
  sessions   open many idle sessions, paced and retried: sessions/s, failures by cause, the edge's memory per session
  resume     devices close and resume on their tickets over and over: resumes/s, resume latency
  storm      devices all lose their connection at once and come back on their tickets: time to all back
  soak       steady load plus session churn for a long time; samples the edge's heap and goroutines to CSV and a PNG plot
  pending    hold connections that never become a session, to the HTTPS port (--mode idle or silent) or the device port (--mode quic or h3): the edge's memory per connection, and its bound
  apiconns   hold connections to the control API, each after one authenticated call: the control node's memory per connection

  oneway     device A sends to device B at a fixed rate: one-way latency through the edge (or --floor: through a bare quic-go forwarder)
  stream     64-byte messages one way into the floor's sink (or --forward: through its forwarder to a receiver): the floor server's CPU per message
  floor      run the bare quic-go server the floor figures are measured against (forwarder and sink)

  merge      add up --json results of several runs (pods of a Job) and check thresholds on the whole
  plot       plot a soak's CSV again

Exit status: 0 ok, 99 a threshold failed, 2 the run itself failed.

Flags:

Flags:
`

func run(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) (err error) {
	fs := flag.NewFlagSet("relayload", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var d driverConfig
	d.register(fs)
	fs.Usage = func() {
		fmt.Fprint(stderr, usage)
		fs.PrintDefaults()
	}
	if err = fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return errors.New("missing scenario")
	}
	d.adminPassword = getenv("RELAY_ADMIN_PASSWORD")
	d.adminToken = getenv("RELAYCTL_TOKEN")
	d.log = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelError}))
	d.out, d.errw = stdout, stderr
	scenario, rest := fs.Arg(0), fs.Args()[1:]
	if d.cpuProfile != "" {
		var stopProfile func() error
		if stopProfile, err = startCPUProfile(d.cpuProfile); err != nil {
			return err
		}
		defer func() { err = errors.Join(err, stopProfile()) }()
	}
	switch scenario {
	case "rtt":
		return d.rtt(ctx, rest)
	case "rate":
		return d.rate(ctx, rest)
	case "sessions":
		return d.sessions(ctx, rest)
	case "breakpoint":
		return d.breakpoint(ctx, rest)
	case "resume":
		return d.resume(ctx, rest)
	case "storm":
		return d.storm(ctx, rest)
	case "soak":
		return d.soak(ctx, rest)
	case "pending":
		return d.pending(ctx, rest)
	case "apiconns":
		return d.apiconns(ctx, rest)
	case "oneway":
		return d.oneway(ctx, rest)
	case "stream":
		return d.stream(ctx, rest)
	case "floor":
		return floorCommand(ctx, rest, stdout)
	case "merge":
		return d.merge(rest)
	case "plot":
		return plotCommand(rest)
	}
	fs.Usage()
	return fmt.Errorf("unknown scenario %q", scenario)
}

// merge reads results printed with --json (one object per file, or
// several, one per line) and prints their sum.
func (d *driverConfig) merge(args []string) error {
	fs := flag.NewFlagSet("merge", flag.ContinueOnError)
	fs.Var(&d.thresholds, "threshold", "as for a run, on the merged result")
	fs.BoolVar(&d.asJSON, "json", d.asJSON, "print the merged result as JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return errors.New("merge: name the result files")
	}
	var rs []*result
	for _, name := range fs.Args() {
		got, err := readResults(name)
		if err != nil {
			return err
		}
		rs = append(rs, got...)
	}
	m, err := mergeResults(rs)
	if err != nil {
		return err
	}
	terr := d.thresholds.check(m)
	if terr != nil && !errors.Is(terr, errThresholds) {
		return terr
	}
	if err := m.write(d.out, d.asJSON); err != nil {
		return err
	}
	return terr
}

// readResults reads the results in a file: one JSON object per line, as
// --json prints them; other lines (what a pod logged besides, when the
// file is `kubectl logs` of a Job) are skipped.
func readResults(name string) ([]*result, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var rs []*result
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 1<<20), 64<<20)
	for n := 1; sc.Scan(); n++ {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 || line[0] != '{' {
			continue
		}
		var r result
		if err := json.Unmarshal(line, &r); err != nil {
			return nil, fmt.Errorf("%s:%d: %w", name, n, err)
		}
		if r.Scenario == "" {
			return nil, fmt.Errorf("%s:%d: not a relayload result", name, n)
		}
		rs = append(rs, &r)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if len(rs) == 0 {
		return nil, fmt.Errorf("%s: no results (print them with --json)", name)
	}
	return rs, nil
}

func plotCommand(args []string) error {
	if len(args) != 2 {
		return errors.New("usage: relayload plot soak.csv soak.png")
	}
	f, err := os.Open(args[0])
	if err != nil {
		return err
	}
	defer f.Close()
	samples, err := readSoakCSV(f)
	if err != nil {
		return fmt.Errorf("%s: %w", args[0], err)
	}
	return plotSoak(args[1], "relay edge soak: "+args[0], samples)
}

// startCPUProfile profiles this process into path until the returned
// function is called.
func startCPUProfile(path string) (stop func() error, err error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	return func() error {
		pprof.StopCPUProfile()
		if err := f.Close(); err != nil {
			return fmt.Errorf("cpu profile: %w", err)
		}
		return nil
	}, nil
}
