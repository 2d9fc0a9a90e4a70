// Package web serves the relay's browser side, embedded in the edge
// binary: relay.js (the JavaScript client, an ES module usable on its
// own) and the device console page. The TypeScript sources are under
// src/; `make web` (npm, pinned in package-lock.json) regenerates the
// protobuf code and the bundles in dist/, which are committed, so the Go
// build never needs npm. TestBundleIsFresh fails when the sources changed
// and dist/ was not rebuilt.
package web

import (
	"embed"
	"io/fs"
	"net/http"
	"strings"
)

//go:embed dist
var dist embed.FS

// files are the bundled files: index.html, console.js, relay.js,
// favicon.svg.
func files() fs.FS {
	sub, err := fs.Sub(dist, "dist")
	if err != nil {
		panic(err) // the embedded tree always has dist/
	}
	return sub
}

// ContentSecurityPolicy is the console page's policy: scripts and styles
// from the edge only, connections to any edge (WebTransport may go to
// another address than the page's), no framing, no <base>, no form
// posted elsewhere.
const ContentSecurityPolicy = "default-src 'self'; connect-src 'self' https: wss: ws:; style-src 'self' 'unsafe-inline'; " +
	"frame-ancestors 'none'; base-uri 'none'; form-action 'self'"

// Handler serves the console page at "/" and the scripts beside it. The
// page is cross-origin isolated (COOP/COEP), which gives it precise
// timers for latency figures and still allows WebTransport.
func Handler() http.Handler {
	serve := http.FileServerFS(files())
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/", "/index.html", "/console.js", "/relay.js", "/favicon.svg":
		case "/favicon.ico":
			// Browsers ask for it whatever the page's link says.
			r.URL.Path = "/favicon.svg"
		default:
			http.NotFound(w, r)
			return
		}
		h := w.Header()
		h.Set("Cross-Origin-Opener-Policy", "same-origin")
		h.Set("Cross-Origin-Embedder-Policy", "require-corp")
		h.Set("Cross-Origin-Resource-Policy", "same-origin")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Cache-Control", "no-cache")
		if strings.HasSuffix(r.URL.Path, ".js") {
			h.Set("Content-Type", "text/javascript; charset=utf-8")
			// relay.js may be loaded by pages of other origins.
			if r.URL.Path == "/relay.js" {
				h.Set("Access-Control-Allow-Origin", "*")
				h.Set("Cross-Origin-Resource-Policy", "cross-origin")
			}
		} else {
			// No framing (the console's buttons under another site's
			// page), no <base> or form target elsewhere: neither
			// base-uri nor form-action falls back to default-src.
			h.Set("Content-Security-Policy", ContentSecurityPolicy)
			h.Set("X-Frame-Options", "DENY")
		}
		serve.ServeHTTP(w, r)
	})
}
