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

// eventSeeds are encodings DecodeEvent must agree with proto.Unmarshal
// on: whole events, unknown fields of every wire type, known fields with
// the wrong wire type, repeated scalars, invalid UTF-8 and truncations.
func eventSeeds() [][]byte {
	full, _ := proto.Marshal(&relayv1.Event{
		Id: "e1", SenderDeviceId: "forged", Targets: []string{"d2", "d3"}, Seq: 7, CreatedAtMs: -5,
		TtlMs: 60000, Type: "note", Payload: []byte("hello"), Ephemeral: true, AnyOne: true,
	})
	tag := func(b []byte, n protowire.Number, t protowire.Type) []byte { return protowire.AppendTag(b, n, t) }
	var unknown []byte
	unknown = protowire.AppendVarint(tag(unknown, 99, protowire.VarintType), 5)
	unknown = protowire.AppendFixed32(tag(unknown, 100, protowire.Fixed32Type), 5)
	unknown = protowire.AppendFixed64(tag(unknown, 101, protowire.Fixed64Type), 5)
	unknown = protowire.AppendBytes(tag(unknown, 102, protowire.BytesType), bytes.Repeat([]byte("u"), 300))
	unknown = tag(tag(protowire.AppendVarint(tag(tag(unknown, 103, protowire.StartGroupType), 1, protowire.VarintType), 1), 103, protowire.EndGroupType), 1, protowire.BytesType)
	unknown = protowire.AppendString(unknown, "after-group")
	wrongType := protowire.AppendVarint(tag(nil, evID, protowire.VarintType), 3)
	wrongType = protowire.AppendBytes(tag(wrongType, evSeq, protowire.BytesType), []byte{1})
	twice := protowire.AppendVarint(tag(nil, evSeq, protowire.VarintType), 1)
	twice = protowire.AppendVarint(tag(twice, evSeq, protowire.VarintType), 2)
	twice = protowire.AppendBytes(tag(twice, evPayload, protowire.BytesType), []byte("x"))
	twice = protowire.AppendBytes(tag(twice, evPayload, protowire.BytesType), nil)
	badUTF8 := protowire.AppendBytes(tag(nil, evTargets, protowire.BytesType), []byte{0xff})
	stray := tag(nil, 5, protowire.EndGroupType)
	return [][]byte{
		full, append(slices.Clone(full), unknown...), unknown, wrongType, twice, badUTF8, stray,
		full[:len(full)-3], {}, {0}, {0x08}, bytes.Repeat([]byte{0xff}, 11),
		protowire.AppendVarint(tag(nil, evAnyOne, protowire.VarintType), 1<<40),
	}
}

// FuzzEventCodec runs its seeds in every go test run, as a test.
func FuzzEventCodec(f *testing.F) {
	for _, b := range eventSeeds() {
		f.Add(b)
	}
	f.Fuzz(checkEventCodec)
}

// checkEventCodec checks DecodeEvent, EventSize and AppendEvent against
// the protobuf runtime on one input, and Split on the frame carrying it.
func checkEventCodec(t *testing.T, b []byte) {
	var want, got relayv1.Event
	errWant := unmarshal.Unmarshal(b, &want)
	errGot := DecodeEvent(b, &got)
	if (errWant == nil) != (errGot == nil) {
		t.Fatalf("proto.Unmarshal: %v; DecodeEvent: %v", errWant, errGot)
	}
	if errGot != nil {
		if !errors.Is(errGot, ErrMalformed) {
			t.Fatalf("untyped error %v", errGot)
		}
		return
	}
	if !proto.Equal(&want, &got) {
		t.Fatalf("DecodeEvent gave %v, proto.Unmarshal %v", &got, &want)
	}
	enc := AppendEvent(nil, &got)
	ref, err := proto.MarshalOptions{Deterministic: true}.Marshal(&want)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(enc, ref) {
		t.Fatalf("AppendEvent wrote %x, proto.Marshal %x", enc, ref)
	}
	if n := EventSize(&got); n != len(enc) {
		t.Fatalf("EventSize %d, AppendEvent wrote %d bytes", n, len(enc))
	}
	body, _ := proto.Marshal(&relayv1.Frame{Kind: &relayv1.Frame_Event{Event: &want}})
	kind, inner, ok := Split(body)
	if !ok || kind != KindEvent || !bytes.Equal(inner, ref) {
		t.Fatalf("Split(%x) = %d, %x, %v", body, kind, inner, ok)
	}
}

// FuzzEventDecoder decodes two events with one EventDecoder, which
// reuses the first one's type and targets for the second where equal:
// each must still decode as proto.Unmarshal does, and decoding the second
// must leave the first as it was.
func FuzzEventDecoder(f *testing.F) {
	ev := func(typ string, targets ...string) []byte {
		b, _ := proto.Marshal(&relayv1.Event{Id: "e", Type: typ, Targets: targets, Payload: []byte("p")})
		return b
	}
	pairs := [][2][]byte{
		{ev("t", "a", "b"), ev("t", "a", "b")}, // all shared
		{ev("t", "a", "b"), ev("t", "a")},      // a prefix
		{ev("t", "a"), ev("t", "a", "c")},      // longer
		{ev("t", "a", "b"), ev("u", "a", "x")}, // differ after the first
		{ev("t", "a", "b"), ev("t", "x", "b")}, // differ at the first
		{ev("t"), ev("t", "a")},
		{ev("", "a"), ev("")},
	}
	for _, p := range pairs {
		f.Add(p[0], p[1])
	}
	seeds := eventSeeds()
	for i := range seeds {
		f.Add(seeds[i], seeds[(i+1)%len(seeds)])
	}
	f.Fuzz(func(t *testing.T, a, b []byte) {
		var d EventDecoder
		var first relayv1.Event
		errA := d.Decode(a, &first)
		kept := proto.Clone(&first).(*relayv1.Event)
		for _, in := range [][]byte{b, b, a} {
			var want, got relayv1.Event
			errWant := unmarshal.Unmarshal(in, &want)
			errGot := d.Decode(in, &got)
			if (errWant == nil) != (errGot == nil) {
				t.Fatalf("proto.Unmarshal: %v; Decode: %v", errWant, errGot)
			}
			if errGot == nil && !proto.Equal(&want, &got) {
				t.Fatalf("Decode gave %v, proto.Unmarshal %v", &got, &want)
			}
			if errA == nil && !proto.Equal(kept, &first) {
				t.Fatalf("the first event changed to %v, was %v", &first, kept)
			}
		}
	})
}

func receivedSeeds() [][]byte {
	tag := func(b []byte, n protowire.Number, t protowire.Type) []byte { return protowire.AppendTag(b, n, t) }
	packed, _ := proto.Marshal(&relayv1.Received{DeliveryIds: []uint64{1, 2, 300, 1 << 40}})
	mixed := protowire.AppendVarint(tag(slices.Clone(packed), receivedIDs, protowire.VarintType), 9)
	mixed = protowire.AppendVarint(tag(mixed, 1, protowire.VarintType), 4) // the reserved field
	mixed = protowire.AppendFixed32(tag(mixed, receivedIDs, protowire.Fixed32Type), 4)
	badPacked := protowire.AppendBytes(tag(nil, receivedIDs, protowire.BytesType), []byte{0x80})
	return [][]byte{packed, mixed, badPacked, packed[:len(packed)-1], {}, {0x10}, tag(nil, 2, protowire.EndGroupType)}
}

// FuzzReceivedIDs checks AppendReceivedIDs against proto.Unmarshal.
func FuzzReceivedIDs(f *testing.F) {
	for _, b := range receivedSeeds() {
		f.Add(b)
	}
	f.Fuzz(checkReceived)
}

func checkReceived(t *testing.T, b []byte) {
	var want relayv1.Received
	errWant := unmarshal.Unmarshal(b, &want)
	prefix := []uint64{42}
	got, errGot := AppendReceivedIDs(slices.Clone(prefix), b)
	if (errWant == nil) != (errGot == nil) {
		t.Fatalf("proto.Unmarshal: %v; AppendReceivedIDs: %v", errWant, errGot)
	}
	if errGot != nil {
		if !errors.Is(errGot, ErrMalformed) {
			t.Fatalf("untyped error %v", errGot)
		}
		if !slices.Equal(got, prefix) {
			t.Fatalf("after an error dst is %v, want %v", got, prefix)
		}
		return
	}
	if !slices.Equal(got[1:], want.GetDeliveryIds()) || got[0] != 42 {
		t.Fatalf("AppendReceivedIDs gave %v, proto.Unmarshal %v", got[1:], want.GetDeliveryIds())
	}
}

func TestSplit(t *testing.T) {
	one, _ := proto.Marshal(&relayv1.Frame{Kind: &relayv1.Frame_Received{Received: &relayv1.Received{DeliveryIds: []uint64{3}}}})
	if k, inner, ok := Split(one); !ok || k != KindReceived || len(inner) != len(one)-2 {
		t.Fatalf("Split(received) = %d, %x, %v", k, inner, ok)
	}
	// Two fields, a varint field, a truncated one: not for the fast path.
	for _, b := range [][]byte{append(slices.Clone(one), one...), {0x28, 1}, one[:len(one)-1], {}} {
		if _, _, ok := Split(b); ok {
			t.Errorf("Split(%x) took a body Decode must handle", b)
		}
	}
}
