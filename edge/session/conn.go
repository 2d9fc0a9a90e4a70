package session

import (
	"context"
	"errors"
	"io"
	"net"

	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// Conn is one device connection as the session core sees it: the session
// stream (reliable, ordered) and, where the transport has them,
// datagrams. QUIC, WebTransport and WebSocket each provide one; nothing in
// this package knows which it runs on.
//
// Read is called by one goroutine and Write by another (never two of
// either at once).
type Conn interface {
	io.Reader
	io.Writer
	// SendDatagram sends one frame body unreliably. It returns
	// ErrNoDatagrams when the transport has none or the body does not fit
	// into one; the caller then uses the stream.
	SendDatagram(body []byte) error
	// ReceiveDatagram waits for the next datagram. It returns
	// ErrNoDatagrams at once when the transport has none, and an error
	// once the connection is closed.
	ReceiveDatagram(ctx context.Context) ([]byte, error)
	// Close ends the connection with a protocol error code, after giving
	// what was already written a bounded chance to reach the peer. It is
	// safe to call more than once and from any goroutine.
	Close(code relayv1.ErrorCode, msg string) error
	// RemoteAddr is the device's network address.
	RemoteAddr() net.Addr
	// Transport names the transport ("quic", "webtransport", "websocket")
	// for logs and metrics.
	Transport() string
}

// ErrNoDatagrams says a transport cannot carry a datagram (none at all, or
// not one this large).
var ErrNoDatagrams = errors.New("transport has no datagrams for this")
