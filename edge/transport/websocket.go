package transport

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/coder/websocket"

	"github.com/edge-relay/relay/edge/session"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// WebSocketPath is the path of the WebSocket fallback on the edge's HTTPS
// port, for browsers where UDP is blocked.
const WebSocketPath = "/relay/v1/ws"

// WebSocketCloseBase is added to a protocol error code to make the
// WebSocket close code (the 4000-4999 range is the application's).
const WebSocketCloseBase = 4000

// wsConn carries the session stream over a WebSocket: each binary
// message is one frame body (the message boundary is its length, so the
// uvarint prefix of the stream is not sent). There are no datagrams:
// ephemeral events go on the stream.
type wsConn struct {
	c      *websocket.Conn
	remote net.Addr
	idle   time.Duration
	ctx    context.Context
	cancel context.CancelFunc

	rbuf []byte // the current message, prefixed, for Read (reused)
	roff int    // how much of rbuf Read has returned
	wbuf []byte // written bytes not yet a whole frame (reused)
	once sync.Once
}

// NewWebSocketConn adapts a WebSocket. A peer silent for longer than idle
// (no message at all; clients send Ping frames) counts as gone.
func NewWebSocketConn(c *websocket.Conn, remote net.Addr, idle time.Duration, maxFrame int) session.Conn {
	ctx, cancel := context.WithCancel(context.Background())
	c.SetReadLimit(int64(maxFrame) + 16)
	return &wsConn{c: c, remote: remote, idle: idle, ctx: ctx, cancel: cancel}
}

func (w *wsConn) Read(p []byte) (int, error) {
	for w.roff == len(w.rbuf) {
		ctx, cancel := context.WithTimeout(w.ctx, w.idle)
		typ, msg, err := w.c.Read(ctx)
		cancel()
		if err != nil {
			return 0, err
		}
		if typ != websocket.MessageBinary {
			return 0, errors.New("websocket: text message; frames are binary")
		}
		w.rbuf = binary.AppendUvarint(w.rbuf[:0], uint64(len(msg)))
		w.rbuf = append(w.rbuf, msg...)
		w.roff = 0
	}
	n := copy(p, w.rbuf[w.roff:])
	w.roff += n
	return n, nil
}

// Write takes length-prefixed frames (the session stream) and sends each
// frame body as one message. Whole frames go straight from p; only an
// incomplete tail is kept for the next Write.
func (w *wsConn) Write(p []byte) (int, error) {
	data := p
	if len(w.wbuf) > 0 {
		w.wbuf = append(w.wbuf, p...)
		data = w.wbuf
	}
	off := 0
	for {
		n, k := binary.Uvarint(data[off:])
		if k <= 0 || uint64(len(data)-off-k) < n {
			break
		}
		body := data[off+k : off+k+int(n)]
		ctx, cancel := context.WithTimeout(w.ctx, 30*time.Second)
		err := w.c.Write(ctx, websocket.MessageBinary, body)
		cancel()
		if err != nil {
			return 0, err
		}
		off += k + int(n)
	}
	// copy moves the tail to the front (the regions may overlap).
	w.wbuf = append(w.wbuf[:0], data[off:]...)
	return len(p), nil
}

func (w *wsConn) SendDatagram([]byte) error { return session.ErrNoDatagrams }
func (w *wsConn) ReceiveDatagram(context.Context) ([]byte, error) {
	return nil, session.ErrNoDatagrams
}
func (w *wsConn) RemoteAddr() net.Addr { return w.remote }
func (w *wsConn) Transport() string    { return "websocket" }

// Close sends the WebSocket close frame with the protocol code (4000 +
// code) and waits briefly for the peer's.
func (w *wsConn) Close(code relayv1.ErrorCode, msg string) error {
	w.once.Do(func() {
		status := websocket.StatusNormalClosure
		if code != relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED {
			status = websocket.StatusCode(WebSocketCloseBase + int(code))
		}
		if len(msg) > 120 {
			msg = msg[:120]
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			_ = w.c.Close(status, msg)
		}()
		t := time.NewTimer(closeWait)
		select {
		case <-done:
		case <-t.C:
			_ = w.c.CloseNow()
			<-done
		}
		t.Stop()
		w.cancel()
	})
	return nil
}

// WebSocketCode returns the protocol error code a WebSocket close
// carried, if it was one. A message over the edge's read limit is closed
// by the WebSocket layer itself with 1009 (message too big): that is
// FRAME_TOO_LARGE.
func WebSocketCode(err error) (relayv1.ErrorCode, string, bool) {
	var ce websocket.CloseError
	if !errors.As(err, &ce) {
		return 0, "", false
	}
	switch {
	case int(ce.Code) > WebSocketCloseBase && int(ce.Code) < WebSocketCloseBase+1000:
		return relayv1.ErrorCode(int(ce.Code) - WebSocketCloseBase), ce.Reason, true
	case ce.Code == websocket.StatusMessageTooBig:
		return relayv1.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE, ce.Reason, true
	}
	return 0, "", false
}

// remoteAddr parses an http.Request's RemoteAddr.
func remoteAddr(s string) net.Addr {
	if a, err := net.ResolveTCPAddr("tcp", s); err == nil {
		return a
	}
	return &net.TCPAddr{}
}

// WebSocketHandler serves the WebSocket fallback: each connection is a
// session of hub.
type WebSocketHandler struct {
	Hub *session.Hub
	// AllowedOrigins as for WebTransport ("*" or empty: any).
	AllowedOrigins []string
	// IdleTimeout closes a WebSocket silent this long [30s].
	IdleTimeout time.Duration
	// Ctx ends the sessions when it ends (the edge shutting down).
	Ctx context.Context
}

// ServeHTTP upgrades the request and runs the session.
func (h *WebSocketHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !originAllowed(h.AllowedOrigins, r) {
		http.Error(w, "origin not allowed", http.StatusForbidden)
		return
	}
	// The origin is checked above, as for WebTransport.
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{InsecureSkipVerify: true})
	if err != nil {
		return // Accept wrote the error response
	}
	idle := h.IdleTimeout
	if idle <= 0 {
		idle = 30 * time.Second
	}
	_ = h.Hub.Serve(h.Ctx, NewWebSocketConn(c, remoteAddr(r.RemoteAddr), idle, h.Hub.Limits().MaxFrameBytes))
}
