package web_test

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/edge-relay/relay/edge/client"
)

// The WebSocket that won the race for an edge (where UDP is blocked) is
// used directly for TRANSPORT_MEMORY_MS, then raced again, so a page
// whose network changed gets WebTransport back; and a remembered
// WebSocket that fails to dial is forgotten at once, for the full race.
func TestRelayJSRacesAgainAfterTheRememberedWebSocket(t *testing.T) {
	g := newPageRig(t, "remembering", nil)
	// A port nobody listens on: a WebSocket there fails to dial.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "ws://" + ln.Addr().String() + "/relay/v1/ws"
	_ = ln.Close()
	key := "relay.transport." + g.edge.Addr()
	memory := eval[float64](g.ctx, t, fmt.Sprintf(`(async () => {
		window.wtAttempts = 0;
		const WT = window.WebTransport;
		window.WebTransport = class extends WT { constructor(...a) { super(...a); window.wtAttempts++; } };
		// What the race chose, when.
		window.remember = (name, at) => { localStorage.setItem(%[1]q, name); localStorage.setItem(%[1]q + ".at", String(at)); };
		window.remembered = () => [localStorage.getItem(%[1]q), Number(localStorage.getItem(%[1]q + ".at"))];
		return (await import("/relay.js")).TRANSPORT_MEMORY_MS;
	})()`, key))
	if memory != 60*60*1000 {
		t.Fatalf("TRANSPORT_MEMORY_MS = %v, want an hour", memory)
	}
	// WebTransport gets a head start long enough to win every race here.
	auto := func(extra map[string]any) map[string]any {
		extra["transport"], extra["headStartMs"] = "auto", 10_000
		return extra
	}
	checkRemembered := func(want string) {
		t.Helper()
		got := eval[[]any](g.ctx, t, `[...remembered(), Date.now()]`)
		if got[0] != want || got[1].(float64) <= 0 || got[2].(float64)-got[1].(float64) > 60_000 {
			t.Fatalf("remembered %v (now %v), want %s chosen just now", got[:2], got[2], want)
		}
	}

	// Remembered a minute ago: straight to the WebSocket.
	eval[bool](g.ctx, t, `remember("websocket", Date.now() - 60000), true`)
	connectPage(t, g.ctx, g.edge, g.pageDev, "websocket", "c", auto(map[string]any{}), "")
	if n := eval[int](g.ctx, t, `window.c.close(), wtAttempts`); n != 0 {
		t.Fatalf("%d WebTransport attempts with a WebSocket remembered a minute ago, want 0", n)
	}

	// Remembered longer ago than TRANSPORT_MEMORY_MS: the race again,
	// which WebTransport wins here, and is remembered.
	eval[bool](g.ctx, t, fmt.Sprintf(`remember("websocket", Date.now() - %v - 60000), true`, memory))
	connectPage(t, g.ctx, g.edge, g.pageDev, "webtransport", "c", auto(map[string]any{}), "")
	eval[bool](g.ctx, t, `window.c.close(), true`)
	checkRemembered("webtransport")

	// Remembered just now, but it does not dial: the race at once.
	eval[bool](g.ctx, t, `remember("websocket", Date.now()), true`)
	connectPage(t, g.ctx, g.edge, g.pageDev, "webtransport", "c", auto(map[string]any{"webSocketUrl": dead}), "")
	eval[bool](g.ctx, t, `window.c.close(), true`)
	checkRemembered("webtransport")
}

// relay.js needs no AbortSignal.any, which Safari before 17.4 lacks (and
// which otherwise meets relay.js's needs, Ed25519 among them): a page
// without it connects over either transport and sends.
func TestRelayJSConnectsWithoutAbortSignalAny(t *testing.T) {
	g := newPageRig(t, "no-any", nil)
	rx := g.r.Dial(0, g.rxDev, client.QUIC)
	if got := eval[bool](g.ctx, t, `(() => { delete AbortSignal.any; return AbortSignal.any === undefined; })()`); !got {
		t.Fatal("AbortSignal.any could not be removed from the page")
	}
	for _, transport := range []string{"webtransport", "websocket"} {
		name := "c" + transport
		connectPage(t, g.ctx, g.edge, g.pageDev, transport, name, nil, g.rxDev.ID)
		eval[bool](g.ctx, t, fmt.Sprintf(`(async () => { await window[%q].send({ targets: [%q], type: "no-any", payload: %q }); window[%[1]q].close(); return true; })()`,
			name, g.rxDev.ID, transport))
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		ev, err := rx.Receive(ctx)
		cancel()
		if err != nil || ev.Type != "no-any" || string(ev.Payload) != transport {
			t.Fatalf("over %s: received %+v, %v", transport, ev, err)
		}
	}
}
