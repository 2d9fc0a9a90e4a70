package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edge-relay/relay/control/auth"
	"github.com/edge-relay/relay/control/server"
	"github.com/edge-relay/relay/storage/raftlog"
)

// A node bootstrapping a new cluster refuses a first admin's password
// that no later password change would take; with state in its data dir
// (RELAY_ADMIN_PASSWORD is ignored then) or without --bootstrap it goes
// on.
func TestFirstAdminPasswordFollowsThePolicy(t *testing.T) {
	empty, used, volume, unjoined := t.TempDir(), t.TempDir(), t.TempDir(), t.TempDir()
	// A node's Raft store with a term in it (Raft state), and one a start
	// created before a join that never finished (none).
	for dir, term := range map[string]uint64{used: 1, unjoined: 0} {
		logs, err := raftlog.Open(raftlog.Config{Dir: filepath.Join(dir, "raft"), Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		if term > 0 {
			if err := logs.SetUint64([]byte("CurrentTerm"), term); err != nil {
				t.Fatal(err)
			}
		}
		if err := logs.Close(); err != nil {
			t.Fatal(err)
		}
	}
	// A fresh volume's root, as a StatefulSet mounts it.
	if err := os.Mkdir(filepath.Join(volume, "lost+found"), 0o700); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		cfg     server.Config
		refused bool
	}{
		{"weak, bootstrapping an empty dir", server.Config{Bootstrap: true, DataDir: empty, AdminPassword: "admin"}, true},
		{"weak, bootstrapping a fresh volume", server.Config{Bootstrap: true, DataDir: volume, AdminPassword: "admin"}, true},
		{"weak, bootstrapping a dir not made yet", server.Config{Bootstrap: true, DataDir: filepath.Join(empty, "new"), AdminPassword: "admin"}, true},
		{"strong, bootstrapping", server.Config{Bootstrap: true, DataDir: empty, AdminPassword: "a long admin password"}, false},
		{"weak, restarting with state", server.Config{Bootstrap: true, DataDir: used, AdminPassword: "admin"}, false},
		{"weak, bootstrapping after a join that did not finish", server.Config{Bootstrap: true, DataDir: unjoined, AdminPassword: "admin"}, true},
		{"weak, joining", server.Config{DataDir: empty, AdminPassword: "admin"}, false},
		{"none", server.Config{Bootstrap: true, DataDir: empty}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := checkFirstAdminPassword(tc.cfg)
			if refused := errors.Is(err, auth.ErrWeakPassword); refused != tc.refused {
				t.Errorf("err = %v; want refused %v", err, tc.refused)
			}
		})
	}
	// Through the command: it stops before it starts anything (and were
	// it to start a node, the cancelled context stops it at once).
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := run(ctx, []string{"control", "--bootstrap", "--data-dir", filepath.Join(empty, "cmd")}, io.Discard, io.Discard,
		func(k string) string {
			if k == "RELAY_ADMIN_PASSWORD" {
				return "short"
			}
			return ""
		})
	if !errors.Is(err, auth.ErrWeakPassword) {
		t.Errorf("relayd control --bootstrap with RELAY_ADMIN_PASSWORD=short: %v; want the password policy's error", err)
	}
	if _, err := os.Stat(filepath.Join(empty, "cmd")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the refused start left its data dir behind: %v", err)
	}
}

// An access-token lifetime a client would take for expired on arrival (a
// minute or less left counts as expired) is refused at start: every call
// would log in or refresh, a Raft write each.
func TestAShortAccessTokenLifetimeIsRefused(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	dir := filepath.Join(t.TempDir(), "data")
	err := run(ctx, []string{"control", "--bootstrap", "--data-dir", dir, "--access-token-ttl", "90s"}, io.Discard, io.Discard,
		func(string) string { return "" })
	if err == nil || !strings.Contains(err.Error(), "--access-token-ttl") {
		t.Fatalf("relayd control --access-token-ttl 90s: %v; want it refused", err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the refused start left its data dir behind: %v", err)
	}
}
