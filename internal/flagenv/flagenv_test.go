package flagenv

import (
	"flag"
	"io"
	"strings"
	"testing"
	"time"
)

func TestPrecedence(t *testing.T) {
	env := map[string]string{
		"RELAY_RAFT_ADDR": "10.0.0.1:1",
		"RELAY_API_ADDR":  "10.0.0.2:2",
		"RELAY_JOIN":      "a:1,b:2",
		"RELAY_SLOW":      "250ms",
		"RELAY_BOOTSTRAP": "true",
		"RELAY_UNRELATED": "x",
	}
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	raft := fs.String("raft-addr", "def", "")
	api := fs.String("api-addr", "def", "")
	node := fs.String("node-id", "n0", "")
	var join List
	fs.Var(&join, "join", "")
	slow := fs.Duration("slow", time.Second, "")
	boot := fs.Bool("bootstrap", false, "")
	if err := Parse(fs, "RELAY_", []string{"--api-addr", "cli:3"}, func(k string) string { return env[k] }); err != nil {
		t.Fatal(err)
	}
	if *raft != "10.0.0.1:1" || *api != "cli:3" || *node != "n0" || *slow != 250*time.Millisecond || !*boot {
		t.Fatalf("got raft=%s api=%s node=%s slow=%v boot=%v", *raft, *api, *node, *slow, *boot)
	}
	if strings.Join(join, " ") != "a:1 b:2" {
		t.Fatalf("join = %v", join)
	}
}

func TestBadEnvValue(t *testing.T) {
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.Duration("slow", time.Second, "")
	err := Parse(fs, "RELAY_", nil, func(k string) string {
		if k == "RELAY_SLOW" {
			return "soon"
		}
		return ""
	})
	if err == nil || !strings.Contains(err.Error(), "RELAY_SLOW") {
		t.Fatalf("want an error naming RELAY_SLOW, got %v", err)
	}
}

func TestUsageListsEnv(t *testing.T) {
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.String("data-dir", "./data", "where state lives")
	var b strings.Builder
	fs.SetOutput(&b)
	Usage(fs, "RELAY_", "relayd control [flags]")()
	if !strings.Contains(b.String(), "RELAY_DATA_DIR") || !strings.Contains(b.String(), "where state lives") {
		t.Fatalf("usage: %s", b.String())
	}
	fs.SetOutput(io.Discard)
}
