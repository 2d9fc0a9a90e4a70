package session

import (
	"bytes"
	"math"
	"math/big"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/edge/frame"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

func TestValidateEvent(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	l := DefaultLimits()
	ev := func(mod func(*relayv1.Event)) *relayv1.Event {
		e := &relayv1.Event{Id: "e1", Seq: 1, CreatedAtMs: now.UnixMilli(), TtlMs: time.Minute.Milliseconds(), Type: "note", Payload: []byte("x")}
		if mod != nil {
			mod(e)
		}
		return e
	}
	ms := func(d time.Duration) int64 { return now.Add(d).UnixMilli() }
	cases := []struct {
		name string
		e    *relayv1.Event
		want relayv1.ErrorCode // UNSPECIFIED: accepted
	}{
		{"ok", ev(nil), 0},
		{"created 4 min in the future", ev(func(e *relayv1.Event) { e.CreatedAtMs = ms(4 * time.Minute) }), 0},
		{"created 6 min in the future", ev(func(e *relayv1.Event) { e.CreatedAtMs = ms(6 * time.Minute) }), relayv1.ErrorCode_ERROR_CODE_CREATED_IN_FUTURE},
		{"4 min past expiry", ev(func(e *relayv1.Event) { e.CreatedAtMs = ms(-5 * time.Minute) }), 0},
		{"6 min past expiry", ev(func(e *relayv1.Event) { e.CreatedAtMs = ms(-7 * time.Minute) }), relayv1.ErrorCode_ERROR_CODE_EXPIRED},
		{"ttl above max", ev(func(e *relayv1.Event) { e.TtlMs = (8 * 24 * time.Hour).Milliseconds() }), relayv1.ErrorCode_ERROR_CODE_TTL_TOO_LONG},
		{"no ttl", ev(func(e *relayv1.Event) { e.TtlMs = 0 }), relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME},
		{"payload too large", ev(func(e *relayv1.Event) { e.Payload = bytes.Repeat([]byte("x"), l.MaxPayloadBytes+1) }), relayv1.ErrorCode_ERROR_CODE_PAYLOAD_TOO_LARGE},
		{"payload at the limit", ev(func(e *relayv1.Event) { e.Payload = bytes.Repeat([]byte("x"), l.MaxPayloadBytes) }), 0},
		{"no id", ev(func(e *relayv1.Event) { e.Id = "" }), relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME},
		{"long id", ev(func(e *relayv1.Event) { e.Id = strings.Repeat("i", 65) }), relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME},
		{"seq 0", ev(func(e *relayv1.Event) { e.Seq = 0 }), relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME},
		{"long type", ev(func(e *relayv1.Event) { e.Type = strings.Repeat("t", 65) }), relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME},
		{"too many targets", ev(func(e *relayv1.Event) { e.Targets = make([]string, 65) }), relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME},
		{"ephemeral to any one", ev(func(e *relayv1.Event) { e.Ephemeral, e.AnyOne = true, true }), relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME},
		{"durable to any one", ev(func(e *relayv1.Event) { e.AnyOne = true }), 0},
		// Values that overflow a time.Duration in milliseconds.
		{"ttl 2^58 + 1 min", ev(func(e *relayv1.Event) { e.TtlMs = 1<<58 + 60000 }), relayv1.ErrorCode_ERROR_CODE_TTL_TOO_LONG},
		{"ttl MaxInt64", ev(func(e *relayv1.Event) { e.TtlMs = math.MaxInt64 }), relayv1.ErrorCode_ERROR_CODE_TTL_TOO_LONG},
		{"ttl just above max", ev(func(e *relayv1.Event) { e.TtlMs = l.MaxTTL.Milliseconds() + 1 }), relayv1.ErrorCode_ERROR_CODE_TTL_TOO_LONG},
		{"ttl at max", ev(func(e *relayv1.Event) { e.TtlMs = l.MaxTTL.Milliseconds() }), 0},
		{"ttl negative", ev(func(e *relayv1.Event) { e.TtlMs = -1 }), relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME},
		{"ttl MinInt64", ev(func(e *relayv1.Event) { e.TtlMs = math.MinInt64 }), relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME},
		{"created MaxInt64", ev(func(e *relayv1.Event) { e.CreatedAtMs = math.MaxInt64 }), relayv1.ErrorCode_ERROR_CODE_CREATED_IN_FUTURE},
		{"created MinInt64", ev(func(e *relayv1.Event) { e.CreatedAtMs = math.MinInt64 }), relayv1.ErrorCode_ERROR_CODE_EXPIRED},
		{"created MinInt64, max ttl", ev(func(e *relayv1.Event) { e.CreatedAtMs, e.TtlMs = math.MinInt64, l.MaxTTL.Milliseconds() }), relayv1.ErrorCode_ERROR_CODE_EXPIRED},
		{"created at 0", ev(func(e *relayv1.Event) { e.CreatedAtMs = 0 }), relayv1.ErrorCode_ERROR_CODE_EXPIRED},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			exp, err := ValidateEvent(tc.e, l, now)
			if tc.want == 0 {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				checkExpiry(t, tc.e, l, now, exp)
				return
			}
			if err == nil || err.Code != tc.want {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.want.String()) {
				t.Fatalf("message %q", err)
			}
		})
	}
	// The tolerance is configurable.
	strict := l
	strict.SkewTolerance = time.Minute
	if _, err := ValidateEvent(ev(func(e *relayv1.Event) { e.CreatedAtMs = ms(2 * time.Minute) }), strict, now); err == nil || err.Code != relayv1.ErrorCode_ERROR_CODE_CREATED_IN_FUTURE {
		t.Fatalf("1 min tolerance, 2 min ahead: %v", err)
	}
	// A creation time in the future is skew: the life counts from now.
	exp, err := ValidateEvent(ev(func(e *relayv1.Event) { e.CreatedAtMs, e.TtlMs = ms(4*time.Minute), l.MaxTTL.Milliseconds() }), l, now)
	if err != nil || !exp.Equal(now.Add(l.MaxTTL+l.SkewTolerance)) {
		t.Fatalf("created 4 min ahead with the longest ttl: expires %v (%v), want %v", exp, err, now.Add(l.MaxTTL+l.SkewTolerance))
	}
	p := l.Proto()
	if p.GetSkewToleranceMs() != 300000 || p.GetMaxPayloadBytes() != uint32(l.MaxPayloadBytes) {
		t.Fatalf("announced limits %v", p)
	}
}

// Setting one limit keeps the defaults of the others (a config that
// raises the event rate must not make every event id too long).
func TestLimitsDefaultFieldByField(t *testing.T) {
	got := Limits{EventsPerSecond: 5000, MaxTTL: time.Hour}.WithDefaults()
	want := DefaultLimits()
	want.EventsPerSecond, want.MaxTTL = 5000, time.Hour
	if got != want {
		t.Fatalf("got %+v, want %+v", got, want)
	}
	if (Limits{}).WithDefaults() != DefaultLimits() {
		t.Fatal("zero limits are not the defaults")
	}
}

// LargestEvent is the encoding of an event with every field at its
// longest, as the edge relays and stores it; and no more than a frame
// carries (plus the sender's id the edge fills in) when the frame limit
// is the tighter.
func TestLargestEvent(t *testing.T) {
	l := DefaultLimits()
	id := strings.Repeat("d", maxDeviceIDBytes)
	ev := &relayv1.Event{
		Id: strings.Repeat("i", l.MaxIDBytes), SenderDeviceId: id, Seq: math.MaxUint64, CreatedAtMs: -1, TtlMs: -1,
		Type: strings.Repeat("t", l.MaxTypeBytes), Payload: make([]byte, l.MaxPayloadBytes), AnyOne: true,
	}
	for range l.MaxTargets {
		ev.Targets = append(ev.Targets, id)
	}
	if got, want := l.LargestEvent(), len(frame.AppendEvent(nil, ev)); got != want {
		t.Fatalf("LargestEvent %d, the largest event encodes in %d", got, want)
	}
	// Zero fields count at their defaults.
	if got := (Limits{}).LargestEvent(); got != l.LargestEvent() {
		t.Fatalf("zero limits: LargestEvent %d, the defaults' %d", got, l.LargestEvent())
	}
	// A frame limit below the payload's: what a frame holds, with the
	// sender's id in place of the one the device sent (none here).
	l.MaxFrameBytes = 16 << 10
	ev.Targets, ev.Type, ev.SenderDeviceId = nil, "", ""
	ev.Payload = ev.Payload[:l.MaxFrameBytes]
	for {
		if _, err := frame.AppendEventFrame(nil, ev, l.MaxFrameBytes); err == nil {
			break
		}
		ev.Payload = ev.Payload[:len(ev.Payload)-1]
	}
	ev.SenderDeviceId = id
	if got, most := l.LargestEvent(), len(frame.AppendEvent(nil, ev)); got < most || got > l.MaxFrameBytes+3+maxDeviceIDBytes {
		t.Fatalf("frame limit %d: LargestEvent %d, a framed event stores in %d", l.MaxFrameBytes, got, most)
	}
}

// An edge delivers whatever it accepts: its largest event fits the
// Deliver frame its devices read (the frame limit plus frame.DeliverSlack),
// at any frame limit; and one byte more than that frame holds is not
// deliverable.
func TestAnEdgeDeliversWhatItAccepts(t *testing.T) {
	for _, limit := range []int{512, 16 << 10, 64 << 10, 1 << 20, frame.MaxFrameLimit} {
		l := DefaultLimits()
		l.MaxFrameBytes = limit
		if n := l.LargestEvent(); !l.deliverable(n) {
			t.Errorf("frame limit %d: the largest event (%d bytes) is not deliverable", limit, n)
		}
		read := limit + frame.DeliverSlack
		n := read
		for len(appendDeliverBody(nil, make([]byte, n), math.MaxUint64)) > read {
			n--
		}
		if !l.deliverable(n) || l.deliverable(n+1) {
			t.Errorf("frame limit %d: deliverable(%d) %v, deliverable(%d) %v; the longest that fits a %d-byte read is %d",
				limit, n, l.deliverable(n), n+1, l.deliverable(n+1), read, n)
		}
	}
}

// checkExpiry asserts the properties of an accepted event's expiry: after
// now, no later than now + MaxTTL + SkewTolerance, and equal to the
// reference computed with unbounded integers (so no overflow can make
// the two differ).
func checkExpiry(t *testing.T, ev *relayv1.Event, l Limits, now, exp time.Time) {
	t.Helper()
	if !exp.After(now) {
		t.Fatalf("accepted event %v expires at %v, not after now %v", ev, exp, now)
	}
	if limit := now.Add(l.MaxTTL + l.SkewTolerance); exp.After(limit) {
		t.Fatalf("accepted event %v expires at %v, after now + max ttl + skew %v", ev, exp, limit)
	}
	nowMs := big.NewInt(now.UnixMilli())
	start := big.NewInt(ev.GetCreatedAtMs())
	if start.Cmp(nowMs) > 0 {
		start = nowMs
	}
	want := new(big.Int).Add(start, big.NewInt(ev.GetTtlMs()))
	want.Add(want, big.NewInt(l.SkewTolerance.Milliseconds()))
	if !want.IsInt64() || want.Int64() != exp.UnixMilli() {
		t.Fatalf("accepted event %v expires at %d ms, reference %s ms", ev, exp.UnixMilli(), want)
	}
}

// refusedByReference is ValidateEvent's time checks computed with
// unbounded integers: the code it should refuse the event with, or
// UNSPECIFIED.
func refusedByReference(ev *relayv1.Event, l Limits, now time.Time) relayv1.ErrorCode {
	ttl, created := big.NewInt(ev.GetTtlMs()), big.NewInt(ev.GetCreatedAtMs())
	nowMs, skew := big.NewInt(now.UnixMilli()), big.NewInt(l.SkewTolerance.Milliseconds())
	switch {
	case ttl.Sign() <= 0:
		return relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME
	case ttl.Cmp(big.NewInt(l.MaxTTL.Milliseconds())) > 0:
		return relayv1.ErrorCode_ERROR_CODE_TTL_TOO_LONG
	case created.Cmp(new(big.Int).Add(nowMs, skew)) > 0:
		return relayv1.ErrorCode_ERROR_CODE_CREATED_IN_FUTURE
	}
	end := new(big.Int).Add(created, ttl)
	if nowMs.Cmp(end.Add(end, skew)) >= 0 {
		return relayv1.ErrorCode_ERROR_CODE_EXPIRED
	}
	return 0
}

// FuzzValidateEvent decodes an event from bytes, as the edge does, and
// validates it: no panic, every refusal typed, the time checks agree
// with an overflow-free reference, and an accepted event's expiry obeys
// checkExpiry.
func FuzzValidateEvent(f *testing.F) {
	now := time.Unix(1_800_000_000, 0)
	l := DefaultLimits()
	seed := func(ev *relayv1.Event) {
		b, err := proto.Marshal(ev)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	base := func() *relayv1.Event {
		return &relayv1.Event{Id: "e1", Seq: 1, CreatedAtMs: now.UnixMilli(), TtlMs: 60000, Type: "t", Payload: []byte("x")}
	}
	for _, mod := range []func(*relayv1.Event){
		func(*relayv1.Event) {},
		func(e *relayv1.Event) { e.TtlMs = 1<<58 + 60000 },
		func(e *relayv1.Event) { e.TtlMs = math.MaxInt64 },
		func(e *relayv1.Event) { e.TtlMs = math.MinInt64 },
		func(e *relayv1.Event) { e.CreatedAtMs = math.MaxInt64 },
		func(e *relayv1.Event) { e.CreatedAtMs = math.MinInt64 },
		func(e *relayv1.Event) { e.CreatedAtMs += 299_999 },
		func(e *relayv1.Event) { e.CreatedAtMs -= 359_999 },
		func(e *relayv1.Event) { e.Targets = []string{"a", "b"}; e.AnyOne = true },
		func(e *relayv1.Event) { e.Ephemeral = true },
	} {
		e := base()
		mod(e)
		seed(e)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var ev relayv1.Event
		if proto.Unmarshal(b, &ev) != nil {
			return
		}
		exp, rej := ValidateEvent(&ev, l, now)
		if rej != nil {
			if rej.Code == relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED || rej.Msg == "" {
				t.Fatalf("untyped refusal %+v", rej)
			}
		}
		// The time checks come after the shape checks; compare them only
		// where the shape is fine.
		shapeOK := rej == nil || rej.Code == relayv1.ErrorCode_ERROR_CODE_TTL_TOO_LONG ||
			rej.Code == relayv1.ErrorCode_ERROR_CODE_CREATED_IN_FUTURE || rej.Code == relayv1.ErrorCode_ERROR_CODE_EXPIRED ||
			(rej.Code == relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME && ev.GetTtlMs() <= 0 && strings.Contains(rej.Msg, "ttl"))
		if shapeOK {
			var got relayv1.ErrorCode
			if rej != nil {
				got = rej.Code
			}
			if want := refusedByReference(&ev, l, now); got != want {
				t.Fatalf("event %v: got %v, reference %v", &ev, got, want)
			}
		}
		if rej == nil {
			checkExpiry(t, &ev, l, now, exp)
		}
	})
}
