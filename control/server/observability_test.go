package server_test

import (
	"context"
	"encoding/json"
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

// With tiny thresholds every RPC, Raft apply and read barrier is slow: the
// structured records carry what an operator needs to find the call.
func TestSlowOperationsAreLogged(t *testing.T) {
	rec := clustertest.NewLogRecorder()
	c := clustertest.Start(t, 3, clustertest.Options{Logger: slog.New(rec), Configure: func(cfg *server.Config) {
		cfg.SlowThreshold, cfg.SlowRPCThreshold = time.Nanosecond, time.Nanosecond
	}})
	ctx := ctxT(t, time.Minute)
	f := c.Nodes[c.Follower()]

	// An RPC, with the caller's request id.
	d := api.NewDialer(nil)
	defer d.Close()
	cl := controlv1connect.NewUserServiceClient(d.HTTPClient(), d.URL(f.Server.APIAddr()))
	req := connect.NewRequest(&controlv1.GetMeRequest{})
	req.Header().Set("Authorization", "Bearer "+c.AdminToken())
	req.Header().Set("X-Request-Id", "req-slow-1")
	resp, err := cl.GetMe(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.Header().Get("X-Request-Id"); got != "req-slow-1" {
		t.Fatalf("response X-Request-Id %q", got)
	}
	rpc := rec.Find("slow rpc", func(r clustertest.Record) bool { return r.Attrs["request_id"].String() == "req-slow-1" })
	if len(rpc) != 1 {
		t.Fatalf("%d slow rpc records for the request, want 1", len(rpc))
	}
	r := rpc[0]
	if r.Level != slog.LevelWarn || r.Attrs["procedure"].String() != controlv1connect.UserServiceGetMeProcedure ||
		r.Attrs["duration"].Kind() != slog.KindDuration || r.Attrs["duration"].Duration() <= 0 ||
		r.Attrs["test_node"].String() != f.ID {
		t.Fatalf("slow rpc record %+v", r)
	}
	if _, ok := r.Attrs["trace_id"]; !ok {
		t.Fatalf("slow rpc record without trace_id: %+v", r)
	}

	// A Raft apply through the follower (forwarded to the leader).
	res, err := c.CreateUser(ctx, c.Follower(), "slow")
	if err != nil {
		t.Fatal(err)
	}
	apply := rec.Find("slow raft apply", func(r clustertest.Record) bool {
		return r.Attrs["op"].String() == "create_user" && r.Attrs["revision"].Uint64() == res.GetRevision()
	})
	if len(apply) == 0 {
		t.Fatalf("no slow raft apply record for revision %d", res.GetRevision())
	}
	if a := apply[0]; a.Attrs["duration"].Duration() <= 0 || a.Level != slog.LevelWarn {
		t.Fatalf("slow raft apply record %+v", a)
	}

	// A linearizable read barrier.
	if err := f.Server.Node().Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	read := rec.Find("slow linearizable read barrier", func(r clustertest.Record) bool {
		return r.Attrs["test_node"].String() == f.ID && r.Attrs["revision"].Uint64() >= res.GetRevision()
	})
	if len(read) == 0 || read[0].Attrs["op"].String() != "read_index" || read[0].Attrs["duration"].Duration() <= 0 {
		t.Fatalf("slow read barrier records %+v", read)
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
