package session

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/edge/frame"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// The hand-built Deliver wrapper must be byte for byte what the protobuf
// library makes, for every delivery id size.
func TestDeliverEncodingMatchesProtobuf(t *testing.T) {
	ev := &relayv1.Event{Id: "e1", SenderDeviceId: "d1", Targets: []string{"d2"}, Seq: 7, CreatedAtMs: 1, TtlMs: 2,
		Type: "t", Payload: bytes.Repeat([]byte{1}, 300)}
	enc, err := marshalDeterministic.Marshal(ev)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []uint64{0, 1, 127, 128, 1 << 20, 1<<63 + 5} {
		want, err := proto.MarshalOptions{Deterministic: true}.Marshal(&relayv1.Frame{Kind: &relayv1.Frame_Deliver{Deliver: &relayv1.Deliver{Event: ev, DeliveryId: id}}})
		if err != nil {
			t.Fatal(err)
		}
		got := appendDeliverBody(nil, enc, id)
		if !bytes.Equal(got, want) || deliverBodySize(len(enc), id) != len(want) {
			t.Fatalf("id %d: encoding differs", id)
		}
		framed := appendFramed(nil, enc, id)
		var f relayv1.Frame
		if err := frame.NewReader(bytes.NewReader(framed), 0).Read(&f); err != nil || f.GetDeliver().GetDeliveryId() != id || !proto.Equal(f.GetDeliver().GetEvent(), ev) {
			t.Fatalf("id %d: framed delivery reads back as %v, %v", id, &f, err)
		}
	}
}

// The hand-built Ack frame must be byte for byte what frame.Append
// writes, for ids whose lengths take one and two varint bytes.
func TestAckEncodingMatchesProtobuf(t *testing.T) {
	for _, id := range []string{"", "e1", string(bytes.Repeat([]byte{'x'}, 200)), string(bytes.Repeat([]byte{'y'}, 20000))} {
		want, err := frame.Append(nil, &relayv1.Frame{Kind: &relayv1.Frame_Ack{Ack: &relayv1.Ack{EventId: id}}})
		if err != nil {
			t.Fatal(err)
		}
		if got := appendAckFrame([]byte("prefix"), id); !bytes.Equal(got[6:], want) || string(got[:6]) != "prefix" {
			t.Fatalf("ack of a %d-byte id: encoding differs", len(id))
		}
	}
}

func TestQueueBounds(t *testing.T) {
	q := newQueue(2, 100, 1)
	track := func(uint64) {}
	if q.offer(make([]byte, 150), true, false, track) != offered {
		t.Fatal("one item larger than the byte bound must still pass when the queue is empty")
	}
	if q.offer([]byte{1}, true, false, track) != queueFull {
		t.Fatal("byte bound not enforced")
	}
	if !q.control(&relayv1.Frame{}) || q.control(&relayv1.Frame{}) {
		t.Fatal("control bound not enforced")
	}
	batch, due, closed, overflow, ok := q.next()
	if len(batch) != 2 || due != 0 || closed || !overflow || !ok {
		t.Fatalf("next: %d %v %v %v %v", len(batch), due, closed, overflow, ok)
	}
	q.close()
	if q.offer([]byte{1}, true, false, track) != queueClosed || q.control(&relayv1.Frame{}) {
		t.Fatal("closed queue took more")
	}
}

// The queue starts a writer only when it has something and none runs,
// never before release, and never after the writer that saw the close.
func TestQueueStartsOneWriterWhenNeeded(t *testing.T) {
	q := newQueue(8, 1<<10, 8)
	starts := 0
	q.start = func() { starts++ }
	q.control(&relayv1.Frame{})
	if starts != 0 {
		t.Fatal("a held queue started a writer")
	}
	q.release()
	if starts != 1 {
		t.Fatalf("release with a frame waiting: %d starts, want 1", starts)
	}
	q.ack("e1")
	q.schedule(dueTicket)
	if starts != 1 {
		t.Fatalf("%d starts while a writer runs", starts)
	}
	if batch, due, _, _, ok := q.next(); !ok || len(batch) != 2 || due != dueTicket {
		t.Fatalf("next: %d items, due %b, ok %v", len(batch), due, ok)
	}
	if _, _, _, _, ok := q.next(); ok {
		t.Fatal("next on an empty queue had something")
	}
	// While the writer waits, what is queued wakes it.
	q.offer([]byte{1}, false, false, nil)
	select {
	case <-q.wake:
	default:
		t.Fatal("a delivery did not wake the waiting writer")
	}
	if starts != 1 || q.retire() {
		t.Fatalf("%d starts; the writer retired with a delivery queued", starts)
	}
	q.next()
	if !q.retire() {
		t.Fatal("the writer could not retire from an empty queue")
	}
	q.offer([]byte{1}, false, false, nil)
	if starts != 2 {
		t.Fatalf("a delivery to an idle queue: %d starts, want 2", starts)
	}
	q.close()
	if _, _, closed, _, ok := q.next(); !ok || !closed {
		t.Fatal("the close did not reach the running writer")
	}
	// The writer that saw the close ends the session without giving its
	// place back: nothing starts another.
	q.schedule(dueTicket)
	q.control(&relayv1.Frame{})
	if starts != 2 {
		t.Fatalf("%d starts after the close", starts)
	}
}

// A device that reads its deliveries but never acknowledges them holds at
// most UnackedLen of them (and UnackedBytes) on the edge: further events
// for it are refused as QUEUE_FULL, nothing already accepted is lost, and
// once it acknowledges, deliveries flow again.
func TestUnacknowledgedDeliveriesAreBounded(t *testing.T) {
	const unacked = 8
	e := newEnv(t, func(c *Config) {
		c.UnackedLen, c.UnackedBytes = unacked, 1<<20
		c.Limits = DefaultLimits()
		c.Limits.EventsPerSecond, c.Limits.BytesPerSecond = 1e6, 1<<30
	})
	e.devices("u1", "a", "b")
	a, b := e.online("a"), e.online("b")
	var ids []uint64
	for i := range 3 * unacked {
		ev := a.event("b")
		ev.Payload = bytes.Repeat([]byte{'x'}, 4<<10)
		a.sendEvent(ev)
		if i < unacked {
			ids = append(ids, b.nextDeliver().GetDeliveryId()) // read, not acknowledged
			continue
		}
		r := a.nextAckOrReject().GetReject()
		if r.GetCode() != relayv1.ErrorCode_ERROR_CODE_QUEUE_FULL || r.GetEventId() != ev.GetId() {
			t.Fatalf("event %d with %d unacknowledged: %v, want QUEUE_FULL", i, unacked, r)
		}
	}
	bs := e.hub.sessionsOf("u1", "b")[0]
	bs.awaitMu.Lock()
	held := len(bs.awaiting)
	bs.awaitMu.Unlock()
	if held != unacked {
		t.Fatalf("the edge holds %d unacknowledged deliveries for b, want %d", held, unacked)
	}
	// The first unacked events were accepted: acknowledged once b says so.
	b.received(ids...)
	for range unacked {
		if ack := a.nextAckOrReject(); ack.GetAck() == nil {
			t.Fatalf("after b's receipts: %v, want acks", ack)
		}
	}
	ev := a.event("b")
	a.sendEvent(ev)
	if d := b.nextDeliver(); d.GetEvent().GetId() != ev.GetId() {
		t.Fatalf("after b's receipts b got %v, want the new event", d)
	}
}

// The byte bound holds too: a few large unacknowledged deliveries fill it.
func TestUnacknowledgedDeliveryBytesAreBounded(t *testing.T) {
	e := newEnv(t, func(c *Config) {
		c.UnackedLen, c.UnackedBytes = 1000, 40<<10
		c.Limits = DefaultLimits()
		c.Limits.EventsPerSecond, c.Limits.BytesPerSecond = 1e6, 1<<30
	})
	e.devices("u1", "a", "b")
	a, b := e.online("a"), e.online("b")
	var sent []string
	for range 10 {
		ev := a.event("b")
		ev.Payload = bytes.Repeat([]byte{'x'}, 16<<10)
		a.sendEvent(ev)
		sent = append(sent, ev.GetId())
	}
	// 16 KiB and a little more each: two fit in 40 KiB, a third does not.
	for _, id := range sent[2:] {
		if r := a.nextAckOrReject().GetReject(); r.GetCode() != relayv1.ErrorCode_ERROR_CODE_QUEUE_FULL || r.GetEventId() != id {
			t.Fatalf("event %s: %v, want QUEUE_FULL", id, r)
		}
	}
	for _, id := range sent[:2] {
		if d := b.nextDeliver(); d.GetEvent().GetId() != id {
			t.Fatalf("b got %v, want %s", d, id)
		}
	}
}
