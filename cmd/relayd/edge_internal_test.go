package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"io"
	"log/slog"
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

// parseEdgeFlags is the edge's configuration from args, as relayd edge
// would make it (the password from the environment).
func parseEdgeFlags(t *testing.T, args []string) edgeserver.Config {
	t.Helper()
	fs := flag.NewFlagSet("edge", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var (
		cfg edgeserver.Config
		f   edgeFlags
	)
	f.register(fs, &cfg)
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	if err := f.apply(&cfg, func(string) string { return "password" }); err != nil {
		t.Fatal(err)
	}
	return cfg
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
