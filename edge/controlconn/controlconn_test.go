package controlconn_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/edge/controlconn"
	"github.com/edge-relay/relay/edge/directory"
	"github.com/edge-relay/relay/internal/relaytest"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		goleak.IgnoreTopFunction("github.com/cockroachdb/pebble/v2/internal/cache.(*shard).releaseLoop"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
	)
}

func createAccount(t *testing.T, c *clustertest.Cluster, login, password string, role controlv1.Role) {
	t.Helper()
	d := api.NewDialer(nil)
	defer d.Close()
	req := connect.NewRequest(&controlv1.CreateUserRequest{Login: login, Password: password, Role: role})
	req.Header().Set("Authorization", "Bearer "+c.AdminToken())
	if _, err := controlv1connect.NewUserServiceClient(d.HTTPClient(), d.URL(c.Nodes[0].Server.APIAddr())).CreateUser(context.Background(), req); err != nil {
		t.Fatal(err)
	}
}

// The edge logs in, refreshes its token when little of it is left,
// skips a control URL that does not answer, and is refused plainly with
// a wrong password or an account that is not an edge's.
func TestCredentialAndFailover(t *testing.T) {
	// Access tokens shorter than the minute of margin: every Token call
	// after the first refreshes.
	c := clustertest.Start(t, 1, clustertest.Options{Auth: api.AuthConfig{AccessTTL: 30 * time.Second}})
	createAccount(t, c, "edges", "edge-password-1", controlv1.Role_ROLE_EDGE)
	createAccount(t, c, "person", "person-password", controlv1.Role_ROLE_USER)
	d := api.NewDialer(nil)
	defer d.Close()
	live := d.URL(c.Nodes[0].Server.APIAddr())
	dead := "http://127.0.0.1:1"

	cc, err := controlconn.New(controlconn.Config{URLs: []string{dead, live}, Login: "edges", Password: "edge-password-1"})
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	t1, err := cc.Token(ctx)
	if err != nil {
		t.Fatalf("token through a dead and a live URL: %v", err)
	}
	t2, err := cc.Token(ctx)
	if err != nil || t2 == t1 {
		t.Fatalf("refresh: %v (same token: %v)", err, t2 == t1)
	}
	// The watch feed and activity reports work with it.
	stream, err := cc.Watch().Watch(ctx, connect.NewRequest(&edgev1.WatchRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	if !stream.Receive() || stream.Msg().GetResync() == nil {
		t.Fatalf("watch: %v %v", stream.Msg(), stream.Err())
	}
	_ = stream.Close()
	if err := cc.ReportActivity(ctx, nil); err != nil {
		t.Fatal(err)
	}

	for _, bad := range []controlconn.Config{
		{URLs: []string{live}, Login: "edges", Password: "wrong-password"},
		{URLs: []string{live}, Login: "person", Password: "person-password"},
	} {
		cc, err := controlconn.New(bad)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := cc.Token(ctx); err == nil {
			t.Fatalf("%s logged in as an edge", bad.Login)
		}
		cc.Close()
	}
	if _, err := controlconn.New(controlconn.Config{URLs: []string{"ftp://x"}, Login: "a", Password: "b"}); err == nil {
		t.Fatal("accepted an ftp URL")
	}
	var ce *connect.Error
	_, err = controlconn.New(controlconn.Config{})
	if err == nil || errors.As(err, &ce) {
		t.Fatalf("empty config: %v", err)
	}
}

// fakeControl is a control node's API reduced to what the test needs:
// logins for the edge, and a watch that fails or sends one message.
type fakeControl struct {
	controlv1connect.UnimplementedAuthServiceHandler
	edgev1connect.UnimplementedWatchServiceHandler
	name   string
	fail   bool
	protos chan string
	served chan string
}

func (f *fakeControl) Login(context.Context, *connect.Request[controlv1.LoginRequest]) (*connect.Response[controlv1.LoginResponse], error) {
	return connect.NewResponse(&controlv1.LoginResponse{Tokens: &controlv1.Tokens{AccessToken: "t",
		AccessTokenExpiresAt: timestamppb.New(time.Now().Add(time.Hour)), Role: controlv1.Role_ROLE_EDGE}}), nil
}

func (f *fakeControl) Watch(_ context.Context, _ *connect.Request[edgev1.WatchRequest], s *connect.ServerStream[edgev1.WatchResponse]) error {
	f.served <- f.name
	if f.fail {
		return connect.NewError(connect.CodeUnavailable, errors.New("down"))
	}
	return s.Send(&edgev1.WatchResponse{Revision: 1, Kind: &edgev1.WatchResponse_Progress{Progress: &edgev1.Progress{}}})
}

func (f *fakeControl) start(t *testing.T) string {
	mux := http.NewServeMux()
	mux.Handle(controlv1connect.NewAuthServiceHandler(f))
	mux.Handle(edgev1connect.NewWatchServiceHandler(f))
	return serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case f.protos <- r.Proto:
		default:
		}
		mux.ServeHTTP(w, r)
	}))
}

// serve serves h as a control node until the test ends, and returns its
// URL.
func serve(t *testing.T, h http.Handler) string { return relaytest.ServeH2C(t, h) }

// On http:// URLs the edge speaks HTTP/2 (prior knowledge), so its
// health pings can find a connection a partition cut; and a watch
// stream that failed (its error comes after Watch returned) sends the
// next watch to the next node.
func TestHTTP2AndWatchFailover(t *testing.T) {
	protos, served := make(chan string, 64), make(chan string, 64)
	down := &fakeControl{name: "down", fail: true, protos: protos, served: served}
	up := &fakeControl{name: "up", protos: protos, served: served}
	cc, err := controlconn.New(controlconn.Config{URLs: []string{down.start(t), up.start(t)}, Login: "edges", Password: "x"})
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := cc.Token(ctx); err != nil {
		t.Fatal(err)
	}
	if proto := <-protos; proto != "HTTP/2.0" {
		t.Fatalf("control API reached over %s, want HTTP/2.0", proto)
	}
	w := cc.Watch()
	var got []string
	for range 2 {
		stream, err := w.Watch(ctx, connect.NewRequest(&edgev1.WatchRequest{}))
		if err != nil {
			t.Fatal(err)
		}
		for stream.Receive() {
		}
		err = stream.Err()
		_ = stream.Close()
		got = append(got, <-served)
		w.(directory.StreamFailer).StreamFailed(err)
	}
	if got[0] != "down" || got[1] != "up" {
		t.Fatalf("watches went to %v, want down then up", got)
	}
}

// hangingControl answers Login only once release is closed.
type hangingControl struct {
	fakeControl
	entered chan struct{}
	release chan struct{}
}

func (h *hangingControl) Login(ctx context.Context, req *connect.Request[controlv1.LoginRequest]) (*connect.Response[controlv1.LoginResponse], error) {
	h.entered <- struct{}{}
	select {
	case <-h.release:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return h.fakeControl.Login(ctx, req)
}

// While one caller waits for a slow control plane to log the edge in,
// the others wait only as long as their own context allows (a mailbox
// write's or a renewal's deadline holds), and get the token it brings.
func TestTokenWaitsOnlyAsLongAsItsContext(t *testing.T) {
	h := &hangingControl{entered: make(chan struct{}, 1), release: make(chan struct{})}
	mux := http.NewServeMux()
	mux.Handle(controlv1connect.NewAuthServiceHandler(h))
	c, err := controlconn.New(controlconn.Config{URLs: []string{serve(t, mux)}, Login: "edges", Password: "x"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	first := make(chan error, 1)
	go func() {
		_, err := c.Token(context.Background())
		first <- err
	}()
	<-h.entered // the first caller is in the slow login
	var release sync.Once
	defer release.Do(func() { close(h.release) })
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	second := make(chan error, 1)
	go func() {
		_, err := c.Token(ctx)
		second <- err
	}()
	select {
	case err := <-second:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("a second caller while the login hangs: %v, want its own deadline", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("a second caller was held past its deadline by the first one's login")
	}
	release.Do(func() { close(h.release) })
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	// The token the first caller got serves the next without a login
	// (a second Login would block: release is closed, entered is not
	// read again).
	if tok, err := c.Token(context.Background()); err != nil || tok != "t" {
		t.Fatalf("after the login: token %q, %v", tok, err)
	}
}

// loggedInEdge is a one-node control plane with the edges' account, and
// a Conn logged in to it as that account.
type loggedInEdge struct {
	cluster *clustertest.Cluster
	url     string // the control node's
	conn    *controlconn.Conn
	users   controlv1connect.UserServiceClient
	token   string          // the Conn's access token
	account *controlv1.User // the edges' account
}

// logInEdge starts a loggedInEdge; the test's end stops it.
func logInEdge(ctx context.Context, t *testing.T) *loggedInEdge {
	t.Helper()
	c := clustertest.Start(t, 1, clustertest.Options{})
	c.WaitFeatureUsable(fsm.FeatureSessionCap)
	createAccount(t, c, "edges", "edge-password-1", controlv1.Role_ROLE_EDGE)
	d := api.NewDialer(nil)
	t.Cleanup(d.Close)
	url := d.URL(c.Nodes[0].Server.APIAddr())
	cc, err := controlconn.New(controlconn.Config{URLs: []string{url}, Login: "edges", Password: "edge-password-1"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cc.Close)
	e := &loggedInEdge{cluster: c, url: url, conn: cc, users: controlv1connect.NewUserServiceClient(d.HTTPClient(), url)}
	if e.token, err = cc.Token(ctx); err != nil {
		t.Fatal(err)
	}
	if e.account, err = getMe(ctx, e.users, e.token); err != nil {
		t.Fatal(err)
	}
	return e
}

// revokeSessions revokes every session of the edges' account, by
// disabling and enabling it.
func (e *loggedInEdge) revokeSessions(ctx context.Context, t *testing.T) {
	t.Helper()
	admin := e.cluster.AdminToken()
	for _, st := range []controlv1.UserStatus{controlv1.UserStatus_USER_STATUS_DISABLED, controlv1.UserStatus_USER_STATUS_ACTIVE} {
		req := connect.NewRequest(&controlv1.UpdateUserRequest{Id: e.account.GetId(), Status: &st})
		req.Header().Set("Authorization", "Bearer "+admin)
		if _, err := e.users.UpdateUser(ctx, req); err != nil {
			t.Fatal(err)
		}
	}
}

// getMe asks users whose access token tok is.
func getMe(ctx context.Context, users controlv1connect.UserServiceClient, tok string) (*controlv1.User, error) {
	me := connect.NewRequest(&controlv1.GetMeRequest{})
	me.Header().Set("Authorization", "Bearer "+tok)
	resp, err := users.GetMe(ctx, me)
	if err != nil {
		return nil, err
	}
	return resp.Msg.GetUser(), nil
}

// A token the control plane refuses is forgotten: after the edge's
// session was revoked (here by disabling and enabling its account), the
// next call logs in again instead of presenting the refused token until
// its expiry is near (15 minutes of failed reports, mailbox calls and
// watches).
func TestARefusedTokenIsForgotten(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e := logInEdge(ctx, t)
	cc, tok := e.conn, e.token
	e.revokeSessions(ctx, t)
	if err := cc.ReportActivity(ctx, nil); connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("a call with the revoked session's token: %v, want unauthenticated", err)
	}
	if err := cc.ReportActivity(ctx, nil); err != nil {
		t.Fatalf("the call after the refusal: %v", err)
	}
	if again, err := cc.Token(ctx); err != nil || again == tok {
		t.Fatalf("token after the refusal: %v (the refused one: %v)", err, again == tok)
	}
}

// An edge that logs out ends its session on the control plane: the
// access token it held is refused, its refresh token is gone, and the
// Conn logs in no more. With nothing to end, Logout calls nobody.
func TestLogoutEndsTheEdgesSession(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e := logInEdge(ctx, t)
	cc := e.conn
	f := e.cluster.Nodes[0].Server.Node().FSM()
	if n, err := f.UserTokenCount(e.account.GetId()); err != nil || n != 1 {
		t.Fatalf("the edge's refresh tokens before it logs out: %d, %v; want 1", n, err)
	}
	if err := cc.Logout(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := getMe(ctx, e.users, e.token); connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("a call with the access token of the ended session: %v, want unauthenticated", err)
	}
	if n, err := f.UserTokenCount(e.account.GetId()); err != nil || n != 0 {
		t.Fatalf("the edge's refresh tokens after it logged out: %d, %v; want none", n, err)
	}
	if _, err := cc.Token(ctx); err == nil {
		t.Fatal("the Conn logged in again after its logout")
	}
	if err := cc.Logout(ctx); err != nil {
		t.Fatalf("a second logout: %v", err)
	}

	// A session revoked already has nothing left to end: its logout,
	// refused, is no error.
	other, err := controlconn.New(controlconn.Config{URLs: []string{e.url}, Login: "edges", Password: "edge-password-1"})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if _, err := other.Token(ctx); err != nil {
		t.Fatal(err)
	}
	e.revokeSessions(ctx, t)
	if err := other.Logout(ctx); err != nil {
		t.Fatalf("the logout of a revoked session: %v", err)
	}

	idle, err := controlconn.New(controlconn.Config{URLs: []string{serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t.Errorf("a Conn with no session called %s", r.URL.Path)
		w.WriteHeader(http.StatusInternalServerError)
	}))}, Login: "edges", Password: "x"})
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	if err := idle.Logout(ctx); err != nil {
		t.Fatalf("the logout of a Conn that never logged in: %v", err)
	}
}

// floodingControl answers FetchMailbox with entries of 256 KiB, as many
// as the request's limit names.
type floodingControl struct {
	fakeControl
	edgev1connect.UnimplementedMailboxServiceHandler
}

func (f *floodingControl) FetchMailbox(_ context.Context, req *connect.Request[edgev1.FetchMailboxRequest]) (*connect.Response[edgev1.FetchMailboxResponse], error) {
	resp := &edgev1.FetchMailboxResponse{}
	for i := range req.Msg.GetLimit() {
		resp.Entries = append(resp.Entries, &edgev1.MailboxEntry{Seq: uint64(i) + 1, Event: make([]byte, 256<<10)})
	}
	return connect.NewResponse(resp), nil
}

// The edge refuses an answer larger than MaxResponseBytes, as sent or
// once inflated, from whatever sent it, and takes one of the size the
// control plane sends (a page of 1 MiB of events).
func TestAnOversizedAnswerIsRefused(t *testing.T) {
	for _, gzipped := range []bool{false, true} {
		f := &floodingControl{}
		mux := http.NewServeMux()
		mux.Handle(controlv1connect.NewAuthServiceHandler(f))
		opts := []connect.HandlerOption{connect.WithCompressMinBytes(1)}
		if !gzipped {
			opts = append(opts, connect.WithCompression("gzip", nil, nil))
		}
		mux.Handle(edgev1connect.NewMailboxServiceHandler(f, opts...))
		cc, err := controlconn.New(controlconn.Config{URLs: []string{serve(t, mux)}, Login: "edges", Password: "x"})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if resp, err := cc.FetchMailbox(ctx, "d", 0, 4, 0); err != nil || len(resp.GetEntries()) != 4 {
			t.Errorf("gzip %v: a page of 1 MiB: %d entries, %v", gzipped, len(resp.GetEntries()), err)
		}
		big := uint32(controlconn.MaxResponseBytes/(256<<10) + 1)
		if _, err := cc.FetchMailbox(ctx, "d", 0, big, 0); connect.CodeOf(err) != connect.CodeResourceExhausted {
			t.Errorf("gzip %v: an answer of %d MiB: %v, want resource_exhausted", gzipped, big/4, err)
		}
		cancel()
		cc.Close()
	}
}

// A console call the edge cannot pass on is answered 503 without the
// control plane's address (the cause goes to the edge's log), and a burst
// of them logs one line: anyone can make them.
func TestProxyUnreachableTellsNoAddress(t *testing.T) {
	dead := httptest.NewServer(http.NotFoundHandler())
	url := dead.URL
	dead.Close() // nothing listens there any more
	rec := clustertest.NewLogRecorder()
	c, err := controlconn.New(controlconn.Config{URLs: []string{url}, Login: "edges", Password: "x", Logger: slog.New(rec), DialTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	proxy := httptest.NewServer(c.Proxy("/api"))
	defer proxy.Close()
	host := strings.TrimPrefix(url, "http://")
	for range 3 {
		resp, err := http.Post(proxy.URL+"/api/"+controlv1connect.AuthServiceLoginProcedure[1:], "application/json", strings.NewReader("{}"))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable || strings.Contains(string(body), host) {
			t.Fatalf("through the proxy to a dead control plane: %d %s", resp.StatusCode, body)
		}
	}
	logged := rec.Find("", func(r clustertest.Record) bool { return strings.HasPrefix(r.Message, "console API call not passed on") })
	if len(logged) != 1 || logged[0].Attrs["control_plane"].String() != host || logged[0].Attrs["err"].String() == "" {
		t.Fatalf("logged %+v, want one line naming the control plane it tried and the cause", logged)
	}
}

// refusingControl refuses the edge's own login while refuse is set, and
// records the pages' logins the edge passes on, with the address the
// edge vouched for.
type refusingControl struct {
	controlv1connect.UnimplementedAuthServiceHandler
	refuse     atomic.Bool
	edgeLogins atomic.Int64
	vouched    chan string
}

func (f *refusingControl) Login(_ context.Context, req *connect.Request[controlv1.LoginRequest]) (*connect.Response[controlv1.LoginResponse], error) {
	if req.Msg.GetLogin() == "edges" {
		f.edgeLogins.Add(1)
		if f.refuse.Load() {
			return nil, connect.NewError(connect.CodeUnauthenticated, errors.New("account disabled"))
		}
		return connect.NewResponse(&controlv1.LoginResponse{Tokens: &controlv1.Tokens{AccessToken: "edge-token",
			AccessTokenExpiresAt: timestamppb.New(time.Now().Add(time.Hour)), Role: controlv1.Role_ROLE_EDGE}}), nil
	}
	by := req.Header().Get("Relay-Forwarded-By")
	f.vouched <- req.Header().Get("Relay-Forwarded-For") + " " + by
	return connect.NewResponse(&controlv1.LoginResponse{Tokens: &controlv1.Tokens{AccessToken: "page-token"}}), nil
}

// A page's call the edge cannot vouch for (its own login refused, or the
// control plane out of reach) is answered 503 at the edge: passed on
// unvouched, it would count against the edge's own address, with every
// other page's, in login throttling. Pages do not each cost the control
// plane a login of the edge's: after a failed attempt the proxy tries
// again only once proxyTokenBackoff (1 s) has passed.
func TestProxyPassesOnlyCallsItVouchesFor(t *testing.T) {
	f := &refusingControl{vouched: make(chan string, 100)}
	f.refuse.Store(true)
	mux := http.NewServeMux()
	mux.Handle(controlv1connect.NewAuthServiceHandler(f))
	url := serve(t, mux)
	rec := clustertest.NewLogRecorder()
	c, err := controlconn.New(controlconn.Config{URLs: []string{url}, Login: "edges", Password: "x", Logger: slog.New(rec)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	proxy := httptest.NewServer(c.Proxy("/api"))
	defer proxy.Close()
	login := func() (*http.Response, string) {
		resp, err := http.Post(proxy.URL+"/api"+controlv1connect.AuthServiceLoginProcedure, "application/json", strings.NewReader(`{"login":"alice","password":"p"}`))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp, string(body)
	}
	const pages = 20
	start := time.Now()
	for range pages {
		resp, body := login()
		if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" || !strings.Contains(body, `"unavailable"`) {
			t.Fatalf("a page's login while the edge's own is refused: %d %q %s", resp.StatusCode, resp.Header.Get("Retry-After"), body)
		}
	}
	elapsed := time.Since(start)
	select {
	case v := <-f.vouched:
		t.Fatalf("a page's login reached the control plane unvouched (%q)", v)
	default:
	}
	// One attempt, and one more per backoff the loop outlasted.
	if n, most := f.edgeLogins.Load(), 1+int64(elapsed/time.Second); n < 1 || n > most {
		t.Fatalf("%d pages' calls in %v cost %d logins of the edge's, want 1 to %d", pages, elapsed, n, most)
	}
	// One line every 10 s at most.
	if logged := rec.Find("", func(r clustertest.Record) bool { return strings.HasPrefix(r.Message, "console API call not passed on") }); len(logged) < 1 || len(logged) > 1+int(elapsed/(10*time.Second)) {
		t.Fatalf("logged %d lines for the refused calls in %v, want one per 10 s", len(logged), elapsed)
	}

	// Once the edge has a token again, pages' calls go on, vouched for.
	f.refuse.Store(false)
	clustertest.Eventually(t, 30*time.Second, func() error {
		if resp, body := login(); resp.StatusCode != http.StatusOK {
			return fmt.Errorf("a page's login once the edge may log in: %d %s", resp.StatusCode, body)
		}
		return nil
	})
	if v := <-f.vouched; v != "127.0.0.1 Bearer edge-token" {
		t.Fatalf("the page's login was vouched for as %q", v)
	}
}

// rotatingControl logs the edge in with an access token that is due for
// a refresh at once (it expires within the minute Token keeps in hand)
// and rotates refresh tokens, recording each one presented. Its first
// Refresh waits for hold to close, or fails with lose set (as when the
// rotation was committed and its answer lost).
type rotatingControl struct {
	controlv1connect.UnimplementedAuthServiceHandler
	hold    chan struct{}
	entered chan struct{}
	lose    bool
	// ended receives the Authorization and the refresh token of each
	// Logout taken; the first downLogouts are refused as by a node that
	// is down.
	ended       chan [2]string
	downLogouts int

	mu        sync.Mutex
	logins    int
	presented []string
}

func (f *rotatingControl) Login(context.Context, *connect.Request[controlv1.LoginRequest]) (*connect.Response[controlv1.LoginResponse], error) {
	f.mu.Lock()
	f.logins++
	n := f.logins
	f.mu.Unlock()
	return connect.NewResponse(&controlv1.LoginResponse{Tokens: &controlv1.Tokens{AccessToken: fmt.Sprintf("login-%d", n),
		AccessTokenExpiresAt: timestamppb.New(time.Now().Add(30 * time.Second)), RefreshToken: fmt.Sprintf("r-login-%d", n), Role: controlv1.Role_ROLE_EDGE}}), nil
}

func (f *rotatingControl) Refresh(ctx context.Context, req *connect.Request[controlv1.RefreshRequest]) (*connect.Response[controlv1.RefreshResponse], error) {
	f.mu.Lock()
	f.presented = append(f.presented, req.Msg.GetRefreshToken())
	first := len(f.presented) == 1
	f.mu.Unlock()
	if first {
		if f.lose {
			return nil, connect.NewError(connect.CodeUnavailable, errors.New("the node stopped after proposing the rotation"))
		}
		f.entered <- struct{}{}
		<-f.hold // the rotation is committed whatever the caller does
	}
	return connect.NewResponse(&controlv1.RefreshResponse{Tokens: &controlv1.Tokens{AccessToken: "refreshed",
		AccessTokenExpiresAt: timestamppb.New(time.Now().Add(time.Hour)), RefreshToken: "r-next", Role: controlv1.Role_ROLE_EDGE}}), nil
}

func (f *rotatingControl) Logout(_ context.Context, req *connect.Request[controlv1.LogoutRequest]) (*connect.Response[controlv1.LogoutResponse], error) {
	f.mu.Lock()
	down := f.downLogouts > 0
	f.downLogouts--
	f.mu.Unlock()
	if down {
		return nil, connect.NewError(connect.CodeUnavailable, errors.New("the node is down"))
	}
	f.ended <- [2]string{req.Header().Get("Authorization"), req.Msg.GetRefreshToken()}
	return connect.NewResponse(&controlv1.LogoutResponse{}), nil
}

func (f *rotatingControl) seen() (logins int, presented []string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.logins, slices.Clone(f.presented)
}

func startRotating(t *testing.T, f *rotatingControl) *controlconn.Conn {
	t.Helper()
	mux := http.NewServeMux()
	mux.Handle(controlv1connect.NewAuthServiceHandler(f))
	c, err := controlconn.New(controlconn.Config{URLs: []string{serve(t, mux)}, Login: "edges", Password: "x"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	if tok, err := c.Token(context.Background()); err != nil || tok != "login-1" {
		t.Fatalf("first token: %q, %v", tok, err)
	}
	return c
}

// A caller that gives up while the edge's refresh is under way (a page's
// request through the proxy, reset at once) does not cut the refresh
// short: it would leave the edge holding the refresh token the control
// plane had already rotated, and its next refresh, presenting it again,
// would look like a stolen token's reuse and revoke the edge's login.
func TestACallerGivingUpDoesNotCutTheRefreshShort(t *testing.T) {
	f := &rotatingControl{hold: make(chan struct{}), entered: make(chan struct{}, 1)}
	c := startRotating(t, f)
	ctx, cancel := context.WithCancel(context.Background())
	gaveUp := make(chan error, 1)
	go func() {
		_, err := c.Token(ctx)
		gaveUp <- err
	}()
	<-f.entered
	cancel()
	if err := <-gaveUp; !errors.Is(err, context.Canceled) {
		t.Fatalf("the caller that gave up: %v", err)
	}
	close(f.hold)
	ctx2, cancel2 := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel2()
	if tok, err := c.Token(ctx2); err != nil || tok != "refreshed" {
		t.Fatalf("the token after the refresh: %q, %v", tok, err)
	}
	if logins, presented := f.seen(); logins != 1 || !slices.Equal(presented, []string{"r-login-1"}) {
		t.Fatalf("%d logins, refresh tokens presented %q: want 1 and the first one once", logins, presented)
	}
}

// A refresh whose answer is lost may have been rotated all the same: its
// token is never presented again for a refresh; the edge logs in afresh,
// and ends the session it gave up with the new login's access token (it
// would otherwise stay live until its refresh token expired). When no
// control node takes that logout, the edge's own Logout ends it.
func TestARefreshWithItsAnswerLostIsNotPresentedAgain(t *testing.T) {
	for _, down := range []int{0, 1} {
		t.Run(fmt.Sprintf("logouts refused while the node is down: %d", down), func(t *testing.T) {
			f := &rotatingControl{lose: true, ended: make(chan [2]string, 4), downLogouts: down}
			c := startRotating(t, f)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if _, err := c.Token(ctx); connect.CodeOf(err) != connect.CodeUnavailable {
				t.Fatalf("the refresh whose answer was lost: %v", err)
			}
			if tok, err := c.Token(ctx); err != nil || tok != "login-2" {
				t.Fatalf("the next token: %q, %v; want a new login's", tok, err)
			}
			if logins, presented := f.seen(); logins != 2 || !slices.Equal(presented, []string{"r-login-1"}) {
				t.Fatalf("%d logins, refresh tokens presented %q: want 2 and the first one once", logins, presented)
			}
			var want [][2]string
			if down == 0 {
				// Ended by the log-in, before Token returned.
				want = append(want, [2]string{"Bearer login-2", "r-login-1"})
			}
			if err := c.Logout(ctx); err != nil {
				t.Fatal(err)
			}
			want = append(want, [2]string{"Bearer login-2", "r-login-2"})
			if down > 0 {
				want = append(want, [2]string{"Bearer login-2", "r-login-1"})
			}
			// Each session once, with the live session's access token.
			close(f.ended)
			var got [][2]string
			for e := range f.ended {
				got = append(got, e)
			}
			if !slices.Equal(got, want) {
				t.Fatalf("logouts (access token, refresh token): %q, want %q", got, want)
			}
		})
	}
}

// stalledLogouts is a control node that logs the edge in but never
// answers a Logout (paused, or cut off after the edge reached it).
type stalledLogouts struct{ rotatingControl }

func (f *stalledLogouts) Logout(ctx context.Context, _ *connect.Request[controlv1.LogoutRequest]) (*connect.Response[controlv1.LogoutResponse], error) {
	<-ctx.Done()
	return nil, connect.NewError(connect.CodeDeadlineExceeded, ctx.Err())
}

// A control node that does not answer a logout does not hold the whole
// of the edge's stop: the logout goes to the next node within the stop's
// time.
func TestALogoutMovesOnFromANodeThatDoesNotAnswer(t *testing.T) {
	stalled := &stalledLogouts{}
	mux := http.NewServeMux()
	mux.Handle(controlv1connect.NewAuthServiceHandler(stalled))
	working := &rotatingControl{ended: make(chan [2]string, 1)}
	wmux := http.NewServeMux()
	wmux.Handle(controlv1connect.NewAuthServiceHandler(working))
	c, err := controlconn.New(controlconn.Config{URLs: []string{serve(t, mux), serve(t, wmux)}, Login: "edges", Password: "x"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	if tok, err := c.Token(context.Background()); err != nil || tok != "login-1" {
		t.Fatalf("first token: %q, %v", tok, err)
	}
	// Five times what one node gets; a node that never answers would
	// take all of it.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Logout(ctx); err != nil {
		t.Fatalf("the logout past a node that does not answer: %v", err)
	}
	if got := <-working.ended; got != [2]string{"Bearer login-1", "r-login-1"} {
		t.Fatalf("the next node ended %q with %q", got[1], got[0])
	}
}

// A control node that takes the connection and never answers a log-in
// (a process stopped behind TLS, a Login handler that hangs) costs a
// token attempt its share of the attempt's time, not all of it: the edge
// gets its token from the next node, and its later attempts start there
// instead of going back to the node that did not answer.
func TestATokenAttemptMovesOnFromANodeThatDoesNotAnswer(t *testing.T) {
	// Access tokens shorter than the minute of margin: every Token call
	// after the first is an attempt of its own (a refresh).
	c := clustertest.Start(t, 1, clustertest.Options{Auth: api.AuthConfig{AccessTTL: 30 * time.Second}})
	createAccount(t, c, "edges", "edge-password-1", controlv1.Role_ROLE_EDGE)
	d := api.NewDialer(nil)
	defer d.Close()
	live := d.URL(c.Nodes[0].Server.APIAddr())

	hung := &hangingControl{entered: make(chan struct{}, 8), release: make(chan struct{})}
	mux := http.NewServeMux()
	mux.Handle(controlv1connect.NewAuthServiceHandler(hung))
	var asked atomic.Int64
	hungURL := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		asked.Add(1)
		mux.ServeHTTP(w, r)
	}))
	t.Cleanup(func() { close(hung.release) }) // before the server closes

	cc, err := controlconn.New(controlconn.Config{URLs: []string{hungURL, live}, Login: "edges", Password: "edge-password-1"})
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	if _, err := cc.Token(ctx); err != nil {
		t.Fatalf("token past a node that does not answer: %v", err)
	}
	// The attempt's 10 s (tokenTimeout) split between two nodes: the
	// live one is asked after 5 s. A node that does not answer took all
	// 10 s, and the attempt failed.
	if took := time.Since(start); took >= 10*time.Second {
		t.Fatalf("the token took %v, want less than one attempt's 10 s", took)
	}
	for i := range 3 {
		if _, err := cc.Token(ctx); err != nil {
			t.Fatalf("attempt %d after the first: %v", i+2, err)
		}
	}
	if n := asked.Load(); n != 1 {
		t.Fatalf("the node that does not answer was asked %d times, want once", n)
	}
}

// Edges that list the same control nodes start at the one Start names
// (modulo their number), not all at the first.
func TestStartPicksTheFirstNode(t *testing.T) {
	served := make(chan string, 8)
	a := &fakeControl{name: "a", protos: make(chan string, 8), served: served}
	b := &fakeControl{name: "b", protos: make(chan string, 8), served: served}
	urls := []string{a.start(t), b.start(t)}
	for start, want := range map[int]string{0: "a", 1: "b", 3: "b", -1: "b"} {
		cc, err := controlconn.New(controlconn.Config{URLs: slices.Clone(urls), Login: "edges", Password: "x", Start: start})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		stream, err := cc.Watch().Watch(ctx, connect.NewRequest(&edgev1.WatchRequest{}))
		if err != nil {
			t.Fatal(err)
		}
		for stream.Receive() {
		}
		_ = stream.Close()
		cancel()
		cc.Close()
		if got := <-served; got != want {
			t.Errorf("Start %d: the first watch went to %s, want %s", start, got, want)
		}
	}
}

// An edge whose clock is off the control plane's keeps a token for its
// lifetime, counted from when it came: ahead by more than the lifetime
// less a minute, it took every token for expired on arrival (the control
// node's absolute expiry by the edge's clock) and asked for a new one, a
// Raft write, at every call. Behind, it kept using a token the control
// plane had already let expire.
func TestATokenLastsItsLifetimeWhateverTheEdgesClock(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := clustertest.Start(t, 1, clustertest.Options{})
	createAccount(t, c, "edges", "edge-password-1", controlv1.Role_ROLE_EDGE)
	d := api.NewDialer(nil)
	t.Cleanup(d.Close)
	url := d.URL(c.Nodes[0].Server.APIAddr())
	for _, skew := range []time.Duration{14*time.Minute + 30*time.Second, -time.Hour} {
		cc, err := controlconn.New(controlconn.Config{URLs: []string{url}, Login: "edges", Password: "edge-password-1",
			Now: func() time.Time { return time.Now().Add(skew) }})
		if err != nil {
			t.Fatal(err)
		}
		first, err := cc.Token(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for range 3 {
			if tok, err := cc.Token(ctx); err != nil || tok != first {
				t.Fatalf("edge clock %v off: the next call got another token (%v): a log-in or refresh per call", skew, err)
			}
		}
		cc.Close()
	}
}
