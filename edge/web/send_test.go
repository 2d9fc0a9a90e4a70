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
	var got []*relayv1.Deliver
	for {
		d := nextFrame(t, rx, false).GetDeliver()
		switch {
		case d.GetEvent().GetEphemeral() && string(d.GetEvent().GetPayload()) == marker:
			return got
		case d.GetEvent().GetEphemeral():
			t.Fatalf("an unexpected ephemeral event %q", d.GetEvent().GetPayload())
		default:
			got = append(got, d)
		}
	}
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
	r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
		cfg.AdminAddr = "127.0.0.1:0"
		// The receiver sends nothing while it holds its receipts back: the
		// edge must not close it as idle, which would give its deliveries
		// to its mailbox and so acknowledge them.
		cfg.IdleTimeout = 10 * time.Minute
	}})
	ctx := browser(t) // started after the relay, so closed before it
	edge := r.Edges[0]
	user := r.User("slots")
	pageDev, rxDev := r.Device(user, "page"), r.Device(user, "rx")
	rx := r.DialRaw(t, 0, client.WebSocket) // no datagrams: ephemeral events come in stream order
	rx.Login(rxDev)
	do(ctx, t, "open the page", chromedp.Navigate(edge.AdminURL()+"/"))

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

	connectPage(t, ctx, edge, pageDev, "websocket", "c", map[string]any{"maxPending": 2}, rxDev.ID)
	// Six sends at once (the fourth abortable), the ids of a sent and a
	// waiting one again, then the marker.
	eval[bool](ctx, t, fmt.Sprintf(`(() => {
		const c = window.c, to = [%q];
		window.outcome = {};
		const note = (name, p) => p.then(() => { outcome[name] = "delivered"; }, (e) => { outcome[name] = e.name + ": " + e.message; });
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
	receipt := func(ds ...*relayv1.Deliver) {
		t.Helper()
		var ids []uint64
		for _, d := range ds {
			ids = append(ids, d.GetDeliveryId())
		}
		if err := rx.Send(&relayv1.Frame{Kind: &relayv1.Frame_Received{Received: &relayv1.Received{DeliveryIds: ids}}}); err != nil {
			t.Fatalf("receipt: %v", err)
		}
	}
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
