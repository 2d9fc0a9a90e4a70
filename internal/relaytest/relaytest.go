// Package relaytest starts whole relays for tests: a real control-plane
// cluster (control/clustertest) and real edges (edge/server) on 127.0.0.1
// with free ports and temp dirs, with helpers to create accounts and
// devices through the Connect API and to connect devices with the Go
// client. Everything is stopped by t.Cleanup.
package relaytest

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/controlconn"
	"github.com/edge-relay/relay/edge/server"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

// Options tune a test relay.
type Options struct {
	// ControlNodes is the control plane's size [1].
	ControlNodes int
	// Edges is how many edges to start [1].
	Edges int
	// Cluster tunes the control plane.
	Cluster clustertest.Options
	// Edge adjusts each edge's configuration before it starts.
	Edge func(i int, cfg *server.Config)
}

// EdgePassword is the password of the edges' account.
const EdgePassword = "test-edge-password"

// Relay is a running test relay.
type Relay struct {
	t       clustertest.TB
	Cluster *clustertest.Cluster
	Edges   []*server.Server
	dialer  *api.Dialer
	admin   string
	logger  *slog.Logger
	opts    Options
}

// Start starts a relay and waits until every edge is ready.
func Start(t clustertest.TB, opts Options) *Relay {
	t.Helper()
	if opts.ControlNodes == 0 {
		opts.ControlNodes = 1
	}
	if opts.Edges == 0 {
		opts.Edges = 1
	}
	r := &Relay{t: t, opts: opts, dialer: api.NewDialer(nil)}
	r.logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	if os.Getenv("RELAY_TEST_LOG") != "" {
		r.logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	r.Cluster = clustertest.Start(t, opts.ControlNodes, opts.Cluster)
	t.Cleanup(r.dialer.Close)
	r.admin = r.Cluster.AdminToken()
	ctx := context.Background()
	_, err := r.users().CreateUser(ctx, withToken(&controlv1.CreateUserRequest{Login: "edges", Password: EdgePassword, Role: controlv1.Role_ROLE_EDGE}, r.admin))
	if err != nil {
		t.Fatalf("create the edges' account: %v", err)
	}
	for i := range opts.Edges {
		r.StartEdge(i)
	}
	return r
}

// ControlURLs are the API URLs of the running control nodes.
func (r *Relay) ControlURLs() []string {
	var out []string
	for _, n := range r.Cluster.Running() {
		out = append(out, r.dialer.URL(n.Server.APIAddr()))
	}
	return out
}

// EdgeConfig is the configuration StartEdge uses for edge i.
func (r *Relay) EdgeConfig(i int) server.Config {
	cfg := server.Config{
		EdgeID:   fmt.Sprintf("edge-%d", i),
		Addr:     "127.0.0.1:0",
		Control:  controlconn.Config{URLs: r.ControlURLs(), Login: "edges", Password: EdgePassword},
		Logger:   r.logger.With("edge", i),
		Registry: prometheus.NewRegistry(),
	}
	if r.opts.Edge != nil {
		r.opts.Edge(i, &cfg)
	}
	return cfg
}

// StartEdge starts edge i (again, after it was stopped) and waits until
// it is ready.
func (r *Relay) StartEdge(i int) *server.Server {
	r.t.Helper()
	return r.StartEdgeWith(i, r.EdgeConfig(i))
}

// StartEdgeWith starts edge i with a given configuration.
func (r *Relay) StartEdgeWith(i int, cfg server.Config) *server.Server {
	r.t.Helper()
	s, err := server.Start(context.Background(), cfg)
	if err != nil {
		r.t.Fatalf("start edge %d: %v", i, err)
	}
	for len(r.Edges) <= i {
		r.Edges = append(r.Edges, nil)
	}
	r.Edges[i] = s
	r.t.Cleanup(func() { r.StopEdge(i) })
	clustertest.Eventually(r.t, 30*time.Second, func() error {
		if !s.Ready() {
			return fmt.Errorf("edge %d not ready", i)
		}
		return nil
	})
	return s
}

// StopEdge shuts edge i down gracefully (a no-op when it is stopped).
func (r *Relay) StopEdge(i int) {
	s := r.Edges[i]
	if s == nil {
		return
	}
	r.Edges[i] = nil
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		r.t.Errorf("stop edge %d: %v", i, err)
	}
}

// KillEdge stops edge i as a crash would (see server.Kill).
func (r *Relay) KillEdge(i int) {
	s := r.Edges[i]
	if s == nil {
		return
	}
	r.Edges[i] = nil
	s.Kill()
}

func (r *Relay) url() string { return r.ControlURLs()[0] }

func (r *Relay) users() controlv1connect.UserServiceClient {
	return controlv1connect.NewUserServiceClient(r.dialer.HTTPClient(), r.url())
}

func (r *Relay) devices() controlv1connect.DeviceServiceClient {
	return controlv1connect.NewDeviceServiceClient(r.dialer.HTTPClient(), r.url())
}

// User creates an account and returns its id.
func (r *Relay) User(login string) string {
	r.t.Helper()
	resp, err := r.users().CreateUser(context.Background(), withToken(&controlv1.CreateUserRequest{Login: login}, r.admin))
	if err != nil {
		r.t.Fatalf("create user %s: %v", login, err)
	}
	return resp.Msg.GetUser().GetId()
}

// Device is a registered device with its key, and the control-plane
// revision that registered it (ClientConfig names it as MinRevision).
type Device struct {
	ID       string
	UserID   string
	Key      ed25519.PrivateKey
	Revision uint64
}

// Device registers a device for a user, waits until every edge knows
// it, and returns it with its key.
func (r *Relay) Device(userID, name string) Device {
	r.t.Helper()
	d := r.RegisterDevice(userID, name)
	r.WaitEdges(func(s *server.Server) error {
		if s.Directory().LookupDevice(d.ID).UserID != userID {
			return fmt.Errorf("edge does not know device %s yet", d.ID)
		}
		return nil
	})
	return d
}

// RegisterDevice registers a device for a user and returns it at once,
// edges knowing it or not.
func (r *Relay) RegisterDevice(userID, name string) Device {
	r.t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		r.t.Fatal(err)
	}
	resp, err := r.devices().RegisterDevice(context.Background(),
		withToken(&controlv1.RegisterDeviceRequest{UserId: userID, Name: name, PublicKey: pub}, r.admin))
	if err != nil {
		r.t.Fatalf("register device %s: %v", name, err)
	}
	return Device{ID: resp.Msg.GetDevice().GetId(), UserID: userID, Key: priv, Revision: resp.Msg.GetRevision()}
}

// RevokeDevice revokes a device through the API.
func (r *Relay) RevokeDevice(d Device) {
	r.t.Helper()
	if _, err := r.devices().RevokeDevice(context.Background(), withToken(&controlv1.RevokeDeviceRequest{UserId: d.UserID, DeviceId: d.ID}, r.admin)); err != nil {
		r.t.Fatalf("revoke %s: %v", d.ID, err)
	}
}

// DeleteDevice deletes a device through the API.
func (r *Relay) DeleteDevice(d Device) {
	r.t.Helper()
	if _, err := r.devices().DeleteDevice(context.Background(), withToken(&controlv1.DeleteDeviceRequest{UserId: d.UserID, DeviceId: d.ID}, r.admin)); err != nil {
		r.t.Fatalf("delete %s: %v", d.ID, err)
	}
}

// DeleteUser deletes an account through the API.
func (r *Relay) DeleteUser(userID string) {
	r.t.Helper()
	if _, err := r.users().DeleteUser(context.Background(), withToken(&controlv1.DeleteUserRequest{Id: userID}, r.admin)); err != nil {
		r.t.Fatalf("delete user %s: %v", userID, err)
	}
}

// WaitEdges waits until cond holds for every running edge.
func (r *Relay) WaitEdges(cond func(*server.Server) error) {
	r.t.Helper()
	clustertest.Eventually(r.t, 30*time.Second, func() error {
		for _, s := range r.Edges {
			if s == nil {
				continue
			}
			if err := cond(s); err != nil {
				return err
			}
		}
		return nil
	})
}

// ClientConfig is a client configuration for a device on edge i, with the
// other running edges to move to, pinning every edge's self-signed
// certificate.
func (r *Relay) ClientConfig(i int, d Device, tr client.Transport) client.Config {
	s := r.Edges[i]
	var pins [][]byte
	var others []string
	for j, e := range r.Edges {
		if e == nil {
			continue
		}
		for _, h := range e.CertHashes() {
			pins = append(pins, h.SHA256[:])
		}
		if j != i {
			others = append(others, e.Addr())
		}
	}
	return client.Config{
		Addr: s.Addr(), OtherAddrs: others, UserID: d.UserID, DeviceID: d.ID, Key: d.Key, Transport: tr, CertHashes: pins, MinRevision: d.Revision,
		ReconnectMin: 20 * time.Millisecond, ReconnectMax: 500 * time.Millisecond, Logger: r.logger.With("device", d.ID),
	}
}

// Dial connects a device to edge i; the client is closed by t.Cleanup.
func (r *Relay) Dial(i int, d Device, tr client.Transport) *client.Client {
	r.t.Helper()
	return r.DialWith(r.ClientConfig(i, d, tr))
}

// DialWith connects a client configured as the test needs (from
// ClientConfig); it is closed by t.Cleanup.
func (r *Relay) DialWith(cfg client.Config) *client.Client {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, cfg)
	if err != nil {
		r.t.Fatalf("dial %s as %s: %v", cfg.Addr, cfg.DeviceID, err)
	}
	r.t.Cleanup(func() { _ = c.Close() })
	return c
}

func withToken[T any](m *T, token string) *connect.Request[T] {
	req := connect.NewRequest(m)
	req.Header().Set("Authorization", "Bearer "+token)
	return req
}

// Standalone is a clustertest.TB for running a relay outside a test (a
// runnable example, a tool): a fatal error panics, and Close runs the
// cleanups, newest first.
type Standalone struct {
	mu       sync.Mutex
	cleanups []func()
}

// Helper does nothing.
func (s *Standalone) Helper() {}

// Fatal panics.
func (s *Standalone) Fatal(args ...any) { panic(fmt.Sprint(args...)) }

// Fatalf panics.
func (s *Standalone) Fatalf(format string, args ...any) { panic(fmt.Sprintf(format, args...)) }

// Errorf panics: outside a test there is no one to report to later.
func (s *Standalone) Errorf(format string, args ...any) { panic(fmt.Sprintf(format, args...)) }

// Cleanup registers f for Close.
func (s *Standalone) Cleanup(f func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cleanups = append(s.cleanups, f)
}

// TempDir returns a new directory that Close removes.
func (s *Standalone) TempDir() string {
	d, err := os.MkdirTemp("", "relaytest")
	if err != nil {
		panic(err)
	}
	s.Cleanup(func() { _ = os.RemoveAll(d) })
	return d
}

// Close runs the cleanups.
func (s *Standalone) Close() {
	s.mu.Lock()
	cs := s.cleanups
	s.cleanups = nil
	s.mu.Unlock()
	for i := len(cs) - 1; i >= 0; i-- {
		cs[i]()
	}
}

// Counter sums the counter name of edge s over the series whose label
// has value, or over every series when label is "" (0 when there is
// none).
func Counter(t clustertest.TB, s *server.Server, name, label, value string) float64 {
	t.Helper()
	return clustertest.GatherSum(t, s.Registry(), name, label, value)
}

// Gauge is Counter for a gauge.
func Gauge(t clustertest.TB, s *server.Server, name, label, value string) float64 {
	t.Helper()
	return clustertest.GatherSum(t, s.Registry(), name, label, value)
}
