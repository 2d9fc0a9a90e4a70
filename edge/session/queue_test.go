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
	batch, closed, overflow := q.take()
	if len(batch) != 2 || closed || !overflow {
		t.Fatalf("take: %d %v %v", len(batch), closed, overflow)
	}
	q.close()
	if q.offer([]byte{1}, true, false, track) != queueClosed || q.control(&relayv1.Frame{}) {
		t.Fatal("closed queue took more")
	}
}
