package web_test

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/edge-relay/relay/edge/client"
)

// relay.js refuses what it cannot send with a RelayError whose code says
// why, as the Go client does: a TTL the edge would refuse
// (MALFORMED_FRAME; a fraction of a millisecond is dropped, and 0 takes
// the default, as the Go client's ttlMillis), an id still being sent
// (DUPLICATE_ID), and any send after close() (UNSPECIFIED "closed", not
// retryable, for sendEphemeral too: not TARGET_OFFLINE, which says to try
// again).
func TestRelayJSRefusesWithRelayErrors(t *testing.T) {
	g := newPageRig(t, "refused", nil)
	rx := g.r.Dial(0, g.rxDev, client.QUIC)
	connectPage(t, g.ctx, g.edge, g.pageDev, "websocket", "c", nil, g.rxDev.ID)
	got := eval[map[string]string](g.ctx, t, fmt.Sprintf(`(async () => {
		const c = window.c, to = [%q], out = {};
		const outcome = (e) => e instanceof Error ? e.name + " " + e.code + " " + e.retryable : String(e);
		const sent = async (name, f) => { try { await f(); out[name] = "sent"; } catch (e) { out[name] = outcome(e); } };
		for (const ttlMs of [0, 1500.5]) await sent("ttl " + ttlMs, () => c.send({ targets: to, type: "ttl", payload: String(ttlMs), ttlMs }));
		for (const ttlMs of [0.5, -1, NaN, "1000"]) {
			await sent("ttl " + String(ttlMs), () => c.send({ targets: to, ttlMs }));
			await sent("ephemeral ttl " + String(ttlMs), () => c.sendEphemeral({ targets: to, ttlMs }));
		}
		const first = c.send({ id: "twice", targets: to, type: "ttl", payload: "twice" });
		await sent("an id being sent", () => c.send({ id: "twice", targets: to }));
		await first;
		c.close();
		await sent("send after close", () => c.send({ targets: to }));
		await sent("sendEphemeral after close", () => c.sendEphemeral({ targets: to }));
		return out;
	})()`, g.rxDev.ID))
	const malformed, duplicate = "RelayError 10 false", "RelayError 18 false"
	want := map[string]string{
		"ttl 0": "sent", "ttl 1500.5": "sent",
		"ttl 0.5": malformed, "ephemeral ttl 0.5": malformed,
		"ttl -1": malformed, "ephemeral ttl -1": malformed,
		"ttl NaN": malformed, "ephemeral ttl NaN": malformed,
		"ttl 1000": malformed, "ephemeral ttl 1000": malformed,
		"an id being sent":          duplicate,
		"send after close":          "RelayError 0 false",
		"sendEphemeral after close": "RelayError 0 false",
	}
	for _, k := range slices.Sorted(maps.Keys(want)) {
		if got[k] != want[k] {
			t.Errorf("%s: %q, want %q", k, got[k], want[k])
		}
	}
	// The events sent, with the TTLs they were sent with.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ttls := map[string]time.Duration{}
	for len(ttls) < 3 {
		ev, err := rx.Receive(ctx)
		if err != nil {
			t.Fatalf("received %v, then %v", ttls, err)
		}
		if ev.Type == "ttl" {
			ttls[string(ev.Payload)] = ev.TTL
		}
	}
	if wantTTLs := map[string]time.Duration{"0": time.Minute, "1500.5": 1500 * time.Millisecond, "twice": time.Minute}; !maps.Equal(ttls, wantTTLs) {
		t.Errorf("received TTLs %v, want %v", ttls, wantTTLs)
	}
}
