package session

import (
	"fmt"
	"math"
	"strings"
	"time"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/edge-relay/relay/edge/frame"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// Limits are the per-session limits an edge enforces and announces in
// its Welcome.
type Limits struct {
	MaxFrameBytes   int
	MaxPayloadBytes int
	MaxTTL          time.Duration
	// SkewTolerance is how far a client's clock may be off: an event may
	// claim a creation time up to this far in the future, and is still
	// accepted up to this long after its TTL ran out.
	SkewTolerance time.Duration
	// EventsPerSecond, BytesPerSecond and FramesPerSecond are what a
	// device may send: every frame counts against frames and its bytes
	// on the wire, events also against events; a durable event stored in
	// the mailboxes of n offline targets counts n times its bytes. Above
	// them the edge reads the device's stream more slowly; nothing is
	// refused.
	EventsPerSecond int
	BytesPerSecond  int
	FramesPerSecond int
	// FrameTimeout is how long a frame may take from its first byte to
	// its last.
	FrameTimeout time.Duration
	MaxTargets   int
	MaxIDBytes   int
	MaxTypeBytes int
}

// DefaultLimits are the limits of an edge configured with nothing.
func DefaultLimits() Limits {
	return Limits{
		MaxFrameBytes: 64 << 10, MaxPayloadBytes: 48 << 10, MaxTTL: 7 * 24 * time.Hour,
		SkewTolerance: 5 * time.Minute, EventsPerSecond: 200, BytesPerSecond: 1 << 20,
		FramesPerSecond: 1000, FrameTimeout: 10 * time.Second,
		MaxTargets: 64, MaxIDBytes: 64, MaxTypeBytes: 64,
	}
}

// WithDefaults fills each zero field from DefaultLimits, so that setting
// one limit does not zero the others.
func (l Limits) WithDefaults() Limits {
	d := DefaultLimits()
	pick := func(v *int, def int) {
		if *v <= 0 {
			*v = def
		}
	}
	pick(&l.MaxFrameBytes, d.MaxFrameBytes)
	pick(&l.MaxPayloadBytes, d.MaxPayloadBytes)
	pick(&l.EventsPerSecond, d.EventsPerSecond)
	pick(&l.BytesPerSecond, d.BytesPerSecond)
	pick(&l.FramesPerSecond, d.FramesPerSecond)
	pick(&l.MaxTargets, d.MaxTargets)
	pick(&l.MaxIDBytes, d.MaxIDBytes)
	pick(&l.MaxTypeBytes, d.MaxTypeBytes)
	if l.MaxTTL <= 0 {
		l.MaxTTL = d.MaxTTL
	}
	if l.SkewTolerance <= 0 {
		l.SkewTolerance = d.SkewTolerance
	}
	if l.FrameTimeout <= 0 {
		l.FrameTimeout = d.FrameTimeout
	}
	return l
}

// LargestEvent is the most bytes an event these limits admit takes as
// the edge relays and stores it (a mailbox entry holds this encoding):
// its payload, id and type at their longest, as many targets as allowed
// of the longest device ids, the sender's id the edge fills in, and the
// numbers at their widest; and no more than what a frame carries, plus
// that sender's id. Fields left zero count at their defaults.
func (l Limits) LargestEvent() int {
	l = l.WithDefaults()
	id := strings.Repeat("d", maxDeviceIDBytes)
	ev := &relayv1.Event{
		Id: strings.Repeat("i", l.MaxIDBytes), SenderDeviceId: id, Targets: make([]string, l.MaxTargets),
		Seq: math.MaxUint64, CreatedAtMs: math.MinInt64, TtlMs: math.MinInt64, Type: strings.Repeat("t", l.MaxTypeBytes),
		AnyOne: true,
	}
	for i := range ev.Targets {
		ev.Targets[i] = id
	}
	// The payload's field without making the payload.
	fd := ev.ProtoReflect().Descriptor().Fields()
	payloadField, senderField := fd.ByName("payload").Number(), fd.ByName("sender_device_id").Number()
	fields := frame.EventSize(ev) + protowire.SizeTag(payloadField) + protowire.SizeBytes(l.MaxPayloadBytes)
	framed := l.MaxFrameBytes + protowire.SizeTag(senderField) + protowire.SizeBytes(maxDeviceIDBytes)
	return min(fields, framed)
}

// deliverable reports whether an event of n bytes fits the Deliver frame
// devices under these limits read: up to the frame limit plus
// frame.DeliverSlack. An event accepted under them always does (its frame
// was within the limit, and the edge added no more than its sender's id);
// one accepted by an edge with a larger limit may not, and would end the
// device's session (relay.js stops for good; the Go client reconnects and
// meets the event again, until it expires).
func (l Limits) deliverable(n int) bool {
	return deliverBodySize(n, math.MaxUint64) <= l.MaxFrameBytes+frame.DeliverSlack
}

// Proto returns the limits as announced to the client.
func (l Limits) Proto() *relayv1.Limits {
	return &relayv1.Limits{
		MaxFrameBytes: uint32(l.MaxFrameBytes), MaxPayloadBytes: uint32(l.MaxPayloadBytes),
		MaxTtlMs: l.MaxTTL.Milliseconds(), SkewToleranceMs: l.SkewTolerance.Milliseconds(),
		EventsPerSecond: uint32(l.EventsPerSecond), BytesPerSecond: uint32(l.BytesPerSecond),
		FramesPerSecond: uint32(l.FramesPerSecond), FrameTimeoutMs: l.FrameTimeout.Milliseconds(),
	}
}

// RejectError is an event refused with a protocol code; the session
// goes on.
type RejectError struct {
	Code relayv1.ErrorCode
	Msg  string
}

func (e *RejectError) Error() string { return fmt.Sprintf("%s: %s", e.Code, e.Msg) }

func reject(code relayv1.ErrorCode, format string, args ...any) *RejectError {
	return &RejectError{Code: code, Msg: fmt.Sprintf(format, args...)}
}

// ValidateEvent checks an event's own fields at time now (the edge's
// clock): sizes, TTL, creation time against the skew tolerance, and the
// shape of ids. Checks that need state (targets, revocation, rate)
// belong to the session. It returns when the event stops being
// deliverable, or a *RejectError.
//
// Times are checked in integer milliseconds against explicit bounds
// before anything is converted to a time.Duration, so no value a client
// sends can overflow into an accepted one. The expiry counts the TTL
// from the creation time, but never from later than now (a creation
// time in the future is clock skew, not a longer life), plus the skew
// tolerance: an accepted event always expires after now and no later
// than now + MaxTTL + SkewTolerance.
func ValidateEvent(ev *relayv1.Event, l Limits, now time.Time) (time.Time, *RejectError) {
	malformed := relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME
	if ev.GetId() == "" || len(ev.GetId()) > l.MaxIDBytes || !utf8.ValidString(ev.GetId()) {
		return time.Time{}, reject(malformed, "event id must be 1 to %d bytes of UTF-8", l.MaxIDBytes)
	}
	if ev.GetSeq() == 0 {
		return time.Time{}, reject(malformed, "event %s: seq must start at 1", ev.GetId())
	}
	if len(ev.GetType()) > l.MaxTypeBytes {
		return time.Time{}, reject(malformed, "event %s: type longer than %d bytes", ev.GetId(), l.MaxTypeBytes)
	}
	if len(ev.GetTargets()) > l.MaxTargets {
		return time.Time{}, reject(malformed, "event %s: %d targets, at most %d", ev.GetId(), len(ev.GetTargets()), l.MaxTargets)
	}
	for _, t := range ev.GetTargets() {
		// Device ids are at most maxDeviceIDBytes (the Hello's bound):
		// a longer target names no device, and would only be echoed back
		// in the Reject that says so.
		if t == "" || len(t) > maxDeviceIDBytes {
			return time.Time{}, reject(malformed, "event %s: a target must be 1 to %d bytes", ev.GetId(), maxDeviceIDBytes)
		}
	}
	if ev.GetAnyOne() && ev.GetEphemeral() {
		return time.Time{}, reject(malformed, "event %s: an ephemeral event cannot go to any one device", ev.GetId())
	}
	if len(ev.GetPayload()) > l.MaxPayloadBytes {
		return time.Time{}, reject(relayv1.ErrorCode_ERROR_CODE_PAYLOAD_TOO_LARGE, "event %s: payload of %d bytes, at most %d", ev.GetId(), len(ev.GetPayload()), l.MaxPayloadBytes)
	}
	ttlMs, maxTTLMs, skewMs := ev.GetTtlMs(), l.MaxTTL.Milliseconds(), l.SkewTolerance.Milliseconds()
	if ttlMs <= 0 {
		return time.Time{}, reject(malformed, "event %s: ttl_ms must be positive", ev.GetId())
	}
	if ttlMs > maxTTLMs {
		return time.Time{}, reject(relayv1.ErrorCode_ERROR_CODE_TTL_TOO_LONG, "event %s: ttl of %d ms above the maximum %s", ev.GetId(), ttlMs, l.MaxTTL)
	}
	// Bounded from here on: 0 < ttlMs <= maxTTLMs, and nowMs, skewMs are
	// the edge's own values.
	nowMs, createdMs := now.UnixMilli(), ev.GetCreatedAtMs()
	if createdMs > nowMs+skewMs {
		return time.Time{}, reject(relayv1.ErrorCode_ERROR_CODE_CREATED_IN_FUTURE, "event %s: created %s in the future, tolerance %s", ev.GetId(), msDuration(createdMs-nowMs), l.SkewTolerance)
	}
	// createdMs may be any value down to MinInt64: anything older than
	// the longest life is expired before its age is worked out.
	if createdMs < nowMs-(maxTTLMs+skewMs) {
		return time.Time{}, reject(relayv1.ErrorCode_ERROR_CODE_EXPIRED, "event %s: created more than %s ago", ev.GetId(), l.MaxTTL+l.SkewTolerance)
	}
	if age := nowMs - min(createdMs, nowMs); age >= ttlMs+skewMs {
		return time.Time{}, reject(relayv1.ErrorCode_ERROR_CODE_EXPIRED, "event %s: created %s ago with a ttl of %d ms, tolerance %s", ev.GetId(), msDuration(age), ttlMs, l.SkewTolerance)
	}
	return time.UnixMilli(min(createdMs, nowMs) + ttlMs + skewMs), nil
}

// msDuration formats a span of milliseconds that may exceed what a
// time.Duration holds.
func msDuration(ms int64) string {
	if ms > math.MaxInt64/int64(time.Millisecond) || ms < -math.MaxInt64/int64(time.Millisecond) {
		return fmt.Sprintf("%d ms", ms)
	}
	return (time.Duration(ms) * time.Millisecond).String()
}
