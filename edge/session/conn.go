package session

import (
	"context"
	"errors"
	"io"
	"net"
	"time"

	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// Conn is one device connection as the session core sees it: the session
// stream (reliable, ordered) and, where the transport has them,
// datagrams. QUIC, WebTransport and WebSocket each provide one; nothing in
// this package knows which it runs on.
//
// Read is called by one goroutine and Write by another (never two of
// either at once). The other methods may be called from any goroutine,
// also while a Read or Write is blocked.
type Conn interface {
	io.Reader
	io.Writer
	// SetReadDeadline and SetWriteDeadline bound blocked and future Reads
	// and Writes, as on a net.Conn: past the deadline they fail with an
	// error whose Timeout() is true. The zero time removes the deadline.
	SetReadDeadline(t time.Time) error
	SetWriteDeadline(t time.Time) error
	// SendDatagram sends one frame body unreliably. It returns
	// ErrNoDatagrams when the transport has none or the body does not fit
	// into one; the caller then uses the stream.
	SendDatagram(body []byte) error
	// ReceiveDatagram waits for the next datagram. It returns
	// ErrNoDatagrams at once when the transport has none, and an error
	// once the connection is closed.
	ReceiveDatagram(ctx context.Context) ([]byte, error)
	// Close ends the connection gracefully with a protocol error code:
	// the stream is finished, so what was written still reaches the peer,
	// which is given a bounded moment to hang up first. Only the goroutine
	// that writes may call it, never during a Write.
	Close(code relayv1.ErrorCode, msg string) error
	// Abort ends the connection at once with a protocol error code:
	// blocked and later Reads, Writes and datagram calls fail, and
	// nothing still unsent is delivered. Safe at any time, from any
	// goroutine, more than once; it never blocks for long.
	Abort(code relayv1.ErrorCode, msg string) error
	// RemoteAddr is the device's network address.
	RemoteAddr() net.Addr
	// Transport names the transport ("quic", "webtransport", "websocket")
	// for logs and metrics.
	Transport() string
}

// ErrNoDatagrams says a transport cannot carry a datagram (none at all, or
// not one this large).
var ErrNoDatagrams = errors.New("transport has no datagrams for this")
