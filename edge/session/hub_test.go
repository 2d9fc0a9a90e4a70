package session

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/edge-relay/relay/edge/devconn"
	"github.com/edge-relay/relay/edge/frame"
	"github.com/edge-relay/relay/internal/stacks"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

func TestFullHandshakeAndResume(t *testing.T) {
	e := newEnv(t, nil)
	e.device("u1", "d1")
	d := e.online("d1")
	w := d.welcome
	if w.GetSessionId() == "" || w.GetResumed() || len(w.GetResumeTicket()) == 0 || w.GetLimits().GetMaxPayloadBytes() == 0 {
		t.Fatalf("welcome: %v", w)
	}
	if skew := time.Since(time.UnixMilli(w.GetServerTimeMs())); skew < -time.Second || skew > time.Second {
		t.Fatalf("server time off by %s", skew)
	}
	// The ticket resumes without a signature round trip.
	d2 := e.connect("d1")
	d2.send(d2.hello(w.GetResumeTicket()))
	w2 := d2.readDirect().GetWelcome()
	if w2 == nil || !w2.GetResumed() || w2.GetSessionId() == w.GetSessionId() {
		t.Fatalf("resume: %v", w2)
	}
	// The resumed session replaced the first one.
	if c := d.nextClose(); c.GetCode() != relayv1.ErrorCode_ERROR_CODE_REPLACED {
		t.Fatalf("first session closed with %v", c)
	}
	if got := e.metric("relay_edge_handshakes_total", "result", "resumed"); got != 1 {
		t.Fatalf("resumed handshakes metric = %v", got)
	}
}

func TestTicketsThatAreRefused(t *testing.T) {
	e := newEnv(t, nil)
	e.device("u1", "d1")
	e.device("u1", "d2")
	valid := e.online("d1").welcome.GetResumeTicket()

	forged := bytes.Clone(valid)
	forged[len(forged)-1] ^= 1
	other := NewRing()
	other.Set("k1", []SessionKey{{ID: "k1", Secret: bytes.Repeat([]byte{9}, 32)}})
	foreign, _ := other.Seal(Ticket{UserID: "u1", DeviceID: "d1", AuthAt: time.Now(), ExpiresAt: time.Now().Add(time.Hour)})
	expired, _ := e.ring.Seal(Ticket{UserID: "u1", DeviceID: "d1", AuthAt: time.Now().Add(-2 * time.Hour), ExpiresAt: time.Now().Add(-time.Minute)})
	tooOld, _ := e.ring.Seal(Ticket{UserID: "u1", DeviceID: "d1", AuthAt: time.Now().Add(-25 * time.Hour), ExpiresAt: time.Now().Add(time.Hour)})
	d2Ticket, _ := e.ring.Seal(Ticket{UserID: "u1", DeviceID: "d2", AuthAt: time.Now(), ExpiresAt: time.Now().Add(time.Hour)})

	cases := []struct {
		name   string
		ticket []byte
		want   relayv1.ErrorCode
	}{
		{"forged", forged, relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED},
		{"sealed by another cluster", foreign, relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED},
		{"expired", expired, relayv1.ErrorCode_ERROR_CODE_SESSION_EXPIRED},
		{"proof of key older than the maximum age", tooOld, relayv1.ErrorCode_ERROR_CODE_SESSION_EXPIRED},
		{"another device's ticket", d2Ticket, relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED},
		{"garbage", []byte("not a ticket"), relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := e.connect("d1")
			d.send(d.hello(c.ticket))
			ch := d.readDirect().GetChallenge()
			if ch == nil || ch.GetTicketError() != c.want {
				t.Fatalf("want a challenge with ticket error %v, got %v", c.want, ch)
			}
		})
	}

	// A key that left the ring (rotated out) no longer opens its tickets.
	e.ring.Set("k2", []SessionKey{{ID: "k2", Secret: bytes.Repeat([]byte{2}, 32)}})
	d := e.connect("d1")
	d.send(d.hello(valid))
	if ch := d.readDirect().GetChallenge(); ch == nil || ch.GetTicketError() != relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED {
		t.Fatalf("rotated-out ticket: %v", ch)
	}
}

func TestAuthenticationFailures(t *testing.T) {
	e := newEnv(t, nil)
	e.device("u1", "d1")
	e.device("u2", "x1")
	e.device("u1", "gone")
	e.dir.setState("gone", DeviceRevoked)
	_, wrongKey, _ := ed25519.GenerateKey(rand.Reader)

	run := func(t *testing.T, d *dev, hello *relayv1.Frame, answer func(*relayv1.Challenge) *relayv1.Frame) {
		t.Helper()
		d.send(hello)
		ch := d.readDirect().GetChallenge()
		if ch == nil {
			t.Fatal("expected a challenge, whatever the device")
		}
		d.send(answer(ch))
		c := d.readDirect().GetClose()
		if c.GetCode() != relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED || c.GetMessage() != "authentication failed" {
			t.Fatalf("close: %v", c)
		}
		if err := <-d.serve; codeOf(err) != relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED {
			t.Fatalf("Serve returned %v", err)
		}
	}
	t.Run("wrong key", func(t *testing.T) {
		d := e.connect("d1")
		h := d.hello(nil)
		run(t, d, h, func(ch *relayv1.Challenge) *relayv1.Frame { return sign(h.GetHello(), ch, wrongKey) })
	})
	t.Run("replayed signature", func(t *testing.T) {
		// A signature captured from one session is useless in the next:
		// the nonce differs.
		first := e.connect("d1")
		h := first.hello(nil)
		first.send(h)
		ch1 := first.readDirect().GetChallenge()
		captured := sign(h.GetHello(), ch1, e.keys["d1"])
		first.send(captured)
		if first.readDirect().GetWelcome() == nil {
			t.Fatal("original handshake failed")
		}
		d := e.connect("d1")
		run(t, d, h, func(*relayv1.Challenge) *relayv1.Frame { return captured })
	})
	t.Run("signature for another edge", func(t *testing.T) {
		d := e.connect("d1")
		h := d.hello(nil)
		run(t, d, h, func(ch *relayv1.Challenge) *relayv1.Frame {
			other := &relayv1.Challenge{Nonce: ch.GetNonce(), ServerTimeMs: ch.GetServerTimeMs(), EdgeId: "edge-other"}
			return sign(h.GetHello(), other, e.keys["d1"])
		})
	})
	t.Run("device of another user", func(t *testing.T) {
		d := e.connect("d1")
		h := d.hello(nil)
		h.GetHello().DeviceId = "x1" // u1 claims u2's device, even with its key
		run(t, d, h, func(ch *relayv1.Challenge) *relayv1.Frame { return sign(h.GetHello(), ch, e.keys["x1"]) })
	})
	t.Run("unknown device", func(t *testing.T) {
		d := e.connect("d1")
		h := d.hello(nil)
		h.GetHello().DeviceId = "nope"
		run(t, d, h, func(ch *relayv1.Challenge) *relayv1.Frame { return sign(h.GetHello(), ch, e.keys["d1"]) })
	})
	t.Run("revoked device", func(t *testing.T) {
		d := e.connect("gone")
		h := d.hello(nil)
		run(t, d, h, func(ch *relayv1.Challenge) *relayv1.Frame { return sign(h.GetHello(), ch, e.keys["gone"]) })
	})
}

func TestHandshakeProtocolErrors(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.HandshakeTimeout = 300 * time.Millisecond })
	e.device("u1", "d1")
	t.Run("unsupported version", func(t *testing.T) {
		d := e.connect("d1")
		h := d.hello(nil)
		h.GetHello().ProtocolVersion = 99
		d.send(h)
		if c := d.readDirect().GetClose(); c.GetCode() != relayv1.ErrorCode_ERROR_CODE_UNSUPPORTED_VERSION {
			t.Fatalf("close: %v", c)
		}
	})
	t.Run("event before hello", func(t *testing.T) {
		d := e.connect("d1")
		d.sendEvent(d.event())
		if c := d.readDirect().GetClose(); c.GetCode() != relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME {
			t.Fatalf("close: %v", c)
		}
	})
	t.Run("empty ids", func(t *testing.T) {
		d := e.connect("d1")
		h := d.hello(nil)
		h.GetHello().UserId = ""
		d.send(h)
		if c := d.readDirect().GetClose(); c.GetCode() != relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME {
			t.Fatalf("close: %v", c)
		}
	})
	t.Run("garbage bytes", func(t *testing.T) {
		d := e.connect("d1")
		if _, err := d.conn.Write([]byte{3, 0xff, 0xff, 0xff}); err != nil {
			t.Fatal(err)
		}
		if c := d.readDirect().GetClose(); c.GetCode() != relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME {
			t.Fatalf("close: %v", c)
		}
	})
	t.Run("frame too large", func(t *testing.T) {
		d := e.connect("d1")
		if _, err := d.conn.Write([]byte{0xff, 0xff, 0xff, 0x7f}); err != nil {
			t.Fatal(err)
		}
		if c := d.readDirect().GetClose(); c.GetCode() != relayv1.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE {
			t.Fatalf("close: %v", c)
		}
	})
	t.Run("silent client times out", func(t *testing.T) {
		d := e.connect("d1")
		if c := d.readDirect().GetClose(); c.GetCode() != relayv1.ErrorCode_ERROR_CODE_TIMEOUT {
			t.Fatalf("close: %v", c)
		}
		if err := <-d.serve; codeOf(err) != relayv1.ErrorCode_ERROR_CODE_TIMEOUT {
			t.Fatalf("Serve returned %v", err)
		}
	})
}

func TestHandshakesPerAddressAreLimited(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.HandshakesPerSecond, c.HandshakeBurst = 0.001, 2 })
	e.device("u1", "d1")
	e.connectFrom("d1", "10.0.0.1:1", true).login()
	e.connectFrom("d1", "10.0.0.1:2", true).login()
	d := e.connectFrom("d1", "10.0.0.1:3", true)
	if c := d.readDirect().GetClose(); c.GetCode() != relayv1.ErrorCode_ERROR_CODE_RATE_LIMITED {
		t.Fatalf("third handshake from one address: %v", c)
	}
	// Another address is not affected.
	e.connectFrom("d1", "10.0.0.2:1", true).login()

	// An IPv6 host may take any address of its /64: they share a budget.
	e.connectFrom("d1", "[2001:db8:1:2::1]:1", true).login()
	e.connectFrom("d1", "[2001:db8:1:2::2]:1", true).login()
	d = e.connectFrom("d1", "[2001:db8:1:2:ffff::3]:1", true)
	if c := d.readDirect().GetClose(); c.GetCode() != relayv1.ErrorCode_ERROR_CODE_RATE_LIMITED {
		t.Fatalf("third handshake from one /64: %v", c)
	}
	e.connectFrom("d1", "[2001:db8:1:3::1]:1", true).login()
}

func TestFanOutAckAndOrder(t *testing.T) {
	e := newEnv(t, nil)
	for _, id := range []string{"a", "b", "c"} {
		e.device("u1", id)
	}
	a, b, c := e.online("a"), e.online("b"), e.online("c")
	const n = 200
	for range n {
		a.sendEvent(a.event())
	}
	for _, r := range []*dev{b, c} {
		for i := 1; i <= n; i++ {
			dl := r.nextDeliver()
			ev := dl.GetEvent()
			if ev.GetSeq() != uint64(i) || ev.GetSenderDeviceId() != "a" || string(ev.GetPayload()) != "hello" {
				t.Fatalf("%s got %v as delivery %d", r.id, ev, i)
			}
			if dl.GetDeliveryId() == 0 {
				t.Fatal("durable delivery without an id")
			}
			// Only once both receivers acknowledged it may a be acked.
			if r == c {
				c.received(dl.GetDeliveryId())
			} else {
				b.received(dl.GetDeliveryId())
			}
		}
	}
	for i := 1; i <= n; i++ {
		f := a.nextAckOrReject()
		if f.GetAck().GetEventId() != fmt.Sprintf("a-%d", i) {
			t.Fatalf("ack %d: %v", i, f)
		}
	}
}

func TestAckWaitsForEveryTarget(t *testing.T) {
	e := newEnv(t, nil)
	for _, id := range []string{"a", "b", "c"} {
		e.device("u1", id)
	}
	a, b, c := e.online("a"), e.online("b"), e.online("c")
	a.sendEvent(a.event("b", "c"))
	db, dc := b.nextDeliver(), c.nextDeliver()
	b.received(db.GetDeliveryId())
	a.expectNothing("ack before every target received", func(f *relayv1.Frame) bool { return f.GetAck() != nil })
	c.received(dc.GetDeliveryId())
	if f := a.nextAckOrReject(); f.GetAck() == nil {
		t.Fatalf("want ack, got %v", f)
	}
	// Targeting one device reaches only it.
	a.sendEvent(a.event("c"))
	c.received(c.nextDeliver().GetDeliveryId())
	if f := a.nextAckOrReject(); f.GetAck() == nil {
		t.Fatalf("want ack, got %v", f)
	}
	b.expectNothing("delivery meant for c", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil })
}

// The edge's ack latency runs from the event's arrival to the moment the
// last target's receipt was read: the hub's clock at each end.
func TestAckLatencyIsArrivalToReceipt(t *testing.T) {
	var skew atomic.Int64 // added to the wall clock
	e := newEnv(t, func(c *Config) { c.Now = func() time.Time { return time.Now().Add(time.Duration(skew.Load())) } })
	e.devices("u1", "a", "b")
	a, b := e.online("a"), e.online("b")
	a.sendEvent(a.event("b"))
	d := b.nextDeliver()
	const held = 40 * time.Second // the receipt, as the edge's clock sees it
	skew.Store(int64(held))
	b.received(d.GetDeliveryId())
	if f := a.nextAckOrReject(); f.GetAck() == nil {
		t.Fatalf("want ack, got %v", f)
	}
	n, sum := e.histogram("relay_edge_ack_seconds")
	if n != 1 || sum < held.Seconds() || sum > held.Seconds()+30 {
		t.Fatalf("ack latency: %d observations, %.3f s in all; want one of %v and a little", n, sum, held)
	}
}

func TestEventRejections(t *testing.T) {
	e := newEnv(t, func(c *Config) {
		l := DefaultLimits()
		l.MaxPayloadBytes, l.MaxTTL, l.EventsPerSecond = 100, time.Hour, 1000
		c.Limits = l
	})
	e.device("u1", "a")
	e.device("u1", "b")
	e.device("u1", "off")
	e.device("u1", "del")
	e.dir.setState("del", DeviceDeleted)
	e.device("u1", "rev")
	e.dir.setState("rev", DeviceRevoked)
	e.device("u2", "x")
	a := e.online("a")
	b := e.online("b")
	now := time.Now()
	cases := []struct {
		name string
		mod  func(*relayv1.Event)
		want relayv1.ErrorCode
	}{
		{"payload too large", func(ev *relayv1.Event) { ev.Payload = make([]byte, 101) }, relayv1.ErrorCode_ERROR_CODE_PAYLOAD_TOO_LARGE},
		{"ttl above maximum", func(ev *relayv1.Event) { ev.TtlMs = (2 * time.Hour).Milliseconds() }, relayv1.ErrorCode_ERROR_CODE_TTL_TOO_LONG},
		{"created 6 min in the future", func(ev *relayv1.Event) { ev.CreatedAtMs = now.Add(6 * time.Minute).UnixMilli() }, relayv1.ErrorCode_ERROR_CODE_CREATED_IN_FUTURE},
		{"expired 6 min ago", func(ev *relayv1.Event) { ev.CreatedAtMs = now.Add(-7 * time.Minute).UnixMilli() }, relayv1.ErrorCode_ERROR_CODE_EXPIRED},
		{"another user's device", func(ev *relayv1.Event) { ev.Targets = []string{"x"} }, relayv1.ErrorCode_ERROR_CODE_UNKNOWN_TARGET},
		{"no such device", func(ev *relayv1.Event) { ev.Targets = []string{"nope"} }, relayv1.ErrorCode_ERROR_CODE_UNKNOWN_TARGET},
		{"deleted target", func(ev *relayv1.Event) { ev.Targets = []string{"del"} }, relayv1.ErrorCode_ERROR_CODE_TARGET_DELETED},
		{"revoked target", func(ev *relayv1.Event) { ev.Targets = []string{"rev"} }, relayv1.ErrorCode_ERROR_CODE_TARGET_DELETED},
		{"offline target", func(ev *relayv1.Event) { ev.Targets = []string{"b", "off"} }, relayv1.ErrorCode_ERROR_CODE_TARGET_OFFLINE},
		{"itself", func(ev *relayv1.Event) { ev.Targets = []string{"a"} }, relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME},
		{"target twice", func(ev *relayv1.Event) { ev.Targets = []string{"b", "b"} }, relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME},
		{"target longer than any device id", func(ev *relayv1.Event) { ev.Targets = []string{strings.Repeat("\x01", 129)} }, relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME},
		{"empty target", func(ev *relayv1.Event) { ev.Targets = []string{""} }, relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME},
		{"no id", func(ev *relayv1.Event) { ev.Id = "" }, relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME},
		{"seq not increasing", func(ev *relayv1.Event) { ev.Seq = 1 }, relayv1.ErrorCode_ERROR_CODE_SEQ_OUT_OF_ORDER},
	}
	// One accepted event first, so seq 1 is taken.
	a.sendEvent(a.event("b"))
	b.received(b.nextDeliver().GetDeliveryId())
	if f := a.nextAckOrReject(); f.GetAck() == nil {
		t.Fatalf("first event: %v", f)
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ev := a.event("b")
			c.mod(ev)
			a.sendEvent(ev)
			f := a.nextAckOrReject()
			if f.GetReject().GetCode() != c.want || f.GetReject().GetEventId() != ev.GetId() {
				t.Fatalf("want reject %v, got %v", c.want, f)
			}
		})
	}
	// Nothing of any refused event reached b, and the session goes on.
	b.expectNothing("a refused event", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil })
	a.sendEvent(a.event("b"))
	b.received(b.nextDeliver().GetDeliveryId())
	if f := a.nextAckOrReject(); f.GetAck() == nil {
		t.Fatalf("after the rejections: %v", f)
	}
	// A revoked sender is refused.
	e.dir.setState("a", DeviceRevoked)
	a.sendEvent(a.event("b"))
	if f := a.nextAckOrReject(); f.GetReject().GetCode() != relayv1.ErrorCode_ERROR_CODE_SENDER_REVOKED {
		t.Fatalf("revoked sender: %v", f)
	}
	if got := e.metric("relay_edge_events_total", "result", "unknown_target"); got != 2 {
		t.Fatalf("unknown_target metric = %v", got)
	}
}

// relay_edge_events_total counts each event once, by what the edge did
// on its arrival; relay_edge_rejects_total counts each Reject sent, also
// those for accepted events that failed later.
func TestEventMetricsCountEachEventOnce(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.UnackedLen = 2 })
	e.devices("u1", "a", "b")
	a, b := e.online("a"), e.online("b")
	for i := range 5 {
		a.sendEvent(a.event("b"))
		if i < 2 {
			b.nextDeliver() // read, not acknowledged: the third on fail late
			continue
		}
		if r := a.nextAckOrReject().GetReject(); r.GetCode() != relayv1.ErrorCode_ERROR_CODE_QUEUE_FULL {
			t.Fatalf("event %d: %v, want QUEUE_FULL", i, r)
		}
	}
	a.sendEvent(a.event("nobody"))
	if r := a.nextAckOrReject().GetReject(); r.GetCode() != relayv1.ErrorCode_ERROR_CODE_UNKNOWN_TARGET {
		t.Fatalf("unknown target: %v", r)
	}
	sum := func(name string) (total float64, by map[string]float64) {
		by = map[string]float64{}
		mfs, err := e.reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() != name {
				continue
			}
			for _, m := range mf.GetMetric() {
				if v := m.GetCounter().GetValue(); v != 0 {
					by[m.GetLabel()[0].GetValue()] = v
					total += v
				}
			}
		}
		return total, by
	}
	if total, by := sum("relay_edge_events_total"); total != 6 || by["accepted"] != 5 || by["unknown_target"] != 1 {
		t.Fatalf("relay_edge_events_total: %v in all, %v; want 6: 5 accepted, 1 unknown_target", total, by)
	}
	if total, by := sum("relay_edge_rejects_total"); total != 4 || by["queue_full"] != 3 || by["unknown_target"] != 1 {
		t.Fatalf("relay_edge_rejects_total: %v in all, %v; want 4: 3 queue_full, 1 unknown_target", total, by)
	}
}

// The skew tolerance is five minutes either way.
func TestClockSkewTolerance(t *testing.T) {
	e := newEnv(t, nil)
	e.device("u1", "a")
	e.device("u1", "b")
	a, b := e.online("a"), e.online("b")
	now := time.Now()
	for _, c := range []struct {
		name    string
		created time.Time
		ttl     time.Duration
		ok      bool
	}{
		{"4 min in the future", now.Add(4 * time.Minute), time.Minute, true},
		{"4 min past expiry", now.Add(-5 * time.Minute), time.Minute, true},
		{"6 min in the future", now.Add(6 * time.Minute), time.Minute, false},
		{"6 min past expiry", now.Add(-7 * time.Minute), time.Minute, false},
	} {
		ev := a.event()
		ev.CreatedAtMs, ev.TtlMs = c.created.UnixMilli(), c.ttl.Milliseconds()
		a.sendEvent(ev)
		if c.ok {
			b.received(b.nextDeliver().GetDeliveryId())
		}
		f := a.nextAckOrReject()
		if (f.GetAck() != nil) != c.ok {
			t.Errorf("%s: got %v", c.name, f)
		}
	}
}

func TestDuplicatesAreAckedNotRelayed(t *testing.T) {
	e := newEnv(t, nil)
	e.device("u1", "a")
	e.device("u1", "b")
	a, b := e.online("a"), e.online("b")
	ev := a.event()
	a.sendEvent(ev)
	dl := b.nextDeliver()
	// Resent before the first is acked: no second delivery, one ack for
	// both copies. The pong says the edge has read the copy before b's
	// receipt is sent: a's reader and b's are independent, and a copy
	// read after the first ack is a copy resent after it (acked on its
	// own, below), which made this test fail about once in 300 runs.
	again := &relayv1.Event{Id: ev.GetId(), Seq: ev.GetSeq() + 5, CreatedAtMs: ev.GetCreatedAtMs(), TtlMs: ev.GetTtlMs(), Type: ev.GetType(), Payload: ev.GetPayload()}
	a.sendEvent(again)
	a.send(&relayv1.Frame{Kind: &relayv1.Frame_Ping{Ping: &relayv1.Ping{Nonce: 42}}})
	a.next("pong", func(f *relayv1.Frame) bool { return f.GetPong().GetNonce() == 42 })
	b.received(dl.GetDeliveryId())
	if f := a.nextAckOrReject(); f.GetAck().GetEventId() != ev.GetId() {
		t.Fatalf("ack: %v", f)
	}
	a.expectNothing("a second ack for the copy resent before the first ack", func(f *relayv1.Frame) bool { return f.GetAck() != nil })
	// Resent after the ack: acked at once, also when built again later
	// (a retry has a newer creation time).
	again.CreatedAtMs += 1500
	again.Seq += 5
	a.sendEvent(again)
	if f := a.nextAckOrReject(); f.GetAck().GetEventId() != ev.GetId() {
		t.Fatalf("second ack: %v", f)
	}
	b.expectNothing("a duplicate", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil })
	// The same id with other content is refused.
	changed := a.event()
	changed.Id = ev.GetId()
	changed.Payload = []byte("different")
	a.sendEvent(changed)
	if f := a.nextAckOrReject(); f.GetReject().GetCode() != relayv1.ErrorCode_ERROR_CODE_DUPLICATE_ID {
		t.Fatalf("reused id: %v", f)
	}
	if got := e.metric("relay_edge_events_total", "result", "duplicate"); got != 2 {
		t.Fatalf("duplicate metric = %v", got)
	}
}

// Above its rate a device is read more slowly, not refused: every event
// is acknowledged, and the time the edge held back shows in the paced
// metric.
func TestRateLimitPacesTheReader(t *testing.T) {
	e := newEnv(t, func(c *Config) {
		l := DefaultLimits()
		l.EventsPerSecond = 20
		c.Limits = l
	})
	e.device("u1", "a")
	a := e.online("a")
	const n = 60
	for range n {
		a.sendEvent(a.event())
	}
	for range n {
		if f := a.nextAckOrReject(); f.GetAck() == nil {
			t.Fatalf("not acknowledged: %v", f)
		}
	}
	// 20 go at once (the burst), the other 40 at 20/s: the reader held
	// back about 2 s in all.
	if got := e.metric("relay_edge_paced_seconds_total"); got < 1.5 {
		t.Fatalf("paced %.2f s, want about 2 s", got)
	}
	if got := e.metric("relay_edge_events_total", "result", "rate_limited"); got != 0 {
		t.Fatalf("%v events refused for their rate", got)
	}
}

func TestSlowReceiverDoesNotSlowOthers(t *testing.T) {
	e := newEnv(t, func(c *Config) {
		c.QueueLen = 16
		c.Limits = DefaultLimits()
		c.Limits.EventsPerSecond = 1e6
	})
	for _, id := range []string{"a", "fast", "slow"} {
		e.device("u1", id)
	}
	a, fast := e.online("a"), e.online("fast")
	// "slow" completes its handshake and then never reads again.
	slow := e.connect("slow")
	h := slow.hello(nil)
	slow.send(h)
	slow.send(sign(h.GetHello(), slow.readDirect().GetChallenge(), e.keys["slow"]))
	if slow.readDirect().GetWelcome() == nil {
		t.Fatal("no welcome")
	}

	// Rounds of 8 events for fast and one for slow: fast receives every
	// one of its events, in order, while slow's fill its queue and are
	// then refused at once with QUEUE_FULL. Slow's writer holds at most
	// one queue's worth in its blocked write (how much depends on when it
	// took its first batch), and its queue another: 2*16 accepted at most.
	const rounds = 64
	full, seq := 0, uint64(0)
	toSlow := map[string]bool{}
	for range rounds {
		want := map[string]bool{}
		for range 8 {
			ev := a.event("fast")
			want[ev.GetId()] = true
			a.sendEvent(ev)
		}
		ev := a.event("slow")
		toSlow[ev.GetId()] = true
		a.sendEvent(ev)
		for range 8 {
			dl := fast.nextDeliver()
			if dl.GetEvent().GetSeq() <= seq {
				t.Fatalf("fast got seq %d after %d", dl.GetEvent().GetSeq(), seq)
			}
			seq = dl.GetEvent().GetSeq()
			fast.received(dl.GetDeliveryId())
		}
		for len(want) > 0 {
			f := a.nextAckOrReject()
			switch {
			case f.GetAck() != nil && want[f.GetAck().GetEventId()]:
				delete(want, f.GetAck().GetEventId())
			case toSlow[f.GetReject().GetEventId()] && f.GetReject().GetCode() == relayv1.ErrorCode_ERROR_CODE_QUEUE_FULL:
				full++
			default:
				t.Fatalf("unexpected %v", f)
			}
		}
	}
	if full < rounds-2*16 {
		t.Fatalf("only %d of %d events for the stalled device refused with QUEUE_FULL", full, rounds)
	}
	eph := a.event("slow")
	eph.Ephemeral = true
	a.sendEvent(eph)
	waitFor(t, "a dropped ephemeral event", func() bool { return e.metric("relay_edge_dropped_total", "reason", "queue_full") >= 1 })
}

func TestPresence(t *testing.T) {
	e := newEnv(t, nil)
	for _, id := range []string{"a", "b"} {
		e.device("u1", id)
	}
	e.device("u2", "x")
	a := e.online("a")
	x := e.online("x")
	b := e.online("b")
	isPresence := func(dev string, online bool) func(*relayv1.Frame) bool {
		return func(f *relayv1.Frame) bool {
			p := f.GetPresence()
			return p != nil && p.GetDeviceId() == dev && p.GetOnline() == online
		}
	}
	a.next("b online", isPresence("b", true))
	b.next("a online (already there)", isPresence("a", true))
	x.expectNothing("presence of another user", func(f *relayv1.Frame) bool { return f.GetPresence() != nil })
	b.send(&relayv1.Frame{Kind: &relayv1.Frame_Close{Close: &relayv1.Close{}}})
	a.next("b offline", isPresence("b", false))
}

// lastPresence reads o's frames up to a ping's answer and returns what o
// was last told of device: "on", "off", or "" when nothing.
func lastPresence(o *dev, device string) string {
	o.t.Helper()
	last := ""
	o.expectNothing("", func(f *relayv1.Frame) bool {
		if p := f.GetPresence(); p != nil && p.GetDeviceId() == device {
			last = map[bool]string{true: "on", false: "off"}[p.GetOnline()]
		}
		return false
	})
	return last
}

// movedRemote is a mesh that says which devices other edges hold.
type movedRemote struct {
	heldRemote
	mu    sync.Mutex
	where map[string]string
}

func (r *movedRemote) Locate(d string) (string, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.where[d]
	return e, ok
}

// A device that moves to another edge stays online for its user's other
// devices on the edge it left: the mesh tells them it is online there,
// and the close of its older session here, which follows, must not tell
// them it went offline. And on the edge it moved to, the old edge
// forgetting it (its old session's offline, or that edge's link going
// down) does not make it offline there either.
func TestAMovedDeviceStaysOnline(t *testing.T) {
	remote := &movedRemote{heldRemote: heldRemote{ch: make(chan heldForward, 16)}, where: map[string]string{}}
	e := newEnv(t, func(c *Config) { c.Remote = remote })
	e.devices("u1", "o", "d")
	o, d := e.online("o"), e.online("d")
	if got := lastPresence(o, "d"); got != "on" {
		t.Fatalf("before the move o was told d is %q", got)
	}
	// d connects to edge B, whose session is newer.
	remote.mu.Lock()
	remote.where["d"] = "B"
	remote.mu.Unlock()
	e.hub.PeerPresence("u1", "d", true)
	e.hub.PeerHolds("u1", "d", time.Now().Add(time.Second), "elsewhere", "B")
	if c := d.nextClose(); c.GetCode() != relayv1.ErrorCode_ERROR_CODE_REPLACED {
		t.Fatalf("d's session here: %v", c)
	}
	waitFor(t, "d's session here gone", func() bool {
		e.hub.mu.Lock()
		defer e.hub.mu.Unlock()
		return len(e.hub.ended) == 1
	})
	if got := lastPresence(o, "d"); got != "on" {
		t.Fatalf("o was last told d is %q, while d is online on B", got)
	}

	// d comes back here; then B forgets it.
	d = e.online("d")
	remote.mu.Lock()
	delete(remote.where, "d")
	remote.mu.Unlock()
	e.hub.PeerPresence("u1", "d", false)
	if got := lastPresence(o, "d"); got != "on" {
		t.Fatalf("o was last told d is %q, while d is connected here", got)
	}
	// Gone from everywhere: offline.
	d.send(&relayv1.Frame{Kind: &relayv1.Frame_Close{Close: &relayv1.Close{}}})
	o.next("d offline", func(f *relayv1.Frame) bool {
		return f.GetPresence().GetDeviceId() == "d" && !f.GetPresence().GetOnline()
	})
}

func TestRevocationClosesAndFailsInFlight(t *testing.T) {
	e := newEnv(t, nil)
	for _, id := range []string{"a", "b"} {
		e.device("u1", id)
	}
	a, b := e.online("a"), e.online("b")
	a.sendEvent(a.event("b"))
	b.nextDeliver() // received, never acknowledged
	e.dir.setState("b", DeviceRevoked)
	e.hub.CloseDevice("u1", "b", relayv1.ErrorCode_ERROR_CODE_REVOKED, "device revoked")
	if c := b.nextClose(); c.GetCode() != relayv1.ErrorCode_ERROR_CODE_REVOKED {
		t.Fatalf("close: %v", c)
	}
	if f := a.nextAckOrReject(); f.GetReject().GetCode() != relayv1.ErrorCode_ERROR_CODE_TARGET_DELETED {
		t.Fatalf("in-flight event: %v", f)
	}
	if err := <-b.serve; codeOf(err) != relayv1.ErrorCode_ERROR_CODE_REVOKED {
		t.Fatalf("Serve: %v", err)
	}
	e.hub.CloseUser("u1", relayv1.ErrorCode_ERROR_CODE_REVOKED, "user deleted")
	if c := a.nextClose(); c.GetCode() != relayv1.ErrorCode_ERROR_CODE_REVOKED {
		t.Fatalf("close: %v", c)
	}
	waitFor(t, "empty tables", func() bool { return e.hub.Stats() == Stats{} })
}

func TestTicketRefreshAndReauthentication(t *testing.T) {
	e := newEnv(t, func(c *Config) {
		c.TicketTTL = 300 * time.Millisecond
		c.MaxSessionAge = 600 * time.Millisecond
		c.HandshakeTimeout = 5 * time.Second
	})
	e.device("u1", "a")
	a := e.online("a")
	first := a.welcome.GetResumeTicket()
	tk := a.next("ticket", func(f *relayv1.Frame) bool { return f.GetTicket() != nil }).GetTicket()
	if bytes.Equal(tk.GetResumeTicket(), first) || tk.GetExpiresAtMs() <= a.welcome.GetTicketExpiresAtMs() {
		t.Fatalf("refreshed ticket: %v", tk)
	}
	// At the maximum age the edge asks for a new signature.
	ch := a.next("re-authentication challenge", func(f *relayv1.Frame) bool { return f.GetChallenge() != nil }).GetChallenge()
	a.send(signReauth(a, ch))
	a.next("ticket after re-authentication", func(f *relayv1.Frame) bool { return f.GetTicket() != nil })
	a.expectNothing("close after a good answer", func(f *relayv1.Frame) bool { return f.GetClose() != nil })

	// A device that does not answer is closed.
	e2 := newEnv(t, func(c *Config) {
		c.MaxSessionAge = 200 * time.Millisecond
		c.HandshakeTimeout = 200 * time.Millisecond
	})
	e2.device("u1", "a")
	b := e2.online("a")
	b.next("challenge", func(f *relayv1.Frame) bool { return f.GetChallenge() != nil })
	if c := b.nextClose(); c.GetCode() != relayv1.ErrorCode_ERROR_CODE_SESSION_EXPIRED {
		t.Fatalf("close: %v", c)
	}
}

// A session that opened by resuming (no challenge at its opening) is
// re-authenticated at its maximum age like any other: the challenge's
// transcript comes from its Hello.
func TestResumedSessionReauthenticates(t *testing.T) {
	e := newEnv(t, func(c *Config) {
		c.MaxSessionAge = 1500 * time.Millisecond
		c.HandshakeTimeout = 5 * time.Second
	})
	e.device("u1", "a")
	ticket := e.online("a").welcome.GetResumeTicket()
	d := e.connect("a")
	h := d.hello(ticket)
	d.lastHello = h.GetHello()
	d.send(h)
	if w := d.readDirect().GetWelcome(); !w.GetResumed() {
		t.Fatalf("not resumed: %v", w)
	}
	d.startReading()
	ch := d.next("challenge", func(f *relayv1.Frame) bool { return f.GetChallenge() != nil }).GetChallenge()
	d.send(signReauth(d, ch))
	d.next("ticket after re-authentication", func(f *relayv1.Frame) bool { return f.GetTicket() != nil })
	d.expectNothing("close after a good answer", func(f *relayv1.Frame) bool { return f.GetClose() != nil })
}

// signReauth answers a mid-session challenge: the transcript keeps the
// session's hello (the harness's login sent one with this client time).
func signReauth(d *dev, ch *relayv1.Challenge) *relayv1.Frame {
	return sign(d.lastHello, ch, d.e.keys[d.id])
}

func TestDrainSendsGoingAway(t *testing.T) {
	e := newEnv(t, nil)
	e.device("u1", "a")
	a := e.online("a")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.hub.Drain(ctx, time.Minute); err != nil {
		t.Fatal(err)
	}
	c := a.nextClose()
	if c.GetCode() != relayv1.ErrorCode_ERROR_CODE_GOING_AWAY || c.GetReconnectAfterMs() < 0 || c.GetReconnectAfterMs() >= 60_000 {
		t.Fatalf("close: %v", c)
	}
	d := e.connect("a")
	d.startReading()
	// Told in a Close frame, which a WebSocket carries too.
	if c := d.nextClose(); c.GetCode() != relayv1.ErrorCode_ERROR_CODE_GOING_AWAY {
		t.Fatalf("a new session while draining was closed %v, want GOING_AWAY", c)
	}
	if err := <-d.serve; err != ErrDraining {
		t.Fatalf("new session while draining: %v", err)
	}
}

// Restart sends every open session away (GOING_AWAY, a reconnect hint
// within the window) and keeps serving: a session whose handshake began
// before it is refused at registration (its mailbox state comes from the
// voided history), one that begins after it opens as usual.
func TestRestartSendsSessionsAwayAndKeepsServing(t *testing.T) {
	e := newEnv(t, nil)
	e.devices("u1", "a", "b")
	a := e.online("a")
	b := e.connect("b")
	hello, ch := b.challenged(nil)

	e.hub.Restart(time.Minute, "the control plane was restored; reconnect")
	c := a.nextClose()
	if c.GetCode() != relayv1.ErrorCode_ERROR_CODE_GOING_AWAY || c.GetReconnectAfterMs() < 0 || c.GetReconnectAfterMs() >= 60_000 ||
		!strings.Contains(c.GetMessage(), "restored") {
		t.Fatalf("close: %v", c)
	}
	if err := <-a.serve; codeOf(err) != relayv1.ErrorCode_ERROR_CODE_GOING_AWAY {
		t.Fatalf("a's session ended with %v", err)
	}

	b.answer(hello, ch)
	b.startReading()
	if c := b.nextClose(); c.GetCode() != relayv1.ErrorCode_ERROR_CODE_GOING_AWAY {
		t.Fatalf("a session begun before the restart: close %v", c)
	}
	if err := <-b.serve; codeOf(err) != relayv1.ErrorCode_ERROR_CODE_GOING_AWAY {
		t.Fatalf("a session begun before the restart ended with %v", err)
	}

	a2, b2 := e.online("a"), e.online("b")
	ev := a2.event()
	a2.sendEvent(ev)
	if got := b2.nextDeliver().GetEvent().GetId(); got != ev.GetId() {
		t.Fatalf("after the restart b got %q, want %q", got, ev.GetId())
	}
}

// goroutineWaiting reports whether some goroutine's stack holds every
// one of frames (function names), in that order from the top.
func goroutineWaiting(frames ...string) bool { return stacks.Count(frames...) > 0 }

// A session registering while Drain walks the rooms is either refused or
// seen by Drain and sent GOING_AWAY: never left open with Drain waiting
// for it. The room is held so that b's registration waits inside it
// while Drain starts; when the room is let go, readers (Drain's walk)
// would go before the waiting writer (b's insertion) if Drain could get
// that far.
func TestDrainSeesASessionRegisteringMeanwhile(t *testing.T) {
	e := newEnv(t, nil)
	e.devices("u1", "a", "b")
	a := e.online("a")
	sh := e.hub.shardOf("u1")
	sh.mu.Lock()
	r := sh.rooms["u1"]
	sh.mu.Unlock()
	r.mu.Lock()
	locked := true
	defer func() {
		if locked {
			r.mu.Unlock()
		}
	}()
	b := e.connect("b")
	hello, ch := b.challenged(nil)
	b.answer(hello, ch)
	waitFor(t, "b's registration waiting for the room", func() bool { return goroutineWaiting("sync.(*RWMutex).Lock", "(*Hub).register") })
	drained := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		drained <- e.hub.Drain(ctx, 0)
	}()
	waitFor(t, "Drain waiting", func() bool {
		return goroutineWaiting("sync.(*Mutex).Lock", "(*Hub).Drain") || goroutineWaiting("sync.(*RWMutex).RLock", "(*Hub).Drain")
	})
	b.startReading()
	r.mu.Unlock()
	locked = false
	if err := <-drained; err != nil {
		t.Fatalf("drain: %v", err)
	}
	for _, d := range []*dev{a, b} {
		if c := d.nextClose(); c.GetCode() != relayv1.ErrorCode_ERROR_CODE_GOING_AWAY {
			t.Fatalf("%s: close %v, want GOING_AWAY", d.id, c)
		}
	}
}

func TestEphemeralEventsAsDatagrams(t *testing.T) {
	e := newEnv(t, nil)
	e.device("u1", "a")
	e.device("u1", "b")
	a, b := e.online("a"), e.online("b")
	ev := a.event()
	ev.Ephemeral = true
	body, err := marshalDeterministic.Marshal(&relayv1.Frame{Kind: &relayv1.Frame_Event{Event: ev}})
	if err != nil {
		t.Fatal(err)
	}
	// b's queue must be empty (its ticket, presence written): only an
	// event alone in a batch goes as a datagram.
	b.expectNothing("nothing", func(*relayv1.Frame) bool { return false })
	if err := a.conn.SendDatagram(body); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got, err := b.conn.ReceiveDatagram(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var f relayv1.Frame
	if err := frame.Decode(got, 0, &f); err != nil {
		t.Fatal(err)
	}
	if f.GetDeliver().GetEvent().GetId() != ev.GetId() || f.GetDeliver().GetDeliveryId() != 0 {
		t.Fatalf("datagram: %v", &f)
	}
	// Ephemeral events get no Ack.
	a.expectNothing("ack of an ephemeral event", func(f *relayv1.Frame) bool { return f.GetAck() != nil })
	// A durable event may not come as a datagram, nor any other frame:
	// dropped and counted, and the session goes on.
	for _, f := range []*relayv1.Frame{
		{Kind: &relayv1.Frame_Event{Event: a.event()}},
		{Kind: &relayv1.Frame_Ping{Ping: &relayv1.Ping{Nonce: 1}}},
	} {
		body, _ = marshalDeterministic.Marshal(f)
		_ = a.conn.SendDatagram(body)
	}
	waitFor(t, "dropped datagrams counted", func() bool {
		return e.metric("relay_edge_dropped_total", "reason", "not_ephemeral") == 2
	})
	a.send(&relayv1.Frame{Kind: &relayv1.Frame_Ping{Ping: &relayv1.Ping{Nonce: 7}}})
	a.next("pong after the dropped datagrams", func(f *relayv1.Frame) bool { return f.GetPong().GetNonce() == 7 })
}

// Ephemeral events that queued up for a receiver together go on its
// stream in one write (QUIC packs them into shared packets; a datagram
// takes a packet of its own); one alone still goes as a datagram.
func TestQueuedEphemeralEventsShareTheStream(t *testing.T) {
	e := newEnv(t, nil)
	e.device("u1", "a")
	e.device("u1", "b")
	a, b := e.online("a"), e.connect("b")
	b.handshake()
	// b reads nothing yet: its writer is stuck on this delivery while the
	// ephemeral events queue up behind it.
	a.sendEvent(a.event("b"))
	const n = 5
	var ids []string
	for range n {
		ev := a.event("b")
		ev.Ephemeral = true
		ids = append(ids, ev.GetId())
		a.sendEvent(ev)
	}
	waitFor(t, "every event accepted", func() bool {
		return e.metric("relay_edge_events_total", "result", "accepted") == 1+n
	})
	b.startReading()
	if d := b.nextDeliver(); d.GetDeliveryId() == 0 {
		t.Fatalf("first delivery: %v", d)
	}
	// Where the writer's batches split is up to the scheduler (the last
	// event may still be offered alone as the writer takes the others):
	// all of them arrive, at most one as a datagram; without the rule all
	// n would be datagrams.
	onStream := 0
	waitFor(t, "every ephemeral event", func() bool {
		for {
			select {
			case f := <-b.frames:
				if d := f.GetDeliver(); d != nil && d.GetDeliveryId() == 0 {
					onStream++
				}
				continue
			default:
			}
			return onStream+len(b.conn.in) == n
		}
	})
	if onStream < n-1 {
		t.Fatalf("%d of %d queued ephemeral events came on the stream, %d as datagrams", onStream, n, len(b.conn.in))
	}
	for len(b.conn.in) > 0 {
		<-b.conn.in
	}
	b.expectNothing("nothing", func(*relayv1.Frame) bool { return false })
	ev := a.event("b")
	ev.Ephemeral = true
	a.sendEvent(ev)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got, err := b.conn.ReceiveDatagram(ctx)
	if err != nil {
		t.Fatalf("the lone ephemeral event as a datagram: %v", err)
	}
	var f relayv1.Frame
	if err := frame.Decode(got, 0, &f); err != nil || f.GetDeliver().GetEvent().GetId() != ev.GetId() {
		t.Fatalf("lone ephemeral event: %v, %v", &f, err)
	}
}

func TestStatsReturnToZero(t *testing.T) {
	e := newEnv(t, nil)
	var devs []*dev
	for i := range 50 {
		id := fmt.Sprintf("d%d", i)
		e.device(fmt.Sprintf("u%d", i%7), id)
		devs = append(devs, e.online(id))
	}
	if st := e.hub.Stats(); st.Sessions != 50 || st.Rooms != 7 {
		t.Fatalf("stats: %+v", st)
	}
	for _, d := range devs {
		_ = d.conn.Close(0, "")
	}
	waitFor(t, "empty tables", func() bool { return e.hub.Stats() == Stats{} })
}

// BenchmarkHandshake is the session core's cost of opening a session,
// without any transport: a full handshake (challenge, Ed25519 signature
// by the device, verification) and a resume (ticket opened, no
// signature). Client and edge run in this process.
func BenchmarkHandshake(b *testing.B) {
	e := newEnv(b, func(c *Config) { c.HandshakesPerSecond, c.HandshakeBurst = 1e9, 1e9 })
	e.device("u1", "d1")
	first := e.online("d1")
	ticket := first.welcome.GetResumeTicket()
	for _, mode := range []string{"full", "resume"} {
		b.Run(mode, func(b *testing.B) {
			cpu := cpuTime()
			for range b.N {
				d := e.connect("d1")
				if mode == "full" {
					h := d.hello(nil)
					d.send(h)
					d.send(sign(h.GetHello(), d.readDirect().GetChallenge(), e.keys["d1"]))
				} else {
					d.send(d.hello(ticket))
				}
				if w := d.readDirect().GetWelcome(); w == nil || w.GetResumed() != (mode == "resume") {
					b.Fatalf("welcome: %v", w)
				}
				_ = d.conn.Close(0, "")
			}
			// CPU time, not wall time, is what a busy machine leaves
			// comparable: both sides of the handshake run in this process,
			// the client's one signature included in either mode.
			b.ReportMetric(float64((cpuTime()-cpu).Microseconds())/float64(b.N), "cpu-µs/op")
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "handshakes/s")
		})
	}
}

func TestNotReadySendsDevicesAway(t *testing.T) {
	ready := false
	var mu sync.Mutex
	e := newEnv(t, func(c *Config) {
		c.Ready = func() bool { mu.Lock(); defer mu.Unlock(); return ready }
	})
	e.device("u1", "a")
	d := e.connect("a")
	c := d.readDirect().GetClose()
	if c.GetCode() != relayv1.ErrorCode_ERROR_CODE_GOING_AWAY || c.GetReconnectAfterMs() <= 0 {
		t.Fatalf("close: %v", c)
	}
	mu.Lock()
	ready = true
	mu.Unlock()
	e.online("a")
}

// A replaced session is told which client instance took over, so a
// client can tell its own abandoned attempt from another instance.
func TestReplacedNamesTheNewInstance(t *testing.T) {
	e := newEnv(t, nil)
	e.device("u1", "d1")
	first := e.connect("d1")
	first.handshakeWith(func(h *relayv1.Hello) { h.Instance = "phone-app-1" })
	first.startReading()
	second := e.connect("d1")
	h2 := second.hello(nil)
	h2.GetHello().Instance = "phone-app-2"
	second.send(h2)
	second.send(sign(h2.GetHello(), second.readDirect().GetChallenge(), e.keys["d1"]))
	if second.readDirect().GetWelcome() == nil {
		t.Fatal("no welcome")
	}
	if c := first.nextClose(); c.GetCode() != relayv1.ErrorCode_ERROR_CODE_REPLACED || c.GetReplacingInstance() != "phone-app-2" {
		t.Fatalf("close: %v", c)
	}
}

// A full edge sends new devices elsewhere, and takes them again once a
// session left.
func TestMaxSessions(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.MaxSessions = 2 })
	for _, id := range []string{"a", "b", "c"} {
		e.device("u1", id)
	}
	a := e.online("a")
	e.online("b")
	c := e.connect("c")
	cl := c.readDirect().GetClose()
	if cl.GetCode() != relayv1.ErrorCode_ERROR_CODE_GOING_AWAY || cl.GetReconnectAfterMs() <= 0 {
		t.Fatalf("a third device on a full edge: %v", cl)
	}
	if got := e.metric("relay_edge_handshakes_total", "result", "edge_full"); got != 1 {
		t.Fatalf("edge_full handshakes = %v", got)
	}
	a.send(&relayv1.Frame{Kind: &relayv1.Frame_Close{Close: &relayv1.Close{}}})
	waitFor(t, "a's session gone", func() bool { return e.hub.Stats().Serving == 1 })
	e.online("c")
}

// Connections refused for their address's rate take no place on a full
// edge, however long their peers take to hang up: an address above its
// rate that never reads its refusal cannot make the edge full for others.
func TestRefusedConnectionsTakeNoPlace(t *testing.T) {
	e := newEnv(t, func(c *Config) {
		c.MaxSessions = 2
		c.HandshakesPerSecond, c.HandshakeBurst = 0.001, 1 // one session per address
		c.CloseLinger = time.Minute                        // a refusal waits that long for a peer that does not read
	})
	e.device("u1", "a")
	e.device("u1", "b")
	e.connectFrom("a", "10.0.0.9:1000", true).login()
	// Three more from the same address, refused for its rate; their
	// peers never read the refusal.
	for i := range 3 {
		e.connectFrom("a", fmt.Sprintf("10.0.0.9:%d", 1001+i), true)
	}
	waitFor(t, "three connections refused for their rate", func() bool {
		return e.metric("relay_edge_handshakes_total", "result", "rate_limited") == 3
	})
	// Another address still finds the second place free.
	e.connectFrom("b", "10.0.0.1:1000", true).login()
	if got := e.metric("relay_edge_handshakes_total", "result", "edge_full"); got != 0 {
		t.Fatalf("%v connections found the edge full", got)
	}
}

// cpuTime is the CPU time this process has used, user and system.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// An idle session parks no writer: the writer ends when the queue is
// empty, and the next thing to send starts another.
func TestIdleSessionsHaveNoWriter(t *testing.T) {
	e := newEnv(t, nil)
	e.device("u1", "a")
	e.device("u1", "b")
	a, b := e.online("a"), e.online("b")
	writers := func() int { return stacks.Count("session.(*Session).writeLoop(") }
	for round := 1; round <= 3; round++ {
		waitFor(t, "no writer left for two idle sessions", func() bool { return writers() == 0 })
		a.sendEvent(a.event())
		dl := b.nextDeliver()
		if dl.GetEvent().GetSeq() != uint64(round) {
			t.Fatalf("round %d: delivery %v", round, dl.GetEvent())
		}
		b.received(dl.GetDeliveryId())
		if f := a.nextAckOrReject(); f.GetAck() == nil {
			t.Fatalf("round %d: %v instead of the ack", round, f)
		}
	}
}

// A client that says it sends no datagrams gets no datagram reader on
// the edge (one goroutine less per session); its ephemeral events come
// on the stream and are relayed.
func TestNoDatagramsMeansNoDatagramReader(t *testing.T) {
	e := newEnv(t, nil)
	e.device("u1", "a")
	e.device("u1", "b")
	// a's transport has no datagrams (its deliveries come on the stream),
	// but its session still starts the reader, which finds none.
	a := e.connectFrom("a", "127.0.0.1:5000", false).login()
	b := e.connectFrom("b", "127.0.0.1:5001", true)
	b.handshakeWith(func(h *relayv1.Hello) { h.NoDatagrams = true })
	b.startReading()
	ev := b.event("a")
	ev.Ephemeral = true
	b.sendEvent(ev)
	if got := a.nextDeliver().GetEvent(); got.GetId() != ev.GetId() || !got.GetEphemeral() {
		t.Fatalf("a got %v", got)
	}
	// Once both sessions have ended (run waits for its datagram reader),
	// only a's ever asked for a datagram.
	for _, d := range []*dev{a, b} {
		d.send(&relayv1.Frame{Kind: &relayv1.Frame_Close{Close: &relayv1.Close{}}})
		select {
		case <-d.serve:
		case <-time.After(20 * time.Second):
			t.Fatalf("%s: the session did not end", d.id)
		}
	}
	if n := a.conn.peer.datagramReads.Load(); n == 0 {
		t.Fatal("a's session never read datagrams: this check would be blind")
	}
	if n := b.conn.peer.datagramReads.Load(); n != 0 {
		t.Fatalf("b said it sends no datagrams, and its session read them %d times", n)
	}
}

// What a sender's events ask the directory (its own device and user
// active, an explicit target, the user's devices for a broadcast) is
// asked again only when the directory changed: events in between cost no
// lookup, and a device added, a target or the sender revoked, a user
// disabled or enabled again is seen by the next event.
func TestDirectoryAnswersFollowTheDirectory(t *testing.T) {
	e, mb := mailboxEnv(t, nil)
	e.device("u1", "a")
	e.device("u1", "b")
	a, b := e.online("a"), e.online("b")
	ok := relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED
	send := func(want relayv1.ErrorCode, targets ...string) {
		t.Helper()
		ev := a.event(targets...)
		a.sendEvent(ev)
		if want == ok && (len(targets) == 0 || targets[0] == "b") {
			b.received(b.nextDeliver().GetDeliveryId())
		}
		f := a.nextAckOrReject()
		if got := f.GetReject().GetCode(); got != want || (want == ok && f.GetAck().GetEventId() != ev.GetId()) {
			t.Fatalf("event %s to %v: %v, want %v", ev.GetId(), targets, f, want)
		}
	}
	send(ok, "b")
	asked, looked, listed := e.dir.asked.Load(), e.dir.looked.Load(), e.dir.listed.Load()
	for range 3 {
		send(ok, "b")
	}
	send(ok) // a broadcast: the user's devices are listed once...
	send(ok) // ...and not again
	if n, m, l := e.dir.asked.Load()-asked, e.dir.looked.Load()-looked, e.dir.listed.Load()-listed; n != 0 || m != 0 || l != 1 {
		t.Fatalf("the directory did not change, yet it was asked %d times whether the user is active, %d times for a device, listed the user's devices %d times", n, m, l)
	}
	e.device("u1", "c") // offline: a broadcast reaches its mailbox
	send(ok)
	if got := mb.stored("c"); got != 1 {
		t.Fatalf("the broadcast after c was added: %d entries in c's mailbox", got)
	}
	e.dir.setState("b", DeviceRevoked)
	send(relayv1.ErrorCode_ERROR_CODE_TARGET_DELETED, "b")
	e.dir.setUser("u1", false)
	send(relayv1.ErrorCode_ERROR_CODE_SENDER_REVOKED, "c")
	e.dir.setUser("u1", true)
	send(ok, "c")
	e.dir.setState("a", DeviceRevoked)
	send(relayv1.ErrorCode_ERROR_CODE_SENDER_REVOKED, "c")
}

// A client that defers its datagrams (Hello.defer_datagrams) costs its
// session no datagram reader until its first ephemeral event on the
// stream; a datagram it sent before that waits, and is relayed once the
// reader starts. A durable event does not start it.
func TestDeferredDatagramsAreReadFromTheFirstStreamEphemeral(t *testing.T) {
	e := newEnv(t, nil)
	e.device("u1", "a")
	e.device("u1", "b")
	a := e.connectFrom("a", "127.0.0.1:5000", false).login() // deliveries on the stream
	ephemeral := func(d *dev) (*relayv1.Event, []byte) {
		ev := d.event("a")
		ev.Ephemeral = true
		body, err := marshalDeterministic.Marshal(&relayv1.Frame{Kind: &relayv1.Frame_Event{Event: ev}})
		if err != nil {
			t.Fatal(err)
		}
		return ev, body
	}
	end := func(d *dev) {
		d.send(&relayv1.Frame{Kind: &relayv1.Frame_Close{Close: &relayv1.Close{}}})
		select {
		case <-d.serve:
		case <-time.After(20 * time.Second):
			t.Fatalf("%s: the session did not end", d.id)
		}
	}

	// A session that sends only durable events never reads datagrams
	// (run waits for a reader it started, so by its end one would have
	// read at least once).
	b := e.connectFrom("b", "127.0.0.1:5001", true)
	b.handshakeWith(func(h *relayv1.Hello) { h.DeferDatagrams = true })
	b.startReading()
	ev := b.event("a")
	b.sendEvent(ev)
	if got := a.nextDeliver().GetEvent(); got.GetId() != ev.GetId() {
		t.Fatalf("a got %v", got)
	}
	end(b)
	if n := b.conn.peer.datagramReads.Load(); n != 0 {
		t.Fatalf("b deferred its datagrams and sent only durable events; its session read datagrams %d times", n)
	}

	// The next sessions send a datagram first: it waits for the reader
	// (other frames do not start it), which the ephemeral event on the
	// stream starts, whether the event's frame takes the reader's fast
	// path or its general one (here: a frame with a field this edge does
	// not know after the event).
	for i, general := range []bool{false, true} {
		b = e.connectFrom("b", "127.0.0.1:5001", true)
		b.seq = 100 * uint64(i+1) // ids apart from the earlier sessions'
		b.handshakeWith(func(h *relayv1.Hello) { h.DeferDatagrams = true })
		b.startReading()
		early, body := ephemeral(b)
		if err := b.conn.SendDatagram(body); err != nil {
			t.Fatal(err)
		}
		b.send(&relayv1.Frame{Kind: &relayv1.Frame_Ping{Ping: &relayv1.Ping{Nonce: 9}}})
		b.next("pong", func(f *relayv1.Frame) bool { return f.GetPong().GetNonce() == 9 })
		if n := b.conn.peer.datagramReads.Load(); n != 0 {
			t.Fatalf("b's session read datagrams %d times before its first ephemeral event", n)
		}
		onStream, body := ephemeral(b)
		if general {
			body = protowire.AppendVarint(protowire.AppendTag(body, 999, protowire.VarintType), 1)
			if _, err := b.conn.Write(append(binary.AppendUvarint(nil, uint64(len(body))), body...)); err != nil {
				t.Fatal(err)
			}
		} else {
			b.sendEvent(onStream)
		}
		late, body := ephemeral(b)
		got := map[string]bool{}
		for len(got) < 2 {
			got[a.nextDeliver().GetEvent().GetId()] = true
		}
		if !got[early.GetId()] || !got[onStream.GetId()] {
			t.Fatalf("a got %v, want %s (sent as a datagram before) and %s (on the stream)", got, early.GetId(), onStream.GetId())
		}
		if err := b.conn.SendDatagram(body); err != nil {
			t.Fatal(err)
		}
		if id := a.nextDeliver().GetEvent().GetId(); id != late.GetId() {
			t.Fatalf("a got %s, want %s (a datagram, once the reader runs)", id, late.GetId())
		}
		if b.conn.peer.datagramReads.Load() == 0 {
			t.Fatal("b's session relayed its datagrams without reading any")
		}
		end(b)
	}
}

// A device that stops inside a frame leaves the session's reader holding
// a buffer lent by the hub's pool (the frame's first bytes are in it);
// however the session then ends, by the device leaving or by the edge,
// the buffer goes back to the pool.
func TestSessionEndingInsideAFrameReturnsItsReadBuffer(t *testing.T) {
	e := newEnv(t, nil)
	e.hub.readBufs.CountLoans() // before any session borrows
	e.device("u1", "d1")
	for _, end := range []struct {
		name string
		end  func(d *dev)
	}{
		{"device leaves", func(d *dev) { _ = d.conn.Close(0, "") }},
		{"the edge closes it", func(d *dev) {
			e.hub.CloseDevice(d.user, d.id, relayv1.ErrorCode_ERROR_CODE_REVOKED, "revoked")
		}},
	} {
		t.Run(end.name, func(t *testing.T) {
			lent := e.hub.readBufs.Lent()
			d := e.online("d1")
			// The length prefix says 100 bytes; 10 of them come.
			if _, err := d.conn.Write(append([]byte{100}, make([]byte, 10)...)); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "the reader to borrow a buffer", func() bool { return e.hub.readBufs.Lent() == lent+1 })
			end.end(d)
			select {
			case <-d.serve:
			case <-time.After(10 * time.Second):
				t.Fatal("the session did not end")
			}
			if n := e.hub.readBufs.Lent(); n != lent {
				t.Fatalf("%d read buffers lent after the session ended, %d before it borrowed one", n, lent)
			}
		})
	}
}

// The sessions gauge counts sessions from their Welcome to their end,
// however they end; a refused handshake never counts.
func TestSessionsGaugeFollowsSessions(t *testing.T) {
	e := newEnv(t, nil)
	e.devices("u1", "a", "b")
	gauge := func() float64 { return e.metric("relay_edge_sessions", "transport", "pipe") }
	waitGauge := func(want float64) {
		t.Helper()
		waitFor(t, fmt.Sprintf("relay_edge_sessions = %v", want), func() bool { return gauge() == want })
	}
	a := e.online("a")
	b := e.online("b")
	waitGauge(2)

	// A handshake that fails (the challenge answered with another key)
	// is refused and never counted.
	_, wrongKey, _ := ed25519.GenerateKey(rand.Reader)
	thief := e.connect("a")
	h := thief.hello(nil)
	thief.send(h)
	thief.send(sign(h.GetHello(), thief.readDirect().GetChallenge(), wrongKey))
	if err := <-thief.serve; codeOf(err) != relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED {
		t.Fatalf("a wrong signature ended the handshake with %v", err)
	}
	if got := gauge(); got != 2 {
		t.Fatalf("after a refused handshake: %v sessions", got)
	}

	// A session that replaces another: one ends, one begins.
	a2 := e.online("a")
	if c := a.nextClose(); c.GetCode() != relayv1.ErrorCode_ERROR_CODE_REPLACED {
		t.Fatalf("replaced session closed with %v", c)
	}
	if err := <-a.serve; err == nil || codeOf(err) != relayv1.ErrorCode_ERROR_CODE_REPLACED {
		t.Fatalf("replaced session ended with %v", err)
	}
	waitGauge(2)

	// The device leaves.
	_ = b.conn.Close(0, "")
	<-b.serve
	waitGauge(1)

	// The edge drains: the last one goes, and a session that comes now is
	// refused before it opens.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.hub.Drain(ctx, time.Minute); err != nil {
		t.Fatal(err)
	}
	a2.nextClose()
	<-a2.serve
	late := e.connect("b")
	if err := <-late.serve; err != ErrDraining {
		t.Fatalf("session while draining: %v", err)
	}
	waitGauge(0)
}

// An edge does not start with a frame limit above the protocol's, which
// clients would not follow.
func TestAFrameLimitAboveTheProtocolsIsRefused(t *testing.T) {
	l := DefaultLimits()
	l.MaxFrameBytes = frame.MaxFrameLimit + 1
	_, err := NewHub(Config{EdgeID: "e", Directory: newMemDir(), Ring: NewRing(), Limits: l})
	if err == nil || !strings.Contains(err.Error(), "frame limit") {
		t.Fatalf("a frame limit of %d: %v", l.MaxFrameBytes, err)
	}
	l.MaxFrameBytes = frame.MaxFrameLimit
	if _, err := NewHub(Config{EdgeID: "e", Directory: newMemDir(), Ring: NewRing(), Limits: l}); err != nil {
		t.Fatalf("the protocol's own limit: %v", err)
	}
}

// RequireBoundProofs names transports a connection can name, nothing
// else: a misspelt one would require nothing anywhere.
func TestRequireBoundProofsNamesTransports(t *testing.T) {
	_, err := NewHub(Config{EdgeID: "e", Directory: newMemDir(), Ring: NewRing(), RequireBoundProofs: []string{"quic", "QUIC"}})
	if err == nil || !strings.Contains(err.Error(), `"QUIC"`) {
		t.Fatalf("QUIC: %v", err)
	}
	if _, err := NewHub(Config{EdgeID: "e", Directory: newMemDir(), Ring: NewRing(), RequireBoundProofs: devconn.Transports()}); err != nil {
		t.Fatalf("every transport: %v", err)
	}
}

// pacedReader reads at most per bytes per tick: a device on a slow link.
type pacedReader struct {
	r    io.Reader
	per  int
	tick *time.Ticker
}

func (p *pacedReader) Read(b []byte) (int, error) {
	<-p.tick.C
	return p.r.Read(b[:min(len(b), p.per)])
}

// A device that reads slowly but steadily is not a slow consumer, however
// long a batch takes it: the write timeout bounds each 64 KiB of a
// batch, not the whole (here about 700 KiB at 256 KiB/s, nearly three
// write timeouts).
func TestASlowButSteadyReaderIsNotClosed(t *testing.T) {
	e := newEnv(t, func(c *Config) {
		c.WriteTimeout = time.Second
		c.Limits = DefaultLimits()
		c.Limits.BytesPerSecond = 64 << 20
	})
	e.devices("u1", "a", "b")
	a := e.online("a")
	// Stopped after b's reader ended (cleanups run last first).
	tick := time.NewTicker(10 * time.Millisecond)
	t.Cleanup(tick.Stop)
	b := e.connect("b")
	b.handshake()
	b.r = frame.NewReader(&pacedReader{r: b.conn, per: 2560, tick: tick}, 1<<20)
	// Each write holds whole frames (a transport that frames messages
	// would otherwise copy and keep a split one) and at most a chunk and
	// a frame.
	var (
		mu              sync.Mutex
		writes, largest int
		split           bool
	)
	onWrite := func(p []byte) {
		mu.Lock()
		defer mu.Unlock()
		writes++
		largest = max(largest, len(p))
		for len(p) > 0 {
			n, k := binary.Uvarint(p)
			if k <= 0 || uint64(len(p)-k) < n {
				split = true
				return
			}
			p = p[k+int(n):]
		}
	}
	b.conn.peer.onWrite.Store(&onWrite)
	big := strings.Repeat("x", 45<<10)
	var sent []*relayv1.Event
	for range 16 {
		sent = append(sent, a.sendPayload(big, "b"))
	}
	// The first delivery blocks the writer; the rest queue behind it and
	// go as one batch.
	a.expectNothing("an answer before b reads", func(f *relayv1.Frame) bool { return f.GetAck() != nil || f.GetReject() != nil })
	b.startReading()
	for range sent {
		b.received(b.nextDeliver().GetDeliveryId())
	}
	a.expectAcks(sent...)
	if n := e.metric("relay_edge_session_closes_total", "code", "slow_consumer"); n != 0 {
		t.Fatalf("%v sessions closed as slow consumers", n)
	}
	mu.Lock()
	defer mu.Unlock()
	// Sixteen frames of 45 KiB (the first alone, the rest as one batch):
	// two to a write, not the batch in one.
	if split || largest > writeChunk+(64<<10) || writes < 4 {
		t.Fatalf("%d writes, the largest %d bytes, a frame split: %v", writes, largest, split)
	}
}

// A device whose connection takes no datagram (quic-go's queue full, the
// peer acknowledging no packets) is a SLOW_CONSUMER once WriteTimeout
// passes, as one that takes no stream write is: the writer does not wait
// on it for good.
func TestADatagramNotTakenEndsTheSession(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.WriteTimeout = 300 * time.Millisecond })
	e.devices("u", "a", "b")
	a, b := e.online("a"), e.online("b")
	ephemeral := func() {
		ev := a.event("b")
		ev.Ephemeral = true
		a.sendEvent(ev)
	}
	// One through, so that nothing else is queued for b (its presence
	// frames): the next event is alone in its batch, sent as a datagram.
	ephemeral()
	waitFor(t, "the first event at b", func() bool {
		return e.metric("relay_edge_deliveries_total", "kind", "ephemeral") == 1
	})
	b.conn.peer.stuckDatagrams.Store(true)
	ephemeral()
	_ = b.served()
	if got := e.metric("relay_edge_session_closes_total", "code", "slow_consumer"); got != 1 {
		t.Errorf("closes counted slow_consumer: %v, want 1", got)
	}
}

// Acks and control frames that queued up go out a chunk at a time, as
// deliveries do: a batch of a thousand rejects went out in one write
// under one deadline, so a device reading slowly but steadily, not slow
// enough to fail a chunk, was closed SLOW_CONSUMER for a burst of its
// own refusals.
func TestControlFramesGoOutInChunks(t *testing.T) {
	e := newEnv(t, func(c *Config) {
		c.Limits = DefaultLimits()
		c.Limits.EventsPerSecond, c.Limits.BytesPerSecond, c.Limits.FramesPerSecond = 1e6, 64<<20, 1e6
	})
	e.devices("u1", "b", "off")
	b := e.connect("b")
	b.handshake()
	var mu sync.Mutex
	largest := 0
	onWrite := func(p []byte) {
		mu.Lock()
		largest = max(largest, len(p))
		mu.Unlock()
	}
	b.conn.peer.onWrite.Store(&onWrite)
	// b does not read yet: its writer blocks on the first reject and the
	// rest queue behind it.
	const n = 1500
	var sent []*relayv1.Event
	for range n {
		sent = append(sent, b.sendPayload("x", "off"))
	}
	waitFor(t, "every event refused", func() bool {
		return e.metric("relay_edge_events_total", "result", "target_offline") == n
	})
	b.startReading()
	for _, ev := range sent {
		if f := b.nextAckOrReject(); f.GetReject().GetEventId() != ev.GetId() {
			t.Fatalf("got %v, want the reject of %s", f, ev.GetId())
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if largest > writeChunk+(1<<10) {
		t.Fatalf("the largest write held %d bytes, more than a chunk (%d) and a frame", largest, writeChunk)
	}
}

// A closed session relays no more of its device's datagrams, as its
// reader takes no more frames: its datagram reader used to go on until
// the hand-off, after the close linger.
func TestAClosedSessionRelaysNoDatagram(t *testing.T) {
	e := newEnv(t, nil)
	e.devices("u", "a", "b")
	b := e.online("b")
	// a reads nothing: its writer holds its connection open (the Close
	// frame unwritten) for the close linger, as a device's link that is
	// slow to take the last frames does.
	a := e.connect("a")
	a.handshake()
	released := make(chan struct{})
	e.hub.beforeHandOff = func(s *Session) {
		if s.deviceID != "a" {
			return
		}
		// a's session is closed and not yet handed off: its datagram
		// reader still runs.
		ev := a.event("b")
		ev.Ephemeral = true
		body, err := marshalDeterministic.Marshal(&relayv1.Frame{Kind: &relayv1.Frame_Event{Event: ev}})
		if err != nil {
			t.Error(err)
		}
		srv := a.conn.peer
		srv.in <- body
		waitFor(t, "the datagram taken", func() bool { return len(srv.in) == 0 })
		b.expectNothing("an event from a closed session", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil })
		close(released)
	}
	e.hub.CloseDevice("u", "a", relayv1.ErrorCode_ERROR_CODE_REVOKED, "revoked")
	select {
	case <-released:
	case <-time.After(20 * time.Second):
		t.Fatal("a's session did not reach its hand-off")
	}
}
