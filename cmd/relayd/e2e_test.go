package main_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/edge-relay/relay/internal/relaytest"
)

// The binaries under test, built once by TestMain.
var bins struct{ relayd, relayctl string }

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "relay-e2e-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bins.relayd = filepath.Join(dir, "relayd")
	bins.relayctl = filepath.Join(dir, "relayctl")
	for _, b := range []struct{ out, pkg string }{{bins.relayd, "."}, {bins.relayctl, "../relayctl"}} {
		// Stamped as a release is (Makefile), for TestBinariesSayTheirRelease.
		args := []string{"build", "-o", b.out, "-ldflags", "-X " + stampedVersionFlag + " -X " + stampedRevisionFlag}
		if raceBuild {
			args = append(args, "-race")
		}
		cmd := exec.Command("go", append(args, b.pkg)...)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "build", b.pkg, err)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// proc is a relayd process whose JSON log lines are watched.
type proc struct{ *relaytest.Proc }

func startRelayd(t *testing.T, args ...string) *proc {
	t.Helper()
	return startRelaydWith(t, append(os.Environ(), "RELAY_ADMIN_PASSWORD="+adminPassword), io.Discard, args...)
}

// startRelaydWith starts relayd with an environment, writing its standard
// output to stdout.
func startRelaydWith(t *testing.T, env []string, stdout io.Writer, args ...string) *proc {
	t.Helper()
	args = append(args, "--log-format", "json")
	cmd := exec.Command(bins.relayd, args...)
	cmd.Env = append(env, "RELAY_SLOW_THRESHOLD=1s")
	cmd.Stdout = stdout
	return &proc{relaytest.StartCmd(t, "relayd", cmd)}
}

// waitLog waits for a log record with the given message and returns it.
func (p *proc) waitLog(t *testing.T, msg string, within time.Duration) map[string]any {
	t.Helper()
	rec, err := p.WaitLog(msg, within, nil)
	if err != nil {
		t.Fatal(err)
	}
	return rec
}

// ctlConfig is the relayctl config dir (token cache) of the test run.
var ctlConfig string

// ctlToken is the admin access token every relayctl call uses once set
// (RELAYCTL_TOKEN), so calls to any node carry it.
var ctlToken string

const adminPassword = "e2e-admin-password"

func relayctlIn(t *testing.T, stdin, server string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bins.relayctl, append([]string{"--server", "http://" + server}, args...)...)
	cmd.Env = append(os.Environ(), "RELAYCTL_CONFIG_DIR="+ctlConfig)
	if ctlToken != "" {
		cmd.Env = append(cmd.Env, "RELAYCTL_TOKEN="+ctlToken)
	}
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func relayctl(t *testing.T, server string, args ...string) string {
	t.Helper()
	out, err := relayctlIn(t, "", server, args...)
	if err != nil {
		t.Fatalf("relayctl %v: %v\n%s", args, err, out)
	}
	return out
}

type status struct {
	NodeID       string `json:"nodeId"`
	State        string `json:"state"`
	LeaderID     string `json:"leaderId"`
	AppliedIndex string `json:"appliedIndex"`
	Members      []struct {
		ID      string `json:"id"`
		APIAddr string `json:"apiAddr"`
	} `json:"members"`
}

func clusterStatus(t *testing.T, server string) status {
	t.Helper()
	var st status
	out := relayctl(t, server, "-o", "json", "cluster", "status")
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("decode status %q: %v", out, err)
	}
	return st
}

func eventually(t *testing.T, within time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not met within %v: %v", within, err)
		}
		time.Sleep(50 * time.Millisecond) // polling interval, not synchronisation
	}
}

type node struct {
	id, dir, raft, api, admin string
	p                         *proc
}

func (n *node) start(t *testing.T, extra ...string) {
	t.Helper()
	first := n.p == nil
	for attempt := 0; ; attempt++ {
		args := append([]string{"control", "--node-id", n.id, "--data-dir", n.dir,
			"--raft-addr", n.raft, "--api-addr", n.api, "--admin-addr", n.admin}, extra...)
		n.p = startRelayd(t, args...)
		_, err := n.p.WaitLog("control node serving", 60*time.Second, nil)
		if err == nil {
			return
		}
		// freePort's ports can be taken by another test package between
		// the check and relayd's bind; on a first start, pick others.
		if !first || attempt >= 3 || !strings.Contains(err.Error(), "address already in use") {
			t.Fatal(err)
		}
		_ = os.RemoveAll(n.dir)
		n.raft, n.api, n.admin = freePort(t), freePort(t), freePort(t)
	}
}

func (n *node) stop(t *testing.T) {
	t.Helper()
	if err := n.p.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-n.p.Done():
		if n.p.Err() != nil {
			t.Fatalf("%s exited with %v after SIGTERM", n.id, n.p.Err())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("%s did not exit after SIGTERM", n.id)
	}
}

// newNodes describes n nodes with free ports and data dirs under base.
func newNodes(t *testing.T, base string, n int) []*node {
	nodes := make([]*node, n)
	for i := range nodes {
		nodes[i] = &node{id: fmt.Sprintf("n%d", i+1), dir: filepath.Join(base, fmt.Sprintf("n%d", i+1)),
			raft: freePort(t), api: freePort(t), admin: freePort(t)}
	}
	return nodes
}

// startCluster bootstraps nodes[0], logs relayctl in as the first admin
// (its access token becomes ctlToken), joins the other nodes with that
// token and waits until the last one sees a leader and every member with
// its API address.
func startCluster(t *testing.T, nodes []*node) status {
	t.Helper()
	ctlConfig, ctlToken = t.TempDir(), ""
	nodes[0].start(t, "--bootstrap")
	eventually(t, 30*time.Second, func() error {
		out, err := relayctlIn(t, adminPassword+"\n", nodes[0].api, "login", "--password-stdin", "admin")
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	ctlToken = strings.TrimSpace(relayctl(t, nodes[0].api, "token"))
	t.Cleanup(func() { ctlToken = "" })
	for _, n := range nodes[1:] {
		n.start(t, "--join", nodes[0].api, "--join-token", ctlToken)
	}
	var st status
	eventually(t, 30*time.Second, func() error {
		st = clusterStatus(t, nodes[len(nodes)-1].api)
		if st.LeaderID == "" || len(st.Members) != len(nodes) {
			return fmt.Errorf("status %+v", st)
		}
		for _, m := range st.Members {
			if m.APIAddr == "" {
				return fmt.Errorf("member %s without api address", m.ID)
			}
		}
		return nil
	})
	return st
}

// The binaries end to end: bootstrap and join a 3-node cluster, status and
// backup through relayctl, SIGTERM on the leader hands leadership over
// and exits cleanly, the node restarts from its data dir with no extra
// flags, and a backup seeds a new cluster through --restore.
func TestBinariesClusterBackupRestore(t *testing.T) {
	base := t.TempDir()
	nodes := newNodes(t, base, 3)
	st := startCluster(t, nodes)
	relayctlAccountFlow(t, nodes)
	table := relayctl(t, nodes[1].api, "cluster", "status")
	if !strings.Contains(table, "RAFT ADDRESS") || !strings.Contains(table, nodes[2].raft) ||
		!strings.Contains(table, "cluster history ") || strings.Contains(table, "(none yet)") {
		t.Fatalf("status table:\n%s", table)
	}

	backup := filepath.Join(base, "backup.bin")
	if out := relayctl(t, nodes[1].api, "backup", backup); !strings.Contains(out, "verified") {
		t.Fatalf("backup output: %s", out)
	}

	// SIGTERM the leader.
	var leader *node
	for _, n := range nodes {
		if n.id == st.LeaderID {
			leader = n
		}
	}
	leader.stop(t)
	var other *node
	for _, n := range nodes {
		if n != leader {
			other = n
		}
	}
	eventually(t, 30*time.Second, func() error {
		s := clusterStatus(t, other.api)
		if s.LeaderID == "" || s.LeaderID == leader.id {
			return fmt.Errorf("leader %q", s.LeaderID)
		}
		return nil
	})
	// Restart it from its data dir: no --bootstrap, no --join.
	leader.start(t)
	eventually(t, 30*time.Second, func() error {
		s := clusterStatus(t, leader.api)
		if s.LeaderID == "" || s.State == "Candidate" {
			return fmt.Errorf("restarted node: %+v", s)
		}
		return nil
	})

	// Restore into a fresh single-node cluster.
	r := &node{id: "r1", dir: filepath.Join(base, "r1"), raft: freePort(t), api: freePort(t), admin: freePort(t)}
	r.start(t, "--restore", backup)
	eventually(t, 30*time.Second, func() error {
		s := clusterStatus(t, r.api)
		if s.LeaderID != "r1" || len(s.Members) != 1 {
			return fmt.Errorf("restored cluster: %+v", s)
		}
		return nil
	})
	// Restoring into a data dir that has state is refused.
	r.stop(t)
	rout, err := restoreOutput(r, backup)
	if err == nil || !strings.Contains(rout, "restore needs an empty one") {
		t.Fatalf("restore over existing state: err=%v\n%s", err, rout)
	}
	for _, n := range nodes {
		n.stop(t)
	}
}

// relayctlAccountFlow drives the account commands of relayctl against
// different nodes of the cluster.
func relayctlAccountFlow(t *testing.T, nodes []*node) {
	t.Helper()
	out, err := relayctlIn(t, "alice-password-123\n", nodes[1].api, "-o", "json", "user", "create", "--login", "alice", "--display-name", "Alice", "--password-stdin")
	if err != nil {
		t.Fatalf("user create: %v\n%s", err, out)
	}
	var alice struct {
		ID string `json:"id"`
	}
	if err := json.Unmarshal([]byte(out), &alice); err != nil || alice.ID == "" {
		t.Fatalf("user create output %q: %v", out, err)
	}
	keyFile := filepath.Join(t.TempDir(), "phone.key")
	out = relayctl(t, nodes[2].api, "device", "register", "--user", alice.ID, "--name", "phone", "--generate-key", keyFile)
	if !strings.Contains(out, "phone") {
		t.Fatalf("device register output:\n%s", out)
	}
	if fi, err := os.Stat(keyFile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("private key file: %v %v", fi, err)
	}
	var list struct {
		Devices []struct {
			ID   string `json:"id"`
			Name string `json:"name"`
		} `json:"devices"`
	}
	out = relayctl(t, nodes[0].api, "-o", "json", "device", "list", "--user", alice.ID)
	if err := json.Unmarshal([]byte(out), &list); err != nil || len(list.Devices) != 1 || list.Devices[0].Name != "phone" {
		t.Fatalf("device list %q: %v", out, err)
	}
	if out := relayctl(t, nodes[1].api, "device", "revoke", list.Devices[0].ID, "--user", alice.ID); !strings.Contains(out, "yes") {
		t.Fatalf("device revoke output:\n%s", out)
	}
	if out := relayctl(t, nodes[2].api, "user", "list"); !strings.Contains(out, "alice") || !strings.Contains(out, "admin") {
		t.Fatalf("user list:\n%s", out)
	}
	if out := relayctl(t, nodes[0].api, "keys", "list"); !strings.Contains(out, "signing") || !strings.Contains(out, "session") {
		t.Fatalf("keys list:\n%s", out)
	}
	relayctl(t, nodes[0].api, "user", "delete", alice.ID)
	out = relayctl(t, nodes[1].api, "-o", "json", "device", "list", "--user", alice.ID)
	if strings.Contains(out, "phone") {
		t.Fatalf("devices of a deleted user still listed:\n%s", out)
	}
	// Errors: one line, non-zero exit, with what to do.
	out, err = relayctlIn(t, "", nodes[0].api, "user", "get", "u_nobody")
	if err == nil || strings.Count(strings.TrimSpace(out), "\n") != 0 || !strings.Contains(out, "not found") {
		t.Fatalf("user get of a missing user: err=%v out=%q", err, out)
	}
	// The new user logs in with the password given on stdin... after
	// being recreated, since alice was deleted.
	if _, err := relayctlIn(t, "bob-password-1234\n", nodes[0].api, "user", "create", "--login", "bob", "--password-stdin"); err != nil {
		t.Fatal(err)
	}
	saved := ctlToken
	ctlToken = ""
	defer func() { ctlToken = saved }()
	if out, err := relayctlIn(t, "bob-password-1234\n", nodes[2].api, "login", "--password-stdin", "bob"); err != nil || !strings.Contains(out, "logged in") {
		t.Fatalf("bob login: %v %s", err, out)
	}
	if out := relayctl(t, nodes[2].api, "user", "me"); !strings.Contains(out, "bob") {
		t.Fatalf("user me:\n%s", out)
	}
	if out, err := relayctlIn(t, "", nodes[2].api, "user", "list"); err == nil || !strings.Contains(out, "PermissionDenied") && !strings.Contains(out, "permission_denied") {
		t.Fatalf("a user listing accounts: err=%v out=%s", err, out)
	}
	if out := relayctl(t, nodes[2].api, "logout"); !strings.Contains(out, "logged out") {
		t.Fatalf("logout: %s", out)
	}
}

// Membership through relayctl and the binaries: a node started with
// neither --bootstrap nor --join is added with `relayctl cluster join`
// sent to a follower, takes leadership with `cluster transfer-leader`,
// and removes another member with `cluster remove`; the cluster keeps
// taking writes.
func TestBinariesMembershipThroughRelayctl(t *testing.T) {
	base := t.TempDir()
	nodes := newNodes(t, base, 4)
	st := startCluster(t, nodes[:3])
	byID := map[string]*node{}
	for _, n := range nodes {
		byID[n.id] = n
	}
	var follower *node
	for _, n := range nodes[:3] {
		if n.id != st.LeaderID {
			follower = n
			break
		}
	}

	// n4 waits to be added; the join goes through a follower.
	n4 := nodes[3]
	n4.start(t)
	var joined struct {
		Index string `json:"index"`
	}
	out := relayctl(t, follower.api, "-o", "json", "cluster", "join", "--id", n4.id, "--raft-addr", n4.raft, "--api-addr", n4.api)
	if err := json.Unmarshal([]byte(out), &joined); err != nil || joined.Index == "" {
		t.Fatalf("cluster join via follower %s: %q %v", follower.id, out, err)
	}
	eventually(t, 30*time.Second, func() error {
		s := clusterStatus(t, n4.api)
		if len(s.Members) != 4 || s.LeaderID == "" || s.AppliedIndex == "" || s.AppliedIndex == "0" {
			return fmt.Errorf("n4 after join: %+v", s)
		}
		return nil
	})

	// Leadership to the new node, asked through the follower.
	if out := relayctl(t, follower.api, "cluster", "transfer-leader", n4.id); !strings.Contains(out, "leader is now "+n4.id) {
		t.Fatalf("transfer-leader: %s", out)
	}
	eventually(t, 30*time.Second, func() error {
		if s := clusterStatus(t, follower.api); s.LeaderID != n4.id {
			return fmt.Errorf("leader %q, want %s", s.LeaderID, n4.id)
		}
		return nil
	})

	// Remove the old leader through the new one, then stop it.
	old := byID[st.LeaderID]
	if out := relayctl(t, n4.api, "cluster", "remove", old.id); !strings.Contains(out, "removed "+old.id) {
		t.Fatalf("cluster remove: %s", out)
	}
	old.stop(t)
	eventually(t, 30*time.Second, func() error {
		s := clusterStatus(t, follower.api)
		if len(s.Members) != 3 || s.LeaderID != n4.id {
			return fmt.Errorf("after remove: %+v", s)
		}
		for _, m := range s.Members {
			if m.ID == old.id {
				return fmt.Errorf("%s still a member", old.id)
			}
		}
		return nil
	})
	// Writes go on, through any remaining member.
	for _, n := range nodes {
		if n == old {
			continue
		}
		login := "after-" + n.id
		if out, err := relayctlIn(t, "", n.api, "user", "create", "--login", login, "--no-password"); err != nil {
			t.Fatalf("user create via %s: %v %s", n.id, err, out)
		}
	}
	if out := relayctl(t, n4.api, "user", "list"); strings.Count(out, "after-") != 3 {
		t.Fatalf("user list after membership changes:\n%s", out)
	}
	for _, n := range nodes {
		if n != old {
			n.stop(t)
		}
	}
}

// restoreOutput runs `relayd control --restore file` on r's data dir and
// returns what it printed, for a restore that must be refused. Bounded: a
// restore that wrongly went ahead would start a node and serve until
// killed.
func restoreOutput(r *node, file string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, bins.relayd, "control", "--node-id", r.id, "--data-dir", r.dir,
		"--raft-addr", r.raft, "--api-addr", r.api, "--admin-addr", "", "--restore", file).CombinedOutput()
	return string(out), err
}
