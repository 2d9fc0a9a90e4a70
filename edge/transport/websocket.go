package transport

import (
	"context"
	"net"
	"net/http"
	"time"

	"github.com/coder/websocket"

	"github.com/edge-relay/relay/edge/devconn"
	"github.com/edge-relay/relay/edge/session"
)

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
	// Origins as for WebTransport (see OriginPolicy).
	Origins OriginPolicy
	// IdleTimeout closes a WebSocket silent this long [30s].
	IdleTimeout time.Duration
	// Ctx ends the sessions when it ends (the edge shutting down).
	Ctx context.Context
}

// ServeHTTP upgrades the request and runs the session.
func (h *WebSocketHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !h.Origins.allows(r) {
		http.Error(w, "origin not allowed", http.StatusForbidden)
		return
	}
	// The origin is checked above, as for WebTransport. WebSocket pings
	// go unanswered: each pong is a TLS record and a write of its own, so
	// a peer streaming 6-byte pings (before authenticating, and outside
	// every budget) made the edge write for each; the protocol's
	// keep-alive is its own Ping frame, which the budgets count.
	c, raw, err := devconn.AcceptWebSocket(w, r, &websocket.AcceptOptions{InsecureSkipVerify: true,
		OnPingReceived: func(context.Context, []byte) bool { return false }})
	if err != nil {
		return // Accept wrote the error response
	}
	idle := h.IdleTimeout
	if idle <= 0 {
		idle = 30 * time.Second
	}
	_ = h.Hub.Serve(h.Ctx, devconn.NewWebSocketConn(c, raw, r.TLS, remoteAddr(r.RemoteAddr), devconn.WebSocketLimits{
		Idle: idle, MaxFrame: h.Hub.Limits().MaxFrameBytes, FrameTimeout: h.Hub.Limits().FrameTimeout}))
}
