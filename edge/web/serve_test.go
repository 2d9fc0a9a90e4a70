package web_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/internal/relaytest"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// pageRig is a relay of one edge with an admin port (its page serves
// relay.js), configured by edge, a user with devices page and rx, and
// Chromium on the edge's page.
type pageRig struct {
	ctx            context.Context
	r              *relaytest.Relay
	edge           *server.Server
	pageDev, rxDev relaytest.Device
}

func newPageRig(t *testing.T, login string, edge func(cfg *server.Config)) *pageRig {
	t.Helper()
	r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
		cfg.AdminAddr = "127.0.0.1:0"
		if edge != nil {
			edge(cfg)
		}
	}})
	ctx := browser(t) // started after the relay, so closed before it
	user := r.User(login)
	g := &pageRig{ctx: ctx, r: r, edge: r.Edges[0], pageDev: r.Device(user, "page"), rxDev: r.Device(user, "rx")}
	do(ctx, t, "open the page", chromedp.Navigate(g.edge.AdminURL()+"/"))
	return g
}

// An error inside the page's session (here the stream write of its
// answer to the edge's re-authentication challenge rejects, as writes do
// once the WebTransport stream closed) ends that session, not the
// client: no unhandled rejection, the page reconnects, and its sends go
// on.
func TestRelayJSReconnectsAfterAnErrorInItsSession(t *testing.T) {
	g := newPageRig(t, "throwing", func(cfg *server.Config) { cfg.Session.MaxSessionAge = 2 * time.Second })
	rx := g.r.Dial(0, g.rxDev, client.QUIC)
	connectPage(t, g.ctx, g.edge, g.pageDev, "webtransport", "c", nil, g.rxDev.ID)
	old := eval[string](g.ctx, t, `(() => {
		window.states = [];
		window.unhandled = [];
		window.addEventListener("unhandledrejection", (e) => unhandled.push(String(e.reason)));
		window.c.addEventListener("state", (e) => states.push(e.detail.connected));
		window.c.addEventListener("closed", (e) => states.push("closed"));
		// The next stream write (the page is idle: the answer to the
		// challenge the edge sends at the session's maximum age) rejects.
		const write = WritableStreamDefaultWriter.prototype.write;
		let failed = false;
		WritableStreamDefaultWriter.prototype.write = function (chunk) {
			if (!failed) { failed = true; return Promise.reject(new TypeError("the stream is closed")); }
			return write.call(this, chunk);
		};
		return window.c.sessionId;
	})()`)
	waitJS(g.ctx, t, "the page reconnected", fmt.Sprintf(
		`states[0] === false && states.at(-1) === true && window.c.sessionId !== "" && window.c.sessionId !== %q`, old))
	if got := eval[[]string](g.ctx, t, `window.unhandled`); len(got) != 0 {
		t.Fatalf("unhandled rejections in the page: %q", got)
	}
	eval[bool](g.ctx, t, fmt.Sprintf(`window.c.send({ targets: [%q], payload: "after" }).then(() => true)`, g.rxDev.ID))
	ctx, cancel := context.WithTimeout(g.ctx, 30*time.Second)
	defer cancel()
	if ev, err := rx.Receive(ctx); err != nil || string(ev.Payload) != "after" {
		t.Fatalf("received %q, %v", ev.Payload, err)
	}
}

// relay.js's first reconnect after a session that lasted is drawn from
// [0, max(reconnectMinMs, 1 s)], over the whole range (as the Go client's
// TestReconnectAfterALongSessionIsSpread), so the pages of an edge that
// died do not all come back in the same instant.
func TestRelayJSSpreadsReconnectsAfterLongSessions(t *testing.T) {
	g := newPageRig(t, "spread", nil)
	got := eval[map[string][]float64](g.ctx, t, `(async () => {
		const m = await import("/relay.js");
		const out = {};
		for (const min of [100, 3000]) {
			let lo = Infinity, hi = -Infinity, next = new Set();
			for (let i = 0; i < 2000; i++) {
				const [wait, n] = m.reconnectWait(null, 60000, 8000, min, 10000);
				lo = Math.min(lo, wait); hi = Math.max(hi, wait); next.add(n);
			}
			out[min] = [lo, hi, ...next];
		}
		return out;
	})()`)
	for _, minMs := range []float64{100, 3000} {
		r := got[fmt.Sprint(minMs)]
		bound := max(minMs, 1000)
		// 2000 uniform draws all in one end's quarter: a chance of (3/4)^2000.
		if len(r) != 3 || r[0] < 0 || r[1] > bound || r[0] > bound/4 || r[1] < bound*3/4 || r[2] != minMs {
			t.Fatalf("reconnectMinMs %v: waits from %v to %v, then backoffs %v; want waits spread over [0, %v], the backoff reset", minMs, r[0], r[1], r[2:], bound)
		}
	}
}

// Events that reach the page before it listens for "event" (here stored
// in its mailbox while it was offline, and sent by the edge as soon as
// the session is up) are held, unacknowledged, until it does: a page
// that attaches its listener a little after connect() resolved gets
// every one, once, in order.
func TestRelayJSHoldsEventsUntilThePageListens(t *testing.T) {
	g := newPageRig(t, "late-listener", nil)
	ctx, cancel := context.WithTimeout(g.ctx, time.Minute)
	defer cancel()
	tx := g.r.Dial(0, g.rxDev, client.QUIC)
	const n = 20
	for k := range n {
		if err := tx.Send(ctx, client.Message{Targets: []string{g.pageDev.ID}, Payload: fmt.Appendf(nil, "%d", k)}); err != nil {
			t.Fatalf("event %d: %v", k, err)
		}
	}
	connectPage(t, g.ctx, g.edge, g.pageDev, "webtransport", "c", nil, "")
	eval[bool](g.ctx, t, `(async () => {
		await new Promise((r) => setTimeout(r, 50));
		window.got = [];
		window.c.addEventListener("event", (e) => got.push(new TextDecoder().decode(e.detail.payload)));
		return true;
	})()`)
	waitJS(g.ctx, t, "every event reached the listener", fmt.Sprintf(`window.got.length >= %d`, n))
	got := eval[[]string](g.ctx, t, `window.got`)
	for k, p := range got {
		if p != fmt.Sprint(k) {
			t.Fatalf("events %q, want 0 to %d once each, in order", got, n-1)
		}
	}
}

// Deliveries held for a page that does not listen yet are dropped by
// close(), not passed to a listener attached after it: they were never
// acknowledged, so the edge kept them, and the device's next session
// receives every one.
func TestRelayJSCloseDropsWhatItHeld(t *testing.T) {
	g := newPageRig(t, "closing-early", nil)
	ctx, cancel := context.WithTimeout(g.ctx, time.Minute)
	defer cancel()
	tx := g.r.Dial(0, g.rxDev, client.QUIC)
	const n = 5
	for k := range n {
		if err := tx.Send(ctx, client.Message{Targets: []string{g.pageDev.ID}, Payload: fmt.Appendf(nil, "%d", k)}); err != nil {
			t.Fatalf("event %d: %v", k, err)
		}
	}
	connectPage(t, g.ctx, g.edge, g.pageDev, "webtransport", "c", nil, "")
	// held is private to TypeScript only: the page holds the mailbox's
	// events, unacknowledged, while nothing listens.
	waitJS(g.ctx, t, "the page holds the events", fmt.Sprintf(`window.c.held.length === %d`, n))
	got := eval[int](g.ctx, t, `(async () => {
		window.c.close();
		let got = 0;
		window.c.addEventListener("event", () => got++);
		await new Promise((r) => setTimeout(r, 0)); // after the release a listener schedules
		return got;
	})()`)
	if got != 0 {
		t.Fatalf("%d events passed on after close()", got)
	}
	again := g.r.Dial(0, g.pageDev, client.QUIC)
	for k := range n {
		ev, err := again.Receive(ctx)
		if err != nil || string(ev.Payload) != fmt.Sprint(k) {
			t.Fatalf("the next session's event %d: %q, %v", k, ev.Payload, err)
		}
	}
}

// An edge's GOING_AWAY hint is taken within bounds (the Go client's
// TestReconnectWaitBacksOffFromShortSessions): never above
// MAX_RECONNECT_HINT_MS (beyond setTimeout's range a wait would fire at
// once), never negative, and after a session that ended soon after it
// began never sooner than the backoff, which grows.
func TestRelayJSBoundsTheEdgesReconnectHint(t *testing.T) {
	g := newPageRig(t, "hints", nil)
	got := eval[[][]float64](g.ctx, t, `(async () => {
		const m = await import("/relay.js");
		const away = (ms) => new m.RelayError(m.ErrorCode.GOING_AWAY, "bye", ms);
		return [
			m.reconnectWait(away(100 * 86400000), 60000, 1000, 100, 2000),
			m.reconnectWait(away(-3600000), 60000, 1000, 100, 2000),
			m.reconnectWait(away(0), 50, 1000, 100, 2000),
			m.reconnectWait(away(3000), 50, 1000, 100, 2000),
			[m.MAX_RECONNECT_HINT_MS],
		];
	})()`)
	maxHint := got[4][0]
	for i, c := range []struct{ lo, hi, next float64 }{
		{maxHint, maxHint, 100}, {0, 0, 100}, {500, 1000, 2000}, {3000, 3000, 2000},
	} {
		if w := got[i]; w[0] < c.lo || w[0] > c.hi || w[1] != c.next {
			t.Errorf("case %d: wait %v, next backoff %v; want %v-%v, %v", i, w[0], w[1], c.lo, c.hi, c.next)
		}
	}
	if maxHint != 5*60*1000 {
		t.Errorf("MAX_RECONNECT_HINT_MS = %v, want the Go client's 5 minutes", maxHint)
	}
}

// sendEphemeral drops an event (QUEUE_FULL) rather than queue it while the
// connection holds more than MAX_EPHEMERAL_BACKLOG bytes unsent: a burst
// sent faster than the connection takes it keeps the first quarter
// megabyte, and once that went out the page sends again.
func TestRelayJSDropsEphemeralEventsBehindABacklog(t *testing.T) {
	g := newPageRig(t, "backlog", nil)
	connectPage(t, g.ctx, g.edge, g.pageDev, "websocket", "c", nil, "")
	got := eval[[]float64](g.ctx, t, `(async () => {
		const m = await import("/relay.js");
		const c = window.c, payload = new Uint8Array(8 << 10);
		let sent = 0, full = 0;
		for (let i = 0; i < 200; i++) { // 1.6 MB at once
			try { c.sendEphemeral({ payload }); sent++; } catch (e) {
				if (e.code !== m.ErrorCode.QUEUE_FULL) throw e;
				full++;
			}
		}
		const deadline = performance.now() + 30000;
		for (;;) {
			try { c.sendEphemeral({ payload }); break; } catch (e) {
				if (e.code !== m.ErrorCode.QUEUE_FULL || performance.now() > deadline) throw e;
				await new Promise((r) => setTimeout(r, 10));
			}
		}
		return [sent, full, m.MAX_EPHEMERAL_BACKLOG];
	})()`)
	sent, full, backlog := got[0], got[1], got[2]
	perEvent := float64(8<<10) + 64 // the payload and the frame around it, about
	if full == 0 || sent+full != 200 || sent > backlog/(8<<10)+2 || sent < backlog/perEvent {
		t.Fatalf("a burst of 200 events of 8 KiB: %v sent, %v refused QUEUE_FULL; want about %v sent", sent, full, backlog/perEvent)
	}
}

// When a session ends, the page hears that every device the session
// reported online is offline, and the next session reports it online
// again (the Go client's TestPresenceAcrossAReconnect).
func TestRelayJSPresenceAcrossAReconnect(t *testing.T) {
	g := newPageRig(t, "presence", nil)
	g.r.Dial(0, g.rxDev, client.QUIC)
	connectPage(t, g.ctx, g.edge, g.pageDev, "websocket", "c", nil, g.rxDev.ID)
	eval[bool](g.ctx, t, `(() => {
		window.seen = [];
		window.c.addEventListener("presence", (e) => seen.push(e.detail.deviceId + ":" + e.detail.online));
		return true;
	})()`)
	g.edge.Hub().CloseDevice(g.pageDev.UserID, g.pageDev.ID, relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER, "the test ends the session")
	want := g.rxDev.ID + ":false," + g.rxDev.ID + ":true"
	waitJS(g.ctx, t, "offline, then online again", fmt.Sprintf(`seen.slice(0, 2).join(",") === %q`, want))
}
