package web_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/internal/relaytest"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// A page's listener that closes the client on an event still has that
// event acknowledged, in the goodbye: the next client of the device (the
// page loaded again) is not given it a second time, and is given every
// event the first one was not.
func TestRelayJSAcknowledgesWhatItGaveBeforeItsGoodbye(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) { cfg.AdminAddr = "127.0.0.1:0" }})
	ctx := browser(t)
	do(ctx, t, "open the page", chromedp.Navigate(r.Edges[0].AdminURL()+"/"))
	user := r.User("closer")
	pageDev, txDev := r.Device(user, "page"), r.Device(user, "tx")
	tx := r.Dial(0, txDev, client.QUIC)
	for _, tr := range []string{"webtransport", "websocket"} {
		t.Run(tr, func(t *testing.T) {
			connectPage(t, ctx, r.Edges[0], pageDev, tr, "c", nil, txDev.ID)
			eval[bool](ctx, t, `(() => {
				window.got = [];
				window.c.addEventListener("event", (e) => { got.push(e.detail.id); if (got.length === 1) window.c.close(); });
				return true;
			})()`)
			sctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			ids := make([]string, 5)
			for i := range ids {
				ids[i] = fmt.Sprintf("%s-%d", tr, i+1)
				for {
					err := tx.Send(sctx, client.Message{ID: ids[i], Targets: []string{pageDev.ID}, Payload: []byte("x")})
					var ce *client.Error
					if errors.As(err, &ce) && ce.Code == relayv1.ErrorCode_ERROR_CODE_TARGET_OFFLINE {
						// Routed to the page's session as it closed (its
						// listener closes it on the first event): refused,
						// not delivered; sent again, as the code says, it
						// goes to the mailbox.
						continue
					}
					if err != nil {
						t.Fatalf("send %s: %v", ids[i], err)
					}
					break
				}
			}
			waitJS(ctx, t, "the first client has its one event", `got.length === 1`)
			first := eval[[]string](ctx, t, `got`)
			connectPage(t, ctx, r.Edges[0], pageDev, tr, "c2", nil, "")
			eval[bool](ctx, t, `(() => {
				window.got2 = [];
				window.c2.addEventListener("event", (e) => got2.push(e.detail.id));
				return true;
			})()`)
			// In order from the mailbox: had the first come again, it
			// would come before the last.
			waitJS(ctx, t, "the second client has the last event", fmt.Sprintf(`got2.includes(%q)`, ids[4]))
			second := eval[[]string](ctx, t, `(() => { window.c2.close(); return got2; })()`)
			if slices.Contains(second, first[0]) {
				t.Fatalf("%s, given to the first client before it closed, came again: %v", first[0], second)
			}
			if all := slices.Concat(first, second); !slices.Equal(all, ids) {
				t.Fatalf("the two clients were given %v then %v, want each of %v once", first, second, ids)
			}
		})
	}
}
