package devconn

import (
	"context"
	"errors"
	"net"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/webtransport-go"

	"github.com/edge-relay/relay/edge/proof"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// ALPN is the native QUIC application protocol of the device protocol.
const ALPN = "relay/1"

// WebTransportPath is the HTTP/3 path browsers open WebTransport sessions
// on.
const WebTransportPath = "/relay/v1/wt"

// CertHashesPath is where an edge publishes the SHA-256 hashes of its
// certificates (JSON), for clients that pin them.
const CertHashesPath = "/.well-known/relay/certificate-hashes"

// QUICConfig is the QUIC configuration edges and clients share: datagrams
// and partial-delivery resets on (WebTransport needs both).
func QUICConfig(idle time.Duration) *quic.Config {
	return &quic.Config{
		MaxIdleTimeout:                   idle,
		EnableDatagrams:                  true,
		EnableStreamResetPartialDelivery: true,
		HandshakeIdleTimeout:             5 * time.Second,
		// No 0-RTT: a replayed resume Hello is refused per edge only, and
		// with --cluster-tls-tickets a ticket opens on every edge.
		Allow0RTT: false,
	}
}

// closeWait bounds how long a closing connection waits for the device to
// read the Close frame and hang up itself, which lets the frames written
// before it arrive (a QUIC CONNECTION_CLOSE discards unsent stream data).
const closeWait = time.Second

// quicConn is a native QUIC connection with its session stream.
type quicConn struct {
	conn     *quic.Conn
	str      *quic.Stream
	once     sync.Once
	admitted func() // set by WhenAdmitted, before the session starts
}

// NewQUICConn adapts a native QUIC connection whose session stream is
// str.
func NewQUICConn(conn *quic.Conn, str *quic.Stream) Conn {
	return &quicConn{conn: conn, str: str}
}

func (c *quicConn) Read(p []byte) (int, error)         { return c.str.Read(p) }
func (c *quicConn) Write(p []byte) (int, error)        { return c.str.Write(p) }
func (c *quicConn) SetReadDeadline(t time.Time) error  { return c.str.SetReadDeadline(t) }
func (c *quicConn) SetWriteDeadline(t time.Time) error { return c.str.SetWriteDeadline(t) }
func (c *quicConn) RemoteAddr() net.Addr               { return c.conn.RemoteAddr() }
func (c *quicConn) Transport() string                  { return TransportQUIC }

// ChannelBinding is the binding of the QUIC connection's TLS.
func (c *quicConn) ChannelBinding() []byte {
	cs := c.conn.ConnectionState().TLS
	b, _ := proof.Binding(&cs)
	return b
}

func (c *quicConn) SendDatagram(b []byte) error {
	if !c.conn.ConnectionState().SupportsDatagrams.Remote {
		return ErrNoDatagrams
	}
	err := c.conn.SendDatagram(b)
	var tooLarge *quic.DatagramTooLargeError
	if errors.As(err, &tooLarge) {
		return ErrNoDatagrams
	}
	return err
}

func (c *quicConn) ReceiveDatagram(ctx context.Context) ([]byte, error) {
	if !c.conn.ConnectionState().SupportsDatagrams.Remote {
		return nil, ErrNoDatagrams
	}
	return c.conn.ReceiveDatagram(ctx)
}

// Close finishes the stream (the writer is done, so this never races a
// Write), waits at most closeWait for the peer to read what was sent and
// hang up, then closes the connection with the code.
func (c *quicConn) Close(code relayv1.ErrorCode, msg string) error {
	c.once.Do(func() {
		_ = c.str.Close()
		if code != relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED {
			waitDone(c.conn.Context(), closeWait)
		}
		_ = c.conn.CloseWithError(quic.ApplicationErrorCode(code), msg)
	})
	return nil
}

// Linger finishes the stream and waits until the peer hangs up or ctx
// ends. A client calls it after its goodbye, before Close: the edge reads
// what was written before the goodbye, then closes the connection, and a
// CONNECTION_CLOSE sent before that would have discarded whatever quic-go
// had not sent yet. The caller is the only writer.
func (c *quicConn) Linger(ctx context.Context) {
	_ = c.str.Close()
	select {
	case <-c.conn.Context().Done():
	case <-ctx.Done():
	}
}

// Abort closes the connection at once: quic-go fails blocked stream
// reads and writes with the connection's error.
func (c *quicConn) Abort(code relayv1.ErrorCode, msg string) error {
	return c.conn.CloseWithError(quic.ApplicationErrorCode(code), msg)
}

// waitDone waits until ctx ends or d passes.
func waitDone(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// wtConn is a WebTransport session with its session stream.
type wtConn struct {
	sess     *webtransport.Session
	str      *webtransport.Stream
	once     sync.Once
	admitted func() // set by WhenAdmitted, before the session starts
}

// NewWebTransportConn adapts a WebTransport session whose session stream
// is str.
func NewWebTransportConn(sess *webtransport.Session, str *webtransport.Stream) Conn {
	return &wtConn{sess: sess, str: str}
}

// WhenAdmitted has the edge call f once it admitted the session on c, a
// connection of NewQUICConn or NewWebTransportConn (Admitter), and
// returns c: the device port's bound on connections that are not a
// session yet lets go of it then. Call it before the session starts.
// Other connections are returned as they are, f never called.
func WhenAdmitted(c Conn, f func()) Conn {
	switch c := c.(type) {
	case *quicConn:
		c.admitted = f
	case *wtConn:
		c.admitted = f
	}
	return c
}

// Admitted calls the function WhenAdmitted set, if any.
func (c *quicConn) Admitted() {
	if c.admitted != nil {
		c.admitted()
	}
}

// Admitted calls the function WhenAdmitted set, if any.
func (c *wtConn) Admitted() {
	if c.admitted != nil {
		c.admitted()
	}
}

func (c *wtConn) Read(p []byte) (int, error) {
	n, err := c.str.Read(p)
	if err != nil {
		err = c.sessionErr(err)
	}
	return n, err
}

func (c *wtConn) Write(p []byte) (int, error) {
	n, err := c.str.Write(p)
	if err != nil {
		err = c.sessionErr(err)
	}
	return n, err
}

// sessionErr returns the session's close error in place of a stream error
// that carries no code, once the session has ended. When the peer closes
// the session, webtransport-go fails the stream with the session's error
// and then closes the QUIC connection under it; a Read blocked at that
// moment can wake to the connection's error (H3_NO_ERROR, local) instead,
// and the peer's code would be lost. The session keeps its close error:
// a closed session's AcceptStream returns it at once.
func (c *wtConn) sessionErr(err error) error {
	if _, _, ok := PeerCode(err); ok {
		return err
	}
	select {
	case <-c.sess.Context().Done():
	default:
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	str, serr := c.sess.AcceptStream(ctx)
	if str != nil { // not after the session's end; never left open
		str.CancelRead(0)
		str.CancelWrite(0)
	}
	var sessErr *webtransport.SessionError
	if errors.As(serr, &sessErr) {
		return serr
	}
	return err
}

func (c *wtConn) SetReadDeadline(t time.Time) error  { return c.str.SetReadDeadline(t) }
func (c *wtConn) SetWriteDeadline(t time.Time) error { return c.str.SetWriteDeadline(t) }
func (c *wtConn) RemoteAddr() net.Addr               { return c.sess.RemoteAddr() }
func (c *wtConn) Transport() string                  { return TransportWebTransport }

// ChannelBinding is the binding of the TLS of the QUIC connection that
// carries the WebTransport session.
func (c *wtConn) ChannelBinding() []byte {
	cs := c.sess.SessionState().ConnectionState.TLS
	b, _ := proof.Binding(&cs)
	return b
}

// maxWTDatagram keeps a datagram within one QUIC packet after the
// HTTP/3 datagram header; larger ones go on the stream.
const maxWTDatagram = 1100

func (c *wtConn) SendDatagram(b []byte) error {
	if len(b) > maxWTDatagram {
		return ErrNoDatagrams
	}
	err := c.sess.SendDatagram(b)
	var tooLarge *quic.DatagramTooLargeError
	if errors.As(err, &tooLarge) {
		return ErrNoDatagrams
	}
	return err
}

func (c *wtConn) ReceiveDatagram(ctx context.Context) ([]byte, error) {
	return c.sess.ReceiveDatagram(ctx)
}

// Close finishes the stream, waits at most closeWait for the peer to
// hang up, then closes the session with the code.
func (c *wtConn) Close(code relayv1.ErrorCode, msg string) error {
	c.once.Do(func() {
		_ = c.str.Close()
		if code != relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED {
			waitDone(c.sess.Context(), closeWait)
		}
		_ = c.sess.CloseWithError(webtransport.SessionErrorCode(code), msg)
	})
	return nil
}

// Linger finishes the stream and waits until the peer hangs up or ctx
// ends (see quicConn.Linger). The caller is the only writer.
func (c *wtConn) Linger(ctx context.Context) {
	_ = c.str.Close()
	select {
	case <-c.sess.Context().Done():
	case <-ctx.Done():
	}
}

// Abort closes the session at once: webtransport-go fails its streams'
// blocked reads and writes and gives the close capsule a few
// milliseconds. The QUIC connection under it is the listener's to reap.
func (c *wtConn) Abort(code relayv1.ErrorCode, msg string) error {
	return c.sess.CloseWithError(webtransport.SessionErrorCode(code), msg)
}
