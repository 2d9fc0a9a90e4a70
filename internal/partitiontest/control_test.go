package partitiontest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/anishathalye/porcupine"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/internal/relaytest"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
)

// chaosConfig is the seed and length of a seeded run: RELAY_CHAOS_SEED
// (default: drawn, and printed), RELAY_CHAOS_DURATION (default short),
// and where histories go on failure (RELAY_CHAOS_OUT, else
// RELAY_ARTIFACT_DIR, else the system's temp dir).
func chaosConfig(t *testing.T, short time.Duration) (seed uint64, d time.Duration, out string) {
	t.Helper()
	seed = rand.Uint64() >> 12
	if v := os.Getenv("RELAY_CHAOS_SEED"); v != "" {
		s, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("RELAY_CHAOS_SEED=%q: %v", v, err)
		}
		seed = s
	}
	d = short
	if v := os.Getenv("RELAY_CHAOS_DURATION"); v != "" {
		var err error
		if d, err = time.ParseDuration(v); err != nil {
			t.Fatalf("RELAY_CHAOS_DURATION=%q: %v", v, err)
		}
	}
	dir := os.Getenv("RELAY_CHAOS_OUT")
	if dir == "" {
		dir = os.Getenv("RELAY_ARTIFACT_DIR")
	}
	if dir == "" {
		dir = os.TempDir()
	}
	out = filepath.Join(dir, fmt.Sprintf("relay-chaos-%s-%d", t.Name(), seed))
	t.Logf("seed %d, duration %v (replay: make chaos SEED=%d DURATION=%v RUN=%s)", seed, d, seed, d, t.Name())
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("FAILED with seed %d; replay: make chaos SEED=%d DURATION=%v RUN=%s", seed, seed, d, t.Name())
		}
	})
	return seed, d, out
}

// faultsFromEnv is RELAY_CHAOS_FAULTS, a comma-separated list of the
// nemesis's fault kinds (default: all of the test's).
func faultsFromEnv() []string {
	if v := os.Getenv("RELAY_CHAOS_FAULTS"); v != "" {
		return strings.Split(v, ",")
	}
	return nil
}

// startClients runs perNode workload clients against each control node
// until the returned stop is called.
func startClients(w *Workload, s *relaytest.System, perNode int, seed uint64) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	client := 0
	for _, n := range s.Control {
		for range perNode {
			rng := rand.New(rand.NewPCG(seed, uint64(client)))
			c := client
			wg.Go(func() { w.Run(ctx, c, n, rng) })
			client++
		}
	}
	return func() { cancel(); wg.Wait() }
}

// keepOnFailure keeps, when the test fails, what a report needs in out:
// every process's log and the history (even one that checked as
// linearizable); and logs answers that did not come from the API.
func keepOnFailure(t *testing.T, s *relaytest.System, w *Workload, out string) {
	t.Cleanup(func() {
		for _, o := range s.Odd() {
			t.Logf("an answer not from the API: %s", o)
		}
		if !t.Failed() {
			return
		}
		if err := s.DumpLogs(out); err != nil {
			t.Logf("keep the logs: %v", err)
		}
		if w != nil {
			if err := w.History.Save(out); err != nil {
				t.Logf("keep the history: %v", err)
			}
		}
		t.Logf("logs and history kept in %s", out)
	})
}

// checkHistory checks the workload's history for linearizability,
// giving the checker a time that grows with the run (long chaos runs
// make long histories).
func checkHistory(t *testing.T, w *Workload, out string, ran time.Duration) {
	t.Helper()
	ops := w.History.Ops()
	t.Logf("history: %d operations; %s", len(ops), w.Summary())
	if bad := w.Unexpected(); len(bad) > 0 {
		t.Errorf("answers outside the model (%d), first: %s", len(bad), bad[0])
	}
	start := time.Now()
	res, where, err := w.History.Check(Model(w.Initial), max(2*time.Minute, ran/2), out)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("porcupine: %s in %v", res, time.Since(start).Round(time.Millisecond))
	switch res {
	case porcupine.Ok:
	case porcupine.Illegal:
		t.Errorf("the history is not linearizable: history and visualisation in %s", where)
	default:
		t.Errorf("the linearizability check did not finish (%s): history in %s", res, where)
	}
}

// A leader cut off from its followers steps down within a few Raft
// timeouts; while cut off it answers no linearizable read, and a write
// sent to it fails with Unavailable (retryable) instead of hanging; the
// majority elects a new leader and takes writes; after healing the old
// leader follows, and the whole history the clients saw is linearizable.
func TestMinorityLeaderStepsDown(t *testing.T) {
	seed, _, out := chaosConfig(t, 0)
	s := relaytest.StartSystem(t, relaytest.SystemOptions{Relayd: relayd, ControlNodes: 3, Edges: -1})
	w := NewWorkload(s, 4, 2, 2*time.Second)
	keepOnFailure(t, s, w, out)
	stop := startClients(w, s, 2, seed)
	defer stop()
	time.Sleep(time.Second) // let the clients build some history before the split (workload time, not synchronisation)

	old := s.Leader(30 * time.Second)
	var majority []*relaytest.ControlNode
	var hosts []*relaytest.Host
	for _, n := range s.Control {
		if n != old {
			majority = append(majority, n)
			hosts = append(hosts, n.Host)
		}
	}
	cut := time.Now()
	s.Net.Partition([]*relaytest.Host{old.Host}, hosts)
	t.Logf("cut leader %s off from %s and %s", old.ID, majority[0].ID, majority[1].ID)

	// It steps down.
	clustertest.Eventually(t, 10*time.Second, func() error {
		st, err := s.Status(old, time.Second)
		if err != nil {
			return err
		}
		if st.GetState() == "Leader" {
			return fmt.Errorf("%s still leads (term %d)", old.ID, st.GetTerm())
		}
		return nil
	})
	t.Logf("old leader stepped down %v after the cut", time.Since(cut).Round(10*time.Millisecond))

	// No linearizable read there: Unavailable, within the node's wait
	// for a leader (5 s), not at the caller's deadline. A stale read
	// answers. A write fails the same way.
	call := func(what string, f func(ctx context.Context) error) (connect.Code, time.Duration) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		began := time.Now()
		err := f(ctx)
		took := time.Since(began)
		t.Logf("%s on the cut-off node: %v after %v", what, err, took.Round(10*time.Millisecond))
		if err == nil {
			return 0, took
		}
		return connect.CodeOf(err), took
	}
	code, took := call("linearizable read", func(ctx context.Context) error {
		_, err := s.Users(old).ListUsers(ctx, relaytest.Admin(s, &controlv1.ListUsersRequest{}))
		return err
	})
	if code != connect.CodeUnavailable || took > 15*time.Second {
		t.Errorf("linearizable read on the cut-off old leader: %v after %v, want Unavailable within 15s", code, took)
	}
	if code, _ := call("stale read", func(ctx context.Context) error {
		_, err := s.Users(old).ListUsers(ctx, relaytest.Admin(s, &controlv1.ListUsersRequest{Consistency: controlv1.ReadConsistency_READ_CONSISTENCY_STALE}))
		return err
	}); code != 0 {
		t.Errorf("stale read on the cut-off node: %v", code)
	}
	code, took = call("write", func(ctx context.Context) error {
		_, err := s.Users(old).CreateUser(ctx, relaytest.Admin(s, &controlv1.CreateUserRequest{Login: "written-in-minority"}))
		return err
	})
	if code != connect.CodeUnavailable || took > 15*time.Second {
		t.Errorf("write on the cut-off node: %v after %v, want Unavailable within 15s", code, took)
	}

	// The majority goes on.
	var leader *relaytest.ControlNode
	clustertest.Eventually(t, 20*time.Second, func() error {
		for _, n := range majority {
			if st, err := s.Status(n, time.Second); err == nil && st.GetState() == "Leader" {
				leader = n
				return nil
			}
		}
		return fmt.Errorf("no leader among the majority")
	})
	t.Logf("new leader %s %v after the cut", leader.ID, time.Since(cut).Round(10*time.Millisecond))
	wctx, wcancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer wcancel()
	if _, err := s.Users(majority[0]).CreateUser(wctx, relaytest.Admin(s, &controlv1.CreateUserRequest{Login: "written-in-majority"})); err != nil {
		t.Errorf("write in the majority: %v", err)
	}
	time.Sleep(2 * time.Second) // more history during the split (workload time)

	s.Net.Heal()
	healed := time.Now()
	clustertest.Eventually(t, 30*time.Second, func() error {
		st, err := s.Status(old, time.Second)
		if err != nil {
			return err
		}
		if st.GetLeaderId() == "" {
			return fmt.Errorf("%s sees no leader", old.ID)
		}
		if _, err := s.Users(old).ListUsers(wctx, relaytest.Admin(s, &controlv1.ListUsersRequest{})); err != nil {
			return err
		}
		return nil
	})
	t.Logf("old leader serves linearizable reads again %v after healing", time.Since(healed).Round(10*time.Millisecond))
	time.Sleep(time.Second) // history after healing (workload time)
	stop()
	checkHistory(t, w, out, 0)
}

// A seeded nemesis (partitions of the leader or any node, one-way cuts,
// SIGKILL and restart, SIGSTOP and SIGCONT) against clients on every
// node: the history is linearizable, and a watcher that follows the feed
// through every fault, failing over between nodes, sees every change
// exactly once and never goes back in time.
func TestControlPlaneNemesis(t *testing.T) {
	seed, d, out := chaosConfig(t, 20*time.Second)
	s := relaytest.StartSystem(t, relaytest.SystemOptions{Relayd: relayd, ControlNodes: 3, Edges: -1})
	w := NewWorkload(s, 4, 2, 2*time.Second)
	keepOnFailure(t, s, w, out)
	watcher := NewWatcher(t, s)
	wctx, wcancel := context.WithCancel(context.Background())
	var wwg sync.WaitGroup
	wwg.Go(func() { watcher.Run(wctx) })
	defer func() { wcancel(); wwg.Wait() }()

	stop := startClients(w, s, 2, seed)
	defer stop()
	nem := &Nemesis{S: s, Rng: rand.New(rand.NewPCG(seed, 1<<32)), Logf: t.Logf, Faults: faultsFromEnv()}
	nctx, ncancel := context.WithTimeout(context.Background(), d)
	defer ncancel()
	nem.Run(nctx)
	s.Net.Heal()
	// Everyone back: a leader and linearizable reads on every node.
	s.Leader(60 * time.Second)
	stop()
	t.Logf("nemesis steps: %d", len(nem.Steps))
	checkHistory(t, w, out, d)

	// The watcher catches up with the end of the log and matches a fresh
	// read of the whole feed.
	watcher.CheckAgainstFreshRead(t, 60*time.Second)
	wcancel()
	wwg.Wait()
}
