package server_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/server"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		goleak.IgnoreTopFunction("github.com/cockroachdb/pebble/v2/internal/cache.(*shard).releaseLoop"),
	)
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// /healthz answers while the process lives; /readyz only while the node
// sees a leader; /metrics carries the Raft and FSM figures; the Go
// profiler is there for an operator chasing memory or CPU.
func TestAdminEndpoints(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := c.CreateUser(ctx, 0, "m1"); err != nil {
		t.Fatal(err)
	}
	watch := c.Nodes[c.Follower()]
	admin := "http://" + watch.Server.AdminAddr()
	if code, _ := get(t, admin+"/healthz"); code != 200 {
		t.Fatalf("/healthz = %d", code)
	}
	if code, body := get(t, admin+"/readyz"); code != 200 {
		t.Fatalf("/readyz = %d %s", code, body)
	}
	_, metrics := get(t, admin+"/metrics")
	for _, want := range []string{
		`relay_control_raft_state{state="Follower"} 1`,
		"relay_control_fsm_applied_index",
		"relay_control_fsm_apply_seconds_bucket",
		"relay_control_raft_commit_index",
		"relay_control_read_barrier_seconds",
		"relay_control_raft_has_leader 1",
		"relay_control_ready 1",
		"relay_control_raft_voters 3",
		"relay_control_raft_voter 1",
		"go_goroutines",
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if code, body := get(t, admin+"/debug/pprof/heap?debug=1"); code != 200 || !strings.Contains(body, "heap profile:") {
		t.Errorf("/debug/pprof/heap = %d %.100q", code, body)
	}
	if code, body := get(t, admin+"/debug/pprof/goroutine?debug=1"); code != 200 || !strings.Contains(body, "raftnode") {
		t.Errorf("/debug/pprof/goroutine = %d, lacks the node's goroutines: %.100q", code, body)
	}
	// The leader serves RPCs: a write through a follower is forwarded to
	// it (asked again should the lead move meanwhile: a leader elected
	// after the cluster's start may not have served one yet).
	n := 0
	clustertest.Eventually(t, 30*time.Second, func() error {
		leader := c.Leader()
		n++
		if _, err := c.CreateUser(ctx, (leader+1)%len(c.Nodes), fmt.Sprintf("forwarded-%d", n)); err != nil {
			return err
		}
		_, lm := get(t, "http://"+c.Nodes[leader].Server.AdminAddr()+"/metrics")
		for _, want := range []string{`relay_control_raft_state{state="Leader"} 1`, "relay_control_raft_commit_seconds_count", "relay_control_rpc_seconds"} {
			if !strings.Contains(lm, want) {
				return fmt.Errorf("leader /metrics lacks %q", want)
			}
		}
		return nil
	})

	// Take away the quorum: the survivor stops being ready.
	for i, n := range c.Nodes {
		if n != watch {
			c.Kill(i)
		}
	}
	clustertest.Eventually(t, 20*time.Second, func() error {
		if code, _ := get(t, admin+"/readyz"); code != http.StatusServiceUnavailable {
			return errStatus(code)
		}
		return nil
	})
	if code, _ := get(t, admin+"/healthz"); code != 200 {
		t.Fatalf("/healthz without quorum = %d; the process is alive", code)
	}
}

// A bind to every interface without an advertised address is refused at
// start, naming the flag to set: advertised, [::]:port would lead each
// node that dials it back to itself.
func TestEveryInterfaceNeedsAnAdvertisedAddress(t *testing.T) {
	ctx := context.Background()
	for name, tc := range map[string]struct {
		raft, api, want string
	}{
		"raft on 0.0.0.0": {"0.0.0.0:0", "127.0.0.1:0", "--raft-advertise"},
		"raft on :port":   {":0", "127.0.0.1:0", "--raft-advertise"},
		"api on [::]":     {"127.0.0.1:0", "[::]:0", "--api-advertise"},
	} {
		t.Run(name, func(t *testing.T) {
			s, err := server.Start(ctx, server.Config{NodeID: "a", DataDir: t.TempDir(), RaftAddr: tc.raft, APIAddr: tc.api, Bootstrap: true})
			if err == nil {
				_ = s.Shutdown(ctx)
				t.Fatal("started")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("refused with %q, want it to name %s", err, tc.want)
			}
		})
	}
}

type errStatus int

func (e errStatus) Error() string { return http.StatusText(int(e)) }

func TestConfigValidation(t *testing.T) {
	ctx := context.Background()
	cases := map[string]server.Config{
		"no node id":   {DataDir: "x", RaftAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0"},
		"no data dir":  {NodeID: "a", RaftAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0"},
		"no raft addr": {NodeID: "a", DataDir: "x", APIAddr: "127.0.0.1:0"},
		"no api addr":  {NodeID: "a", DataDir: "x", RaftAddr: "127.0.0.1:0"},
		"half tls":     {NodeID: "a", DataDir: "x", RaftAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0", CertFile: "c"},
		"mailbox entries above the cap": {NodeID: "a", DataDir: "x", RaftAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0",
			Mailbox: api.MailboxConfig{MaxEntriesPerDevice: fsm.MaxMailboxQuotaEntries + 1}},
		"mailbox bytes above the cap": {NodeID: "a", DataDir: "x", RaftAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0",
			Mailbox: api.MailboxConfig{MaxBytesPerDevice: fsm.MaxMailboxQuotaBytes + 1}},
	}
	for name, cfg := range cases {
		t.Run(name, func(t *testing.T) {
			if s, err := server.Start(ctx, cfg); err == nil {
				_ = s.Shutdown(ctx)
				t.Fatal("started with an invalid config")
			}
		})
	}
}
