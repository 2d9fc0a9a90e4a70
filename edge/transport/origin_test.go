package transport

import (
	"net/http/httptest"
	"testing"
)

// WebTransport and the WebSocket admit the same origins: the edge's own
// page by default, others only when listed, any only with "*"; scheme,
// host and port all count.
func TestOriginPolicy(t *testing.T) {
	own := []Page{{Scheme: "https"}, {Scheme: "http", Port: "7444"}}
	for _, c := range []struct {
		name         string
		policy       OriginPolicy
		origin, host string
		want         bool
	}{
		{"native client, no Origin", OriginPolicy{}, "", "edge.example:7443", true},
		{"foreign page, default", OriginPolicy{Pages: own}, "https://evil.example", "edge.example:7443", false},
		{"own page on https", OriginPolicy{Pages: own}, "https://edge.example:7443", "edge.example:7443", true},
		{"own page on the admin port", OriginPolicy{Pages: own}, "http://edge.example:7444", "edge.example:7443", true},
		{"own host, http on the https port", OriginPolicy{Pages: own}, "http://edge.example:7443", "edge.example:7443", false},
		{"own host, https on the admin port", OriginPolicy{Pages: own}, "https://edge.example:7444", "edge.example:7443", false},
		{"own host, another port", OriginPolicy{Pages: own}, "https://edge.example:8443", "edge.example:7443", false},
		{"own host, default port", OriginPolicy{Pages: own}, "https://edge.example", "edge.example:7443", false},
		{"own page on the default port", OriginPolicy{Pages: own}, "https://edge.example", "edge.example", true},
		{"host case", OriginPolicy{Pages: own}, "https://EDGE.example:7443", "edge.example:7443", true},
		{"another host on the page port", OriginPolicy{Pages: own}, "https://evil.example:7443", "edge.example:7443", false},
		{"a listed public name", OriginPolicy{Pages: own, Hosts: []string{"relay.example"}}, "https://relay.example:7443", "10.0.0.5:7443", true},
		{"localhost for a loopback edge", OriginPolicy{Pages: own, Hosts: []string{"localhost"}}, "http://localhost:7444", "127.0.0.1:7443", true},
		{"IPv6 page", OriginPolicy{Pages: own}, "https://[::1]:7443", "[::1]:7443", true},
		{"listed origin", OriginPolicy{Allowed: []string{"https://app.example"}}, "https://app.example", "edge.example:7443", true},
		{"listed origin, explicit default port", OriginPolicy{Allowed: []string{"https://app.example:443"}}, "https://app.example", "edge.example:7443", true},
		{"listed origin, other scheme", OriginPolicy{Allowed: []string{"https://app.example"}}, "http://app.example", "edge.example:7443", false},
		{"listed origin, other port", OriginPolicy{Allowed: []string{"https://app.example"}}, "https://app.example:8443", "edge.example:7443", false},
		{"star", OriginPolicy{Allowed: []string{"*"}}, "https://evil.example", "edge.example:7443", true},
		{"null origin", OriginPolicy{Pages: own}, "null", "edge.example:7443", false},
		{"origin with a path", OriginPolicy{Pages: own}, "https://edge.example:7443/x", "edge.example:7443", false},
		{"not http", OriginPolicy{Pages: own}, "chrome-extension://abc", "edge.example:7443", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := httptest.NewRequest("GET", "https://"+c.host+"/relay/v1/ws", nil)
			r.Host = c.host
			if c.origin != "" {
				r.Header.Set("Origin", c.origin)
			}
			if got := c.policy.allows(r); got != c.want {
				t.Errorf("origin %q to %s: %v, want %v", c.origin, c.host, got, c.want)
			}
		})
	}
}
