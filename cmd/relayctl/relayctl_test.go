package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"go.uber.org/goleak"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/backup"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		goleak.IgnoreTopFunction("github.com/cockroachdb/pebble/v2/internal/cache.(*shard).releaseLoop"),
	)
}

// cli runs relayctl in-process against a cluster, with its own token
// cache.
type cli struct {
	t   *testing.T
	dir string
}

func newCLI(t *testing.T) *cli { return &cli{t: t, dir: t.TempDir()} }

// adminLoggedIn starts a one-node cluster and a CLI logged in there as
// its admin: the node's API address, the CLI, and the environment that
// points relayctl at both (for runEnv).
func adminLoggedIn(t *testing.T) (srv string, r *cli, env map[string]string) {
	t.Helper()
	c := clustertest.Start(t, 1, clustertest.Options{})
	srv = c.Nodes[0].Server.APIAddr()
	r = newCLI(t)
	r.must(srv, clustertest.AdminPassword+"\n", "login", "--password-stdin", "admin")
	return srv, r, map[string]string{"RELAYCTL_CONFIG_DIR": r.dir, "RELAYCTL_SERVER": "http://" + srv}
}

func (c *cli) run(server, stdin string, args ...string) (string, error) {
	c.t.Helper()
	env := map[string]string{"RELAYCTL_CONFIG_DIR": c.dir, "RELAYCTL_SERVER": "http://" + server}
	var out, errOut bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := run(ctx, args, strings.NewReader(stdin), &out, &errOut, func(k string) string { return env[k] })
	return out.String(), err
}

func (c *cli) must(server, stdin string, args ...string) string {
	c.t.Helper()
	out, err := c.run(server, stdin, args...)
	if err != nil {
		c.t.Fatalf("relayctl %v: %v", args, err)
	}
	return out
}

// json runs a command with -o json and decodes its output.
func (c *cli) json(server, stdin string, args ...string) map[string]any {
	c.t.Helper()
	out := c.must(server, stdin, append([]string{"-o", "json"}, args...)...)
	var v map[string]any
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		c.t.Fatalf("relayctl -o json %v printed %q, not one JSON object: %v", args, out, err)
	}
	// Laid out one way whatever the build (protojson's own layout varies
	// on purpose): two-space indent, one space after a colon.
	var compact, laid bytes.Buffer
	if err := json.Compact(&compact, []byte(out)); err != nil {
		c.t.Fatal(err)
	}
	if err := json.Indent(&laid, compact.Bytes(), "", "  "); err != nil {
		c.t.Fatal(err)
	}
	if got := strings.TrimSuffix(out, "\n"); got != laid.String() {
		c.t.Fatalf("relayctl -o json %v printed\n%s\nnot laid out as\n%s", args, got, laid.String())
	}
	return v
}

func (c *cli) cache() map[string]savedTokens {
	c.t.Helper()
	m, err := (&tokenStore{path: filepath.Join(c.dir, "tokens.json")}).load()
	if err != nil {
		c.t.Fatal(err)
	}
	return m
}

// Every command answers -o json with one JSON object.
func TestJSONOutputForEveryCommand(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	srv := c.Nodes[0].Server.APIAddr()
	r := newCLI(t)
	if v := r.json(srv, clustertest.AdminPassword+"\n", "login", "--password-stdin", "admin"); v["role"] != "admin" || v["userId"] != "admin" {
		t.Fatalf("login: %v", v)
	}
	if v := r.json(srv, "", "token"); !strings.HasPrefix(v["accessToken"].(string), "ey") {
		t.Fatalf("token: %v", v)
	}
	u := r.json(srv, "", "user", "create", "--login", "dora", "--no-password")
	id, _ := u["id"].(string)
	if id == "" || u["login"] != "dora" {
		t.Fatalf("user create: %v", u)
	}
	r.json(srv, "", "user", "get", id)
	r.json(srv, "", "user", "me")
	r.json(srv, "", "user", "update", id, "--display-name", "Dora")
	if v := r.json(srv, "", "user", "list"); len(v["users"].([]any)) < 2 {
		t.Fatalf("user list: %v", v)
	}
	keyFile := filepath.Join(t.TempDir(), "phone.key")
	d := r.json(srv, "", "device", "register", "--user", id, "--name", "phone", "--generate-key", keyFile)
	dev, _ := d["id"].(string)
	if dev == "" {
		t.Fatalf("device register: %v", d)
	}
	// The revision that registered it, beside the record's fields, for
	// relay listen/send --min-revision.
	if rev, _ := d["revision"].(string); rev == "" || rev == "0" || strings.Trim(rev, "0123456789") != "" {
		t.Fatalf("device register printed revision %q: %v", d["revision"], d)
	}
	r.json(srv, "", "device", "list", "--user", id)
	r.json(srv, "", "device", "rename", dev, "tablet", "--user", id)
	if v := r.json(srv, "", "device", "revoke", dev, "--user", id); v["revoked"] != true {
		t.Fatalf("device revoke: %v", v)
	}
	if v := r.json(srv, "", "device", "delete", dev, "--user", id); v["id"] != dev || v["deleted"] != true {
		t.Fatalf("device delete: %v", v)
	}
	for _, k := range []string{"rotate-signing", "rotate-session"} {
		if v := r.json(srv, "", "keys", k); v["keyId"] == "" || v["keyId"] == nil {
			t.Fatalf("keys %s: %v", k, v)
		}
	}
	// --now: the session key just rotated in leaves at once instead of
	// after its grace, and so does the first one, retired by the plain
	// rotation (every control node here can apply that; control/api's
	// test covers a node that cannot). Text output says nothing more.
	c.WaitFeature(fsm.FeatureRetireAllKeys)
	if out := r.must(srv, "", "keys", "rotate-session", "--now"); !strings.HasPrefix(out, "new session key ") || strings.Contains(out, "keep their time") {
		t.Fatalf("keys rotate-session --now: %q", out)
	}
	rot := r.json(srv, "", "keys", "rotate-session", "--now")
	if rot["keyId"] == "" || rot["keyId"] == nil || rot["olderRetired"] != true {
		t.Fatalf("keys rotate-session --now: %v", rot)
	}
	r.must(srv, "", "keys", "rotate-session")
	if v := r.json(srv, "", "keys", "list"); len(v["sessionKeys"].([]any)) != 2 {
		t.Fatalf("keys list after a rotation: %v, want 2 session keys (the new one, the one before in its grace)", v["sessionKeys"])
	}
	r.json(srv, "", "keys", "rotate-session", "--now")
	if v := r.json(srv, "", "keys", "list"); len(v["sessionKeys"].([]any)) != 1 {
		t.Fatalf("keys list after rotate-session --now: %v, want the new session key alone", v["sessionKeys"])
	}
	// The cluster's identity in the Raft cluster check: 16 random bytes, hex.
	if v := r.json(srv, "", "cluster", "status"); len(fmt.Sprint(v["history"])) != 32 || !strings.HasPrefix(fmt.Sprint(v["version"]), "devel (") {
		t.Fatalf("cluster status names no history or no release: %v", v)
	}
	// Gated apply goes on once every member records it (here at once).
	clustertest.Eventually(t, 30*time.Second, func() error {
		if v := r.json(srv, "", "cluster", "status"); v["gatedApply"] != true {
			return fmt.Errorf("cluster status: gated apply %v", v["gatedApply"])
		}
		return nil
	})
	if out := r.must(srv, "", "cluster", "status"); !strings.Contains(out, "\ngated apply on\n") {
		t.Fatalf("cluster status says nothing of gated apply:\n%s", out)
	}
	// The release of relayctl and of the node that answers (a test binary
	// is not stamped: "devel").
	if v := r.json(srv, "", "version"); !strings.HasPrefix(fmt.Sprint(v["client"]), "devel (go") ||
		!strings.HasPrefix(fmt.Sprint(v["server"]), "devel (go") || v["nodeId"] == "" || v["nodeId"] == nil {
		t.Fatalf("version: %v", v)
	}
	if v := r.json(srv, "", "cluster", "transfer-leader"); v["leaderId"] == nil {
		t.Fatalf("cluster transfer-leader: %v", v)
	}
	if v := r.json(srv, "", "backup", filepath.Join(t.TempDir(), "b.bin")); v["records"].(float64) == 0 {
		t.Fatalf("backup: %v", v)
	}
	// With a leader known, a stale backup catches up first like any
	// other; it says which member's state it holds.
	if out := r.must(srv, "", "backup", "--stale", filepath.Join(t.TempDir(), "s.bin")); !strings.Contains(out, "stale: applied index") || !strings.Contains(out, "verified") {
		t.Fatalf("backup --stale: %s", out)
	}
	testBackupKeys(t, r, srv)
	if v := r.json(srv, "", "user", "delete", id); v["id"] != id || v["deleted"] != true {
		t.Fatalf("user delete: %v", v)
	}
	if v := r.json(srv, "", "logout"); v["loggedOut"] != true {
		t.Fatalf("logout: %v", v)
	}
	if v := r.json(srv, "", "logout"); v["loggedOut"] != false {
		t.Fatalf("second logout: %v", v)
	}
}

// A staff login through one node is used for the cluster's other nodes;
// a user's login (who may not read the member list) stays with its URL.
func TestLoginSharedAcrossClusterNodes(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	n0, n1, n2 := c.Nodes[0].Server.APIAddr(), c.Nodes[1].Server.APIAddr(), c.Nodes[2].Server.APIAddr()
	admin := newCLI(t)
	v := admin.json(n0, clustertest.AdminPassword+"\n", "login", "--password-stdin", "admin")
	if also := v["alsoFor"].([]any); len(also) != 2 {
		t.Fatalf("login lists %v as the other members, want the two other nodes", also)
	}
	for _, n := range []string{n1, n2} {
		if me := admin.json(n, "", "user", "me"); me["id"] != "admin" {
			t.Fatalf("user me on %s with the login made on %s: %v", n, n0, me)
		}
	}
	if len(admin.cache()) != 1 {
		t.Fatalf("cache holds %d sessions, want the one", len(admin.cache()))
	}
	// Logging out through another member ends the one session.
	admin.must(n2, "", "logout")
	if _, err := admin.run(n0, "", "user", "me"); connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("after logout: %v", err)
	}

	admin.must(n0, clustertest.AdminPassword+"\n", "login", "--password-stdin", "admin")
	admin.must(n0, "password-of-erin\n", "user", "create", "--login", "erin", "--password-stdin")
	user := newCLI(t)
	user.must(n0, "password-of-erin\n", "login", "--password-stdin", "erin")
	user.must(n0, "", "user", "me")
	_, err := user.run(n1, "", "user", "me")
	if connect.CodeOf(err) != connect.CodeUnauthenticated || !strings.Contains(oneLine(err), "a member your role cannot list") ||
		!strings.Contains(oneLine(err), "relayctl login --server URL") {
		t.Fatalf("a user's session used on another URL: %v (%s)", err, oneLine(err))
	}
}

// An access token the server no longer accepts is replaced through the
// refresh token without the user noticing; the rotated tokens are saved.
func TestExpiredAccessTokenIsRefreshed(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{Auth: api.AuthConfig{AccessTTL: time.Second, Leeway: time.Millisecond}})
	srv := c.Nodes[0].Server.APIAddr()
	r := newCLI(t)
	r.must(srv, clustertest.AdminPassword+"\n", "login", "--password-stdin", "admin")
	before := r.cache()["http://"+srv]
	// Wait until the server itself refuses the cached access token.
	cl := controlv1connect.NewUserServiceClient(httpClientForTest(t), "http://"+srv)
	clustertest.Eventually(t, 20*time.Second, func() error {
		req := connect.NewRequest(&controlv1.GetMeRequest{})
		req.Header().Set("Authorization", "Bearer "+before.AccessToken)
		_, err := cl.GetMe(context.Background(), req)
		if connect.CodeOf(err) != connect.CodeUnauthenticated {
			return errString("the access token is still accepted")
		}
		return nil
	})
	if me := r.json(srv, "", "user", "me"); me["id"] != "admin" {
		t.Fatalf("user me with an expired access token: %v", me)
	}
	after := r.cache()["http://"+srv]
	if after.AccessToken == before.AccessToken || after.RefreshToken == before.RefreshToken || after.RefreshToken == "" {
		t.Fatal("the tokens were not refreshed and saved")
	}
	if info, err := os.Stat(filepath.Join(r.dir, "tokens.json")); err != nil || info.Mode().Perm() != 0o600 {
		t.Fatalf("token cache mode %v (%v), want 0600", info.Mode().Perm(), err)
	}
}

// A session whose refresh token expired is still presented once: if a
// copy of the token cache was refreshed elsewhere first, the cluster
// sees the reuse (it keeps rotated tokens until the login ends), relayctl
// says so, and the copy's session ends too.
func TestAnExpiredSessionIsPresentedOnce(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{Auth: api.AuthConfig{AccessTTL: time.Second, RefreshTTL: 3 * time.Second,
		LoginMaxAge: time.Hour, Leeway: time.Millisecond}})
	c.WaitFeatureUsable(fsm.FeatureRefreshKeepRotated)
	srv := c.Nodes[0].Server.APIAddr()
	r := newCLI(t)
	r.must(srv, clustertest.AdminPassword+"\n", "login", "--password-stdin", "admin")
	stolen := r.cache()["http://"+srv]
	auth := controlv1connect.NewAuthServiceClient(httpClientForTest(t), "http://"+srv)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	copied, err := auth.Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: stolen.RefreshToken}))
	if err != nil {
		t.Fatalf("the copy's refresh: %v", err)
	}
	clustertest.Eventually(t, time.Minute, func() error {
		if !time.Now().After(stolen.RefreshExpires) {
			return errString("the cached refresh token has not expired yet")
		}
		return nil
	})
	_, err = r.run(srv, "", "user", "me")
	if connect.CodeOf(err) != connect.CodeUnauthenticated || !strings.Contains(err.Error(), "already used") || !strings.Contains(err.Error(), "run relayctl login") {
		t.Fatalf("user me with an expired session whose copy was refreshed: %v", err)
	}
	if _, ok := r.cache()["http://"+srv]; ok {
		t.Fatal("the ended session is still cached")
	}
	if _, err := auth.Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: copied.Msg.GetTokens().GetRefreshToken()})); connect.CodeOf(err) != connect.CodeUnauthenticated ||
		!strings.Contains(err.Error(), "revoked") {
		t.Fatalf("the copy's refresh after the reuse: %v, want refused, its session revoked", err)
	}
}

// A cached login whose refresh token expired is presented only for a
// command that names its server: looking for a session among the cached
// ones (a server no login names) skips it, so a cluster that is gone
// does not make every run wait on it.
func TestAnExpiredLoginIsNotTriedForAnotherServer(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	srv := c.Nodes[0].Server.APIAddr()
	gone, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan string, 64) // the peers' addresses
	go func() {
		for {
			conn, err := gone.Accept()
			if err != nil {
				return
			}
			accepted <- conn.RemoteAddr().String()
			_ = conn.Close()
		}
	}()
	t.Cleanup(func() { _ = gone.Close() })
	r := newCLI(t)
	past := time.Now().Add(-time.Hour)
	if err := (&tokenStore{path: filepath.Join(r.dir, "tokens.json")}).put("http://"+gone.Addr().String(), &savedTokens{
		AccessToken: "at", AccessExpires: past, RefreshToken: "rt_AAAAAAAAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", RefreshExpires: past,
		UserID: "admin"}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.run(srv, "", "user", "me"); connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("user me without a login for the server: %v", err)
	}
	// A dial of our own: accepted after anything relayctl sent there.
	marker, err := net.Dial("tcp", gone.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer marker.Close()
	for waiting := true; waiting; {
		select {
		case peer := <-accepted:
			if waiting = peer != marker.LocalAddr().String(); waiting {
				t.Errorf("relayctl connected to the server of the expired login (from %s)", peer)
			}
		case <-time.After(time.Minute):
			t.Fatal("the marker connection was not accepted")
		}
	}
}

// A login replaces the cached session of its server: the replaced one
// is logged out when it is the same account's (a copy of the cache
// stops working), and left alone when it is another account's.
func TestALoginEndsTheSessionItReplaces(t *testing.T) {
	srv, r, _ := adminLoggedIn(t)
	auth := controlv1connect.NewAuthServiceClient(httpClientForTest(t), "http://"+srv)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	refresh := func(tok string) error {
		_, err := auth.Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: tok}))
		return err
	}
	first := r.cache()["http://"+srv]
	r.must(srv, clustertest.AdminPassword+"\n", "login", "--password-stdin", "admin")
	// Logged out: its refresh token is refused, as revoked, or, once
	// the cluster uses the feature session_cap (which this young cluster
	// may not yet), as deleted.
	if err := refresh(first.RefreshToken); connect.CodeOf(err) != connect.CodeUnauthenticated ||
		!strings.Contains(err.Error(), "revoked") && !strings.Contains(err.Error(), "not recognised") {
		t.Fatalf("the replaced session's refresh token: %v, want refused, its session ended", err)
	}
	second := r.cache()["http://"+srv]
	r.must(srv, "password-of-erin\n", "user", "create", "--login", "erin", "--password-stdin")
	r.must(srv, "password-of-erin\n", "login", "--password-stdin", "erin")
	if err := refresh(second.RefreshToken); err != nil {
		t.Fatalf("the admin's session replaced by erin's login: %v, want it left alone", err)
	}
}

// Without a login name and without a terminal to ask on, login says what
// to do instead of waiting.
func TestLoginNeedsNameWithoutTerminal(t *testing.T) {
	r := newCLI(t)
	for _, args := range [][]string{{"login"}, {"login", "--password-stdin"}} {
		_, err := r.run("127.0.0.1:1", "secret\n", args...)
		if err == nil || !strings.Contains(err.Error(), "login name missing") {
			t.Fatalf("relayctl %v: %v", args, err)
		}
	}
	if got, err := readLine(strings.NewReader("alice\r\nrest")); got != "alice" || err != nil {
		t.Fatalf("readLine: %q %v", got, err)
	}
}

type errString string

func (e errString) Error() string { return string(e) }

func httpClientForTest(t *testing.T) *http.Client {
	c, err := httpClient([]string{"http://x"}, "", "", "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.CloseIdleConnections)
	return c
}

// An encrypted backup from relayctl: keygen writes a key only its owner
// reads, backup --key-file encrypts to it, and backup verify checks the
// file offline and tells a missing key, another key and a modified file
// apart.
func testBackupKeys(t *testing.T, r *cli, srv string) {
	dir := t.TempDir()
	keyFile, otherKey := filepath.Join(dir, "backup.key"), filepath.Join(dir, "other.key")
	k := r.json(srv, "", "backup", "keygen", keyFile)
	r.must(srv, "", "backup", "keygen", otherKey)
	if fi, err := os.Stat(keyFile); err != nil || fi.Mode().Perm() != 0o600 || !strings.HasPrefix(k["recipient"].(string), "age1") {
		t.Fatalf("keygen: %v %v", k, err)
	}
	if _, err := r.run(srv, "", "backup", "keygen", keyFile); err == nil {
		t.Fatal("keygen overwrote an existing key file")
	}
	file := filepath.Join(dir, "b.bin.age")
	if v := r.json(srv, "", "backup", "--key-file", keyFile, file); v["encrypted"] != true || v["records"].(float64) == 0 {
		t.Fatalf("encrypted backup: %v", v)
	}
	v := r.json(srv, "", "backup", "verify", "--key-file", keyFile, file)
	if v["encrypted"] != true || v["records"].(float64) == 0 || v["applied_index"].(float64) == 0 {
		t.Fatalf("backup verify: %v", v)
	}
	if out := r.must(srv, "", "backup", "verify", "--key-file", keyFile, file); !strings.Contains(out, "verified") || !strings.Contains(out, k["recipient"].(string)) {
		t.Fatalf("backup verify: %s", out)
	}
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	raw[len(raw)-10] ^= 1
	bad := filepath.Join(dir, "bad.bin.age")
	if err := os.WriteFile(bad, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	// A backup directory: every scheduled backup in it, oldest first.
	bdir := filepath.Join(dir, "backups")
	if err := os.Mkdir(bdir, 0o700); err != nil {
		t.Fatal(err)
	}
	good, _ := os.ReadFile(file)
	now := time.Now()
	for i, b := range [][]byte{good, good} {
		if err := os.WriteFile(filepath.Join(bdir, backup.FileName(now.Add(time.Duration(i)*time.Hour), true)), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if out := r.must(srv, "", "backup", "verify", "--key-file", keyFile, bdir); strings.Count(out, "verified") != 2 {
		t.Fatalf("backup verify DIR: %s", out)
	}
	if err := os.WriteFile(filepath.Join(bdir, backup.FileName(now.Add(-time.Hour), true)), raw, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := r.run(srv, "", "backup", "verify", "--key-file", keyFile, bdir); err == nil {
		t.Error("backup verify DIR passed with a tampered backup in it")
	}
	for _, c := range []struct {
		args []string
		want error
	}{
		{[]string{file}, backup.ErrKeyRequired},
		{[]string{"--key-file", otherKey, file}, backup.ErrWrongKey},
		{[]string{"--key-file", keyFile, bad}, backup.ErrTampered},
	} {
		if _, err := r.run(srv, "", append([]string{"backup", "verify"}, c.args...)...); !errors.Is(err, c.want) {
			t.Errorf("backup verify %v: %v, want %v", c.args, err, c.want)
		}
	}
}

// relayctl user passwd changes the logged-in account's password with its
// current one (two lines on standard input): relayctl's own session goes
// on, the account's other logins end, the old password opens nothing; a
// wrong current password changes nothing and says which field was wrong.
func TestPasswd(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	srv := c.Nodes[0].Server.APIAddr()
	admin := newCLI(t)
	admin.must(srv, clustertest.AdminPassword+"\n", "login", "--password-stdin", "admin")
	admin.must(srv, "the first password\n", "user", "create", "--login", "erin", "--password-stdin")
	erin, other := newCLI(t), newCLI(t)
	erin.must(srv, "the first password\n", "login", "--password-stdin", "erin")
	other.must(srv, "the first password\n", "login", "--password-stdin", "erin")

	if out, err := erin.run(srv, "not the password\nthe second password\n", "user", "passwd", "--password-stdin"); err == nil || !strings.Contains(err.Error(), "current_password") {
		t.Fatalf("a wrong current password: %q, %v; want an error naming current_password", out, err)
	}
	if _, err := erin.run(srv, "the first password\n", "user", "passwd", "--password-stdin"); err == nil || !strings.Contains(err.Error(), "new password") {
		t.Fatalf("no new password: %v; want an error saying so", err)
	}
	if v := erin.json(srv, "the first password\nthe second password\n", "user", "passwd", "--password-stdin"); v["changed"] != true {
		t.Fatalf("user passwd: %v", v)
	}
	if v := erin.json(srv, "", "user", "me"); v["login"] != "erin" {
		t.Fatalf("relayctl's own session after the change: %v", v)
	}
	clustertest.Eventually(t, 10*time.Second, func() error {
		if _, err := other.run(srv, "", "user", "me"); err == nil || !strings.Contains(err.Error(), "log in again") {
			return fmt.Errorf("the other login after the change: %v; want it ended", err)
		}
		return nil
	})
	if _, err := newCLI(t).run(srv, "the first password\n", "login", "--password-stdin", "erin"); err == nil {
		t.Fatal("the old password still logs in")
	}
	newCLI(t).must(srv, "the second password\n", "login", "--password-stdin", "erin")
}

// When user passwd fails without an answer, it says the change may have
// taken effect only if a member may have taken the request: not when no
// connection was ever made.
func TestPasswdSaysWhetherTheChangeMayHaveTakenEffect(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	srv := c.Nodes[0].Server.APIAddr()
	admin := newCLI(t)
	admin.must(srv, clustertest.AdminPassword+"\n", "login", "--password-stdin", "admin")
	c.Stop() // the session's members now refuse connections

	// A member that takes the connection and never answers.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan net.Conn, 8)
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- conn
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		for conn := range accepted {
			_ = conn.Close()
		}
	})

	const hint = "may have taken effect"
	stdin := clustertest.AdminPassword + "\nthe next admin password\n"
	_, err = admin.run(srv, stdin, "--timeout", "2s", "user", "passwd", "--password-stdin")
	if err == nil || strings.Contains(err.Error(), hint) || !strings.Contains(err.Error(), "refused") {
		t.Errorf("every member refusing the connection: %v; want the refusal without %q", err, hint)
	}
	_, err = admin.run(ln.Addr().String(), stdin, "--timeout", "2s", "user", "passwd", "--password-stdin")
	if err == nil || !strings.Contains(err.Error(), hint) {
		t.Errorf("a member that took the request and did not answer: %v; want %q", err, hint)
	}
}
