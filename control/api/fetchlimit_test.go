package api_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/server"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
)

// heldFetch starts a FetchMailbox call from src whose request body does
// not come until finish is called: it holds its place on the node while
// the handler waits for the body.
func heldFetch(t *testing.T, nodeURL, src, token, device string) (finish func() (*edgev1.FetchMailboxResponse, error)) {
	t.Helper()
	pr, pw := io.Pipe()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, nodeURL+edgev1connect.MailboxServiceFetchMailboxProcedure, pr)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/proto")
	req.Header.Set("Authorization", "Bearer "+token)
	type result struct {
		resp *http.Response
		err  error
	}
	done := make(chan result, 1)
	hc := clientFrom(t, src)
	go func() {
		resp, err := hc.Do(req)
		done <- result{resp, err}
	}()
	t.Cleanup(func() { cancel(); _ = pw.Close() })
	return func() (*edgev1.FetchMailboxResponse, error) {
		body, _ := proto.Marshal(&edgev1.FetchMailboxRequest{DeviceId: device})
		if _, err := pw.Write(body); err != nil {
			return nil, err
		}
		_ = pw.Close()
		r := <-done
		if r.err != nil {
			return nil, r.err
		}
		defer r.resp.Body.Close()
		b, err := io.ReadAll(r.resp.Body)
		if err != nil || r.resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("status %d: %s %v", r.resp.StatusCode, b, err)
		}
		var out edgev1.FetchMailboxResponse
		return &out, proto.Unmarshal(b, &out)
	}
}

// A node serves at most MailboxFetches.Max fetches at once, a source at
// most a quarter of them: one beyond waits for the Wait, then is answered
// unavailable (the edge fetches from another node); calls from other
// sources go on while one source holds its share, and every place comes
// back once the calls holding them end.
func TestMailboxFetchesAreBoundedPerNodeAndSource(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{Configure: func(cfg *server.Config) {
		cfg.MailboxFetches = api.FetchLimits{Max: 4, Wait: 100 * time.Millisecond} // a source: 1
	}})
	mailboxUsers(t, c)
	token := c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	n := c.Nodes[0]
	cl := mailboxClient(t, n, token)
	put(t, cl, entry("alice", "a1", "e1", 10, time.Now().Add(time.Hour)))
	fetchFrom := func(src string) error {
		fc := edgev1connect.NewMailboxServiceClient(clientFrom(t, src), url(n), connect.WithInterceptors(bearer(token)))
		resp, err := fc.FetchMailbox(ctxT(t, 30*time.Second), connect.NewRequest(&edgev1.FetchMailboxRequest{DeviceId: "a1"}))
		if err == nil && ids(resp.Msg.GetEntries()) != "1:e1" {
			err = fmt.Errorf("fetched %s", ids(resp.Msg.GetEntries()))
		}
		return err
	}
	refused := func(src string) error {
		if err := fetchFrom(src); connect.CodeOf(err) != connect.CodeUnavailable {
			return fmt.Errorf("a fetch from %s: %v, want unavailable", src, err)
		}
		return nil
	}

	// 127.0.0.1 holds its one place: its next call is refused (once the
	// held call is in), another source's is served.
	first := heldFetch(t, url(n), "127.0.0.1", token, "a1")
	clustertest.Eventually(t, 30*time.Second, func() error { return refused("127.0.0.1") })
	if err := fetchFrom("127.0.0.2"); err != nil {
		t.Fatalf("another source while one holds its share: %v", err)
	}
	// Three more sources hold the node's other places: a fifth is refused.
	var held []func() (*edgev1.FetchMailboxResponse, error)
	for i := 2; i <= 4; i++ {
		held = append(held, heldFetch(t, url(n), fmt.Sprint("127.0.0.", i), token, "a1"))
	}
	clustertest.Eventually(t, 30*time.Second, func() error { return refused("127.0.0.5") })
	// The held calls are answered once their bodies come, and the places
	// come back.
	for _, finish := range append(held, first) {
		if resp, err := finish(); err != nil || ids(resp.GetEntries()) != "1:e1" {
			t.Fatalf("a held fetch: %v, %v", resp, err)
		}
	}
	for _, src := range []string{"127.0.0.1", "127.0.0.5"} {
		if err := fetchFrom(src); err != nil {
			t.Fatalf("from %s once the places came back: %v", src, err)
		}
	}
	if v := counterValue(t, n, "relay_control_mailbox_fetches_refused_total"); v < 2 {
		t.Fatalf("relay_control_mailbox_fetches_refused_total = %v, want the refusals counted", v)
	}
}
