package server_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/edge-relay/relay/edge/controlconn"
	"github.com/edge-relay/relay/edge/server"
)

// startLoneEdge starts an edge with no control plane to reach (its HTTPS
// port serves all the same), killed when the test ends.
func startLoneEdge(t *testing.T, cfg server.Config) *server.Server {
	t.Helper()
	cfg.Addr = "127.0.0.1:0"
	cfg.Control = controlconn.Config{URLs: []string{"http://127.0.0.1:1"}, Login: "edges", Password: "x"}
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	s, err := server.Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Kill)
	return s
}

// The public HTTPS port closes connections that go silent: an HTTP/1.1
// keep-alive connection after its request, and an HTTP/2 connection
// after its preface, are closed once HTTPIdleTimeout passes, instead of
// each holding a descriptor and goroutines for good.
func TestHTTPSClosesIdleConnections(t *testing.T) {
	s := startLoneEdge(t, server.Config{EdgeID: "idle", HTTPIdleTimeout: 300 * time.Millisecond})
	addr := strings.TrimPrefix(s.HTTPSURL(), "https://")

	// HTTP/1.1: one request, then silence.
	c1, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c1.Close()
	if _, err := c1.Write([]byte("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c1)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()

	// HTTP/2: the preface and an empty SETTINGS frame, then silence.
	c2, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if p := c2.ConnectionState().NegotiatedProtocol; p != "h2" {
		t.Fatalf("negotiated %q, want h2", p)
	}
	if _, err := c2.Write(append([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), 0, 0, 0, 4, 0, 0, 0, 0, 0)); err != nil {
		t.Fatal(err)
	}

	// Both end from the server's side (EOF or a reset), well before the
	// generous deadline; a read that times out means still open.
	for name, r := range map[string]io.Reader{"HTTP/1.1": br, "HTTP/2": c2} {
		conn := map[string]*tls.Conn{"HTTP/1.1": c1, "HTTP/2": c2}[name]
		_ = conn.SetReadDeadline(time.Now().Add(30 * time.Second))
		_, err := io.Copy(io.Discard, r)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("%s connection idle for 30s is still open", name)
		}
	}
}
