package relaytest

import (
	"net/http"
	"net/http/httptest"

	"github.com/edge-relay/relay/control/clustertest"
)

// ServeH2C serves h over HTTP/1 and cleartext HTTP/2 (what an edge speaks
// to the control plane on http:// URLs) until the test ends, and returns
// its URL: a stand-in control node for tests of the edge's side.
func ServeH2C(t clustertest.TB, h http.Handler) string {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	p.SetHTTP1(true)
	srv := httptest.NewUnstartedServer(h)
	srv.Config.Protocols = &p
	srv.Start()
	t.Cleanup(srv.Close)
	return srv.URL
}
