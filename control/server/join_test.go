package server_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/server"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

// A voter that lost its data (a new volume under the same pod name, a
// wiped disk) is not taken back as the same voter: Raft counted it in
// the majorities that committed entries, and with an empty log it would
// vote for a candidate lacking them. Its join is refused, and tried again
// until an operator removes the old member; then it joins as a new one,
// without a restart, and catches up. The seed, started with --bootstrap
// beside --join, does not found a second cluster: a member it lists
// answers that it belongs to one, so it joins that one the same way.
func TestAVoterThatLostItsDataJoinsOnlyOnceRemoved(t *testing.T) {
	for _, seed := range []bool{false, true} {
		t.Run(map[bool]string{false: "joining node", true: "seed"}[seed], func(t *testing.T) {
			rejoinAfterLoss(t, seed)
		})
	}
}

func rejoinAfterLoss(t *testing.T, seed bool) {
	rec := clustertest.NewLogRecorder()
	c := clustertest.Start(t, 3, clustertest.Options{Logger: slog.New(rec)})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := c.CreateUser(ctx, c.Leader(), "before-the-loss"); err != nil {
		t.Fatal(err)
	}
	victim := c.Follower()
	if seed {
		victim = 0 // it bootstrapped the cluster
	}
	id := c.Nodes[victim].ID
	c.Kill(victim)
	if err := os.RemoveAll(filepath.Join(c.Nodes[victim].DataDir, "data")); err != nil {
		t.Fatal(err)
	}
	cfg := c.JoinConfig(victim)
	cfg.Bootstrap = seed
	done := startAsync(ctx, cfg)
	if early := waitJoinRefused(t, rec, id, done, 0); early != nil {
		if early.s != nil {
			c.Started(victim, early.s)
		}
		t.Fatalf("the node that lost its data started without being removed first (taken back as the same voter, or founding a cluster of its own): %v", early.err)
	}
	if seed && len(rec.Find("not founding a new cluster: a member listed in --join belongs to one; joining it instead", nil)) == 0 {
		t.Fatal("the seed did not say why it joins instead of founding a cluster")
	}

	leader := c.Nodes[c.Leader()].Server.Node()
	if _, err := leader.RemoveServer(ctx, id); err != nil {
		t.Fatal(err)
	}
	st := <-done
	if st.err != nil {
		t.Fatalf("join once removed: %v", st.err)
	}
	c.Started(victim, st.s)
	c.WaitReady()
	c.WaitConverged()
	if _, err := st.s.Node().FSM().GetUser("before-the-loss"); err != nil {
		t.Fatalf("the node that joined again did not catch up: %v", err)
	}
}

// started is what server.Start returned.
type started struct {
	s   *server.Server
	err error
}

// startAsync starts a node from cfg in the background.
func startAsync(ctx context.Context, cfg server.Config) chan started {
	done := make(chan started, 1)
	go func() {
		s, err := server.Start(ctx, cfg)
		done <- started{s, err}
	}()
	return done
}

// joinRefusals counts the refused joins of node id that rec holds.
func joinRefusals(rec *clustertest.LogRecorder, id string) int {
	return len(rec.Find("join refused: this node lost its data", func(r clustertest.Record) bool {
		return strings.Contains(r.Attrs["err"].String(), "relayctl cluster remove "+id)
	}))
}

// waitJoinRefused waits until rec holds more than after refused joins of
// node id; it returns what Start returned if it returned first.
func waitJoinRefused(t *testing.T, rec *clustertest.LogRecorder, id string, done chan started, after int) *started {
	t.Helper()
	var early *started
	clustertest.Eventually(t, 30*time.Second, func() error {
		select {
		case st := <-done:
			early = &st
			return nil
		default:
		}
		if joinRefusals(rec, id) <= after {
			return errors.New("no refused join logged")
		}
		return nil
	})
	return early
}

// On a cluster's first start, the seed (--bootstrap with --join) founds
// the cluster once no member it lists says it belongs to one: here none
// answers at all, and it founds it after BootstrapWait.
func TestASeedFoundsTheClusterWhenNoMemberAnswers(t *testing.T) {
	c := clustertest.Empty(t, clustertest.Options{})
	gone, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := gone.Addr().String()
	gone.Close() // nothing answers there
	c.StartNode(func(cfg *server.Config) {
		cfg.Bootstrap, cfg.Join, cfg.BootstrapWait = true, []string{addr}, time.Second
	})
	c.WaitReady()
	clustertest.Eventually(t, 30*time.Second, func() error {
		if ok, err := c.Nodes[0].Server.Node().FSM().Initialized(); err != nil || !ok {
			return fmt.Errorf("not initialized (%v)", err)
		}
		return nil
	})
}

// A cluster that lost its quorum for good (two of three voters' disks)
// is saved from the survivor: a stale backup, which does not ask the
// leader there is none of, holds what the survivor applied, and a new
// cluster restored from it has it. A backup that is not stale waits for a
// leader and fails.
func TestAClusterThatLostItsQuorumIsSavedFromASurvivor(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	ctx := ctxT(t, 2*time.Minute)
	if _, err := c.CreateUser(ctx, c.Leader(), "kept"); err != nil {
		t.Fatal(err)
	}
	admin := c.AdminToken()
	survivor := c.Follower()
	c.WaitConverged()
	for i := range c.Nodes {
		if i != survivor {
			c.Kill(i)
		}
	}
	cl := controlv1connect.NewClusterServiceClient(http.DefaultClient, "http://"+c.Nodes[survivor].Server.APIAddr())
	backupTo := func(ctx context.Context, stale bool) ([]byte, error) {
		req := connect.NewRequest(&controlv1.BackupRequest{Stale: stale})
		req.Header().Set("Authorization", "Bearer "+admin)
		stream, err := cl.Backup(ctx, req)
		if err != nil {
			return nil, err
		}
		defer stream.Close()
		var buf bytes.Buffer
		for stream.Receive() {
			buf.Write(stream.Msg().GetData())
		}
		return buf.Bytes(), stream.Err()
	}
	short, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := backupTo(short, false); err == nil {
		t.Fatal("a backup that is not stale answered without a leader")
	}
	b, err := backupTo(ctx, true)
	if err != nil {
		t.Fatalf("stale backup from the survivor: %v", err)
	}
	file := filepath.Join(t.TempDir(), "survivor.bin")
	if err := os.WriteFile(file, b, 0o600); err != nil {
		t.Fatal(err)
	}
	saved := clustertest.Restored(t, file, clustertest.Options{})
	if _, err := saved.Nodes[0].Server.Node().FSM().GetUser("kept"); err != nil {
		t.Fatalf("the restored cluster lacks what the survivor had: %v", err)
	}
}

// A seed whose members refuse to tell it whether they belong to a
// cluster (no certificate from the cluster's CA, no current join token)
// does not found one: a second cluster beside a live one costs more than
// a node that will not start, and the error says what to give it.
func TestASeedRefusedAnAnswerFoundsNoCluster(t *testing.T) {
	live := clustertest.Start(t, 1, clustertest.Options{})
	cfg := live.JoinConfig(0) // a configuration on free ports, in a new dir
	cfg.NodeID, cfg.DataDir = "seed", filepath.Join(t.TempDir(), "data")
	cfg.RaftAddr, cfg.APIAddr = "127.0.0.1:0", "127.0.0.1:0"
	cfg.Bootstrap, cfg.JoinToken, cfg.BootstrapWait = true, "", time.Second
	ctx := ctxT(t, time.Minute)
	s, err := server.Start(ctx, cfg)
	if err == nil {
		_ = s.Shutdown(ctx)
		t.Fatal("the seed founded a cluster though a member refused to say whether it belongs to one")
	}
	if !strings.Contains(err.Error(), "refused to say whether it belongs to a cluster") || !strings.Contains(err.Error(), "--join-token") {
		t.Fatalf("the seed's error does not say why or what to give: %v", err)
	}
}

// A node started with neither --join nor --bootstrap and added with
// AddVoter (`relayctl cluster join`) that comes back without its data,
// under the same id and address, is not taken back as the same voter:
// with an empty log it could elect a node that lacks entries committed
// with its vote. Its leader's state records that it ran (its features),
// so the leader's hello does not vouch for it as new, and the node
// refuses the connection (lost_data) and takes no entries, also when the
// join is asked for again, until it is removed; added again then, it
// catches up as a new member.
func TestANodeAddedByAddVoterThatLostItsDataIsNotTakenBack(t *testing.T) {
	rec := clustertest.NewLogRecorder()
	c := clustertest.Start(t, 2, clustertest.Options{Logger: slog.New(rec)})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	n3 := c.StartNode(nil) // neither flag: waits to be added
	cl := controlv1connect.NewClusterServiceClient(http.DefaultClient, "http://"+c.Nodes[c.Leader()].Server.APIAddr())
	admin := c.AdminToken()
	raftAddr, apiAddr := n3.Server.Node().RaftAddr(), n3.Server.APIAddr()
	add := func() error {
		req := connect.NewRequest(&controlv1.AddVoterRequest{Id: n3.ID, RaftAddr: raftAddr, ApiAddr: apiAddr})
		req.Header().Set("Authorization", "Bearer "+admin)
		_, err := cl.AddVoter(ctx, req)
		return err
	}
	if err := add(); err != nil {
		t.Fatalf("add n3: %v", err)
	}
	clustertest.Eventually(t, 30*time.Second, func() error {
		r, err := c.Nodes[0].Server.Node().FSM().GetNode(n3.ID)
		if err != nil || len(r.GetFeatures()) == 0 {
			return fmt.Errorf("n3's record %v (%v): not yet written by n3", r, err)
		}
		return nil
	})

	c.Kill(2)
	if err := os.RemoveAll(filepath.Join(n3.DataDir, "data")); err != nil {
		t.Fatal(err)
	}
	c.Restart(2)
	lostData := func() int {
		return len(rec.Find("refused a raft connection", func(r clustertest.Record) bool {
			return r.Attrs["test_node"].String() == n3.ID && r.Attrs["reason"].String() == "lost_data"
		}))
	}
	clustertest.Eventually(t, 30*time.Second, func() error {
		if lostData() == 0 {
			return errors.New("n3 has not refused its leader's connection as lost_data")
		}
		return nil
	})
	// Asked for again without its removal: nothing changes for it. Its
	// leader dials it again after that, and is refused again.
	if err := add(); err != nil {
		t.Fatalf("add n3 again: %v", err)
	}
	res, err := c.CreateUser(ctx, c.Leader(), "after-the-loss")
	if err != nil {
		t.Fatal(err)
	}
	refused := func() float64 {
		return n3.LabeledMetric(t, "relay_control_raft_connections_refused_total", "reason", "lost_data")
	}
	before := refused()
	clustertest.Eventually(t, 30*time.Second, func() error {
		if refused() == before {
			return errors.New("n3 refused no connection since it was asked for again")
		}
		return nil
	})
	if got := n3.Server.Node().FSM().AppliedIndex(); got != 0 {
		t.Fatalf("n3 applied up to %d after losing its data: taken back as the same voter", got)
	}

	// Removed and added again, it catches up.
	remove := connect.NewRequest(&controlv1.RemoveServerRequest{Id: n3.ID})
	remove.Header().Set("Authorization", "Bearer "+admin)
	if _, err := cl.RemoveServer(ctx, remove); err != nil {
		t.Fatalf("remove n3: %v", err)
	}
	if err := add(); err != nil {
		t.Fatalf("add n3 after its removal: %v", err)
	}
	clustertest.Eventually(t, 30*time.Second, func() error {
		if got, want := n3.Server.Node().FSM().AppliedIndex(), res.GetRevision(); got < want {
			return fmt.Errorf("n3 applied %d, want at least %d", got, want)
		}
		return nil
	})
}

// A seed whose join is still waiting (here refused until the node is
// removed) when it is restarted, as a pod deleted or a unit restarted
// meanwhile would be, asks the members again at the next start and goes
// on joining: the empty Raft store its first start created is not a
// cluster's data, and taken for one it made the seed skip the question
// and found a second cluster beside the live one.
func TestASeedRestartedDuringItsJoinDoesNotFoundACluster(t *testing.T) {
	rec := clustertest.NewLogRecorder()
	c := clustertest.Start(t, 3, clustertest.Options{Logger: slog.New(rec)})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := c.CreateUser(ctx, c.Leader(), "before-the-loss"); err != nil {
		t.Fatal(err)
	}
	id := c.Nodes[0].ID
	c.Kill(0)
	if err := os.RemoveAll(filepath.Join(c.Nodes[0].DataDir, "data")); err != nil {
		t.Fatal(err)
	}
	cfg := c.JoinConfig(0)
	cfg.Bootstrap = true
	waitRefused := func(done chan started, after int) {
		t.Helper()
		if early := waitJoinRefused(t, rec, id, done, after); early != nil {
			if early.s != nil {
				c.Started(0, early.s)
			}
			t.Fatalf("the seed started without being removed first (founding a cluster of its own?): %v", early.err)
		}
	}
	first, stop := context.WithCancel(ctx)
	done := startAsync(first, cfg)
	waitRefused(done, 0)
	stop() // the restart
	if st := <-done; st.err == nil {
		c.Started(0, st.s)
		t.Fatal("a start whose context ended returned a server")
	}
	if _, err := os.Stat(filepath.Join(cfg.DataDir, "raft")); err != nil {
		t.Fatalf("the first start left no Raft store (the case this test is about): %v", err)
	}
	done = startAsync(ctx, cfg)
	waitRefused(done, joinRefusals(rec, id))
	if _, err := c.Nodes[c.Leader()].Server.Node().RemoveServer(ctx, id); err != nil {
		t.Fatal(err)
	}
	st := <-done
	if st.err != nil {
		t.Fatalf("join once removed: %v", st.err)
	}
	c.Started(0, st.s)
	c.WaitReady()
	c.WaitConverged()
	if _, err := st.s.Node().FSM().GetUser("before-the-loss"); err != nil {
		t.Fatalf("the seed did not join the live cluster: %v", err)
	}
}

// A member that lost its data and comes back at another Raft address (a
// new host under the same node id) is not taken back as the same voter
// by an AddVoter naming the new address: the node there answers with
// none of the cluster's state, and with an empty log it could elect a
// node lacking acknowledged writes. The move is refused
// (failed_precondition) until the member is removed; then it is added
// and catches up.
func TestAVoterMovedToANewAddressWithoutItsDataIsNotTakenBack(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	res, err := c.CreateUser(ctx, c.Leader(), "before-the-loss")
	if err != nil {
		t.Fatal(err)
	}
	c.WaitConverged()
	victim := c.Follower()
	id := c.Nodes[victim].ID
	c.Kill(victim)
	// The same node id on a new host: a new data dir and new addresses,
	// started with neither flag, to be added.
	moved := c.StartNode(func(cfg *server.Config) { cfg.NodeID = id })
	leader := c.Nodes[c.Leader()]
	cl := controlv1connect.NewClusterServiceClient(http.DefaultClient, "http://"+leader.Server.APIAddr())
	admin := c.AdminToken()
	add := func() error {
		req := connect.NewRequest(&controlv1.AddVoterRequest{Id: id, RaftAddr: moved.Server.Node().RaftAddr(), ApiAddr: moved.Server.APIAddr()})
		req.Header().Set("Authorization", "Bearer "+admin)
		_, err := cl.AddVoter(ctx, req)
		return err
	}
	if err := add(); connect.CodeOf(err) != connect.CodeFailedPrecondition || !strings.Contains(err.Error(), "relayctl cluster remove "+id) {
		t.Fatalf("moving %s to a node without its data: %v, want failed_precondition naming the removal", id, err)
	}
	if got := moved.Server.Node().FSM().AppliedIndex(); got != 0 {
		t.Fatalf("the node without the data applied up to %d: taken back as the same voter", got)
	}
	remove := connect.NewRequest(&controlv1.RemoveServerRequest{Id: id})
	remove.Header().Set("Authorization", "Bearer "+admin)
	if _, err := cl.RemoveServer(ctx, remove); err != nil {
		t.Fatalf("remove %s: %v", id, err)
	}
	if err := add(); err != nil {
		t.Fatalf("add %s after its removal: %v", id, err)
	}
	clustertest.Eventually(t, 30*time.Second, func() error {
		if got, want := moved.Server.Node().FSM().AppliedIndex(), res.GetRevision(); got < want {
			return fmt.Errorf("applied %d, want at least %d", got, want)
		}
		return nil
	})
}
