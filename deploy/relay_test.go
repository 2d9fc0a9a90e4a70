package deploy

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// This file starts a real relay from the repository's binaries, as an
// operator would: control nodes and edges are relayd processes on
// 127.0.0.1, administered with relayctl.

// binDir holds the binaries once built; TestMain removes it.
var binDir string

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		_ = os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// binaries builds relayd and relayctl from the repository (once per test
// binary, when a test needs them) into a temporary directory.
var binaries = sync.OnceValues(func() (dir string, err error) {
	dir, err = os.MkdirTemp("", "relay-deploy-bin")
	if err != nil {
		return "", err
	}
	binDir = dir
	cmd := exec.Command("go", "build", "-o", dir+string(filepath.Separator), "./cmd/relayd", "./cmd/relayctl")
	cmd.Dir = ".."
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build relayd relayctl: %v\n%s", err, out)
	}
	return dir, nil
})

func bin(t *testing.T, name string) string {
	t.Helper()
	dir, err := binaries()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, name)
}

// freePort returns a TCP address on 127.0.0.1 that was free a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// eventually polls cond until it returns nil or within runs out.
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
		time.Sleep(100 * time.Millisecond) // polling interval, not synchronisation
	}
}

// process is a child process whose output goes to a log file.
type process struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

func startProcess(t *testing.T, name string, env []string, path string, args ...string) *process {
	t.Helper()
	logFile := filepath.Join(t.TempDir(), name+".log")
	f, err := os.Create(logFile)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(path, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	p := &process{name: name, cmd: cmd, log: logFile, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("last lines of %s's log:\n%s", name, p.tail(15))
		}
	})
	return p
}

// kill stops the process as a crash would and waits for it.
func (p *process) kill() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *process) tail(n int) string {
	b, _ := os.ReadFile(p.log)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// httpGet returns the body of a 200 answer.
func httpGet(url string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s: %s", url, resp.Status, bytes.TrimSpace(b))
	}
	return b, nil
}

const (
	adminPassword = "deploy-test-admin-password"
	edgeLogin     = "edges"
	edgePassword  = "deploy-test-edge-password"
)

// controlNode is one relayd control process and its addresses, kept
// across restarts.
type controlNode struct {
	id, dir, raft, api, admin string
	p                         *process
}

// edgeNode is one relayd edge process; admin is its /metrics address.
type edgeNode struct {
	id, admin string
	p         *process
}

// relay is a running relay of real processes.
type relay struct {
	t        *testing.T
	controls []*controlNode
	edges    []*edgeNode
	ctlDir   string // relayctl's config dir (its token cache)
	token    string // an admin access token
}

// startRelay starts controls control nodes (the first bootstraps, the
// others join) and edges edges, and waits until every process is ready.
func startRelay(t *testing.T, controls, edges int) *relay {
	t.Helper()
	r := &relay{t: t, ctlDir: t.TempDir()}
	base := t.TempDir()
	for i := range controls {
		r.controls = append(r.controls, &controlNode{id: fmt.Sprintf("n%d", i+1), dir: filepath.Join(base, fmt.Sprintf("n%d", i+1)),
			raft: freePort(t), api: freePort(t), admin: freePort(t)})
	}
	r.startControl(r.controls[0], "--bootstrap")
	eventually(t, time.Minute, func() error {
		_, err := r.relayctlIn(adminPassword+"\n", "login", "--password-stdin", "admin")
		return err
	})
	r.token = strings.TrimSpace(r.relayctl("token"))
	for _, n := range r.controls[1:] {
		r.startControl(n, "--join", r.controls[0].api, "--join-token", r.token)
	}
	for _, n := range r.controls {
		r.waitReady("http://" + n.admin + "/readyz")
	}
	if _, err := r.relayctlIn(edgePassword+"\n", "user", "create", "--login", edgeLogin, "--role", "edge", "--password-stdin"); err != nil {
		t.Fatal(err)
	}
	for i := range edges {
		e := &edgeNode{id: fmt.Sprintf("e%d", i+1), admin: freePort(t)}
		r.edges = append(r.edges, e)
		r.startEdge(e)
	}
	return r
}

// in returns the relay for use by the subtest t: helpers fail t, and
// processes they start stop with it.
func (r *relay) in(t *testing.T) *relay {
	c := *r
	c.t = t
	return &c
}

func (r *relay) startControl(n *controlNode, extra ...string) {
	r.t.Helper()
	// Scheduled backups on, as in the shipped examples (their metrics are
	// exported only then).
	args := append([]string{"control", "--node-id", n.id, "--data-dir", n.dir,
		"--raft-addr", n.raft, "--api-addr", n.api, "--admin-addr", n.admin, "--backup-dir", n.dir + "-backups"}, extra...)
	n.p = startProcess(r.t, "control-"+n.id, []string{"RELAY_ADMIN_PASSWORD=" + adminPassword}, bin(r.t, "relayd"), args...)
}

func (r *relay) controlURLs() string {
	var urls []string
	for _, n := range r.controls {
		urls = append(urls, "http://"+n.api)
	}
	return strings.Join(urls, ",")
}

func (r *relay) startEdge(e *edgeNode) {
	r.t.Helper()
	e.p = startProcess(r.t, "edge-"+e.id, []string{"RELAY_EDGE_PASSWORD=" + edgePassword}, bin(r.t, "relayd"),
		"edge", "--edge-id", e.id, "--addr", "127.0.0.1:0", "--admin-addr", e.admin,
		"--control", r.controlURLs(), "--edge-login", edgeLogin)
	r.waitReady("http://" + e.admin + "/readyz")
}

// restartControl starts a stopped node again from its data dir.
func (r *relay) restartControl(n *controlNode) {
	r.t.Helper()
	r.startControl(n)
	r.waitReady("http://" + n.admin + "/readyz")
}

func (r *relay) waitReady(url string) {
	r.t.Helper()
	eventually(r.t, 90*time.Second, func() error {
		_, err := httpGet(url)
		return err
	})
}

func (r *relay) relayctlIn(stdin string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// Any running node will do: relayctl follows no leader itself, the
	// node forwards writes.
	server := ""
	for _, n := range r.controls {
		if n.p != nil && !n.p.exited() {
			server = n.api
			break
		}
	}
	cmd := exec.CommandContext(ctx, bin(r.t, "relayctl"), append([]string{"--server", "http://" + server}, args...)...)
	cmd.Env = append(os.Environ(), "RELAYCTL_CONFIG_DIR="+r.ctlDir)
	if r.token != "" {
		cmd.Env = append(cmd.Env, "RELAYCTL_TOKEN="+r.token)
	}
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("relayctl %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

func (r *relay) relayctl(args ...string) string {
	r.t.Helper()
	out, err := r.relayctlIn("", args...)
	if err != nil {
		r.t.Fatal(err)
	}
	return out
}

// leader returns the control node that reports itself leader on /metrics.
func (r *relay) leader() (*controlNode, error) {
	for _, n := range r.controls {
		if n.p.exited() {
			continue
		}
		fams, err := scrape("http://" + n.admin + "/metrics")
		if err != nil {
			return nil, err
		}
		for _, m := range fams["relay_control_raft_state"].GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "state" && l.GetValue() == "Leader" && m.GetGauge().GetValue() == 1 {
					return n, nil
				}
			}
		}
	}
	return nil, fmt.Errorf("no control node is leader")
}

// edgeUDP returns an edge's device address and its certificate hash.
func (r *relay) edgeUDP(e *edgeNode) (addr, hash string) {
	r.t.Helper()
	var info struct {
		Addr string `json:"addr"`
	}
	var hashes struct {
		Hashes []struct {
			Value string `json:"value"`
		} `json:"hashes"`
	}
	for path, v := range map[string]any{"/.well-known/relay/edge": &info, "/.well-known/relay/certificate-hashes": &hashes} {
		b, err := httpGet("http://" + e.admin + path)
		if err == nil {
			err = json.Unmarshal(b, v)
		}
		if err != nil {
			r.t.Fatal(err)
		}
	}
	if info.Addr == "" || len(hashes.Hashes) == 0 {
		r.t.Fatalf("edge %s: address %q, hashes %v", e.id, info.Addr, hashes)
	}
	return info.Addr, hashes.Hashes[0].Value
}

// traffic drives the relay as devices would, so every kind of series the
// binaries export exists: a user with three devices; the laptop listens
// on the second edge; the phone, on the first, sends to it (through the
// mesh) and to the tablet, which is offline (its mailbox).
func (r *relay) traffic() {
	t := r.t
	t.Helper()
	var user struct {
		ID string `json:"id"`
	}
	if err := json.Unmarshal([]byte(r.relayctl("-o", "json", "user", "create", "--login", "alice", "--no-password")), &user); err != nil {
		t.Fatal(err)
	}
	keys := t.TempDir()
	devices, revisions := map[string]string{}, map[string]string{}
	for _, name := range []string{"phone", "laptop", "tablet"} {
		var d struct {
			ID       string `json:"id"`
			Revision string `json:"revision"`
		}
		out := r.relayctl("-o", "json", "device", "register", "--user", user.ID, "--name", name, "--generate-key", filepath.Join(keys, name))
		if err := json.Unmarshal([]byte(out), &d); err != nil || d.ID == "" || d.Revision == "" {
			t.Fatalf("device register: %q: %v", out, err)
		}
		devices[name], revisions[name] = d.ID, d.Revision
	}
	// Each device names the revision that registered it: an edge that
	// has not heard of it yet waits instead of refusing it.
	device := func(e *edgeNode, name string) []string {
		addr, hash := r.edgeUDP(e)
		return []string{"--edge", addr, "--cert-hash", hash, "--user", user.ID, "--device", devices[name], "--key", filepath.Join(keys, name),
			"--min-revision", revisions[name]}
	}
	lastEdge := r.edges[len(r.edges)-1]
	listen := startProcess(t, "listen-laptop", []string{"RELAYCTL_CONFIG_DIR=" + r.ctlDir}, bin(t, "relayctl"),
		append([]string{"relay", "listen", "--for", "2m"}, device(lastEdge, "laptop")...)...)
	eventually(t, time.Minute, func() error {
		if b, _ := os.ReadFile(listen.log); !bytes.Contains(b, []byte("listening as")) {
			return fmt.Errorf("the laptop is not connected: %s", listen.tail(3))
		}
		return nil
	})
	for _, to := range []string{"laptop", "tablet"} {
		args := append([]string{"relay", "send", "--to", devices[to]}, device(r.edges[0], "phone")...)
		r.relayctl(append(args, "hello "+to)...)
	}
	listen.kill()

	// A page from an edge's HTTPS port (its TLS handshakes are counted),
	// and a call to the control API without credentials (refused before
	// its body is read, and counted).
	addr, _ := r.edgeUDP(r.edges[0])
	insecure := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, // the edge's self-signed certificate, on 127.0.0.1
	}}
	resp, err := insecure.Get("https://" + addr + "/.well-known/relay/certificate-hashes")
	if err != nil {
		t.Fatalf("GET from the edge's HTTPS port: %v", err)
	}
	_ = resp.Body.Close()
	resp, err = http.Post("http://"+r.controls[0].api+"/control.v1.UserService/ListUsers", "application/json", strings.NewReader("{}"))
	if err != nil {
		t.Fatalf("a call without credentials: %v", err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode == http.StatusOK {
		t.Fatal("ListUsers without credentials answered 200")
	}
}
