package api_test

import (
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/internal/connbound"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

// guardServer serves Guard over a connbound listener, as the API port
// does, in front of a handler that trusts the connection of a GET
// /trust (as a call that passed authentication would) and holds a
// public call carrying "Hold: 1" until the test ends.
func guardServer(t *testing.T, limits api.Limits) (url string, held <-chan struct{}) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	release, holding := make(chan struct{}), make(chan struct{}, 8)
	next := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/trust" {
			c, _ := connbound.FromContext(r.Context())
			c.Trust()
			return
		}
		if r.Header.Get("Hold") != "" {
			holding <- struct{}{}
			<-release
		}
	})
	a := api.NewAuthenticator(nil, api.AuthConfig{})
	var protos http.Protocols
	protos.SetUnencryptedHTTP2(true)
	srv := &http.Server{Handler: a.Guard(next, limits), ConnContext: connbound.ContextWithConn, Protocols: &protos}
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(connbound.NewListener(ln, connbound.Config{MaxPending: 64, MaxTrusted: 64}))
	}()
	t.Cleanup(func() {
		close(release)
		_ = srv.Close()
		<-served
	})
	return "http://" + ln.Addr().String(), holding
}

// With the node's one serving slot taken by a stranger's call, another
// stranger's is refused, and so is a call an edge passes on for a
// browser (X-Forwarded-For, with or without the edge's token), while the
// edge's own call on its trusted connection is served from the reserve.
func TestOnlyAnEdgesOwnCallsTakeTheReserve(t *testing.T) {
	done := make(chan struct{})
	t.Cleanup(func() { <-done }) // after the server's cleanup lets the held call go
	url, holding := guardServer(t, api.Limits{MaxUnauthenticated: 1})
	refresh := url + controlv1connect.AuthServiceRefreshProcedure
	stranger := clientFrom(t, "127.0.0.2")
	go func() {
		defer close(done)
		req, _ := http.NewRequest(http.MethodPost, refresh, strings.NewReader("{}"))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Hold", "1")
		if resp, err := stranger.Do(req); err == nil {
			resp.Body.Close()
		}
	}()
	select {
	case <-holding:
	case <-time.After(30 * time.Second):
		t.Fatal("the first call never reached the handler")
	}
	if status, ce := postJSON(t, clientFrom(t, "127.0.0.3"), refresh, strings.NewReader("{}"), nil); status == http.StatusOK || !strings.Contains(ce.Message, "in flight on this node") {
		t.Errorf("a second stranger's call: %d %+v; want refused, in flight", status, ce)
	}

	edge := clientFrom(t, "127.0.0.4")
	req, _ := http.NewRequest(http.MethodGet, url+"/trust", nil)
	resp, err := edge.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	for _, header := range []map[string]string{
		{"X-Forwarded-For": "192.0.2.7"},
		{"X-Forwarded-For": "192.0.2.7", api.ForwardedByHeader: "Bearer not-verified", api.ForwardedForHeader: "192.0.2.7"},
	} {
		if status, ce := postJSON(t, edge, refresh, strings.NewReader("{}"), header); status == http.StatusOK || !strings.Contains(ce.Message, "in flight on this node") {
			t.Errorf("a call the edge passes on (%v): %d %+v; want refused, in flight", header, status, ce)
		}
	}
	if status, ce := postJSON(t, edge, refresh, strings.NewReader("{}"), nil); status != http.StatusOK {
		t.Errorf("the edge's own call on its trusted connection: %d %+v; want served", status, ce)
	}
}
