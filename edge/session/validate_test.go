package session

import (
	"bytes"
	"strings"
	"testing"
	"time"

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
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := ValidateEvent(tc.e, l, now)
			if tc.want == 0 {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
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
	if err := ValidateEvent(ev(func(e *relayv1.Event) { e.CreatedAtMs = ms(2 * time.Minute) }), strict, now); err == nil || err.Code != relayv1.ErrorCode_ERROR_CODE_CREATED_IN_FUTURE {
		t.Fatalf("1 min tolerance, 2 min ahead: %v", err)
	}
	p := l.Proto()
	if p.GetSkewToleranceMs() != 300000 || p.GetMaxPayloadBytes() != uint32(l.MaxPayloadBytes) {
		t.Fatalf("announced limits %v", p)
	}
}

// Setting one limit keeps the defaults of the others (a config that
// raises the event rate must not make every event id too long).
func TestLimitsDefaultFieldByField(t *testing.T) {
	got := Limits{EventsPerSecond: 5000, MaxTTL: time.Hour}.withDefaults()
	want := DefaultLimits()
	want.EventsPerSecond, want.MaxTTL = 5000, time.Hour
	if got != want {
		t.Fatalf("got %+v, want %+v", got, want)
	}
	if (Limits{}).withDefaults() != DefaultLimits() {
		t.Fatal("zero limits are not the defaults")
	}
}
