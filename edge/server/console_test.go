package server_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/internal/relaytest"
)

// from is an HTTP client whose connections come from the loopback
// address ip, so that one test can be several browsers.
func from(t *testing.T, ip string) *http.Client {
	t.Helper()
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 10 * time.Second}
	tr := &http.Transport{DialContext: d.DialContext}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}
}

// call posts a Connect JSON request and returns the status and the body.
func call(t *testing.T, hc *http.Client, url string, body any, header http.Header) (int, map[string]any) {
	t.Helper()
	b, err := json.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&out)
	return resp.StatusCode, out
}

// The edge passes a fixed set of control-plane calls on for browser
// pages, under /api/. Login throttling counts each browser's address,
// which the edge vouches for with its own token; nobody else can claim
// an address.
func TestConsoleAPIThroughTheEdge(t *testing.T) {
	// Each address may fail burst-1 logins, then waits (the set-up's own
	// logins come from 127.0.0.1, the test's browsers from other loopback
	// addresses; each failure below is at another login, so the per-login
	// count is not the one).
	const burst = 8
	r := relaytest.Start(t, relaytest.Options{
		Cluster: clustertest.Options{Auth: api.AuthConfig{Throttle: api.Throttle{AddrFree: burst - 1}}},
		Edge:    func(_ int, cfg *server.Config) { cfg.AdminAddr = "127.0.0.1:0" },
	})
	e := r.Edges[0]
	r.Cluster.TokenFor("alice", 0) // a user; password "password-of-alice"
	base := e.AdminURL() + "/api/"
	login := func(hc *http.Client, user, password string) (int, map[string]any) {
		return call(t, hc, base+"control.v1.AuthService/Login", map[string]string{"login": user, "password": password}, nil)
	}

	// A page signs in through the edge and calls what it may.
	one := from(t, "127.0.0.2")
	code, body := login(one, "alice", "password-of-alice")
	if code != http.StatusOK {
		t.Fatalf("login through the edge: %d %v", code, body)
	}
	tok := body["tokens"].(map[string]any)["accessToken"].(string)
	bearer := http.Header{"Authorization": {"Bearer " + tok}}
	if code, body = call(t, one, base+"control.v1.UserService/GetMe", map[string]any{}, bearer); code != http.StatusOK {
		t.Fatalf("GetMe through the edge: %d %v", code, body)
	}
	// Staff procedures are not passed on, whatever the token.
	admin := http.Header{"Authorization": {"Bearer " + r.Cluster.AdminToken()}}
	if code, body = call(t, one, base+"control.v1.UserService/CreateUser", map[string]string{"login": "mallory"}, admin); code != http.StatusNotFound || body["code"] != "not_found" {
		t.Fatalf("CreateUser through the edge: %d %v", code, body)
	}

	// Failed logins from one browser use up its address's budget (each
	// a different login, so the per-login limit is not the one).
	for i := 1; i < burst; i++ {
		if code, body = login(one, fmt.Sprintf("u%d", i), "wrong"); code != http.StatusUnauthorized {
			t.Fatalf("failed login %d: %d %v", i, code, body)
		}
	}
	if code, body = login(one, "u-last", "wrong"); code != http.StatusTooManyRequests {
		t.Fatalf("login %d from one browser: %d %v, want 429", burst+1, code, body)
	}
	// Another browser behind the same edge is not locked out, even claiming
	// to be the first: the edge replaces any address a caller claims.
	two := from(t, "127.0.0.3")
	spoof := http.Header{"Relay-Forwarded-For": {"127.0.0.9"}, "Relay-Forwarded-By": {"Bearer " + tok}}
	if code, body = call(t, two, base+"control.v1.AuthService/Login", map[string]string{"login": "alice", "password": "password-of-alice"}, spoof); code != http.StatusOK {
		t.Fatalf("login from a second browser: %d %v", code, body)
	}

	// Nor can a caller have the edge's vouching removed on the way (a
	// Connection header naming it, hop-by-hop, made the proxy drop it,
	// and the failures counted against the edge's own address): they
	// count against its address, and the edge's is untouched.
	three := from(t, "127.0.0.5")
	strip := http.Header{"Connection": {"Relay-Forwarded-For, Relay-Forwarded-By"}}
	for i := range burst + 1 {
		code, body = call(t, three, base+"control.v1.AuthService/Login", map[string]string{"login": fmt.Sprintf("w%d", i), "password": "wrong"}, strip)
	}
	if code != http.StatusTooManyRequests {
		t.Fatalf("login %d from a browser stripping the vouch: %d %v, want 429", burst+1, code, body)
	}
	if code, body = call(t, from(t, "127.0.0.1"), strings.TrimSuffix(r.ControlURLs()[0], "/")+"/control.v1.AuthService/Login",
		map[string]string{"login": "alice", "password": "password-of-alice"}, nil); code != http.StatusOK {
		t.Fatalf("a login from the edge's own address after that: %d %v", code, body)
	}

	// Straight to the control plane, a claimed address without an edge's
	// token counts for nothing: every claim lands on the caller's own.
	direct := strings.TrimSuffix(r.ControlURLs()[0], "/") + "/control.v1.AuthService/Login"
	four := from(t, "127.0.0.4")
	last := 0
	for i := range burst + 1 {
		h := http.Header{"Relay-Forwarded-For": {net.IPv4(10, 0, 0, byte(i)).String()}, "Relay-Forwarded-By": {"Bearer " + tok}}
		last, body = call(t, four, direct, map[string]string{"login": fmt.Sprintf("v%d", i), "password": "wrong"}, h)
	}
	if last != http.StatusTooManyRequests {
		t.Fatalf("direct login %d, each claiming a new address: %d %v, want 429", burst+1, last, body)
	}
}

// A page learns where to reach the edge's UDP side: the bound address,
// with an unspecified host replaced by the host the page was loaded
// from, unless the operator set PublicAddr.
func TestEdgeInfoForPages(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
		cfg.Addr = "0.0.0.0:0"
		cfg.AdminAddr = "127.0.0.1:0"
	}})
	e := r.Edges[0]
	_, port, err := net.SplitHostPort(e.Addr())
	if err != nil {
		t.Fatal(err)
	}
	info := func(host string) server.EdgeInfo {
		t.Helper()
		req, err := http.NewRequest(http.MethodGet, e.AdminURL()+server.EdgeInfoPath, nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Host = host
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var out server.EdgeInfo
		if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
			t.Fatal(err)
		}
		return out
	}
	for host, want := range map[string]string{
		"relay.example.com:8443": "relay.example.com:" + port,
		"relay.example.com":      "relay.example.com:" + port,
		"[2001:db8::1]:8443":     "[2001:db8::1]:" + port,
	} {
		if got := info(host); got.Addr != want || got.ID == "" {
			t.Errorf("loaded from %s: told %+v, want addr %s", host, got, want)
		}
	}

	r.StopEdge(0)
	cfg := r.EdgeConfig(0)
	cfg.AdminAddr = "127.0.0.1:0"
	cfg.PublicAddr = "udp.relay.example.com:443"
	e = r.StartEdgeWith(0, cfg)
	if got := info("relay.example.com"); got.Addr != cfg.PublicAddr {
		t.Errorf("with PublicAddr: told %+v", got)
	}

	// A host alone (an IPv6 address as Kubernetes substitutes $(POD_IP):
	// no brackets) gets the bound port.
	r.StopEdge(0)
	cfg = r.EdgeConfig(0)
	cfg.AdminAddr = "127.0.0.1:0"
	cfg.PublicAddr = "2001:db8::1"
	e = r.StartEdgeWith(0, cfg)
	_, port, _ = net.SplitHostPort(e.Addr())
	if got, want := info("relay.example.com").Addr, "[2001:db8::1]:"+port; got != want {
		t.Errorf("with PublicAddr %q: told %q, want %q", cfg.PublicAddr, got, want)
	}
	r.StopEdge(0)
	cfg = r.EdgeConfig(0)
	cfg.PublicAddr = "2001:db8::1]:443"
	if s, err := server.Start(context.Background(), cfg); err == nil || !strings.Contains(err.Error(), "public address") {
		if err == nil {
			_ = s.Shutdown(context.Background())
		}
		t.Errorf("with PublicAddr %q: %v, want an error naming it", cfg.PublicAddr, err)
	}
}
