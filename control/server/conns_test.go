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
func (c *apiClient) getMe(token string) (reused bool, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) { reused = i.Reused }})
	req := connect.NewRequest(&controlv1.GetMeRequest{})
	req.Header().Set("Authorization", "Bearer "+token)
	_, err = c.users.GetMe(ctx, req)
	return reused, err
}

func (c *apiClient) mustGetMe(token string) bool {
	c.t.Helper()
	reused, err := c.getMe(token)
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
// not carried a call whose credentials verified, closing the oldest; a
// connection that has leaves that list, so a flood of silent
// connections does not touch it. An edge's is trusted from then on and
// never closed to make room; people's are bounded per source
// (MaxAPIConnsPerSource: a host holding an account that opens more loses
// its own oldest, never an edge's at the same address) and in all
// (MaxAPIConns). The same over every protocol the port serves: the
// connection is found beneath TLS and HTTP/2.
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
	const limit, perSource, total = 4, 2, 3
	c := clustertest.Empty(t, clustertest.Options{})
	n := c.StartNode(func(cfg *server.Config) {
		cfg.Bootstrap = true
		cfg.MaxPendingAPIConns, cfg.MaxAPIConnsPerSource, cfg.MaxAPIConns = limit, perSource, total
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
	const pending, authenticated, evicted = "relay_control_api_pending_connections",
		"relay_control_api_authenticated_connections", "relay_control_api_connections_evicted_total"

	// An admin's token, and an edge account's.
	setup := newAPIClient(t, p, addr, "127.0.0.9")
	var adminTok string
	clustertest.Eventually(t, 30*time.Second, func() (err error) {
		adminTok, err = setup.login("admin", clustertest.AdminPassword) // once the cluster is initialized
		return err
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req := connect.NewRequest(&controlv1.CreateUserRequest{Login: "edge1", Password: "password-of-edge1", Role: controlv1.Role_ROLE_EDGE})
	req.Header().Set("Authorization", "Bearer "+adminTok)
	if _, err := setup.users.CreateUser(ctx, req); err != nil {
		t.Fatal(err)
	}
	edgeTok, err := setup.login("edge1", "password-of-edge1")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(authenticated, "", 1)
	setup.tr.CloseIdleConnections()
	waitFor(authenticated, "", 0)
	waitFor(pending, "", 0)

	// An edge's connection is trusted from its first verified call: on
	// neither list.
	edge := newAPIClient(t, p, addr, "127.0.0.2")
	edge.mustGetMe(edgeTok)
	waitFor(pending, "", 0)
	if got := metric(authenticated, ""); got != 0 {
		t.Fatalf("an edge's connection counted among people's: %v", got)
	}

	// A client that only logs in (a public call) stays pending.
	login := newAPIClient(t, p, addr, "127.0.0.3")
	if _, err := login.login("admin", clustertest.AdminPassword); err != nil {
		t.Fatal(err)
	}
	waitFor(pending, "", 1)

	// A flood of silent connections: twice the bound. They push out
	// their own oldest, not the login's, whose client spoke.
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
	waitFor(authenticated, "", 0)
	if !edge.mustGetMe(edgeTok) {
		t.Fatal("the edge's connection was closed by the flood")
	}

	// Three admin connections from the edge's host: the oldest of the
	// three goes, and neither the others nor the edge's.
	a := []*apiClient{newAPIClient(t, p, addr, "127.0.0.2"), newAPIClient(t, p, addr, "127.0.0.2"), newAPIClient(t, p, addr, "127.0.0.2")}
	for _, o := range a {
		o.mustGetMe(adminTok)
	}
	waitFor(evicted, "authenticated", 1)
	waitFor(authenticated, "", perSource)
	for i, o := range a[1:] {
		if !o.mustGetMe(adminTok) {
			t.Fatalf("admin connection %d, younger, was closed", i+1)
		}
	}
	if !edge.mustGetMe(edgeTok) {
		t.Fatal("the edge's connection was closed to make room for people's at its address")
	}

	// Past the bound of all sources, the oldest of all goes.
	b := []*apiClient{newAPIClient(t, p, addr, "127.0.0.5"), newAPIClient(t, p, addr, "127.0.0.5")}
	for _, o := range b {
		o.mustGetMe(adminTok)
	}
	waitFor(evicted, "authenticated", 2)
	waitFor(authenticated, "", total)
	for i, o := range []*apiClient{a[2], b[0], b[1]} {
		if !o.mustGetMe(adminTok) {
			t.Fatalf("connection %d of the newest three was closed", i)
		}
	}

	// A call whose credentials do not verify does not vouch.
	stranger := newAPIClient(t, p, addr, "127.0.0.4")
	if _, err := stranger.getMe("not-a-token"); connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("GetMe with a bad token: %v, want unauthenticated", err)
	}
	if got := metric(authenticated, ""); got != total {
		t.Fatalf("%v authenticated connections after a refused call, want %v", got, total)
	}

	// Everyone gone: the counts come back to zero.
	for _, cl := range append(append(a, b...), edge, login, stranger) {
		cl.tr.CloseIdleConnections()
	}
	for _, fc := range flood {
		_ = fc.Close()
	}
	waitFor(authenticated, "", 0)
	waitFor(pending, "", 0)
}
