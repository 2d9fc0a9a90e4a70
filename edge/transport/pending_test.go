package transport_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/quic-go/webtransport-go"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/devconn"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/edge/session"
	"github.com/edge-relay/relay/edge/transport"
	"github.com/edge-relay/relay/internal/connbound"
	"github.com/edge-relay/relay/internal/relaytest"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

const (
	pendingQUIC        = "relay_edge_quic_pending_connections"
	pendingQUICEvicted = "relay_edge_quic_pending_evicted_total"
)

// flood opens QUIC connections to an edge from loopback addresses of its
// choosing (127.0.0.x: one UDP socket each), completes their handshakes
// and opens no stream on them: what anybody can do without an account.
type flood struct {
	t     *testing.T
	addr  *net.UDPAddr
	from  map[string]*quic.Transport
	conns []*quic.Conn
	// listed, if set, waits until the edge listed the n connections
	// opened so far as pending (or evicted others for them). The edge
	// lists a connection on a goroutine of its own once its handshake
	// completed, so on a busy machine one can be listed after the next:
	// a test of which one goes first must open the next after that.
	listed func(n int)
}

func newFlood(t *testing.T, addr string) *flood {
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	f := &flood{t: t, addr: ua, from: map[string]*quic.Transport{}}
	t.Cleanup(f.close)
	return f
}

// open opens one connection from src with the application protocol
// alpn (relay/1 or h3), and returns once its handshake is done.
func (f *flood) open(src, alpn string) *quic.Conn {
	f.t.Helper()
	tr := f.from[src]
	if tr == nil {
		udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.ParseIP(src)})
		if err != nil {
			f.t.Fatal(err)
		}
		tr = &quic.Transport{Conn: udp}
		f.from[src] = tr
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tlsConf := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{alpn}, MinVersion: tls.VersionTLS13} //nolint:gosec // a hostile client
	c, err := tr.Dial(ctx, f.addr, tlsConf, devconn.QUICConfig(time.Minute))
	if err != nil {
		f.t.Fatalf("connection %d from %s: %v", len(f.conns), src, err)
	}
	f.conns = append(f.conns, c)
	if f.listed != nil {
		f.listed(len(f.conns))
	}
	return c
}

// openFrom opens n connections from src, native and HTTP/3 in turn.
func (f *flood) openFrom(src string, n int) []*quic.Conn {
	f.t.Helper()
	var cs []*quic.Conn
	for i := range n {
		cs = append(cs, f.open(src, []string{devconn.ALPN, http3.NextProtoH3}[i%2]))
	}
	return cs
}

func (f *flood) close() {
	for _, c := range f.conns {
		_ = c.CloseWithError(0, "")
	}
	for _, tr := range f.from {
		_ = tr.Close()
		_ = tr.Conn.Close()
	}
	f.conns, f.from = nil, nil
}

// closedWith says how the edge closed c: its application error code, or
// an error if c is open or ended otherwise.
func closedWith(c *quic.Conn) (relayv1.ErrorCode, error) {
	select {
	case <-c.Context().Done():
	default:
		return 0, errors.New("open")
	}
	var ae *quic.ApplicationError
	if err := context.Cause(c.Context()); !errors.As(err, &ae) || !ae.Remote {
		return 0, fmt.Errorf("ended with %v, not closed by the edge", err)
	}
	return relayv1.ErrorCode(ae.ErrorCode), nil
}

// waitClosed waits until the edge has closed every one of cs with code.
func waitClosed(t *testing.T, what string, code relayv1.ErrorCode, cs []*quic.Conn) {
	t.Helper()
	clustertest.Eventually(t, 30*time.Second, func() error {
		for i, c := range cs {
			if got, err := closedWith(c); err != nil || got != code {
				return fmt.Errorf("%s, connection %d of %d: %v %v, want closed %v", what, i, len(cs), got, err, code)
			}
		}
		return nil
	})
}

// mustBeOpen fails unless every one of cs is open.
func mustBeOpen(t *testing.T, what string, cs []*quic.Conn) {
	t.Helper()
	for i, c := range cs {
		if code, err := closedWith(c); err == nil || err.Error() != "open" {
			t.Fatalf("%s, connection %d of %d: closed (%v, %v), want it open", what, i, len(cs), code, err)
		}
	}
}

// heapLive is the live heap: after two collections, since what sync.Pools
// hold survives one.
func heapLive() int64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapAlloc)
}

// Nothing bounded the QUIC connections an edge held before they became a
// session: a host that completes handshakes from its real address and
// opens no stream held each for the stream timeout, native or HTTP/3,
// as many as it opened (at 2,000 a second, some 20,000: gigabytes). The
// device port now holds at most MaxPendingQUIC, one source at most its
// share, closing the oldest (RATE_LIMITED when it is the source's own,
// GOING_AWAY when the edge's bound), those that never opened a session
// stream first; devices still get in, and what a flood held is freed
// once it is gone.
func TestPendingQUICConnectionsAreBounded(t *testing.T) {
	const limit = 64
	share := connbound.PerSourceShare(limit) // 16
	var logs relaytest.Buffer
	r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
		cfg.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
		cfg.MaxPendingQUIC = limit
		// Nothing here times out while the test runs, however slow the
		// machine: the bound alone closes what is closed.
		cfg.Session.HandshakeTimeout = 2 * time.Minute
		cfg.Session.Limits.FrameTimeout = 2 * time.Minute
		cfg.IdleTimeout = 2 * time.Minute
	}})
	e := r.Edges[0]
	gauge := func() float64 { return relaytest.Gauge(t, e, pendingQUIC, "", "") }
	evicted := func() float64 { return relaytest.Counter(t, e, pendingQUICEvicted, "", "") }
	waitPending := func(want float64, wantEvicted float64) {
		t.Helper()
		clustertest.Eventually(t, 30*time.Second, func() error {
			if g, ev := gauge(), evicted(); g != want || (wantEvicted >= 0 && ev != wantEvicted) {
				return fmt.Errorf("%v pending, %v evicted; want %v and %v", g, ev, want, wantEvicted)
			}
			return nil
		})
	}
	// Two devices relay natively and over WebTransport (once before the
	// flood, so that what a first session leaves, in caches and pools,
	// is in the baseline); their connections leave the pending list once
	// the hub admitted their sessions.
	u := r.User("through-a-flood")
	a, b := r.Device(u, "a"), r.Device(u, "b")
	relay := func(pendingThen float64) {
		t.Helper()
		ca, cb := r.Dial(0, a, client.QUIC), r.Dial(0, b, client.WebTransport)
		defer func() { _, _ = ca.Close(), cb.Close() }()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := ca.Send(ctx, client.Message{Targets: []string{b.ID}, Payload: []byte("in")}); err != nil {
			t.Fatal(err)
		}
		select {
		case ev := <-cb.Events():
			if string(ev.Payload) != "in" {
				t.Fatalf("got %q", ev.Payload)
			}
		case <-ctx.Done():
			t.Fatal("the event never arrived")
		}
		if g := gauge(); g > limit {
			t.Fatalf("%v pending connections, bound %d", g, limit)
		}
		if pendingThen >= 0 {
			waitPending(pendingThen, -1)
		}
	}
	relay(0)
	relaytest.WaitEdge(t, e, 30*time.Second, func(st session.Stats) error {
		if st.Serving != 0 {
			return fmt.Errorf("%d sessions served, want none", st.Serving)
		}
		return nil
	})
	// The edge's connection goroutines and heap before the flood.
	baseGoroutines, _ := relaytest.SessionGoroutines()
	baseHeap := heapLive()
	f := newFlood(t, e.Addr())
	// Every connection the flood opens is listed once (pending, or
	// pushing out another, which is evicted): none of the devices' is
	// pending now, and none was evicted.
	f.listed = func(n int) {
		t.Helper()
		clustertest.Eventually(t, 30*time.Second, func() error {
			if g, ev := gauge(), evicted(); g+ev < float64(n) {
				return fmt.Errorf("%v pending and %v evicted after %d connections", g, ev, n)
			}
			return nil
		})
	}

	// One source past its share: its own oldest go.
	first := f.openFrom("127.0.0.2", share+8)
	waitPending(float64(share), 8)
	waitClosed(t, "the first source's oldest", relayv1.ErrorCode_ERROR_CODE_RATE_LIMITED, first[:8])
	mustBeOpen(t, "the first source's newest", first[8:])
	// The edge says whose (at most every 10 s).
	if l := logs.String(); !strings.Contains(l, "closed a pending QUIC connection") || !strings.Contains(l, "reason=source_share source=127.0.0.2 ") {
		t.Fatalf("the edge's warnings: %s", l)
	}

	// Five more sources, each at its share, 80 connections: past the
	// bound the oldest of all go, the first source's and then theirs.
	var rest []*quic.Conn
	for i := range 5 {
		rest = append(rest, f.openFrom(fmt.Sprintf("127.0.0.%d", 3+i), share)...)
	}
	waitPending(limit, 8+32)
	waitClosed(t, "the first source's", relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, first[8:])
	waitClosed(t, "the oldest of the others", relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, rest[:16])
	mustBeOpen(t, "the newest", rest[16:])
	peakHeap := heapLive()

	// A connection whose session stream came (half a frame: the hub waits
	// for the rest) goes only after every one that never opened one: a
	// flood twice the bound does not push it out.
	inStream := f.open("127.0.0.8", devconn.ALPN)
	str, err := inStream.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := str.Write([]byte{5}); err != nil { // a frame of 5 bytes, none of them sent
		t.Fatal(err)
	}
	relaytest.WaitEdge(t, e, 30*time.Second, func(st session.Stats) error {
		if st.Serving != 1 {
			return fmt.Errorf("%d sessions served, want the one whose stream came", st.Serving)
		}
		return nil
	})
	for i := range 2 * limit / share {
		f.openFrom(fmt.Sprintf("127.0.0.%d", 9+i), share)
	}
	waitPending(limit, -1)
	mustBeOpen(t, "the connection whose stream came", []*quic.Conn{inStream})

	// The devices get in through the full bound.
	relay(-1)

	// Once the flood is gone, so is what it held.
	f.close()
	waitPending(0, -1)
	relaytest.WaitSessionGoroutines(t, baseGoroutines, 30*time.Second)
	clustertest.Eventually(t, 30*time.Second, func() error {
		if h := heapLive(); h > baseHeap+(peakHeap-baseHeap)/2 {
			return fmt.Errorf("live heap %d KiB, %d KiB before the flood and %d KiB at its peak", h>>10, baseHeap>>10, peakHeap>>10)
		}
		return nil
	})
	t.Logf("live heap: %d KiB before, %d KiB with %d pending connections (and the flood's own ends of them), %d KiB after",
		baseHeap>>10, peakHeap>>10, limit, heapLive()>>10)
}

// The bound follows the session cap: a sixty-fourth of it, from 64 to
// DefaultMaxPendingQUIC, which is also the bound of an edge without a
// cap.
func TestMaxPendingQUICFollowsTheSessionCap(t *testing.T) {
	for sessions, want := range map[int]int{0: 1024, 100: 64, 4000: 64, 15000: 234, 60000: 937, 100000: 1024} {
		if got := transport.MaxPendingQUICFor(sessions); got != want {
			t.Errorf("MaxPendingQUICFor(%d) = %d, want %d", sessions, got, want)
		}
	}
}

// Handshakes that never complete (spoofed sources: the edge's answer
// goes elsewhere) take no place on the pending list, from however many
// addresses they come: there, MaxUnvalidatedHandshakes and Retry bound
// them. Listed at accept, each evicted real connections, and each
// eviction freed its handshake's place below Retry's threshold, so Retry
// never started.
func TestSpoofedHandshakesTakeNoPendingPlace(t *testing.T) {
	const limit = 8
	r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
		cfg.MaxPendingQUIC = limit
		cfg.MaxUnvalidatedHandshakes = 1000 // no Retry: the bound alone is tested
	}})
	e := r.Edges[0]
	f := newFlood(t, e.Addr())
	real := f.open("127.0.0.2", devconn.ALPN)
	// Listed on a goroutine of the edge's once its handshake completed.
	clustertest.Eventually(t, 30*time.Second, func() error {
		if g := relaytest.Gauge(t, e, pendingQUIC, "", ""); g != 1 {
			return fmt.Errorf("%v pending, want the real connection", g)
		}
		return nil
	})
	const spoofed = 5 * limit
	for i := range spoofed {
		holdHandshakeFrom(t, e.Addr(), fmt.Sprintf("127.0.1.%d", i+1))
	}
	// Every spoofed handshake in progress, or (as before the fix) some
	// evicted, which closes them.
	clustertest.Eventually(t, 30*time.Second, func() error {
		if v := relaytest.Gauge(t, e, unverified, "", ""); v < spoofed && relaytest.Counter(t, e, pendingQUICEvicted, "", "") == 0 {
			return fmt.Errorf("%v handshakes in progress, none evicted", v)
		}
		return nil
	})
	mustBeOpen(t, "the real connection among spoofed handshakes", []*quic.Conn{real})
	if g, ev := relaytest.Gauge(t, e, pendingQUIC, "", ""), relaytest.Counter(t, e, pendingQUICEvicted, "", ""); g != 1 || ev != 0 {
		t.Fatalf("%v pending, %v evicted with %d handshakes in progress; want the real connection alone, none evicted", g, ev, spoofed)
	}
}

// upgrade opens an HTTP/3 connection to the edge at addr (from
// 127.0.0.3) and a WebTransport session on it, with no stream yet.
func upgrade(ctx context.Context, t *testing.T, addr string) (*quic.Conn, *webtransport.Session) {
	t.Helper()
	c := newFlood(t, addr).open("127.0.0.3", http3.NextProtoH3)
	wt, err := (&webtransport.Transport{}).NewClientConn(c)
	if err != nil {
		t.Fatal(err)
	}
	_, sess, err := wt.Dial(ctx, "https://"+addr+devconn.WebTransportPath, nil)
	if err != nil {
		t.Fatal(err)
	}
	return c, sess
}

// A WebTransport session the hub does not admit (here, a malformed first
// frame) does not leave its HTTP/3 connection promoted on the pending
// list for StreamTimeout, free to try again: the connection is reaped
// within moments, once the refusal is on its way.
func TestARefusedWebTransportSessionTakesItsConnection(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
		cfg.Session.HandshakeTimeout = 2 * time.Minute // and StreamTimeout with it
	}})
	e := r.Edges[0]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, sess := upgrade(ctx, t, e.Addr())
	str, err := sess.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := str.Write([]byte{0x01, 0xff}); err != nil { // a one-byte frame that is no Frame
		t.Fatal(err)
	}
	select {
	case <-c.Context().Done():
	case <-time.After(30 * time.Second):
		t.Fatal("the connection of a refused WebTransport session was kept (its StreamTimeout is 2 minutes)")
	}
	clustertest.Eventually(t, 30*time.Second, func() error {
		if g := relaytest.Gauge(t, e, pendingQUIC, "", ""); g != 0 {
			return fmt.Errorf("%v pending", g)
		}
		return nil
	})
}

// A WebTransport upgrade that never opens its session stream is ended by
// its own wait, with a session close that carries TIMEOUT, and its
// connection is reaped moments later. The reaping of the connection, due
// as early (StreamTimeout from its start), came first before: a
// WebTransport client reads the close of the connection under its
// session as a datagram error, with the code lost (TestEveryEndIsTyped
// met it now and then on a busy machine, where a stream came late).
func TestAnUpgradeWithoutItsStreamEndsWithItsCode(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
		cfg.Session.HandshakeTimeout = time.Second // and StreamTimeout with it
	}})
	e := r.Edges[0]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, sess := upgrade(ctx, t, e.Addr())
	select {
	case <-sess.Context().Done():
	case <-ctx.Done():
		t.Fatal("a session without its stream was kept")
	}
	ended, stop := context.WithCancel(ctx)
	stop()
	_, err := sess.AcceptStream(ended) // a closed session's answers with its close
	var se *webtransport.SessionError
	if !errors.As(err, &se) || !se.Remote || relayv1.ErrorCode(se.ErrorCode) != relayv1.ErrorCode_ERROR_CODE_TIMEOUT {
		t.Fatalf("the session ended with %v, want the edge's TIMEOUT", err)
	}
	select {
	case <-c.Context().Done():
	case <-ctx.Done():
		t.Fatal("the connection of a session that never opened its stream was kept")
	}
}

// A native connection still waiting for its session stream when the edge
// stops is told GOING_AWAY (another edge takes it now), not TIMEOUT,
// which would have it back off as after a failure.
func TestAConnectionWaitingForItsStreamIsToldTheEdgeIsGoing(t *testing.T) {
	r := startRelay(t, 1, nil)
	e := r.Edges[0]
	f := newFlood(t, e.Addr())
	c := f.open("127.0.0.1", devconn.ALPN)
	clustertest.Eventually(t, 30*time.Second, func() error {
		if g := relaytest.Gauge(t, e, pendingQUIC, "", ""); g != 1 {
			return fmt.Errorf("%v pending, want the connection listed", g)
		}
		return nil
	})
	r.StopEdge(0)
	waitClosed(t, "the edge stopped", relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, []*quic.Conn{c})
}
