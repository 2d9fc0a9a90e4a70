package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/server"
)

// runEnv runs relayctl with an environment and returns stdout, stderr
// and the error.
func runEnv(t *testing.T, env map[string]string, args ...string) (string, string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := run(ctx, args, strings.NewReader(""), &out, &errOut, func(k string) string { return env[k] })
	return out.String(), errOut.String(), err
}

// Every command answers --help (and -h) with its usage and succeeds,
// doing nothing else: `backup --help` writes no file named --help.
func TestHelpEverywhere(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	env := map[string]string{"RELAYCTL_CONFIG_DIR": dir, "RELAYCTL_SERVER": "http://127.0.0.1:1"}
	var paths [][]string
	var walk func(c *cobra.Command, path []string)
	walk = func(c *cobra.Command, path []string) {
		paths = append(paths, path)
		for _, sub := range c.Commands() {
			walk(sub, append(append([]string{}, path...), sub.Name()))
		}
	}
	walk((&app{}).rootCommand(), nil)
	if len(paths) < 25 {
		t.Fatalf("only %d commands found", len(paths))
	}
	for _, p := range paths {
		for _, h := range []string{"--help", "-h"} {
			out, _, err := runEnv(t, env, append(append([]string{}, p...), h)...)
			if err != nil || !strings.Contains(out, "Usage:") {
				t.Errorf("relayctl %s %s: %v, printed %q", strings.Join(p, " "), h, err, out)
			}
		}
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("--help left files behind: %v", entries)
	}
	if _, _, err := runEnv(t, env, "backup"); err == nil || !strings.Contains(err.Error(), "arg") {
		t.Errorf("backup without FILE: %v", err)
	}
	if _, _, err := runEnv(t, env, "nosuch"); err == nil || !strings.Contains(err.Error(), "unknown command") {
		t.Errorf("unknown command: %v", err)
	}
	out, _, err := runEnv(t, env, "completion", "bash")
	if err != nil || !strings.Contains(out, "relayctl") {
		t.Errorf("completion bash: %v", err)
	}
	// A completion script needs none of the settings: one the shell holds
	// for other commands, even a wrong one, does not fail it.
	for _, shell := range []string{"bash", "zsh", "fish", "powershell"} {
		bad := map[string]string{"RELAYCTL_CONFIG_DIR": dir, "RELAYCTL_TIMEOUT": "soon", "RELAYCTL_OUTPUT": "yaml"}
		if out, _, err := runEnv(t, bad, "completion", shell); err != nil || !strings.Contains(out, "relayctl") {
			t.Errorf("completion %s beside bad RELAYCTL_* variables: %v", shell, err)
		}
	}
	if _, _, err := runEnv(t, map[string]string{"RELAYCTL_CONFIG_DIR": dir, "RELAYCTL_TIMEOUT": "soon"}, "keys", "list"); err == nil ||
		!strings.Contains(err.Error(), "RELAYCTL_TIMEOUT") {
		t.Errorf("keys list with a bad RELAYCTL_TIMEOUT: %v", err)
	}
	if idempotencyKeyHeader != api.IdempotencyKeyHeader {
		t.Errorf("relayctl sends %q, the API reads %q", idempotencyKeyHeader, api.IdempotencyKeyHeader)
	}
}

// Global flags go before or after the command, or come from the
// environment.
func TestFlagsBeforeOrAfterTheCommand(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	srv := c.Nodes[0].Server.APIAddr()
	r := newCLI(t)
	r.must(srv, clustertest.AdminPassword+"\n", "login", "--password-stdin", "admin")
	isJSON := func(args []string, env map[string]string) {
		t.Helper()
		e := map[string]string{"RELAYCTL_CONFIG_DIR": r.dir, "RELAYCTL_SERVER": "http://" + srv}
		for k, v := range env {
			e[k] = v
		}
		out, _, err := runEnv(t, e, args...)
		var v map[string]any
		if err != nil || json.Unmarshal([]byte(out), &v) != nil {
			t.Errorf("relayctl %v (env %v): %v, printed %q; want one JSON object", args, env, err, out)
		}
	}
	isJSON([]string{"-o", "json", "cluster", "status"}, nil)
	isJSON([]string{"cluster", "status", "-o", "json"}, nil)
	isJSON([]string{"cluster", "-o", "json", "status"}, nil)
	isJSON([]string{"user", "create", "-o", "json", "--login", "ann", "--no-password"}, nil)
	isJSON([]string{"user", "create", "--login", "bea", "--no-password", "--output=json"}, nil)
	isJSON([]string{"--server", "http://" + srv, "user", "me"}, map[string]string{"RELAYCTL_OUTPUT": "json", "RELAYCTL_SERVER": "http://127.0.0.1:1"})
	isJSON([]string{"user", "me"}, map[string]string{"RELAYCTL_O": "json"})
	if _, _, err := runEnv(t, map[string]string{"RELAYCTL_CONFIG_DIR": r.dir}, "-o", "yaml", "user", "me"); err == nil || !strings.Contains(err.Error(), "table or json") {
		t.Errorf("-o yaml: %v", err)
	}
}

// A session outlives the member it was made on: with that member down,
// reads and writes go to the others (named in a note on stderr), a write
// retried there acts once, and a node that joined after the login is
// used because the cluster lists it.
func TestFailingMemberAndGrowingCluster(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	addr := func(i int) string { return c.Nodes[i].Server.APIAddr() }
	r := newCLI(t)
	r.must(addr(0), clustertest.AdminPassword+"\n", "login", "--password-stdin", "admin")
	env := map[string]string{"RELAYCTL_CONFIG_DIR": r.dir, "RELAYCTL_SERVER": "http://" + addr(0)}
	first := c.Nodes[0]
	c.Kill(0)

	out, stderr, err := runEnv(t, env, "-o", "json", "user", "create", "--login", "cara", "--no-password")
	if err != nil {
		t.Fatalf("user create with %s down: %v", first.ID, err)
	}
	if !strings.Contains(stderr, "node "+first.ID+" (http://"+first.APIAddr()+")") || !strings.Contains(stderr, "answered") {
		t.Errorf("stderr %q does not name the member that failed", stderr)
	}
	var u map[string]any
	if err := json.Unmarshal([]byte(out), &u); err != nil || u["login"] != "cara" {
		t.Fatalf("user create printed %q", out)
	}
	list, _, err := runEnv(t, env, "-o", "json", "user", "list")
	var users struct{ Users []struct{ Login string } }
	if err != nil || json.Unmarshal([]byte(list), &users) != nil {
		t.Fatalf("user list with %s down: %v\n%s", first.ID, err, list)
	}
	caras := 0
	for _, u := range users.Users {
		if u.Login == "cara" {
			caras++
		}
	}
	if caras != 1 {
		t.Fatalf("%d accounts cara after one create", caras)
	}

	// The cluster grows: a node that joined after the login is listed by
	// the cluster, so the session is used there too. The member the login
	// was made on is cut off from Raft while the node joins, so its own
	// list does not name the new node: the others' lists must be asked.
	c.Restart(0)
	c.WaitReady()
	tok := c.AdminToken()
	c.Isolate(0)
	defer c.Heal(0)
	n := c.StartNode(func(cfg *server.Config) {
		cfg.Join, cfg.JoinToken = []string{addr(1), addr(2)}, tok
	})
	out, _, err = runEnv(t, map[string]string{"RELAYCTL_CONFIG_DIR": r.dir, "RELAYCTL_SERVER": "http://" + n.Server.APIAddr()}, "-o", "json", "user", "me")
	var me map[string]any
	if err != nil || json.Unmarshal([]byte(out), &me) != nil || me["id"] != "admin" {
		t.Fatalf("user me on %s, which joined after the login: %v %q", n.ID, err, out)
	}
	// An unknown URL gets no token: it is not the cluster's.
	other := clustertest.Start(t, 1, clustertest.Options{})
	_, _, err = runEnv(t, map[string]string{"RELAYCTL_CONFIG_DIR": r.dir, "RELAYCTL_SERVER": "http://" + other.Nodes[0].Server.APIAddr()}, "user", "me")
	if err == nil || !strings.Contains(oneLine(err), "relayctl knows no login whose cluster lists http://"+other.Nodes[0].Server.APIAddr()+", so it sent none") {
		t.Fatalf("user me on another cluster: %v", err)
	}
}

// With the cluster out of quorum, a read fails with what the member that
// still runs answered (no leader), and the hint for it, however the
// attempts on the members that are down and the attempt the timeout cut
// short ended.
func TestNoQuorumSaysNoLeader(t *testing.T) {
	raft := clustertest.FastRaft()
	// The member answers after its retries outlast it (about 0.3 s),
	// well within relayctl's bound of a second per attempt; the run's
	// 1.2 s may then cut its next attempt short.
	raft.LeaderWait = 200 * time.Millisecond
	c := clustertest.Start(t, 3, clustertest.Options{Raft: raft})
	srv := c.Nodes[0].Server.APIAddr()
	r := newCLI(t)
	r.must(srv, clustertest.AdminPassword+"\n", "login", "--password-stdin", "admin")
	c.Kill(1)
	c.Kill(2)
	clustertest.Eventually(t, 30*time.Second, func() error {
		if st, err := c.Nodes[0].Server.Node().Status(); err != nil || st.LeaderID != "" {
			return fmt.Errorf("%s still sees a leader (%v)", c.Nodes[0].ID, err)
		}
		return nil
	})
	for range 3 {
		_, _, err := runEnv(t, map[string]string{"RELAYCTL_CONFIG_DIR": r.dir, "RELAYCTL_SERVER": "http://" + srv}, "--timeout", "1.2s", "user", "list")
		if err == nil {
			t.Fatal("user list without a quorum succeeded")
		}
		if msg := oneLine(err); !strings.Contains(msg, "(the cluster has no leader right now; retry shortly)") {
			t.Fatalf("user list without a quorum: %s; want the no-leader hint", msg)
		}
	}
	c.Kill(0)
	_, _, err := runEnv(t, map[string]string{"RELAYCTL_CONFIG_DIR": r.dir, "RELAYCTL_SERVER": "http://" + srv}, "--timeout", "1s", "user", "list")
	if msg := oneLine(err); !strings.Contains(msg, "(is the control plane running at --server / RELAYCTL_SERVER?)") {
		t.Fatalf("user list with every member down: %s; want the hint to check the address", msg)
	}
}

// A --server where nothing listens (a typo, a node not started) ends
// the command once every member refused the connection for
// noListenerGrace, and says so, rather than retrying for all of
// --timeout.
func TestNobodyListeningEndsTheRetries(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	env := map[string]string{"RELAYCTL_CONFIG_DIR": t.TempDir()}
	err = run(ctx, []string{"--server", "http://" + addr, "--timeout", "12s", "login", "--password-stdin", "admin"},
		strings.NewReader("a password\n"), io.Discard, io.Discard, func(k string) string { return env[k] })
	if err == nil || !strings.Contains(err.Error(), "every member refused the connection for 5s") || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("login where nothing listens: %v; want the refusal and the hint", err)
	}
	// The error keeps its code and cause for those who branch on them
	// (user passwd tells a call never sent from one that may have acted).
	var op *net.OpError
	if connect.CodeOf(err) != connect.CodeUnavailable || !errors.As(err, &op) || !retryable(err, retryIfNotSent) {
		t.Fatalf("the refusal lost its code or cause: %v (code %v)", err, connect.CodeOf(err))
	}
}

// The run of refusals counts only while every attempt is refused, and
// ends a call only once each member refused and noListenerGrace passed.
func TestNobodyListens(t *testing.T) {
	refusedErr := &net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
	other := &net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.EHOSTUNREACH)}
	t0 := time.Unix(1000, 0)
	var r nobodyListens
	if r.add(refusedErr, 3, t0, noListenerGrace) || r.add(refusedErr, 3, t0.Add(time.Second), noListenerGrace) || r.add(refusedErr, 3, t0.Add(4*time.Second), noListenerGrace) {
		t.Fatal("gave up before noListenerGrace")
	}
	if r.add(other, 3, t0.Add(5*time.Second), noListenerGrace) {
		t.Fatal("gave up on a failure that is not a refusal")
	}
	if r.add(refusedErr, 3, t0.Add(6*time.Second), noListenerGrace) || r.add(refusedErr, 3, t0.Add(12*time.Second), noListenerGrace) {
		t.Fatal("gave up before every member refused in the run (another failure came between)")
	}
	if !r.add(refusedErr, 3, t0.Add(13*time.Second), noListenerGrace) {
		t.Fatal("did not give up once every member refused for noListenerGrace")
	}
}

// version --client asks no server; version without it says relayctl's
// release, then fails with why the node's is unknown.
func TestVersionWithoutAServer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	env := map[string]string{"RELAYCTL_CONFIG_DIR": t.TempDir(), "RELAYCTL_SERVER": "http://" + addr}
	out, _, err := runEnv(t, env, "version", "--client")
	if err != nil || !strings.HasPrefix(out, "relayctl devel (go") || strings.Count(out, "\n") != 1 {
		t.Fatalf("version --client: %v, printed %q", err, out)
	}
	out, _, err = runEnv(t, env, "--timeout", "2s", "version")
	if err == nil || !strings.Contains(err.Error(), "the control node's release") || !strings.HasPrefix(out, "relayctl devel (go") {
		t.Fatalf("version with nobody listening: %v, printed %q", err, out)
	}
}

// h2cServer serves handler over HTTP/1 and h2c on 127.0.0.1, as the API
// does without TLS.
func h2cServer(t *testing.T, handler http.Handler) *httptest.Server {
	t.Helper()
	s := httptest.NewUnstartedServer(handler)
	s.Config.Protocols = new(http.Protocols)
	s.Config.Protocols.SetHTTP1(true)
	s.Config.Protocols.SetUnencryptedHTTP2(true)
	s.Start()
	t.Cleanup(s.Close)
	return s
}

// A redirect is not followed: the login's password (or a refresh token)
// is not sent again to wherever it points.
func TestARedirectIsNotFollowed(t *testing.T) {
	var reached atomic.Int32
	target := h2cServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reached.Add(1)
		w.WriteHeader(http.StatusNotFound)
	}))
	redirector := h2cServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, target.URL+r.URL.Path, http.StatusTemporaryRedirect)
	}))
	r := newCLI(t)
	_, err := r.run(strings.TrimPrefix(redirector.URL, "http://"), "a-password\n", "login", "--password-stdin", "admin")
	if err == nil {
		t.Fatal("a login answered by a redirect succeeded")
	}
	if n := reached.Load(); n != 0 {
		t.Fatalf("the redirect was followed %d times: the password went to its target", n)
	}
}
