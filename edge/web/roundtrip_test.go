package web_test

import (
	"context"
	"errors"
	"fmt"
	"net/http/httptest"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/edge/web"
	"github.com/edge-relay/relay/internal/relaytest"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// Every protocol error code is put in words by relay.js's describe, so
// the page never shows a person a bare number.
func TestEveryErrorCodeHasWords(t *testing.T) {
	ctx := browser(t)
	srv := httptest.NewServer(web.Handler())
	t.Cleanup(srv.Close)
	do(ctx, t, "open the page", chromedp.Navigate(srv.URL+"/"))
	words, err := chromedp.Run(ctx, chromedp.Evaluate[map[string]string](`(async () => {
		const m = await import("/relay.js");
		const out = {};
		for (const [name, v] of Object.entries(m.ErrorCode)) {
			if (typeof v === "number") out[name] = m.describe(v);
		}
		return out;
	})()`, chromedp.EvalAwaitPromise))
	if err != nil {
		t.Fatal(err)
	}
	generic := words["UNSPECIFIED"]
	seen := map[string]string{}
	for num, name := range relayv1.ErrorCode_name {
		if num == 0 {
			continue
		}
		short := name[len("ERROR_CODE_"):]
		w, ok := words[short]
		switch {
		case !ok:
			t.Errorf("relay.js has no ErrorCode.%s (%d): run make web", short, num)
		case w == "" || w == generic:
			t.Errorf("ErrorCode.%s has no words of its own (%q)", short, w)
		case seen[w] != "":
			t.Errorf("ErrorCode.%s and %s read the same: %q", short, seen[w], w)
		}
		seen[w] = short
	}
}

// BenchmarkBrowserRoundTrip measures, in one run, the round trip of a
// durable event from a page in headless Chromium through the edge to a
// native Go device over QUIC and back, over WebTransport and over the
// WebSocket. The page times it (performance.now, precise because the
// page is cross-origin isolated):
//
//   - ack: send until the edge's ack, which waits for the native
//     device's receipt (browser -> edge -> native -> edge -> browser);
//
//   - echo: send until the native device's answer (an event of its own)
//     reaches the page.
//
//     go test -run '^$' -bench BrowserRoundTrip -benchtime 2000x ./edge/web/
func BenchmarkBrowserRoundTrip(b *testing.B) {
	ctx := browser(b)
	r := relaytest.Start(b, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
		cfg.AdminAddr = "127.0.0.1:0"
		cfg.Session.Limits.EventsPerSecond = 1e6 // the page sends as fast as it can
	}})
	edge := r.Edges[0]
	user := r.User("bench")
	native := r.Device(user, "native")
	page := r.Device(user, "page")
	phone := r.Dial(0, native, client.QUIC)

	// The native device answers every "ping" with an "echo".
	echoCtx, stopEcho := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			ev, err := phone.Receive(echoCtx)
			if err != nil {
				return
			}
			if ev.Type != "ping" {
				continue
			}
			if err := phone.Send(echoCtx, client.Message{Targets: []string{ev.Sender}, Type: "echo", Payload: ev.Payload}); err != nil && echoCtx.Err() == nil {
				b.Errorf("echo: %v", err)
				return
			}
		}
	})
	b.Cleanup(func() { stopEcho(); wg.Wait() })

	do(ctx, b, "open the page", chromedp.Navigate(edge.AdminURL()+"/"))
	if isolated, err := chromedp.Run(ctx, chromedp.Evaluate[bool](`crossOriginIsolated`)); err != nil || !isolated {
		b.Fatalf("the page is not cross-origin isolated (%v): its timers are coarse", err)
	}

	for _, transport := range []string{"webtransport", "websocket"} {
		b.Run(transport, func(b *testing.B) {
			// Connect (not timed), and wait until the native device is
			// online for the page.
			connectPage(b, ctx, edge, page, transport, "bench", nil, native.ID)
			run := fmt.Sprintf(`(async (target, n) => {
				const c = window.bench;
				let answered = null;
				const onEvent = (e) => { if (e.detail.type === "echo" && answered) answered(); };
				c.addEventListener("event", onEvent);
				const ack = [], echo = [];
				for (let i = 0; i < n; i++) {
					const got = new Promise((r) => { answered = r; });
					const t0 = performance.now();
					await c.send({ targets: [target], type: "ping", payload: String(i) });
					ack.push(performance.now() - t0);
					await got;
					echo.push(performance.now() - t0);
				}
				c.removeEventListener("event", onEvent);
				c.close();
				return { ack, echo };
			})(%q, %d)`, native.ID, b.N)
			b.ResetTimer()
			tctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
			defer cancel()
			res, err := chromedp.Run(tctx, chromedp.Evaluate[struct{ Ack, Echo []float64 }](run, chromedp.EvalAwaitPromise))
			b.StopTimer()
			if err != nil {
				b.Fatalf("round trips over %s: %v", transport, err)
			}
			if len(res.Echo) != b.N {
				b.Fatal(errors.New("the page measured fewer round trips than asked"))
			}
			for _, m := range []struct {
				name string
				ms   []float64
			}{{"ack", res.Ack}, {"echo", res.Echo}} {
				slices.Sort(m.ms)
				b.ReportMetric(1000*m.ms[len(m.ms)/2], m.name+"-p50-us")
				b.ReportMetric(1000*m.ms[len(m.ms)*99/100], m.name+"-p99-us")
			}
		})
	}
}
