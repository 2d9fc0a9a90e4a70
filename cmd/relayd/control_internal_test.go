package main

import (
	"flag"
	"io"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/server"
	"github.com/edge-relay/relay/internal/flagenv"
)

// parseControlFlags parses relayd control's flags into a configuration.
func parseControlFlags(args ...string) (server.Config, error) {
	var cfg server.Config
	var join flagenv.List
	var shutdown time.Duration
	var keyFile string
	fs := flag.NewFlagSet("relayd control", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	controlFlags(fs, &cfg, &join, &shutdown, &keyFile)
	return cfg, fs.Parse(args)
}

// --login-max-age reaches the auth configuration; 0 means no limit,
// which the configuration spells as a negative age (its zero is the
// default); a negative or malformed value is refused.
func TestLoginMaxAgeFlag(t *testing.T) {
	parse := func(args ...string) (time.Duration, error) {
		cfg, err := parseControlFlags(args...)
		return cfg.Auth.LoginMaxAge, err
	}
	for _, c := range []struct {
		args []string
		want time.Duration
	}{
		{nil, api.DefaultLoginMaxAge},
		{[]string{"--login-max-age", "720h"}, 720 * time.Hour},
		{[]string{"--login-max-age", "0"}, -1},
	} {
		got, err := parse(c.args...)
		if err != nil || got != c.want {
			t.Errorf("%q: LoginMaxAge %v (%v), want %v", c.args, got, err, c.want)
		}
	}
	for _, bad := range []string{"-1h", "soon"} {
		if _, err := parse("--login-max-age", bad); err == nil {
			t.Errorf("--login-max-age %s was taken", bad)
		}
	}
}

// --account-tokens-per-minute reaches the auth configuration; 0 means no
// limit (a negative count in the configuration, whose zero is the
// default); a negative or malformed value is refused.
func TestAccountTokensPerMinuteFlag(t *testing.T) {
	parse := func(args ...string) (int, error) {
		cfg, err := parseControlFlags(args...)
		return cfg.Auth.TokensPerMinute, err
	}
	for _, c := range []struct {
		args []string
		want int
	}{
		{nil, api.DefaultTokensPerMinute},
		{[]string{"--account-tokens-per-minute", "120"}, 120},
		{[]string{"--account-tokens-per-minute", "0"}, -1},
	} {
		got, err := parse(c.args...)
		if err != nil || got != c.want {
			t.Errorf("%q: TokensPerMinute %v (%v), want %v", c.args, got, err, c.want)
		}
	}
	for _, bad := range []string{"-1", "many"} {
		if _, err := parse("--account-tokens-per-minute", bad); err == nil {
			t.Errorf("--account-tokens-per-minute %s was taken", bad)
		}
	}
}
