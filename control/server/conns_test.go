package server_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/server"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

// apiClient speaks HTTP/2 to a node from the given loopback address, on
// one connection, as an edge does.
type apiClient struct {
	t     *testing.T
	users controlv1connect.UserServiceClient
	auth  controlv1connect.AuthServiceClient
	tr    *http.Transport
}

func newAPIClient(t *testing.T, addr, from string) *apiClient {
	t.Helper()
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 10 * time.Second}
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	tr := &http.Transport{DialContext: d.DialContext, Protocols: &p}
	t.Cleanup(tr.CloseIdleConnections)
	hc := &http.Client{Transport: tr}
	return &apiClient{t: t, tr: tr,
		users: controlv1connect.NewUserServiceClient(hc, "http://"+addr),
		auth:  controlv1connect.NewAuthServiceClient(hc, "http://"+addr)}
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

// The API port holds at most MaxPendingAPIConns connections that have
// not carried a call whose credentials verified, closing the oldest; a
// connection that has (an edge's, relayctl's) leaves that list, so a
// flood of silent connections does not touch it. Those are bounded per
// source instead: a host holding an account that opens more than
// MaxAPIConnsPerSource loses its own oldest, and no one else's.
func TestAPIBoundsConnections(t *testing.T) {
	const limit, perSource = 4, 2
	c := clustertest.Start(t, 1, clustertest.Options{Configure: func(cfg *server.Config) {
		cfg.MaxPendingAPIConns = limit
		cfg.MaxAPIConnsPerSource = perSource
	}})
	n := c.Nodes[0]
	addr := n.Server.APIAddr()
	token := c.AdminToken()
	metric := func(name, reason string) float64 {
		if reason == "" {
			return n.Metric(t, name)
		}
		return n.LabeledMetric(t, name, "reason", reason)
	}
	waitFor := func(name, label string, want float64) {
		t.Helper()
		clustertest.Eventually(t, 30*time.Second, func() error {
			if got := metric(name, label); got != want {
				return fmt.Errorf("%s{%s} = %v, want %v", name, label, got, want)
			}
			return nil
		})
	}
	// The login's connection was closed with its dialer.
	waitFor("relay_control_api_pending_connections", "", 0)

	edge := newAPIClient(t, addr, "127.0.0.2")
	edge.mustGetMe(token)
	waitFor("relay_control_api_authenticated_connections", "", 1)
	waitFor("relay_control_api_pending_connections", "", 0)

	// A client that only logs in (a public call) stays pending.
	login := newAPIClient(t, addr, "127.0.0.3")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := login.auth.Login(ctx, connect.NewRequest(&controlv1.LoginRequest{Login: "admin", Password: clustertest.AdminPassword})); err != nil {
		t.Fatal(err)
	}
	waitFor("relay_control_api_pending_connections", "", 1)

	// A flood of silent connections: twice the bound. The oldest go,
	// the login's first among them.
	var flood []net.Conn
	for range 2 * limit {
		fc, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = fc.Close() })
		flood = append(flood, fc)
	}
	waitFor("relay_control_api_connections_evicted_total", "pending", limit+1)
	waitFor("relay_control_api_pending_connections", "", limit)
	for i, fc := range flood[:limit-1] {
		_ = fc.SetReadDeadline(time.Now().Add(30 * time.Second))
		if _, err := fc.Read(make([]byte, 64)); !errors.Is(err, io.EOF) {
			t.Fatalf("flood connection %d: read %v, want EOF (closed)", i, err)
		}
	}
	// The authenticated connection is untouched: the next call goes on it.
	if !edge.mustGetMe(token) {
		t.Fatal("the authenticated connection was closed by the flood")
	}

	// Two more authenticated connections from the edge's host: the
	// oldest of the three goes, and only that one.
	other := []*apiClient{newAPIClient(t, addr, "127.0.0.2"), newAPIClient(t, addr, "127.0.0.2")}
	for _, o := range other {
		o.mustGetMe(token)
	}
	waitFor("relay_control_api_connections_evicted_total", "per_source", 1)
	waitFor("relay_control_api_authenticated_connections", "", perSource)
	for _, o := range other {
		if !o.mustGetMe(token) {
			t.Fatal("a younger authenticated connection was closed")
		}
	}
	// The evicted client dials again and is served.
	edge.mustGetMe(token)

	// A call whose credentials do not verify does not vouch.
	stranger := newAPIClient(t, addr, "127.0.0.4")
	if _, err := stranger.getMe("not-a-token"); connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("GetMe with a bad token: %v, want unauthenticated", err)
	}
	if got := metric("relay_control_api_authenticated_connections", ""); got != perSource {
		t.Fatalf("%v authenticated connections after a refused call, want %v", got, perSource)
	}

	// Everyone gone: the counts come back to zero.
	for _, cl := range append(other, edge, login, stranger) {
		cl.tr.CloseIdleConnections()
	}
	for _, fc := range flood {
		_ = fc.Close()
	}
	waitFor("relay_control_api_authenticated_connections", "", 0)
	waitFor("relay_control_api_pending_connections", "", 0)
}
