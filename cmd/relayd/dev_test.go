package main_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	edgeserver "github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/internal/relaytest"
)

// What the README promises: `relayd dev` needs no flags beyond its
// addresses, and the commands it prints make two devices talk through
// the edge. Everything through the binaries.
func TestDevDeploymentRelaysBetweenDevices(t *testing.T) {
	dir := t.TempDir()
	api, raft, admin, edgeAdmin := freePort(t), freePort(t), freePort(t), freePort(t)
	edge := freeUDPPort(t)
	banner := &relaytest.Buffer{}
	p := startRelaydWith(t, append(os.Environ(), "RELAY_ADMIN_PASSWORD="+adminPassword), banner, "dev", "--data-dir", filepath.Join(dir, "data"), "--api-addr", api, "--raft-addr", raft,
		"--admin-addr", admin, "--edge-addr", edge, "--edge-admin-addr", edgeAdmin)
	p.waitLog(t, "edge listening", 60*time.Second)
	// On ports other than its defaults, the banner points relayctl at the
	// control API (which RELAYCTL_SERVER does below).
	eventually(t, 30*time.Second, func() error {
		if !strings.Contains(banner.String(), "export RELAYCTL_SERVER=http://"+api+" ") {
			return fmt.Errorf("the banner does not name the API for relayctl: %s", banner.String())
		}
		return nil
	})
	var hashes edgeserver.CertHashesDoc
	eventually(t, 30*time.Second, func() error {
		resp, err := http.Get("http://" + edgeAdmin + "/readyz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("edge /readyz: %d", resp.StatusCode)
		}
		resp, err = http.Get("http://" + edgeAdmin + edgeserver.CertHashesPath)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		return json.NewDecoder(resp.Body).Decode(&hashes)
	})
	if len(hashes.Hashes) == 0 {
		t.Fatal("the edge publishes no certificate hash")
	}
	// Both processes say which release they run, as the build stamped it.
	for _, a := range []string{admin, edgeAdmin} {
		if m := get(t, "http://"+a+"/metrics"); !strings.Contains(m, `relay_build_info{goversion="go`) || !strings.Contains(m, `revision="0123456789ab",version="`+stampedVersion+`"} 1`) {
			t.Fatalf("%s/metrics lacks relay_build_info for the stamped release", a)
		}
	}
	// The banner points a browser at the device console on the edge's
	// admin port.
	resp, err := http.Get("http://" + edgeAdmin + "/")
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(page), "Relay device console") {
		t.Fatalf("console page: %d %.200s", resp.StatusCode, page)
	}
	hash := hashes.Hashes[0].Value

	env := append(os.Environ(), "RELAYCTL_CONFIG_DIR="+filepath.Join(dir, "ctl"), "RELAYCTL_SERVER=http://"+api)
	ctl := func(stdin string, args ...string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, bins.relayctl, args...)
		cmd.Env, cmd.Dir, cmd.Stdin = env, dir, strings.NewReader(stdin)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("relayctl %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	id := func(out string) string {
		t.Helper()
		var v struct{ ID string }
		if err := json.Unmarshal([]byte(out), &v); err != nil || v.ID == "" {
			t.Fatalf("no id in %q: %v", out, err)
		}
		return v.ID
	}
	// A device's id, and the revision that registered it.
	registered := func(out string) (string, string) {
		t.Helper()
		var v struct{ ID, Revision string }
		if err := json.Unmarshal([]byte(out), &v); err != nil || v.ID == "" || v.Revision == "" {
			t.Fatalf("no id and revision in %q: %v", out, err)
		}
		return v.ID, v.Revision
	}
	ctl(adminPassword, "login", "--password-stdin", "admin")
	user := id(ctl("", "-o", "json", "user", "create", "--login", "alice", "--no-password"))
	phone, phoneRev := registered(ctl("", "-o", "json", "device", "register", "--user", user, "--name", "phone", "--generate-key", "phone.key"))
	laptop, laptopRev := registered(ctl("", "-o", "json", "device", "register", "--user", user, "--name", "laptop", "--generate-key", "laptop.key"))

	common := []string{"--edge", edge, "--cert-hash", hash, "--user", user}
	listen := exec.Command(bins.relayctl, append(append([]string{"-o", "json", "relay", "listen"}, common...), "--device", laptop, "--key", "laptop.key", "--min-revision", laptopRev, "--for", "60s")...)
	got := &relaytest.Buffer{}
	listen.Env, listen.Dir, listen.Stdout = env, dir, got
	if err := listen.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = listen.Process.Kill(); _ = listen.Wait() })
	// The listener is connected once the sender sees it online; until
	// then a broadcast reaches nobody, so target it and retry.
	eventually(t, 30*time.Second, func() error {
		cmd := exec.Command(bins.relayctl, append(append([]string{"relay", "send"}, common...), "--device", phone, "--key", "phone.key", "--min-revision", phoneRev, "--to", laptop, "hello", "laptop")...)
		cmd.Env, cmd.Dir = env, dir
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("send: %v: %s", err, out)
		}
		if !strings.Contains(string(out), "acknowledged after") {
			return fmt.Errorf("send said %q", out)
		}
		return nil
	})
	eventually(t, 10*time.Second, func() error {
		if s := got.String(); !strings.Contains(s, `"sender":"`+phone+`"`) || !strings.Contains(s, `"payload":"aGVsbG8gbGFwdG9w"`) {
			return fmt.Errorf("listener printed %q", s)
		}
		return nil
	})

	// SIGTERM stops both parts cleanly.
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.Done():
		if p.Err() != nil {
			t.Fatalf("relayd dev exited with %v", p.Err())
		}
	case <-time.After(60 * time.Second):
		t.Fatal("relayd dev did not stop within 60s of SIGTERM")
	}
}

// A restart of relayd dev keeps the edge's certificate (the hash clients
// pinned from the first banner still works), says how much state it
// loaded, and the first start's log line tells the truth about a
// password relayd dev generated.
func TestDevRestartKeepsThePinAndTellsTheState(t *testing.T) {
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	args := []string{"dev", "--data-dir", data, "--api-addr", freePort(t), "--raft-addr", freePort(t),
		"--admin-addr", freePort(t), "--edge-addr", freeUDPPort(t), "--edge-admin-addr", freePort(t)}
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "RELAY_ADMIN_PASSWORD=") {
			env = append(env, kv)
		}
	}
	// start runs relayd dev until its banner is out, stops it, and
	// returns the banner and the process.
	start := func() (string, *proc) {
		t.Helper()
		out := &relaytest.Buffer{}
		p := startRelaydWith(t, env, out, args...)
		eventually(t, 90*time.Second, func() error {
			if !strings.Contains(out.String(), "Stop with Ctrl-C.") {
				return fmt.Errorf("no banner yet; last logs:%s", p.LastLogs(3))
			}
			return nil
		})
		if err := p.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		select {
		case <-p.Done():
		case <-time.After(60 * time.Second):
			t.Fatal("relayd dev did not stop within 60s of SIGTERM")
		}
		return out.String(), p
	}
	hashOf := func(banner string) string {
		t.Helper()
		for _, line := range strings.Split(banner, "\n") {
			if f := strings.Fields(line); len(f) >= 4 && f[0] == "edge" && f[1] == "cert" && f[2] == "hash" {
				return f[3]
			}
		}
		t.Fatalf("no certificate hash in the banner:\n%s", banner)
		return ""
	}
	first, p := start()
	if !strings.Contains(first, "It started from an empty data dir") {
		t.Errorf("first banner does not say the state is new:\n%s", first)
	}
	init, err := p.WaitLog("initialized a new cluster; the first admin's password is the one generated by relayd dev and saved in "+filepath.Join(data, "admin-password"), time.Second, nil)
	if err != nil || init == nil {
		t.Errorf("first start's password line: %v", err)
	}
	second, _ := start()
	if h1, h2 := hashOf(first), hashOf(second); h1 != h2 {
		t.Errorf("the certificate hash changed across a restart: %s, then %s", h1, h2)
	}
	if !strings.Contains(second, "It loaded the state kept in "+data+": 2 accounts, 0 devices") {
		t.Errorf("second banner does not tell the state it loaded:\n%s", second)
	}
	if !strings.Contains(second, "the one kept in "+filepath.Join(data, "edge-cert.pem")) {
		t.Errorf("second banner does not say the certificate was kept:\n%s", second)
	}
}

// relayd in a cgroup with a memory limit (a pod's limits.memory) gives
// the Go runtime a soft limit of 90% of it, says so, and exports it.
func TestRelaydTakesItsCgroupMemoryLimit(t *testing.T) {
	var limit int64 = 1 << 30
	cg := relaytest.MemoryCgroup(t, limit)
	dir := t.TempDir()
	admin := freePort(t)
	argv := relaytest.InCgroup(cg, bins.relayd, "dev", "--data-dir", filepath.Join(dir, "data"), "--api-addr", freePort(t),
		"--raft-addr", freePort(t), "--admin-addr", admin, "--edge-addr", freeUDPPort(t), "--edge-admin-addr", freePort(t),
		"--log-format", "json")
	cmd := exec.Command(argv[0], argv[1:]...)
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "GOMEMLIMIT=") {
			env = append(env, kv)
		}
	}
	cmd.Env = append(env, "RELAY_ADMIN_PASSWORD="+adminPassword)
	p := &proc{relaytest.StartCmd(t, "relayd", cmd)}
	want := int64(float64(limit) * 0.9)
	rec := p.waitLog(t, "soft memory limit set below the cgroup's", 60*time.Second)
	if rec["limit_bytes"] != float64(want) || rec["cgroup_limit_bytes"] != float64(limit) {
		t.Fatalf("log line %v, want limit_bytes %d of %d", rec, want, limit)
	}
	eventually(t, 60*time.Second, func() error {
		resp, err := http.Get("http://" + admin + "/metrics")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			return err
		}
		if line := fmt.Sprintf("go_gc_gomemlimit_bytes %g", float64(want)); !strings.Contains(string(b), line+"\n") {
			return fmt.Errorf("/metrics has no %q", line)
		}
		return nil
	})
}
