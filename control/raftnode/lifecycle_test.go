package raftnode_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/raftnode"
	"github.com/edge-relay/relay/control/server"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
	"github.com/edge-relay/relay/storage/raftlog"
	"github.com/edge-relay/relay/storage/state"
)

func TestOpenValidatesConfig(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	cases := map[string]raftnode.Config{
		"bad node id":           {NodeID: "a b", DataDir: dir, RaftBind: "127.0.0.1:0", APIAdvertise: "x"},
		"no data dir":           {NodeID: "a", RaftBind: "127.0.0.1:0", APIAdvertise: "x"},
		"no bind":               {NodeID: "a", DataDir: dir, APIAdvertise: "x"},
		"no api":                {NodeID: "a", DataDir: dir, RaftBind: "127.0.0.1:0"},
		"half tls":              {NodeID: "a", DataDir: dir, RaftBind: "127.0.0.1:0", APIAdvertise: "x", TLSServer: nil, TLSClient: nil, RaftAdvertise: "not an address"},
		"bad advertise":         {NodeID: "a", DataDir: dir, RaftBind: "127.0.0.1:0", APIAdvertise: "x", RaftAdvertise: "nohostport"},
		"unspecified advertise": {NodeID: "a", DataDir: dir, RaftBind: "127.0.0.1:0", APIAdvertise: "x", RaftAdvertise: "0.0.0.0:7401"},
		"no advertise host":     {NodeID: "a", DataDir: dir, RaftBind: "127.0.0.1:0", APIAdvertise: "x", RaftAdvertise: ":7401"},
		"bad advertise port":    {NodeID: "a", DataDir: dir, RaftBind: "127.0.0.1:0", APIAdvertise: "x", RaftAdvertise: "host:http"},
		"bind in use":           {NodeID: "a", DataDir: dir, RaftBind: "256.0.0.1:1", APIAdvertise: "x"},
		"every interface":       {NodeID: "a", DataDir: dir, RaftBind: "0.0.0.0:0", APIAdvertise: "x"},
		"every interface, v6":   {NodeID: "a", DataDir: dir, RaftBind: "[::]:0", APIAdvertise: "x"},
	}
	for name, cfg := range cases {
		t.Run(name, func(t *testing.T) {
			n, err := raftnode.Open(ctx, cfg)
			if err == nil {
				_ = n.Shutdown(ctx)
				t.Fatal("opened with an invalid config")
			}
		})
	}
}

// A backup file written by one cluster seeds a new one that continues its
// revisions; restoring over existing state is refused.
func TestRestoreFromBackupFile(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for i := 0; i < 20; i++ {
		if _, err := c.CreateUser(ctx, 0, fmt.Sprintf("b%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	src := c.Nodes[0].Server.Node()
	file := filepath.Join(t.TempDir(), "backup.bin")
	f, err := os.Create(file)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := src.FSM().WriteBackup(f)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}

	r := clustertest.Empty(t, clustertest.Options{})
	rn := r.StartNode(func(cfg *server.Config) { cfg.RestoreFrom = file })
	r.WaitReady()
	node := rn.Server.Node()
	for i := 0; i < 20; i++ {
		if _, err := node.FSM().GetUser(fmt.Sprintf("b%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	res, err := r.CreateUser(ctx, 0, "new")
	if err != nil {
		t.Fatal(err)
	}
	if res.GetRevision() <= idx {
		t.Fatalf("revision %d after restore, backup was at %d", res.GetRevision(), idx)
	}
	// The old cluster's node record is dropped, the new node's kept.
	clustertest.Eventually(t, 10*time.Second, func() error {
		nodes, err := node.FSM().Nodes()
		if err != nil {
			return err
		}
		if len(nodes) != 1 || nodes[0].GetId() != rn.ID {
			return fmt.Errorf("node records %v", nodes)
		}
		return nil
	})
	// The restored state starts a history of its own (the backup's was
	// the source cluster's), which a joining node receives with the state
	// by snapshot install.
	srcHistory, err := src.FSM().History()
	if err != nil {
		t.Fatal(err)
	}
	history, err := node.FSM().History()
	if err != nil || history == "" || history == srcHistory {
		t.Fatalf("history after restore %q (%v), source cluster's %q", history, err, srcHistory)
	}
	joined := r.AddNode()
	r.WaitReady()
	r.WaitConverged()
	if h, err := joined.Server.Node().FSM().History(); err != nil || h != history {
		t.Fatalf("joined node's history %q (%v), want %q", h, err, history)
	}

	// Restoring into a data dir that has state is refused, and the error
	// says what the usual cause (a node restored before, --restore still
	// set) needs, before the data loss emptying the directory would be.
	r.Shutdown(0)
	_, err = server.Start(ctx, server.Config{NodeID: rn.ID, DataDir: filepath.Join(rn.DataDir, "data"),
		RaftAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0", RestoreFrom: file})
	if err == nil || !strings.Contains(err.Error(), "restore needs an empty one") || !strings.Contains(err.Error(), "start it without --restore") {
		t.Fatalf("restore over existing state: %v", err)
	}
	// A missing file is reported as such.
	_, err = server.Start(ctx, server.Config{NodeID: "z", DataDir: t.TempDir(),
		RaftAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0", RestoreFrom: filepath.Join(t.TempDir(), "none")})
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("restore from a missing file: %v", err)
	}
}

// A restore reads its backup before the node's Raft port answers. The
// backup holds its source cluster's history, and the cluster check takes
// the history in the state for this node's: while it is there, that
// cluster's leader (which may well dial this address, a member's once)
// would be let in, and would stay in on its connection.
func TestARestoreImportsBeforeItsRaftPortAnswers(t *testing.T) {
	c, ctx := oneNodeWithUser(t, "imported")
	var backup bytes.Buffer
	if _, err := c.Nodes[0].Server.Node().FSM().WriteBackup(&backup); err != nil {
		t.Fatal(err)
	}
	addr := "127.0.0.1:" + freeTCPPort(t)
	answered := false
	cfg := raftnode.Config{NodeID: "r1", DataDir: t.TempDir(), RaftBind: addr, APIAdvertise: "127.0.0.1:1",
		RestoreFrom: "backup.bin", Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		OpenBackup: func(string) (io.ReadCloser, error) {
			return readCloser{Reader: bytes.NewReader(backup.Bytes()), close: func() {
				// Closed once the import is done.
				if conn, err := net.Dial("tcp", addr); err == nil {
					answered = true
					_ = conn.Close()
				}
			}}, nil
		}}
	n, err := raftnode.Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = n.Shutdown(ctx) }()
	if answered {
		t.Fatal("the Raft port answered as the backup was imported")
	}
	if _, err := n.FSM().GetUser("imported"); err != nil {
		t.Fatalf("the restored node lacks the backup's user: %v", err)
	}
}

type readCloser struct {
	io.Reader
	close func()
}

func (r readCloser) Close() error { r.close(); return nil }

// oneNodeWithUser starts a one-node cluster holding a user of that login,
// and returns it with a context for the test's calls.
func oneNodeWithUser(t *testing.T, login string) (*clustertest.Cluster, context.Context) {
	t.Helper()
	c := clustertest.Start(t, 1, clustertest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	if _, err := c.CreateUser(ctx, 0, login); err != nil {
		t.Fatal(err)
	}
	return c, ctx
}

// A data dir whose Raft data was removed but whose state store was kept
// does not start: Raft would begin a log the state store takes as
// applied, and this node would skip what its peers apply. The error says
// what to remove; with that gone, the node bootstraps afresh.
func TestStateAheadOfTheRaftDataIsRefused(t *testing.T) {
	c, ctx := oneNodeWithUser(t, "kept")
	c.Shutdown(0)
	dir := filepath.Join(c.Nodes[0].DataDir, "data")
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Name() != "state" {
			if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
				t.Fatal(err)
			}
		}
	}
	start := func() (*server.Server, error) {
		return server.Start(ctx, server.Config{NodeID: "n1", DataDir: dir, Bootstrap: true,
			RaftAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0", AdminAddr: "127.0.0.1:0"})
	}
	if srv, err := start(); !errors.Is(err, raftnode.ErrStateAhead) || !strings.Contains(err.Error(), filepath.Join(dir, "state")) {
		if srv != nil {
			_ = srv.Shutdown(ctx)
		}
		t.Fatalf("start with the raft data gone: %v", err)
	}
	if err := os.RemoveAll(filepath.Join(dir, "state")); err != nil {
		t.Fatal(err)
	}
	srv, err := start()
	if err != nil {
		t.Fatalf("start afresh: %v", err)
	}
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
}

// A node whose raft/ dir (the log, and the stable store with its term and
// vote) was lost while its snapshots and state survived does not start:
// it would be a voter at term 0 with no vote and a log ending at its
// snapshot, able to elect a candidate that lacks entries it had
// acknowledged. The error names the way back, which works: remove the
// node from its cluster, empty its data dir, join it again.
func TestALostRaftDirIsRefused(t *testing.T) {
	c, victim := snapshottedFollowerStopped(t, "r")
	ctx := ctxT(t, 2*time.Minute)
	id := c.Nodes[victim].ID
	dir := filepath.Join(c.Nodes[victim].DataDir, "data")
	if err := os.RemoveAll(filepath.Join(dir, "raft")); err != nil {
		t.Fatal(err)
	}
	cfg := server.Config{NodeID: id, DataDir: dir, RaftAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0", AdminAddr: "127.0.0.1:0"}
	srv, err := server.Start(ctx, cfg)
	if !errors.Is(err, raftnode.ErrRaftDataLost) || !strings.Contains(err.Error(), "relayctl cluster remove "+id) {
		if srv != nil {
			_ = srv.Shutdown(ctx)
		}
		t.Fatalf("start with the raft dir lost: %v", err)
	}

	leader := c.Leader()
	if _, err := c.Nodes[leader].Server.Node().RemoveServer(ctx, id); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	cfg.Join, cfg.JoinToken = []string{c.Nodes[leader].Server.APIAddr()}, c.AdminToken()
	srv, err = server.Start(ctx, cfg)
	if err != nil {
		t.Fatalf("join again with an empty data dir: %v", err)
	}
	t.Cleanup(func() { _ = srv.Shutdown(context.Background()) })
	clustertest.Eventually(t, time.Minute, func() error {
		_, err := srv.Node().FSM().GetUser("r29")
		return err
	})
}

// A restore that fails after the backup was imported (here: a backup
// without an applied index) leaves nothing of it in the state store: a
// node then started on the data dir is a new one.
func TestAFailedRestoreLeavesNoState(t *testing.T) {
	c, ctx := oneNodeWithUser(t, "from-backup")
	// The cluster's backup, less its applied index.
	var backup bytes.Buffer
	if _, err := c.Nodes[0].Server.Node().FSM().WriteBackup(&backup); err != nil {
		t.Fatal(err)
	}
	scratch, err := state.Open(state.Config{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer scratch.Close()
	if _, err := scratch.Import(&backup); err != nil {
		t.Fatal(err)
	}
	b := scratch.NewBatch()
	if err := b.Delete([]byte("m:applied")); err != nil {
		t.Fatal(err)
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "backup.bin")
	f, err := os.Create(file)
	if err != nil {
		t.Fatal(err)
	}
	snap := scratch.Snapshot()
	_, err = state.Export(f, snap)
	_ = snap.Close()
	if err != nil || f.Close() != nil {
		t.Fatalf("write backup: %v", err)
	}

	dir := t.TempDir()
	cfg := server.Config{NodeID: "r1", DataDir: dir, RaftAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0", AdminAddr: "127.0.0.1:0", RestoreFrom: file}
	if _, err := server.Start(ctx, cfg); err == nil || !strings.Contains(err.Error(), "no applied index") {
		t.Fatalf("restore of a backup without an applied index: %v", err)
	}
	cfg.RestoreFrom, cfg.Bootstrap = "", true
	srv, err := server.Start(ctx, cfg)
	if err != nil {
		t.Fatalf("start after the failed restore: %v", err)
	}
	defer func() { _ = srv.Shutdown(ctx) }()
	if _, err := srv.Node().FSM().GetUser("from-backup"); err == nil {
		t.Fatal("the failed restore's state stayed in the data dir")
	}
}

// A restore that fails after its Raft snapshot was written (the term
// could not be recorded) takes the snapshot away with the imported state:
// the data dir is empty again, and the same --restore then succeeds,
// without anyone emptying the directory by hand.
func TestARestoreFailingAfterItsSnapshotCanBeRunAgain(t *testing.T) {
	c, ctx := oneNodeWithUser(t, "from-backup")
	file := filepath.Join(t.TempDir(), "backup.bin")
	f, err := os.Create(file)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Nodes[0].Server.Node().FSM().WriteBackup(f); err != nil || f.Close() != nil {
		t.Fatalf("write backup: %v", err)
	}

	dir := t.TempDir()
	faults := &raftnode.Faults{}
	faults.FailRestoreTerm()
	cfg := server.Config{NodeID: "r1", DataDir: dir, RaftAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0", AdminAddr: "127.0.0.1:0",
		RestoreFrom: file, RaftFaults: faults}
	if _, err := server.Start(ctx, cfg); err == nil || !strings.Contains(err.Error(), "set term") {
		t.Fatalf("restore failing at its term: %v", err)
	}
	if has, err := raftnode.HasRaftState(dir); err != nil || has {
		t.Fatalf("after the failed restore the data dir holds raft state: %v, %v", has, err)
	}
	cfg.RaftFaults = nil
	srv, err := server.Start(ctx, cfg)
	if err != nil {
		t.Fatalf("restore again after the failed one: %v", err)
	}
	defer func() { _ = srv.Shutdown(ctx) }()
	if _, err := srv.Node().FSM().GetUser("from-backup"); err != nil {
		t.Fatalf("the restored node lacks the backup's user: %v", err)
	}
}

// A node whose state store was lost while its Raft log had been compacted
// rebuilds the state from its newest snapshot at start and converges.
func TestLostStateDirRecoversFromSnapshot(t *testing.T) {
	c, victim := snapshottedFollowerStopped(t, "l")
	if err := os.RemoveAll(filepath.Join(c.Nodes[victim].DataDir, "data", "state")); err != nil {
		t.Fatal(err)
	}
	c.Restart(victim)
	c.WaitReady()
	c.WaitConverged()
	if _, err := c.Nodes[victim].Server.Node().FSM().GetUser("l0"); err != nil {
		t.Fatalf("state not rebuilt: %v", err)
	}
}

// The node's Prometheus collector reports Raft state and indexes.
func TestMetricsCollector(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.CreateUser(ctx, 0, "m"); err != nil {
		t.Fatal(err)
	}
	node := c.Nodes[0].Server.Node()
	if err := node.Snapshot(); err != nil {
		t.Fatal(err)
	}
	mfs, err := c.Nodes[0].Server.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			switch {
			case m.GetGauge() != nil:
				key := mf.GetName()
				for _, l := range m.GetLabel() {
					key += "{" + l.GetValue() + "}"
				}
				got[key] = m.GetGauge().GetValue()
			case m.GetCounter() != nil:
				key := mf.GetName()
				for _, l := range m.GetLabel() {
					key += "{" + l.GetValue() + "}"
				}
				got[key] = m.GetCounter().GetValue()
			case m.GetHistogram() != nil:
				got[mf.GetName()+"_count"] = float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	checks := map[string]func(float64) bool{
		"relay_control_raft_state{Leader}":         func(v float64) bool { return v == 1 },
		"relay_control_raft_state{Follower}":       func(v float64) bool { return v == 0 },
		"relay_control_raft_has_leader":            func(v float64) bool { return v == 1 },
		"relay_control_ready":                      func(v float64) bool { return v == 1 },
		"relay_control_raft_voters":                func(v float64) bool { return v == 1 },
		"relay_control_raft_voter":                 func(v float64) bool { return v == 1 },
		"relay_control_raft_term":                  func(v float64) bool { return v >= 1 },
		"relay_control_fsm_applied_index":          func(v float64) bool { return v >= 3 },
		"relay_control_raft_commit_index":          func(v float64) bool { return v >= 3 },
		"relay_control_snapshots_total{ok}":        func(v float64) bool { return v >= 1 },
		"relay_control_snapshot_seconds_count":     func(v float64) bool { return v >= 1 },
		"relay_control_raft_commit_seconds_count":  func(v float64) bool { return v >= 1 },
		"relay_control_fsm_apply_seconds_count":    func(v float64) bool { return v >= 1 },
		"relay_control_fsm_applied_entries_total":  func(v float64) bool { return v >= 3 },
		"relay_control_read_barrier_seconds_count": func(v float64) bool { return v >= 1 },
		// Pebble's memory: each store has a memtable allocated.
		"relay_control_pebble_memory_bytes{state}{memtables}":        func(v float64) bool { return v > 0 },
		"relay_control_pebble_memory_bytes{log}{memtables}":          func(v float64) bool { return v > 0 },
		"relay_control_pebble_memory_bytes{state}{zombie_memtables}": func(v float64) bool { return v >= 0 },
		"relay_control_pebble_memory_bytes{log}{block_cache}":        func(v float64) bool { return v >= 0 },
	}
	for k, ok := range checks {
		v, present := got[k]
		if !present || !ok(v) {
			t.Errorf("metric %s = %v (present %v)", k, v, present)
		}
	}
}

// A node stopped (killed or shut down) while writes pour in answers every
// one of them: hashicorp/raft never answers an apply still queued in its
// buffered apply channel once it has shut down (hashicorp/raft#498), so
// the node lets the applies in flight finish before it stops Raft.
func TestStopAnswersEveryApplyInFlight(t *testing.T) {
	for round := 0; round < 6; round++ {
		c := clustertest.Start(t, 1, clustertest.Options{})
		node := c.Nodes[0].Server.Node()
		var acked atomic.Int64
		var wg sync.WaitGroup
		returned := make(chan struct{})
		for g := 0; g < 32; g++ {
			wg.Add(1)
			go func(g int) {
				defer wg.Done()
				for i := 0; ; i++ {
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					_, err := node.Apply(ctx, &statev1.Command{Op: &statev1.Command_Noop{Noop: &statev1.Noop{}}})
					cancel()
					if err != nil {
						return // the node is stopping
					}
					acked.Add(1)
				}
			}(g)
		}
		go func() { wg.Wait(); close(returned) }()
		clustertest.Eventually(t, 20*time.Second, func() error {
			if acked.Load() < 200 {
				return fmt.Errorf("%d applies acknowledged", acked.Load())
			}
			return nil
		})
		if round%2 == 0 {
			c.Kill(0)
		} else {
			c.Shutdown(0)
		}
		select {
		case <-returned:
		case <-time.After(20 * time.Second):
			t.Fatalf("round %d: applies still waiting 20s after the node stopped", round)
		}
	}
}

// A Raft address advertised by DNS name (a Kubernetes pod's name under
// its headless Service) stays a name in the cluster's configuration, and
// is resolved at each dial: a member that comes back on another IP is
// found again under its name. Resolving it once at start would pin the
// pod's first IP for ever.
func TestRaftAdvertisedByName(t *testing.T) {
	ports := make([]string, 3)
	for i := range ports {
		ports[i] = freeTCPPort(t)
	}
	c := clustertest.Start(t, 3, clustertest.Options{Configure: func(cfg *server.Config) {
		i := int(cfg.NodeID[1] - '1')
		cfg.RaftAddr = "127.0.0.1:" + ports[i]
		cfg.RaftAdvertise = "localhost:" + ports[i]
	}})
	for i := range c.Nodes {
		st, err := c.Nodes[i].Server.Node().Status()
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range st.Members {
			if !strings.HasPrefix(m.RaftAddr, "localhost:") {
				t.Fatalf("%s sees member %s at %q, want its advertised name", c.Nodes[i].ID, m.ID, m.RaftAddr)
			}
		}
	}
	// The cluster replicates over the names, and a restarted member
	// (resolved again) rejoins.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := c.CreateUser(ctx, c.Follower(), "by-name"); err != nil {
		t.Fatal(err)
	}
	c.Shutdown(c.Leader())
	for i, n := range c.Nodes {
		if n.Server == nil {
			c.Restart(i)
		}
	}
	c.WaitReady()
	if _, err := c.CreateUser(ctx, 0, "after-restart"); err != nil {
		t.Fatal(err)
	}
	c.WaitConverged()
}

func freeTCPPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return port
}

// A follower that crashed while installing a snapshot from the leader,
// after the snapshot was durable and before raft deleted the old log, is
// left with a log that ends before its newest snapshot. At the next
// start that log is dropped (as raft would have), so the entries the
// leader sends next, which follow the snapshot, are taken: the node's log
// then starts after the snapshot. (Kept, the old log's end refused every
// append that did not follow it, and the leader walked back an entry at
// a time to refill the gap.)
func TestALogBehindTheSnapshotIsDropped(t *testing.T) {
	c, victim := snapshottedFollowerStopped(t, "b")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dir := filepath.Join(c.Nodes[victim].DataDir, "data")
	snaps, err := raft.NewFileSnapshotStore(dir, 2, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	metas, err := snaps.List()
	if err != nil || len(metas) == 0 {
		t.Fatalf("snapshots: %v, %v", metas, err)
	}
	snap := metas[0].Index
	// The log as such a crash leaves it: ending before the snapshot.
	logs, err := raftlog.Open(raftlog.Config{Dir: filepath.Join(dir, "raft")})
	if err != nil {
		t.Fatal(err)
	}
	last, err := logs.LastIndex()
	if err != nil || last < snap {
		t.Fatalf("log ends at %d (%v), the snapshot at %d", last, err, snap)
	}
	if err := logs.DeleteRange(snap-5, last); err != nil {
		t.Fatal(err)
	}
	if err := logs.Close(); err != nil {
		t.Fatal(err)
	}
	c.Restart(victim)
	c.WaitReady()
	for i := range 5 {
		if _, err := c.CreateUser(ctx, c.Leader(), fmt.Sprintf("a%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	c.WaitConverged()
	if _, err := c.Nodes[victim].Server.Node().FSM().GetUser("a4"); err != nil {
		t.Fatalf("the restarted node lacks a user written after it came back: %v", err)
	}
	c.Shutdown(victim)
	logs, err = raftlog.Open(raftlog.Config{Dir: filepath.Join(dir, "raft")})
	if err != nil {
		t.Fatal(err)
	}
	defer logs.Close()
	if first, err := logs.FirstIndex(); err != nil || first <= snap {
		t.Fatalf("after the restart the log starts at %d (%v): the log behind snapshot %d was kept", first, err, snap)
	}
}

// snapshottedFollowerStopped starts a cluster of three, writes 30 users
// (ids prefix0...), has a follower take a snapshot of them and stops it;
// it returns the cluster and the follower.
func snapshottedFollowerStopped(t *testing.T, prefix string) (*clustertest.Cluster, int) {
	t.Helper()
	c := clustertest.Start(t, 3, clustertest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for i := range 30 {
		if _, err := c.CreateUser(ctx, c.Leader(), fmt.Sprintf("%s%d", prefix, i)); err != nil {
			t.Fatal(err)
		}
	}
	c.WaitConverged()
	victim := c.Follower()
	if err := c.Nodes[victim].Server.Node().Snapshot(); err != nil {
		t.Fatal(err)
	}
	c.Shutdown(victim)
	return c, victim
}
