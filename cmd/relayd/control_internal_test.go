package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/backup"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/server"
	"github.com/edge-relay/relay/internal/flagenv"
)

// parseControlFlags parses relayd control's flags into a configuration.
func parseControlFlags(args ...string) (server.Config, error) {
	return parseControlFlagsEnv(func(string) string { return "" }, args...)
}

// parseControlFlagsEnv is parseControlFlags with the environment getenv
// gives (RELAY_ variables for the flags not given).
func parseControlFlagsEnv(getenv func(string) string, args ...string) (server.Config, error) {
	var cfg server.Config
	var join flagenv.List
	var shutdown time.Duration
	var keyFile string
	fs := flag.NewFlagSet("relayd control", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	controlFlags(fs, &cfg, &join, &shutdown, &keyFile)
	return cfg, flagenv.Parse(fs, envPrefix, args, getenv)
}

// The auth bounds whose 0 on the command line means no limit
// (zeroIsNoLimit) reach the auth configuration: by default the
// configuration's default, a value as given, 0 as a negative value (the
// configuration's zero is its default); a negative or malformed value is
// refused.
func TestZeroIsNoLimitFlags(t *testing.T) {
	for _, c := range []struct {
		flag, value string
		read        func(server.Config) int64
		dflt, given int64
		bad         []string
	}{
		{"--login-max-age", "720h", func(c server.Config) int64 { return int64(c.Auth.LoginMaxAge) },
			int64(api.DefaultLoginMaxAge), int64(720 * time.Hour), []string{"-1h", "soon"}},
		{"--account-tokens-per-minute", "120", func(c server.Config) int64 { return int64(c.Auth.TokensPerMinute) },
			api.DefaultTokensPerMinute, 120, []string{"-1", "many"}},
		{"--account-max-sessions", "500", func(c server.Config) int64 { return int64(c.Auth.MaxSessions) },
			api.DefaultMaxSessions, 500, []string{"-1", "many", fmt.Sprint(fsm.MaxSessionCap + 1)}},
	} {
		for _, tc := range []struct {
			args []string
			want int64
		}{{nil, c.dflt}, {[]string{c.flag, c.value}, c.given}, {[]string{c.flag, "0"}, -1}} {
			cfg, err := parseControlFlags(tc.args...)
			if got := c.read(cfg); err != nil || got != tc.want {
				t.Errorf("%q: %s reads %d (%v), want %d", tc.args, c.flag, got, err, tc.want)
			}
		}
		for _, bad := range c.bad {
			if _, err := parseControlFlags(c.flag, bad); err == nil {
				t.Errorf("%s %s was taken", c.flag, bad)
			}
		}
	}
}

// relayd control with a backup key refuses to restore a plaintext backup
// and says how to allow it, with relayd's own flag and variable; the
// variable (like the flag) allows it.
func TestRestoreOfAPlaintextBackupWithAKey(t *testing.T) {
	_, secret, err := backup.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	sample := filepath.Join("..", "..", "control", "backup", "testdata", "sample-v1.bin")
	env := map[string]string{"RELAY_BACKUP_KEY": secret}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err = run(ctx, []string{"control", "--node-id", "r1", "--data-dir", t.TempDir(), "--raft-addr", "127.0.0.1:0",
		"--api-addr", "127.0.0.1:0", "--admin-addr", "", "--restore", sample}, io.Discard, io.Discard, func(k string) string { return env[k] })
	if !errors.Is(err, backup.ErrPlaintext) {
		t.Fatalf("restore of a plaintext backup with a key: %v, want ErrPlaintext", err)
	}
	for _, want := range []string{"--restore-allow-plaintext", "RELAY_RESTORE_ALLOW_PLAINTEXT"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%q does not name %s", err, want)
		}
	}

	allow := map[string]string{"RELAY_RESTORE_ALLOW_PLAINTEXT": "true"}
	if cfg, err := parseControlFlagsEnv(func(k string) string { return allow[k] }); err != nil || !cfg.RestoreAllowPlaintext {
		t.Fatalf("RELAY_RESTORE_ALLOW_PLAINTEXT=true: %v, allowed %v", err, cfg.RestoreAllowPlaintext)
	}
	if cfg, err := parseControlFlags(); err != nil || cfg.RestoreAllowPlaintext {
		t.Fatalf("by default plaintext is allowed (%v)", err)
	}
}
