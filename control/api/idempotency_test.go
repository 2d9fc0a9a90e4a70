package api_test

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/server"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

// withKey sets the Idempotency-Key header of a request.
func withKey[T any](m *T, key string) *connect.Request[T] {
	r := connect.NewRequest(m)
	r.Header().Set(api.IdempotencyKeyHeader, key)
	return r
}

// A mutation retried with the same Idempotency-Key, on any node, returns
// the first outcome and acts once; the key is the caller's own, and it
// cannot be reused for another request.
func TestIdempotencyKeyMakesRetriesSafe(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	ctx := ctxT(t, 2*time.Minute)
	admin := c.AdminToken()
	on := func(i int, token string) clients { return clientsAs(t, c.Nodes[i], token) }

	// CreateUser twice with one key, through two nodes: one account, the
	// same answer.
	req := &controlv1.CreateUserRequest{Login: "dora", Password: "password-of-dora"}
	first, err := on(0, admin).users.CreateUser(ctx, withKey(req, "create-dora"))
	if err != nil {
		t.Fatal(err)
	}
	again, err := on(1, admin).users.CreateUser(ctx, withKey(req, "create-dora"))
	if err != nil || again.Msg.GetUser().GetId() != first.Msg.GetUser().GetId() {
		t.Fatalf("retry: %v %v, want the first outcome (%s)", again, err, first.Msg.GetUser().GetId())
	}
	// Without the key, the same call is a new request: the login is taken.
	if _, err := on(2, admin).users.CreateUser(ctx, connect.NewRequest(req)); connect.CodeOf(err) != connect.CodeAlreadyExists {
		t.Fatalf("the same call without the key: %v, want already_exists", err)
	}
	// The same key for another request is refused.
	_, err = on(2, admin).users.CreateUser(ctx, withKey(&controlv1.CreateUserRequest{Login: "eve", Password: "password-of-eve"}, "create-dora"))
	if connect.CodeOf(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), "different request") {
		t.Fatalf("key reused for another request: %v", err)
	}
	// A failure is an outcome too: the retry gets it, not a second try.
	dup := &controlv1.CreateUserRequest{Login: "dora", Password: "x-password-1"}
	if _, err := on(0, admin).users.CreateUser(ctx, withKey(dup, "dup")); connect.CodeOf(err) != connect.CodeAlreadyExists {
		t.Fatal(err)
	}
	if _, err := on(1, admin).users.CreateUser(ctx, withKey(dup, "dup")); connect.CodeOf(err) != connect.CodeAlreadyExists {
		t.Fatalf("retry of a failed call: %v", err)
	}

	// Keys are the caller's: dora's key "k" and another caller's "k" are
	// two requests. RegisterDevice retried gives one device.
	dora := c.Login("dora", "password-of-dora").GetAccessToken()
	reg := &controlv1.RegisterDeviceRequest{Name: "phone", PublicKey: pubKey(t)}
	d1, err := on(1, dora).devices.RegisterDevice(ctx, withKey(reg, "k"))
	if err != nil {
		t.Fatal(err)
	}
	d2, err := on(2, dora).devices.RegisterDevice(ctx, withKey(reg, "k"))
	if err != nil || d2.Msg.GetDevice().GetId() != d1.Msg.GetDevice().GetId() {
		t.Fatalf("RegisterDevice retried: %v %v", d2, err)
	}
	// The revision that registered it, the same for the retry: every
	// replica that reached it has the device.
	rev := d1.Msg.GetRevision()
	if rev == 0 || d2.Msg.GetRevision() != rev {
		t.Fatalf("registration revisions %d and %d", rev, d2.Msg.GetRevision())
	}
	for _, n := range c.Nodes {
		clustertest.Eventually(t, 10*time.Second, func() error {
			if got := n.Server.Node().FSM().AppliedIndex(); got < rev {
				return fmt.Errorf("%s applied %d", n.ID, got)
			}
			return nil
		})
		if _, err := n.Server.Node().FSM().GetDevice(d1.Msg.GetDevice().GetUserId(), d1.Msg.GetDevice().GetId()); err != nil {
			t.Fatalf("%s at revision %d: %v", n.ID, rev, err)
		}
	}
	list, err := on(0, dora).devices.ListDevices(ctx, connect.NewRequest(&controlv1.ListDevicesRequest{}))
	if err != nil || len(list.Msg.GetDevices()) != 1 {
		t.Fatalf("devices after a retried registration: %v %v", list, err)
	}
	other := &controlv1.CreateUserRequest{Login: "frank", Password: "password-of-frank"}
	if _, err := on(0, admin).users.CreateUser(ctx, withKey(other, "k")); err != nil {
		t.Fatalf("another caller's key k: %v", err)
	}

	// Malformed keys are refused; a key on a read is ignored.
	for _, key := range []string{strings.Repeat("k", 129), "with space", "non-ascii-é"} {
		if _, err := on(0, admin).users.CreateUser(ctx, withKey(&controlv1.CreateUserRequest{Login: "gina"}, key)); connect.CodeOf(err) != connect.CodeInvalidArgument {
			t.Errorf("key %q: %v, want invalid_argument", key, err)
		}
	}
	if _, err := on(0, dora).users.GetMe(ctx, withKey(&controlv1.GetMeRequest{}, "read")); err != nil {
		t.Fatalf("a read with a key: %v", err)
	}
}

// A follower forwards a write to a leader that stopped answering (a
// paused process): the write does not hang until the caller's deadline,
// but is retried, with its request id, on the leader elected meanwhile.
func TestWriteForwardedToPausedLeaderCompletes(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{Configure: func(cfg *server.Config) {
		cfg.Raft.ForwardTimeout = time.Second
	}})
	ctx := ctxT(t, 2*time.Minute)
	l := c.Leader()
	f := c.Follower()
	c.Pause(l)
	t.Cleanup(func() { c.Heal(l) })
	// The caller's deadline is far longer than an election and a
	// forwarding attempt: the write must complete inside it.
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if _, err := c.CreateUser(wctx, f, "during-pause"); err != nil {
		t.Fatalf("write through %s while leader %s is paused: %v", c.Nodes[f].ID, c.Nodes[l].ID, err)
	}
	c.Heal(l)
	c.WaitConverged()
	n, err := c.Nodes[l].Server.Node().FSM().GetUser("during-pause")
	if err != nil || n.GetId() != "during-pause" {
		t.Fatalf("after the pause, the old leader has %v, %v", n, err)
	}
}

// A forwarded call carries the caller's deadline: Connect sends it with
// the request, and the peer's handler runs under it.
func TestForwardedWriteCarriesTheCallersDeadline(t *testing.T) {
	got := make(chan time.Time, 1)
	mux := http.NewServeMux()
	mux.Handle(controlv1connect.NewPeerServiceHandler(deadlineRecorder{got}))
	srv := newH2CServer(t, mux)
	d := api.NewDialer(nil)
	t.Cleanup(d.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 7*time.Second)
	defer cancel()
	want, _ := ctx.Deadline()
	if _, err := d.Apply(ctx, srv, []byte("x")); err != nil {
		t.Fatal(err)
	}
	dl := <-got
	// The header carries the time left, so the peer's deadline is the
	// caller's give or take the time in transit.
	if diff := dl.Sub(want).Abs(); dl.IsZero() || diff > time.Second {
		t.Fatalf("the peer's handler ran with deadline %v; the caller's is %v", dl, want)
	}
}

// deadlineRecorder is a PeerService that records the deadline its Apply
// runs under.
type deadlineRecorder struct{ got chan<- time.Time }

func (r deadlineRecorder) Apply(ctx context.Context, _ *connect.Request[controlv1.ApplyRequest]) (*connect.Response[controlv1.ApplyResponse], error) {
	dl, _ := ctx.Deadline()
	r.got <- dl
	return connect.NewResponse(&controlv1.ApplyResponse{}), nil
}

func (deadlineRecorder) ReadIndex(context.Context, *connect.Request[controlv1.ReadIndexRequest]) (*connect.Response[controlv1.ReadIndexResponse], error) {
	return connect.NewResponse(&controlv1.ReadIndexResponse{}), nil
}

// newH2CServer serves h on 127.0.0.1 (HTTP/1.1 and h2c) until the test
// ends and returns its address.
func newH2CServer(t *testing.T, h http.Handler) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	srv := &http.Server{Handler: h, Protocols: &p, ReadHeaderTimeout: 10 * time.Second}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close(); <-done })
	return ln.Addr().String()
}
