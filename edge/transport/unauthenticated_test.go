package transport_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/quic-go/webtransport-go"

	"github.com/edge-relay/relay/edge/devconn"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/edge/transport"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// reapTimeout is the handshake (and so the stream) timeout of the relays
// below.
const reapTimeout = time.Second

// dialH3 opens an HTTP/3 connection to addr, closed at the test's end.
func dialH3(ctx context.Context, t *testing.T, addr string) *quic.Conn {
	t.Helper()
	tlsConf := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{http3.NextProtoH3}, MinVersion: tls.VersionTLS13} //nolint:gosec // a hostile client
	conn, err := quic.DialAddr(ctx, addr, tlsConf, devconn.QUICConfig(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.CloseWithError(0, "") })
	return conn
}

// untilReaped opens an HTTP/3 connection to a fresh edge and calls do
// with it every fifth of reapTimeout, none of which may keep it: it
// returns once the edge closes the connection with TIMEOUT, and fails
// if it is still open 30 s on.
func untilReaped(t *testing.T, do func(ctx context.Context, conn *quic.Conn, addr string, i int)) {
	t.Helper()
	r := startRelay(t, 1, func(_ int, cfg *server.Config) { cfg.Session.HandshakeTimeout = reapTimeout })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn := dialH3(ctx, t, r.Edges[0].Addr())
	opened := time.Now()
	tick := time.NewTicker(reapTimeout / 5)
	defer tick.Stop()
	for i := 0; ; i++ {
		dctx, dcancel := context.WithTimeout(ctx, reapTimeout/5)
		do(dctx, conn, r.Edges[0].Addr(), i)
		dcancel()
		select {
		case <-conn.Context().Done():
			var ae *quic.ApplicationError
			if err := context.Cause(conn.Context()); !errors.As(err, &ae) || ae.ErrorCode != quic.ApplicationErrorCode(relayv1.ErrorCode_ERROR_CODE_TIMEOUT) {
				t.Fatalf("the connection ended with %v, want the edge's TIMEOUT", err)
			}
			return
		case <-ctx.Done():
			t.Fatalf("the connection was still open after %v", time.Since(opened))
		case <-tick.C:
		}
	}
}

// An HTTP/3 connection is closed once it has carried no WebTransport
// session for the handshake timeout, however many requests it sends that
// do not become one: plain GETs of the session path (refused upgrades)
// and of other paths. Anybody can send those, without an account; they
// kept the connection open for as long as they came.
func TestRequestsWithoutASessionDoNotKeepAConnection(t *testing.T) {
	var cc *http3.ClientConn
	untilReaped(t, func(ctx context.Context, conn *quic.Conn, addr string, i int) {
		if cc == nil {
			cc = (&http3.Transport{}).NewClientConn(conn)
		}
		// Alternating the two paths.
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+addr+[]string{devconn.WebTransportPath, "/"}[i%2], nil)
		if err != nil {
			t.Fatal(err)
		}
		if resp, err := cc.RoundTrip(req); err == nil {
			_ = resp.Body.Close()
		}
	})
}

// Nor do WebTransport sessions that never open their stream: each is
// closed after the stream timeout, and a fresh one before the
// connection's reap (a client could hold the connection that way, never
// reaching the hub's limits) does not postpone it.
func TestSessionsWithoutAStreamDoNotKeepAConnection(t *testing.T) {
	var cc *webtransport.ClientConn
	untilReaped(t, func(ctx context.Context, conn *quic.Conn, addr string, _ int) {
		if cc == nil {
			var err error
			if cc, err = (&webtransport.Transport{}).NewClientConn(conn); err != nil {
				t.Fatal(err)
			}
		}
		if _, sess, err := cc.Dial(ctx, "https://"+addr+devconn.WebTransportPath, nil); err == nil {
			t.Cleanup(func() { _ = sess.CloseWithError(0, "") })
		}
	})
}

// WebSocket pings get no pong: the protocol's keep-alive is its own Ping
// frame, and answering every 6-byte ping with a record of its own let a
// peer that had not even sent a Hello make the edge write at its will.
func TestWebSocketPingsAreNotAnswered(t *testing.T) {
	r := startRelay(t, 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}} //nolint:gosec // a hostile client
	defer hc.CloseIdleConnections()
	ws, _, err := websocket.Dial(ctx, "wss://"+r.Edges[0].Addr()+devconn.WebSocketPath, &websocket.DialOptions{HTTPClient: hc})
	if err != nil {
		t.Fatal(err)
	}
	defer ws.CloseNow()
	readCtx := ws.CloseRead(ctx) // reads control frames (a pong) in the background
	pingCtx, stop := context.WithTimeout(readCtx, 2*time.Second)
	defer stop()
	if err := ws.Ping(pingCtx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a ping: %v, want no pong (deadline exceeded)", err)
	}
}

// The device port reads at most MaxHeaderBytes of an HTTP/3 request's
// headers (a WebTransport CONNECT's; http3 took net/http's 1 MiB) and
// refuses a larger block before any handler: it stops the stream's
// sending (H3_EXCESSIVE_LOAD), which fails a client still writing it,
// and answers 431. Anybody can send one, without an account.
func TestOversizedConnectHeadersAreRefused(t *testing.T) {
	r := startRelay(t, 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn := dialH3(ctx, t, r.Edges[0].Addr())
	cc, err := (&webtransport.Transport{}).NewClientConn(conn)
	if err != nil {
		t.Fatal(err)
	}
	connect := func(size int) (*http.Response, error) {
		resp, sess, err := cc.Dial(ctx, "https://"+r.Edges[0].Addr()+devconn.WebTransportPath, http.Header{"X-Padding": {strings.Repeat("x", size)}})
		if sess != nil {
			_ = sess.CloseWithError(0, "")
		}
		return resp, err
	}
	// Headers within the bound open a session.
	if resp, err := connect(transport.MaxHeaderBytes / 2); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT with %d KiB of headers: %v, %v; want a session", transport.MaxHeaderBytes/2>>10, resp, err)
	}
	resp, err := connect(2 * transport.MaxHeaderBytes)
	var h3err *http3.Error
	switch {
	case resp != nil && resp.StatusCode == http.StatusRequestHeaderFieldsTooLarge:
	case errors.As(err, &h3err) && h3err.Remote && h3err.ErrorCode == http3.ErrCodeExcessiveLoad:
	default:
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		t.Fatalf("CONNECT with %d KiB of headers: status %d, %v; want 431 or H3_EXCESSIVE_LOAD", 2*transport.MaxHeaderBytes>>10, status, err)
	}
}

// rawWebSocket upgrades a TLS connection to the edge's WebSocket path by
// hand, for a client that writes frames the library would not.
func rawWebSocket(ctx context.Context, t *testing.T, addr string) (*tls.Conn, *bufio.Reader) {
	t.Helper()
	conn, err := (&tls.Dialer{Config: &tls.Config{InsecureSkipVerify: true}}).DialContext(ctx, "tcp", addr) //nolint:gosec // a hostile client
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	if _, err := fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", devconn.WebSocketPath, addr); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v, %v", resp, err)
	}
	return conn.(*tls.Conn), br
}

// closeCode reads server frames until a close frame, and returns its code.
func closeCode(t *testing.T, br *bufio.Reader) int {
	t.Helper()
	for {
		var h [2]byte
		if _, err := io.ReadFull(br, h[:]); err != nil {
			t.Fatalf("reading for a close frame: %v", err)
		}
		n := uint64(h[1] & 0x7f)
		switch n {
		case 126:
			var l [2]byte
			if _, err := io.ReadFull(br, l[:]); err != nil {
				t.Fatal(err)
			}
			n = uint64(binary.BigEndian.Uint16(l[:]))
		case 127:
			var l [8]byte
			if _, err := io.ReadFull(br, l[:]); err != nil {
				t.Fatal(err)
			}
			n = binary.BigEndian.Uint64(l[:])
		}
		payload := make([]byte, min(n, 1<<20))
		if _, err := io.ReadFull(br, payload); err != nil {
			t.Fatal(err)
		}
		if h[0]&0x0f == 8 {
			if len(payload) < 2 {
				return 0
			}
			return int(binary.BigEndian.Uint16(payload))
		}
	}
}

// A peer's WebSocket pings and pongs are bounded by their number, not
// only by the bytes they carry: each costs the edge some microseconds
// for 6 bytes of the peer's, so a flood of them (before any Hello, or
// within a device's byte budget) kept a core busy. A few pass (here
// followed by a text message, refused as such); a flood ends the
// connection with RATE_LIMITED.
func TestWebSocketControlFrameFloodsAreRefused(t *testing.T) {
	r := startRelay(t, 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	frames := func(n int, last ...byte) []byte {
		var b []byte
		for i := range n {
			op := byte(0x89) // ping
			if i%2 == 1 {
				op = 0x8a // pong
			}
			b = append(b, op, 0x80, 1, 2, 3, 4) // empty, masked
		}
		return append(b, last...)
	}
	for _, c := range []struct {
		name string
		send []byte
		want relayv1.ErrorCode
	}{
		{"a few, then a text message", frames(10, 0x81, 0x81, 1, 2, 3, 4, 'x'^1), relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME},
		{"a flood", frames(2000), relayv1.ErrorCode_ERROR_CODE_RATE_LIMITED},
	} {
		t.Run(c.name, func(t *testing.T) {
			conn, br := rawWebSocket(ctx, t, r.Edges[0].Addr())
			if _, err := conn.Write(c.send); err != nil {
				t.Fatal(err)
			}
			if got := closeCode(t, br); got != devconn.WebSocketCloseBase+int(c.want) {
				t.Fatalf("close code %d, want %d (%s)", got, devconn.WebSocketCloseBase+int(c.want), c.want)
			}
		})
	}
}

// A WebSocket message must arrive whole within the frame timeout of its
// first bytes, as a frame must on QUIC: a peer that sends part of one and
// stops is cut off with TIMEOUT then, not only once the idle or the
// handshake timeout (here minutes) passes. The frame reader cannot see
// it, as the WebSocket layer hands over whole messages only.
func TestAHalfSentWebSocketMessageTimesOut(t *testing.T) {
	r := startRelay(t, 1, func(_ int, cfg *server.Config) {
		cfg.IdleTimeout, cfg.Session.HandshakeTimeout = 10*time.Minute, 10*time.Minute
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn, br := rawWebSocket(ctx, t, r.Edges[0].Addr())
	// A binary message of 100 bytes, masked, of which 10 are sent.
	half := append([]byte{0x82, 0x80 | 100, 1, 2, 3, 4}, make([]byte, 10)...)
	if _, err := conn.Write(half); err != nil {
		t.Fatal(err)
	}
	if got, want := closeCode(t, br), devconn.WebSocketCloseBase+int(relayv1.ErrorCode_ERROR_CODE_TIMEOUT); got != want {
		t.Fatalf("close code %d, want %d (TIMEOUT)", got, want)
	}
}

// A breach of the WebSocket protocol ends the connection with a code a
// client reads as MALFORMED_FRAME: an unmasked frame with the edge's own
// close (the WebSocket layer sends none), reserved bits or an unknown
// opcode with the layer's 1002.
func TestWebSocketProtocolBreachesAreTyped(t *testing.T) {
	r := startRelay(t, 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, c := range []struct {
		name string
		send []byte
		want int
	}{
		{"unmasked", []byte{0x82, 0x01, 'x'}, devconn.WebSocketCloseBase + int(relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME)},
		{"reserved bits", []byte{0xa2, 0x81, 1, 2, 3, 4, 'x' ^ 1}, int(websocket.StatusProtocolError)},
		{"unknown opcode", []byte{0x83, 0x81, 1, 2, 3, 4, 'x' ^ 1}, int(websocket.StatusProtocolError)},
	} {
		t.Run(c.name, func(t *testing.T) {
			conn, br := rawWebSocket(ctx, t, r.Edges[0].Addr())
			if _, err := conn.Write(c.send); err != nil {
				t.Fatal(err)
			}
			got := closeCode(t, br)
			if got != c.want {
				t.Fatalf("close code %d, want %d", got, c.want)
			}
			code, _, ok := devconn.WebSocketCode(websocket.CloseError{Code: websocket.StatusCode(got)})
			if !ok || code != relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME {
				t.Fatalf("close code %d reads as %s (%v), want MALFORMED_FRAME", got, code, ok)
			}
		})
	}
}
