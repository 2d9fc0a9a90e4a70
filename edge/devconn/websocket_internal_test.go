package devconn

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/edge-relay/relay/edge/frame"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// A WebSocket session reads each message as its length prefix and body,
// in as many reads as its reader takes, and keeps nothing of a message
// once it was read: a session that once received a large frame does not
// hold a buffer of that size for the rest of its life.
// edgeAndClient is an edge's end of a WebSocket (as the edge accepts it)
// and a client's plain WebSocket to it; the test ends both.
func edgeAndClient(t *testing.T) (*wsConn, *websocket.Conn) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	conns := make(chan *wsConn, 1)
	done := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, raw, err := AcceptWebSocket(w, r, nil)
		if err != nil {
			t.Error(err)
			return
		}
		conns <- NewWebSocketConn(ws, raw, nil, nil, WebSocketLimits{Idle: time.Minute, MaxFrame: 1 << 20}).(*wsConn)
		<-done
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(func() { close(done) })
	cl, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http"), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cl.CloseNow() })
	w := <-conns
	t.Cleanup(func() { _ = w.Abort(relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, "") })
	return w, cl
}

func TestWebSocketReadKeepsNoMessage(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	w, cl := edgeAndClient(t)

	for _, size := range []int{64 << 10, 0, 3} {
		msg := bytes.Repeat([]byte{byte(size)}, size)
		if err := cl.Write(ctx, websocket.MessageBinary, msg); err != nil {
			t.Fatal(err)
		}
		want := append(binary.AppendUvarint(nil, uint64(size)), msg...)
		got := make([]byte, len(want))
		// Small reads: the prefix and the body come in pieces.
		for off := 0; off < len(got); {
			n, err := w.Read(got[off:min(len(got), off+1000)])
			if err != nil {
				t.Fatalf("read: %v", err)
			}
			off += n
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("message of %d bytes read back wrong", size)
		}
		if w.body != nil || w.hoff != w.hlen {
			t.Fatalf("after a message of %d bytes was read, the conn still holds %d bytes of it (cap %d)", size, len(w.body), cap(w.body))
		}
	}
}

// What an edge's WebSocket charges beside the messages is what the wire
// carried beside them, also when messages come back to back (a read for
// one takes in those queued behind it, which must not be charged twice):
// a thousand 100-byte messages, each with a 6-byte header (2, and the
// 4-byte mask), cost 6,000 bytes beside them, give or take one read's
// worth.
func TestWebSocketOverheadIsTheWireLessThePayload(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	w, cl := edgeAndClient(t)
	const n, size = 1000, 100
	msg := bytes.Repeat([]byte{7}, size)
	wrote := make(chan struct{})
	// After cancel (deferred above), which ends a write the test left.
	t.Cleanup(func() { <-wrote })
	go func() {
		defer close(wrote)
		for range n {
			if err := cl.Write(ctx, websocket.MessageBinary, msg); err != nil {
				return
			}
		}
	}()
	got := make([]byte, n*(1+size)) // each with its one-byte length prefix
	for off := 0; off < len(got); {
		k, err := w.Read(got[off:])
		if err != nil {
			t.Fatalf("read after %d bytes: %v", off, err)
		}
		off += k
	}
	if over := w.TakeOverhead(); over < n*6-4096 || over > n*6+4096 {
		t.Fatalf("%d messages of %d bytes were charged %d bytes beside them, want about %d", n, size, over, n*6)
	}
}

// Closing the connection under an edge's WebSocket closes its TCP
// connection, not its TLS: crypto/tls would first write a close_notify
// alert, which waits up to 5 s on a peer that stopped reading with its
// window full (Close and Abort must not). Over a pipe, where any write
// waits for the peer's read, the peer reads the end of the connection,
// not an alert record.
func TestClosingTheRawConnectionSendsNoTLSAlert(t *testing.T) {
	stls, ctls := testTLS(t, "http/1.1")
	ctls = ctls.Clone()
	ctls.ServerName = "127.0.0.1" // the certificate's address
	edgeEnd, peerEnd := net.Pipe()
	t.Cleanup(func() { _ = peerEnd.Close(); _ = edgeEnd.Close() })
	srv, cli := tls.Server(edgeEnd, stls), tls.Client(peerEnd, ctls)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	errs := make(chan error, 1)
	go func() { errs <- srv.HandshakeContext(ctx) }()
	if err := cli.HandshakeContext(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-errs; err != nil {
		t.Fatal(err)
	}
	w := &wsConn{raw: newWireConn(srv)}
	closed := make(chan struct{})
	go func() { defer close(closed); w.closeRaw() }()
	_ = peerEnd.SetReadDeadline(time.Now().Add(20 * time.Second))
	var b [64]byte
	if n, err := peerEnd.Read(b[:]); n != 0 || !errors.Is(err, io.EOF) {
		t.Fatalf("the peer read %d bytes (%x), %v; want the connection's end and no alert", n, b[:n], err)
	}
	<-closed
}

// The peer's pings and pongs are let through 16 at once, then 2 a
// second; past that the connection's next read fails RATE_LIMITED, and
// every read after it.
func TestControlFramesAreBoundedByNumber(t *testing.T) {
	edgeEnd, peerEnd := net.Pipe()
	t.Cleanup(func() { _ = peerEnd.Close(); _ = edgeEnd.Close() })
	c := newWireConn(edgeEnd)
	c.setLimit(1 << 10)
	_ = edgeEnd.SetReadDeadline(time.Now().Add(20 * time.Second)) // a read past the bound must not wait
	go func() { _, _ = peerEnd.Write([]byte("ok")) }()
	now := time.Now()
	for range controlFrameBurst {
		c.controlFrame(now)
	}
	// Half a second refills one.
	c.controlFrame(now.Add(time.Second / controlFramesPerSecond))
	var b [2]byte
	if n, err := c.Read(b[:]); err != nil || string(b[:n]) != "ok" {
		t.Fatalf("a read within the bound: %q, %v", b[:n], err)
	}
	c.controlFrame(now.Add(time.Second / controlFramesPerSecond))
	for range 2 {
		var fe *frame.Error
		if _, err := c.Read(b[:]); !errors.As(err, &fe) || fe.Code != relayv1.ErrorCode_ERROR_CODE_RATE_LIMITED {
			t.Fatalf("a read past the bound: %v, want RATE_LIMITED", err)
		}
	}
}

// What the WebSocket layer's reads fail with is typed: a message over
// the limit FRAME_TOO_LARGE, a breach of the protocol MALFORMED_FRAME;
// the connection's own ends, and errors typed already, pass as they are.
// And a close with the layer's 1002 reads as MALFORMED_FRAME.
func TestWebSocketReadErrorsAreTyped(t *testing.T) {
	typed := &frame.Error{Code: relayv1.ErrorCode_ERROR_CODE_RATE_LIMITED}
	closed := websocket.CloseError{Code: websocket.StatusNormalClosure}
	for _, c := range []struct {
		err  error
		code relayv1.ErrorCode // 0: passed as it is
	}{
		{fmt.Errorf("read: %w: limit", websocket.ErrMessageTooBig), relayv1.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE},
		{errors.New("received unmasked frame from client"), relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME},
		{fmt.Errorf("failed to read frame header: %w", io.EOF), 0},
		{io.ErrUnexpectedEOF, 0},
		{net.ErrClosed, 0},
		{context.Canceled, 0},
		{&net.OpError{Op: "read", Err: errors.New("connection reset")}, 0},
		{typed, 0},
		{closed, 0},
	} {
		got := readError(c.err)
		var fe *frame.Error
		switch {
		case c.code == 0 && got != c.err:
			t.Errorf("%v became %v, want it as it was", c.err, got)
		case c.code != 0 && (!errors.As(got, &fe) || fe.Code != c.code):
			t.Errorf("%v became %v, want %s", c.err, got, c.code)
		}
	}
	if code, _, ok := WebSocketCode(websocket.CloseError{Code: websocket.StatusProtocolError}); !ok || code != relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME {
		t.Errorf("1002 reads as %s (%v), want MALFORMED_FRAME", code, ok)
	}
}

// deadlineConn reads what it is given and records the read deadline set
// on it; a read returns err once given no bytes.
type deadlineConn struct {
	net.Conn
	next     []byte
	err      error
	deadline time.Time
	sets     int
}

func (c *deadlineConn) Read(p []byte) (int, error) {
	if len(c.next) == 0 {
		return 0, c.err
	}
	n := copy(p, c.next)
	c.next = c.next[n:]
	return n, nil
}

func (c *deadlineConn) SetReadDeadline(t time.Time) error {
	c.deadline, c.sets = t, c.sets+1
	return nil
}

// The wire's clock of a message starts with the first bytes read after
// the last message or control frame, and stops with the next: a read
// deadline FrameTimeout ahead is set once per message, lifted when the
// message or a ping or pong is whole, and a read that passes it fails
// TIMEOUT. Without a frame timeout nothing is set; a deadline the wire did
// not set is not its TIMEOUT.
func TestTheWireTimesAMessageFromItsFirstBytes(t *testing.T) {
	raw := &deadlineConn{err: os.ErrDeadlineExceeded}
	c := newWireConn(raw)
	c.setLimit(1 << 20)
	c.frameTimeout = time.Minute
	buf := make([]byte, 16)
	read := func(b ...byte) {
		t.Helper()
		raw.next = b
		if n, err := c.Read(buf); n != len(b) || err != nil {
			t.Fatalf("read %d, %v", n, err)
		}
	}
	before := time.Now()
	read(1, 2, 3)
	if raw.deadline.Before(before.Add(time.Minute)) || raw.deadline.After(time.Now().Add(time.Minute)) || raw.sets != 1 {
		t.Fatalf("after a message's first bytes the deadline is %v (%d sets), want a minute ahead", raw.deadline, raw.sets)
	}
	read(4, 5)
	if raw.sets != 1 {
		t.Fatalf("the deadline was set again within one message (%d sets)", raw.sets)
	}
	_, err := c.Read(buf)
	var fe *frame.Error
	if !errors.As(err, &fe) || fe.Code != relayv1.ErrorCode_ERROR_CODE_TIMEOUT {
		t.Fatalf("a read past the message's deadline: %v, want TIMEOUT", err)
	}
	c.message()
	if !raw.deadline.IsZero() {
		t.Fatalf("the deadline stayed after the message: %v", raw.deadline)
	}
	if _, err := c.Read(buf); !errors.Is(err, os.ErrDeadlineExceeded) || errors.As(err, &fe) {
		t.Fatalf("a deadline passing between messages: %v, want the connection's own error", err)
	}
	// A ping between messages stops the clock its bytes started.
	read(0x89, 0x80, 1, 2, 3, 4)
	c.controlFrame(time.Now())
	if !raw.deadline.IsZero() {
		t.Fatalf("a ping left a message deadline: %v", raw.deadline)
	}
	read(1)
	if raw.deadline.IsZero() {
		t.Fatal("the next message's first byte set no deadline")
	}
	c.message()

	off := newWireConn(&deadlineConn{})
	off.setLimit(1 << 20)
	offRaw := off.Conn.(*deadlineConn)
	offRaw.next = []byte{1, 2, 3}
	if _, err := off.Read(buf); err != nil || offRaw.sets != 0 {
		t.Fatalf("without a frame timeout: %v, %d deadlines set", err, offRaw.sets)
	}
}
