package server_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/raftnode"
	"github.com/edge-relay/relay/control/server"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

const passwordShownOnce = "initialized a new cluster; the first admin's password is shown only this once: log in and change it"

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// A new cluster without RELAY_ADMIN_PASSWORD gets a random first-admin
// password, logged exactly once in the cluster's life: not again by the
// members that join, nor by later leaders, nor after restarts.
func TestRandomAdminPasswordLoggedOnce(t *testing.T) {
	rec := clustertest.NewLogRecorder()
	c := clustertest.Empty(t, clustertest.Options{Logger: slog.New(rec)})
	first := c.StartNode(func(cfg *server.Config) { cfg.Bootstrap, cfg.AdminPassword = true, "" })
	c.WaitReady()
	var password string
	clustertest.Eventually(t, 20*time.Second, func() error {
		recs := rec.Find(passwordShownOnce, nil)
		if len(recs) != 1 {
			return fmt.Errorf("%d password records", len(recs))
		}
		password = recs[0].Attrs["password"].String()
		return nil
	})
	if len(password) < 20 || password == clustertest.AdminPassword {
		t.Fatalf("logged password %q: want a long random one", password)
	}
	token := c.Login("admin", password).GetAccessToken()
	for i := 0; i < 2; i++ {
		c.StartNode(func(cfg *server.Config) {
			cfg.Join, cfg.JoinToken, cfg.AdminPassword = []string{first.Server.APIAddr()}, token, ""
		})
	}
	c.WaitReady()
	ctx := ctxT(t, 2*time.Minute)
	// Every member leads once; each checks, finds the cluster initialized
	// and logs nothing more.
	for i, target := range c.Nodes {
		c.TransferLeadership(ctx, i)
		clustertest.Eventually(t, 20*time.Second, func() error {
			if len(rec.Find("cluster already initialized; nothing to do", func(r clustertest.Record) bool {
				return r.Attrs["test_node"].String() == target.ID
			})) == 0 && target != first {
				return fmt.Errorf("leader %s has not checked the initialization yet", target.ID)
			}
			return nil
		})
	}
	for i := range c.Nodes {
		c.Shutdown(i)
	}
	for i := range c.Nodes {
		c.Restart(i)
	}
	c.WaitReady()
	c.Login("admin", password)
	// The password appears in exactly one record of all the cluster's logs.
	found := rec.Find("", func(r clustertest.Record) bool {
		for _, v := range r.Attrs {
			if strings.Contains(v.String(), password) {
				return true
			}
		}
		return strings.Contains(r.Message, password)
	})
	if len(found) != 1 {
		t.Fatalf("the first admin's password appears in %d log records, want 1: %v", len(found), found)
	}
}

// The slow-operation log at a real threshold (1s): calls, Raft applies
// and read barriers that take less are not logged, those that take more
// are, with what an operator needs to find them. The slow ones are made
// slow by a paused leader: a follower's forwarded write and read index
// wait one forwarding attempt (1.5s) before the next leader answers.
func TestSlowOperationsAreLogged(t *testing.T) {
	const threshold = time.Second
	rec := clustertest.NewLogRecorder()
	c := clustertest.Start(t, 3, clustertest.Options{Logger: slog.New(rec), Configure: func(cfg *server.Config) {
		cfg.SlowThreshold, cfg.SlowRPCThreshold = threshold, threshold
		cfg.Raft.ForwardTimeout = 3 * threshold / 2
	}})
	ctx := ctxT(t, 2*time.Minute)
	f := c.Nodes[c.Follower()]
	d := api.NewDialer(nil)
	defer d.Close()
	users := controlv1connect.NewUserServiceClient(d.HTTPClient(), d.URL(f.Server.APIAddr()))
	admin := c.AdminToken()
	// createUser calls CreateUser through the follower with a request id
	// and returns how long it took as the client saw it (at least what
	// the node measured).
	createUser := func(rid, login string) time.Duration {
		t.Helper()
		req := connect.NewRequest(&controlv1.CreateUserRequest{Login: login})
		req.Header().Set("Authorization", "Bearer "+admin)
		req.Header().Set("X-Request-Id", rid)
		start := time.Now()
		resp, err := users.CreateUser(ctx, req)
		took := time.Since(start)
		if err != nil {
			t.Fatal(err)
		}
		if got := resp.Header().Get("X-Request-Id"); got != rid {
			t.Fatalf("response X-Request-Id %q, want %q", got, rid)
		}
		return took
	}
	slowRPC := func(rid string) []clustertest.Record {
		return rec.Find("slow rpc", func(r clustertest.Record) bool { return r.Attrs["request_id"].String() == rid })
	}
	count := func(msg string) int {
		return len(rec.Find(msg, func(r clustertest.Record) bool { return r.Attrs["test_node"].String() == f.ID }))
	}

	// Fast: a write through the follower and a read barrier there. A
	// loaded machine may make one slow; then the next one is tried.
	tries := 0
	clustertest.Eventually(t, time.Minute, func() error {
		tries++
		rid := fmt.Sprint("fast-", tries)
		applies, reads := count("slow raft apply"), count("slow linearizable read barrier")
		start := time.Now()
		createUser(rid, rid)
		if err := f.Server.Node().Barrier(ctx); err != nil {
			t.Fatal(err)
		}
		if took := time.Since(start); took >= threshold {
			return fmt.Errorf("the fast calls took %v, not below the threshold", took)
		}
		if len(slowRPC(rid)) != 0 || count("slow raft apply") != applies || count("slow linearizable read barrier") != reads {
			t.Fatalf("calls that took less than the %v threshold were logged as slow", threshold)
		}
		return nil
	})

	// pauseLeader pauses the leader once f knows it, so that f forwards
	// to it, and returns it.
	pauseLeader := func() int {
		l := c.Leader()
		clustertest.Eventually(t, 30*time.Second, func() error {
			if id, _ := f.Server.Node().Leader(); id != c.Nodes[l].ID {
				return fmt.Errorf("%s sees leader %q, not %s", f.ID, id, c.Nodes[l].ID)
			}
			return nil
		})
		c.Pause(l)
		t.Cleanup(func() { c.Heal(l) })
		return l
	}

	slowCreates := func() []clustertest.Record {
		return rec.Find("slow raft apply", func(r clustertest.Record) bool {
			return r.Attrs["op"].String() == "create_user" && r.Attrs["test_node"].String() == f.ID && r.Attrs["duration"].Duration() >= threshold
		})
	}

	// Slow: the leader pauses.
	l := pauseLeader()
	createsBefore := len(slowCreates())
	if took := createUser("slow-1", "slow-user"); took < threshold {
		t.Fatalf("the write took %v with the leader paused; the test needs more than %v", took, threshold)
	}
	rpc := slowRPC("slow-1")
	if len(rpc) != 1 {
		t.Fatalf("%d slow rpc records for the slow request, want 1", len(rpc))
	}
	r := rpc[0]
	if r.Level != slog.LevelWarn || r.Attrs["procedure"].String() != controlv1connect.UserServiceCreateUserProcedure ||
		r.Attrs["duration"].Kind() != slog.KindDuration || r.Attrs["duration"].Duration() < threshold ||
		r.Attrs["test_node"].String() != f.ID {
		t.Fatalf("slow rpc record %+v", r)
	}
	if _, ok := r.Attrs["trace_id"]; !ok {
		t.Fatalf("slow rpc record without trace_id: %+v", r)
	}
	// Only the records since the slow write: a fast try above that a
	// loaded machine made slow may have logged one too.
	apply := slowCreates()[createsBefore:]
	if len(apply) != 1 || apply[0].Level != slog.LevelWarn || apply[0].Attrs["revision"].Uint64() == 0 {
		t.Fatalf("slow raft apply records %+v, want the one of the slow write", apply)
	}

	// A read barrier on a node whose leader was just paused waits for the
	// next leader.
	// (An election slower than the barrier's wait for a leader, 5 s, on
	// a machine other tests load, is tried again.)
	var before int
	var start time.Time
	for attempt := 1; ; attempt++ {
		c.Heal(l)
		c.WaitConverged()
		f = c.Nodes[c.Follower()]
		l = pauseLeader()
		before = count("slow linearizable read barrier")
		start = time.Now()
		err := f.Server.Node().Barrier(ctx)
		if err == nil {
			break
		}
		if !errors.Is(err, raftnode.ErrNoLeader) || attempt == 3 {
			t.Fatal(err)
		}
	}
	if took := time.Since(start); took < threshold {
		t.Fatalf("the read barrier took %v with the leader paused; the test needs more than %v", took, threshold)
	}
	read := rec.Find("slow linearizable read barrier", func(r clustertest.Record) bool { return r.Attrs["test_node"].String() == f.ID })
	if len(read) != before+1 || read[len(read)-1].Attrs["op"].String() != "read_index" || read[len(read)-1].Attrs["duration"].Duration() < threshold {
		t.Fatalf("slow read barrier records %+v, want one more than %d", read, before)
	}
	// Every slow-operation line says whether a leader was known when the
	// operation began; one that began without (a node starting, an
	// election: the wait for a leader, logged on its own) is not a
	// warning.
	for _, msg := range []string{"slow raft apply", "slow linearizable read barrier"} {
		for _, r := range rec.Find(msg, func(clustertest.Record) bool { return true }) {
			known, ok := r.Attrs["leader_known"]
			if !ok || known.Kind() != slog.KindBool || (r.Level == slog.LevelWarn) != known.Bool() {
				t.Errorf("%s at level %v with leader_known %v", msg, r.Level, known)
			}
		}
	}
}

// Every control node serves the OpenAPI document, and it is the one
// committed in docs/.
func TestOpenAPIServedByEveryNode(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	committed, err := os.ReadFile("../../docs/openapi.json")
	if err != nil {
		t.Fatal(err)
	}
	var want any
	if err := json.Unmarshal(committed, &want); err != nil {
		t.Fatal(err)
	}
	for _, n := range c.Nodes {
		resp, err := http.Get("http://" + n.Server.APIAddr() + "/openapi.json")
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "application/json" {
			t.Fatalf("GET /openapi.json on %s: %d %q %v", n.ID, resp.StatusCode, resp.Header.Get("Content-Type"), err)
		}
		var got any
		if err := json.Unmarshal(body, &got); err != nil {
			t.Fatalf("/openapi.json on %s is not JSON: %v", n.ID, err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("/openapi.json on %s differs from docs/openapi.json", n.ID)
		}
	}
}

// The leader rotates the session and signing keys on their schedules;
// every replica sees the new keys with the retired ones kept for their
// grace period, and rotations are spaced by the interval, not by the
// leader's check tick.
func TestScheduledKeyRotation(t *testing.T) {
	const every = 300 * time.Millisecond
	rec := clustertest.NewLogRecorder()
	c := clustertest.Start(t, 3, clustertest.Options{Logger: slog.New(rec), Configure: func(cfg *server.Config) {
		cfg.SessionKeyRotateEvery, cfg.SigningKeyRotateEvery, cfg.SessionKeyGrace = every, every, time.Hour
	}})
	clustertest.Eventually(t, 30*time.Second, func() error {
		if n := len(rec.Find("rotated the session key on schedule", nil)); n < 2 {
			return fmt.Errorf("%d scheduled session key rotations", n)
		}
		if n := len(rec.Find("rotated the signing key on schedule", nil)); n < 2 {
			return fmt.Errorf("%d scheduled signing key rotations", n)
		}
		return nil
	})
	c.WaitConverged()
	for _, n := range c.Running() {
		f := n.Server.Node().FSM()
		ring, err := f.SessionKeyRing()
		if err != nil {
			t.Fatal(err)
		}
		if len(ring.GetKeys()) < 3 {
			t.Fatalf("%s: session ring holds %d keys, want the first and two rotated in", n.ID, len(ring.GetKeys()))
		}
		current := 0
		for _, k := range ring.GetKeys() {
			if k.GetId() == ring.GetCurrentId() {
				current++
				if k.GetRetiredAtMs() != 0 {
					t.Fatalf("%s: current key %s is retired", n.ID, k.GetId())
				}
			} else if k.GetExpiresAtMs()-k.GetRetiredAtMs() != time.Hour.Milliseconds() {
				t.Fatalf("%s: retired key %s kept for %dms, want the grace of 1h", n.ID, k.GetId(), k.GetExpiresAtMs()-k.GetRetiredAtMs())
			}
		}
		if current != 1 {
			t.Fatalf("%s: %d current session keys", n.ID, current)
		}
		keys, cur, err := f.SigningKeys()
		if err != nil || len(keys) < 3 || cur == "" {
			t.Fatalf("%s: signing keys %d, current %q, %v", n.ID, len(keys), cur, err)
		}
		for _, k := range keys {
			// A key is retired once the next was created, never sooner
			// than the interval after its own creation.
			if r := k.GetRetiredAtMs(); r != 0 && r-k.GetCreatedAtMs() < every.Milliseconds() {
				t.Fatalf("%s: signing key %s retired %dms after its creation, interval %v", n.ID, k.GetId(), r-k.GetCreatedAtMs(), every)
			}
		}
	}
}

// Every answer carries the request id, the caller's or a new one: the
// refusals too (a malformed request, an unknown record, a role that may
// not, no or a bad token), since those are what a caller asks about.
func TestErrorsCarryTheRequestID(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	base := "http://" + c.Nodes[0].Server.APIAddr()
	admin, user := c.AdminToken(), c.TokenFor("rid-user", controlv1.Role_ROLE_USER)
	post := func(procedure, token, rid, body string) (int, string) {
		t.Helper()
		req, err := http.NewRequestWithContext(ctxT(t, 30*time.Second), http.MethodPost, base+procedure, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		if rid != "" {
			req.Header.Set("X-Request-Id", rid)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode, strings.Join(resp.Header.Values("X-Request-Id"), ", ")
	}
	for _, tc := range []struct {
		name, procedure, token, body string
		status                       int
	}{
		{"ok", "/control.v1.UserService/GetMe", admin, "{}", http.StatusOK},
		{"invalid argument", "/control.v1.UserService/CreateUser", admin, `{"login":"carol","password":"short"}`, http.StatusBadRequest},
		{"not found", "/control.v1.UserService/GetUser", admin, `{"id":"u_nope"}`, http.StatusNotFound},
		{"permission denied", "/control.v1.UserService/ListUsers", user, "{}", http.StatusForbidden},
		{"no token", "/control.v1.UserService/GetMe", "", "{}", http.StatusUnauthorized},
		{"bad token", "/control.v1.UserService/GetMe", "garbage", "{}", http.StatusUnauthorized},
	} {
		status, got := post(tc.procedure, tc.token, "rid-"+strings.ReplaceAll(tc.name, " ", "-"), tc.body)
		if status != tc.status {
			t.Errorf("%s: status %d, want %d", tc.name, status, tc.status)
		}
		if want := "rid-" + strings.ReplaceAll(tc.name, " ", "-"); got != want {
			t.Errorf("%s: X-Request-Id %q, want the caller's %q", tc.name, got, want)
		}
		if _, got := post(tc.procedure, tc.token, "", tc.body); len(got) != 16 {
			t.Errorf("%s without a request id: X-Request-Id %q, want a new one", tc.name, got)
		}
	}
}
