package client

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/coder/websocket"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/webtransport-go"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/edge/devconn"
	"github.com/edge-relay/relay/edge/frame"
	"github.com/edge-relay/relay/edge/proof"
	"github.com/edge-relay/relay/internal/jitter"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// conn is one session with the edge.
type conn struct {
	c     devconn.Conn
	r     *frame.Reader
	hello *relayv1.Hello
	// binding is the connection's channel binding, which the proofs
	// sign (proof.ProtocolVersion binds them to the connection).
	binding []byte
	// closeHook releases what the dial created besides c (WebTransport's
	// dialer).
	closeHook func()
	// keepalive, if set, is how often the client pings (transports without
	// keep-alives of their own).
	keepalive time.Duration
	// noDatagrams: the transport carries none (a WebSocket), or the client
	// sends none (Config.NoDatagrams), so ephemeral events go straight to
	// the stream; the Hello says so.
	noDatagrams bool
	// datagramsOpen: an ephemeral event went on the stream, so the edge
	// reads this connection's datagrams now (the Hello defers them, see
	// SendEphemeral). Guarded by the client's sendMu.
	datagramsOpen bool

	wmu  sync.Mutex // guards w and gone
	gone bool       // the goodbye was written: nothing is written after it
	w    *frame.Writer

	// Events sent concurrently share a stream write, so QUIC sends them
	// in one packet rather than a packet each: a send appends its frame
	// to pend, and the first of them since the last write writes
	// everything pending once the other runnable senders had their turn.
	pmu      sync.Mutex // guards the fields below
	pend     []byte
	flushing bool
	// queued are the frames in pend, in order: a send that gives up while
	// its frame is still there takes it out (unqueue), so pend holds at
	// most the frames of sends that hold a slot (Config.MaxPending).
	queued []queuedFrame
	ticket uint64 // the last ticket handed out

	// The reader's own frames (receipts, pongs, the answer to a
	// challenge) wait in ctl for the session's control writer
	// (writeControl): a write may wait long behind the device's own sends
	// on an edge that paces its reading, and a reader waiting with it
	// leaves the edge's writes to the device without room until the edge
	// ends the session as SLOW_CONSUMER.
	cmu     sync.Mutex // guards ctl
	ctl     []*relayv1.Frame
	ctlWake chan struct{} // capacity 1: frames were added to ctl

	// The goodbye acknowledges every event the application was given:
	// hmu orders the reader's giving of an event (and the noting of its
	// receipt in rc) against the goodbye's taking of rc's receipts, and
	// the goodbye waits for the inbox's pump to end (pumped), which
	// queues the receipts of what it gave as it ends. Once sealed,
	// nothing more is given.
	hmu    sync.Mutex // guards sealed, rc and what rc holds
	sealed bool
	rc     *receipts
	pumped chan struct{} // closed when the session's pump ended; nil: no pump
}

// maxReceiptIDs is the most delivery ids a Received frame carries: at
// most ~2.5 KiB encoded, within any frame limit an edge may set.
const maxReceiptIDs = 256

// control queues f for the control writer, without waiting. Receipts
// that queue up fill the Received frame waiting before them, up to
// maxReceiptIDs each, so what waits stays within the deliveries the edge
// leaves unacknowledged.
func (cn *conn) control(f *relayv1.Frame) {
	cn.cmu.Lock()
	// A Pong, or the answer to a challenge, replaces one still queued:
	// only the latest matters, and an edge that pings or challenges
	// faster than it reads then holds one of each, not a queue of them.
	if f.GetPong() != nil || f.GetAuthenticate() != nil {
		for i, q := range cn.ctl {
			if (q.GetPong() != nil && f.GetPong() != nil) || (q.GetAuthenticate() != nil && f.GetAuthenticate() != nil) {
				cn.ctl[i] = f
				cn.cmu.Unlock()
				return // the writer was woken for the frame replaced
			}
		}
	}
	r := f.GetReceived()
	if r != nil && len(cn.ctl) > 0 {
		if last := cn.ctl[len(cn.ctl)-1].GetReceived(); last != nil {
			n := min(maxReceiptIDs-len(last.DeliveryIds), len(r.DeliveryIds))
			last.DeliveryIds = append(last.DeliveryIds, r.DeliveryIds[:n]...)
			r.DeliveryIds = r.DeliveryIds[n:]
		}
	}
	for r != nil && len(r.DeliveryIds) > maxReceiptIDs {
		cn.ctl = append(cn.ctl, &relayv1.Frame{Kind: &relayv1.Frame_Received{Received: &relayv1.Received{DeliveryIds: r.DeliveryIds[:maxReceiptIDs:maxReceiptIDs]}}})
		r.DeliveryIds = r.DeliveryIds[maxReceiptIDs:]
	}
	if r == nil || len(r.DeliveryIds) > 0 {
		cn.ctl = append(cn.ctl, f)
	}
	cn.cmu.Unlock()
	select {
	case cn.ctlWake <- struct{}{}:
	default:
	}
}

// writeControl writes the frames control queues, after what sends queued
// before them, until ctx ends or a write fails, which ends the connection
// (the reader then learns it), as a failed write always has.
func (cn *conn) writeControl(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-cn.ctlWake:
		}
		// The frames are taken under the write lock, as the goodbye takes
		// them: taken before it, they could wait for the lock while the
		// goodbye wrote the Close, and then be dropped (receipts the edge
		// never got, whose events would come again to the next process).
		cn.wmu.Lock()
		cn.cmu.Lock()
		fs := cn.ctl
		cn.ctl = nil
		cn.cmu.Unlock()
		err := cn.writePending()
		for _, f := range fs {
			if err == nil {
				err = cn.w.Write(f)
			}
		}
		cn.wmu.Unlock()
		if err != nil {
			if !errors.Is(err, ErrClosed) {
				// Not after the goodbye, whose linger lets what it
				// wrote reach the edge.
				_ = cn.c.Abort(relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, "")
			}
			return
		}
	}
}

// queuedFrame is a frame in pend: its ticket and length.
type queuedFrame struct {
	ticket uint64
	size   int
}

// write writes f now, after the frames sends queued before it.
func (cn *conn) write(f *relayv1.Frame) error {
	cn.wmu.Lock()
	defer cn.wmu.Unlock()
	if err := cn.writePending(); err != nil {
		return err
	}
	return cn.w.Write(f)
}

// writeEncoded writes frames already encoded (frame.AppendMax) now,
// after the frames sends queued before them.
func (cn *conn) writeEncoded(b []byte) error {
	cn.wmu.Lock()
	defer cn.wmu.Unlock()
	if err := cn.writePending(); err != nil {
		return err
	}
	if _, err := cn.c.Write(b); err != nil {
		return fmt.Errorf("write frames: %w", err)
	}
	return nil
}

// queue appends an encoded frame to those waiting to be written, in the
// order of the calls (the callers hold sendMu, so in seq order), and
// returns its ticket (for unqueue). When flush is true, the caller must
// call flush: no other sender will write it.
func (cn *conn) queue(enc []byte) (ticket uint64, flush bool) {
	cn.pmu.Lock()
	defer cn.pmu.Unlock()
	cn.pend = append(cn.pend, enc...)
	cn.ticket++
	cn.queued = append(cn.queued, queuedFrame{ticket: cn.ticket, size: len(enc)})
	if cn.flushing {
		return cn.ticket, false
	}
	cn.flushing = true
	return cn.ticket, true
}

// unqueue takes the frame with ticket out of those waiting to be
// written; false when it is not there (a write has taken it).
func (cn *conn) unqueue(ticket uint64) bool {
	cn.pmu.Lock()
	defer cn.pmu.Unlock()
	off := 0
	for i, q := range cn.queued {
		if q.ticket == ticket {
			cn.pend = append(cn.pend[:off], cn.pend[off+q.size:]...)
			cn.queued = append(cn.queued[:i], cn.queued[i+1:]...)
			return true
		}
		off += q.size
	}
	return false
}

// flush writes the queued frames. With yield, it first lets the other
// runnable goroutines run, so that senders made runnable together (by a
// batch of acks, say) queue theirs too; a sender that goes on sending
// without blocking needs no yield (QUIC's connection goroutine packs its
// writes while it runs).
func (cn *conn) flush(yield bool) error {
	if yield {
		runtime.Gosched()
	}
	cn.wmu.Lock()
	defer cn.wmu.Unlock()
	return cn.writePending()
}

// writePending writes what sends queued; wmu held. After the goodbye
// it writes nothing and returns ErrClosed.
func (cn *conn) writePending() error {
	if cn.gone {
		return ErrClosed
	}
	cn.pmu.Lock()
	b := cn.pend
	cn.pend, cn.queued, cn.flushing = nil, cn.queued[:0], false
	cn.pmu.Unlock()
	if len(b) == 0 {
		return nil
	}
	if _, err := cn.c.Write(b); err != nil {
		return fmt.Errorf("write frames: %w", err)
	}
	return nil
}

// sendDatagram sends an encoded frame's body as a datagram; false when
// it must go on the stream instead (no datagrams, or too large for one).
func (cn *conn) sendDatagram(enc []byte) bool {
	if cn.noDatagrams {
		return false
	}
	_, n := binary.Uvarint(enc) // the length prefix
	return n > 0 && cn.c.SendDatagram(enc[n:]) == nil
}

// lingerer is a connection that can wait for the edge to hang up after
// the client's goodbye (devconn's QUIC and WebTransport connections; a
// WebSocket's close handshake does that itself).
type lingerer interface {
	Linger(ctx context.Context)
}

// close ends the connection: gracefully when no write is in progress
// (Close must not race a Write), else at once, rather than wait for a
// writer stuck on a dead edge.
func (cn *conn) close(code relayv1.ErrorCode, msg string) {
	if cn.wmu.TryLock() {
		_ = cn.c.Close(code, msg)
		cn.wmu.Unlock()
	} else {
		_ = cn.c.Abort(code, msg)
	}
	if cn.closeHook != nil {
		cn.closeHook()
	}
}

// goodbye ends the connection as the client's Close does, losing nothing
// written before it: under the write lock, taken once so that no other
// writer can come between, it writes what sends queued and the Close
// frame, then (QUIC, WebTransport) finishes the stream and waits until
// the edge hangs up, which it does once it read the goodbye, or until
// linger ends, and closes. The write deadline, set before, bounds the
// wait for the lock (a writer stuck on an edge that stopped reading
// fails then) and the writes; when they fail the connection is aborted.
func (cn *conn) goodbye(linger context.Context) {
	// What the pump gave (it ends once the client is closing) and what
	// the reader gave are acknowledged below, and nothing is given after.
	if cn.pumped != nil {
		select {
		case <-cn.pumped:
		case <-linger.Done():
		}
	}
	cn.hmu.Lock()
	cn.sealed = true
	if cn.rc != nil {
		cn.rc.flush()
	}
	cn.hmu.Unlock()
	cn.wmu.Lock()
	err := cn.writePending()
	// The receipts (and the rest) the control writer has not written
	// yet: events the application has must not come again.
	cn.cmu.Lock()
	fs := cn.ctl
	cn.ctl = nil
	cn.cmu.Unlock()
	for _, f := range fs {
		if err == nil {
			err = cn.w.Write(f)
		}
	}
	if err == nil {
		err = cn.w.Write(&relayv1.Frame{Kind: &relayv1.Frame_Close{Close: &relayv1.Close{}}})
	}
	cn.gone = true
	if err != nil {
		_ = cn.c.Abort(relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, "")
	} else {
		if l, ok := cn.c.(lingerer); ok {
			l.Linger(linger)
		}
		_ = cn.c.Close(relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, "")
	}
	cn.wmu.Unlock()
	if cn.closeHook != nil {
		cn.closeHook()
	}
}

const dialTimeout = 10 * time.Second

// Bounds on the time a frame from the edge may take from its first byte
// to its last: the Welcome's frame_timeout_ms, defaultFrameTimeout when
// it has none, and never less than minFrameTimeout (a Welcome of a few
// milliseconds would fail every frame that comes in two packets).
const (
	defaultFrameTimeout = 10 * time.Second
	minFrameTimeout     = 100 * time.Millisecond
)

// frameTimeout is the bound on a frame from an edge whose Welcome gave ms.
func frameTimeout(ms int64) time.Duration {
	if ms <= 0 {
		return defaultFrameTimeout
	}
	return max(time.Duration(min(ms, int64(time.Hour/time.Millisecond)))*time.Millisecond, minFrameTimeout)
}

// goodbyeTimeout bounds the Close frame's write, and any write still in
// progress when the client closes.
const goodbyeTimeout = time.Second

// wsPingEvery is the longest a WebSocket session goes without a Ping
// (docs/protocol.md): the edge closes one silent for its idle timeout.
const wsPingEvery = 10 * time.Second

// dial opens a transport connection and its session stream.
func (c *Client) dial(ctx context.Context) (*conn, error) {
	ctx, cancel := context.WithTimeout(ctx, dialTimeout)
	defer cancel()
	addr := c.edgeAddr()
	qc := devconn.QUICConfig(c.cfg.IdleTimeout)
	qc.KeepAlivePeriod = c.cfg.IdleTimeout / 3
	qc.TokenStore = c.cfg.QUICTokens
	switch c.cfg.Transport {
	case WebSocket:
		tlsConf := c.tlsConfig("http/1.1", addr)
		tr := &http.Transport{TLSClientConfig: tlsConf, ForceAttemptHTTP2: false}
		dialed := devconn.RecordDials(tr)
		hc := &http.Client{Transport: tr}
		ws, resp, err := websocket.Dial(ctx, "wss://"+addr+devconn.WebSocketPath, &websocket.DialOptions{HTTPClient: hc})
		if err != nil {
			hc.CloseIdleConnections()
			return nil, fmt.Errorf("websocket dial %s: %w", addr, err)
		}
		remote, _ := net.ResolveTCPAddr("tcp", addr)
		// The edge sends nothing while idle; the client pings (serve) so
		// both directions see traffic well within the idle timeout.
		return &conn{c: devconn.NewWebSocketConn(ws, dialed(), resp.TLS, remote, devconn.WebSocketLimits{Idle: c.cfg.IdleTimeout, MaxFrame: 1 << 20}), closeHook: hc.CloseIdleConnections,
			keepalive: min(c.cfg.IdleTimeout/3, wsPingEvery), noDatagrams: true}, nil
	case WebTransport:
		d := &webtransport.Transport{TLSClientConfig: c.tlsConfig("h3", addr), QUICConfig: qc}
		if tr := c.cfg.QUICTransport; tr != nil {
			// Config.QUICTransport carries WebTransport's QUIC connection
			// too (webtransport-go would otherwise open a socket of its own).
			d.DialAddr = func(ctx context.Context, addr string, tlsConf *tls.Config, conf *quic.Config) (*quic.Conn, error) {
				ua, err := net.ResolveUDPAddr("udp", addr)
				if err != nil {
					return nil, err
				}
				return tr.DialEarly(ctx, ua, tlsConf, conf)
			}
		}
		_, sess, err := d.Dial(ctx, "https://"+addr+devconn.WebTransportPath, nil)
		if err != nil {
			_ = d.Close()
			return nil, fmt.Errorf("webtransport dial %s: %w", addr, err)
		}
		str, err := sess.OpenStreamSync(ctx)
		if err != nil {
			_ = sess.CloseWithError(0, "")
			_ = d.Close()
			return nil, fmt.Errorf("open session stream: %w", err)
		}
		return &conn{c: devconn.NewWebTransportConn(sess, str), closeHook: func() { _ = d.Close() }}, nil
	default:
		var qconn *quic.Conn
		var err error
		if tr := c.cfg.QUICTransport; tr != nil {
			var ua *net.UDPAddr
			if ua, err = net.ResolveUDPAddr("udp", addr); err == nil {
				qconn, err = tr.Dial(ctx, ua, c.tlsConfig(devconn.ALPN, addr), qc)
			}
		} else {
			qconn, err = quic.DialAddr(ctx, addr, c.tlsConfig(devconn.ALPN, addr), qc)
		}
		if err != nil {
			return nil, fmt.Errorf("quic dial %s: %w", addr, err)
		}
		str, err := qconn.OpenStreamSync(ctx)
		if err != nil {
			_ = qconn.CloseWithError(0, "")
			return nil, fmt.Errorf("open session stream: %w", err)
		}
		return &conn{c: devconn.NewQUICConn(qconn, str)}, nil
	}
}

// connect dials and runs the handshake, resuming with the last ticket
// when there is one.
func (c *Client) connect(ctx context.Context) (*conn, error) {
	cn, err := c.dial(ctx)
	if err != nil {
		return nil, err
	}
	cn.r = frame.NewReader(cn.c, 0)
	cn.w = frame.NewWriter(cn.c, 0)
	cn.ctlWake = make(chan struct{}, 1)
	cn.pumped = make(chan struct{})
	if err := c.handshake(ctx, cn); err != nil {
		cn.close(relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, "")
		return nil, err
	}
	return cn, nil
}

func (c *Client) handshake(ctx context.Context, cn *conn) error {
	// Reads below block; the context (and the dial timeout) bound them by
	// closing the connection.
	hsCtx, cancel := context.WithTimeout(ctx, dialTimeout)
	defer cancel()
	stop := context.AfterFunc(hsCtx, func() { _ = cn.c.Abort(relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, "") })
	defer stop()

	c.mu.Lock()
	ticket, offset := c.ticket, c.offset
	c.mu.Unlock()
	sent := time.Now()
	// In the edge's time as far as this client knows it: a resume proof
	// must be within the edge's resume window of its clock.
	cn.noDatagrams = cn.noDatagrams || c.cfg.NoDatagrams
	// The proofs sign the binding of the TLS connection as this end sees
	// it: one made here is worthless on the connection of anything in
	// the middle (one that holds an edge's certificate or session key).
	if cn.binding = cn.c.ChannelBinding(); len(cn.binding) != proof.BindingSize {
		// Not expected: the client's TLS is always 1.3. Final, as
		// reconnecting would meet the same.
		return &Error{Code: relayv1.ErrorCode_ERROR_CODE_UNSUPPORTED_VERSION, Message: proof.ErrNoBinding.Error()}
	}
	cn.hello = &relayv1.Hello{NoDatagrams: cn.noDatagrams, DeferDatagrams: !cn.noDatagrams, UserId: c.cfg.UserID, DeviceId: c.cfg.DeviceID, ProtocolVersion: proof.ProtocolVersion,
		ClientTimeMs: sent.Add(offset).UnixMilli(), ResumeTicket: ticket, Instance: c.instance, MinRevision: c.cfg.MinRevision}
	if len(ticket) > 0 {
		if err := c.proveResume(cn.hello, cn.binding); err != nil {
			return err
		}
	}
	if err := cn.write(&relayv1.Frame{Kind: &relayv1.Frame_Hello{Hello: cn.hello}}); err != nil {
		return fmt.Errorf("send hello: %w", err)
	}
	// The edge's clock is learnt from the first of its frames: the
	// Challenge of a full handshake answers the Hello at once, while the
	// Welcome comes after the signature's round trip and the edge's work
	// (the device's mailbox read), which would make the offset late by
	// half of them.
	var chOffset, chErr time.Duration
	learnt := false
	for {
		var f relayv1.Frame
		body, err := cn.r.Next()
		if err == nil {
			if err = frame.Decode(body, cn.r.Max(), &f); err != nil && unknownKind(body) {
				// A newer edge's kind (edges are upgraded before
				// clients): skipped, as in the session (readFrame).
				c.log.Debug("skipped a frame of a kind this client does not know, in the handshake")
				continue
			}
		}
		if err != nil {
			if hsCtx.Err() != nil {
				return fmt.Errorf("handshake: %w", hsCtx.Err())
			}
			return fmt.Errorf("handshake: %w", closeReason(cn, err))
		}
		switch k := f.GetKind().(type) {
		case *relayv1.Frame_Challenge:
			if !learnt && k.Challenge.GetServerTimeMs() != 0 {
				// The edge stamped server_time about half a round trip ago.
				chErr = time.Since(sent) / 2
				chOffset = time.UnixMilli(k.Challenge.GetServerTimeMs()).Add(chErr).Sub(time.Now())
				learnt = true
			}
			if err := checkBinding(cn, k.Challenge); err != nil {
				// Signing would be of no use: the edge checks the
				// binding it sees. (The ticket is kept: it is not what
				// failed.)
				return err
			}
			if k.Challenge.GetTicketError() != 0 {
				c.log.Debug("resume ticket refused", "code", k.Challenge.GetTicketError().String())
				c.mu.Lock()
				c.ticket = nil
				c.mu.Unlock()
			}
			if err := cn.write(c.answer(cn, k.Challenge)); err != nil {
				return fmt.Errorf("send signature: %w", err)
			}
		case *relayv1.Frame_Welcome:
			w := k.Welcome
			offset, offsetErr := chOffset, chErr
			if !learnt {
				// A resumed session: the Welcome answers the Hello.
				offsetErr = time.Since(sent) / 2
				offset = time.UnixMilli(w.GetServerTimeMs()).Add(offsetErr).Sub(time.Now())
			}
			n := int(min(w.GetLimits().GetMaxFrameBytes(), frame.MaxFrameLimit))
			if n <= 0 {
				// An edge that announces no limit holds the default one,
				// not the one the previous edge announced.
				n = frame.DefaultMaxFrame
			}
			// The edge refuses (closing the session) a frame longer than
			// its limit, and relays events up to it, in frames a little
			// longer: the delivery's wrapping and the sender's ids. (No
			// edge announces more than MaxFrameLimit.)
			c.maxFrame.Store(int64(n))
			read := max(frame.DefaultMaxFrame, n+frame.DeliverSlack)
			cn.r.SetMax(read)
			if ws, ok := cn.c.(interface{ SetMaxFrame(int) }); ok {
				ws.SetMaxFrame(read)
			}
			// The edge gives a device's frame FrameTimeoutMs from its
			// first byte to its last; the client gives the edge's the
			// same, so an edge (or a middlebox) that stalls inside a
			// frame while the connection stays alive does not hold the
			// reader for good.
			cn.r.SetFrameTimeout(frameTimeout(w.GetLimits().GetFrameTimeoutMs()))
			c.mu.Lock()
			if len(w.GetResumeTicket()) > 0 {
				c.ticket = w.GetResumeTicket()
			}
			c.offset, c.offsetErr, c.sessionID, c.resumed = offset, offsetErr, w.GetSessionId(), w.GetResumed()
			c.skew = time.Duration(w.GetLimits().GetSkewToleranceMs()) * time.Millisecond
			c.mu.Unlock()
			return nil
		case *relayv1.Frame_Close:
			return closeError(k.Close)
		case *relayv1.Frame_Ping, *relayv1.Frame_Pong, *relayv1.Frame_Presence, *relayv1.Frame_Ticket:
			// Frames that may come at any time and ask nothing of a
			// client not yet welcomed: skipped, as the session skips
			// what it does not take.
			c.log.Debug("skipped a frame in the handshake", "kind", fmt.Sprintf("%T", k))
		default:
			return &Error{Code: relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME, Message: fmt.Sprintf("unexpected %T in the handshake", k)}
		}
	}
}

// proveResume signs the resume transcript of a Hello that carries a
// ticket, on the connection whose channel binding is binding: the ticket
// is worth nothing without the device's key.
func (c *Client) proveResume(h *relayv1.Hello, binding []byte) error {
	h.ResumeNonce = make([]byte, proof.ResumeNonceSize)
	if _, err := rand.Read(h.ResumeNonce); err != nil {
		return fmt.Errorf("resume nonce: %w", err)
	}
	h.ResumeProof = proof.ResumeTranscript{
		UserID: h.GetUserId(), DeviceID: h.GetDeviceId(), ProtocolVersion: h.GetProtocolVersion(), ClientTimeMs: h.GetClientTimeMs(),
		Instance: h.GetInstance(), Nonce: h.GetResumeNonce(), Ticket: h.GetResumeTicket(), Binding: binding,
	}.Sign(c.cfg.Key)
	return nil
}

// checkBinding compares the binding check of the edge's challenge with
// this end's binding: another value means the TLS connection does not
// end at the edge (a proxy terminates it, or someone is in the middle),
// and the edge will refuse every proof made on it. Without a check (an
// edge, or a middleman, that sends none) the proof goes out and the edge
// decides.
func checkBinding(cn *conn, ch *relayv1.Challenge) error {
	check := ch.GetBindingCheck()
	if len(check) == 0 || bytes.Equal(check, proof.BindingCheck(cn.binding)) {
		return nil
	}
	return &Error{Code: relayv1.ErrorCode_ERROR_CODE_UNSUPPORTED_VERSION, Message: fmt.Sprintf(
		"the edge is not at the other end of this TLS connection: TLS ends before it (a proxy that terminates TLS, "+
			"which protocol version %d does not allow: use a TCP or UDP load balancer) or someone is in the middle", proof.ProtocolVersion)}
}

// answer is the frame that answers a challenge: its transcript signed
// with the device key (docs/protocol.md).
func (c *Client) answer(cn *conn, ch *relayv1.Challenge) *relayv1.Frame {
	sig := transcriptFor(cn.hello, ch, cn.binding).Sign(c.cfg.Key)
	return &relayv1.Frame{Kind: &relayv1.Frame_Authenticate{Authenticate: &relayv1.Authenticate{Signature: sig}}}
}

// closeError is the error a Close frame carries.
func closeError(cl *relayv1.Close) *Error {
	return &Error{Code: cl.GetCode(), Message: cl.GetMessage(), ReconnectAfter: time.Duration(cl.GetReconnectAfterMs()) * time.Millisecond,
		ReplacedBy: cl.GetReplacingInstance()}
}

// closeReason turns a read error into the edge's close code where the
// transport carried one.
func closeReason(cn *conn, err error) error {
	if code, msg, ok := devconn.PeerCode(err); ok {
		return &Error{Code: code, Message: msg}
	}
	return err
}

// fatal reports whether a session end means reconnecting is pointless.
// Being replaced by this very client (an attempt it gave up on that the
// edge completed later) is not.
func (c *Client) fatal(err error) bool {
	var e *Error
	if errors.As(err, &e) && e.Code == relayv1.ErrorCode_ERROR_CODE_REPLACED && e.ReplacedBy == c.instance {
		return false
	}
	return fatal(err)
}

// fatal reports whether a session end means reconnecting is pointless.
func fatal(err error) bool {
	var e *Error
	if !errors.As(err, &e) {
		return false
	}
	switch e.Code {
	case relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED, relayv1.ErrorCode_ERROR_CODE_REVOKED,
		relayv1.ErrorCode_ERROR_CODE_UNSUPPORTED_VERSION, relayv1.ErrorCode_ERROR_CODE_REPLACED,
		relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME, relayv1.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE:
		return true
	}
	return false
}

// loop keeps a session up until Close or a fatal error.
func (c *Client) loop(first *conn) {
	defer close(c.done)
	cn := first
	backoff := c.cfg.ReconnectMin
	for {
		var wait time.Duration
		if cn != nil {
			began := time.Now()
			c.mu.Lock()
			lost := SessionLost{SessionID: c.sessionID} // the handshake just set it
			c.mu.Unlock()
			lost.Edge = c.Edge()
			err := c.serve(cn)
			if c.ctx.Err() != nil {
				c.stop(ErrClosed)
				return
			}
			if c.fatal(err) {
				c.log.Warn("session ended for good", "err", err)
				c.stop(err)
				return
			}
			c.log.Debug("session ended; reconnecting", "err", err)
			if c.cfg.OnSessionLost != nil {
				lost.Err = err
				c.cfg.OnSessionLost(lost)
			}
			if e := (*Error)(nil); !errors.As(err, &e) || e.Code == relayv1.ErrorCode_ERROR_CODE_GOING_AWAY {
				// Going away, or the connection broke without a word from
				// the edge (it may be gone): try another first (the ticket
				// works there).
				c.moveOn()
			}
			wait, backoff = reconnectWait(err, time.Since(began), backoff, c.cfg.ReconnectMin, c.cfg.ReconnectMax)
		} else {
			wait = jitter.Spread(backoff)
			backoff = min(backoff*2, c.cfg.ReconnectMax)
		}
		if wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-c.ctx.Done():
				t.Stop()
				c.stop(ErrClosed)
				return
			}
		}
		var err error
		cn, err = c.connect(c.ctx)
		if err != nil {
			if c.ctx.Err() != nil {
				c.stop(ErrClosed)
				return
			}
			if c.fatal(err) {
				c.log.Warn("cannot reconnect", "err", err)
				c.stop(err)
				return
			}
			c.log.Debug("reconnect failed", "err", err, "backoff", backoff)
			c.moveOn()
		}
	}
}

// stableSession is how long a session must have lasted for its end to
// reset the reconnect backoff.
const stableSession = 30 * time.Second

// MaxReconnectHint is the longest wait an edge's GOING_AWAY may ask for
// that a client takes (an edge spreads its devices' returns over its drain
// window, seconds).
const MaxReconnectHint = 5 * time.Minute

// reconnectWait is how long to wait before reconnecting after a session
// that lasted for lasted ended with err, and the backoff after that. An
// edge going away says when to come back. The first reconnect after a
// session that lasted is soon (a connection lost after a long, healthy
// session is worth retrying now), after a wait drawn from [0, spreadMax]:
// an edge that dies takes all its devices' sessions with it, and they
// should not all reach the next edge in the same instant. A session
// that ends soon after it began (an edge that accepts and then drops the
// device, again and again) or one the edge ended as RATE_LIMITED is
// followed by a wait drawn from the backoff, which doubles up to maxB, so
// a client cannot spin against its edge.
//
// An edge's hint is taken within [0, MaxReconnectHint], and after a
// session that ended soon after it began no sooner than the backoff: an
// edge (faulty or not this client's) can neither park a client for ever
// nor make it spin.
func reconnectWait(err error, lasted, backoff, minB, maxB time.Duration) (wait, next time.Duration) {
	var e *Error
	isErr := errors.As(err, &e)
	if isErr && e.Code == relayv1.ErrorCode_ERROR_CODE_GOING_AWAY {
		hint := min(max(e.ReconnectAfter, 0), MaxReconnectHint)
		if lasted >= stableSession {
			return hint, minB
		}
		return max(hint, jitter.Spread(backoff)), min(backoff*2, maxB)
	}
	if lasted >= stableSession {
		backoff = minB
		if !isErr || e.Code != relayv1.ErrorCode_ERROR_CODE_RATE_LIMITED {
			return mrand.N(spreadMax(minB) + 1), minB
		}
	}
	return jitter.Spread(backoff), min(backoff*2, maxB)
}

// spreadMax bounds the wait before the first reconnect after a session
// that lasted: ReconnectMin, or a second if that is longer. Short: the
// point is to spread the devices of an edge out, not to slow them down.
func spreadMax(minB time.Duration) time.Duration { return max(minB, time.Second) }

// stop ends the client: pending sends fail with err, Events closes.
func (c *Client) stop(err error) {
	c.mu.Lock()
	c.err = err
	pending := c.order
	c.order, c.pending = nil, map[string]*pendingSend{}
	c.mu.Unlock()
	for _, p := range pending {
		p.done <- err
	}
	close(c.events)
	close(c.presence)
}

// expirySlack is how much later than the edge's clock, as this client
// knows it, an event must have expired before the client refuses it
// itself rather than resend it: the clocks are read at different moments
// and in whole milliseconds, and the edge must certainly refuse it.
const expirySlack = time.Second

// edgeEarliest is the earliest the edge's clock may read, in Unix
// milliseconds, when this client's reads now: now corrected by the offset
// learnt in the handshake, less that offset's error and expirySlack.
func edgeEarliest(now time.Time, offset, offsetErr time.Duration) int64 {
	return now.Add(offset).Add(-offsetErr - expirySlack).UnixMilli()
}

// expired is the EXPIRED *Error the edge would refuse p with, by
// validate's rule (expired once its age is ttl plus the skew tolerance),
// when its clock says nowMs at the earliest; nil when it might take p, or
// when the skew tolerance is not known (skew 0).
func (p *pendingSend) expired(nowMs int64, skew time.Duration) error {
	skewMs := skew.Milliseconds()
	if skewMs <= 0 || p.createdMs > nowMs {
		return nil
	}
	// Both non-negative: no overflow.
	if age := nowMs - p.createdMs; age >= p.ttlMs && age-p.ttlMs >= skewMs {
		return &Error{Code: relayv1.ErrorCode_ERROR_CODE_EXPIRED, Message: fmt.Sprintf("event %s: created %s ago with a ttl of %d ms, tolerance %s: not sent again",
			p.id, time.Duration(age)*time.Millisecond, p.ttlMs, skew)}
	}
	return nil
}

// serve runs one established session: resend what is unacknowledged,
// then read until it ends. It returns why it ended.
func (c *Client) serve(cn *conn) error {
	c.sendMu.Lock()
	c.mu.Lock()
	var resend []byte // the unacknowledged events, encoded, in seq order
	// An event encoded under a larger frame limit (another edge's) than
	// this session's would end the session for good, and one the edge
	// would refuse as expired costs a refusal (a device back after a long
	// sleep with many of them would be closed as RATE_LIMITED, again and
	// again): each fails alone, here, as the edge would refuse it.
	limit := int(c.maxFrame.Load())
	if limit <= 0 {
		limit = frame.DefaultMaxFrame
	}
	edgeNow := edgeEarliest(time.Now(), c.offset, c.offsetErr)
	failed := map[*pendingSend]error{}
	for _, p := range c.order {
		if n, _ := binary.Uvarint(p.enc); n > uint64(limit) {
			failed[p] = &Error{Code: relayv1.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE, Message: fmt.Sprintf("the event is longer than this edge's frame limit of %d bytes", limit)}
			continue
		}
		if err := p.expired(edgeNow, c.skew); err != nil {
			failed[p] = err
			continue
		}
		resend = append(resend, p.enc...)
	}
	if len(failed) > 0 {
		c.order = slices.DeleteFunc(c.order, func(p *pendingSend) bool { return failed[p] != nil })
		maps.DeleteFunc(c.pending, func(_ string, p *pendingSend) bool { return failed[p] != nil })
		for p, err := range failed {
			p.done <- err
		}
	}
	c.online = map[string]bool{}
	c.cur = cn
	close(c.ready)
	info := SessionInfo{Edge: c.addrs()[c.addr%len(c.addrs())], SessionID: c.sessionID, Resumed: c.resumed}
	c.mu.Unlock()

	// Close is watched from before the resend: a resend of many events
	// to an edge that paces them, or over a network that just went,
	// must not hold Close up.
	ctx, cancel := context.WithCancel(c.ctx)
	// read ends when the reader does: the edge then reads nothing more
	// either (it closed the session), so a goodbye waits no longer.
	read, readEnded := context.WithCancel(context.Background())
	defer readEnded()
	var wg sync.WaitGroup
	wg.Go(func() {
		<-ctx.Done()
		if c.ctx.Err() == nil {
			cn.close(relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, "")
			return
		}
		// Close: say goodbye so the edge tells the others at once, and
		// let what was written before it reach the edge; but give it
		// (and a write already stuck on an edge that stopped reading,
		// which the deadline ends too) no more than goodbyeTimeout in
		// all.
		deadline := time.Now().Add(goodbyeTimeout)
		_ = cn.c.SetWriteDeadline(deadline)
		linger, stop := context.WithDeadline(read, deadline)
		cn.goodbye(linger)
		stop()
	})
	// Read from before the resend: a resend of many events to an edge
	// that paces them takes long, and meanwhile what the edge has for the
	// device must be taken, or it ends the session as SLOW_CONSUMER.
	// The reader's frames are written apart from it (control); that
	// writer ends with the session, its write failing once the
	// connection is closed, below or by the reader's end.
	wg.Go(func() { cn.writeControl(ctx) })
	readErr := make(chan error, 1)
	wg.Go(func() {
		err := c.readStream(ctx, cn)
		readEnded()
		cancel()
		readErr <- err
	})
	if len(resend) > 0 {
		// In one write; a failure ends the connection, which the reader
		// sees.
		_ = cn.writeEncoded(resend)
	}
	c.sendMu.Unlock()
	// Not under sendMu: the callback may send ephemeral events.
	if c.cfg.OnSession != nil {
		c.cfg.OnSession(info)
	}
	wg.Go(func() { c.readDatagrams(ctx, cn) })
	if cn.keepalive > 0 {
		wg.Go(func() {
			t := time.NewTicker(cn.keepalive)
			defer t.Stop()
			for n := uint64(1); ; n++ {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
					if err := cn.write(&relayv1.Frame{Kind: &relayv1.Frame_Ping{Ping: &relayv1.Ping{Nonce: n}}}); err != nil {
						return
					}
				}
			}
		})
	}
	err := <-readErr
	wg.Wait()

	c.mu.Lock()
	c.cur = nil
	c.ready = make(chan struct{})
	// What this session said is online is not known any more: reported
	// offline (the next session reports who is online).
	var gone []string
	for id, on := range c.online {
		if on {
			gone = append(gone, id)
		}
	}
	c.online = map[string]bool{}
	c.mu.Unlock()
	slices.Sort(gone)
	for _, id := range gone {
		select {
		case c.presence <- Presence{DeviceID: id, Online: false}:
		default:
		}
	}
	return err
}

func (c *Client) readStream(ctx context.Context, cn *conn) error {
	rc := &receipts{cn: cn}
	in := newInbox(c, cn)
	cn.hmu.Lock()
	cn.rc = rc
	cn.hmu.Unlock()
	pctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() {
		in.pump(pctx)
		if cn.pumped != nil {
			close(cn.pumped)
		}
	})
	defer func() {
		stop()
		wg.Wait()
		in.drop()
	}()
	rc.in = in
	var events frame.EventDecoder
	for {
		body, err := cn.r.Next()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return io.EOF
			}
			return closeReason(cn, err)
		}
		handled, err := c.readFast(ctx, cn, &events, body, rc)
		if !handled && err == nil {
			err = c.readFrame(ctx, cn, body, rc)
		}
		if err != nil {
			return err
		}
		// Acknowledge in batches: whatever arrived together (deliver
		// sends a full batch itself, holding the lock already).
		if cn.r.Buffered() == 0 {
			cn.hmu.Lock()
			rc.flush()
			cn.hmu.Unlock()
		}
	}
}

// receipts are the delivery ids of events handed to the application and
// not yet acknowledged to the edge (guarded by the conn's hmu); in holds
// the events that wait for room in the application's channel.
type receipts struct {
	cn  *conn
	ids []uint64
	in  *inbox
}

// flush queues the receipts (if any) for the control writer, in one
// Received frame; the conn's hmu held.
func (r *receipts) flush() {
	if len(r.ids) == 0 {
		return
	}
	r.cn.control(&relayv1.Frame{Kind: &relayv1.Frame_Received{Received: &relayv1.Received{DeliveryIds: slices.Clone(r.ids)}}})
	r.ids = r.ids[:0]
}

// hold takes the conn's hmu to give the application an event and note
// its receipt in r, and reports true; or, once the goodbye took the
// receipts, releases it and reports false: the event is not given
// (unacknowledged, it comes again).
func (r *receipts) hold() bool {
	r.cn.hmu.Lock()
	if r.cn.sealed {
		r.cn.hmu.Unlock()
		return false
	}
	return true
}

// release ends what hold began.
func (r *receipts) release() { r.cn.hmu.Unlock() }

// readFast handles the frames a busy client reads most, a Deliver and an
// Ack, without the protobuf runtime: the frame package's decoders, which
// give what it gives. handled is false for every other frame, and for one
// of a shape the edge does not write: readFrame takes it. A Deliver's
// delivery id joins receipts; an error ends the session.
func (c *Client) readFast(ctx context.Context, cn *conn, events *frame.EventDecoder, body []byte, receipts *receipts) (handled bool, err error) {
	kind, inner, ok := frame.Split(body)
	switch {
	case ok && kind == frame.KindAck:
		id, ok := frame.AckEventID(inner)
		if ok {
			c.resolve(id, nil)
		}
		return ok, nil
	case ok && kind == frame.KindDeliver:
		enc, deliveryID, ok := frame.SplitDeliver(inner)
		if !ok {
			return false, nil
		}
		ev := &relayv1.Event{}
		if err := events.Decode(enc, ev); err != nil {
			return true, closeReason(cn, err)
		}
		ev.Payload = bytes.Clone(ev.Payload) // it pointed into the read buffer
		return true, c.deliver(ctx, ev, deliveryID, receipts)
	}
	return false, nil
}

// readFrame decodes a frame from the edge with the protobuf runtime and
// acts on it; an error ends the session. A frame of a kind this client
// does not know (a newer edge's: edges are upgraded before clients) or
// does not take from an edge is skipped, as unknown fields are; bytes
// that are no frame end the session.
func (c *Client) readFrame(ctx context.Context, cn *conn, body []byte, receipts *receipts) error {
	f := &relayv1.Frame{}
	if err := frame.Decode(body, cn.r.Max(), f); err != nil {
		if unknownKind(body) {
			c.log.Debug("skipped a frame of a kind this client does not know")
			return nil
		}
		return closeReason(cn, err)
	}
	if ctx.Err() != nil {
		// Closing: the edge's answers to sends still count, and its
		// Close; a cancellation, presence, a challenge or a ping are
		// for a session that is over.
		switch f.GetKind().(type) {
		case *relayv1.Frame_Ack, *relayv1.Frame_Reject, *relayv1.Frame_Close, *relayv1.Frame_Ticket:
		default:
			return nil
		}
	}
	switch k := f.GetKind().(type) {
	case *relayv1.Frame_Deliver:
		if k.Deliver.GetEvent() == nil {
			return nil // no event to give (no edge sends that)
		}
		return c.deliver(ctx, k.Deliver.GetEvent(), k.Deliver.GetDeliveryId(), receipts)
	case *relayv1.Frame_Cancel:
		// Only an event the application was given (or is being given:
		// the cancellation goes behind it in the inbox) needs undoing;
		// one it was not is just never given (a late copy is a
		// duplicate).
		cl := k.Cancel
		if c.cancelled(cl.GetSenderDeviceId(), cl.GetEventId()) {
			if !receipts.hold() {
				return nil
			}
			defer receipts.release()
			return receipts.in.put(Event{ID: cl.GetEventId(), Sender: cl.GetSenderDeviceId(), Cancelled: true}, 0, false, receipts)
		}
	case *relayv1.Frame_Ack:
		c.resolve(k.Ack.GetEventId(), nil)
	case *relayv1.Frame_Reject:
		r := k.Reject
		c.resolve(r.GetEventId(), &Error{Code: r.GetCode(), Message: r.GetMessage()})
	case *relayv1.Frame_Presence:
		p := Presence{DeviceID: k.Presence.GetDeviceId(), Online: k.Presence.GetOnline()}
		c.mu.Lock()
		c.online[p.DeviceID] = p.Online
		c.mu.Unlock()
		select {
		case c.presence <- p:
		default:
		}
	case *relayv1.Frame_Ticket:
		c.mu.Lock()
		c.ticket = k.Ticket.GetResumeTicket()
		c.mu.Unlock()
	case *relayv1.Frame_Challenge:
		// The session reached its maximum age: prove the key again.
		cn.control(c.answer(cn, k.Challenge))
	case *relayv1.Frame_Ping:
		cn.control(&relayv1.Frame{Kind: &relayv1.Frame_Pong{Pong: &relayv1.Pong{Nonce: k.Ping.GetNonce()}}})
	case *relayv1.Frame_Pong:
	case *relayv1.Frame_Close:
		return closeError(k.Close)
	default:
		c.log.Debug("skipped a frame a client does not take", "kind", fmt.Sprintf("%T", k))
	}
	return nil
}

// unknownKind reports whether body decodes as a frame whose kind this
// client's schema does not have (frame.Decode refuses it for having none).
func unknownKind(body []byte) bool {
	var f relayv1.Frame
	return proto.Unmarshal(body, &f) == nil && f.GetKind() == nil
}

func (c *Client) readDatagrams(ctx context.Context, cn *conn) {
	for {
		b, err := cn.c.ReceiveDatagram(ctx)
		if err != nil {
			return
		}
		var f relayv1.Frame
		if err := frame.Decode(b, 0, &f); err != nil || f.GetDeliver() == nil {
			continue // a datagram is only ever an ephemeral delivery
		}
		if c.deliver(ctx, f.GetDeliver().GetEvent(), 0, nil) != nil {
			return
		}
	}
}

// deliver hands an event to the application once: from the stream
// (r not nil) through the session's inbox, whose receipts r collects or
// the inbox sends once the application has the event; from a datagram
// (r nil) straight on the channel, waiting for room. The event counts as
// seen only once the application has it: one that could not be handed
// over (the connection broke while the application lagged) comes again,
// unacknowledged, and that copy must be given, not dropped as a
// duplicate.
func (c *Client) deliver(ctx context.Context, ev *relayv1.Event, deliveryID uint64, r *receipts) error {
	sender, id := ev.GetSenderDeviceId(), ev.GetId()
	if id == "" || ctx.Err() != nil {
		// No event to give (no edge sends one without an id), or the
		// client is closing: what comes while it waits for the edge to
		// hang up is neither given nor acknowledged (the edge keeps a
		// durable one in the mailbox).
		return nil
	}
	if r != nil {
		if !r.hold() {
			return nil
		}
		defer func() {
			if len(r.ids) >= maxReceiptIDs {
				r.flush()
			}
			r.release()
		}()
	}
	if !c.claim(sender, id) {
		// A duplicate: acknowledged again, not given again.
		if r != nil && deliveryID != 0 {
			r.ids = append(r.ids, deliveryID)
		}
		return nil
	}
	out := Event{
		ID: id, Sender: sender, Seq: ev.GetSeq(), Type: ev.GetType(), Payload: ev.GetPayload(),
		CreatedAt: time.UnixMilli(ev.GetCreatedAtMs()), TTL: time.Duration(ev.GetTtlMs()) * time.Millisecond, Ephemeral: ev.GetEphemeral(),
		AnyOne: ev.GetAnyOne(),
	}
	if r != nil {
		return r.in.put(out, deliveryID, true, r)
	}
	err := c.handOver(ctx, out)
	c.settle(sender, id, err == nil)
	return err
}

// handOver puts ev on the application's channel; ctx's error when the
// client is closing first.
func (c *Client) handOver(ctx context.Context, ev Event) error {
	select {
	case c.events <- ev:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// WaitConnected waits until a session is up (for example after a
// reconnect).
func (c *Client) WaitConnected(ctx context.Context) error {
	for {
		c.mu.Lock()
		ready, err := c.ready, c.err
		c.mu.Unlock()
		if err != nil {
			return err
		}
		select {
		case <-ready:
			return nil
		case <-c.done:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Bounds of what a session's inbox holds for an application that lags.
// Durable deliveries it holds are not acknowledged, so the edge sends no
// more than its unacknowledged limit of them (1024 and 4 MiB by
// default); an edge that sends far more ends the session. Ephemeral ones
// beyond maxHeldEphemeral are dropped, as where any receiver is slow.
const (
	maxHeldEphemeral = 1024
	maxHeld          = 1 << 16
	maxHeldBytes     = 64 << 20
)

// inbox hands a session's events to the application's channel in the
// order they came, without ever holding up the stream's reader: an event
// that finds the channel full (or others waiting) waits here, and pump
// gives them over as the application reads. So the frames behind it (an
// Ack a Send waits for, a Close, the edge's challenge at the session's
// maximum age) are read meanwhile: an application that calls Send from
// its Events loop cannot deadlock its own client. A waiting event's
// receipt goes once the application has it.
type inbox struct {
	c  *Client
	cn *conn

	mu        sync.Mutex // guards the fields below
	q         []heldEvent
	bytes     int
	ephemeral int
	wake      chan struct{} // capacity 1: events were added
}

type heldEvent struct {
	ev       Event
	delivery uint64 // 0: nothing to acknowledge
	claimed  bool   // settle when given or dropped (see Client.claim)
}

func newInbox(c *Client, cn *conn) *inbox {
	return &inbox{c: c, cn: cn, wake: make(chan struct{}, 1)}
}

// heldSize is what a held event weighs against maxHeldBytes: all it
// holds that the edge chose, its ids and type with its payload (an edge
// could otherwise fill the inbox with events of an empty payload and ids
// near the frame limit).
func heldSize(ev Event) int {
	return len(ev.Payload) + len(ev.ID) + len(ev.Sender) + len(ev.Type)
}

// put gives ev to the application at once when the channel has room and
// nothing waits before it (its receipt joining r), else holds it;
// claimed: ev's id was claimed (Client.claim), and is settled. When
// the first event is held, the receipts r holds go out at once: the
// events the application was given already are acknowledged to their
// senders while this one waits.
func (in *inbox) put(ev Event, delivery uint64, claimed bool, r *receipts) error {
	settle := func(taken bool) {
		if claimed {
			in.c.settle(ev.Sender, ev.ID, taken)
		}
	}
	in.mu.Lock()
	first := len(in.q) == 0
	if first {
		select {
		case in.c.events <- ev:
			in.mu.Unlock()
			settle(true)
			if delivery != 0 {
				r.ids = append(r.ids, delivery)
			}
			return nil
		default:
		}
	}
	var err error
	switch {
	case ev.Ephemeral && in.ephemeral >= maxHeldEphemeral:
		settle(false) // dropped: the application lags
	case len(in.q) >= maxHeld || in.bytes+heldSize(ev) > maxHeldBytes:
		settle(false)
		err = fmt.Errorf("the edge sent %d events (%d bytes) this client was not ready for, beyond what it may leave unacknowledged", len(in.q)+1, in.bytes+heldSize(ev))
	default:
		in.q = append(in.q, heldEvent{ev: ev, delivery: delivery, claimed: claimed})
		in.bytes += heldSize(ev)
		if ev.Ephemeral {
			in.ephemeral++
		}
		select {
		case in.wake <- struct{}{}:
		default:
		}
	}
	in.mu.Unlock()
	if first && err == nil {
		// Written outside the lock, which pump takes to give the
		// application the next held event.
		r.flush()
	}
	return err
}

// pump gives the held events to the application, in order, as it reads,
// and acknowledges them to the edge (in one Received frame for each run
// of them, at most 256, and before each wait for the application), until
// ctx ends; then it gives no more, and queues the receipts of what it
// gave before it returns (the goodbye waits for them).
func (in *inbox) pump(ctx context.Context) {
	var ids []uint64
	flush := func() {
		if len(ids) == 0 {
			return
		}
		in.cn.control(&relayv1.Frame{Kind: &relayv1.Frame_Received{Received: &relayv1.Received{DeliveryIds: slices.Clone(ids)}}})
		ids = ids[:0]
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-in.wake:
		}
		for {
			if ctx.Err() != nil {
				flush()
				return
			}
			in.mu.Lock()
			if len(in.q) == 0 {
				in.mu.Unlock()
				break
			}
			h := in.q[0]
			in.mu.Unlock()
			select {
			case in.c.events <- h.ev:
			default:
				// The application lags: what it was given is
				// acknowledged before the wait.
				flush()
				select {
				case in.c.events <- h.ev:
				case <-ctx.Done():
					return
				}
			}
			in.mu.Lock()
			in.q[0] = heldEvent{}
			in.q = in.q[1:]
			in.bytes -= heldSize(h.ev)
			if h.ev.Ephemeral {
				in.ephemeral--
			}
			in.mu.Unlock()
			if h.claimed {
				in.c.settle(h.ev.Sender, h.ev.ID, true)
			}
			if h.delivery != 0 {
				ids = append(ids, h.delivery)
			}
			if len(ids) >= maxReceiptIDs {
				flush()
			}
		}
		flush()
	}
}

// drop ends the inbox with its session: the events still held were not
// given, so they count as unseen (unacknowledged, they come again on
// the next session, and that copy is given). pump has returned.
func (in *inbox) drop() {
	in.mu.Lock()
	defer in.mu.Unlock()
	for _, h := range in.q {
		if h.claimed {
			in.c.settle(h.ev.Sender, h.ev.ID, false)
		}
	}
	in.q, in.bytes, in.ephemeral = nil, 0, 0
}
