package web_test

import (
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/edge/session"
	"github.com/edge-relay/relay/internal/relaytest"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// connectPage connects device dev with relay.js in the page (which must be
// one of the edge's, for /relay.js) over transport, with the options in
// extra added to RelayOptions, waits until device online (if any) is
// online for it, and keeps the client as window[name].
func connectPage(t testing.TB, ctx context.Context, edge *server.Server, dev relaytest.Device, transport, name string, extra map[string]any, online string) {
	t.Helper()
	pkcs8, err := x509.MarshalPKCS8PrivateKey(dev.Key)
	if err != nil {
		t.Fatal(err)
	}
	if extra == nil {
		extra = map[string]any{}
	}
	o, err := json.Marshal(map[string]any{
		"edge": edge.Addr(), "ws": "ws" + strings.TrimPrefix(edge.AdminURL(), "http") + "/relay/v1/ws",
		"user": dev.UserID, "device": dev.ID, "key": base64.StdEncoding.EncodeToString(pkcs8),
		"transport": transport, "name": name, "extra": extra, "online": online,
	})
	if err != nil {
		t.Fatal(err)
	}
	js := fmt.Sprintf(`(async (o) => {
		const m = await import("/relay.js");
		const key = await crypto.subtle.importKey("pkcs8", m.unb64(o.key), { name: "Ed25519" }, false, ["sign"]);
		const c = await m.RelayClient.connect({ edge: o.edge, userId: o.user, deviceId: o.device, key, transport: o.transport,
			certHashesUrl: location.origin + m.CERT_HASHES_PATH, webSocketUrl: o.ws, ...o.extra });
		const deadline = performance.now() + 30000;
		while (o.online && !c.online().includes(o.online)) {
			if (performance.now() > deadline) throw new Error(o.online + " never came online");
			await new Promise((r) => setTimeout(r, 10));
		}
		window[o.name] = c;
		return c.transport;
	})(%s)`, o)
	cctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	got, err := chromedp.Run(cctx, chromedp.Evaluate[string](js, chromedp.EvalAwaitPromise))
	if err != nil || got != transport {
		t.Fatalf("connect %s over %s: got %q, %v", dev.ID, transport, got, err)
	}
}

// eval runs js in the page and returns its value.
func eval[T any](ctx context.Context, t testing.TB, js string) T {
	t.Helper()
	ectx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	v, err := chromedp.Run(ectx, chromedp.Evaluate[T](js, chromedp.EvalAwaitPromise))
	if err != nil {
		t.Fatalf("%s: %v", js, err)
	}
	return v
}

// waitJS waits until the page's expression cond is true.
func waitJS(ctx context.Context, t testing.TB, what, cond string) {
	t.Helper()
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if _, err := chromedp.Run(wctx, chromedp.Poll[bool](cond, chromedp.WithPollingInterval(20*time.Millisecond))); err != nil {
		t.Fatalf("%s: %s never held: %v", what, cond, err)
	}
}

// nextFrame reads rx's next delivery, or presence change too when
// presence is set; it skips the rest (a new resume ticket).
func nextFrame(t *testing.T, rx *relaytest.Raw, presence bool) *relayv1.Frame {
	t.Helper()
	for {
		f, err := rx.Next(30 * time.Second)
		if err != nil {
			t.Fatalf("the receiver: %v", err)
		}
		if f.GetDeliver() != nil || (presence && f.GetPresence() != nil) {
			return f
		}
	}
}

// sentBefore reads rx's deliveries up to the ephemeral marker and returns
// the durable ones before it. The page sends the marker on its stream (a
// WebSocket) after its durable events, and the edge handles a stream's
// frames in order and queues them for rx in that order: what the page
// had put on the wire by then reached rx before the marker.
func sentBefore(t *testing.T, rx *relaytest.Raw, marker string) []*relayv1.Deliver {
	t.Helper()
	got, _ := markerAfter(t, rx, marker)
	return got
}

// markerAfter is sentBefore that also returns the marker's delivery: its
// seq tells which of the page's events were built before it.
func markerAfter(t *testing.T, rx *relaytest.Raw, marker string) ([]*relayv1.Deliver, *relayv1.Deliver) {
	t.Helper()
	var got []*relayv1.Deliver
	for {
		d := nextFrame(t, rx, false).GetDeliver()
		switch {
		case d.GetEvent().GetEphemeral() && string(d.GetEvent().GetPayload()) == marker:
			return got, d
		case d.GetEvent().GetEphemeral():
			t.Fatalf("an unexpected ephemeral event %q", d.GetEvent().GetPayload())
		default:
			got = append(got, d)
		}
	}
}

// nextDelivers reads rx's next n deliveries.
func nextDelivers(t *testing.T, rx *relaytest.Raw, n int) []*relayv1.Deliver {
	t.Helper()
	var got []*relayv1.Deliver
	for len(got) < n {
		got = append(got, nextFrame(t, rx, false).GetDeliver())
	}
	return got
}

// sendReceipt acknowledges deliveries ds in one Received frame, as a
// client acknowledges what arrived together.
func sendReceipt(t *testing.T, rx *relaytest.Raw, ds ...*relayv1.Deliver) {
	t.Helper()
	var ids []uint64
	for _, d := range ds {
		ids = append(ids, d.GetDeliveryId())
	}
	if err := rx.Send(&relayv1.Frame{Kind: &relayv1.Frame_Received{Received: &relayv1.Received{DeliveryIds: ids}}}); err != nil {
		t.Fatalf("receipt: %v", err)
	}
}

// sendMarker has window.c send the ephemeral marker to device to.
func sendMarker(ctx context.Context, t *testing.T, to, marker string) {
	t.Helper()
	eval[bool](ctx, t, fmt.Sprintf(`window.c.sendEphemeral({ targets: [%q], type: "marker", payload: %q }), true`, to, marker))
}

// endPageSession has the edge end the session of the page's client
// (window.c, device dev) as it ends a device's session for any reason
// the device may come back from, and waits until the page has a new
// one: the state listeners were told it disconnected, then connected,
// under another session id.
func endPageSession(ctx context.Context, t *testing.T, edge *server.Server, dev relaytest.Device) {
	t.Helper()
	old := eval[string](ctx, t, `(() => {
		window.states = [];
		window.c.addEventListener("state", (e) => states.push(e.detail.connected));
		return window.c.sessionId;
	})()`)
	edge.Hub().CloseDevice(dev.UserID, dev.ID, relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, "the test ends the session")
	waitJS(ctx, t, "the page reconnected", fmt.Sprintf(
		`states[0] === false && states.at(-1) === true && window.c.sessionId !== "" && window.c.sessionId !== %q`, old))
}

// A page whose sessions the edge ends soon after they begin backs off
// as a Go client does: each short session doubles the wait, drawn
// between half the backoff and the backoff, so three such ends in a row
// cost at least 150 + 300 + 600 ms with reconnectMinMs 300 (a lower
// bound: a slow machine only adds to it).
func TestRelayJSShortSessionsBackOff(t *testing.T) {
	g := newSlotRig(t, "flappy")
	connectPage(t, g.ctx, g.edge, g.pageDev, "websocket", "c", map[string]any{"reconnectMinMs": 300}, "")
	eval[bool](g.ctx, t, `(() => {
		window.ups = [];
		window.c.addEventListener("state", (e) => { if (e.detail.connected) ups.push(performance.now()); });
		return true;
	})()`)
	began := eval[float64](g.ctx, t, `performance.now()`)
	for i := range 3 {
		old := eval[string](g.ctx, t, `window.c.sessionId`)
		g.edge.Hub().CloseDevice(g.pageDev.UserID, g.pageDev.ID, relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER, "the test ends the session")
		waitJS(g.ctx, t, fmt.Sprintf("reconnect %d", i+1), fmt.Sprintf(`ups.length === %d && window.c.sessionId !== "" && window.c.sessionId !== %q`, i+1, old))
	}
	if took := eval[float64](g.ctx, t, `ups[2]`) - began; took < 1050 {
		t.Fatalf("three short sessions reconnected within %.0f ms, want at least 1050 ms of backoff", took)
	}
}

// relay.js follows the frame limit its edge tells in the Welcome: an
// event longer than the edge takes (which would end the session for
// good) is refused in the page with FRAME_TOO_LARGE, and the page goes on.
func TestRelayJSFollowsTheEdgesFrameLimit(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
		cfg.AdminAddr = "127.0.0.1:0"
		cfg.Session.Limits = session.DefaultLimits()
		cfg.Session.Limits.MaxFrameBytes, cfg.Session.Limits.MaxPayloadBytes = 16<<10, 12<<10
	}})
	ctx := browser(t)
	user := r.User("limited")
	pageDev, rxDev := r.Device(user, "page"), r.Device(user, "rx")
	rx := r.Dial(0, rxDev, client.WebSocket)
	do(ctx, t, "open the page", chromedp.Navigate(r.Edges[0].AdminURL()+"/"))
	connectPage(t, ctx, r.Edges[0], pageDev, "websocket", "c", nil, rxDev.ID)
	got := eval[[]string](ctx, t, fmt.Sprintf(`(async () => {
		const c = window.c, to = [%q], big = new Uint8Array(20 << 10), out = [];
		try { await c.send({ targets: to, payload: big }); out.push("sent"); } catch (e) { out.push(e.name + " " + e.code); }
		try { c.sendEphemeral({ targets: to, payload: big }); out.push("sent"); } catch (e) { out.push(e.name + " " + e.code); }
		await c.send({ targets: to, payload: "small" });
		out.push("small delivered");
		return out;
	})()`, rxDev.ID))
	want := []string{
		fmt.Sprintf("RelayError %d", relayv1.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE),
		fmt.Sprintf("RelayError %d", relayv1.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE),
		"small delivered",
	}
	if !slices.Equal(got, want) {
		t.Fatalf("got %q, want %q", got, want)
	}
	rctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if ev, err := rx.Receive(rctx); err != nil || string(ev.Payload) != "small" {
		t.Fatalf("received %q, %v", ev.Payload, err)
	}
}

// slotRig is a relay whose edge has an admin port, a user with two
// devices, a page and rx, rx connected as a raw device over a WebSocket
// (no datagrams: ephemeral events come in stream order), and Chromium on
// the edge's page, not connected yet.
type slotRig struct {
	ctx            context.Context
	r              *relaytest.Relay
	edge           *server.Server
	pageDev, rxDev relaytest.Device
	rx             *relaytest.Raw
}

func newSlotRig(t *testing.T, login string) *slotRig {
	t.Helper()
	return newSlotRigWith(t, login, nil)
}

// newSlotRigWith is newSlotRig with the edge's configuration adjusted by
// edge (if set).
func newSlotRigWith(t *testing.T, login string, edge func(cfg *server.Config)) *slotRig {
	t.Helper()
	r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
		cfg.AdminAddr = "127.0.0.1:0"
		// The receiver sends nothing while it holds its receipts back: the
		// edge must not close it as idle, which would give its deliveries
		// to its mailbox and so acknowledge them.
		cfg.IdleTimeout = 10 * time.Minute
		if edge != nil {
			edge(cfg)
		}
	}})
	ctx := browser(t) // started after the relay, so closed before it
	user := r.User(login)
	g := &slotRig{ctx: ctx, r: r, edge: r.Edges[0], pageDev: r.Device(user, "page"), rxDev: r.Device(user, "rx")}
	g.rx = r.DialRaw(t, 0, client.WebSocket)
	g.rx.Login(g.rxDev)
	do(ctx, t, "open the page", chromedp.Navigate(g.edge.AdminURL()+"/"))
	return g
}

// connect connects the page's device as window.c with maxPending 2, once
// the receiver is online for it, and installs window.note (outcomes).
func (g *slotRig) connect(t *testing.T) {
	t.Helper()
	connectPage(t, g.ctx, g.edge, g.pageDev, "websocket", "c", map[string]any{"maxPending": 2}, g.rxDev.ID)
	outcomes(g.ctx, t)
}

// outcomes installs window.note(name, promise), which records in
// window.outcome[name] how a send's promise settled: "delivered", "the
// abort reason" (window.abortReason itself), or the error's name and
// message.
func outcomes(ctx context.Context, t *testing.T) {
	t.Helper()
	eval[bool](ctx, t, `(() => {
		window.outcome = {};
		window.note = (name, p) => p.then(() => { outcome[name] = "delivered"; },
			(e) => { outcome[name] = e === window.abortReason ? "the abort reason" : e.name + ": " + e.message; });
		return true;
	})()`)
}

// seqs returns the seq of each delivery's event.
func seqs(ds []*relayv1.Deliver) []uint64 {
	var out []uint64
	for _, d := range ds {
		out = append(out, d.GetEvent().GetSeq())
	}
	return out
}

func eventIDs(ds []*relayv1.Deliver) []string {
	var ids []string
	for _, d := range ds {
		ids = append(ids, d.GetEvent().GetId())
	}
	return ids
}

// A page that sends faster than the edge acknowledges is held back by
// relay.js's maxPending, as a Go client by Config.MaxPending: with
// maxPending 2 and a receiver (a raw device, so the test decides when its
// receipts, and so the sender's acks, go) that acknowledges nothing, two
// events are on the wire and the others wait in the page, never sent; an
// ack lets exactly one more go; a waiting send given up with its
// AbortSignal is never sent, and the others arrive in the order of the
// send calls. A reused id is refused whether its event is sent or still
// waiting; close() fails both kinds.
func TestRelayJSSendWaitsForASlot(t *testing.T) {
	g := newSlotRig(t, "slots")
	ctx, pageDev, rxDev, rx := g.ctx, g.pageDev, g.rxDev, g.rx

	// maxPending is a positive integer, checked before anything is dialled
	// (the WebSocket URL refuses connections).
	checked := eval[[]string](ctx, t, `(async () => {
		const m = await import("/relay.js");
		const key = (await m.generateDeviceKey()).privateKey;
		const out = [];
		for (const maxPending of [0, -1, 1.5, "2", NaN, Infinity]) {
			try {
				await m.RelayClient.connect({ edge: "127.0.0.1:1", userId: "u", deviceId: "d", key, transport: "websocket",
					webSocketUrl: "ws://127.0.0.1:1/", certHashes: [], maxPending });
				out.push(String(maxPending) + " accepted");
			} catch (e) {
				out.push(String(maxPending) + " " + e.name);
			}
		}
		return out;
	})()`)
	for _, c := range checked {
		if !strings.HasSuffix(c, " RangeError") {
			t.Errorf("maxPending %s, want a RangeError", c)
		}
	}

	g.connect(t)
	// Six sends at once (the fourth abortable), the ids of a sent and a
	// waiting one again, then the marker.
	eval[bool](ctx, t, fmt.Sprintf(`(() => {
		const c = window.c, to = [%q];
		window.giveUp = new AbortController();
		for (let i = 1; i <= 6; i++) {
			const id = "e" + i, m = { id, targets: to, type: "slot", payload: id };
			note(id, i === 4 ? c.send(m, { signal: giveUp.signal }) : c.send(m));
		}
		note("e2 again", c.send({ id: "e2", targets: to, payload: "again" }));
		note("e5 again", c.send({ id: "e5", targets: to, payload: "again" }));
		c.sendEphemeral({ targets: to, type: "marker", payload: "after the sends" });
		return true;
	})()`, rxDev.ID))
	on := sentBefore(t, rx, "after the sends")
	if got := eventIDs(on); !slices.Equal(got, []string{"e1", "e2"}) {
		t.Fatalf("on the wire before any ack: %v, want [e1 e2] (maxPending 2)", got)
	}
	waitJS(ctx, t, "reused ids refused", `outcome["e2 again"]?.includes("already being sent") && outcome["e5 again"]?.includes("already being sent")`)
	if n := eval[int](ctx, t, `["e1", "e2", "e3", "e4", "e5", "e6"].filter((id) => id in outcome).length`); n != 0 {
		t.Fatalf("%d of the sends finished without an ack", n)
	}

	// e4 is given up while it waits.
	eval[bool](ctx, t, `giveUp.abort(), true`)
	waitJS(ctx, t, "the aborted send", `outcome.e4 !== undefined`)
	if got := eval[string](ctx, t, `outcome.e4`); !strings.HasPrefix(got, "AbortError") {
		t.Fatalf("the send given up: %q, want an AbortError", got)
	}

	// One receipt, so one ack: e3 takes the slot, and nothing else goes.
	receipt := func(ds ...*relayv1.Deliver) { t.Helper(); sendReceipt(t, rx, ds...) }
	receipt(on[0])
	next := nextFrame(t, rx, false).GetDeliver()
	if id := next.GetEvent().GetId(); id != "e3" {
		t.Fatalf("after e1's ack %q was sent, want e3", id)
	}
	on = append(on, next)
	waitJS(ctx, t, "e1 acknowledged", `outcome.e1 === "delivered"`)
	eval[bool](ctx, t, fmt.Sprintf(`window.c.sendEphemeral({ targets: [%q], type: "marker", payload: "after one ack" }), true`, rxDev.ID))
	if more := sentBefore(t, rx, "after one ack"); len(more) != 0 {
		t.Fatalf("after one ack %v went too, want only e3", eventIDs(more))
	}

	// Receipts for everything: the rest follow as slots free, in order.
	receipt(on[1:]...)
	for on[len(on)-1].GetEvent().GetId() != "e6" {
		d := nextFrame(t, rx, false).GetDeliver()
		on = append(on, d)
		receipt(d)
	}
	if got := eventIDs(on); !slices.Equal(got, []string{"e1", "e2", "e3", "e5", "e6"}) {
		t.Fatalf("the receiver got %v, want e1 e2 e3 e5 e6 (e4 given up)", got)
	}
	for i := 1; i < len(on); i++ {
		if on[i].GetEvent().GetSeq() <= on[i-1].GetEvent().GetSeq() {
			t.Fatalf("seq %d of %s after %d: out of the send calls' order", on[i].GetEvent().GetSeq(), on[i].GetEvent().GetId(), on[i-1].GetEvent().GetSeq())
		}
	}
	waitJS(ctx, t, "every send acknowledged", `["e1", "e2", "e3", "e5", "e6"].every((id) => outcome[id] === "delivered")`)

	// close() fails the sends under way, sent or waiting; the waiting one
	// never went.
	eval[bool](ctx, t, fmt.Sprintf(`(() => {
		const c = window.c, to = [%q];
		for (const id of ["e7", "e8", "e9"]) c.send({ id, targets: to, payload: id }).then(() => { outcome[id] = "delivered"; }, (e) => { outcome[id] = e.message; });
		c.close();
		return true;
	})()`, rxDev.ID))
	waitJS(ctx, t, "close fails the sends", `["e7", "e8", "e9"].every((id) => outcome[id] === "closed")`)
	var last []string
	for {
		f := nextFrame(t, rx, true)
		if p := f.GetPresence(); p != nil && p.GetDeviceId() == pageDev.ID && !p.GetOnline() {
			break
		}
		last = append(last, f.GetDeliver().GetEvent().GetId())
	}
	if !slices.Equal(last, []string{"e7", "e8"}) {
		t.Fatalf("before the page went offline the receiver got %v, want e7 e8 (e9 waited)", last)
	}
}

// A page whose session ends with sends both on the wire and waiting for
// a slot resends, once reconnected, only the ones on the wire, with
// their ids and seqs, and nothing else until acks free slots: a waiting
// send's event is built (its seq) only then, after anything the page
// sent since the reconnect. The edge deduplicates within a session only
// (docs/protocol.md), so the receiver gets each resent event twice, the
// first copy and the resend with the same id and seq (clients drop the
// copy by sender and id), and every other event once; by id, every
// event arrives, in seq order. Receipts of the first copies acknowledge
// the ended session and free no slot: each send resolves with the
// receipt of the copy its current session sent.
func TestRelayJSReconnectResendsOnlyTheSendsInFlight(t *testing.T) {
	g := newSlotRig(t, "resend")
	ctx, rx, to := g.ctx, g.rx, g.rxDev.ID
	g.connect(t)
	eval[bool](ctx, t, fmt.Sprintf(`(() => {
		for (const id of ["e1", "e2", "e3", "e4"]) note(id, window.c.send({ id, targets: [%q], type: "slot", payload: id }));
		return true;
	})()`, to))
	sendMarker(ctx, t, to, "before the reconnect")
	first := sentBefore(t, rx, "before the reconnect")
	if got := eventIDs(first); !slices.Equal(got, []string{"e1", "e2"}) {
		t.Fatalf("on the wire before the reconnect: %v, want [e1 e2] (maxPending 2)", got)
	}

	endPageSession(ctx, t, g.edge, g.pageDev)
	// The resends first. (Not read up to a marker: after a reconnect the
	// edge may hold the new session's durable events until the
	// receiver's mailbox is known to be covered, and an ephemeral marker
	// is never held.)
	again := nextDelivers(t, rx, 2)
	if got := eventIDs(again); !slices.Equal(got, []string{"e1", "e2"}) {
		t.Fatalf("after the reconnect the page sent %v first, want [e1 e2] (the sends in flight)", got)
	}
	if !slices.Equal(seqs(again), seqs(first)) {
		t.Fatalf("resent with seqs %v, the first copies had %v: want the same", seqs(again), seqs(first))
	}
	// Held or not, anything else the page sent on reconnecting is in
	// the receiver's queue by now, ahead of this marker.
	sendMarker(ctx, t, to, "after the reconnect")
	more, afterReconnect := markerAfter(t, rx, "after the reconnect")
	if len(more) != 0 {
		t.Fatalf("after the reconnect %v went too, want only the resends of e1 and e2", eventIDs(more))
	}
	if n := eval[int](ctx, t, `Object.keys(outcome).length`); n != 0 {
		t.Fatalf("%d sends finished without an ack", n)
	}

	// The first copies' receipts and the resent e1's in one frame: one
	// ack reaches the page (e1's), so e3 and only e3 takes a slot, its
	// event built now.
	sendReceipt(t, rx, first[0], first[1], again[0])
	waitJS(ctx, t, "e1 acknowledged", `outcome.e1 === "delivered"`)
	sendMarker(ctx, t, to, "after e1's ack")
	third, _ := markerAfter(t, rx, "after e1's ack")
	if got := eventIDs(third); !slices.Equal(got, []string{"e3"}) {
		t.Fatalf("after e1's ack the page sent %v, want [e3]", got)
	}
	if s := third[0].GetEvent().GetSeq(); s <= afterReconnect.GetEvent().GetSeq() {
		t.Fatalf("e3 has seq %d, below the marker sent after the reconnect (%d): built before it had a slot", s, afterReconnect.GetEvent().GetSeq())
	}
	if got := eval[string](ctx, t, `String(outcome.e2)`); got != "undefined" {
		t.Fatalf("e2 finished (%s) before its resend was received: the first copy's receipt went to the ended session", got)
	}

	// The rest: e2's and e3's acks let e4 go.
	sendReceipt(t, rx, again[1], third[0])
	fourth := nextDelivers(t, rx, 1)
	if got := eventIDs(fourth); !slices.Equal(got, []string{"e4"}) {
		t.Fatalf("after the acks of e2 and e3 the page sent %v, want [e4]", got)
	}
	sendReceipt(t, rx, fourth...)
	waitJS(ctx, t, "every send acknowledged", `["e1", "e2", "e3", "e4"].every((id) => outcome[id] === "delivered")`)

	// All the receiver got: each in-flight event twice, the others once;
	// by id, everything, in seq order (the resends have their first
	// copies' seqs, so the second session's are in order too).
	all := slices.Concat(first, again, third, fourth)
	if got := eventIDs(all); !slices.Equal(got, []string{"e1", "e2", "e1", "e2", "e3", "e4"}) {
		t.Fatalf("the receiver got %v, want e1 e2, then e1 e2 again, e3, e4", got)
	}
	firstSeen := slices.Concat(first, third, fourth)
	for i := 1; i < len(firstSeen); i++ {
		if firstSeen[i].GetEvent().GetSeq() <= firstSeen[i-1].GetEvent().GetSeq() {
			t.Fatalf("%s (seq %d) after %s (seq %d): not in the order of the send calls",
				firstSeen[i].GetEvent().GetId(), firstSeen[i].GetEvent().GetSeq(), firstSeen[i-1].GetEvent().GetId(), firstSeen[i-1].GetEvent().GetSeq())
		}
	}
}

// Aborting a send already on the wire rejects it with the signal's
// reason and gives its slot to the next waiting send at once, without an
// ack. The event may still be delivered: its ack, when the receiver's
// receipt comes, changes nothing and frees no slot a second time. After
// a reconnect it is not sent again; the sends in flight are.
func TestRelayJSAbortingASentSendFreesItsSlot(t *testing.T) {
	g := newSlotRig(t, "abort")
	ctx, rx, to := g.ctx, g.rx, g.rxDev.ID
	g.connect(t)
	eval[bool](ctx, t, fmt.Sprintf(`(() => {
		window.giveUp = new AbortController();
		window.abortReason = new Error("no longer wanted");
		for (const id of ["a1", "a2", "a3", "a4", "a5"]) {
			note(id, window.c.send({ id, targets: [%q], type: "slot", payload: id }, id === "a2" ? { signal: giveUp.signal } : {}));
		}
		return true;
	})()`, to))
	sendMarker(ctx, t, to, "before the abort")
	on := sentBefore(t, rx, "before the abort")
	if got := eventIDs(on); !slices.Equal(got, []string{"a1", "a2"}) {
		t.Fatalf("on the wire: %v, want [a1 a2] (maxPending 2)", got)
	}

	// a2 is given up on the wire: a3 goes at once, with no ack.
	eval[bool](ctx, t, `giveUp.abort(abortReason), true`)
	waitJS(ctx, t, "the aborted send", `outcome.a2 !== undefined`)
	if got := eval[string](ctx, t, `outcome.a2`); got != "the abort reason" {
		t.Fatalf("the send given up on the wire: %q, want the signal's reason", got)
	}
	sendMarker(ctx, t, to, "after the abort")
	took := sentBefore(t, rx, "after the abort")
	if got := eventIDs(took); !slices.Equal(got, []string{"a3"}) {
		t.Fatalf("after a2 was given up the page sent %v, want [a3] in its slot", got)
	}
	on = append(on, took...)

	// The receiver got a2 and acknowledges it: a2's late ack reaches the
	// page and frees nothing (a2 gave its slot up already). An event the
	// receiver sends the page after its receipt reaches the page after
	// that ack (the edge queues both in order, on the receiver's reader):
	// once the page has it, it had the ack.
	eval[bool](ctx, t, `(() => {
		window.got = [];
		window.c.addEventListener("event", (e) => got.push(new TextDecoder().decode(e.detail.payload)));
		return true;
	})()`)
	sendReceipt(t, rx, on[1])
	if err := rx.Send(&relayv1.Frame{Kind: &relayv1.Frame_Event{Event: &relayv1.Event{
		Id: "after a2's receipt", Targets: []string{g.pageDev.ID}, Seq: 1, CreatedAtMs: time.Now().UnixMilli(), TtlMs: 60_000,
		Type: "marker", Payload: []byte("after a2's receipt"), Ephemeral: true,
	}}}); err != nil {
		t.Fatalf("the receiver's event: %v", err)
	}
	waitJS(ctx, t, "the page has the receiver's event", `got.includes("after a2's receipt")`)
	sendMarker(ctx, t, to, "after a2's ack")
	if more := sentBefore(t, rx, "after a2's ack"); len(more) != 0 {
		t.Fatalf("a2's ack, after it was given up, let %v go: a slot freed twice", eventIDs(more))
	}
	if got := eval[string](ctx, t, `outcome.a2`); got != "the abort reason" {
		t.Fatalf("a2 given up, then acknowledged: %q, want the abort's outcome kept", got)
	}

	// a1's ack frees one slot, for a4.
	sendReceipt(t, rx, on[0])
	waitJS(ctx, t, "a1 acknowledged", `outcome.a1 === "delivered"`)
	sendMarker(ctx, t, to, "after a1's ack")
	took = sentBefore(t, rx, "after a1's ack")
	if got := eventIDs(took); !slices.Equal(got, []string{"a4"}) {
		t.Fatalf("after a1's ack the page sent %v, want [a4]", got)
	}
	on = append(on, took...)

	// A reconnect: the page resends a3 and a4, in flight; not a2.
	endPageSession(ctx, t, g.edge, g.pageDev)
	again := nextDelivers(t, rx, 2)
	if got := eventIDs(again); !slices.Equal(got, []string{"a3", "a4"}) {
		t.Fatalf("after the reconnect the page sent %v first, want [a3 a4] (the sends in flight)", got)
	}
	if !slices.Equal(seqs(again), seqs(on[2:])) {
		t.Fatalf("resent with seqs %v, the first copies had %v: want the same", seqs(again), seqs(on[2:]))
	}
	sendMarker(ctx, t, to, "after the reconnect")
	if more := sentBefore(t, rx, "after the reconnect"); len(more) != 0 {
		t.Fatalf("after the reconnect %v went too, want only the resends of a3 and a4", eventIDs(more))
	}

	// The acks of a3 and a4 let a5 go; then everything is acknowledged,
	// a2 keeping its abort.
	sendReceipt(t, rx, slices.Concat(on[2:], again)...)
	last := nextDelivers(t, rx, 1)
	if got := eventIDs(last); !slices.Equal(got, []string{"a5"}) {
		t.Fatalf("after the acks of a3 and a4 the page sent %v, want [a5]", got)
	}
	sendReceipt(t, rx, last...)
	waitJS(ctx, t, "every send acknowledged", `["a1", "a3", "a4", "a5"].every((id) => outcome[id] === "delivered")`)
	if got := eval[string](ctx, t, `outcome.a2`); got != "the abort reason" {
		t.Fatalf("a2 in the end: %q, want the signal's reason", got)
	}
	if got := eventIDs(slices.Concat(on, last)); !slices.Equal(got, []string{"a1", "a2", "a3", "a4", "a5"}) {
		t.Fatalf("the receiver got %v (besides the resends), want a1 to a5 (a2 given up after it was sent)", got)
	}
}

// What a page wrote before close() reaches the edge: close() says goodbye
// after it and lets the edge hang up first (within a bound), because
// closing a WebTransport session at once discards stream data not yet
// sent. Each round connects, sends an ephemeral event (on the stream: a
// new session's first) and closes at once.
func TestRelayJSCloseDeliversWhatWasWritten(t *testing.T) {
	for _, transport := range []string{"webtransport", "websocket"} {
		t.Run(transport, func(t *testing.T) {
			r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) { cfg.AdminAddr = "127.0.0.1:0" }})
			ctx := browser(t)
			user := r.User("parting")
			pageDev, rxDev := r.Device(user, "page"), r.Device(user, "rx")
			rx := r.Dial(0, rxDev, client.QUIC)
			do(ctx, t, "open the page", chromedp.Navigate(r.Edges[0].AdminURL()+"/"))
			for i := range 5 {
				connectPage(t, ctx, r.Edges[0], pageDev, transport, "c", nil, "")
				want := fmt.Sprint("parting ", i)
				eval[bool](ctx, t, fmt.Sprintf(`(() => {
					window.c.sendEphemeral({ targets: [%q], payload: %q });
					window.c.close();
					return true;
				})()`, rxDev.ID, want))
				rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				ev, err := rx.Receive(rctx)
				cancel()
				if err != nil || string(ev.Payload) != want {
					t.Fatalf("event %d: received %q, %v; want %q", i, ev.Payload, err, want)
				}
			}
		})
	}
}
