package relaytest

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/edge-relay/relay/control/clustertest"
)

// Network namespaces: each host of a test network is a namespace of its
// own with one address on a bridge, so a partition is real (packets
// dropped by iptables between namespaces) and a process sees only the
// addresses of the network it is in.
//
// The test process itself runs in a namespace too: MainInNetns (called
// from TestMain) creates a "client" namespace and runs the test binary
// again inside it, so every connection the tests open reaches the hosts
// through the bridge, nothing of the test network touches the machine's
// own namespace, and the outer process deletes every namespace of the
// run when the tests end, however they end. Namespaces are named
// "rlt<pid>-...", pid being the outer process's; a run sweeps those of
// earlier runs whose process is gone (a crash, a kill -9).

// Environment variables of the netns support.
const (
	// envNetnsChild names the run's namespace prefix in the inner process.
	envNetnsChild = "RELAYTEST_NETNS_PREFIX"
	// envNetnsUnavailable says why namespaces could not be made.
	envNetnsUnavailable = "RELAYTEST_NETNS_UNAVAILABLE"
	// EnvRequireNetns, set to 1 (CI does), turns "network namespaces
	// are not available" from a skip into a failure.
	EnvRequireNetns = "RELAY_REQUIRE_NETNS"
)

const nsPrefix = "rlt"

var staleNS = regexp.MustCompile(`^` + nsPrefix + `(\d+)-`)

// MainInNetns runs the tests of a package inside a network namespace of
// their own, for tests that build networks with NewNet. Call it from
// TestMain: os.Exit(relaytest.MainInNetns(m)). Where namespaces cannot
// be created (not root, no ip(8) or iptables(8)) the tests run where
// they are and NewNet skips, or fails under RELAY_REQUIRE_NETNS=1.
func MainInNetns(m interface{ Run() int }) int {
	if os.Getenv(envNetnsChild) != "" {
		return m.Run()
	}
	SweepStaleNamespaces()
	prefix := fmt.Sprintf("%s%d", nsPrefix, os.Getpid())
	client := prefix + "-client"
	if why := netnsUnavailable(client); why != "" {
		os.Setenv(envNetnsUnavailable, why)
		return m.Run()
	}
	defer deleteNamespaces(prefix + "-")
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, "relaytest:", err)
		return 1
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", client, self}, os.Args[1:]...)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), envNetnsChild+"="+prefix)
	// The inner run dies with this process (go test's timeout kills it);
	// the deferred sweep or the next run's removes its namespaces.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) && ee.ExitCode() > 0 {
			return ee.ExitCode()
		}
		fmt.Fprintln(os.Stderr, "relaytest: run the tests in a namespace:", err)
		return 1
	}
	return 0
}

// netnsUnavailable creates the client namespace, or says why it cannot.
func netnsUnavailable(client string) string {
	if os.Geteuid() != 0 {
		return "network namespaces need root"
	}
	for _, tool := range []string{"ip", "iptables"} {
		if _, err := exec.LookPath(tool); err != nil {
			return tool + "(8) is not installed"
		}
	}
	if out, err := exec.Command("ip", "netns", "add", client).CombinedOutput(); err != nil {
		return fmt.Sprintf("ip netns add: %v: %s", err, bytes.TrimSpace(out))
	}
	if out, err := exec.Command("ip", "-n", client, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		_ = exec.Command("ip", "netns", "del", client).Run()
		return fmt.Sprintf("ip link set lo up: %v: %s", err, bytes.TrimSpace(out))
	}
	if out, err := exec.Command("ip", "netns", "exec", client, "iptables", "-w", "-S", "INPUT").CombinedOutput(); err != nil {
		_ = exec.Command("ip", "netns", "del", client).Run()
		return fmt.Sprintf("iptables in a namespace: %v: %s", err, bytes.TrimSpace(out))
	}
	return ""
}

// SweepStaleNamespaces deletes the namespaces of earlier runs whose
// process is gone.
func SweepStaleNamespaces() {
	for _, ns := range listNamespaces() {
		m := staleNS.FindStringSubmatch(ns)
		if m == nil {
			continue
		}
		pid, _ := strconv.Atoi(m[1])
		if pid > 0 && syscall.Kill(pid, 0) == nil {
			continue // its run is still going
		}
		_ = exec.Command("ip", "netns", "del", ns).Run()
	}
}

func listNamespaces() []string {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return nil
	}
	var names []string
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			names = append(names, f[0])
		}
	}
	return names
}

func deleteNamespaces(prefix string) {
	for _, ns := range listNamespaces() {
		if strings.HasPrefix(ns, prefix) {
			_ = exec.Command("ip", "netns", "del", ns).Run()
		}
	}
}

// Net is a test network: a bridge in a namespace of its own, hosts
// attached to it (one namespace and address each), and the test process
// attached as the host Client. Partitions are iptables DROP rules in the
// receiving host's INPUT chain. Everything is deleted by t.Cleanup.
type Net struct {
	t      clustertest.TB
	prefix string // of every namespace of this network
	hub    string // the bridge's namespace
	subnet [3]byte
	// Client is the host the test process runs in.
	Client *Host

	mu    sync.Mutex // guards the fields below
	hosts []*Host
	cuts  map[[2]*Host]bool // from, to: packets from -> to dropped
	dirty map[*Host]bool    // hosts whose INPUT chain has rules
}

// Host is a namespace on a Net with one address.
type Host struct {
	net  *Net
	Name string
	// NS is the namespace's name ("" for the test process's own).
	NS string
	// Addr is the host's address on the bridge.
	Addr netip.Addr
}

// NeedNetns skips the test (fails it under RELAY_REQUIRE_NETNS=1) when
// the tests do not run inside MainInNetns's namespace.
func NeedNetns(t clustertest.TB) {
	t.Helper()
	if os.Getenv(envNetnsChild) != "" {
		return
	}
	why := os.Getenv(envNetnsUnavailable)
	if why == "" {
		why = "the package's TestMain does not call relaytest.MainInNetns"
	}
	skipUnlessRequired(t, EnvRequireNetns, "network namespaces are not available ("+why+"); these tests need root, ip(8) and iptables(8)")
}

// skipUnlessRequired skips the test for want of what msg says, or fails
// it when the environment variable env is 1 (CI sets it: there the test
// must run).
func skipUnlessRequired(t clustertest.TB, env, msg string) {
	t.Helper()
	if os.Getenv(env) == "1" {
		t.Fatalf("%s, and %s=1 requires it", msg, env)
	}
	type skipper interface{ Skip(args ...any) }
	if s, ok := t.(skipper); ok {
		s.Skip(msg)
	}
	t.Fatal(msg)
}

// NewNet builds an empty network with the test process attached.
func NewNet(t clustertest.TB) *Net {
	t.Helper()
	NeedNetns(t)
	base := os.Getenv(envNetnsChild)
	n := &Net{t: t, cuts: map[[2]*Host]bool{}, dirty: map[*Host]bool{}}
	// Pick a network number nobody in this run holds: creating the hub
	// namespace is the claim.
	for k := 1; ; k++ {
		if k > 250 {
			t.Fatal("relaytest: no free network number")
		}
		hub := fmt.Sprintf("%s-n%d", base, k)
		if err := exec.Command("ip", "netns", "add", hub).Run(); err != nil {
			continue
		}
		n.prefix, n.hub, n.subnet = hub, hub, [3]byte{10, 213, byte(k)}
		break
	}
	t.Cleanup(n.close)
	n.ip("-n", n.hub, "link", "add", "br0", "type", "bridge")
	n.ip("-n", n.hub, "link", "set", "br0", "up")
	// The test process's side: a veth in its own namespace.
	local := fmt.Sprintf("rl%d", n.subnet[2])
	n.ip("link", "add", local, "type", "veth", "peer", "name", "client", "netns", n.hub)
	n.ip("-n", n.hub, "link", "set", "client", "master", "br0", "up")
	addr := netip.AddrFrom4([4]byte{n.subnet[0], n.subnet[1], n.subnet[2], 254})
	n.ip("addr", "add", addr.String()+"/24", "dev", local)
	n.ip("link", "set", local, "up")
	n.Client = &Host{net: n, Name: "client", Addr: addr}
	return n
}

func (n *Net) close() {
	// The test process's end first: a deleted namespace goes away (with
	// the veths in it) only once the kernel gets to it, and the next
	// network may reuse this one's number right away.
	_ = exec.Command("ip", "link", "del", fmt.Sprintf("rl%d", n.subnet[2])).Run()
	for _, h := range n.hosts {
		_ = exec.Command("ip", "netns", "del", h.NS).Run()
	}
	_ = exec.Command("ip", "netns", "del", n.hub).Run()
	_ = exec.Command("iptables", "-w", "-F", "INPUT").Run()
}

func (n *Net) ip(args ...string) {
	n.t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		n.t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
}

// Host adds a host (a namespace with its loopback up and one address on
// the bridge).
func (n *Net) Host(name string) *Host {
	n.t.Helper()
	n.mu.Lock()
	idx := len(n.hosts) + 1
	h := &Host{net: n, Name: name, NS: fmt.Sprintf("%s-h%d", n.prefix, idx),
		Addr: netip.AddrFrom4([4]byte{n.subnet[0], n.subnet[1], n.subnet[2], byte(idx)})}
	n.hosts = append(n.hosts, h)
	n.mu.Unlock()
	n.ip("netns", "add", h.NS)
	n.ip("-n", h.NS, "link", "set", "lo", "up")
	veth := fmt.Sprintf("v%d", idx)
	n.ip("-n", n.hub, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", h.NS)
	n.ip("-n", n.hub, "link", "set", veth, "master", "br0", "up")
	n.ip("-n", h.NS, "addr", "add", h.Addr.String()+"/24", "dev", "eth0")
	n.ip("-n", h.NS, "link", "set", "eth0", "up")
	return h
}

// Hosts are the hosts added so far (not the client).
func (n *Net) Hosts() []*Host {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]*Host(nil), n.hosts...)
}

// AddrPort is the host's address with a port, as host:port.
func (h *Host) AddrPort(port int) string {
	return netip.AddrPortFrom(h.Addr, uint16(port)).String()
}

// Command builds a command that runs inside the host's namespace.
func (h *Host) Command(name string, args ...string) *exec.Cmd {
	if h.NS == "" {
		return exec.Command(name, args...)
	}
	return exec.Command("ip", append([]string{"netns", "exec", h.NS, name}, args...)...)
}

func (h *Host) iptables(args ...string) error {
	out, err := h.Command("iptables", append([]string{"-w"}, args...)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("iptables %s in %s: %v: %s", strings.Join(args, " "), h.Name, err, bytes.TrimSpace(out))
	}
	return nil
}

// CutOneWay drops every packet from one host to another (the other
// direction still flows: to's replies reach from, from's packets are
// lost).
func (n *Net) CutOneWay(from, to *Host) {
	n.t.Helper()
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cuts[[2]*Host{from, to}] {
		return
	}
	if err := to.iptables("-A", "INPUT", "-s", from.Addr.String(), "-j", "DROP"); err != nil {
		n.t.Fatal(err)
	}
	n.cuts[[2]*Host{from, to}] = true
	n.dirty[to] = true
}

// CutPort drops the traffic between a host and one port of another (udp
// or tcp), both ways; the hosts' other traffic flows.
func (n *Net) CutPort(from, to *Host, proto string, port int) {
	n.t.Helper()
	n.mu.Lock()
	defer n.mu.Unlock()
	p := fmt.Sprint(port)
	if err := to.iptables("-A", "INPUT", "-s", from.Addr.String(), "-p", proto, "--dport", p, "-j", "DROP"); err != nil {
		n.t.Fatal(err)
	}
	if err := from.iptables("-A", "INPUT", "-s", to.Addr.String(), "-p", proto, "--sport", p, "-j", "DROP"); err != nil {
		n.t.Fatal(err)
	}
	n.dirty[from], n.dirty[to] = true, true
}

// Cut drops every packet between two hosts, both ways.
func (n *Net) Cut(a, b *Host) {
	n.t.Helper()
	n.CutOneWay(a, b)
	n.CutOneWay(b, a)
}

// Partition splits the network into groups: no packet passes between
// hosts of different groups. Hosts in no group keep every link.
func (n *Net) Partition(groups ...[]*Host) {
	n.t.Helper()
	for i, g := range groups {
		for j, o := range groups {
			if i == j {
				continue
			}
			for _, a := range g {
				for _, b := range o {
					n.CutOneWay(a, b)
				}
			}
		}
	}
}

// Isolate cuts a host off from every other host and the client.
func (n *Net) Isolate(h *Host) {
	n.t.Helper()
	for _, o := range append(n.Hosts(), n.Client) {
		if o != h {
			n.Cut(h, o)
		}
	}
}

// Heal removes every cut.
func (n *Net) Heal() {
	n.t.Helper()
	n.mu.Lock()
	defer n.mu.Unlock()
	for h := range n.dirty {
		if err := h.iptables("-F", "INPUT"); err != nil {
			n.t.Fatal(err)
		}
	}
	clear(n.dirty)
	clear(n.cuts)
}

// Cuts describes the cuts in place, for logs ("a->b, ...").
func (n *Net) Cuts() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	var s []string
	for c := range n.cuts {
		s = append(s, c[0].Name+"->"+c[1].Name)
	}
	return strings.Join(s, ", ")
}
