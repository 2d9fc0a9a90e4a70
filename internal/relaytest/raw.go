package relaytest

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/webtransport-go"

	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/devconn"
	"github.com/edge-relay/relay/edge/frame"
	"github.com/edge-relay/relay/edge/proof"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// Raw is a device connection driven frame by frame, byte by byte if need
// be: the test plays a broken or hostile client that the Go client would
// never be (it stops reading, sends half frames, floods, pads events).
// It speaks the same transports as the client, without its manners.
type Raw struct {
	t  TB
	tr client.Transport
	// WS is the WebSocket, for tests that send what the session stream
	// cannot express (a text message); nil on QUIC and WebTransport.
	WS *websocket.Conn
	// Version is the protocol version Login speaks (0:
	// proof.ProtocolVersion); proof.UnboundVersion signs as a browser
	// does, without the connection's channel binding.
	Version uint32

	conn  devconn.Conn
	r     *frame.Reader
	hello *relayv1.Hello
	qc    *quic.Conn            // QUIC
	wts   *webtransport.Session // WebTransport
	fin   func() error          // finishes the stream's write side (QUIC, WebTransport)
	done  func()
}

// TB is what Raw needs of a test.
type TB interface {
	Helper()
	Fatalf(format string, args ...any)
	Cleanup(func())
}

// DialRaw opens a connection to edge i over tr and its session stream,
// sending nothing yet. It is closed by t.Cleanup.
func (r *Relay) DialRaw(t TB, i int, tr client.Transport) *Raw {
	t.Helper()
	return DialRaw(t, r.Edges[i].Addr(), tr)
}

// DialRaw opens a connection to the edge at addr over tr.
func DialRaw(t TB, addr string, tr client.Transport) *Raw {
	t.Helper()
	raw, err := DialRawOrigin(t, addr, tr, "")
	if err != nil {
		t.Fatalf("%v", err)
	}
	return raw
}

// DialRawOrigin is DialRaw as a web page on origin would connect (no
// Origin header when origin is empty); the edge may refuse it.
func DialRawOrigin(t TB, addr string, tr client.Transport, origin string) (*Raw, error) {
	t.Helper()
	hdr := http.Header{}
	if origin != "" {
		hdr.Set("Origin", origin)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	raw := &Raw{t: t, tr: tr}
	// An attacker checks nothing: the edge's certificate is taken as is.
	tlsConf := func(alpn string) *tls.Config {
		return &tls.Config{InsecureSkipVerify: true, NextProtos: []string{alpn}, MinVersion: tls.VersionTLS13} //nolint:gosec // a test's hostile client
	}
	qconf := devconn.QUICConfig(30 * time.Second)
	qconf.KeepAlivePeriod = 5 * time.Second
	switch tr {
	case client.WebSocket:
		ht := &http.Transport{TLSClientConfig: tlsConf("http/1.1")}
		dialed := devconn.RecordDials(ht)
		hc := &http.Client{Transport: ht}
		ws, resp, err := websocket.Dial(ctx, "wss://"+addr+devconn.WebSocketPath, &websocket.DialOptions{HTTPClient: hc, HTTPHeader: hdr})
		if err != nil {
			hc.CloseIdleConnections()
			return nil, fmt.Errorf("websocket dial %s: %w", addr, err)
		}
		ws.SetReadLimit(1 << 20)
		remote, _ := net.ResolveTCPAddr("tcp", addr)
		raw.WS = ws
		raw.conn = devconn.NewWebSocketConn(ws, dialed(), resp.TLS, remote, devconn.WebSocketLimits{Idle: time.Hour, MaxFrame: 1 << 20})
		raw.done = hc.CloseIdleConnections
	case client.WebTransport:
		d := &webtransport.Transport{TLSClientConfig: tlsConf("h3"), QUICConfig: qconf}
		_, sess, err := d.Dial(ctx, "https://"+addr+devconn.WebTransportPath, hdr)
		if err != nil {
			_ = d.Close()
			return nil, fmt.Errorf("webtransport dial %s: %w", addr, err)
		}
		str, err := sess.OpenStreamSync(ctx)
		if err != nil {
			_ = d.Close()
			return nil, fmt.Errorf("open session stream: %w", err)
		}
		raw.wts = sess
		raw.fin = str.Close
		raw.conn = devconn.NewWebTransportConn(sess, str)
		raw.done = func() { _ = d.Close() }
	default:
		qc, err := quic.DialAddr(ctx, addr, tlsConf(devconn.ALPN), qconf)
		if err != nil {
			return nil, fmt.Errorf("quic dial %s: %w", addr, err)
		}
		str, err := qc.OpenStreamSync(ctx)
		if err != nil {
			_ = qc.CloseWithError(0, "")
			return nil, fmt.Errorf("open session stream: %w", err)
		}
		raw.qc = qc
		raw.fin = str.Close
		raw.conn = devconn.NewQUICConn(qc, str)
	}
	raw.r = frame.NewReader(raw.conn, 1<<20)
	t.Cleanup(raw.Close)
	return raw, nil
}

// Close drops the connection without a goodbye.
func (c *Raw) Close() {
	_ = c.conn.Abort(relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, "")
	if c.done != nil {
		c.done()
	}
}

// CloseWrite ends the stream's write side (a FIN) and keeps reading. A
// WebSocket has no half-close: it fails the test.
func (c *Raw) CloseWrite() {
	c.t.Helper()
	if c.fin == nil {
		c.t.Fatalf("%s has no half-close", c.tr)
	}
	if err := c.fin(); err != nil {
		c.t.Fatalf("close the write side: %v", err)
	}
}

// rawStream is a stream beside the session's that a test writes on.
type rawStream interface {
	Write([]byte) (int, error)
	SetWriteDeadline(time.Time) error
}

// openExtraStreams opens as many more streams as the edge lets it, beside
// the session's, bidirectional and unidirectional. A WebSocket has no
// streams: it fails the test.
func (c *Raw) openExtraStreams() (bidi, uni []rawStream) {
	c.t.Helper()
	var openBidi, openUni func() (rawStream, error)
	switch {
	case c.qc != nil:
		openBidi = func() (rawStream, error) { return c.qc.OpenStream() }
		openUni = func() (rawStream, error) { return c.qc.OpenUniStream() }
	case c.wts != nil:
		openBidi = func() (rawStream, error) { return c.wts.OpenStream() }
		openUni = func() (rawStream, error) { return c.wts.OpenUniStream() }
	default:
		c.t.Fatalf("%s has no streams", c.tr)
	}
	open := func(open func() (rawStream, error)) []rawStream {
		var out []rawStream
		for {
			s, err := open()
			if err != nil {
				return out // the edge's limit (a stream limit error)
			}
			if len(out) >= 64 {
				c.t.Fatalf("opened %d extra streams, and the edge allows more", len(out))
			}
			out = append(out, s)
		}
	}
	return open(openBidi), open(openUni)
}

// OpenExtraStreams opens as many more streams as the edge lets it, beside
// the session's, bidirectional and unidirectional, and writes payload on
// each (the edge never reads them); it reports how many it opened. A
// WebSocket has no streams: it fails the test.
func (c *Raw) OpenExtraStreams(payload []byte) (bidi, uni int) {
	c.t.Helper()
	b, u := c.openExtraStreams()
	for i, s := range append(b, u...) {
		_ = s.SetWriteDeadline(time.Now().Add(10 * time.Second))
		if _, err := s.Write(payload); err != nil {
			c.t.Fatalf("write on extra stream %d: %v", i, err)
		}
	}
	return len(b), len(u)
}

// FloodExtraStreams opens as many more streams as the edge lets it, beside
// the session's, writes size bytes on each at once, the writes ending
// after d, and reports the bytes that left: what the edge's flow control
// let out though the edge reads none of it. A WebSocket has no streams:
// it fails the test.
func (c *Raw) FloodExtraStreams(size int, d time.Duration) int {
	c.t.Helper()
	b, u := c.openExtraStreams()
	deadline := time.Now().Add(d)
	var sent atomic.Int64
	var wg sync.WaitGroup
	for _, s := range append(b, u...) {
		_ = s.SetWriteDeadline(deadline)
		wg.Go(func() {
			n, _ := s.Write(make([]byte, size))
			sent.Add(int64(n))
		})
	}
	wg.Wait()
	return int(sent.Load())
}

// Ping sends a Ping and reads until its Pong, within d: the session is
// still served. A Close before it, or nothing in time, is the error.
func (c *Raw) Ping(nonce uint64, d time.Duration) error {
	if err := c.Send(&relayv1.Frame{Kind: &relayv1.Frame_Ping{Ping: &relayv1.Ping{Nonce: nonce}}}); err != nil {
		return err
	}
	deadline := time.Now().Add(d)
	for {
		f, err := c.Next(time.Until(deadline))
		switch {
		case err != nil:
			return fmt.Errorf("no pong %d: %w", nonce, err)
		case f.GetClose() != nil:
			return fmt.Errorf("closed before pong %d: %v", nonce, f.GetClose())
		case f.GetPong().GetNonce() == nonce:
			return nil
		}
	}
}

// Hello is the Hello of the last Login.
func (c *Raw) Hello() *relayv1.Hello { return c.hello }

// Write sends bytes on the session stream as they are (on a WebSocket,
// each whole length-prefixed frame becomes one message).
func (c *Raw) Write(b []byte) error {
	_, err := c.conn.Write(b)
	return err
}

// Send sends one frame.
func (c *Raw) Send(f *relayv1.Frame) error {
	b, err := frame.Append(nil, f)
	if err != nil {
		return err
	}
	return c.Write(b)
}

// SendDatagram sends one frame body as a datagram.
func (c *Raw) SendDatagram(body []byte) error { return c.conn.SendDatagram(body) }

// Next reads the next frame, waiting at most d.
func (c *Raw) Next(d time.Duration) (*relayv1.Frame, error) {
	_ = c.conn.SetReadDeadline(time.Now().Add(d))
	defer func() { _ = c.conn.SetReadDeadline(time.Time{}) }()
	var f relayv1.Frame
	if err := c.r.Read(&f); err != nil {
		return nil, err
	}
	return &f, nil
}

// Login runs the full handshake as device d.
func (c *Raw) Login(d Device) *relayv1.Welcome {
	c.t.Helper()
	v := c.Version
	if v == 0 {
		v = proof.ProtocolVersion
	}
	c.hello = &relayv1.Hello{UserId: d.UserID, DeviceId: d.ID, ProtocolVersion: v, ClientTimeMs: time.Now().UnixMilli()}
	if err := c.Send(&relayv1.Frame{Kind: &relayv1.Frame_Hello{Hello: c.hello}}); err != nil {
		c.t.Fatalf("send hello: %v", err)
	}
	f, err := c.Next(20 * time.Second)
	if err != nil || f.GetChallenge() == nil {
		c.t.Fatalf("want a challenge, got %v (%v)", f, err)
	}
	c.Answer(f.GetChallenge(), d.Key)
	f, err = c.Next(20 * time.Second)
	if err != nil || f.GetWelcome() == nil {
		c.t.Fatalf("want a welcome, got %v (%v)", f, err)
	}
	return f.GetWelcome()
}

// Answer signs a challenge (the handshake's, or a re-authentication's)
// for the last Hello.
func (c *Raw) Answer(ch *relayv1.Challenge, key ed25519.PrivateKey) {
	c.t.Helper()
	h := c.hello
	sig := proof.Transcript{
		UserID: h.GetUserId(), DeviceID: h.GetDeviceId(), ProtocolVersion: h.GetProtocolVersion(), ClientTimeMs: h.GetClientTimeMs(),
		EdgeID: ch.GetEdgeId(), Nonce: ch.GetNonce(), ServerTimeMs: ch.GetServerTimeMs(), Binding: c.Binding(),
	}.Sign(key)
	if err := c.Send(&relayv1.Frame{Kind: &relayv1.Frame_Authenticate{Authenticate: &relayv1.Authenticate{Signature: sig}}}); err != nil {
		c.t.Fatalf("send signature: %v", err)
	}
}

// Binding is the channel binding of the connection, as the device
// computes it (proof.Binding).
func (c *Raw) Binding() []byte { return c.conn.ChannelBinding() }

// ResumeHello is a Hello resuming as d with ticket, proven with key (nil:
// no proof, as a thief holding only the ticket would send) on the
// connection whose channel binding is binding (proof.ProtocolVersion;
// nil: proof.UnboundVersion, as a browser resumes).
func ResumeHello(d Device, ticket []byte, key ed25519.PrivateKey, binding []byte) *relayv1.Hello {
	v := uint32(proof.ProtocolVersion)
	if binding == nil {
		v = proof.UnboundVersion
	}
	h := &relayv1.Hello{UserId: d.UserID, DeviceId: d.ID, ProtocolVersion: v,
		ClientTimeMs: time.Now().UnixMilli(), ResumeTicket: ticket, Instance: "raw"}
	if key != nil {
		h.ResumeNonce = make([]byte, proof.ResumeNonceSize)
		_, _ = rand.Read(h.ResumeNonce)
		h.ResumeProof = proof.ResumeTranscript{
			UserID: h.GetUserId(), DeviceID: h.GetDeviceId(), ProtocolVersion: h.GetProtocolVersion(), ClientTimeMs: h.GetClientTimeMs(),
			Instance: h.GetInstance(), Nonce: h.GetResumeNonce(), Ticket: ticket, Binding: binding,
		}.Sign(key)
	}
	return h
}

// SendHello sends a Hello and remembers it (for Answer).
func (c *Raw) SendHello(h *relayv1.Hello) error {
	c.hello = h
	return c.Send(&relayv1.Frame{Kind: &relayv1.Frame_Hello{Hello: h}})
}

// End is how a connection ended as the device saw it.
type End struct {
	// Code is the protocol code: from the Close frame when one arrived,
	// else from the transport's close (QUIC application error,
	// WebTransport session error, WebSocket close code).
	Code relayv1.ErrorCode
	// Frame reports whether a Close frame arrived.
	Frame bool
	Msg   string
}

// WaitEnd reads (and drops) frames until the connection ends, for at
// most d, and reports how it ended.
func (c *Raw) WaitEnd(d time.Duration) (End, error) {
	deadline := time.Now().Add(d)
	var end End
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return end, errors.New("the connection did not end in time")
		}
		f, err := c.Next(left)
		if err == nil {
			if cl := f.GetClose(); cl != nil {
				end = End{Code: cl.GetCode(), Frame: true, Msg: cl.GetMessage()}
			}
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return end, fmt.Errorf("the connection did not end in time: %w", err)
		}
		if !end.Frame {
			// (devconn's WebTransport adapter already answers with the
			// session's close error when the stream failed with the
			// connection's.)
			end.Code, end.Msg = transportCode(err)
		}
		return end, nil
	}
}

// transportCode is the protocol code a transport's close carried.
func transportCode(err error) (relayv1.ErrorCode, string) {
	if err == nil {
		return relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, ""
	}
	var appErr *quic.ApplicationError
	if errors.As(err, &appErr) && appErr.Remote {
		return relayv1.ErrorCode(appErr.ErrorCode), appErr.ErrorMessage
	}
	var sessErr *webtransport.SessionError
	if errors.As(err, &sessErr) && sessErr.Remote {
		return relayv1.ErrorCode(sessErr.ErrorCode), sessErr.Message
	}
	if code, msg, ok := devconn.WebSocketCode(err); ok {
		return code, msg
	}
	return relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, err.Error()
}

// Stall logs victim in over tr at the edge at addr and fills its stream
// until its queue is full, so the edge's writer for it is blocked in a
// write it cannot finish: the victim reads nothing. The sender, another
// device of the same user, logs in over QUIC and sends events of 48 KiB
// to the victim until the edge answers QUEUE_FULL. Both stay connected.
func Stall(t TB, addr string, tr client.Transport, victim, sender Device) (v, s *Raw) {
	t.Helper()
	s = DialRaw(t, addr, client.QUIC)
	s.Login(sender)
	v = DialRaw(t, addr, tr)
	v.Login(victim)
	payload := make([]byte, 48<<10)
	deadline := time.Now().Add(90 * time.Second)
	var seq uint64
	for time.Now().Before(deadline) {
		for range 16 {
			seq++
			ev := &relayv1.Event{Id: fmt.Sprintf("stall-%d", seq), Seq: seq, CreatedAtMs: time.Now().UnixMilli(), TtlMs: 60000,
				Type: "t", Payload: payload, Targets: []string{victim.ID}}
			if err := s.Send(&relayv1.Frame{Kind: &relayv1.Frame_Event{Event: ev}}); err != nil {
				t.Fatalf("sender: %v", err)
			}
		}
		for {
			f, err := s.Next(200 * time.Millisecond)
			if err != nil {
				break // nothing more for now
			}
			if ch := f.GetChallenge(); ch != nil {
				s.Answer(ch, sender.Key)
			}
			if f.GetReject().GetCode() == relayv1.ErrorCode_ERROR_CODE_QUEUE_FULL {
				return v, s
			}
		}
	}
	t.Fatalf("the victim's queue never filled")
	return nil, nil
}
