package api_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/server"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
	"github.com/edge-relay/relay/storage/state"
)

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// bearer adds a fixed access token to every call of a client.
type bearer string

func (b bearer) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if b != "" {
			req.Header().Set("Authorization", "Bearer "+string(b))
		}
		return next(ctx, req)
	}
}

func (b bearer) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		if b != "" {
			conn.RequestHeader().Set("Authorization", "Bearer "+string(b))
		}
		return conn
	}
}

func (b bearer) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

// httpClient returns an h2c client closed at the end of the test.
func httpClient(t *testing.T) *http.Client {
	d := api.NewDialer(nil)
	t.Cleanup(d.Close)
	return d.HTTPClient()
}

func url(n *clustertest.Node) string { return "http://" + n.Server.APIAddr() }

// client returns a ClusterService client of node n acting as the admin.
func client(t *testing.T, c *clustertest.Cluster, n *clustertest.Node) controlv1connect.ClusterServiceClient {
	return controlv1connect.NewClusterServiceClient(httpClient(t), url(n), connect.WithInterceptors(bearer(c.AdminToken())))
}

func TestStatusFromEveryNode(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	ctx := ctxT(t, time.Minute)
	leader := c.Nodes[c.Leader()].ID
	for _, n := range c.Nodes {
		clustertest.Eventually(t, 10*time.Second, func() error {
			resp, err := client(t, c, n).Status(ctx, connect.NewRequest(&controlv1.StatusRequest{}))
			if err != nil {
				return err
			}
			st := resp.Msg
			if st.GetNodeId() != n.ID || st.GetLeaderId() != leader || len(st.GetMembers()) != 3 {
				return fmt.Errorf("status from %s: %v", n.ID, st)
			}
			for _, m := range st.GetMembers() {
				if m.GetApiAddr() == "" || m.GetSuffrage() != controlv1.Suffrage_SUFFRAGE_VOTER {
					return fmt.Errorf("member %v incomplete", m)
				}
				if m.GetLeader() != (m.GetId() == leader) {
					return fmt.Errorf("member %s leader flag wrong", m.GetId())
				}
			}
			return nil
		})
	}
}

// Membership calls sent to a follower are forwarded to the leader.
func TestMembershipThroughFollower(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	ctx := ctxT(t, time.Minute)
	f := c.Nodes[c.Follower()]
	cl := client(t, c, f)

	target := c.Nodes[c.Follower()]
	if target == f {
		for _, n := range c.Nodes {
			if n != f && !n.Server.Node().IsLeader() {
				target = n
			}
		}
	}
	resp, err := cl.TransferLeadership(ctx, connect.NewRequest(&controlv1.TransferLeadershipRequest{Id: f.ID}))
	if err != nil {
		t.Fatal(err)
	}
	if resp.Msg.GetLeaderId() != f.ID {
		t.Fatalf("leader after transfer = %s, want %s", resp.Msg.GetLeaderId(), f.ID)
	}
	if c.Nodes[c.Leader()] != f {
		t.Fatalf("leader is not %s", f.ID)
	}

	// Remove a node by asking a follower.
	var asker, victim *clustertest.Node
	for _, n := range c.Nodes {
		if n.Server.Node().IsLeader() {
			continue
		}
		if asker == nil {
			asker = n
		} else {
			victim = n
		}
	}
	if _, err := client(t, c, asker).RemoveServer(ctx, connect.NewRequest(&controlv1.RemoveServerRequest{Id: victim.ID})); err != nil {
		t.Fatal(err)
	}
	if got := c.VoterIDs(c.Leader()); len(got) != 2 {
		t.Fatalf("voters %v after remove", got)
	}
	// The removed node goes on running until it is stopped: it answers a
	// write unavailable, so that a client (an edge, relayctl) takes its
	// call to another node instead of taking the refusal as final.
	victimUsers := controlv1connect.NewUserServiceClient(httpClient(t), url(victim), connect.WithInterceptors(bearer(c.AdminToken())))
	clustertest.Eventually(t, 20*time.Second, func() error {
		_, err := victimUsers.CreateUser(ctx, connect.NewRequest(&controlv1.CreateUserRequest{Login: "after-removal"}))
		if connect.CodeOf(err) != connect.CodeUnavailable {
			return fmt.Errorf("a write through the removed node: %v, want unavailable", err)
		}
		return nil
	})
	// A mistyped id, or one removed already, is not reported removed
	// (hashicorp/raft takes an id it does not know as done): the operator
	// would go on to stop and wipe a node that is still a voter.
	for _, id := range []string{victim.ID, victim.ID + "0"} {
		_, err := client(t, c, asker).RemoveServer(ctx, connect.NewRequest(&controlv1.RemoveServerRequest{Id: id}))
		if connect.CodeOf(err) != connect.CodeNotFound || !strings.Contains(err.Error(), "not a member") {
			t.Errorf("remove %s, not a member: %v, want not_found", id, err)
		}
		_, err = client(t, c, asker).TransferLeadership(ctx, connect.NewRequest(&controlv1.TransferLeadershipRequest{Id: id}))
		if connect.CodeOf(err) != connect.CodeNotFound {
			t.Errorf("transfer leadership to %s, not a member: %v, want not_found", id, err)
		}
	}
	if got := c.VoterIDs(c.Leader()); len(got) != 2 {
		t.Fatalf("voters %v after removing ids that are not members", got)
	}
}

func TestInvalidArguments(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	ctx := ctxT(t, 30*time.Second)
	cl := client(t, c, c.Nodes[0])
	cases := []struct {
		name  string
		call  func() error
		field string
	}{
		{"add voter without id", func() error {
			_, err := cl.AddVoter(ctx, connect.NewRequest(&controlv1.AddVoterRequest{RaftAddr: "127.0.0.1:1"}))
			return err
		}, "id"},
		{"add voter bad id", func() error {
			_, err := cl.AddVoter(ctx, connect.NewRequest(&controlv1.AddVoterRequest{Id: "a b", RaftAddr: "127.0.0.1:1"}))
			return err
		}, "id"},
		{"add voter without raft addr", func() error {
			_, err := cl.AddVoter(ctx, connect.NewRequest(&controlv1.AddVoterRequest{Id: "n9"}))
			return err
		}, "raft_addr"},
		{"remove without id", func() error {
			_, err := cl.RemoveServer(ctx, connect.NewRequest(&controlv1.RemoveServerRequest{}))
			return err
		}, "id"},
		{"transfer to bad id", func() error {
			_, err := cl.TransferLeadership(ctx, connect.NewRequest(&controlv1.TransferLeadershipRequest{Id: "x\x00y"}))
			return err
		}, "id"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			if connect.CodeOf(err) != connect.CodeInvalidArgument {
				t.Fatalf("code %v (%v), want InvalidArgument", connect.CodeOf(err), err)
			}
			if !bytes.Contains([]byte(err.Error()), []byte(tc.field)) {
				t.Fatalf("error %q does not name field %q", err, tc.field)
			}
		})
	}
	// Transfer on a single node has nobody to go to.
	_, err := cl.TransferLeadership(ctx, connect.NewRequest(&controlv1.TransferLeadershipRequest{}))
	if err == nil {
		t.Fatal("transfer on a one-node cluster succeeded")
	}
}

func fetchBackup(ctx context.Context, cl controlv1connect.ClusterServiceClient, w io.Writer) error {
	stream, err := cl.Backup(ctx, connect.NewRequest(&controlv1.BackupRequest{}))
	if err != nil {
		return err
	}
	for stream.Receive() {
		if _, err := w.Write(stream.Msg().GetData()); err != nil {
			return err
		}
	}
	return stream.Err()
}

// A backup taken from a live 3-node cluster under writes restores into a
// fresh node with identical state: every write acknowledged before the
// backup started is in it, and it matches the backup byte for byte. The
// restored cluster then grows to three nodes.
func TestBackupUnderWritesRestoreAndGrow(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	ctx := ctxT(t, 2*time.Minute)
	for i := 0; i < 40; i++ {
		if _, err := c.CreateUser(ctx, i%3, fmt.Sprintf("pre%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	// Mailboxes (entries, counters, expiry and dedup indexes) and the
	// cluster CA are part of the state like everything else.
	for i := 0; i < 3; i++ {
		if _, err := c.RegisterDevice(ctx, 0, "pre0", fmt.Sprint("mbox", i)); err != nil {
			t.Fatal(err)
		}
	}
	var mail []*statev1.MailboxEntry
	for i := 0; i < 9; i++ {
		mail = append(mail, &statev1.MailboxEntry{UserId: "pre0", DeviceId: fmt.Sprint("mbox", i%3), SenderDeviceId: "mbox0",
			EventId: fmt.Sprint("ev", i), Event: []byte("event"), ExpiresAtMs: time.Now().Add(time.Hour).UnixMilli()})
	}
	if _, err := c.Nodes[1].Server.Node().Apply(ctx, &statev1.Command{Op: &statev1.Command_PutMailbox{PutMailbox: &statev1.PutMailbox{Entries: mail}}}); err != nil {
		t.Fatal(err)
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var ackedBefore []string
	backupStarted := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		started := false
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-backupStarted:
				started = true
			default:
			}
			id := fmt.Sprintf("live%d", i)
			if _, err := c.CreateUser(ctx, i%3, id); err == nil && !started {
				mu.Lock()
				ackedBefore = append(ackedBefore, id)
				mu.Unlock()
			}
		}
	}()
	clustertest.Eventually(t, 20*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(ackedBefore) < 20 {
			return fmt.Errorf("%d live writes", len(ackedBefore))
		}
		return nil
	})
	mu.Lock()
	mustHave := append([]string(nil), ackedBefore...)
	mu.Unlock()
	close(backupStarted)
	var buf bytes.Buffer
	if err := fetchBackup(ctx, client(t, c, c.Nodes[c.Follower()]), &buf); err != nil {
		t.Fatal(err)
	}
	close(stop)
	wg.Wait()

	// The backup is a well-formed export; compute its digest by importing
	// it into a scratch store.
	file := filepath.Join(t.TempDir(), "backup.bin")
	if err := os.WriteFile(file, buf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	scratch, err := state.Open(state.Config{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := scratch.Import(bytes.NewReader(buf.Bytes())); err != nil {
		t.Fatal(err)
	}
	sf, err := fsm.New(fsm.Config{Store: scratch})
	if err != nil {
		t.Fatal(err)
	}
	backupIndex := sf.AppliedIndex()
	_ = scratch.Close()

	restoredAt := time.Now()
	r := clustertest.Empty(t, clustertest.Options{})
	restored := r.StartNode(func(cfg *server.Config) { cfg.RestoreFrom = file })
	r.WaitReady()
	node := restored.Server.Node()
	for _, id := range append(mustHave, "pre0", "pre39") {
		if _, err := node.FSM().GetUser(id); err != nil {
			t.Fatalf("write %s acknowledged before the backup is missing after restore: %v", id, err)
		}
	}
	// Apart from this cluster's own node record, the state is the
	// backup's. Compare after the restored leader reconciled node records:
	// user and device data must be exactly the backup's.
	for i := 0; i < 2; i++ {
		r.AddNode()
	}
	r.WaitReady()
	r.WaitConverged()
	res, err := r.CreateUser(ctx, 2, "after-restore")
	if err != nil {
		t.Fatal(err)
	}
	if res.GetRevision() <= backupIndex {
		t.Fatalf("restored cluster revision %d not past the backup's %d", res.GetRevision(), backupIndex)
	}
	// The whole state is the backup's, on every member of the grown
	// cluster: every record of the backup is there unchanged, and every
	// record that is not in the backup is one the new cluster wrote
	// itself after the backup's revision (its node records, its change
	// feed and request ids, the user written after the restore). Only
	// the applied index and node records of the old cluster may differ,
	// and the history id, which the restore draws anew.
	r.WaitConverged()
	want := clustertest.Records(t, buf.Bytes())
	for _, n := range r.Running() {
		var b bytes.Buffer
		if _, err := n.Server.Node().FSM().WriteBackup(&b); err != nil {
			t.Fatal(err)
		}
		got := clustertest.Records(t, b.Bytes())
		for k, v := range want {
			if k == "m:applied" || k == "m:history" || strings.HasPrefix(k, "n:") {
				continue
			}
			// Logins to the new cluster rewrite the throttle records of
			// their address and login.
			if gv, ok := got[k]; (!ok || gv != v) && !throttleRewritten(t, k, restoredAt.UnixMilli(), got) {
				t.Fatalf("%s: record %q of the backup is missing or changed after restore", n.ID, k)
			}
		}
		for k, v := range got {
			if _, ok := want[k]; ok || k == "m:applied" || k == "m:history" && v != "" && v != want[k] {
				continue
			}
			if !writtenAfter(t, k, v, backupIndex, restoredAt.UnixMilli(), got) {
				t.Fatalf("%s: record %q is neither the backup's nor written by the restored cluster after revision %d", n.ID, k, backupIndex)
			}
		}
	}
	backupUsers := 0
	for k := range want {
		if strings.HasPrefix(k, "u:") {
			backupUsers++
		}
	}
	if backupUsers < 40+len(mustHave) {
		t.Fatalf("backup holds %d users, want at least %d", backupUsers, 40+len(mustHave))
	}
	mailRecords := map[byte]int{}
	for k := range want {
		if p := k[0]; strings.HasPrefix(k[1:], ":") && strings.ContainsRune("bBwW", rune(p)) {
			mailRecords[p]++
		}
	}
	if mailRecords['b'] != 9 || mailRecords['B'] != 3 || mailRecords['w'] != 9 || mailRecords['W'] != 9 || want["m:ca"] == "" {
		t.Fatalf("backup holds mailbox records %v, CA %v", mailRecords, want["m:ca"] != "")
	}
}

// writtenAfter reports whether a state record (by the key layout in
// control/fsm/keys.go) was written by the restored cluster: a node
// record, a change or request id of a revision after rev, the user the
// test created after the restore, or a refresh token (with its family
// and index records) issued at or after sinceMs by the logins made to
// grow the cluster. all is the restored state, for the index records.
func writtenAfter(t *testing.T, k, v string, rev uint64, sinceMs int64, all map[string]string) bool {
	t.Helper()
	revAt := func(p string) uint64 { return binary.BigEndian.Uint64([]byte(k[len(p) : len(p)+8])) }
	newToken := func(id string) bool {
		var tok statev1.RefreshToken
		if err := proto.Unmarshal([]byte(all["t:"+id]), &tok); err != nil {
			t.Fatal(err)
		}
		return tok.GetId() == id && tok.GetCreatedAtMs() >= sinceMs
	}
	switch {
	case strings.HasPrefix(k, "n:"):
		return true
	case strings.HasPrefix(k, "c:"), strings.HasPrefix(k, "Q:"):
		return revAt(k[:2]) > rev
	case strings.HasPrefix(k, "q:"):
		var res statev1.Result
		if err := proto.Unmarshal([]byte(v), &res); err != nil {
			t.Fatal(err)
		}
		return res.GetRevision() > rev
	case strings.HasPrefix(k, "t:"):
		return newToken(k[2:])
	case strings.HasPrefix(k, "X:"):
		return newToken(k[2+8:])
	case strings.HasPrefix(k, "x:"):
		parts := strings.Split(k[2:], "\x00")
		return len(parts) == 3 && newToken(parts[2])
	case strings.HasPrefix(k, "f:"):
		var fam statev1.TokenFamily
		if err := proto.Unmarshal([]byte(v), &fam); err != nil {
			t.Fatal(err)
		}
		return fam.GetCreatedAtMs() >= sinceMs
	case k == "u:after-restore", k == "l:login-after-restore":
		return true
	case strings.HasPrefix(k, "g:"), strings.HasPrefix(k, "G:"):
		return throttleRewritten(t, k, sinceMs, all)
	}
	return false
}

// throttleRewritten reports whether a throttle record (g:) or its
// pruning index (G:) belongs to a record the restored cluster wrote
// after sinceMs.
func throttleRewritten(t *testing.T, k string, sinceMs int64, all map[string]string) bool {
	t.Helper()
	switch {
	case strings.HasPrefix(k, "G:"):
		k = k[2+8:] // the index names the whole g: key
	case !strings.HasPrefix(k, "g:"):
		return false
	}
	v, ok := all[k]
	if !ok {
		return false
	}
	var r statev1.LoginThrottle
	if err := proto.Unmarshal([]byte(v), &r); err != nil {
		t.Fatal(err)
	}
	last := r.GetLastFailureMs()
	for _, tr := range r.GetTrusted() {
		last = max(last, tr.GetLastSuccessMs())
	}
	return last >= sinceMs
}

// A corrupt backup is refused before anything starts.
func TestRestoreRefusesCorruptBackup(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	ctx := ctxT(t, time.Minute)
	if _, err := c.CreateUser(ctx, 0, "x"); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := fetchBackup(ctx, client(t, c, c.Nodes[0]), &buf); err != nil {
		t.Fatal(err)
	}
	b := buf.Bytes()
	b[len(b)/2] ^= 0xff
	file := filepath.Join(t.TempDir(), "bad.bin")
	if err := os.WriteFile(file, b, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := server.Start(ctx, server.Config{
		NodeID: "r1", DataDir: t.TempDir(), RaftAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0",
		RestoreFrom: file, Raft: clustertest.FastRaft(),
	})
	if !errors.Is(err, state.ErrCorrupt) {
		t.Fatalf("restore of a corrupt backup: got %v, want ErrCorrupt", err)
	}
}
