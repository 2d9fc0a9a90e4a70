package devconn

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1" //nolint:gosec // the WebSocket handshake's accept key
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/quic-go/webtransport-go"
	"go.uber.org/goleak"

	"github.com/edge-relay/relay/edge/proof"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// pair is the two ends of one connection: what the edge adapts (server)
// and what the Go client adapts (client).
type pair struct {
	server, client Conn
	// clientQUIC is the client's QUIC connection under a WebTransport
	// session.
	clientQUIC *quic.Conn
}

// testTLS returns a server configuration with a fresh self-signed
// certificate for 127.0.0.1 and a client configuration that trusts it.
func testTLS(t *testing.T, proto string) (server, client *tls.Config) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, NextProtos: []string{proto}, MinVersion: tls.VersionTLS13},
		&tls.Config{RootCAs: pool, NextProtos: []string{proto}, MinVersion: tls.VersionTLS13}
}

// waitClosed waits until ch is closed: what failed if it is not soon.
func waitClosed(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(30 * time.Second):
		t.Fatal(what)
	}
}

// accepted waits for the server end.
func accepted(t *testing.T, ch <-chan Conn) Conn {
	t.Helper()
	select {
	case c := <-ch:
		return c
	case <-time.After(30 * time.Second):
		t.Fatal("the server end never came")
		return nil
	}
}

func quicPair(t *testing.T) pair {
	t.Helper()
	stls, ctls := testTLS(t, ALPN)
	ln, err := quic.ListenAddr("127.0.0.1:0", stls, QUICConfig(30*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	got := make(chan Conn, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		qc, err := ln.Accept(ctx)
		if err != nil {
			return
		}
		str, err := qc.AcceptStream(ctx)
		if err != nil {
			_ = qc.CloseWithError(0, "")
			return
		}
		got <- NewQUICConn(qc, str)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	qc, err := quic.DialAddr(ctx, ln.Addr().String(), ctls, QUICConfig(30*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	str, err := qc.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	client := NewQUICConn(qc, str)
	// A stream is announced to the peer by its first bytes.
	if _, err := str.Write([]byte{0}); err != nil {
		t.Fatal(err)
	}
	p := pair{server: accepted(t, got), client: client}
	readExactly(t, p.server, []byte{0})
	t.Cleanup(func() { _ = p.client.Abort(0, ""); _ = p.server.Abort(0, "") })
	return p
}

func webTransportPair(t *testing.T) pair {
	t.Helper()
	stls, ctls := testTLS(t, http3.NextProtoH3)
	udp, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan Conn, 1)
	mux := http.NewServeMux()
	srv := &webtransport.Server{H3: &http3.Server{Handler: mux, TLSConfig: stls, QUICConfig: QUICConfig(30 * time.Second)}}
	mux.HandleFunc(WebTransportPath, func(w http.ResponseWriter, r *http.Request) {
		sess, err := srv.Upgrade(w, r)
		if err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		str, err := sess.AcceptStream(ctx)
		if err != nil {
			_ = sess.CloseWithError(0, "")
			return
		}
		got <- NewWebTransportConn(sess, str)
	})
	served := make(chan struct{})
	go func() { defer close(served); _ = srv.Serve(udp) }()
	t.Cleanup(func() { _ = srv.Close(); _ = udp.Close(); <-served })
	var qconn *quic.Conn
	d := &webtransport.Transport{TLSClientConfig: ctls, QUICConfig: QUICConfig(30 * time.Second),
		DialAddr: func(ctx context.Context, addr string, tc *tls.Config, qc *quic.Config) (*quic.Conn, error) {
			c, err := quic.DialAddrEarly(ctx, addr, tc, qc)
			qconn = c
			return c, err
		}}
	t.Cleanup(func() { _ = d.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, sess, err := d.Dial(ctx, "https://"+udp.LocalAddr().String()+WebTransportPath, nil)
	if err != nil {
		t.Fatal(err)
	}
	str, err := sess.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := str.Write([]byte{0}); err != nil {
		t.Fatal(err)
	}
	p := pair{server: accepted(t, got), client: NewWebTransportConn(sess, str), clientQUIC: qconn}
	readExactly(t, p.server, []byte{0})
	t.Cleanup(func() { _ = p.client.Abort(0, ""); _ = p.server.Abort(0, "") })
	return p
}

// webSocketServer serves WebSockets on a test HTTP server, over TLS
// with serverTLS (plain HTTP without), and hands each server end over on
// got; url is the server's http:// or https:// URL.
func webSocketServer(t *testing.T, serverTLS *tls.Config) (url string, got <-chan Conn) {
	t.Helper()
	ch := make(chan Conn, 1)
	done := make(chan struct{})
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, raw, err := AcceptWebSocket(w, r, nil)
		if err != nil {
			return
		}
		ch <- NewWebSocketConn(ws, raw, r.TLS, nil, WebSocketLimits{Idle: time.Minute, MaxFrame: 1 << 20})
		<-done // the handler's return would end the connection
	}))
	if serverTLS != nil {
		srv.TLS = serverTLS
		srv.StartTLS()
	} else {
		srv.Start()
	}
	t.Cleanup(func() { close(done); srv.Close() })
	return srv.URL, ch
}

func webSocketPair(t *testing.T) pair {
	t.Helper()
	stls, ctls := testTLS(t, "http/1.1")
	url, got := webSocketServer(t, stls)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tr := &http.Transport{TLSClientConfig: ctls}
	dialed := RecordDials(tr)
	t.Cleanup(tr.CloseIdleConnections)
	ws, resp, err := websocket.Dial(ctx, "wss"+strings.TrimPrefix(url, "https"), &websocket.DialOptions{HTTPClient: &http.Client{Transport: tr}})
	if err != nil {
		t.Fatal(err)
	}
	p := pair{server: accepted(t, got), client: NewWebSocketConn(ws, dialed(), resp.TLS, nil, WebSocketLimits{Idle: time.Minute, MaxFrame: 1 << 20})}
	t.Cleanup(func() { _ = p.client.Abort(0, ""); _ = p.server.Abort(0, "") })
	return p
}

var pairs = []struct {
	name      string
	make      func(*testing.T) pair
	datagrams bool
}{
	{"quic", quicPair, true},
	{"webtransport", webTransportPair, true},
	{"websocket", webSocketPair, false},
}

// framed is body with its uvarint length prefix: the session stream's
// unit (a WebSocket carries one per message).
func framed(body []byte) []byte {
	return append(binary.AppendUvarint(nil, uint64(len(body))), body...)
}

func readExactly(t *testing.T, c Conn, want []byte) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read %q, want %q", got, want)
	}
	_ = c.SetReadDeadline(time.Time{})
}

// Every transport carries the session stream both ways, in order, and
// frames of any size the stream takes, in one write or in pieces.
func TestTheStreamCarriesFramesBothWays(t *testing.T) {
	for _, tc := range pairs {
		t.Run(tc.name, func(t *testing.T) {
			p := tc.make(t)
			big := framed(bytes.Repeat([]byte("x"), 200<<10))
			hello := framed([]byte("hello"))
			if _, err := p.client.Write(append(append([]byte{}, hello...), big...)); err != nil {
				t.Fatal(err)
			}
			readExactly(t, p.server, append(append([]byte{}, hello...), big...))
			// A frame written in two pieces arrives whole.
			back := framed([]byte("welcome back"))
			if _, err := p.server.Write(back[:3]); err != nil {
				t.Fatal(err)
			}
			if _, err := p.server.Write(back[3:]); err != nil {
				t.Fatal(err)
			}
			readExactly(t, p.client, back)
			if p.server.Transport() != tc.name || p.client.Transport() != tc.name {
				t.Fatalf("transports %q and %q", p.server.Transport(), p.client.Transport())
			}
		})
	}
}

// Both ends of a connection, on every transport, see the same channel
// binding, and another connection has another: version 2 of the protocol
// signs it, so a proof made on one connection fails on any other.
func TestBothEndsShareTheChannelBinding(t *testing.T) {
	for _, tc := range pairs {
		t.Run(tc.name, func(t *testing.T) {
			p, q := tc.make(t), tc.make(t)
			b := p.server.ChannelBinding()
			if len(b) != proof.BindingSize {
				t.Fatalf("the edge's end has a binding of %d bytes", len(b))
			}
			if !bytes.Equal(b, p.client.ChannelBinding()) {
				t.Fatalf("the ends disagree: %x / %x", b, p.client.ChannelBinding())
			}
			if bytes.Equal(b, q.server.ChannelBinding()) || bytes.Equal(b, q.client.ChannelBinding()) {
				t.Fatal("two connections have one binding")
			}
		})
	}
	// A WebSocket whose TLS does not end here has none.
	url, got := webSocketServer(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(url, "http"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.CloseNow()
	edge := accepted(t, got)
	defer edge.Abort(0, "")
	if b := edge.ChannelBinding(); b != nil {
		t.Fatalf("a WebSocket over plain HTTP has a binding: %x", b)
	}
}

// A read deadline fails a blocked Read with a timeout, and the
// connection goes on once it is moved: the session core's frame and idle
// timers rely on both.
func TestAReadDeadlineTimesOutAndTheConnectionGoesOn(t *testing.T) {
	for _, tc := range pairs {
		t.Run(tc.name, func(t *testing.T) {
			p := tc.make(t)
			_ = p.server.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			_, err := p.server.Read(make([]byte, 16))
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() {
				t.Fatalf("read past the deadline: %v, want a timeout", err)
			}
			after := framed([]byte("after the deadline"))
			if _, err := p.client.Write(after); err != nil {
				t.Fatal(err)
			}
			readExactly(t, p.server, after)
		})
	}
}

// QUIC and WebTransport carry datagrams; one too large for a packet, and
// any on a WebSocket, is ErrNoDatagrams, so the caller uses the stream.
func TestDatagrams(t *testing.T) {
	for _, tc := range pairs {
		t.Run(tc.name, func(t *testing.T) {
			p := tc.make(t)
			if err := p.client.SendDatagram(make([]byte, 4000)); !errors.Is(err, ErrNoDatagrams) {
				t.Fatalf("a 4000-byte datagram: %v, want ErrNoDatagrams", err)
			}
			if !tc.datagrams {
				if err := p.client.SendDatagram([]byte("d")); !errors.Is(err, ErrNoDatagrams) {
					t.Fatalf("send: %v, want ErrNoDatagrams", err)
				}
				if _, err := p.server.ReceiveDatagram(context.Background()); !errors.Is(err, ErrNoDatagrams) {
					t.Fatalf("receive: %v, want ErrNoDatagrams", err)
				}
				return
			}
			// Datagrams may be lost: send until one arrives.
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			got := make(chan []byte, 1)
			go func() {
				b, err := p.server.ReceiveDatagram(ctx)
				if err == nil {
					got <- b
				}
				close(got)
			}()
			tick := time.NewTicker(20 * time.Millisecond)
			defer tick.Stop()
			for {
				if err := p.client.SendDatagram([]byte("a datagram")); err != nil {
					t.Fatal(err)
				}
				select {
				case b, ok := <-got:
					if !ok || string(b) != "a datagram" {
						t.Fatalf("received %q (%v)", b, ok)
					}
					return
				case <-tick.C:
				}
			}
		})
	}
}

// Close finishes the stream, so what was written before it arrives, and
// the peer learns the code: on QUIC and WebTransport once it hangs up (or
// the close wait ends), on a WebSocket in the close frame. Abort ends a
// blocked Read on the other side with the code.
func TestCloseAndAbortCarryTheCode(t *testing.T) {
	for _, tc := range pairs {
		t.Run(tc.name, func(t *testing.T) {
			p := tc.make(t)
			last := framed([]byte("the last frame"))
			if _, err := p.server.Write(last); err != nil {
				t.Fatal(err)
			}
			closed := make(chan struct{})
			go func() {
				defer close(closed)
				_ = p.server.Close(relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, "shutting down")
			}()
			readExactly(t, p.client, last)
			_ = p.client.SetReadDeadline(time.Now().Add(30 * time.Second))
			_, err := p.client.Read(make([]byte, 16))
			if err == nil {
				t.Fatal("a read after the peer's Close succeeded")
			}
			if tc.name == "websocket" {
				if code, msg, ok := PeerCode(err); !ok || code != relayv1.ErrorCode_ERROR_CODE_GOING_AWAY || msg != "shutting down" {
					t.Fatalf("read error %v: code %v %q %v", err, code, msg, ok)
				}
			} else if !errors.Is(err, io.EOF) {
				t.Fatalf("read after the stream's end: %v, want EOF", err)
			}
			// The device hangs up, as clients do on a Close frame; the
			// edge's Close returns then.
			_ = p.client.Close(relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, "")
			waitClosed(t, closed, "Close did not return")
		})
		t.Run(tc.name+"/abort", func(t *testing.T) {
			p := tc.make(t)
			failed := make(chan error, 1)
			go func() {
				_, err := p.client.Read(make([]byte, 16))
				failed <- err
			}()
			if err := p.server.Abort(relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER, "too slow"); err != nil && tc.name != "websocket" {
				t.Fatal(err)
			}
			select {
			case err := <-failed:
				if tc.name == "websocket" {
					// CloseNow sends no close frame: the reader sees the
					// connection end, with no code.
					if err == nil {
						t.Fatal("read succeeded after Abort")
					}
					return
				}
				if code, msg, ok := PeerCode(err); !ok || code != relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER || msg != "too slow" {
					t.Fatalf("read error %v: code %v %q %v", err, code, msg, ok)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("a blocked Read outlived the peer's Abort")
			}
		})
	}
}

// A WebSocket's close reason is cut to what a close frame holds at a
// character's start: a browser fails a connection whose reason is not
// valid UTF-8, and loses the code with it. (A revocation's reason may
// come from an operator, in any language.)
func TestAWebSocketCloseReasonStaysUTF8(t *testing.T) {
	p := webSocketPair(t)
	reason := "a" + strings.Repeat("ü", 100) // 201 bytes, each ü two: byte 120 is inside one
	failed := make(chan error, 1)
	go func() {
		_, err := p.client.Read(make([]byte, 16))
		failed <- err
	}()
	closed := make(chan struct{})
	go func() {
		defer close(closed)
		_ = p.server.Close(relayv1.ErrorCode_ERROR_CODE_REVOKED, reason)
	}()
	select {
	case err := <-failed:
		code, msg, ok := PeerCode(err)
		if !ok || code != relayv1.ErrorCode_ERROR_CODE_REVOKED || !utf8.ValidString(msg) || !strings.HasPrefix(reason, msg) || len(msg) < 100 {
			t.Fatalf("read error %v: code %v, reason of %d bytes %q (valid UTF-8 %v); want REVOKED and the reason cut at a character", err, code, len(msg), msg, utf8.ValidString(msg))
		}
	case <-time.After(30 * time.Second):
		t.Fatal("a blocked Read outlived the peer's Close")
	}
	_ = p.client.Close(relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, "")
	waitClosed(t, closed, "Close did not return")
}

// When the peer closes a WebTransport session, webtransport-go fails the
// session's streams with its error and then closes the QUIC connection
// under it (H3_NO_ERROR, local). A Read blocked at that moment may wake
// to the connection's error first (quic-go checks it before the stream's
// cancellation), which carries no code; the adapter answers with the
// session's error, which does. The race is too narrow to force through a
// Read (about 1 in 200 aborts under -race), so this hands the adapter the
// connection's very error once the session has ended.
func TestWebTransportKeepsThePeersCodeWhenItsConnectionEndsFirst(t *testing.T) {
	p := webTransportPair(t)
	if err := p.server.Abort(relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER, "too slow"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.clientQUIC.Context().Done():
	case <-time.After(30 * time.Second):
		t.Fatal("the client's QUIC connection outlived its only session")
	}
	connErr := context.Cause(p.clientQUIC.Context())
	if _, _, ok := PeerCode(connErr); ok || connErr == nil {
		t.Fatalf("the connection's own error %v carries a code: nothing to test", connErr)
	}
	got := p.client.(*wtConn).sessionErr(connErr)
	if code, msg, ok := PeerCode(got); !ok || code != relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER || msg != "too slow" {
		t.Fatalf("a stream error %v became %v: code %v %q %v", connErr, got, code, msg, ok)
	}
	// An error of a session that goes on is left as it is.
	q := webTransportPair(t)
	timeout := errors.New("not the session's")
	if got := q.client.(*wtConn).sessionErr(timeout); got != timeout {
		t.Fatalf("an error of a live session became %v", got)
	}
	if _, err := q.client.Write(framed([]byte("still there"))); err != nil {
		t.Fatal(err)
	}
	readExactly(t, q.server, framed([]byte("still there")))
}

// Linger (the client's, after its goodbye) finishes the stream and
// waits for the peer to hang up, however long it takes to read what was
// written (a megabyte here, much of it unsent when Linger begins); it
// returns once the peer has, or once its context ends.
func TestLingerWaitsForThePeer(t *testing.T) {
	for _, tc := range pairs[:2] { // a WebSocket's close handshake does this itself
		t.Run(tc.name, func(t *testing.T) {
			p := tc.make(t)
			l, ok := p.client.(interface{ Linger(context.Context) })
			if !ok {
				t.Fatalf("%T has no Linger", p.client)
			}
			payload := framed(bytes.Repeat([]byte("y"), 1<<20))
			wrote := make(chan error, 1)
			go func() {
				_, err := p.client.Write(payload)
				wrote <- err
			}()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			lingered := make(chan struct{})
			go func() {
				defer close(lingered)
				if err := <-wrote; err != nil {
					t.Errorf("write: %v", err)
				}
				l.Linger(ctx)
			}()
			readExactly(t, p.server, payload)
			_ = p.server.SetReadDeadline(time.Now().Add(30 * time.Second))
			if _, err := p.server.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
				t.Fatalf("after the client's Linger: %v, want EOF", err)
			}
			select {
			case <-lingered:
				t.Fatal("Linger returned before the peer hung up")
			default:
			}
			_ = p.server.Close(relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, "")
			waitClosed(t, lingered, "Linger did not return when the peer hung up")
		})
		t.Run(tc.name+"/context", func(t *testing.T) {
			p := tc.make(t)
			ctx, cancel := context.WithCancel(context.Background())
			lingered := make(chan struct{})
			go func() {
				defer close(lingered)
				p.client.(interface{ Linger(context.Context) }).Linger(ctx)
			}()
			// The peer never hangs up: the context ends the wait.
			cancel()
			waitClosed(t, lingered, "Linger outlived its context")
		})
	}
}

// A peer code of 0 is a goodbye, and errors of other kinds carry none.
func TestPeerCodeIgnoresOtherErrors(t *testing.T) {
	for _, err := range []error{
		io.EOF,
		errors.New("something else"),
		&quic.ApplicationError{Remote: true, ErrorCode: 0},
		&quic.ApplicationError{Remote: false, ErrorCode: 5},
		&webtransport.SessionError{Remote: true, ErrorCode: 0},
		websocket.CloseError{Code: websocket.StatusNormalClosure},
	} {
		if code, _, ok := PeerCode(err); ok {
			t.Errorf("PeerCode(%v) = %v, want none", err, code)
		}
	}
	if code, _, ok := PeerCode(websocket.CloseError{Code: websocket.StatusMessageTooBig}); !ok || code != relayv1.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE {
		t.Errorf("a WebSocket closed 1009: %v %v", code, ok)
	}
}

// A WebSocket peer that takes the edge's close frame but never answers
// it holds the edge's Close for closeWait (1 s), not for the WebSocket
// library's own waits of 5 s for its close frame's write and 5 s for the
// answer; and an Abort while such a Close waits ends it at once (the
// library's CloseNow only waited for it).
func TestWebSocketCloseWithASilentPeerIsBounded(t *testing.T) {
	for _, abort := range []bool{false, true} {
		t.Run(map[bool]string{false: "close", true: "abort during close"}[abort], func(t *testing.T) {
			url, got := webSocketServer(t, nil)
			// The peer upgrades by hand, then reads the close frame and
			// never answers it.
			peer, err := net.Dial("tcp", strings.TrimPrefix(url, "http://"))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = peer.Close() })
			_ = peer.SetDeadline(time.Now().Add(30 * time.Second))
			if _, err := io.WriteString(peer, "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
				"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"); err != nil {
				t.Fatal(err)
			}
			br := bufio.NewReader(peer)
			resp, err := http.ReadResponse(br, nil)
			if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
				t.Fatalf("upgrade: %v %v", resp, err)
			}
			edge := accepted(t, got)
			if abort {
				// Whatever the Close would wait, the Abort ends it.
				edge.(*wsConn).closeWait = time.Minute
			}
			start := time.Now()
			closed := make(chan struct{})
			go func() {
				defer close(closed)
				_ = edge.Close(relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, "bye")
			}()
			if b, err := br.ReadByte(); err != nil || b != 0x88 {
				t.Fatalf("first byte from the closing edge: %#x %v, want a close frame (0x88)", b, err)
			}
			if abort {
				aborted := make(chan struct{})
				go func() { defer close(aborted); _ = edge.Abort(relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER, "") }()
				waitClosed(t, aborted, "Abort did not return")
				waitClosed(t, closed, "Close did not return")
				// Generous against an Abort's few microseconds, short of
				// the library's 5 s.
				if took := time.Since(start); took > 4*time.Second {
					t.Fatalf("Close and Abort with a silent peer took %s", took)
				}
				return
			}
			waitClosed(t, closed, "Close did not return")
			// Generous against closeWait's 1 s, short of the library's 5 s.
			if took := time.Since(start); took > 4*time.Second {
				t.Fatalf("Close with a silent peer took %s", took)
			}
		})
	}
}

// The same bound for a client's Close: an edge that takes the client's
// close frame and never answers holds it for closeWait, not for the
// library's close handshake (the connection under the client's
// WebSocket, kept by RecordDials, is closed).
func TestWebSocketClientCloseWithASilentEdgeIsBounded(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	sawClose := make(chan error, 1)
	served := make(chan struct{})
	defer func() { _ = ln.Close(); <-served }()
	go func() {
		defer close(served)
		c, err := ln.Accept()
		if err != nil {
			sawClose <- err
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		br := bufio.NewReader(c)
		req, err := http.ReadRequest(br)
		if err != nil {
			sawClose <- err
			return
		}
		sum := sha1.Sum([]byte(req.Header.Get("Sec-WebSocket-Key") + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
		if _, err := io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
			"Sec-WebSocket-Accept: "+base64.StdEncoding.EncodeToString(sum[:])+"\r\n\r\n"); err != nil {
			sawClose <- err
			return
		}
		b, err := br.ReadByte()
		if err == nil && b != 0x88 {
			err = fmt.Errorf("first byte %#x, want a close frame (0x88)", b)
		}
		sawClose <- err
		// Then silence, until the client hangs up.
		_, _ = io.Copy(io.Discard, br)
	}()
	tr := &http.Transport{}
	dialed := RecordDials(tr)
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, "ws://"+ln.Addr().String(), &websocket.DialOptions{HTTPClient: &http.Client{Transport: tr}})
	if err != nil {
		t.Fatal(err)
	}
	defer ws.CloseNow() // ends the server's wait too, should the test fail first
	c := NewWebSocketConn(ws, dialed(), nil, nil, WebSocketLimits{Idle: time.Minute, MaxFrame: 1 << 20})
	start := time.Now()
	closed := make(chan struct{})
	go func() { defer close(closed); _ = c.Close(relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, "") }()
	if err := <-sawClose; err != nil {
		t.Fatal(err)
	}
	waitClosed(t, closed, "Close did not return")
	// Generous against closeWait's 1 s, short of the library's 5 s.
	if took := time.Since(start); took > 4*time.Second {
		t.Fatalf("a client's Close with a silent edge took %s", took)
	}
}
