package web_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/edge/client"
)

// listenRig is a page connected as window.c, which records what its
// "event" listeners get in window.got (window.l is a listener that
// does), and a native device tx that sends to it.
type listenRig struct {
	*pageRig
	tx *client.Client
}

func newListenRig(t *testing.T, login string) *listenRig {
	t.Helper()
	g := &listenRig{pageRig: newPageRig(t, login, nil)}
	g.tx = g.r.Dial(0, g.rxDev, client.QUIC)
	connectPage(t, g.ctx, g.edge, g.pageDev, "websocket", "c", nil, g.rxDev.ID)
	eval[bool](g.ctx, t, `(() => {
		window.got = [];
		window.l = (e) => got.push(new TextDecoder().decode(e.detail.payload));
		return true;
	})()`)
	return g
}

// send sends payload from tx to the page, durably, and returns the
// Send's outcome once it has one.
func (g *listenRig) send(t *testing.T, payload string) <-chan error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	done := make(chan error, 1)
	go func() {
		done <- g.tx.Send(ctx, client.Message{Targets: []string{g.pageDev.ID}, Payload: []byte(payload)})
	}()
	return done
}

// delivered waits until the page's listeners got want and its sender
// was told it was delivered.
func (g *listenRig) delivered(t *testing.T, done <-chan error, want string) {
	t.Helper()
	waitJS(g.ctx, t, want+" reached a listener", fmt.Sprintf(`window.got.includes(%q)`, want))
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("sending %s: %v", want, err)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("the sender of %s was never told it was delivered", want)
	}
}

// heldUndelivered waits until the page holds n deliveries, and fails as
// soon as the sender of the one it sends is told it was delivered: with
// no listener, nothing may be acknowledged.
func (g *listenRig) heldUndelivered(t *testing.T, payload string, n int) <-chan error {
	t.Helper()
	done := g.send(t, payload)
	clustertest.Eventually(t, 30*time.Second, func() error {
		select {
		case err := <-done:
			t.Fatalf("%s: the sender was told %v while the page had no listener (got %q)", payload, err, eval[[]string](g.ctx, t, `window.got`))
		default:
		}
		// held is private to TypeScript only.
		if held := eval[int](g.ctx, t, `window.c.held.length`); held != n {
			return fmt.Errorf("the page holds %d deliveries, want %d", held, n)
		}
		return nil
	})
	return done
}

// Removing the last "event" listener makes the page hold what arrives
// again, unacknowledged (the sender is not told delivered), until a
// listener is attached: whether it was removed with removeEventListener,
// was a once listener that ran, or was attached with a signal that
// aborted. Each event reaches a listener once, in order.
func TestRelayJSHoldsEventsAfterTheLastListenerGoes(t *testing.T) {
	g := newListenRig(t, "unlistening")
	eval[bool](g.ctx, t, `window.c.addEventListener("event", l), true`)
	g.delivered(t, g.send(t, "1"), "1")

	eval[bool](g.ctx, t, `window.c.removeEventListener("event", l), true`)
	done := g.heldUndelivered(t, "2", 1)
	eval[bool](g.ctx, t, `window.c.addEventListener("event", l, { once: true }), true`)
	g.delivered(t, done, "2")

	// The once listener ran: none is left.
	done = g.heldUndelivered(t, "3", 1)
	eval[bool](g.ctx, t, `(() => {
		window.stopListening = new AbortController();
		window.c.addEventListener("event", l, { signal: stopListening.signal });
		return true;
	})()`)
	g.delivered(t, done, "3")

	eval[bool](g.ctx, t, `stopListening.abort(), true`)
	done = g.heldUndelivered(t, "4", 1)
	eval[bool](g.ctx, t, `window.c.addEventListener("event", l), true`)
	g.delivered(t, done, "4")
	if got := eval[[]string](g.ctx, t, `window.got`); !slices.Equal(got, []string{"1", "2", "3", "4"}) {
		t.Fatalf("the listeners got %q, want 1 to 4 once each, in order", got)
	}
}

// Durable deliveries held while the page has no listener are dropped
// when their session ends: never acknowledged, they come again in the
// next session, and a page that does not listen across reconnects holds
// one copy of each, not one per session. Once it listens it gets each
// once, in order, and their senders are told delivered.
func TestRelayJSDropsWhatItHeldFromAnEndedSession(t *testing.T) {
	g := newListenRig(t, "reconnecting-unheard")
	const n = 5
	var sends []<-chan error
	for k := range n {
		sends = append(sends, g.heldUndelivered(t, fmt.Sprint(k), k+1))
	}
	for round := range 2 {
		endPageSession(g.ctx, t, g.edge, g.pageDev)
		// The edge gives the next session what the ended one did not
		// acknowledge.
		clustertest.Eventually(t, 30*time.Second, func() error {
			held := eval[[]bool](g.ctx, t, `window.c.held.map((h) => h.conn === window.c.conn)`)
			if len(held) > n {
				t.Fatalf("after reconnect %d the page holds %d deliveries, want %d: those of the ended session were kept", round+1, len(held), n)
			}
			if len(held) < n || slices.Contains(held, false) {
				return fmt.Errorf("the page holds %v (true: from the current session), want %d from it", held, n)
			}
			return nil
		})
	}
	eval[bool](g.ctx, t, `window.c.addEventListener("event", l), true`)
	for k, done := range sends {
		g.delivered(t, done, fmt.Sprint(k))
	}
	if got := eval[[]string](g.ctx, t, `window.got`); !slices.Equal(got, []string{"0", "1", "2", "3", "4"}) {
		t.Fatalf("the listener got %q, want 0 to 4 once each, in order", got)
	}
}
