package web_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
)

// stallProxy passes TCP connections on to an address until Stall: from
// then on the connections it carries pass nothing either way, and stay
// open, as on a path that died without a FIN or a reset (a half-open
// connection). Connections made after Stall pass again.
type stallProxy struct {
	ln     net.Listener
	target string
	done   chan struct{}
	wg     sync.WaitGroup

	mu      sync.Mutex // guards the fields below
	stalled chan struct{}
	conns   []net.Conn
}

// newStallProxy listens on 127.0.0.1 for target, until the test ends.
func newStallProxy(t *testing.T, target string) *stallProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &stallProxy{ln: ln, target: target, done: make(chan struct{}), stalled: make(chan struct{})}
	p.wg.Go(p.accept)
	t.Cleanup(func() {
		close(p.done)
		_ = ln.Close()
		p.mu.Lock()
		for _, c := range p.conns {
			_ = c.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return p
}

func (p *stallProxy) Addr() string { return p.ln.Addr().String() }

// Stall silences the connections open now.
func (p *stallProxy) Stall() {
	p.mu.Lock()
	defer p.mu.Unlock()
	close(p.stalled)
	p.stalled = make(chan struct{})
}

func (p *stallProxy) accept() {
	for {
		in, err := p.ln.Accept()
		if err != nil {
			return
		}
		out, err := net.Dial("tcp", p.target)
		if err != nil {
			_ = in.Close()
			continue
		}
		p.mu.Lock()
		stalled := p.stalled
		p.conns = append(p.conns, in, out)
		p.mu.Unlock()
		p.wg.Go(func() { p.pass(in, out, stalled) })
		p.wg.Go(func() { p.pass(out, in, stalled) })
	}
}

// pass copies from src to dst until either ends, or, once stalled, drops
// what comes and holds both open until the test ends.
func (p *stallProxy) pass(src, dst net.Conn, stalled <-chan struct{}) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		select {
		case <-stalled:
			<-p.done
			return
		default:
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				if tc, ok := dst.(*net.TCPConn); ok {
					_ = tc.CloseWrite()
				}
			}
			return
		}
	}
}

// A WebSocket whose edge goes silent (the path dies without closing the
// connection) is given up once idleTimeoutMs passed without a frame,
// there and then, with TIMEOUT: not a minute later, when Chromium gives
// up waiting for the edge's answer to its close. The page reconnects.
func TestRelayJSGivesUpASilentWebSocketAtOnce(t *testing.T) {
	g := newPageRig(t, "silent", nil)
	p := newStallProxy(t, strings.TrimPrefix(g.edge.AdminURL(), "http://"))
	const idleMs = 2000
	connectPage(t, g.ctx, g.edge, g.pageDev, "websocket", "c",
		map[string]any{"webSocketUrl": "ws://" + p.Addr() + "/relay/v1/ws", "idleTimeoutMs": idleMs}, "")
	eval[bool](g.ctx, t, `(() => {
		window.states = [];
		window.c.addEventListener("state", (e) => states.push({ connected: e.detail.connected, code: e.detail.reason?.code ?? null, at: performance.now() }));
		return true;
	})()`)
	p.Stall()
	stalledAt := eval[float64](g.ctx, t, `performance.now()`)
	waitJS(g.ctx, t, "the page gave the silent edge up", `states.length > 0`)
	type state struct {
		Connected bool
		Code      *int
		At        float64
	}
	first := eval[state](g.ctx, t, `states[0]`)
	if first.Connected || first.Code == nil || *first.Code != 24 { // ERROR_CODE_TIMEOUT
		t.Fatalf("the first state after the edge went silent: %+v, want disconnected with TIMEOUT (24)", first)
	}
	// The edge is silent from the stall on, and was heard up to a ping
	// interval before: idleMs plus two ping intervals at most, and some
	// slack for a loaded machine.
	if took := first.At - stalledAt; took > idleMs+2*idleMs/3+3000 {
		t.Fatalf("the silent edge was given up %.0f ms after it went silent, want about %d", took, idleMs)
	}
	waitJS(g.ctx, t, "the page reconnected", `states.at(-1).connected === true`)
}

// hangingServer answers no request: each waits until its client gives it
// up. It reports each as it comes (started) and as the client gives it up
// (abandoned), by path.
type hangingServer struct {
	*httptest.Server
	started, abandoned chan string
}

func newHangingServer(t *testing.T) *hangingServer {
	t.Helper()
	h := &hangingServer{started: make(chan string, 16), abandoned: make(chan string, 16)}
	quit := make(chan struct{})
	h.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.started <- r.URL.Path
		select {
		case <-r.Context().Done():
			h.abandoned <- r.URL.Path
		case <-quit: // the test ended
		}
	}))
	t.Cleanup(func() { close(quit); h.Close() })
	return h
}

// hangingQUIC is an HTTP/3 endpoint that completes QUIC handshakes and
// then says nothing: a WebTransport session's CONNECT is never answered.
// (Chromium keeps the QUIC connection of a session it gives up, for
// reuse: the endpoint cannot tell.) hash is its certificate's SHA-256,
// for serverCertificateHashes.
type hangingQUIC struct {
	ln   *quic.Listener
	hash []byte
}

func newHangingQUIC(t *testing.T) *hangingQUIC {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	// Chromium takes a pinned certificate valid for less than 14 days.
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(10 * 24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(der)
	ln, err := quic.ListenAddr("127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, NextProtos: []string{"h3"}},
		&quic.Config{MaxIdleTimeout: time.Minute, EnableDatagrams: true})
	if err != nil {
		t.Fatal(err)
	}
	var (
		wg    sync.WaitGroup
		conns []*quic.Conn // owned by the accepting goroutine until it ends
	)
	wg.Go(func() {
		for {
			conn, err := ln.Accept(context.Background())
			if err != nil {
				return
			}
			conns = append(conns, conn)
		}
	})
	t.Cleanup(func() {
		_ = ln.Close()
		wg.Wait()
		for _, c := range conns {
			_ = c.CloseWithError(0, "")
		}
	})
	return &hangingQUIC{ln: ln, hash: sum[:]}
}

// The handshake's 10 s are for all of it: once they are up, what the
// attempt still waits for is given up, not left running: the fetch of the
// certificate hashes (its signal aborts), the WebSocket's dial (its
// server sees it closed) and WebTransport's (closed), each against
// something that never answers. connect() rejects with TIMEOUT.
func TestRelayJSHandshakeTimeoutStopsWhatItWaitsFor(t *testing.T) {
	g := newPageRig(t, "hanging", nil)
	h := newHangingServer(t)
	q := newHangingQUIC(t)
	// TCP that never answers: an HTTPS fetch to it waits.
	tarpit, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tarpit.Close() })
	eval[bool](g.ctx, t, fmt.Sprintf(`(() => {
		window.wtClosed = 0;
		const WT = window.WebTransport;
		window.WebTransport = class extends WT { close(...a) { window.wtClosed++; return super.close(...a); } };
		window.fetchSignals = [];
		const f = window.fetch;
		window.fetch = (url, init) => { fetchSignals.push(init?.signal); return f(url, init); };
		window.outcome = {};
		const connect = async (name, opts) => {
			const m = await import("/relay.js");
			const key = (await m.generateDeviceKey()).privateKey;
			try {
				await m.RelayClient.connect({ userId: "u", deviceId: "d", key, ...opts });
				outcome[name] = "connected";
			} catch (e) {
				outcome[name] = e.name + " " + e.code + " " + e.message;
			}
		};
		connect("hashes", { edge: %[1]q, transport: "webtransport", certHashesUrl: %[2]q });
		connect("websocket", { edge: %[1]q, transport: "websocket", certHashes: [], webSocketUrl: %[3]q });
		connect("webtransport", { edge: %[1]q, transport: "webtransport", certHashes: [m_unb64(%[4]q)] });
		function m_unb64(s) { return Uint8Array.from(atob(s), (c) => c.charCodeAt(0)); }
		return true;
	})()`, q.ln.Addr().String(), "https://"+tarpit.Addr().String()+"/hashes", "ws"+strings.TrimPrefix(h.URL, "http")+"/ws",
		base64.StdEncoding.EncodeToString(q.hash)))
	deadline := time.After(25 * time.Second)
	for _, want := range []struct {
		what string
		ch   <-chan string
	}{{"the WebSocket dial", h.started}, {"the WebSocket dial given up", h.abandoned}} {
		select {
		case p := <-want.ch:
			if p != "/ws" {
				t.Fatalf("%s: %s, want /ws", want.what, p)
			}
		case <-deadline:
			t.Fatalf("%s never reached the hanging server (outcomes %v)", want.what, eval[map[string]string](g.ctx, t, `window.outcome`))
		}
	}
	waitJS(g.ctx, t, "every connect() rejected", `Object.keys(outcome).length === 3`)
	for name, got := range eval[map[string]string](g.ctx, t, `window.outcome`) {
		if !strings.HasPrefix(got, "RelayError 24 ") { // ERROR_CODE_TIMEOUT
			t.Errorf("connect() %s: %q, want a RelayError TIMEOUT (24)", name, got)
		}
	}
	if got := eval[[]bool](g.ctx, t, `fetchSignals.map((s) => !!s?.aborted)`); !slices.Equal(got, []bool{true}) {
		t.Errorf("the certificate hashes' fetch: signals aborted %v, want one fetch, aborted", got)
	}
	if n := eval[int](g.ctx, t, `wtClosed`); n == 0 {
		t.Error("the WebTransport given up was never closed")
	}
}
