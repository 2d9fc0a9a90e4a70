// Command relayload is the relay's native load driver. It provisions
// accounts and devices through the control API (as an admin), connects
// them to an edge with the Go client over QUIC or WebTransport, and
// measures what the issue asks of an edge: round-trip latency, sustained
// event rates with their ack latency, and the edge's memory per idle
// session (read from the edge's own /metrics, so the driver's memory does
// not count).
//
//	relayload [flags] rtt|rate|sessions
//
// It logs in as admin with the password in RELAY_ADMIN_PASSWORD (or
// --admin-password-file), or uses the access token in RELAYCTL_TOKEN
// (relayctl token prints one), which spares the login throttle when it is
// run many times. Run it against a deployment whose edge allows the
// driver's handshake rate (relayd edge --handshakes-per-second).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr, os.Getenv); err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "relayload:", err)
		}
		os.Exit(2)
	}
}

const usage = `Usage: relayload [flags] <scenario> [scenario flags]

Scenarios:
  rtt        one pair of devices, events back and forth one at a time: p50/p99/max round trip
  rate       pairs of devices, durable events at a fixed total rate: delivered/s, ack latency, errors
  sessions   open many idle sessions: the edge's heap and RSS per session

Flags:
`

func run(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	fs := flag.NewFlagSet("relayload", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var d driverConfig
	d.register(fs)
	fs.Usage = func() {
		fmt.Fprint(stderr, usage)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return errors.New("missing scenario")
	}
	d.adminPassword = getenv("RELAY_ADMIN_PASSWORD")
	d.adminToken = getenv("RELAYCTL_TOKEN")
	d.log = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	d.out = stdout
	scenario, rest := fs.Arg(0), fs.Args()[1:]
	switch scenario {
	case "rtt":
		return d.rtt(ctx, rest)
	case "rate":
		return d.rate(ctx, rest)
	case "sessions":
		return d.sessions(ctx, rest)
	}
	fs.Usage()
	return fmt.Errorf("unknown scenario %q", scenario)
}
