// Package devconn adapts a device's connection to an edge, native QUIC,
// WebTransport or a WebSocket, to Conn: the session stream and, where the
// transport has them, datagrams. The edge's session core and the Go
// client speak the device protocol over it, so this package depends on
// the transports and the protocol's messages only.
package devconn

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/webtransport-go"

	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// Conn is one device connection: the session stream (reliable, ordered)
// and, where the transport has them, datagrams. QUIC, WebTransport and
// WebSocket each provide one; the session core does not know which it
// runs on.
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
	// Transport names the transport (TransportQUIC, TransportWebTransport,
	// TransportWebSocket) for logs and metrics.
	Transport() string
	// ChannelBinding is the channel binding (proof.Binding, RFC 9266) of
	// the TLS connection that carries the session, as this end of it
	// computes it; nil when TLS does not end here or has no exporter.
	// Version 2 of the protocol signs it into the handshake's proofs.
	ChannelBinding() []byte
}

// The transports a Conn names (Conn.Transport).
const (
	TransportQUIC         = "quic"
	TransportWebTransport = "webtransport"
	TransportWebSocket    = "websocket"
)

// Transports returns the transports a Conn may name.
func Transports() []string {
	return []string{TransportQUIC, TransportWebTransport, TransportWebSocket}
}

// CheckTransports refuses a name that is not one of Transports.
func CheckTransports(names []string) error {
	for _, n := range names {
		if !slices.Contains(Transports(), n) {
			return fmt.Errorf("%q is not a transport (%s)", n, strings.Join(Transports(), ", "))
		}
	}
	return nil
}

// ErrNoDatagrams says a transport cannot carry a datagram (none at all, or
// not one this large).
var ErrNoDatagrams = errors.New("transport has no datagrams for this")

// PeerCode returns the protocol error code (and message) the peer closed
// the connection with, on any transport: a QUIC application error, a
// WebTransport session error or a WebSocket close code. ok is false for
// an error that carries none, and for code 0 (a goodbye).
func PeerCode(err error) (code relayv1.ErrorCode, msg string, ok bool) {
	var appErr *quic.ApplicationError
	if errors.As(err, &appErr) && appErr.Remote && appErr.ErrorCode != 0 {
		return relayv1.ErrorCode(appErr.ErrorCode), appErr.ErrorMessage, true
	}
	var sessErr *webtransport.SessionError
	if errors.As(err, &sessErr) && sessErr.Remote && sessErr.ErrorCode != 0 {
		return relayv1.ErrorCode(sessErr.ErrorCode), sessErr.Message, true
	}
	return WebSocketCode(err)
}
