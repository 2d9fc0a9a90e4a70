package web_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/edge/session"
	"github.com/edge-relay/relay/internal/relaytest"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// relay.js's frame reader, on streams made in the page: frames come out
// whole whichever way the stream cuts them, a frame longer than the
// reader's limit is refused from its length before its body is read, a
// length prefix that does not end is malformed, and a stream that ends
// inside a frame ends the reading. Then through a real edge whose frame
// limit is above relay.js's default: over WebTransport the page receives
// and sends an event that only the Welcome's limit allows.
func TestRelayJSReadsFramesWithinTheEdgesLimit(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
		cfg.AdminAddr = "127.0.0.1:0"
		cfg.Session.Limits = session.DefaultLimits()
		cfg.Session.Limits.MaxFrameBytes, cfg.Session.Limits.MaxPayloadBytes = 256<<10, 200<<10
	}})
	ctx := browser(t)
	do(ctx, t, "open the page", chromedp.Navigate(r.Edges[0].AdminURL()+"/"))

	got := eval[map[string]string](ctx, t, `(async () => {
		const m = await import("/relay.js");
		const frame = (n, fill) => {
			const head = [];
			for (let v = n; ; v = Math.floor(v / 128)) {
				if (v < 128) { head.push(v); break; }
				head.push((v & 127) | 128);
			}
			const f = new Uint8Array(head.length + n);
			f.set(head);
			f.fill(fill, head.length);
			return f;
		};
		const concat = (parts) => {
			const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
			let off = 0;
			for (const p of parts) { out.set(p, off); off += p.length; }
			return out;
		};
		// A stream of chunks, read by a FrameReader with limit max; pulls
		// counts the chunks the reader took.
		const reading = (chunks, max) => {
			const s = { pulls: 0 };
			let i = 0;
			const stream = new ReadableStream({
				pull(c) {
					if (i < chunks.length) { s.pulls++; c.enqueue(chunks[i++]); } else c.close();
				},
			}, { highWaterMark: 0 });
			s.r = new m.FrameReader(stream.getReader(), max);
			return s;
		};
		const readAll = async (s) => {
			const out = [];
			for (;;) {
				let f;
				try { f = await s.r.next(); } catch (e) { out.push(e.name + " " + e.code); return out.join(","); }
				if (f === null) { out.push("end"); return out.join(","); }
				out.push(f.length + ":" + (f.length ? f[0] + "-" + f[f.length - 1] : ""));
			}
		};
		const bytes = concat([frame(0, 0), frame(3, 1), frame(300, 2), frame(70000, 3), frame(5, 4)]);
		const out = {};
		out.whole = await readAll(reading([bytes], 80000));
		out.byteByByte = await readAll(reading(Array.from(bytes, (b) => Uint8Array.of(b)), 80000));
		out.inThrees = await readAll(reading(Array.from({ length: Math.ceil(bytes.length / 3) }, (_, i) => bytes.subarray(3 * i, 3 * i + 3)), 80000));
		// Over the limit: refused from the length, the body's 100 chunks unread.
		const big = frame(80001, 5);
		const tooLarge = reading([big.subarray(0, 3), ...Array.from({ length: 100 }, () => new Uint8Array(800))], 80000);
		out.tooLarge = await readAll(tooLarge) + " after " + tooLarge.pulls + " chunks";
		out.unending = await readAll(reading([new Uint8Array(11).fill(0x80)], 80000));
		out.cutShort = await readAll(reading([frame(3, 1), frame(300, 2).subarray(0, 100)], 80000));
		// A stream that gives its chunks, each after a pause, then stays
		// open and silent (or ends), read with a frame timeout.
		const pausing = (chunks, pauseMs, timeoutMs, end = false) => {
			let i = 0;
			const stream = new ReadableStream({
				pull(c) {
					if (i >= chunks.length) {
						if (end) { c.close(); return; }
						return new Promise(() => {}); // silent, not ended
					}
					const chunk = chunks[i++];
					return new Promise((done) => setTimeout(() => { c.enqueue(chunk); done(); }, pauseMs));
				},
			}, { highWaterMark: 0 });
			return { r: new m.FrameReader(stream.getReader(), 80000, timeoutMs) };
		};
		const f300 = frame(300, 2);
		out.stalled = await readAll(pausing([frame(3, 1), f300.subarray(0, 100)], 0, 200));
		out.stalledInPrefix = await readAll(pausing([Uint8Array.of(0x80)], 0, 200));
		// Three pieces 50 ms apart, within a bound of 10 s: read; the
		// frame before it, with the silence before its first byte, too.
		out.slowWithin = await readAll(pausing([frame(3, 1), f300.subarray(0, 1), f300.subarray(1, 100), f300.subarray(100)], 50, 10000, true));
		out.bounds = [0, -1, 1, 2500, 1e12].map((ms) => m.frameTimeoutMs(ms)).join(",");
		return out;
	})()`)
	want := map[string]string{
		"whole":      "0:,3:1-1,300:2-2,70000:3-3,5:4-4,end",
		"byteByByte": "0:,3:1-1,300:2-2,70000:3-3,5:4-4,end",
		"inThrees":   "0:,3:1-1,300:2-2,70000:3-3,5:4-4,end",
		"tooLarge":   fmt.Sprintf("RelayError %d after 1 chunks", relayv1.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE),
		"unending":   fmt.Sprintf("RelayError %d", relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME),
		"cutShort":   "3:1-1,end",
		// A frame the edge stalls in fails TIMEOUT after the frames before
		// it; one that comes slowly within the bound is read.
		"stalled":         fmt.Sprintf("3:1-1,RelayError %d", relayv1.ErrorCode_ERROR_CODE_TIMEOUT),
		"stalledInPrefix": fmt.Sprintf("RelayError %d", relayv1.ErrorCode_ERROR_CODE_TIMEOUT),
		"slowWithin":      "3:1-1,300:2-2,end",
		"bounds":          "10000,10000,100,2500,3600000",
	}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("%s: got %q, want %q", k, got[k], w)
		}
	}

	// Through the edge: 190 KiB each way, over relay.js's default limit of
	// 64 KiB and within the edge's 256 KiB.
	user := r.User("large")
	pageDev, rxDev := r.Device(user, "page"), r.Device(user, "rx")
	rx := r.Dial(0, rxDev, client.QUIC)
	connectPage(t, ctx, r.Edges[0], pageDev, "webtransport", "c", nil, rxDev.ID)
	eval[bool](ctx, t, `(() => {
		window.got = [];
		window.c.addEventListener("event", (e) => got.push(e.detail.payload.length + ":" + e.detail.payload[0]));
		return true;
	})()`)
	const size = 190 << 10
	sctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	big := make([]byte, size)
	big[0] = 7
	if err := rx.Send(sctx, client.Message{Targets: []string{pageDev.ID}, Payload: big}); err != nil {
		t.Fatalf("send %d bytes to the page: %v", size, err)
	}
	waitJS(ctx, t, "the page has the large event", `got.length > 0`)
	if got := eval[[]string](ctx, t, `got`); !slices.Equal(got, []string{fmt.Sprintf("%d:7", size)}) {
		t.Fatalf("the page received %q, want one event of %d bytes", got, size)
	}
	sent := eval[string](ctx, t, fmt.Sprintf(`(async () => {
		const p = new Uint8Array(%d);
		p[0] = 9;
		await window.c.send({ targets: [%q], payload: p });
		return window.c.transport;
	})()`, size, rxDev.ID))
	if sent != "webtransport" {
		t.Fatalf("the page's large send went over %q, want webtransport throughout", sent)
	}
	ev, err := rx.Receive(sctx)
	if err != nil || len(ev.Payload) != size || ev.Payload[0] != 9 {
		t.Fatalf("received %d bytes (%v), want the page's %d", len(ev.Payload), err, size)
	}
}
