package web_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/edge/session"
	"github.com/edge-relay/relay/internal/relaytest"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// sendAll has window.c send each of msgs (JavaScript Message literals,
// by id) and records how each settles in window.settled[id]: "delivered"
// or "code N" (a RelayError's code; anything else as a string).
func sendAll(ctx context.Context, t *testing.T, msgs map[string]string) {
	t.Helper()
	var js strings.Builder
	js.WriteString("(() => {\n\t\twindow.settled ??= {};\n")
	ids := make([]string, 0, len(msgs))
	for id := range msgs {
		ids = append(ids, id)
	}
	slices.Sort(ids) // sent in the order of their ids
	for _, id := range ids {
		fmt.Fprintf(&js, "\t\twindow.c.send(%s).then(() => { settled[%q] = \"delivered\"; }, (e) => { settled[%q] = e.name === \"RelayError\" ? \"code \" + e.code : String(e); });\n", msgs[id], id, id)
	}
	js.WriteString("\t\treturn true;\n\t})()")
	eval[bool](ctx, t, js.String())
}

// Sends whose events expired while the page was away fail alone in the
// page, with the RelayError EXPIRED the edge would give, and are not sent
// again (as in the Go client's TestExpiredPendingSendsFailWithoutBeingSent):
// the edge would refuse each for the device's fault, and more of them
// than its refusal budget closed the session as RATE_LIMITED, session
// after session. The edge takes one refusal here, with a tolerance of a
// second; its clock jumps a minute ahead while the page's events wait
// for their acks, and the edge ends the page's session. The page learns
// the new offset in the handshake and resends only the events with an
// hour's TTL; those of 10 s fail, the edge refuses nothing, and the
// page's new session lasts.
func TestRelayJSExpiredPendingSendsFailWithoutBeingSent(t *testing.T) {
	var ahead atomic.Int64
	g := newSlotRigWith(t, "sleeper", func(cfg *server.Config) {
		cfg.Session.Limits = session.DefaultLimits()
		cfg.Session.Limits.SkewTolerance = time.Second
		cfg.Session.RefusalBurst, cfg.Session.RefusalsPerSecond = 1, 0.001
		cfg.Session.Now = func() time.Time { return time.Now().Add(time.Duration(ahead.Load())) }
	})
	ctx, rx, to := g.ctx, g.rx, g.rxDev.ID
	connectPage(t, ctx, g.edge, g.pageDev, "websocket", "c", nil, to)
	msgs := map[string]string{}
	for _, id := range []string{"x1", "x2", "x3", "x4"} {
		msgs[id] = fmt.Sprintf(`{ id: %q, targets: [%q], payload: %q, ttlMs: 10000 }`, id, to, id)
	}
	for _, id := range []string{"y1", "y2"} {
		msgs[id] = fmt.Sprintf(`{ id: %q, targets: [%q], payload: %q, ttlMs: 3600000 }`, id, to, id)
	}
	sendAll(ctx, t, msgs)
	sendMarker(ctx, t, to, "sent")
	if got := eventIDs(sentBefore(t, rx, "sent")); !slices.Equal(got, []string{"x1", "x2", "x3", "x4", "y1", "y2"}) {
		t.Fatalf("on the wire: %v", got)
	}
	ahead.Store(int64(time.Minute))
	endPageSession(ctx, t, g.edge, g.pageDev)
	session := eval[string](ctx, t, `window.c.sessionId`)
	again := nextDelivers(t, rx, 2)
	if got := eventIDs(again); !slices.Equal(got, []string{"y1", "y2"}) {
		t.Fatalf("resent: %v, want y1 and y2", got)
	}
	expired := fmt.Sprintf("code %d", relayv1.ErrorCode_ERROR_CODE_EXPIRED)
	waitJS(ctx, t, "the expired sends failed", fmt.Sprintf(`["x1", "x2", "x3", "x4"].every((id) => settled[id] === %q)`, expired))
	sendReceipt(t, rx, again...)
	waitJS(ctx, t, "the lasting sends delivered", `settled.y1 === "delivered" && settled.y2 === "delivered"`)
	if got := eval[string](ctx, t, `JSON.stringify(window.states) + " " + window.c.sessionId`); got != "[false,true] "+session {
		t.Fatalf("the page's states and session: %s, want [false,true] %s (one reconnect, then up)", got, session)
	}
	if n := relaytest.Counter(t, g.edge, "relay_edge_events_total", "result", "expired"); n != 0 {
		t.Fatalf("the edge refused %v events as expired: the page sent them again", n)
	}
}

// A send waiting for its ack when the page comes back to an edge with a
// smaller frame limit than its event was encoded under fails alone
// (FRAME_TOO_LARGE), as in the Go client
// (TestAPendingEventTooLargeForTheNextEdgeFailsAlone): resent, it would
// end the session for good, and with it the page. The edge ends the
// page's session (its sends stay pending: the receiver has not
// acknowledged them) and, while the page waits to reconnect, crashes and
// comes back at the same addresses with the default 64 KiB limit; the
// small event sent with the large one is resent, stored for the receiver
// (whose session went with the crash), acknowledged. (Crashed with the
// page still connected, the edge's sessions end in-process before the
// admin port's connections go, and the receiver's deliveries, which its
// mailbox can no longer take, would be refused to the page as INTERNAL.)
func TestRelayJSPendingEventTooLargeForTheNextEdgeFailsAlone(t *testing.T) {
	g := newSlotRigWith(t, "moving", func(cfg *server.Config) {
		cfg.Session.Limits = session.DefaultLimits()
		cfg.Session.Limits.MaxFrameBytes, cfg.Session.Limits.MaxPayloadBytes = 256<<10, 200<<10
	})
	ctx, rx, to := g.ctx, g.rx, g.rxDev.ID
	connectPage(t, ctx, g.edge, g.pageDev, "websocket", "c", map[string]any{"idleTimeoutMs": 3000, "reconnectMinMs": 4000}, to)
	sendAll(ctx, t, map[string]string{
		"big":   fmt.Sprintf(`{ id: "big", targets: [%q], payload: new Uint8Array(100 << 10) }`, to),
		"small": fmt.Sprintf(`{ id: "small", targets: [%q], payload: "small" }`, to),
	})
	if got := eventIDs(nextDelivers(t, rx, 2)); !slices.Equal(got, []string{"big", "small"}) {
		t.Fatalf("on the wire: %v", got)
	}
	addr, admin := g.edge.Addr(), strings.TrimPrefix(g.edge.AdminURL(), "http://")
	eval[bool](ctx, t, `(() => {
		window.states = [];
		window.c.addEventListener("state", (e) => states.push(e.detail.connected));
		return true;
	})()`)
	g.edge.Hub().CloseDevice(g.pageDev.UserID, g.pageDev.ID, relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, "the test ends the session")
	waitJS(ctx, t, "the page lost its session", `states[0] === false`)
	g.r.KillEdge(0)
	cfg := g.r.EdgeConfig(0)
	cfg.EdgeID += "-again" // the crashed one is a member until its lease ends
	cfg.Addr, cfg.AdminAddr = addr, admin
	cfg.Session.Limits = session.DefaultLimits()
	g.edge = g.r.StartEdgeWith(0, cfg)
	waitJS(ctx, t, "the large send failed", fmt.Sprintf(`settled.big === "code %d"`, relayv1.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE))
	waitJS(ctx, t, "the small send delivered", `settled.small === "delivered"`)
	if got := eval[string](ctx, t, `String(window.c.error?.message ?? "running") + " " + JSON.stringify(states)`); got != "running [false,true]" {
		t.Fatalf("the page stopped, or did not reconnect once: %s", got)
	}
}
