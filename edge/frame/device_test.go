package frame

import (
	"bytes"
	"errors"
	"slices"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

func deliverSeeds() [][]byte {
	tag := func(b []byte, n protowire.Number, t protowire.Type) []byte { return protowire.AppendTag(b, n, t) }
	var seeds [][]byte
	for _, ev := range eventSeeds() {
		d := protowire.AppendBytes(tag(nil, deliverEvent, protowire.BytesType), ev)
		seeds = append(seeds, d, protowire.AppendVarint(tag(slices.Clone(d), deliverID, protowire.VarintType), 77))
	}
	whole, _ := proto.Marshal(&relayv1.Deliver{Event: &relayv1.Event{Id: "e1", Seq: 2, Payload: []byte("p")}, DeliveryId: 9})
	twiceEvent := protowire.AppendBytes(tag(slices.Clone(whole), deliverEvent, protowire.BytesType), []byte{0x22, 1, 'x'})
	twiceID := protowire.AppendVarint(tag(slices.Clone(whole), deliverID, protowire.VarintType), 10)
	unknown := protowire.AppendVarint(tag(slices.Clone(whole), 3, protowire.VarintType), 1)
	onlyID := protowire.AppendVarint(tag(nil, deliverID, protowire.VarintType), 3)
	return append(seeds, whole, twiceEvent, twiceID, unknown, onlyID, whole[:len(whole)-1], []byte{}, []byte{0x0a, 0x80})
}

// FuzzDeliver checks SplitDeliver, with DecodeEvent on the event it
// finds, against proto.Unmarshal of the Deliver; and that it takes every
// Deliver the protobuf runtime writes.
func FuzzDeliver(f *testing.F) {
	for _, b := range deliverSeeds() {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var want relayv1.Deliver
		errWant := unmarshal.Unmarshal(b, &want)
		event, id, ok := SplitDeliver(b)
		if ok {
			var got relayv1.Event
			errGot := DecodeEvent(event, &got)
			if (errWant == nil) != (errGot == nil) {
				t.Fatalf("proto.Unmarshal: %v; SplitDeliver and DecodeEvent: %v", errWant, errGot)
			}
			if errGot == nil && (!proto.Equal(want.GetEvent(), &got) || want.GetEvent() == nil || id != want.GetDeliveryId()) {
				t.Fatalf("SplitDeliver gave %v, %d; proto.Unmarshal %v", &got, id, &want)
			}
		}
		if errWant != nil || want.GetEvent() == nil {
			return
		}
		canonical, err := proto.Marshal(&want)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, ok := SplitDeliver(canonical); !ok {
			t.Fatalf("SplitDeliver refused %x, as proto.Marshal writes %v", canonical, &want)
		}
	})
}

// FuzzAck checks AckEventID against proto.Unmarshal, and that it takes
// every Ack the protobuf runtime writes.
func FuzzAck(f *testing.F) {
	tag := func(b []byte, n protowire.Number, t protowire.Type) []byte { return protowire.AppendTag(b, n, t) }
	ack, _ := proto.Marshal(&relayv1.Ack{EventId: "0123456789abcdef01234567"})
	for _, b := range [][]byte{
		ack, append(slices.Clone(ack), ack...), ack[:len(ack)-1], {},
		protowire.AppendBytes(tag(nil, ackEventID, protowire.BytesType), []byte{0xff}),
		protowire.AppendVarint(tag(slices.Clone(ack), 2, protowire.VarintType), 1),
		protowire.AppendVarint(tag(nil, ackEventID, protowire.VarintType), 1),
	} {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var want relayv1.Ack
		errWant := unmarshal.Unmarshal(b, &want)
		id, ok := AckEventID(b)
		if ok && (errWant != nil || id != want.GetEventId()) {
			t.Fatalf("AckEventID gave %q; proto.Unmarshal %v, %v", id, &want, errWant)
		}
		if errWant != nil || want.GetEventId() == "" {
			return
		}
		canonical, _ := proto.Marshal(&want)
		if _, ok := AckEventID(canonical); !ok {
			t.Fatalf("AckEventID refused %x, as proto.Marshal writes %v", canonical, &want)
		}
	})
}

// FuzzEventFrame checks AppendEventFrame against AppendMax: the same
// bytes, or errors with the same code (an encoding error of protobuf's
// counts as MALFORMED_FRAME, as the Go client reports it).
func FuzzEventFrame(f *testing.F) {
	f.Add("0123456789abcdef01234567", "d1", "t2", "note", uint64(7), int64(1700000000000), int64(60000), []byte("hello"), false, true, 1<<16)
	f.Add("e", "", "", "", uint64(0), int64(-1), int64(0), []byte{}, true, false, 10)
	f.Add("\xff", "d", "t", "x", uint64(1), int64(1), int64(1), []byte("p"), false, false, 1<<16)
	f.Add("e", "d", "t\xfe", "x", uint64(1), int64(1), int64(1), []byte("p"), false, false, 4)
	f.Add("e", "d", "t", "x", uint64(1), int64(1), int64(1), bytes.Repeat([]byte("p"), 200), false, false, 150)
	f.Fuzz(func(t *testing.T, id, sender, target, typ string, seq uint64, created, ttl int64, payload []byte, ephemeral, anyOne bool, max int) {
		max = 1 + (max&0x7fffffff)%(1<<17)
		ev := &relayv1.Event{Id: id, SenderDeviceId: sender, Seq: seq, CreatedAtMs: created, TtlMs: ttl, Type: typ,
			Payload: payload, Ephemeral: ephemeral, AnyOne: anyOne}
		if target != "" {
			ev.Targets = []string{target, target + "2"}
		}
		prefix := []byte{1, 2, 3}
		want, errWant := AppendMax(slices.Clone(prefix), &relayv1.Frame{Kind: &relayv1.Frame_Event{Event: ev}}, max)
		got, errGot := AppendEventFrame(slices.Clone(prefix), ev, max)
		code := func(err error) relayv1.ErrorCode {
			var fe *Error
			if errors.As(err, &fe) {
				return fe.Code
			}
			return relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME
		}
		switch {
		case (errWant == nil) != (errGot == nil):
			t.Fatalf("AppendMax: %v; AppendEventFrame: %v", errWant, errGot)
		case errGot != nil && code(errWant) != code(errGot):
			t.Fatalf("AppendMax: %v; AppendEventFrame: %v", errWant, errGot)
		case errGot != nil && !bytes.Equal(got, prefix):
			t.Fatalf("after an error dst is %x", got)
		case !bytes.Equal(got, want):
			t.Fatalf("AppendEventFrame wrote %x, AppendMax %x", got, want)
		}
	})
}
