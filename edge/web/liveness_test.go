package web_test

import (
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
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
