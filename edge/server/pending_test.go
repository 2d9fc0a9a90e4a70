package server_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/devconn"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/internal/relaytest"
)

// The HTTPS port holds at most MaxPendingHTTPS connections that are not
// an admitted device session; at the bound the oldest is closed.
// Connections that anyone can open and keep (here idle between requests,
// which the idle timeout would end only after ten minutes) cannot keep a
// WebSocket device out; a WebSocket counts until its session is admitted
// (one upgraded that never authenticates still does), and the count
// comes back to zero once they are gone.
func TestHTTPSBoundsPendingConnections(t *testing.T) {
	const limit = 4
	r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
		cfg.MaxPendingHTTPS = limit
		cfg.HTTPIdleTimeout = 10 * time.Minute
	}})
	e := r.Edges[0]
	addr := strings.TrimPrefix(e.HTTPSURL(), "https://")
	pending := func() float64 { return relaytest.Gauge(t, e, "relay_edge_https_pending_connections", "", "") }
	evicted := func() float64 { return relaytest.Counter(t, e, "relay_edge_https_pending_evicted_total", "", "") }
	waitPending := func(n float64) {
		t.Helper()
		clustertest.Eventually(t, 30*time.Second, func() error {
			if got := pending(); got != n {
				return fmt.Errorf("%v pending connections, want %v", got, n)
			}
			return nil
		})
	}

	idle := func() *tls.Conn { t.Helper(); return idleHTTPS(t, addr, "127.0.0.1") }
	closedByTheEdge := func(c *tls.Conn, what string) { t.Helper(); closedByEdge(t, c, what) }

	var conns []*tls.Conn
	for i := range limit {
		conns = append(conns, idle())
		waitPending(float64(i + 1))
	}
	conns = append(conns, idle())
	closedByTheEdge(conns[0], "the oldest idle connection, at the bound")
	waitPending(limit)
	if n := evicted(); n != 1 {
		t.Fatalf("%v evictions, want 1", n)
	}

	// A WebSocket device gets through, and once upgraded it is a session.
	u := r.User("pending")
	a, b := r.Device(u, "a"), r.Device(u, "b")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ws, err := client.Dial(ctx, r.ClientConfig(0, a, client.WebSocket))
	if err != nil {
		t.Fatalf("a WebSocket device while the HTTPS port is at its bound: %v", err)
	}
	defer ws.Close()
	closedByTheEdge(conns[1], "the next oldest, for the device")
	waitPending(limit - 1)
	qc, err := client.Dial(ctx, r.ClientConfig(0, b, client.QUIC))
	if err != nil {
		t.Fatal(err)
	}
	defer qc.Close()
	if err := ws.Send(ctx, client.Message{Targets: []string{b.ID}, Payload: []byte("through")}); err != nil {
		t.Fatal(err)
	}
	if ev, err := qc.Receive(ctx); err != nil || string(ev.Payload) != "through" {
		t.Fatalf("b got %+v, %v", ev, err)
	}

	// Upgraded, and silent: still pending, until the session handshake's
	// timeout or the bound closes it.
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}} //nolint:gosec // a hostile client
	defer hc.CloseIdleConnections()
	raw, _, err := websocket.Dial(ctx, "wss://"+addr+devconn.WebSocketPath, &websocket.DialOptions{HTTPClient: hc})
	if err != nil {
		t.Fatal(err)
	}
	defer raw.CloseNow()
	waitPending(limit)

	for _, c := range conns {
		_ = c.Close()
	}
	raw.CloseNow()
	waitPending(0)
	if err := ws.Err(); err != nil {
		t.Fatalf("the WebSocket session ended: %v", err)
	}
}

// idleHTTPS opens a connection to addr from the local address from, asks
// for /healthz and leaves it idle (HTTP/1.1 keep-alive).
func idleHTTPS(t *testing.T, addr, from string) *tls.Conn {
	t.Helper()
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
	c, err := tls.DialWithDialer(d, "tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	askHealth(t, c)
	return c
}

// askHealth sends GET /healthz on c and reads the answer.
func askHealth(t *testing.T, c *tls.Conn) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /healthz: %s", resp.Status)
	}
}

// closedByEdge reads c until the edge closes it (within 30 s).
func closedByEdge(t *testing.T, c *tls.Conn, what string) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	if got, err := io.ReadAll(c); (err != nil && !errors.Is(err, syscall.ECONNRESET)) || len(got) != 0 {
		t.Fatalf("%s: read %q, %v; want it closed", what, got, err)
	}
}

// One source holds at most a sixteenth of the bound (and at least 16):
// a flood from one host closes its own oldest connections, not another
// host's, even one older than all of them.
func TestHTTPSBoundsPendingConnectionsPerSource(t *testing.T) {
	const limit, share, flood = 64, 16, 20
	r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
		cfg.MaxPendingHTTPS = limit
		cfg.HTTPIdleTimeout = 10 * time.Minute
	}})
	e := r.Edges[0]
	addr := strings.TrimPrefix(e.HTTPSURL(), "https://")
	other := idleHTTPS(t, addr, "127.0.0.2")
	var conns []*tls.Conn
	for range flood {
		conns = append(conns, idleHTTPS(t, addr, "127.0.0.1"))
	}
	for i := range flood - share {
		closedByEdge(t, conns[i], fmt.Sprintf("the flood's connection %d, beyond its share", i))
	}
	if n := relaytest.Counter(t, e, "relay_edge_https_pending_evicted_total", "", ""); n != flood-share {
		t.Fatalf("%v evictions, want %d", n, flood-share)
	}
	askHealth(t, other) // the other host's, the oldest of all, still answers
	askHealth(t, conns[flood-1])
}
