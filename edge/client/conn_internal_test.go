package client

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
	"log/slog"
	"math"
	"net"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/iotest"
	"time"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/edge/devconn"
	"github.com/edge-relay/relay/edge/frame"
	"github.com/edge-relay/relay/edge/idwindow"
	"github.com/edge-relay/relay/edge/proof"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// writesConn is a devconn.Conn that keeps each Write apart.
type writesConn struct {
	devconn.Conn // only Write is used
	writes       [][]byte
}

func (w *writesConn) Write(b []byte) (int, error) {
	w.writes = append(w.writes, bytes.Clone(b))
	return len(b), nil
}

func pingFrame(n uint64) *relayv1.Frame {
	return &relayv1.Frame{Kind: &relayv1.Frame_Ping{Ping: &relayv1.Ping{Nonce: n}}}
}

// encodedPing is pingFrame(n) encoded, as sends queue their frames.
func encodedPing(t *testing.T, n uint64) []byte {
	t.Helper()
	b, err := frame.Append(nil, pingFrame(n))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// frames decodes the frames of one write, in order.
func frames(t *testing.T, b []byte) []uint64 {
	t.Helper()
	r := frame.NewReader(bytes.NewReader(b), 0)
	var got []uint64
	for {
		var f relayv1.Frame
		if err := r.Read(&f); err != nil {
			return got
		}
		got = append(got, f.GetPing().GetNonce())
	}
}

// Frames queued by sends go out in one write, in the order they were
// queued, written by the one send told to flush; a frame written
// directly goes after what was queued before it.
func TestQueuedFramesShareOneWrite(t *testing.T) {
	wc := &writesConn{}
	cn := &conn{c: wc, w: frame.NewWriter(wc, 0)}
	for i := range uint64(3) {
		if _, flush := cn.queue(encodedPing(t, i+1)); flush != (i == 0) {
			t.Fatalf("queue %d: flush %v", i, flush)
		}
	}
	if len(wc.writes) != 0 {
		t.Fatal("queue wrote")
	}
	if err := cn.flush(true); err != nil {
		t.Fatal(err)
	}
	if len(wc.writes) != 1 || !slices.Equal(frames(t, wc.writes[0]), []uint64{1, 2, 3}) {
		t.Fatalf("writes: %d, first %v", len(wc.writes), frames(t, wc.writes[0]))
	}
	// Flushed: the next queued frame makes its sender the flusher again.
	if _, flush := cn.queue(encodedPing(t, 4)); !flush {
		t.Fatal("the first frame queued after a flush must be flushed by its sender")
	}
	if err := cn.write(pingFrame(5)); err != nil {
		t.Fatal(err)
	}
	if len(wc.writes) != 3 || !slices.Equal(frames(t, wc.writes[1]), []uint64{4}) || !slices.Equal(frames(t, wc.writes[2]), []uint64{5}) {
		t.Fatalf("want the queued frame, then the direct one: %d writes", len(wc.writes))
	}
	// The flusher finds nothing left: no empty write.
	if err := cn.flush(false); err != nil || len(wc.writes) != 3 {
		t.Fatalf("empty flush: %v, %d writes", err, len(wc.writes))
	}

}

// acknowledged returns the delivery ids of the Received frames written
// to wc, then of those still waiting for cn's control writer, in order.
func acknowledged(cn *conn, wc *writesConn) []uint64 {
	var ids []uint64
	for _, w := range wc.writes {
		r := frame.NewReader(bytes.NewReader(w), 0)
		for {
			var f relayv1.Frame
			if err := r.Read(&f); err != nil {
				break
			}
			ids = append(ids, f.GetReceived().GetDeliveryIds()...)
		}
	}
	cn.cmu.Lock()
	defer cn.cmu.Unlock()
	for _, f := range cn.ctl {
		ids = append(ids, f.GetReceived().GetDeliveryIds()...)
	}
	return ids
}

// until waits, for 30 s at most, until cond holds (a state another
// goroutine reaches without telling).
func until(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within 30s: %s", what)
		}
		runtime.Gosched()
	}
}

// readerClient is a client with what readStream needs: an application's
// channel of buffer events, and no sends pending.
func readerClient(buffer int) *Client {
	return &Client{
		cfg:     Config{DedupWindow: 16},
		log:     slog.New(slog.DiscardHandler),
		events:  make(chan Event, buffer),
		pending: map[string]*pendingSend{},
		seen:    map[string]*idwindow.Window[string]{},
		seed:    maphash.MakeSeed(),
	}
}

// readStream takes the edge's Deliver and Ack frames on the fast path and
// any other shape of them through the protobuf runtime, with the same
// result: each event given once, its payload the client's own, every
// delivery acknowledged, every acked send resolved.
func TestReadStreamFastAndSlowFrames(t *testing.T) {
	body := func(kind protowire.Number, msg proto.Message, extra bool) []byte {
		inner, err := proto.Marshal(msg)
		if err != nil {
			t.Fatal(err)
		}
		if extra { // a field this client does not know: not the fast path's shape
			inner = protowire.AppendVarint(protowire.AppendTag(inner, 99, protowire.VarintType), 1)
		}
		b := protowire.AppendBytes(protowire.AppendTag(nil, kind, protowire.BytesType), inner)
		return protowire.AppendBytes(nil, b) // length-prefixed
	}
	deliver := func(id, payload string, deliveryID uint64, extra bool) []byte {
		return body(frame.KindDeliver, &relayv1.Deliver{
			Event:      &relayv1.Event{Id: id, SenderDeviceId: "a", Seq: deliveryID, Type: "t", Payload: []byte(payload)},
			DeliveryId: deliveryID,
		}, extra)
	}
	var stream []byte
	stream = append(stream, deliver("e1", "p1", 5, false)...)
	stream = append(stream, deliver("e2", "p2", 6, true)...)
	stream = append(stream, deliver("e1", "p1", 7, false)...) // a duplicate: acknowledged, not given again
	stream = append(stream, body(frame.KindAck, &relayv1.Ack{EventId: "s1"}, false)...)
	stream = append(stream, body(frame.KindAck, &relayv1.Ack{EventId: "s2"}, true)...)

	wc := &writesConn{}
	cn := &conn{c: wc, w: frame.NewWriter(wc, 0), r: frame.NewReader(iotest.OneByteReader(bytes.NewReader(stream)), 0)}
	c := readerClient(8)
	sends := map[string]*pendingSend{}
	for _, id := range []string{"s1", "s2", "s3"} {
		p := &pendingSend{done: make(chan error, 1)}
		sends[id] = p
		c.pending[id] = p
		c.order = append(c.order, p)
	}
	if err := c.readStream(t.Context(), cn); !errors.Is(err, io.EOF) {
		t.Fatalf("readStream ended with %v, want io.EOF", err)
	}
	if got := given(c, func(ev Event) string { return ev.ID + ":" + string(ev.Payload) }); !slices.Equal(got, []string{"e1:p1", "e2:p2"}) {
		t.Fatalf("events given: %v", got)
	}
	if receipts := acknowledged(cn, wc); !slices.Equal(receipts, []uint64{5, 6, 7}) {
		t.Fatalf("deliveries acknowledged: %v", receipts)
	}
	for id, p := range sends {
		select {
		case err := <-p.done:
			if id == "s3" || err != nil {
				t.Fatalf("send %s resolved with %v", id, err)
			}
		default:
			if id != "s3" {
				t.Fatalf("send %s was acked but not resolved", id)
			}
		}
	}
}

// While the client closes (its session's context ended: Close said
// goodbye and waits for the edge to hang up), a delivery is neither
// given to the application nor acknowledged, so the edge keeps it for
// the device's next session; an Ack still resolves its send.
func TestDeliveriesWhileClosingAreNotTaken(t *testing.T) {
	var stream []byte
	for i, id := range []string{"e1", "e2"} {
		b, err := frame.Append(nil, &relayv1.Frame{Kind: &relayv1.Frame_Deliver{Deliver: &relayv1.Deliver{
			Event: &relayv1.Event{Id: id, SenderDeviceId: "a", Seq: uint64(i + 1), Payload: []byte(id)}, DeliveryId: uint64(i + 1)}}})
		if err != nil {
			t.Fatal(err)
		}
		stream = append(stream, b...)
	}
	ack, err := frame.Append(nil, &relayv1.Frame{Kind: &relayv1.Frame_Ack{Ack: &relayv1.Ack{EventId: "s1"}}})
	if err != nil {
		t.Fatal(err)
	}
	stream = append(stream, ack...)
	wc := &writesConn{}
	cn := &conn{c: wc, w: frame.NewWriter(wc, 0), r: frame.NewReader(bytes.NewReader(stream), 0)}
	c := readerClient(8)
	p := &pendingSend{done: make(chan error, 1)}
	c.pending["s1"] = p
	c.order = append(c.order, p)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := c.readStream(ctx, cn); !errors.Is(err, io.EOF) {
		t.Fatalf("readStream ended with %v, want io.EOF", err)
	}
	if got := given(c, func(ev Event) string { return ev.ID }); len(got) != 0 {
		t.Fatalf("events given while closing: %v", got)
	}
	if ids := acknowledged(cn, wc); len(wc.writes) != 0 || len(ids) != 0 {
		t.Fatalf("%d writes while closing, receipts %v", len(wc.writes), ids)
	}
	select {
	case err := <-p.done:
		if err != nil {
			t.Fatalf("the acked send: %v", err)
		}
	default:
		t.Fatal("an Ack while closing did not resolve its send")
	}
}

// slowConn is a devconn.Conn on a slow network: each Write takes a
// while. It records the writes' first frames' kinds, and how it ended.
type slowConn struct {
	devconn.Conn
	mu       sync.Mutex
	kinds    []string
	received []uint64 // the delivery ids of the Received frames
	lingered bool
	closed   bool
	aborted  bool
}

func (s *slowConn) Write(b []byte) (int, error) {
	time.Sleep(200 * time.Microsecond) // the network, not synchronisation
	var f relayv1.Frame
	if err := frame.NewReader(bytes.NewReader(b), 0).Read(&f); err == nil {
		s.mu.Lock()
		s.kinds = append(s.kinds, fmt.Sprintf("%T", f.GetKind()))
		s.received = append(s.received, f.GetReceived().GetDeliveryIds()...)
		s.mu.Unlock()
	}
	return len(b), nil
}

func (s *slowConn) Linger(context.Context) { s.mu.Lock(); s.lingered = true; s.mu.Unlock() }

func (s *slowConn) Close(relayv1.ErrorCode, string) error {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	return nil
}

func (s *slowConn) Abort(relayv1.ErrorCode, string) error {
	s.mu.Lock()
	s.aborted = true
	s.mu.Unlock()
	return nil
}

// The goodbye is not given up (the connection aborted, discarding what
// was written) because other goroutines are writing when Close comes: it
// waits for the write lock, writes the Close frame after their frames,
// and lingers. Writes that come after it never reach the connection.
func TestGoodbyeWaitsForOtherWriters(t *testing.T) {
	for round := range 20 {
		sc := &slowConn{}
		cn := &conn{c: sc, w: frame.NewWriter(sc, 0)}
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for range 2 {
			wg.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					if cn.write(pingFrame(1)) != nil {
						return
					}
				}
			})
		}
		for {
			sc.mu.Lock()
			n := len(sc.kinds)
			sc.mu.Unlock()
			if n >= 4 {
				break
			}
			runtime.Gosched()
		}
		cn.goodbye(t.Context())
		close(stop)
		wg.Wait()
		sc.mu.Lock()
		if sc.aborted || !sc.lingered || !sc.closed {
			t.Fatalf("round %d: aborted %v, lingered %v, closed %v", round, sc.aborted, sc.lingered, sc.closed)
		}
		if i := slices.Index(sc.kinds, "*relayv1.Frame_Close"); i != len(sc.kinds)-1 {
			t.Fatalf("round %d: the Close frame is write %d of %d (%v)", round, i, len(sc.kinds), sc.kinds)
		}
		sc.mu.Unlock()
	}
}

// chanConn is a devconn.Conn whose writes arrive on a channel.
type chanConn struct {
	devconn.Conn // only Write is used
	writes       chan []byte
}

func (c *chanConn) Write(b []byte) (int, error) {
	c.writes <- bytes.Clone(b)
	return len(b), nil
}

// deliveries encodes the Deliver frames of n events from device a, e1 to
// en, with delivery ids from first on.
func deliveries(t *testing.T, n int, first uint64) []byte {
	t.Helper()
	var stream []byte
	for i := range uint64(n) {
		b, err := frame.Append(nil, &relayv1.Frame{Kind: &relayv1.Frame_Deliver{Deliver: &relayv1.Deliver{
			Event: &relayv1.Event{Id: fmt.Sprintf("e%d", i+1), SenderDeviceId: "a", Seq: i + 1}, DeliveryId: first + i}}})
		if err != nil {
			t.Fatal(err)
		}
		stream = append(stream, b...)
	}
	return stream
}

// readBurst runs c's reader on a connection that writes to wc and gives
// stream in one read, then waits for more until pw is closed; and the
// connection's control writer, until the test ends. done has the
// reader's end.
func readBurst(t *testing.T, c *Client, wc *chanConn, stream []byte) (pw *io.PipeWriter, done <-chan error) {
	t.Helper()
	pr, pw := io.Pipe()
	cn := &conn{c: wc, w: frame.NewWriter(wc, 0), r: frame.NewReader(io.MultiReader(bytes.NewReader(stream), pr), 0), ctlWake: make(chan struct{}, 1)}
	ended := make(chan error, 1)
	go func() { ended <- c.readStream(t.Context(), cn) }()
	wctx, stopWriter := context.WithCancel(t.Context())
	var writer sync.WaitGroup
	writer.Go(func() { cn.writeControl(wctx) })
	t.Cleanup(func() { stopWriter(); writer.Wait() })
	return pw, ended
}

// An application that lags behind (its channel full) holds back only the
// events it was not given: the receipts of those it was, which arrived in
// the same read as the one that waits, go to the edge before the wait, so
// their senders get their acks now rather than when the application next
// reads; each held event's receipt goes once the application has it.
func TestReceiptsGoOutBeforeWaitingForTheApplication(t *testing.T) {
	wc := &chanConn{writes: make(chan []byte, 8)}
	// One read gives the reader all three deliveries; the stream then
	// stays open until the end of the test.
	c := readerClient(1)
	pw, done := readBurst(t, c, wc, deliveries(t, 3, 1))
	receipt := func(want uint64) {
		t.Helper()
		select {
		case w := <-wc.writes:
			var f relayv1.Frame
			if err := frame.NewReader(bytes.NewReader(w), 0).Read(&f); err != nil || !slices.Equal(f.GetReceived().GetDeliveryIds(), []uint64{want}) {
				t.Fatalf("wrote %v (%v), want the receipt of delivery %d", &f, err, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no receipt of delivery %d while the application is given nothing more", want)
		}
	}
	for i := range uint64(3) {
		// e(i+1) is in the application's channel; the next waits for room.
		receipt(i + 1)
		if ev := <-c.events; ev.ID != fmt.Sprintf("e%d", i+1) {
			t.Fatalf("event %s, want e%d", ev.ID, i+1)
		}
	}
	_ = pw.Close()
	if err := <-done; !errors.Is(err, io.EOF) {
		t.Fatalf("readStream ended with %v, want io.EOF", err)
	}
}

// A cancellation of an "any one" event the application has not been
// given yet, held for it while it lags, follows the event: the
// application learns that another device took it, rather than getting
// the event alone.
func TestACancellationFollowsAHeldEvent(t *testing.T) {
	cancelFrame := func(id string) []byte {
		b, err := frame.Append(nil, &relayv1.Frame{Kind: &relayv1.Frame_Cancel{Cancel: &relayv1.Cancel{SenderDeviceId: "a", EventId: id}}})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	ping, err := frame.Append(nil, pingFrame(7))
	if err != nil {
		t.Fatal(err)
	}
	// e1 fills the application's channel, e2 is held; then e2's
	// cancellation, and a Ping whose Pong says the reader has read the
	// rest.
	stream := slices.Concat(deliveries(t, 2, 1), cancelFrame("e2"), ping)
	wc := &chanConn{writes: make(chan []byte, 8)}
	c := readerClient(1)
	pw, done := readBurst(t, c, wc, stream)
	for pong := false; !pong; {
		select {
		case w := <-wc.writes:
			var f relayv1.Frame
			pong = frame.NewReader(bytes.NewReader(w), 0).Read(&f) == nil && f.GetPong().GetNonce() == 7
		case <-time.After(30 * time.Second):
			t.Fatal("no Pong: the reader did not read the frames before the Ping")
		}
	}
	var got []string
	for range 3 {
		select {
		case ev := <-c.events:
			got = append(got, fmt.Sprintf("%s cancelled=%v", ev.ID, ev.Cancelled))
		case <-time.After(30 * time.Second):
			t.Fatalf("the application got %v, and nothing more", got)
		}
	}
	_ = pw.Close()
	if err := <-done; !errors.Is(err, io.EOF) {
		t.Fatalf("readStream ended with %v, want io.EOF", err)
	}
	if want := []string{"e1 cancelled=false", "e2 cancelled=false", "e2 cancelled=true"}; !slices.Equal(got, want) {
		t.Fatalf("the application got %v, want %v", got, want)
	}
}

// datagramConn is a devconn.Conn that keeps what was written to the
// stream and what went as datagrams.
type datagramConn struct {
	writesConn
	datagrams [][]byte
}

func (d *datagramConn) SendDatagram(b []byte) error {
	d.datagrams = append(d.datagrams, bytes.Clone(b))
	return nil
}

// failingConn fails every stream write.
type failingConn struct{ datagramConn }

func (*failingConn) Write([]byte) (int, error) { return 0, errors.New("stream reset") }

// The Hello defers the client's datagrams: on each connection the first
// ephemeral event goes on the stream (the edge starts reading datagrams
// when it arrives) and the later ones as datagrams; a new connection
// starts over. With NoDatagrams every one goes on the stream.
func TestFirstEphemeralEventOfAConnectionGoesOnTheStream(t *testing.T) {
	c := &Client{}
	for _, noDatagrams := range []bool{false, true} {
		for range 2 { // connections
			dc := &datagramConn{}
			c.cur = &conn{c: dc, w: frame.NewWriter(dc, 0), noDatagrams: noDatagrams}
			for i := range 3 {
				if err := c.SendEphemeral(Message{Payload: []byte{byte(i)}}); err != nil {
					t.Fatal(err)
				}
			}
			wantStream, wantDatagrams := 1, 2
			if noDatagrams {
				wantStream, wantDatagrams = 3, 0
			}
			if len(dc.writes) != wantStream || len(dc.datagrams) != wantDatagrams {
				t.Fatalf("no datagrams %v: %d stream writes and %d datagrams, want %d and %d",
					noDatagrams, len(dc.writes), len(dc.datagrams), wantStream, wantDatagrams)
			}
			var f relayv1.Frame
			if err := frame.NewReader(bytes.NewReader(dc.writes[0]), 0).Read(&f); err != nil || f.GetEvent().GetPayload()[0] != 0 {
				t.Fatalf("first stream write: %v %v, want the first event", &f, err)
			}
		}
	}
	// A first event that could not be written leaves the datagrams
	// closed: the next one tries the stream again.
	fc := &failingConn{}
	cn := &conn{c: fc, w: frame.NewWriter(fc, 0)}
	c.cur = cn
	for range 2 {
		if err := c.SendEphemeral(Message{Payload: []byte{1}}); err == nil {
			t.Fatal("a send whose write failed returned nil")
		}
	}
	if cn.datagramsOpen || len(fc.datagrams) != 0 {
		t.Fatalf("after failed writes: datagrams open %v, %d sent", cn.datagramsOpen, len(fc.datagrams))
	}
}

// The wait before a reconnect: soon after a session that lasted (see
// TestReconnectAfterALongSessionIsSpread), a backoff that doubles after
// sessions that end soon after they began, and the edge's own word when
// it goes away.
func TestReconnectWaitBacksOffFromShortSessions(t *testing.T) {
	const minB, maxB = 100 * time.Millisecond, 2 * time.Second
	goingAway := &Error{Code: relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, ReconnectAfter: 3 * time.Second}
	rateLimited := &Error{Code: relayv1.ErrorCode_ERROR_CODE_RATE_LIMITED}
	slow := &Error{Code: relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER}
	within := func(wait, backoff time.Duration) bool { return wait >= backoff/2 && wait <= backoff }

	if wait, next := reconnectWait(goingAway, time.Minute, time.Second, minB, maxB); wait != 3*time.Second || next != minB {
		t.Errorf("going away: wait %v, next %v", wait, next)
	}
	// The edge's word is bounded: never more than MaxReconnectHint, never
	// negative, and after a session that ended at once never sooner than
	// the backoff, which goes on growing (an edge that takes devices and
	// sends them away at once cannot make them spin).
	for _, tc := range []struct {
		hint, lasted, wantMin, wantMax time.Duration
		next                           time.Duration
	}{
		{100 * 24 * time.Hour, time.Minute, MaxReconnectHint, MaxReconnectHint, minB},
		{-time.Hour, time.Minute, 0, 0, minB},
		{0, 50 * time.Millisecond, time.Second / 2, time.Second, maxB},
		{3 * time.Second, 50 * time.Millisecond, 3 * time.Second, 3 * time.Second, maxB},
	} {
		e := &Error{Code: relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, ReconnectAfter: tc.hint}
		if wait, next := reconnectWait(e, tc.lasted, time.Second, minB, maxB); wait < tc.wantMin || wait > tc.wantMax || next != tc.next {
			t.Errorf("going away with a hint of %v after %v: wait %v, next %v; want %v-%v, next %v", tc.hint, tc.lasted, wait, next, tc.wantMin, tc.wantMax, tc.next)
		}
	}
	for _, err := range []error{io.EOF, slow} {
		if wait, next := reconnectWait(err, time.Minute, maxB, minB, maxB); wait > time.Second || next != minB {
			t.Errorf("%v after a long session: wait %v, next %v; want within a second, backoff reset", err, wait, next)
		}
	}
	if wait, next := reconnectWait(rateLimited, time.Minute, maxB, minB, maxB); !within(wait, minB) || next != 2*minB {
		t.Errorf("rate limited after a long session: wait %v, next %v; want a wait from the reset backoff", wait, next)
	}
	// Sessions that end at once, again and again: the waits grow to the
	// bound and stay there.
	backoff := minB
	for i := range 8 {
		wait, next := reconnectWait(slow, 50*time.Millisecond, backoff, minB, maxB)
		if !within(wait, backoff) || next != min(2*backoff, maxB) {
			t.Fatalf("short session %d at backoff %v: wait %v, next %v", i, backoff, wait, next)
		}
		backoff = next
	}
	if backoff != maxB {
		t.Fatalf("backoff %v after eight short sessions, want %v", backoff, maxB)
	}
}

// A frame taken back before it was written is never written; one a write
// has taken cannot be taken back.
func TestUnqueueTakesAFrameBackUntilItIsWritten(t *testing.T) {
	wc := &writesConn{}
	cn := &conn{c: wc, w: frame.NewWriter(wc, 0)}
	var tickets []uint64
	for i := range uint64(4) {
		ticket, _ := cn.queue(encodedPing(t, i+1))
		tickets = append(tickets, ticket)
	}
	if !cn.unqueue(tickets[1]) || !cn.unqueue(tickets[3]) || cn.unqueue(tickets[3]) {
		t.Fatal("unqueue of queued frames (once each)")
	}
	if err := cn.flush(false); err != nil {
		t.Fatal(err)
	}
	if len(wc.writes) != 1 || !slices.Equal(frames(t, wc.writes[0]), []uint64{1, 3}) {
		t.Fatalf("written: %v, want pings 1 and 3", frames(t, wc.writes[0]))
	}
	if cn.unqueue(tickets[0]) {
		t.Fatal("a written frame was taken back")
	}
	// The next frames queue afresh.
	ticket, flush := cn.queue(encodedPing(t, 5))
	if !flush || !cn.unqueue(ticket) {
		t.Fatal("a frame queued after a flush")
	}
	if err := cn.flush(false); err != nil || len(wc.writes) != 1 {
		t.Fatalf("flush of nothing: %v, %d writes", err, len(wc.writes))
	}
}

// blockedConn is a devconn.Conn whose writes wait until release is
// closed; entered gets a value as the first write starts.
type blockedConn struct {
	devconn.Conn // only Write is used
	entered      chan struct{}
	release      chan struct{}
	mu           sync.Mutex
	written      []byte
}

func (b *blockedConn) Write(p []byte) (int, error) {
	select {
	case b.entered <- struct{}{}:
	default:
	}
	<-b.release
	b.mu.Lock()
	b.written = append(b.written, p...)
	b.mu.Unlock()
	return len(p), nil
}

// Sends that give up while the stream is held up (an edge pacing the
// device) take their frames back: what waits for the stream stays within
// MaxPending frames however many sends come and go, no event of a send
// that returned is written after it, and what is written keeps seq order.
func TestSendsThatGiveUpDoNotPileUpBehindTheStream(t *testing.T) {
	const maxPending, payload, sends = 4, 1 << 10, 1000
	bc := &blockedConn{entered: make(chan struct{}, 1), release: make(chan struct{})}
	cn := &conn{c: bc, w: frame.NewWriter(bc, 0)}
	c := &Client{
		cfg:     Config{MaxPending: maxPending, DeviceID: "d", UserID: "u"},
		pending: map[string]*pendingSend{},
		sends:   make(chan struct{}, maxPending),
		done:    make(chan struct{}),
		cur:     cn,
	}
	// The first send writes its frame, and its write is held up.
	first := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		first <- c.Send(ctx, Message{ID: "first", Payload: make([]byte, payload)})
	}()
	<-bc.entered
	// Many sends that give up soon: each waits for a slot, queues its
	// frame behind the held-up write and takes it back. The one that
	// queued first after the write began is the next to write: it waits
	// for the stream (a write cannot be called back), the rest return.
	type result struct {
		id  string
		err error
	}
	results := make(chan result, sends)
	for i := range sends {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Millisecond)
			defer cancel()
			id := fmt.Sprint("e", i)
			results <- result{id, c.Send(ctx, Message{ID: id, Payload: make([]byte, payload)})}
		}()
	}
	gaveUp := map[string]bool{}
	deadline := time.After(time.Minute)
	for len(gaveUp) < sends-1 {
		select {
		case r := <-results:
			if !errors.Is(r.err, context.DeadlineExceeded) {
				t.Fatalf("send %s: %v", r.id, r.err)
			}
			gaveUp[r.id] = true
		case <-deadline:
			t.Fatalf("%d of %d sends returned while the stream was held up", len(gaveUp), sends)
		}
	}
	cn.pmu.Lock()
	pend, queued := len(cn.pend), len(cn.queued)
	cn.pmu.Unlock()
	if queued > maxPending || pend > maxPending*(payload+256) {
		t.Fatalf("%d frames (%d bytes) wait for the stream after the sends gave up, want at most %d", queued, pend, maxPending)
	}
	close(bc.release)
	last := <-results
	c.resolve("first", nil)
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	if !errors.Is(last.err, context.DeadlineExceeded) {
		t.Fatalf("send %s: %v", last.id, last.err)
	}
	bc.mu.Lock()
	written := bytes.Clone(bc.written)
	bc.mu.Unlock()
	r := frame.NewReader(bytes.NewReader(written), 0)
	var ids []string
	var seq uint64
	for {
		var f relayv1.Frame
		if err := r.Read(&f); err != nil {
			break
		}
		ev := f.GetEvent()
		if gaveUp[ev.GetId()] {
			t.Errorf("event %s written after its send returned", ev.GetId())
		}
		if ev.GetSeq() <= seq {
			t.Errorf("seq %d after %d", ev.GetSeq(), seq)
		}
		seq = ev.GetSeq()
		ids = append(ids, ev.GetId())
	}
	if len(ids) == 0 || ids[0] != "first" || len(ids) > 2 {
		t.Fatalf("written: %v, want first and at most the send that waited to write", ids)
	}
}

// A Send with the id of a Send still under way is refused with
// A Send gives up when its context ends while a reconnect's resend holds
// the stream (which may take long: an edge that paces the device, a
// network that just went), rather than wait for the resend to end.
func TestSendGivesUpWhileAResendHoldsTheStream(t *testing.T) {
	c := &Client{
		cfg:     Config{MaxPending: 4, DeviceID: "d", UserID: "u"},
		pending: map[string]*pendingSend{},
		sends:   make(chan struct{}, 4),
		done:    make(chan struct{}),
	}
	c.sendMu.Lock() // the resend
	defer c.sendMu.Unlock()
	ctx, cancel := context.WithCancel(t.Context())
	sent := make(chan error, 1)
	go func() { sent <- c.Send(ctx, Message{ID: "e"}) }()
	until(t, "the Send took its slot (and waits for the stream)", func() bool { return len(c.sends) == 1 })
	cancel()
	select {
	case err := <-sent:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Send ended with %v, want its context's error", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Send waited for the resend past its context")
	}
}

// ErrAlreadySending and sends nothing; once the first is done the id
// may be sent again.
func TestSendRefusesAnIDAlreadyBeingSent(t *testing.T) {
	bc := &blockedConn{entered: make(chan struct{}, 1), release: make(chan struct{})}
	cn := &conn{c: bc, w: frame.NewWriter(bc, 0)}
	c := &Client{
		cfg:     Config{MaxPending: 4, DeviceID: "d", UserID: "u"},
		pending: map[string]*pendingSend{},
		sends:   make(chan struct{}, 4),
		done:    make(chan struct{}),
		cur:     cn,
	}
	first := make(chan error, 1)
	go func() { first <- c.Send(context.Background(), Message{ID: "x"}) }()
	<-bc.entered
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := c.Send(ctx, Message{ID: "x"}); !errors.Is(err, ErrAlreadySending) {
		t.Fatalf("second send of x: %v, want ErrAlreadySending", err)
	}
	close(bc.release)
	c.resolve("x", nil)
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	again := make(chan error, 1)
	go func() { again <- c.Send(ctx, Message{ID: "x"}) }()
	for deadline := time.Now().Add(time.Minute); ; runtime.Gosched() {
		c.mu.Lock()
		_, ok := c.pending["x"]
		c.mu.Unlock()
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the second send of x never got under way")
		}
	}
	c.resolve("x", nil)
	if err := <-again; err != nil {
		t.Fatalf("x sent again after the first was acknowledged: %v", err)
	}
	r := frame.NewReader(bytes.NewReader(bc.written), 0)
	var seqs []uint64
	for {
		var f relayv1.Frame
		if err := r.Read(&f); err != nil {
			break
		}
		seqs = append(seqs, f.GetEvent().GetSeq())
	}
	if !slices.Equal(seqs, []uint64{1, 2}) {
		t.Fatalf("written: events with seqs %v, want 1 and 2 (nothing of the refused send)", seqs)
	}
}

// An event the reader could not give the application (its channel full
// when the connection ended) is not taken for seen: the copy the edge
// sends again on the next connection is given, and acknowledged only
// then.
func TestEventNotHandedOverIsGivenWhenSentAgain(t *testing.T) {
	c := readerClient(1)
	// e1 fills the channel; e2 waits for room when the stream ends.
	first := &writesConn{}
	ended := &conn{c: first, w: frame.NewWriter(first, 0), r: frame.NewReader(bytes.NewReader(deliveries(t, 2, 1)), 0)}
	if err := c.readStream(t.Context(), ended); !errors.Is(err, io.EOF) {
		t.Fatalf("readStream ended with %v, want io.EOF", err)
	}
	if ev := <-c.events; ev.ID != "e1" {
		t.Fatalf("event %s, want e1", ev.ID)
	}
	// The edge sends both again, as deliveries 3 and 4.
	wc := &writesConn{}
	again := &conn{c: wc, w: frame.NewWriter(wc, 0), r: frame.NewReader(bytes.NewReader(deliveries(t, 2, 3)), 0)}
	if err := c.readStream(t.Context(), again); !errors.Is(err, io.EOF) {
		t.Fatalf("readStream ended with %v, want io.EOF", err)
	}
	if got := given(c, eventID); !slices.Equal(got, []string{"e2"}) {
		t.Fatalf("events given after the reconnect: %v, want e2", got)
	}
	if receipts := acknowledged(again, wc); !slices.Equal(receipts, []uint64{3, 4}) {
		t.Fatalf("deliveries acknowledged: %v, want 3 (a duplicate) and 4", receipts)
	}
}

// The devices of an edge that died, whose sessions all lasted, do not
// come back in the same instant: each first wait is drawn from [0,
// ReconnectMin or a second, whichever is longer], over the whole range.
func TestReconnectAfterALongSessionIsSpread(t *testing.T) {
	for _, minB := range []time.Duration{100 * time.Millisecond, 3 * time.Second} {
		bound := max(minB, time.Second)
		lo, hi := bound, time.Duration(0)
		for range 2000 {
			wait, next := reconnectWait(io.EOF, time.Minute, 8*time.Second, minB, 10*time.Second)
			if wait < 0 || wait > bound || next != minB {
				t.Fatalf("ReconnectMin %v: wait %v, next %v; want a wait within [0, %v], backoff reset", minB, wait, next, bound)
			}
			lo, hi = min(lo, wait), max(hi, wait)
		}
		// 2000 uniform draws all in one end's quarter: a chance of (3/4)^2000.
		if lo > bound/4 || hi < bound*3/4 {
			t.Fatalf("ReconnectMin %v: 2000 waits between %v and %v, want them spread over [0, %v]", minB, lo, hi, bound)
		}
	}
}

// Addr comes first; the other edges follow in an order each client draws,
// so the devices of an edge that died spread over the others.
func TestEachClientOrdersTheOtherEdgesAtRandom(t *testing.T) {
	others := []string{"b:1", "c:1", "d:1", "e:1"}
	second := map[string]int{}
	for range 1000 {
		order := edgeOrder("a:1", others)
		if order[0] != "a:1" || !slices.Equal(slices.Sorted(slices.Values(order[1:])), others) {
			t.Fatalf("order %v: want a:1, then the others", order)
		}
		second[order[1]]++
	}
	// Each is second a quarter of the time: 250 of 1000, give or take.
	for _, a := range others {
		if n := second[a]; n < 150 || n > 350 {
			t.Fatalf("after a:1 comes %v; want each of %v about 250 times in 1000", second, others)
		}
	}
	if !slices.Equal(others, []string{"b:1", "c:1", "d:1", "e:1"}) {
		t.Fatalf("the configuration's list changed: %v", others)
	}
}

// A frame of a kind this client does not know (a newer edge's), or of a
// kind it knows but does not expect from the edge, is skipped: the
// session goes on, the events after it are given. Bytes that do not
// decode as a frame still end the session as malformed.
func TestReadStreamSkipsFramesOfKindsItDoesNotTake(t *testing.T) {
	prefixed := func(body []byte) []byte { return protowire.AppendBytes(nil, body) }
	unknown := protowire.AppendBytes(protowire.AppendTag(nil, 99, protowire.BytesType), []byte{0x08, 0x01})
	unexpected, err := frame.Append(nil, &relayv1.Frame{Kind: &relayv1.Frame_Hello{Hello: &relayv1.Hello{UserId: "u"}}})
	if err != nil {
		t.Fatal(err)
	}
	both := deliveries(t, 2, 1)
	first := len(deliveries(t, 1, 1))
	var stream []byte
	stream = append(stream, both[:first]...)
	stream = append(stream, prefixed(unknown)...)
	stream = append(stream, unexpected...)
	stream = append(stream, both[first:]...)
	stream = append(stream, prefixed([]byte{0xff, 0xff})...) // not a frame
	wc := &writesConn{}
	cn := &conn{c: wc, w: frame.NewWriter(wc, 0), r: frame.NewReader(bytes.NewReader(stream), 0)}
	c := readerClient(8)
	if err := c.readStream(t.Context(), cn); !errors.Is(err, frame.ErrMalformed) {
		t.Fatalf("readStream ended with %v, want MALFORMED_FRAME for the bytes that are not a frame", err)
	}
	if got := given(c, eventID); !slices.Equal(got, []string{"e1", "e2"}) {
		t.Fatalf("events given: %v, want e1 and e2", got)
	}
}

// given closes c's event channel and returns what the application would
// have got from it, each event named by name.
func given(c *Client, name func(Event) string) []string {
	close(c.events)
	var got []string
	for ev := range c.events {
		got = append(got, name(ev))
	}
	return got
}

func eventID(ev Event) string { return ev.ID }

// A ReconnectMax set alone, below the default ReconnectMin, is taken as
// asked (it was raised to the 10 s default); one below a ReconnectMin
// also set is raised.
func TestReconnectBoundsDefaults(t *testing.T) {
	_, key, _ := ed25519.GenerateKey(nil)
	base := Config{Addr: "127.0.0.1:1", UserID: "u", DeviceID: "d", Key: key}
	for _, tc := range []struct{ min, max, wantMin, wantMax time.Duration }{
		{0, 50 * time.Millisecond, 50 * time.Millisecond, 50 * time.Millisecond},
		{0, 0, 100 * time.Millisecond, 10 * time.Second},
		{time.Second, 500 * time.Millisecond, time.Second, 10 * time.Second},
	} {
		c := base
		c.ReconnectMin, c.ReconnectMax = tc.min, tc.max
		if err := c.setDefaults(); err != nil {
			t.Fatal(err)
		}
		if c.ReconnectMin != tc.wantMin || c.ReconnectMax != tc.wantMax {
			t.Errorf("min %v, max %v: got %v, %v; want %v, %v", tc.min, tc.max, c.ReconnectMin, c.ReconnectMax, tc.wantMin, tc.wantMax)
		}
	}
}

// pipeConn is a devconn.Conn over one end of a net.Pipe, without
// datagrams.
type pipeConn struct{ net.Conn }

func (pipeConn) SendDatagram([]byte) error                       { return devconn.ErrNoDatagrams }
func (pipeConn) ReceiveDatagram(context.Context) ([]byte, error) { return nil, devconn.ErrNoDatagrams }
func (p pipeConn) Close(relayv1.ErrorCode, string) error         { return p.Conn.Close() }
func (p pipeConn) Abort(relayv1.ErrorCode, string) error         { return p.Conn.Close() }
func (pipeConn) Transport() string                               { return "pipe" }

// ChannelBinding is a fixed binding (a pipe has no TLS; the fake edges
// here check no signature).
func (pipeConn) ChannelBinding() []byte { return make([]byte, proof.BindingSize) }

// pipeClient returns a client (with an application channel of buffer
// events) and its connection over a net.Pipe, and the pipe's edge end,
// both closed when the test ends.
func pipeClient(t *testing.T, buffer int) (*Client, *conn, net.Conn) {
	t.Helper()
	cli, edge := net.Pipe()
	t.Cleanup(func() { cli.Close(); edge.Close() })
	_, key, _ := ed25519.GenerateKey(nil)
	c := readerClient(buffer)
	c.cfg.UserID, c.cfg.DeviceID, c.cfg.Key = "u", "d", key
	return c, &conn{c: pipeConn{cli}, r: frame.NewReader(cli, 0), w: frame.NewWriter(cli, 0), ctlWake: make(chan struct{}, 1)}, edge
}

// fakeEdgeHandshake plays an edge's part in a full handshake on edge: it
// reads the Hello, answers with a Challenge whose clock is ahead of this
// one's, reads the Authenticate and answers with welcome.
func fakeEdgeHandshake(edge net.Conn, ahead time.Duration, welcome *relayv1.Welcome) error {
	r, w := frame.NewReader(edge, 0), frame.NewWriter(edge, 0)
	var f relayv1.Frame
	if err := r.Read(&f); err != nil || f.GetHello() == nil {
		return fmt.Errorf("hello: %v %v", &f, err)
	}
	if err := w.Write(&relayv1.Frame{Kind: &relayv1.Frame_Challenge{Challenge: &relayv1.Challenge{
		Nonce: make([]byte, 32), EdgeId: "e", ServerTimeMs: time.Now().Add(ahead).UnixMilli()}}}); err != nil {
		return err
	}
	if err := r.Read(&f); err != nil || f.GetAuthenticate() == nil {
		return fmt.Errorf("authenticate: %v %v", &f, err)
	}
	return w.Write(&relayv1.Frame{Kind: &relayv1.Frame_Welcome{Welcome: welcome}})
}

// In a full handshake the client learns the edge's clock from the
// Challenge, which answers its Hello at once, not from the Welcome, which
// comes after the signature's round trip and the edge's work. Here the
// edge's Welcome says an hour more than its Challenge (as if the edge had
// worked that long): the offset is the Challenge's, ten minutes.
func TestClockOffsetFromTheChallenge(t *testing.T) {
	const ahead = 10 * time.Minute
	c, cn, edge := pipeClient(t, 1)
	edgeDone := make(chan error, 1)
	go func() {
		edgeDone <- fakeEdgeHandshake(edge, ahead, &relayv1.Welcome{SessionId: "s", ServerTimeMs: time.Now().Add(ahead + time.Hour).UnixMilli()})
	}()
	if err := c.handshake(t.Context(), cn); err != nil {
		t.Fatal(err)
	}
	if err := <-edgeDone; err != nil {
		t.Fatal(err)
	}
	if off := c.ClockOffset(); off < ahead-time.Minute || off > ahead+time.Minute {
		t.Fatalf("offset %v, want about %v (the Challenge's)", off, ahead)
	}
}

// The reader holds the edge to the frame timeout its Welcome announced,
// the bound the edge holds the device's frames to: an edge (or a
// middlebox) that stalls inside a frame while the connection stays up
// ends the session with TIMEOUT, and the client reconnects, instead of
// waiting for the rest for good. The frames before it are read.
func TestAFrameTheEdgeStallsInTimesOut(t *testing.T) {
	c, cn, edge := pipeClient(t, 4)
	stream := deliveries(t, 2, 1)
	edgeDone := make(chan error, 1)
	go func() {
		edgeDone <- func() error {
			if err := fakeEdgeHandshake(edge, 0, &relayv1.Welcome{SessionId: "s", ServerTimeMs: time.Now().UnixMilli(),
				Limits: &relayv1.Limits{FrameTimeoutMs: 200}}); err != nil {
				return err
			}
			// One delivery whole, then all but the end of the next.
			_, err := edge.Write(stream[:len(stream)-3])
			return err
		}()
	}()
	if err := c.handshake(t.Context(), cn); err != nil {
		t.Fatal(err)
	}
	read := make(chan error, 1)
	go func() { read <- c.readStream(t.Context(), cn) }()
	if err := <-edgeDone; err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-read:
		if !errors.Is(err, &frame.Error{Code: relayv1.ErrorCode_ERROR_CODE_TIMEOUT}) {
			t.Fatalf("the reader ended with %v, want a frame TIMEOUT", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the reader still waits for the rest of the frame after 30 s; the Welcome gave 200 ms")
	}
	if ev := <-c.events; ev.ID != "e1" {
		t.Fatalf("the application got %q, want the whole delivery e1", ev.ID)
	}
}

// frameTimeout takes the Welcome's bound, within reason.
func TestFrameTimeoutFromTheWelcome(t *testing.T) {
	for ms, want := range map[int64]time.Duration{
		0: defaultFrameTimeout, -5: defaultFrameTimeout, 1: minFrameTimeout, 2500: 2500 * time.Millisecond,
		math.MaxInt64: time.Hour,
	} {
		if got := frameTimeout(ms); got != want {
			t.Errorf("frame_timeout_ms %d: %v, want %v", ms, got, want)
		}
	}
}

// A pending send is refused as expired only when the edge would refuse
// it by validate's rule: its age, by the edge's earliest clock, at least
// its TTL plus the skew tolerance; never with the tolerance unknown.
func TestAPendingSendExpiresByTheEdgesRule(t *testing.T) {
	const now = int64(1_000_000_000)
	for _, tc := range []struct {
		name             string
		createdMs, ttlMs int64
		skew             time.Duration
		expired          bool
	}{
		{"a millisecond short", now - 1_000 - 60_000 + 1, 1_000, time.Minute, false},
		{"at ttl plus tolerance", now - 1_000 - 60_000, 1_000, time.Minute, true},
		{"long past", 0, 1, time.Minute, true},
		{"past its ttl, within the tolerance", now - 30_000, 1_000, time.Minute, false},
		{"created in the future", now + 5_000, 1, time.Minute, false},
		{"tolerance unknown", 0, 1, 0, false},
		{"the longest ttl", 0, 1<<63 - 1, time.Minute, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := &pendingSend{id: "e", createdMs: tc.createdMs, ttlMs: tc.ttlMs}
			err := p.expired(now, tc.skew)
			var ce *Error
			if got := errors.As(err, &ce) && ce.Code == relayv1.ErrorCode_ERROR_CODE_EXPIRED; got != tc.expired || (err != nil && !got) {
				t.Fatalf("expired: %v, want %v", err, tc.expired)
			}
		})
	}
}

// The resend's expiry check takes the edge's clock at its earliest: the
// client's, corrected by the offset, less the offset's error and a
// second; an event is failed only when that clock says it expired.
func TestTheEdgesEarliestClock(t *testing.T) {
	now := time.UnixMilli(1_000_000_000)
	for _, tc := range []struct {
		offset, offsetErr time.Duration
		want              int64
	}{
		{0, 0, 1_000_000_000 - 1_000},
		{10 * time.Second, 100 * time.Millisecond, 1_000_000_000 + 10_000 - 100 - 1_000},
		{-10 * time.Second, 100 * time.Millisecond, 1_000_000_000 - 10_000 - 100 - 1_000},
	} {
		if got := edgeEarliest(now, tc.offset, tc.offsetErr); got != tc.want {
			t.Errorf("offset %v ± %v: the edge's earliest clock %d, want %d", tc.offset, tc.offsetErr, got, tc.want)
		}
	}
	// An event a millisecond short of expiry by that clock is resent.
	p := &pendingSend{id: "e", createdMs: edgeEarliest(now, 0, 0) - 61_000 + 1, ttlMs: 1_000}
	if err := p.expired(edgeEarliest(now, 0, 0), time.Minute); err != nil {
		t.Fatalf("an event short of expiry at the edge's earliest clock: %v", err)
	}
}

// receiptFrame is a Received frame of n delivery ids from *next on.
func receiptFrame(next *uint64, n int) *relayv1.Frame {
	ids := make([]uint64, n)
	for i := range ids {
		ids[i] = *next
		*next++
	}
	return &relayv1.Frame{Kind: &relayv1.Frame_Received{Received: &relayv1.Received{DeliveryIds: ids}}}
}

// Receipts that wait for the control writer (behind a long resend) fill
// Received frames of at most maxReceiptIDs ids each, in order, however
// many queue up: one frame of them all could outgrow the edge's frame
// limit, which ends the session for good.
func TestQueuedReceiptsFillFramesOfBoundedSize(t *testing.T) {
	cn := &conn{ctlWake: make(chan struct{}, 1)}
	const first = uint64(1 << 21) // 4-byte varints, as in a long session
	next := first
	cn.control(receiptFrame(&next, 100))
	cn.control(receiptFrame(&next, 300))
	cn.control(pingFrame(1))
	cn.control(receiptFrame(&next, 600))
	cn.control(receiptFrame(&next, 0))
	var sizes []int
	var ids []uint64
	for _, f := range cn.ctl {
		r := f.GetReceived()
		if r == nil {
			sizes = append(sizes, -1)
			continue
		}
		sizes = append(sizes, len(r.GetDeliveryIds()))
		ids = append(ids, r.GetDeliveryIds()...)
		if b, err := frame.Append(nil, f); err != nil || len(b) > 4<<10 {
			t.Fatalf("a Received frame of %d ids encodes to %d bytes (%v)", len(r.GetDeliveryIds()), len(b), err)
		}
	}
	if want := []int{256, 144, -1, 256, 256, 88}; !slices.Equal(sizes, want) {
		t.Fatalf("queued frames of %v ids (-1: the ping), want %v", sizes, want)
	}
	for i, id := range ids {
		if id != first+uint64(i) {
			t.Fatalf("id %d is %d, want %d: receipts out of order or lost", i, id, first+uint64(i))
		}
	}
	if len(ids) != 1000 {
		t.Fatalf("%d ids queued, want 1000", len(ids))
	}
}

// An edge that pings (or challenges) faster than it reads holds one Pong
// and one answer queued, the latest, not a queue that grows with its
// frames.
func TestQueuedPongsAndAnswersDoNotPileUp(t *testing.T) {
	cn := &conn{ctlWake: make(chan struct{}, 1)}
	next := uint64(1)
	for n := range uint64(1000) {
		cn.control(&relayv1.Frame{Kind: &relayv1.Frame_Pong{Pong: &relayv1.Pong{Nonce: n}}})
		cn.control(&relayv1.Frame{Kind: &relayv1.Frame_Authenticate{Authenticate: &relayv1.Authenticate{Signature: []byte{byte(n)}}}})
		if n%100 == 0 {
			cn.control(receiptFrame(&next, 1))
		}
	}
	if len(cn.ctl) != 3 {
		t.Fatalf("%d frames queued, want 3 (a Pong, an answer, the receipts)", len(cn.ctl))
	}
	if cn.ctl[0].GetPong().GetNonce() != 999 || cn.ctl[1].GetAuthenticate().GetSignature()[0] != byte(999%256) || len(cn.ctl[2].GetReceived().GetDeliveryIds()) != 10 {
		t.Fatalf("queued %v, want the latest Pong and answer and 10 receipts", cn.ctl)
	}
}

// Closing writes the receipts still waiting for the control writer before
// the Close frame: the application has those events, which must not come
// again from the device's mailbox.
func TestGoodbyeWritesTheReceiptsStillQueued(t *testing.T) {
	sc := &slowConn{}
	cn := &conn{c: sc, w: frame.NewWriter(sc, 0), ctlWake: make(chan struct{}, 1)}
	next := uint64(7)
	cn.control(receiptFrame(&next, 3))
	cn.goodbye(t.Context())
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if want := []string{"*relayv1.Frame_Received", "*relayv1.Frame_Close"}; !slices.Equal(sc.kinds, want) {
		t.Fatalf("the goodbye wrote %v, want %v", sc.kinds, want)
	}
	if len(cn.ctl) != 0 || sc.aborted || !sc.lingered {
		t.Fatalf("after the goodbye: %d frames queued, aborted %v, lingered %v", len(cn.ctl), sc.aborted, sc.lingered)
	}
}

// Closing acknowledges the events the reader gave the application and
// still held the receipts of (it sends them once no more of what arrived
// together waits to be read): here five deliveries came with half a frame
// after them, so the reader holds the five while it waits for the rest.
// Nothing that comes after the goodbye is given.
func TestGoodbyeAcknowledgesWhatTheReaderGave(t *testing.T) {
	sc := &slowConn{}
	half := deliveries(t, 1, 6)
	pr, pw := io.Pipe()
	t.Cleanup(func() { _ = pw.Close() })
	cn := &conn{c: sc, w: frame.NewWriter(sc, 0), ctlWake: make(chan struct{}, 1), pumped: make(chan struct{}),
		r: frame.NewReader(io.MultiReader(bytes.NewReader(append(deliveries(t, 5, 1), half[:len(half)/2]...)), pr), 0)}
	c := readerClient(16)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- c.readStream(ctx, cn) }()
	until(t, "the application was given 5 events", func() bool { return len(c.events) == 5 })
	cancel() // Close
	cn.goodbye(t.Context())
	go func() { _, _ = pw.Write(half[len(half)/2:]) }() // the rest of e6, after the goodbye
	_ = pw.Close()
	<-done
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if want := []string{"*relayv1.Frame_Received", "*relayv1.Frame_Close"}; !slices.Equal(sc.kinds, want) {
		t.Fatalf("the goodbye wrote %v, want %v", sc.kinds, want)
	}
	if !slices.Equal(sc.received, []uint64{1, 2, 3, 4, 5}) {
		t.Fatalf("acknowledged %v, want the five given", sc.received)
	}
	if len(c.events) != 5 {
		t.Fatalf("the application has %d events, want the five given before the goodbye", len(c.events))
	}
}

// A control frame queued once the goodbye was written is not written, and
// does not abort the connection while it lingers for the goodbye to reach
// the edge.
func TestTheControlWriterLeavesAGoodbyeAlone(t *testing.T) {
	sc := &slowConn{}
	cn := &conn{c: sc, w: frame.NewWriter(sc, 0), ctlWake: make(chan struct{}, 1)}
	cn.goodbye(t.Context())
	cn.control(&relayv1.Frame{Kind: &relayv1.Frame_Pong{Pong: &relayv1.Pong{Nonce: 1}}})
	done := make(chan struct{})
	go func() {
		defer close(done)
		cn.writeControl(t.Context())
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("the control writer did not end at its write after the goodbye")
	}
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.aborted || slices.Contains(sc.kinds, "*relayv1.Frame_Pong") {
		t.Fatalf("after the goodbye the control writer aborted (%v) or wrote %v", sc.aborted, sc.kinds)
	}
}

// A receipt the control writer takes as the goodbye runs reaches the
// edge before the Close, whichever gets to write first: taken before the
// write lock, it could wait for the lock while the goodbye wrote the
// Close, and be dropped (its event would come again to the device's next
// process). The race is run many times over.
func TestAReceiptTakenAsTheGoodbyeRunsIsWritten(t *testing.T) {
	for i := range 2000 {
		sc := &slowConn{}
		cn := &conn{c: sc, w: frame.NewWriter(sc, 0), ctlWake: make(chan struct{}, 1)}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() {
			defer close(done)
			cn.writeControl(ctx)
		}()
		// The write lock is busy (a send being written) when the receipt
		// is queued: the control writer wakes and, in the old order, took
		// the receipt and waited for the lock beside the goodbye.
		cn.wmu.Lock()
		next := uint64(1)
		cn.control(receiptFrame(&next, 1))
		for range 100 {
			cn.cmu.Lock()
			taken := len(cn.ctl) == 0
			cn.cmu.Unlock()
			if taken {
				break
			}
			runtime.Gosched()
		}
		bye := make(chan struct{})
		go func() {
			defer close(bye)
			cn.goodbye(t.Context())
		}()
		runtime.Gosched()
		cn.wmu.Unlock()
		<-bye
		cancel()
		<-done
		sc.mu.Lock()
		kinds := slices.Clone(sc.kinds)
		sc.mu.Unlock()
		if want := []string{"*relayv1.Frame_Received", "*relayv1.Frame_Close"}; !slices.Equal(kinds, want) {
			t.Fatalf("run %d: the connection got %v, want %v", i, kinds, want)
		}
	}
}

// Frames a newer edge may send in the handshake are skipped, as in the
// session: a kind this client does not know, and frames that may come
// at any time (a Ping). A Welcome that announces no frame limit leaves
// the default one, not the limit an earlier edge announced.
func TestTheHandshakeSkipsWhatItDoesNotTake(t *testing.T) {
	c, cn, edge := pipeClient(t, 1)
	c.maxFrame.Store(1 << 20) // an earlier edge's
	// Field 999, not a kind of this schema: a frame with no kind here.
	unknown := protowire.AppendBytes(protowire.AppendTag(nil, 999, protowire.BytesType), []byte("new"))
	edgeDone := make(chan error, 1)
	go func() {
		edgeDone <- func() error {
			r, w := frame.NewReader(edge, 0), frame.NewWriter(edge, 0)
			var f relayv1.Frame
			if err := r.Read(&f); err != nil || f.GetHello() == nil {
				return fmt.Errorf("hello: %v %v", &f, err)
			}
			if _, err := edge.Write(append(binary.AppendUvarint(nil, uint64(len(unknown))), unknown...)); err != nil {
				return err
			}
			if err := w.Write(&relayv1.Frame{Kind: &relayv1.Frame_Ping{Ping: &relayv1.Ping{Nonce: 7}}}); err != nil {
				return err
			}
			if err := w.Write(&relayv1.Frame{Kind: &relayv1.Frame_Challenge{Challenge: &relayv1.Challenge{
				Nonce: make([]byte, 32), EdgeId: "e", ServerTimeMs: time.Now().UnixMilli()}}}); err != nil {
				return err
			}
			if err := r.Read(&f); err != nil || f.GetAuthenticate() == nil {
				return fmt.Errorf("authenticate: %v %v", &f, err)
			}
			return w.Write(&relayv1.Frame{Kind: &relayv1.Frame_Welcome{Welcome: &relayv1.Welcome{SessionId: "s", ServerTimeMs: time.Now().UnixMilli()}}})
		}()
	}()
	if err := c.handshake(t.Context(), cn); err != nil {
		t.Fatalf("a handshake with frames it does not take: %v", err)
	}
	if err := <-edgeDone; err != nil {
		t.Fatal(err)
	}
	if got := c.maxFrame.Load(); got != frame.DefaultMaxFrame {
		t.Fatalf("frame limit %d after a Welcome without one, want the default %d", got, frame.DefaultMaxFrame)
	}
}

// What the inbox holds for an application that lags is bounded by all
// the bytes of the events the edge chose, not by their payloads alone:
// events of an empty payload with long ids and types count too.
func TestTheInboxCountsAHeldEventsIdsAndType(t *testing.T) {
	c := readerClient(0)
	in := newInbox(c, nil)
	r := &receipts{in: in} // no receipts to send: the events carry none
	long := strings.Repeat("x", 1<<10)
	var err error
	held := 0
	for held = 0; held < maxHeld && err == nil; held++ {
		err = in.put(Event{ID: fmt.Sprint(held, long), Sender: long, Type: long}, 0, false, r)
	}
	if err == nil {
		t.Fatalf("%d events of 3 KiB of ids and type, no payload, were all held", held)
	}
	if in.bytes > maxHeldBytes || held > maxHeldBytes/(3<<10)+1 {
		t.Fatalf("held %d events, %d bytes, before refusing: the bound is %d bytes", held, in.bytes, maxHeldBytes)
	}
}
