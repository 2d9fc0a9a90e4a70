package frame

import (
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"

	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// The hottest frames, an Event from a sender and a Received from a
// receiver, are decoded here without the reflective protobuf runtime, and
// an accepted Event is re-encoded for its receivers without it. Each
// function gives the result proto.Unmarshal (with unknown fields
// discarded) and proto.Marshal give; the fuzz targets FuzzEventCodec and
// FuzzReceivedIDs check them against those.

// Frame field numbers of the kinds decoded here.
const (
	// KindEvent is Frame.event's field number.
	KindEvent protowire.Number = 5
	// KindReceived is Frame.received's field number.
	KindReceived protowire.Number = 8
)

// Split reports the kind of a frame body that holds exactly one field,
// a length-delimited one (the way every encoder writes a Frame), and
// that field's bytes. ok is false for anything else, which the caller
// decodes with Decode.
func Split(body []byte) (kind protowire.Number, inner []byte, ok bool) {
	num, typ, n := protowire.ConsumeTag(body)
	if n < 0 || typ != protowire.BytesType {
		return 0, nil, false
	}
	v, m := protowire.ConsumeBytes(body[n:])
	if m < 0 || n+m != len(body) {
		return 0, nil, false
	}
	return num, v, true
}

// Event fields.
const (
	evID        protowire.Number = 1
	evSender    protowire.Number = 2
	evTargets   protowire.Number = 3
	evSeq       protowire.Number = 4
	evCreated   protowire.Number = 5
	evTTL       protowire.Number = 6
	evType      protowire.Number = 7
	evPayload   protowire.Number = 8
	evEphemeral protowire.Number = 9
	evAnyOne    protowire.Number = 10
)

// DecodeEvent decodes an encoded relay.v1.Event into ev (reset first).
// Strings are copied; ev.Payload aliases b, so b must outlive the use of
// the payload (AppendEvent copies it). A malformed encoding is an *Error
// with ERROR_CODE_MALFORMED_FRAME.
func DecodeEvent(b []byte, ev *relayv1.Event) error {
	var d EventDecoder
	return d.Decode(b, ev)
}

// EventDecoder decodes a stream's events as DecodeEvent does, but gives
// an event the previous one's type string and targets slice when they
// are equal (a sender's events mostly are): two or three allocations
// fewer per event. The targets slice is then shared between events, so
// callers must not modify it. The zero value is ready; not safe for
// concurrent use.
type EventDecoder struct {
	typ     string
	targets []string
}

// Decode decodes b into ev (reset first); see DecodeEvent.
func (d *EventDecoder) Decode(b []byte, ev *relayv1.Event) error {
	ev.Reset()
	// matched counts the targets so far equal to the previous event's,
	// not yet copied into ev.Targets; -1 once one differed.
	matched := 0
	defer func() {
		d.typ = ev.Type
		d.targets = ev.Targets
	}()
	for len(b) > 0 {
		num, typ, n := consumeTag(b)
		if n < 0 {
			return malformed("undecodable event: %v", protowire.ParseError(n))
		}
		b = b[n:]
		var err error
		switch {
		case typ == protowire.BytesType && (num >= evID && num <= evTargets || num == evType || num == evPayload):
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return malformed("undecodable event: %v", protowire.ParseError(m))
			}
			b = b[m:]
			if num != evPayload && !utf8.Valid(v) {
				return malformed("undecodable event: field %d: invalid UTF-8", num)
			}
			switch num {
			case evID:
				ev.Id = string(v)
			case evSender:
				ev.SenderDeviceId = string(v)
			case evTargets:
				switch {
				case matched >= 0 && matched < len(d.targets) && string(v) == d.targets[matched]:
					matched++
				case matched >= 0:
					ev.Targets = append(append(make([]string, 0, matched+1), d.targets[:matched]...), string(v))
					matched = -1
				default:
					ev.Targets = append(ev.Targets, string(v))
				}
			case evType:
				if string(v) == d.typ {
					ev.Type = d.typ
				} else {
					ev.Type = string(v)
				}
			case evPayload:
				ev.Payload = nil // proto3: an empty value is no value
				if len(v) > 0 {
					ev.Payload = v
				}
			}
		case typ == protowire.VarintType && (num >= evSeq && num <= evTTL || num == evEphemeral || num == evAnyOne):
			v, m := protowire.ConsumeVarint(b)
			if m < 0 {
				return malformed("undecodable event: %v", protowire.ParseError(m))
			}
			b = b[m:]
			switch num {
			case evSeq:
				ev.Seq = v
			case evCreated:
				ev.CreatedAtMs = int64(v)
			case evTTL:
				ev.TtlMs = int64(v)
			case evEphemeral:
				ev.Ephemeral = protowire.DecodeBool(v)
			case evAnyOne:
				ev.AnyOne = protowire.DecodeBool(v)
			}
		default:
			b, err = skipField(num, typ, b)
			if err != nil {
				return err
			}
		}
	}
	if matched > 0 {
		// The first matched targets of the previous event (all of them,
		// usually): share its slice, capped so an append copies.
		ev.Targets = d.targets[:matched:matched]
	}
	return nil
}

// consumeTag is protowire.ConsumeTag refusing, as proto.Unmarshal does,
// field numbers above protowire.MaxValidNumber.
func consumeTag(b []byte) (protowire.Number, protowire.Type, int) {
	num, typ, n := protowire.ConsumeTag(b)
	if n >= 0 && num > protowire.MaxValidNumber {
		return 0, 0, -2 // protowire's code for an invalid field number
	}
	return num, typ, n
}

// skipField skips an unknown field's value (or a known field's with the
// wrong wire type, which protobuf treats as unknown), as a decoder that
// discards unknown fields does.
func skipField(num protowire.Number, typ protowire.Type, b []byte) ([]byte, error) {
	if typ == protowire.EndGroupType {
		return nil, malformed("undecodable frame: unexpected end of group %d", num)
	}
	m := protowire.ConsumeFieldValue(num, typ, b)
	if m < 0 {
		return nil, malformed("undecodable frame: field %d: %v", num, protowire.ParseError(m))
	}
	return b[m:], nil
}

// EventSize is len(AppendEvent(nil, ev)).
func EventSize(ev *relayv1.Event) int {
	n := 0
	str := func(num protowire.Number, s string) {
		if s != "" {
			n += protowire.SizeTag(num) + protowire.SizeBytes(len(s))
		}
	}
	varint := func(num protowire.Number, v uint64) {
		if v != 0 {
			n += protowire.SizeTag(num) + protowire.SizeVarint(v)
		}
	}
	str(evID, ev.GetId())
	str(evSender, ev.GetSenderDeviceId())
	for _, t := range ev.GetTargets() {
		n += protowire.SizeTag(evTargets) + protowire.SizeBytes(len(t))
	}
	varint(evSeq, ev.GetSeq())
	varint(evCreated, uint64(ev.GetCreatedAtMs()))
	varint(evTTL, uint64(ev.GetTtlMs()))
	str(evType, ev.GetType())
	if len(ev.GetPayload()) > 0 {
		n += protowire.SizeTag(evPayload) + protowire.SizeBytes(len(ev.GetPayload()))
	}
	if ev.GetEphemeral() {
		n += protowire.SizeTag(evEphemeral) + 1
	}
	if ev.GetAnyOne() {
		n += protowire.SizeTag(evAnyOne) + 1
	}
	return n
}

// AppendEvent appends the encoding of ev, the bytes proto.Marshal writes
// for it (fields in number order, zero values and unknown fields left
// out). The strings must be valid UTF-8, as DecodeEvent leaves them.
func AppendEvent(dst []byte, ev *relayv1.Event) []byte {
	str := func(num protowire.Number, s string) {
		if s != "" {
			dst = protowire.AppendTag(dst, num, protowire.BytesType)
			dst = protowire.AppendString(dst, s)
		}
	}
	varint := func(num protowire.Number, v uint64) {
		if v != 0 {
			dst = protowire.AppendTag(dst, num, protowire.VarintType)
			dst = protowire.AppendVarint(dst, v)
		}
	}
	str(evID, ev.GetId())
	str(evSender, ev.GetSenderDeviceId())
	for _, t := range ev.GetTargets() {
		dst = protowire.AppendTag(dst, evTargets, protowire.BytesType)
		dst = protowire.AppendString(dst, t)
	}
	varint(evSeq, ev.GetSeq())
	varint(evCreated, uint64(ev.GetCreatedAtMs()))
	varint(evTTL, uint64(ev.GetTtlMs()))
	str(evType, ev.GetType())
	if len(ev.GetPayload()) > 0 {
		dst = protowire.AppendTag(dst, evPayload, protowire.BytesType)
		dst = protowire.AppendBytes(dst, ev.GetPayload())
	}
	if ev.GetEphemeral() {
		dst = protowire.AppendTag(dst, evEphemeral, protowire.VarintType)
		dst = protowire.AppendVarint(dst, 1)
	}
	if ev.GetAnyOne() {
		dst = protowire.AppendTag(dst, evAnyOne, protowire.VarintType)
		dst = protowire.AppendVarint(dst, 1)
	}
	return dst
}

// receivedIDs is Received.delivery_ids' field number.
const receivedIDs protowire.Number = 2

// AppendReceivedIDs decodes an encoded relay.v1.Received and appends its
// delivery ids to dst, packed or not, as proto.Unmarshal would fill
// DeliveryIds. A malformed encoding is an *Error with
// ERROR_CODE_MALFORMED_FRAME; dst then holds what came before it.
func AppendReceivedIDs(dst []uint64, b []byte) ([]uint64, error) {
	start := len(dst)
	for len(b) > 0 {
		num, typ, n := consumeTag(b)
		if n < 0 {
			return dst[:start], malformed("undecodable receipt: %v", protowire.ParseError(n))
		}
		b = b[n:]
		switch {
		case num == receivedIDs && typ == protowire.VarintType:
			v, m := protowire.ConsumeVarint(b)
			if m < 0 {
				return dst[:start], malformed("undecodable receipt: %v", protowire.ParseError(m))
			}
			b = b[m:]
			dst = append(dst, v)
		case num == receivedIDs && typ == protowire.BytesType:
			packed, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return dst[:start], malformed("undecodable receipt: %v", protowire.ParseError(m))
			}
			b = b[m:]
			for len(packed) > 0 {
				v, k := protowire.ConsumeVarint(packed)
				if k < 0 {
					return dst[:start], malformed("undecodable receipt: %v", protowire.ParseError(k))
				}
				packed = packed[k:]
				dst = append(dst, v)
			}
		default:
			var err error
			if b, err = skipField(num, typ, b); err != nil {
				return dst[:start], err
			}
		}
	}
	return dst, nil
}
