package frame

import (
	"slices"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"

	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// The device's side of the hot path, without the reflective protobuf
// runtime: the Deliver and Ack frames a busy client reads and the Event
// frames it writes. The readers accept only the shape the edge writes and
// say ok = false for anything else; the caller then decodes the frame
// with Decode, so every answer is still the protobuf runtime's
// (FuzzDeliver and FuzzAck check that, FuzzEventFrame the writer).

// Frame field numbers of the kinds a device reads here.
const (
	// KindAck is Frame.ack's field number.
	KindAck protowire.Number = 6
	// KindDeliver is Frame.deliver's field number.
	KindDeliver protowire.Number = 7
)

// Deliver and Ack fields.
const (
	deliverEvent protowire.Number = 1
	deliverID    protowire.Number = 2
	ackEventID   protowire.Number = 1
)

// SplitDeliver parses an encoded relay.v1.Deliver (a Frame's deliver
// field) into its event's encoding, which EventDecoder decodes, and its
// delivery id. ok is false unless b holds exactly one event field and at
// most one delivery id, well formed, and nothing else.
func SplitDeliver(b []byte) (event []byte, deliveryID uint64, ok bool) {
	seenEvent, seenID := false, false
	for len(b) > 0 {
		num, typ, n := consumeTag(b)
		if n < 0 {
			return nil, 0, false
		}
		b = b[n:]
		switch {
		case num == deliverEvent && typ == protowire.BytesType && !seenEvent:
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return nil, 0, false
			}
			event, b, seenEvent = v, b[m:], true
		case num == deliverID && typ == protowire.VarintType && !seenID:
			v, m := protowire.ConsumeVarint(b)
			if m < 0 {
				return nil, 0, false
			}
			deliveryID, b, seenID = v, b[m:], true
		default:
			return nil, 0, false
		}
	}
	return event, deliveryID, seenEvent
}

// AckEventID returns the event id of an encoded relay.v1.Ack (a Frame's
// ack field). ok is false unless b holds exactly one event id, valid
// UTF-8, and nothing else.
func AckEventID(b []byte) (eventID string, ok bool) {
	num, typ, n := consumeTag(b)
	if n < 0 || num != ackEventID || typ != protowire.BytesType {
		return "", false
	}
	v, m := protowire.ConsumeBytes(b[n:])
	if m < 0 || n+m != len(b) || !utf8.Valid(v) {
		return "", false
	}
	return string(v), true
}

// AppendEventFrame appends ev as a length-prefixed Frame carrying it, the
// bytes AppendMax writes for that Frame. A frame longer than max bytes is
// an *Error with ERROR_CODE_FRAME_TOO_LARGE, a string that is not valid
// UTF-8 (which protobuf cannot encode) one with
// ERROR_CODE_MALFORMED_FRAME; dst is then returned unchanged.
func AppendEventFrame(dst []byte, ev *relayv1.Event, max int) ([]byte, error) {
	n := EventSize(ev)
	body := protowire.SizeTag(KindEvent) + protowire.SizeBytes(n)
	if body > max {
		return dst, tooLarge(uint64(body), max)
	}
	if !utf8.ValidString(ev.GetId()) || !utf8.ValidString(ev.GetSenderDeviceId()) || !utf8.ValidString(ev.GetType()) {
		return dst, malformed("event %q: a string field is not valid UTF-8", ev.GetId())
	}
	for _, t := range ev.GetTargets() {
		if !utf8.ValidString(t) {
			return dst, malformed("event %q: a target is not valid UTF-8", ev.GetId())
		}
	}
	dst = slices.Grow(dst, protowire.SizeVarint(uint64(body))+body)
	dst = protowire.AppendVarint(dst, uint64(body))
	dst = protowire.AppendTag(dst, KindEvent, protowire.BytesType)
	dst = protowire.AppendVarint(dst, uint64(n))
	return AppendEvent(dst, ev), nil
}
