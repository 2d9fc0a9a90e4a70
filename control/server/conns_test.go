package server_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/server"
	"github.com/edge-relay/relay/internal/h2probe"
	"github.com/edge-relay/relay/internal/testcerts"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

// apiClient speaks to a node from the given loopback address, on one
// connection, in one of the protocols the API port serves.
type apiClient struct {
	t     *testing.T
	users controlv1connect.UserServiceClient
	auth  controlv1connect.AuthServiceClient
	tr    *http.Transport
}

// apiProtocol is how a test client speaks to the API port: HTTP/2 with
// prior knowledge on a node without TLS (as edges do), or HTTP/2 or
// HTTP/1.1 over TLS.
type apiProtocol struct {
	name  string
	roots *x509.CertPool // nil: no TLS
	h1    bool
}

func newAPIClient(t *testing.T, p apiProtocol, addr, from string) *apiClient {
	t.Helper()
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 10 * time.Second}
	var protos http.Protocols
	tr := &http.Transport{DialContext: d.DialContext, Protocols: &protos, MaxConnsPerHost: 1}
	base := "http://" + addr
	switch {
	case p.roots == nil:
		protos.SetUnencryptedHTTP2(true)
	case p.h1:
		protos.SetHTTP1(true)
	default:
		protos.SetHTTP2(true)
	}
	if p.roots != nil {
		tr.TLSClientConfig = &tls.Config{RootCAs: p.roots}
		base = "https://" + addr
	}
	t.Cleanup(tr.CloseIdleConnections)
	hc := &http.Client{Transport: tr}
	return &apiClient{t: t, tr: tr,
		users: controlv1connect.NewUserServiceClient(hc, base),
		auth:  controlv1connect.NewAuthServiceClient(hc, base)}
}

// getMe calls GetMe with token and reports whether the call went on a
// connection the client had used before.
func (c *apiClient) getMe(token string, headers ...string) (reused bool, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) { reused = i.Reused }})
	req := connect.NewRequest(&controlv1.GetMeRequest{})
	req.Header().Set("Authorization", "Bearer "+token)
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header().Set(headers[i], headers[i+1])
	}
	_, err = c.users.GetMe(ctx, req)
	return reused, err
}

func (c *apiClient) mustGetMe(token string) bool {
	c.t.Helper()
	return c.mustGetMeWith(token)
}

// mustGetMeWith is mustGetMe with more request headers, name and value
// in turn.
func (c *apiClient) mustGetMeWith(token string, headers ...string) bool {
	c.t.Helper()
	reused, err := c.getMe(token, headers...)
	if err != nil {
		c.t.Fatalf("GetMe: %v", err)
	}
	return reused
}

func (c *apiClient) login(login, password string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := c.auth.Login(ctx, connect.NewRequest(&controlv1.LoginRequest{Login: login, Password: password}))
	if err != nil {
		return "", err
	}
	return resp.Msg.GetTokens().GetAccessToken(), nil
}

// The API port holds at most MaxPendingAPIConns connections that have
// not carried a call that passed authentication, closing the oldest,
// those that never carried a request first: a flood of silent
// connections pushes out only its own, not a client that logged in. A
// connection whose call passed leaves that list: an edge's (and one an
// edge passes browser calls on) for the trusted list, out of reach of
// anyone else's connections; people's for a list bounded per account
// (MaxAPIConnsPerAccount: an account's holder who opens more loses its
// own oldest, from whatever address) and in all (MaxAPIConns). A call
// that fails authentication or authorization vouches for nothing. The
// same over every protocol the port serves: the connection is found
// beneath TLS and HTTP/2.
func TestAPIBoundsConnections(t *testing.T) {
	ca, err := testcerts.NewCA(t.TempDir(), "cluster")
	if err != nil {
		t.Fatal(err)
	}
	pem, err := os.ReadFile(ca.CertFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	for _, p := range []apiProtocol{{name: "h2c"}, {name: "h2", roots: roots}, {name: "http1", roots: roots, h1: true}} {
		t.Run(p.name, func(t *testing.T) { testAPIBoundsConnections(t, p, ca) })
	}
}

func testAPIBoundsConnections(t *testing.T, p apiProtocol, ca *testcerts.CA) {
	const limit, perAccount, total = 4, 2, 3
	c := clustertest.Empty(t, clustertest.Options{})
	n := c.StartNode(func(cfg *server.Config) {
		cfg.Bootstrap = true
		cfg.MaxPendingAPIConns, cfg.MaxAPIConnsPerAccount, cfg.MaxAPIConns = limit, perAccount, total
		if p.roots != nil {
			cert, key, err := ca.Issue("n1")
			if err != nil {
				t.Fatal(err)
			}
			cfg.CertFile, cfg.KeyFile, cfg.CAFile = cert, key, ca.CertFile
		}
	})
	addr := n.Server.APIAddr()
	metric := func(name, reason string) float64 {
		if reason == "" {
			return n.Metric(t, name)
		}
		return n.LabeledMetric(t, name, "reason", reason)
	}
	waitFor := func(name, reason string, want float64) {
		t.Helper()
		clustertest.Eventually(t, 30*time.Second, func() error {
			if got := metric(name, reason); got != want {
				return fmt.Errorf("%s{%s} = %v, want %v", name, reason, got, want)
			}
			return nil
		})
	}
	const pending, authenticated, trusted, evicted = "relay_control_api_pending_connections",
		"relay_control_api_authenticated_connections", "relay_control_api_trusted_connections",
		"relay_control_api_connections_evicted_total"
	counts := func(p, a, tr float64) {
		t.Helper()
		waitFor(pending, "", p)
		waitFor(authenticated, "", a)
		waitFor(trusted, "", tr)
	}

	// An admin's token, an edge account's and a user's.
	setup := newAPIClient(t, p, addr, "127.0.0.9")
	var adminTok string
	clustertest.Eventually(t, 30*time.Second, func() (err error) {
		adminTok, err = setup.login("admin", clustertest.AdminPassword) // once the cluster is initialized
		return err
	})
	token := func(login string, role controlv1.Role) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		req := connect.NewRequest(&controlv1.CreateUserRequest{Login: login, Password: "password-of-" + login, Role: role})
		req.Header().Set("Authorization", "Bearer "+adminTok)
		if _, err := setup.users.CreateUser(ctx, req); err != nil {
			t.Fatal(err)
		}
		tok, err := setup.login(login, "password-of-"+login)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	edgeTok, userTok := token("edge1", controlv1.Role_ROLE_EDGE), token("user1", controlv1.Role_ROLE_USER)
	counts(0, 1, 0)
	setup.tr.CloseIdleConnections()
	counts(0, 0, 0)

	// An edge's connection is trusted from its first call that passed.
	edge := newAPIClient(t, p, addr, "127.0.0.2")
	edge.mustGetMe(edgeTok)
	counts(0, 0, 1)

	// A client that only logs in (a public call) stays pending.
	login := newAPIClient(t, p, addr, "127.0.0.3")
	if _, err := login.login("admin", clustertest.AdminPassword); err != nil {
		t.Fatal(err)
	}
	waitFor(pending, "", 1)

	// A flood of silent connections: twice the bound. They push out
	// their own oldest, not the login's, which carried a request.
	var flood []net.Conn
	for range 2 * limit {
		fc, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = fc.Close() })
		flood = append(flood, fc)
	}
	survivors := limit - 1 // and the login's
	waitFor(evicted, "pending", float64(2*limit-survivors))
	waitFor(pending, "", limit)
	for i, fc := range flood[2*limit-survivors:] {
		// Not closed: a read times out. (The node's 10 s handshake and
		// header timeout would close them later.)
		_ = fc.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		var ne net.Error
		if _, err := fc.Read(make([]byte, 1)); !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("flood connection %d of the newest: read %v, want it still open", 2*limit-survivors+i, err)
		}
	}
	for i, fc := range flood[:2*limit-survivors] {
		_ = fc.SetReadDeadline(time.Now().Add(30 * time.Second))
		if _, err := fc.Read(make([]byte, 64)); !errors.Is(err, io.EOF) {
			t.Fatalf("flood connection %d: read %v, want EOF (closed)", i, err)
		}
	}
	if !login.mustGetMe(adminTok) {
		t.Fatal("the login's connection was closed by a flood of silent connections")
	}
	waitFor(authenticated, "", 1) // the login's, vouched for by that call
	login.tr.CloseIdleConnections()
	for _, fc := range flood {
		_ = fc.Close()
	}
	counts(0, 0, 1)
	if !edge.mustGetMe(edgeTok) {
		t.Fatal("the edge's connection was closed by the flood")
	}

	// Three connections of the admin's account, one of them from the
	// edge's address: the oldest of the three goes, and neither the
	// others nor the edge's.
	a := []*apiClient{newAPIClient(t, p, addr, "127.0.0.2"), newAPIClient(t, p, addr, "127.0.0.6"), newAPIClient(t, p, addr, "127.0.0.7")}
	for _, o := range a {
		o.mustGetMe(adminTok)
	}
	waitFor(evicted, "authenticated", 1)
	counts(0, perAccount, 1)
	for i, o := range a[1:] {
		if !o.mustGetMe(adminTok) {
			t.Fatalf("admin connection %d, younger, was closed", i+1)
		}
	}
	if !edge.mustGetMe(edgeTok) {
		t.Fatal("the edge's connection was closed to make room for people's")
	}

	// Past the bound of all accounts, the oldest of all goes.
	b := []*apiClient{newAPIClient(t, p, addr, "127.0.0.5"), newAPIClient(t, p, addr, "127.0.0.5")}
	for _, o := range b {
		o.mustGetMe(userTok)
	}
	waitFor(evicted, "authenticated", 2)
	counts(0, total, 1)
	for i, o := range []struct {
		c   *apiClient
		tok string
	}{{a[2], adminTok}, {b[0], userTok}, {b[1], userTok}} {
		if !o.c.mustGetMe(o.tok) {
			t.Fatalf("connection %d of the newest three was closed", i)
		}
	}

	// Calls that fail authentication or authorization vouch for nothing.
	stranger := newAPIClient(t, p, addr, "127.0.0.4")
	if _, err := stranger.getMe("not-a-token"); connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("GetMe with a bad token: %v, want unauthenticated", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req := connect.NewRequest(&controlv1.ListUsersRequest{})
	req.Header().Set("Authorization", "Bearer "+userTok)
	if _, err := stranger.users.ListUsers(ctx, req); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Fatalf("ListUsers as a user: %v, want permission_denied", err)
	}
	counts(1, total, 1)

	// An edge passing a browser page's call (the page's user's token,
	// the edge's in Relay-Forwarded-By): its connection is trusted.
	proxy := newAPIClient(t, p, addr, "127.0.0.2")
	proxy.mustGetMeWith(userTok, "Relay-Forwarded-By", "Bearer "+edgeTok, "Relay-Forwarded-For", "192.0.2.7")
	counts(1, total, 2)

	// Everyone gone: the counts come back to zero.
	for _, cl := range append(append(a, b...), edge, stranger, proxy) {
		cl.tr.CloseIdleConnections()
	}
	counts(0, 0, 0)
}

// A client that gives the node no flow-control window (its answers never
// get out, and the API port has no write timeout) and sends request
// bodies no handler reads (a call to no procedure, answered 404 unread)
// makes the node hold what the port granted it: MaxAPIReceiveBuffer a
// connection, not net/http's 1 MiB a stream and a connection.
func TestAPIBoundsWhatAStalledConnectionBuffers(t *testing.T) {
	c := clustertest.Empty(t, clustertest.Options{})
	n := c.StartNode(func(cfg *server.Config) { cfg.Bootstrap = true })
	conn, err := net.DialTimeout("tcp", n.Server.APIAddr(), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	// HTTP/2 with prior knowledge: a node without TLS, as edges speak it.
	sent, err := h2probe.Buffered(conn, "http", "POST", "/no.Such/Procedure", 8, server.MaxAPIReceiveBuffer)
	if err != nil {
		t.Fatalf("a stalled connection to the API port (MaxAPIReceiveBuffer %d KiB): %v", server.MaxAPIReceiveBuffer>>10, err)
	}
	t.Logf("a stalled connection made the node buffer %d bytes of request bodies", sent)
}
