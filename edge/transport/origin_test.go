package transport

import (
	"net/http/httptest"
	"testing"
)

// WebTransport and the WebSocket admit the same origins.
func TestOriginAllowed(t *testing.T) {
	app := []string{"https://app.example"}
	for _, c := range []struct {
		allowed      []string
		origin, host string
		want         bool
	}{
		{nil, "https://evil.example", "edge.example:443", true},
		{[]string{"*"}, "https://evil.example", "edge.example:443", true},
		{app, "https://app.example", "edge.example:443", true},
		{app, "http://app.example", "edge.example:443", false}, // another scheme is another origin
		{app, "https://evil.example", "edge.example:443", false},
		{app, "https://edge.example:443", "edge.example:443", true}, // a page the edge served
		{app, "", "edge.example:443", true},                         // a native client
		{app, "null", "edge.example:443", false},
	} {
		r := httptest.NewRequest("GET", "https://"+c.host+"/relay/v1/ws", nil)
		r.Host = c.host
		if c.origin != "" {
			r.Header.Set("Origin", c.origin)
		}
		if got := originAllowed(c.allowed, r); got != c.want {
			t.Errorf("allowed %v, origin %q, host %s: %v, want %v", c.allowed, c.origin, c.host, got, c.want)
		}
	}
}
