package deploy

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
)

// envFile reads a systemd EnvironmentFile: KEY=VALUE lines, # comments.
// Commented-out assignments ("#KEY=VALUE") are returned in alt.
func envFile(t *testing.T, path string) (env, alt map[string]string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	env, alt = map[string]string{}, map[string]string{}
	assign := regexp.MustCompile(`^(#?)([A-Z][A-Z0-9_]*)=(.*)$`)
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		m := assign.FindStringSubmatch(strings.TrimSpace(sc.Text()))
		if m == nil {
			continue
		}
		if m[1] == "#" {
			alt[m[2]] = m[3]
		} else {
			env[m[2]] = m[3]
		}
	}
	return env, alt
}

// unitExecStart returns the arguments after the binary of a unit's
// ExecStart.
func unitExecStart(t *testing.T, unit string) []string {
	t.Helper()
	b, err := os.ReadFile(unit)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "ExecStart="); ok {
			f := strings.Fields(v)
			if f[0] != "/usr/local/bin/relayd" {
				t.Fatalf("%s starts %s, want /usr/local/bin/relayd", unit, f[0])
			}
			return f[1:]
		}
	}
	t.Fatalf("%s has no ExecStart", unit)
	return nil
}

// TestSystemdUnits checks the units with systemd-analyze and their
// example environment files against relayd's flags.
func TestSystemdUnits(t *testing.T) {
	analyze := tool(t, "systemd-analyze", "systemd")
	flags := map[string]commandFlags{"control": relaydFlags(t, "control"), "edge": relaydFlags(t, "edge")}
	for _, c := range []string{"control", "edge"} {
		t.Run(c, func(t *testing.T) {
			unit := filepath.Join("systemd", "relayd-"+c+".service")
			// Verify a copy whose ExecStart is a real relayd (the unit's
			// /usr/local/bin/relayd is not installed here).
			b, err := os.ReadFile(unit)
			if err != nil {
				t.Fatal(err)
			}
			tmp := filepath.Join(t.TempDir(), filepath.Base(unit))
			if err := os.WriteFile(tmp, bytes.ReplaceAll(b, []byte("/usr/local/bin/relayd"), []byte(bin(t, "relayd"))), 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command(analyze, "verify", tmp).CombinedOutput()
			if err != nil || len(bytes.TrimSpace(out)) != 0 {
				t.Errorf("systemd-analyze verify %s: %v\n%s", unit, err, out)
			}
			if !bytes.Contains(b, []byte("EnvironmentFile=/etc/relay/"+c+".env")) {
				t.Errorf("%s does not read /etc/relay/%s.env", unit, c)
			}
			args := unitExecStart(t, unit)
			if len(args) == 0 || args[0] != c {
				t.Fatalf("%s runs relayd %v", unit, args)
			}
			env, alt := envFile(t, filepath.Join("systemd", c+".env"))
			text, err := os.ReadFile(filepath.Join("systemd", c+".env"))
			if err != nil {
				t.Fatal(err)
			}
			// The header says every variable is a flag of relayd: it names
			// the ones that are not (read from the environment only).
			header, _, _ := strings.Cut(string(text), "\nRELAY_")
			for k := range joined(env, alt) {
				if _, ok := flags[c].byEnv[k]; !ok && !secretEnv[k] {
					t.Errorf("%s.env sets %s, which is not a flag of relayd %s", c, k, c)
				} else if !ok && !strings.Contains(header, k) {
					t.Errorf("%s.env sets %s, which is no flag of relayd %s (the environment only), and its header does not name it as an exception", c, k, c)
				}
			}
			switch c {
			case "edge":
				// The edge id defaults to the host name, unique per host; a
				// fixed id copied to a second host makes the control plane
				// refuse that edge ("another running edge holds this edge
				// id"), and it is never ready.
				if id, ok := env["RELAY_EDGE_ID"]; ok {
					t.Errorf("edge.env sets RELAY_EDGE_ID=%s: a second host given the same file is refused; leave it to the host name", id)
				}
			case "control":
				// The file is n1's: what the other nodes change is said at
				// its top, the bootstrap lines included.
				eb, err := os.ReadFile(filepath.Join("systemd", "control.env"))
				if err != nil {
					t.Fatal(err)
				}
				head, _, _ := strings.Cut(string(eb), "\nRELAY_")
				for _, v := range []string{"RELAY_NODE_ID", "RELAY_BOOTSTRAP", "RELAY_ADMIN_PASSWORD", "RELAY_JOIN"} {
					if !strings.Contains(head, v) {
						t.Errorf("control.env's header does not say what the other nodes do with %s", v)
					}
				}
			}
			checkAdminScraped(t, c, env["RELAY_ADMIN_ADDR"])
			// An edge bounds its sessions below the unit's MemoryMax.
			if c == "edge" {
				var limit int64
				if m := regexp.MustCompile(`(?m)^MemoryMax=(\S+)$`).FindSubmatch(b); m != nil {
					if limit, err = systemdBytes(string(m[1])); err != nil {
						t.Errorf("MemoryMax=%s: %v", m[1], err)
					}
				}
				checkSessionCap(t, unit, env["RELAY_MAX_SESSIONS"], env["RELAY_MAX_PENDING_HTTPS"], limit)
			}
			// The unit gives relayd time for its graceful stop.
			stop := regexp.MustCompile(`(?m)^TimeoutStopSec=(\d+)$`).FindSubmatch(b)
			d, err := parseSeconds(env["RELAY_SHUTDOWN_TIMEOUT"])
			if stop == nil || err != nil {
				t.Fatalf("TimeoutStopSec %q, RELAY_SHUTDOWN_TIMEOUT: %v", stop, err)
			}
			if n, _ := strconv.ParseInt(string(stop[1]), 10, 64); n < d+5 {
				t.Errorf("TimeoutStopSec=%d does not cover RELAY_SHUTDOWN_TIMEOUT=%s", n, env["RELAY_SHUTDOWN_TIMEOUT"])
			}
		})
	}
}

// hostCluster is the guide's "systemd hosts" deployment run on this
// machine: the units' command lines with the example environment files,
// every address moved to 127.0.0.1 and a free port, every path into a
// temporary directory.
type hostCluster struct {
	t       *testing.T
	dir     string
	tls     string // the directory relay-certs.sh wrote
	ports   map[string]string
	procs   map[string]*exec.Cmd
	ctlEnv  []string
	adminPW string
}

var hostPort = regexp.MustCompile(`\b\d+\.\d+\.\d+\.\d+:\d+\b`)

// localize rewrites one environment file's values for this machine.
func (h *hostCluster) localize(env map[string]string, node string) []string {
	out := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + h.dir}
	for k, v := range env {
		v = hostPort.ReplaceAllStringFunc(v, h.port)
		v = strings.ReplaceAll(v, "/etc/relay/tls", h.tls)
		v = strings.ReplaceAll(v, "/etc/relay/backup.key", filepath.Join(h.dir, "backup.key"))
		v = strings.ReplaceAll(v, "/var/lib/relay", filepath.Join(h.dir, node))
		out = append(out, k+"="+v)
	}
	return out
}

// port gives every address of the example files (10.0.0.1:7400, ...) a
// free port on 127.0.0.1, the same one each time it is asked.
func (h *hostCluster) port(addr string) string {
	if p, ok := h.ports[addr]; ok {
		return p
	}
	p := freeUDPTCPPort(h.t)
	h.ports[addr] = "127.0.0.1:" + p
	return h.ports[addr]
}

// freeUDPTCPPort finds a port free for both TCP and UDP on 127.0.0.1 (an edge
// listens on both).
func freeUDPTCPPort(t *testing.T) string {
	for range 50 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		p := l.Addr().(*net.TCPAddr).Port
		u, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", p))
		_ = l.Close()
		if err == nil {
			_ = u.Close()
			return strconv.Itoa(p)
		}
	}
	t.Fatal("no free port")
	return ""
}

// start runs relayd the way a unit does: its ExecStart arguments, its
// EnvironmentFile, SIGTERM to stop.
func (h *hostCluster) start(name, unit string, env []string, extra ...string) {
	h.t.Helper()
	args := append(unitExecStart(h.t, unit), extra...)
	cmd := exec.Command(bin(h.t, "relayd"), args...)
	cmd.Env = env
	logf, err := os.Create(filepath.Join(h.dir, name+".log"))
	if err != nil {
		h.t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		h.t.Fatal(err)
	}
	h.procs[name] = cmd
	h.t.Cleanup(func() { h.stop(name); _ = logf.Close() })
}

// stop sends SIGTERM and waits, as systemctl stop does; a process still
// running after TimeoutStopSec is killed and the test fails.
func (h *hostCluster) stop(name string) {
	cmd, ok := h.procs[name]
	if !ok {
		return
	}
	delete(h.procs, name)
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var exit *exec.ExitError
		if err != nil && !errors.As(err, &exit) {
			h.t.Errorf("%s: %v", name, err)
		}
	case <-time.After(45 * time.Second):
		_ = cmd.Process.Kill()
		<-done
		h.t.Errorf("%s did not stop within 45s of SIGTERM (TimeoutStopSec)", name)
	}
}

// waitReady polls /readyz until it answers 200.
func (h *hostCluster) waitReady(name, addr string) {
	h.t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	var last string
	for time.Now().Before(deadline) {
		resp, err := http.Get("http://" + addr + "/readyz")
		if err == nil {
			b := new(bytes.Buffer)
			_, _ = b.ReadFrom(resp.Body)
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
			last = resp.Status + " " + b.String()
		} else {
			last = err.Error()
		}
		if cmd, ok := h.procs[name]; ok && cmd.ProcessState != nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	logs, _ := os.ReadFile(filepath.Join(h.dir, name+".log"))
	h.t.Fatalf("%s not ready at %s: %s\n%s", name, addr, last, logs)
}

// relayctl runs relayctl against server with stdin.
func (h *hostCluster) relayctl(server, stdin string, args ...string) string {
	h.t.Helper()
	cmd := exec.Command(bin(h.t, "relayctl"), args...)
	cmd.Env = append(slices.Clone(h.ctlEnv), "RELAYCTL_SERVER=https://"+server)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		h.t.Fatalf("relayctl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestHostCluster follows the guide's "systemd hosts" section with the
// real binaries, units and example environment files: certificates from
// relay-certs.sh, n1 bootstraps, n2 and n3 join with their certificates
// (no token, no manual step), the edges' account, an edge, a rolling
// restart of a member, removing a member, a backup, and a restore of it
// into a new cluster.
func TestHostCluster(t *testing.T) {
	tool(t, "openssl", "openssl")
	h := &hostCluster{t: t, dir: t.TempDir(), ports: map[string]string{}, procs: map[string]*exec.Cmd{}}
	h.tls = filepath.Join(h.dir, "tls")
	out, err := exec.Command("scripts/relay-certs.sh", h.tls, "localhost", "127.0.0.1").CombinedOutput()
	if err != nil {
		t.Fatalf("relay-certs.sh: %v\n%s", err, out)
	}
	h.ctlEnv = []string{"PATH=" + os.Getenv("PATH"), "RELAYCTL_TLS_CA=" + filepath.Join(h.tls, "ca.crt"),
		"RELAYCTL_CONFIG_DIR=" + filepath.Join(h.dir, "relayctl")}

	// The backup key, as the guide makes it.
	h.relayctl("127.0.0.1:1", "", "backup", "keygen", filepath.Join(h.dir, "backup.key"))

	control, alt := envFile(t, "systemd/control.env")
	h.adminPW = control["RELAY_ADMIN_PASSWORD"]
	// Backups every hour would mean the first one only, taken before
	// anything below: this test wants one every two seconds.
	control["RELAY_BACKUP_EVERY"] = "2s"
	unit := "systemd/relayd-control.service"
	// n2 and n3: "change RELAY_NODE_ID and the three addresses", and
	// RELAY_JOIN instead of RELAY_BOOTSTRAP and the password.
	node := func(n int) map[string]string {
		env := maps.Clone(control)
		if n > 1 {
			delete(env, "RELAY_BOOTSTRAP")
			delete(env, "RELAY_ADMIN_PASSWORD")
			env["RELAY_JOIN"] = alt["RELAY_JOIN"]
		}
		env["RELAY_NODE_ID"] = fmt.Sprintf("n%d", n)
		for _, k := range []string{"RELAY_API_ADDR", "RELAY_RAFT_ADDR", "RELAY_ADMIN_ADDR"} {
			env[k] = strings.Replace(env[k], "10.0.0.1:", fmt.Sprintf("10.0.0.%d:", n), 1)
		}
		return env
	}
	for n := 1; n <= 3; n++ {
		env := node(n)
		name := fmt.Sprintf("n%d", n)
		h.start(name, unit, h.localize(env, name))
		if n == 1 {
			h.waitReady(name, h.port(env["RELAY_ADMIN_ADDR"]))
		}
	}
	for n := 2; n <= 3; n++ {
		h.waitReady(fmt.Sprintf("n%d", n), h.port(node(n)["RELAY_ADMIN_ADDR"]))
	}
	n1API := h.port(node(1)["RELAY_API_ADDR"])
	h.relayctl(n1API, h.adminPW, "login", "--password-stdin", "admin")
	status := h.clusterStatus(n1API)
	if len(status) != 3 {
		t.Fatalf("cluster status lists %d voters, want 3: %v", len(status), status)
	}

	// The edges' account, then an edge from edge.env.
	edge, _ := envFile(t, "systemd/edge.env")
	h.relayctl(n1API, edge["RELAY_EDGE_PASSWORD"], "user", "create", "--login", edge["RELAY_EDGE_LOGIN"], "--role", "edge", "--password-stdin")
	edge["RELAY_ADDR"] = "10.0.1.1:443" // the test's edge listens on 127.0.0.1 too
	h.start("edge", "systemd/relayd-edge.service", h.localize(edge, "edge"))
	h.waitReady("edge", h.port(edge["RELAY_ADMIN_ADDR"]))

	// Upgrade, one node at a time: stop, (replace the binary,) start with
	// the same settings, wait for /readyz.
	h.stop("n2")
	h.start("n2", unit, h.localize(node(2), "n2"))
	h.waitReady("n2", h.port(node(2)["RELAY_ADMIN_ADDR"]))

	// Remove a member: relayctl cluster remove, then stop it.
	h.relayctl(n1API, "", "cluster", "remove", "n3")
	h.stop("n3")
	if s := h.clusterStatus(n1API); len(s) != 2 {
		t.Fatalf("after removing n3: %v", s)
	}

	// Backup, and a new cluster restored from it: relayctl's, encrypted
	// to the same key, and the newest scheduled one, which is restored.
	key := filepath.Join(h.dir, "backup.key")
	if out := h.relayctl(n1API, "", "backup", "--key-file", key, filepath.Join(h.dir, "relay.bin.age")); !strings.Contains(out, "verified") {
		t.Fatalf("relayctl backup: %s", out)
	}
	since := time.Now()
	var backup string
	deadline := time.Now().Add(time.Minute)
	for backup == "" {
		for _, n := range []string{"n1", "n2", "n3"} {
			names, _ := filepath.Glob(filepath.Join(h.dir, n+"-backups", "relay-backup-*.bin.age"))
			for _, name := range names {
				if fi, err := os.Stat(name); err == nil && fi.ModTime().After(since) {
					backup = filepath.Join(h.dir, "scheduled.bin.age")
					b, err := os.ReadFile(name) // a copy, before the schedule prunes it
					if err == nil {
						err = os.WriteFile(backup, b, 0o600)
					}
					if err != nil {
						backup = ""
					}
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("no scheduled backup within a minute")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if out := h.relayctl(n1API, "", "backup", "verify", "--key-file", key, backup); !strings.Contains(out, "verified") {
		t.Fatalf("relayctl backup verify: %s", out)
	}
	restored := node(1)
	delete(restored, "RELAY_BOOTSTRAP")
	delete(restored, "RELAY_ADMIN_PASSWORD")
	restored["RELAY_NODE_ID"] = "r1"
	for _, k := range []string{"RELAY_API_ADDR", "RELAY_RAFT_ADDR", "RELAY_ADMIN_ADDR"} {
		restored[k] = strings.Replace(restored[k], "10.0.0.1:", "10.0.9.1:", 1)
	}
	h.start("r1", unit, h.localize(restored, "r1"), "--restore", backup)
	h.waitReady("r1", h.port(restored["RELAY_ADMIN_ADDR"]))
	r1API := h.port(restored["RELAY_API_ADDR"])
	h.relayctl(r1API, h.adminPW, "login", "--password-stdin", "admin")
	if users := h.relayctl(r1API, "", "user", "list"); !strings.Contains(users, edge["RELAY_EDGE_LOGIN"]) {
		t.Fatalf("the restored cluster lacks the edges' account:\n%s", users)
	}
}

// joined returns the assignments of a and b in one map.
func joined(a, b map[string]string) map[string]string {
	out := maps.Clone(a)
	maps.Copy(out, b)
	return out
}

// clusterStatus returns the voters' ids as relayctl -o json reports them.
func (h *hostCluster) clusterStatus(server string) []string {
	h.t.Helper()
	var st struct {
		Members []struct {
			ID string `json:"id"`
		} `json:"members"`
	}
	out := h.relayctl(server, "", "-o", "json", "cluster", "status")
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		h.t.Fatalf("cluster status: %v\n%s", err, out)
	}
	var ids []string
	for _, m := range st.Members {
		ids = append(ids, m.ID)
	}
	return ids
}

// checkAdminScraped: the example Prometheus configuration scrapes the
// admin address the example environment file binds (the job's first
// target is this file's host), and that address is not loopback, where
// no Prometheus on another host could reach it.
func checkAdminScraped(t *testing.T, command, admin string) {
	t.Helper()
	b, err := os.ReadFile("prometheus/prometheus.yml")
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		ScrapeConfigs []struct {
			JobName       string `yaml:"job_name"`
			StaticConfigs []struct {
				Targets []string `yaml:"targets"`
			} `yaml:"static_configs"`
		} `yaml:"scrape_configs"`
	}
	if err := yaml.Unmarshal(b, &cfg); err != nil {
		t.Fatal(err)
	}
	if host, _, err := net.SplitHostPort(admin); err != nil || net.ParseIP(host) == nil || net.ParseIP(host).IsLoopback() {
		t.Errorf("%s.env: RELAY_ADMIN_ADDR=%q: want the host's own address, which Prometheus scrapes", command, admin)
	}
	for _, sc := range cfg.ScrapeConfigs {
		if sc.JobName != "relay-"+command {
			continue
		}
		for _, s := range sc.StaticConfigs {
			if slices.Contains(s.Targets, admin) {
				return
			}
		}
	}
	t.Errorf("prometheus/prometheus.yml's job relay-%s does not scrape %s, the admin address of %s.env", command, admin, command)
}

// The sysctl file for edge hosts lets a UDP socket's buffers reach what
// quic-go asks for its sockets (7 MiB, its internal/udp desiredBufferSize),
// both ways.
func TestUDPBufferSysctlsReachWhatQUICAsks(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("systemd", "90-relayd-udp-buffers.conf"))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]int{}
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		k, v, ok := strings.Cut(l, "=")
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if !ok || err != nil {
			t.Fatalf("line %q is not key=number", l)
		}
		got[strings.TrimSpace(k)] = n
	}
	const quicWants = 7 << 20
	for _, k := range []string{"net.core.rmem_max", "net.core.wmem_max"} {
		if got[k] < quicWants {
			t.Errorf("%s = %d, below the %d quic-go asks", k, got[k], quicWants)
		}
	}
	if len(got) != 2 {
		t.Errorf("settings %v, want the two buffer ceilings only", got)
	}
}
