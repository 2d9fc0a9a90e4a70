package transport

import (
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
)

// OriginPolicy says which web pages may open WebTransport and WebSocket
// sessions. Devices prove themselves with their keys, not with ambient
// credentials, but a page on a foreign origin could still drive a
// device's key that a page of this relay stored in the browser, or load
// the edge on a user's behalf; so by default only the edge's own page is
// admitted, and other origins are listed explicitly. A request without
// an Origin header comes from no page (a native client) and is admitted.
type OriginPolicy struct {
	// Allowed lists further origins exactly as browsers send them
	// ("https://app.example", "http://localhost:5173"); "*" admits every
	// page and must be asked for explicitly.
	Allowed []string
	// Pages are the scheme and port the edge serves its own page on
	// ({"https", ""}: the port the session request went to, as an edge
	// serves HTTPS on its UDP port's number; {"http", "7444"}: an admin
	// port). A page there, on the host the session request went to or one
	// of Hosts, is the edge's own.
	Pages []Page
	// Hosts are further names the edge's page is reached by (its public
	// address's host; "localhost" for an edge on the loopback).
	Hosts []string
}

// Page is where an edge serves its console page.
type Page struct {
	Scheme string // "https" or "http"
	Port   string // "": the port of the session request
}

// allows reports whether the request's page may open a session. Scheme,
// host and port are all compared.
func (p OriginPolicy) allows(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return true
	}
	if slices.Contains(p.Allowed, "*") {
		return true
	}
	u, err := url.Parse(origin)
	if err != nil || u.Host == "" || u.Path != "" || u.User != nil || (u.Scheme != "https" && u.Scheme != "http") {
		return false // "null" (a sandboxed page, a file) and anything unlike an origin
	}
	scheme, host, port := u.Scheme, strings.ToLower(u.Hostname()), u.Port()
	if port == "" {
		port = map[string]string{"https": "443", "http": "80"}[scheme]
	}
	canonical := scheme + "://" + net.JoinHostPort(host, port)
	for _, a := range p.Allowed {
		if sameOrigin(a, canonical) {
			return true
		}
	}
	// Session requests always arrive over TLS: no port means 443.
	reqHost, reqPort := r.Host, "443"
	if h, p, err := net.SplitHostPort(reqHost); err == nil {
		reqHost, reqPort = h, p
	}
	if !slices.ContainsFunc(p.Pages, func(pg Page) bool {
		return pg.Scheme == scheme && (pg.Port == port || (pg.Port == "" && reqPort == port))
	}) {
		return false
	}
	if strings.EqualFold(strings.Trim(reqHost, "[]"), host) {
		return true
	}
	return slices.ContainsFunc(p.Hosts, func(h string) bool { return strings.EqualFold(strings.Trim(h, "[]"), host) })
}

// sameOrigin compares a configured origin with a canonical one
// (scheme://host:port, port always given).
func sameOrigin(configured, canonical string) bool {
	u, err := url.Parse(configured)
	if err != nil || u.Host == "" {
		return false
	}
	port := u.Port()
	if port == "" {
		port = map[string]string{"https": "443", "http": "80"}[u.Scheme]
	}
	return strings.EqualFold(u.Scheme+"://"+net.JoinHostPort(u.Hostname(), port), canonical)
}
