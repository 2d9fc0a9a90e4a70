package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"io"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	edgeserver "github.com/edge-relay/relay/edge/server"
)

// --max-unvalidated-handshakes 0 means a Retry for every connection,
// which the edge's configuration spells negative (its zero is the
// default).
func TestMaxUnvalidatedHandshakesFlag(t *testing.T) {
	for _, c := range []struct {
		args []string
		want int
	}{
		{nil, 1024},
		{[]string{"--max-unvalidated-handshakes", "64"}, 64},
		{[]string{"--max-unvalidated-handshakes", "0"}, -1},
		{[]string{"--max-unvalidated-handshakes", "-5"}, -1},
	} {
		cfg := parseEdgeFlags(t, c.args)
		if cfg.MaxUnvalidatedHandshakes != c.want {
			t.Errorf("%q: MaxUnvalidatedHandshakes %d, want %d", c.args, cfg.MaxUnvalidatedHandshakes, c.want)
		}
	}
}

// --revision-wait and --max-revision-waits reach the session
// configuration; either at 0 means no handshake waits for a revision,
// which the configuration spells as a negative wait (its zero is the
// default).
func TestRevisionWaitFlags(t *testing.T) {
	for _, c := range []struct {
		args     []string
		wait     time.Duration
		maxWaits int
	}{
		{nil, 5 * time.Second, 1024},
		{[]string{"--revision-wait", "2s", "--max-revision-waits", "16"}, 2 * time.Second, 16},
		{[]string{"--revision-wait", "0"}, -1, 1024},
		{[]string{"--revision-wait", "-1s"}, -1, 1024},
		{[]string{"--max-revision-waits", "0"}, -1, 0},
	} {
		cfg := parseEdgeFlags(t, c.args)
		if cfg.Session.RevisionWait != c.wait || cfg.Session.MaxRevisionWaits != c.maxWaits {
			t.Errorf("%q: RevisionWait %v, MaxRevisionWaits %d; want %v, %d",
				c.args, cfg.Session.RevisionWait, cfg.Session.MaxRevisionWaits, c.wait, c.maxWaits)
		}
	}
}

// Event limits that admit an event a mailbox cannot keep are refused at
// start, naming the flag and the bound: a TTL (with the skew tolerance)
// beyond a mailbox entry's life, a payload (with the other fields at
// their longest) beyond a mailbox entry's size. Those at the bounds start.
func TestEventLimitsMustFitAMailbox(t *testing.T) {
	for _, c := range []struct {
		args []string
		err  string // "": starts
	}{
		{nil, ""},
		{[]string{"--max-ttl", "8759h55m"}, ""}, // 365 days less the 5 minutes' tolerance
		{[]string{"--max-ttl", "8759h55m1s"}, "--max-ttl 8759h55m1s plus --skew-tolerance 5m0s is above the 8760h0m0s a mailbox entry may live: lower --max-ttl to at most 8759h55m0s"},
		{[]string{"--max-ttl", "8000h", "--skew-tolerance", "800h"}, "--max-ttl 8000h0m0s plus --skew-tolerance 800h0m0s"},
		{[]string{"--max-ttl", "2562047h"}, "--max-ttl 2562047h0m0s plus"}, // no overflow into a pass
		{[]string{"--max-payload-bytes", "253458", "--max-frame-bytes", "1048576"}, ""},
		{[]string{"--max-payload-bytes", "253459", "--max-frame-bytes", "1048576"}, "--max-payload-bytes 253459 admits events of 262145 bytes with the other fields at their longest (under --max-frame-bytes 1048576), above the 262144 a mailbox entry holds: lower --max-payload-bytes to at most 253458"},
		// The frame limit bounds the events too.
		{[]string{"--max-payload-bytes", "1048576", "--max-frame-bytes", "131072"}, ""},
		{[]string{"--max-payload-bytes", "1048576", "--max-frame-bytes", "262144"}, "--max-payload-bytes 1048576 admits events of 262275 bytes"},
	} {
		_, err := parseEdgeFlagsErr(c.args)
		switch {
		case c.err == "" && err != nil:
			t.Errorf("%q: %v, want a start", c.args, err)
		case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
			t.Errorf("%q: %v, want %q", c.args, err, c.err)
		}
	}
}

// parseEdgeFlags is the edge's configuration from args, as relayd edge
// would make it (the password from the environment).
func parseEdgeFlags(t *testing.T, args []string) edgeserver.Config {
	t.Helper()
	cfg, err := parseEdgeFlagsErr(args)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func parseEdgeFlagsErr(args []string) (edgeserver.Config, error) {
	fs := flag.NewFlagSet("edge", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var (
		cfg edgeserver.Config
		f   edgeFlags
	)
	f.register(fs, &cfg)
	if err := fs.Parse(args); err != nil {
		return cfg, err
	}
	err := f.apply(&cfg, func(string) string { return "password" })
	return cfg, err
}

// JSON logs write durations as the text format does, not as a bare
// count of nanoseconds.
func TestJSONLogsWriteDurations(t *testing.T) {
	var out bytes.Buffer
	log, err := (&commonFlags{logLevel: "info", logFormat: "json"}).logger(&out)
	if err != nil {
		t.Fatal(err)
	}
	log.Info("scheduled backups", "every", time.Hour, "group", slog.GroupValue(slog.Duration("window", 10*time.Second)))
	var line map[string]any
	if err := json.Unmarshal(out.Bytes(), &line); err != nil {
		t.Fatalf("%v: %q", err, out.String())
	}
	if line["every"] != "1h0m0s" {
		t.Errorf("every: %#v, want %q (%s)", line["every"], "1h0m0s", out.String())
	}
	if g, _ := line["group"].(map[string]any); g == nil || g["window"] != "10s" {
		t.Errorf("group.window: %#v, want %q (%s)", line["group"], "10s", out.String())
	}
}

// --require-bound-proofs reaches the session configuration, and a name
// that is no transport is refused at start.
func TestRequireBoundProofsFlag(t *testing.T) {
	if cfg := parseEdgeFlags(t, nil); len(cfg.Session.RequireBoundProofs) != 0 {
		t.Fatalf("default: %v", cfg.Session.RequireBoundProofs)
	}
	cfg := parseEdgeFlags(t, []string{"--require-bound-proofs", "quic,websocket"})
	if !slices.Equal(cfg.Session.RequireBoundProofs, []string{"quic", "websocket"}) {
		t.Fatalf("quic,websocket: %v", cfg.Session.RequireBoundProofs)
	}
	if _, err := parseEdgeFlagsErr([]string{"--require-bound-proofs", "tcp"}); err == nil || !strings.Contains(err.Error(), `"tcp" is not a transport`) {
		t.Fatalf("tcp: %v", err)
	}
}
