// Package clustertest starts real control-plane clusters for tests: every
// node is a full control/server.Server on 127.0.0.1 with free ports and a
// temp data dir, and every cluster is stopped by t.Cleanup. Waiting is done
// on conditions with deadlines, never on sleeps.
package clustertest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/auth"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
	"github.com/edge-relay/relay/control/server"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
	"github.com/edge-relay/relay/storage/state"
)

// TB is what the helpers need of a test: *testing.T and *testing.B have
// it, and so does relaytest.Standalone, which runs clusters outside tests
// (examples, tools).
type TB interface {
	Helper()
	Fatal(args ...any)
	Fatalf(format string, args ...any)
	Errorf(format string, args ...any)
	Cleanup(func())
	TempDir() string
}

// Options tune a test cluster.
type Options struct {
	// Raft overrides the fast test timings.
	Raft raftnode.Tuning
	// FSM tunes the state machines.
	FSM fsm.Config
	// Logger; by default a cluster keeps its nodes' last log lines and
	// logs them if the test fails (set RELAY_TEST_LOG=1 to see every line
	// as it is written).
	Logger *slog.Logger
	// Auth tunes tokens; password hashing defaults to the cheap
	// auth.TestParams, and an account's logins and refreshes are not
	// bounded (TokensPerMinute), nor its sessions (MaxSessions), unless
	// the test sets a bound: AdminToken logs in on every call.
	Auth api.AuthConfig
	// Watch tunes the watch feed.
	Watch api.WatchConfig
	// TracerProvider, if set, traces every node.
	TracerProvider trace.TracerProvider
	// Configure, if set, adjusts every node's configuration (after the
	// test defaults, at every start).
	Configure func(*server.Config)
}

// AdminPassword is the first admin's password in every test cluster.
const AdminPassword = "test-admin-password"

// Cluster is a set of control nodes started by a test.
type Cluster struct {
	t     TB
	opts  Options
	tail  *logTail // the nodes' last log lines, when Options.Logger was not set
	Nodes []*Node
}

// Node is one member; Server is nil while the node is stopped.
type Node struct {
	ID      string
	DataDir string
	Server  *server.Server
	// Faults cuts the node's Raft traffic (Cluster.Isolate) or fails its writes; it stays
	// with the node across restarts.
	Faults *raftnode.Faults
	raft   string // raft address, kept across restarts
	api    string // api address, kept across restarts
}

// FastRaft are timings that elect within a few hundred milliseconds on
// loopback, even under the race detector on two cores.
func FastRaft() raftnode.Tuning {
	return raftnode.Tuning{
		HeartbeatTimeout:   200 * time.Millisecond,
		ElectionTimeout:    200 * time.Millisecond,
		LeaderLeaseTimeout: 100 * time.Millisecond,
		CommitTimeout:      5 * time.Millisecond,
	}
}

func (o *Options) defaults(c *Cluster) {
	if o.Raft == (raftnode.Tuning{}) {
		o.Raft = FastRaft()
	}
	if o.Auth.Password == (auth.Params{}) {
		o.Auth.Password = auth.TestParams
	}
	if o.Auth.TokensPerMinute == 0 {
		o.Auth.TokensPerMinute = -1
	}
	if o.Auth.MaxSessions == 0 {
		o.Auth.MaxSessions = -1
	}
	if o.Logger == nil {
		if os.Getenv("RELAY_TEST_LOG") != "" {
			o.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
		} else {
			c.tail = newLogTail()
			o.Logger = slog.New(slog.NewTextHandler(c.tail, &slog.HandlerOptions{Level: slog.LevelDebug}))
		}
	}
}

// Start starts an n-node cluster: node 0 bootstraps, the others join
// through it. It returns once every node is ready and the cluster is
// initialized (its first admin, keys and CA are in the state).
func Start(t TB, n int, opts Options) *Cluster {
	t.Helper()
	c := &Cluster{t: t}
	opts.defaults(c)
	c.opts = opts
	c.dumpOnFailure()
	t.Cleanup(c.Stop)
	for i := 0; i < n; i++ {
		c.AddNode()
	}
	c.WaitReady()
	// And initialized (the first admin, keys, the CA: the leader's first
	// task), so that a test's first login cannot come before the admin.
	c.eventually(30*time.Second, func() error {
		done, err := c.Nodes[c.Leader()].Server.Node().FSM().Initialized()
		if err != nil || !done {
			return fmt.Errorf("not initialized yet (%v)", err)
		}
		return nil
	})
	return c
}

// Empty returns a cluster with no nodes, for tests that start nodes
// themselves (for example from a backup).
func Empty(t TB, opts Options) *Cluster {
	c := &Cluster{t: t}
	opts.defaults(c)
	c.opts = opts
	c.dumpOnFailure()
	t.Cleanup(c.Stop)
	return c
}

// Restored returns a one-node cluster restored from the backup file
// (--restore), once it is ready.
func Restored(t TB, file string, opts Options) *Cluster {
	t.Helper()
	c := Empty(t, opts)
	c.StartNode(func(cfg *server.Config) { cfg.RestoreFrom = file })
	c.WaitReady()
	return c
}

// StartNode starts a new node with custom settings applied by mod.
func (c *Cluster) StartNode(mod func(*server.Config)) *Node {
	c.t.Helper()
	nd := &Node{ID: fmt.Sprintf("n%d", len(c.Nodes)+1), DataDir: c.t.TempDir(), Faults: &raftnode.Faults{}}
	// Cleanups run last-in first-out: registered after TempDir, the stop
	// runs before the directory is removed.
	c.t.Cleanup(func() { nd.stop(false) })
	cfg := c.config(nd)
	if mod != nil {
		mod(&cfg)
	}
	c.Nodes = append(c.Nodes, nd)
	c.start(nd, cfg)
	return nd
}

// AddNode starts a new node: the first bootstraps, later ones join
// through every running member.
func (c *Cluster) AddNode() *Node {
	c.t.Helper()
	var join []string
	for _, o := range c.Nodes {
		if o.Server != nil {
			join = append(join, o.Server.APIAddr())
		}
	}
	token := ""
	if len(join) > 0 {
		token = c.AdminToken()
	}
	return c.StartNode(func(cfg *server.Config) {
		if len(join) == 0 {
			cfg.Bootstrap = true
		}
		cfg.Join = join
		cfg.JoinToken = token
	})
}

func (c *Cluster) config(nd *Node) server.Config {
	raftAddr, apiAddr := nd.raft, nd.api
	if raftAddr == "" {
		raftAddr = "127.0.0.1:0"
	}
	if apiAddr == "" {
		apiAddr = "127.0.0.1:0"
	}
	cfg := server.Config{
		NodeID: nd.ID, DataDir: filepath.Join(nd.DataDir, "data"),
		RaftAddr: raftAddr, APIAddr: apiAddr, AdminAddr: "127.0.0.1:0",
		Logger: c.opts.Logger.With("test_node", nd.ID), Raft: c.opts.Raft, FSM: c.opts.FSM,
		Auth: c.opts.Auth, AdminPassword: AdminPassword, Watch: c.opts.Watch,
		TracerProvider: c.opts.TracerProvider, RaftFaults: nd.Faults,
	}
	if c.opts.Configure != nil {
		c.opts.Configure(&cfg)
	}
	return cfg
}

func (c *Cluster) start(nd *Node, cfg server.Config) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := server.Start(ctx, cfg)
	if err != nil {
		c.t.Fatalf("start node %s: %v", nd.ID, err)
	}
	nd.Server = s
	nd.raft = s.Node().RaftAddr()
	nd.api = s.APIAddr()
}

// Metric returns the value of a counter or gauge of node n's registry
// (of a histogram: its count of observations), summed over its label
// sets; 0 when it has none.
func (n *Node) Metric(t TB, name string) float64 {
	t.Helper()
	return n.LabeledMetric(t, name, "", "")
}

// LabeledMetric is Metric summed over the label sets whose label has
// value (every label set when label is "").
func (n *Node) LabeledMetric(t TB, name, label, value string) float64 {
	t.Helper()
	return GatherSum(t, n.Server.Registry(), name, label, value)
}

// GatherSum gathers g and sums the counter or gauge name (of a
// histogram: its count of observations) over the label sets whose label
// has value, or over every label set when label is ""; 0 when there is
// none.
func GatherSum(t TB, g prometheus.Gatherer, name, label, value string) float64 {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatalf("gather metrics: %v", err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if label != "" && !slices.ContainsFunc(m.GetLabel(), func(l *dto.LabelPair) bool { return l.GetName() == label && l.GetValue() == value }) {
				continue
			}
			sum += m.GetCounter().GetValue() + m.GetGauge().GetValue() + float64(m.GetHistogram().GetSampleCount())
		}
	}
	return sum
}

// APIAddr is the node's API address, also while it is stopped (a
// restart binds it again).
func (n *Node) APIAddr() string { return n.api }

// Running returns the nodes that are up.
func (c *Cluster) Running() []*Node {
	var out []*Node
	for _, n := range c.Nodes {
		if n.Server != nil {
			out = append(out, n)
		}
	}
	return out
}

// Stop shuts every running node down gracefully.
func (c *Cluster) Stop() {
	for _, n := range c.Nodes {
		n.stop(false)
	}
}

// Kill crashes node i (no leadership transfer, nothing flushed beyond what
// the stores already made durable).
func (c *Cluster) Kill(i int) { c.Nodes[i].stop(true) }

// Shutdown stops node i gracefully.
func (c *Cluster) Shutdown(i int) { c.Nodes[i].stop(false) }

func (n *Node) stop(kill bool) {
	if n.Server == nil {
		return
	}
	if kill {
		n.Server.Kill()
	} else {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		_ = n.Server.Shutdown(ctx)
		cancel()
	}
	n.Server = nil
}

// Isolate cuts node i's Raft traffic in both directions, as a network
// partition would; its API stays reachable. It lasts across restarts
// until Heal.
func (c *Cluster) Isolate(i int) { c.Nodes[i].Faults.Isolate() }

// Pause makes node i look stopped to the others (SIGSTOP): its Raft
// traffic is cut and the writes and read indexes forwarded to it hang,
// until Heal.
func (c *Cluster) Pause(i int) { c.Nodes[i].Faults.Pause() }

// Heal ends Isolate and Pause.
func (c *Cluster) Heal(i int) { c.Nodes[i].Faults.Heal() }

// Restart starts node i again from its data dir on the same addresses,
// with no flags beyond what every start has.
func (c *Cluster) Restart(i int) {
	c.t.Helper()
	nd := c.Nodes[i]
	if nd.Server != nil {
		c.t.Fatalf("restart %s: still running", nd.ID)
	}
	c.start(nd, c.config(nd))
}

// JoinConfig is node i's configuration with --join through every
// running member, for a test that starts it itself (server.Start
// returns only once the node joined).
func (c *Cluster) JoinConfig(i int) server.Config {
	c.t.Helper()
	cfg := c.config(c.Nodes[i])
	for _, o := range c.Nodes {
		if o.Server != nil {
			cfg.Join = append(cfg.Join, o.Server.APIAddr())
		}
	}
	cfg.JoinToken = c.AdminToken()
	return cfg
}

// Started records s, started by a test from JoinConfig(i), as node i's
// server, so that the cluster stops it with the others.
func (c *Cluster) Started(i int, s *server.Server) {
	nd := c.Nodes[i]
	nd.Server, nd.raft, nd.api = s, s.Node().RaftAddr(), s.APIAddr()
}

// Eventually polls cond every 10ms until it returns nil or the deadline
// passes, then fails the test with cond's last error.
func Eventually(t TB, within time.Duration, cond func() error) {
	t.Helper()
	eventually(t, within, cond, nil)
}

// eventually is Eventually with, if describe is set, what it says added
// to the failure.
func eventually(t TB, within time.Duration, cond func() error, describe func() string) {
	t.Helper()
	deadline := time.Now().Add(within)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			if describe != nil {
				t.Fatalf("condition not met within %v: %v; %s", within, err, describe())
			}
			t.Fatalf("condition not met within %v: %v", within, err)
		}
		<-tick.C
	}
}

// Records decodes a state export (a backup, or what a node holds) into
// key -> value, failing the test if it does not verify.
func Records(t TB, export []byte) map[string]string {
	t.Helper()
	d := state.NewDecoder(bytes.NewReader(export))
	out := map[string]string{}
	for {
		k, v, err := d.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out[string(k)] = string(v)
	}
}

// SmallWindowClient is an h2c client that lets at most 64 KiB of a
// response wait unread, so a server writing to a reader that stopped
// blocks quickly (HTTP/2 flow control) instead of filling socket buffers.
// Tests use it to hold a streaming call in flight.
func SmallWindowClient(t TB) *http.Client {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: &p, HTTP2: &http.HTTP2Config{
		MaxReceiveBufferPerStream: 64 << 10, MaxReceiveBufferPerConnection: 64 << 10,
	}}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// MetricValue reads a counter or gauge of g: the first series of name
// whose labels include every name/value pair of labels (0 when none).
func MetricValue(t TB, g prometheus.Gatherer, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	series:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(labels); i += 2 {
				if !slices.ContainsFunc(m.GetLabel(), func(l *dto.LabelPair) bool {
					return l.GetName() == labels[i] && l.GetValue() == labels[i+1]
				}) {
					continue series
				}
			}
			return m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return 0
}

// UnreadCall makes a unary call of procedure (Connect protocol, proto
// encoding) with a bearer token from the local address from, and never
// reads its answer: its connection lets 1 KiB of the answer wait unread
// (HTTP/2 flow control), so the server's write of a larger one blocks
// with the call in flight. It returns once the answer's headers arrived
// with status 200; stop cancels the call (the test's cleanup does too).
func UnreadCall(t TB, baseURL, from, procedure, token string, msg proto.Message) (body io.ReadCloser, stop func()) {
	t.Helper()
	var protos http.Protocols
	protos.SetUnencryptedHTTP2(true)
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 10 * time.Second}
	tr := &http.Transport{DialContext: d.DialContext, Protocols: &protos,
		HTTP2: &http.HTTP2Config{MaxReceiveBufferPerStream: 1 << 10}}
	b, err := proto.Marshal(msg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, baseURL+procedure, bytes.NewReader(b))
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/proto")
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	stop = func() {
		cancel()
		_ = resp.Body.Close()
		tr.CloseIdleConnections()
	}
	t.Cleanup(stop)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s from %s: status %d", procedure, from, resp.StatusCode)
	}
	return resp.Body, stop
}

// WaitReady waits until every running node is ready.
func (c *Cluster) WaitReady() {
	c.t.Helper()
	c.eventually(30*time.Second, func() error {
		for _, n := range c.Running() {
			if !n.Server.Node().Ready() {
				return fmt.Errorf("node %s not ready", n.ID)
			}
		}
		return nil
	})
}

// WaitFeature waits until every running node sees every member's record
// list feature: nodes record their features shortly after they start,
// and a feature-gated command is refused until all have (a test of the
// command itself must not race that).
func (c *Cluster) WaitFeature(feature string) {
	c.t.Helper()
	c.eventually(30*time.Second, func() error {
		for _, n := range c.Running() {
			without, err := n.Server.Node().MembersWithout(feature)
			if err != nil {
				return err
			}
			if len(without) > 0 {
				return fmt.Errorf("node %s sees members without %s: %v", n.ID, feature, without)
			}
		}
		return nil
	})
}

// WaitFeatureUsable waits until every running node would write the
// fields of feature (raftnode.Node.EveryMemberHas): for a feature gated
// at apply that is once gated apply is on too, an entry after the
// records WaitFeature waits for.
func (c *Cluster) WaitFeatureUsable(feature string) {
	c.t.Helper()
	c.eventually(30*time.Second, func() error {
		for _, n := range c.Running() {
			if !n.Server.Node().EveryMemberHas(feature) {
				return fmt.Errorf("node %s would not write %s yet", n.ID, feature)
			}
		}
		return nil
	})
}

// Leader waits for a leader among the running nodes and returns its index.
func (c *Cluster) Leader() int {
	c.t.Helper()
	var li int
	c.eventually(30*time.Second, func() error {
		leaders := 0
		for i, n := range c.Nodes {
			if n.Server != nil && n.Server.Node().IsLeader() {
				li = i
				leaders++
			}
		}
		if leaders != 1 {
			return fmt.Errorf("%d leaders", leaders)
		}
		return nil
	})
	return li
}

// TransferLeadership moves leadership to node target and waits until it
// leads. A transfer that times out (the target did not win its election
// in time, as happens on a loaded machine) is tried again: only a
// transfer that keeps failing for the deadline fails the test.
func (c *Cluster) TransferLeadership(ctx context.Context, target int) {
	c.t.Helper()
	c.eventually(60*time.Second, func() error {
		l := c.Leader()
		if l == target {
			return nil
		}
		got, err := c.Nodes[l].Server.Node().TransferLeadership(ctx, c.Nodes[target].ID)
		if err != nil {
			return fmt.Errorf("transfer leadership from %s to %s: %w", c.Nodes[l].ID, c.Nodes[target].ID, err)
		}
		if got != c.Nodes[target].ID {
			return fmt.Errorf("leadership went to %s, want %s", got, c.Nodes[target].ID)
		}
		return nil
	})
}

// Follower returns the index of some running non-leader.
func (c *Cluster) Follower() int {
	c.t.Helper()
	l := c.Leader()
	for i, n := range c.Nodes {
		if i != l && n.Server != nil {
			return i
		}
	}
	c.t.Fatal("no running follower")
	return -1
}

// StopBehind shuts a follower down and creates n users (ids prefix0,
// prefix1, ...) through the leader while it is down, so that it restarts
// behind the cluster. It returns the follower's and the leader's indexes.
func (c *Cluster) StopBehind(ctx context.Context, n int, prefix string) (follower, leader int) {
	c.t.Helper()
	follower = c.Follower()
	c.Shutdown(follower)
	leader = c.Leader()
	for i := range n {
		if _, err := c.CreateUser(ctx, leader, fmt.Sprintf("%s%d", prefix, i)); err != nil {
			c.t.Fatal(err)
		}
	}
	return follower, leader
}

// WaitConverged waits until every running node has applied the same index
// and holds byte-identical state, and returns that state's digest.
func (c *Cluster) WaitConverged() [32]byte {
	c.t.Helper()
	var sum [32]byte
	c.eventually(30*time.Second, func() error {
		run := c.Running()
		var idx []uint64
		var sums [][32]byte
		for _, n := range run {
			f := n.Server.Node().FSM()
			d, err := f.Digest()
			if err != nil {
				return err
			}
			idx = append(idx, f.AppliedIndex())
			sums = append(sums, d)
		}
		for i := range run {
			if idx[i] != idx[0] || sums[i] != sums[0] {
				return fmt.Errorf("replicas differ: applied %v", idx)
			}
		}
		sum = sums[0]
		return nil
	})
	return sum
}

// CreateUser applies a CreateUser command through node i.
func (c *Cluster) CreateUser(ctx context.Context, i int, id string) (*statev1.Result, error) {
	return c.Nodes[i].Server.Node().Apply(ctx, &statev1.Command{Op: &statev1.Command_CreateUser{
		CreateUser: &statev1.CreateUser{User: &statev1.User{Id: id, Login: "login-" + id, DisplayName: "User " + id}},
	}})
}

// RegisterDevice applies a RegisterDevice command through node i: device
// id of user uid, with a fixed test key.
func (c *Cluster) RegisterDevice(ctx context.Context, i int, uid, id string) (*statev1.Result, error) {
	return c.Nodes[i].Server.Node().Apply(ctx, &statev1.Command{Op: &statev1.Command_RegisterDevice{
		RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: id, UserId: uid, Name: "device " + id, PublicKey: make([]byte, 32)}},
	}})
}

// VoterIDs returns the sorted ids of the voters node i sees.
func (c *Cluster) VoterIDs(i int) []string {
	c.t.Helper()
	st, err := c.Nodes[i].Server.Node().Status()
	if err != nil {
		c.t.Fatalf("status of %s: %v", c.Nodes[i].ID, err)
	}
	var ids []string
	for _, m := range st.Members {
		if m.Voter {
			ids = append(ids, m.ID)
		}
	}
	slices.Sort(ids)
	return ids
}

// Login logs in through any running node and returns the tokens.
func (c *Cluster) Login(login, password string) *controlv1.Tokens {
	c.t.Helper()
	var out *controlv1.Tokens
	c.eventually(30*time.Second, func() error {
		run := c.Running()
		if len(run) == 0 {
			return fmt.Errorf("no running node")
		}
		d := api.NewDialer(nil)
		defer d.Close()
		cl := controlv1connect.NewAuthServiceClient(d.HTTPClient(), d.URL(run[0].Server.APIAddr()))
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		resp, err := cl.Login(ctx, connect.NewRequest(&controlv1.LoginRequest{Login: login, Password: password}))
		if err != nil {
			return err
		}
		out = resp.Msg.GetTokens()
		return nil
	})
	return out
}

// AdminToken returns an access token of the first admin.
func (c *Cluster) AdminToken() string {
	c.t.Helper()
	return c.Login("admin", AdminPassword).GetAccessToken()
}

// TokenFor creates an account with the given role (through the admin)
// and returns an access token of it.
func (c *Cluster) TokenFor(login string, role controlv1.Role) string {
	c.t.Helper()
	d := api.NewDialer(nil)
	defer d.Close()
	run := c.Running()
	cl := controlv1connect.NewUserServiceClient(d.HTTPClient(), d.URL(run[0].Server.APIAddr()))
	req := connect.NewRequest(&controlv1.CreateUserRequest{Login: login, Password: "password-of-" + login, Role: role})
	req.Header().Set("Authorization", "Bearer "+c.AdminToken())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := cl.CreateUser(ctx, req); err != nil {
		c.t.Fatalf("create %s: %v", login, err)
	}
	return c.Login(login, "password-of-"+login).GetAccessToken()
}

// Load calls op n times from `writers` goroutines at once (a closed loop,
// as the commit benchmarks drive a cluster) and returns every call's
// latency, sorted, and the first error (calls stop at it).
func Load(writers, n int, op func() error) ([]time.Duration, error) {
	work := make(chan struct{}, n)
	for range n {
		work <- struct{}{}
	}
	close(work)
	var mu sync.Mutex // guards lat and first
	lat := make([]time.Duration, 0, n)
	var first error
	var wg sync.WaitGroup
	for range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			mine := make([]time.Duration, 0, n/writers+1)
			defer func() {
				mu.Lock()
				lat = append(lat, mine...)
				mu.Unlock()
			}()
			for range work {
				start := time.Now()
				if err := op(); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
					return
				}
				mine = append(mine, time.Since(start))
			}
		}()
	}
	wg.Wait()
	slices.Sort(lat)
	return lat, first
}

// Percentile returns the p-th percentile (0 to 100) of sorted latencies;
// 0 for none.
func Percentile(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)*p/100, len(sorted)-1)]
}
