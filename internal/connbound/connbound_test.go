package connbound_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/edge-relay/relay/internal/connbound"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// harness is a bounded listener on 127.0.0.1 and the server's side of
// every connection it accepted, in order.
type harness struct {
	t        *testing.T
	ln       *connbound.Listener
	accepted chan *connbound.Conn
	evicted  struct {
		sync.Mutex
		from map[connbound.State]int
	}
}

func listen(t *testing.T, cfg connbound.Config) *harness {
	t.Helper()
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{t: t, accepted: make(chan *connbound.Conn, 64)}
	h.evicted.from = map[connbound.State]int{}
	cfg.Evicted = func(from connbound.State, _ netip.Addr) {
		h.evicted.Lock()
		defer h.evicted.Unlock()
		h.evicted.from[from]++
	}
	h.ln = connbound.NewListener(tl, cfg)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := h.ln.Accept()
			if err != nil {
				return
			}
			h.accepted <- c.(*connbound.Conn)
		}
	}()
	t.Cleanup(func() {
		_ = h.ln.Close()
		<-done
		for {
			select {
			case c := <-h.accepted:
				_ = c.Close()
			default:
				return
			}
		}
	})
	return h
}

// dial connects from the given loopback address and returns the
// client's end and the server's.
func (h *harness) dial(from string) (net.Conn, *connbound.Conn) {
	h.t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 10 * time.Second}
	c, err := d.Dial("tcp", h.ln.Addr().String())
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { _ = c.Close() })
	select {
	case sc := <-h.accepted:
		h.t.Cleanup(func() { _ = sc.Close() })
		return c, sc
	case <-time.After(30 * time.Second):
		h.t.Fatal("the listener accepted nothing")
		return nil, nil
	}
}

// expectCounts checks the connections pending and vouched for now.
func (h *harness) expectCounts(when string, pending, vouched int) {
	h.t.Helper()
	if p, v := h.ln.Pending(), h.ln.Vouched(); p != pending || v != vouched {
		h.t.Fatalf("%s: %d pending, %d vouched; want %d, %d", when, p, v, pending, vouched)
	}
}

// expectEvicted checks that the server closed gone and none of kept,
// and the evictions counted so far.
func (h *harness) expectEvicted(gone net.Conn, kept []net.Conn, pending, vouched int) {
	h.t.Helper()
	waitClosed(h.t, gone)
	for i, c := range kept {
		if closed(c) {
			h.t.Fatalf("connection %d of those that should stay was closed", i)
		}
	}
	h.evicted.Lock()
	p, v := h.evicted.from[connbound.Pending], h.evicted.from[connbound.Vouched]
	h.evicted.Unlock()
	if p != pending || v != vouched {
		h.t.Fatalf("evictions: %d pending, %d vouched; want %d, %d", p, v, pending, vouched)
	}
}

// closed reports whether the server closed its end of c: a read from the
// client's side ends (the server never writes here).
func closed(c net.Conn) bool {
	_ = c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	return !(errors.As(err, &ne) && ne.Timeout())
}

// waitClosed waits until the server closed its end of c.
func waitClosed(t *testing.T, c net.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("read after eviction: %v, want EOF", err)
	}
}

func TestAtTheBoundTheOldestPendingGoes(t *testing.T) {
	h := listen(t, connbound.Config{MaxPending: 3})
	c1, _ := h.dial("127.0.0.1")
	c2, _ := h.dial("127.0.0.2")
	c3, _ := h.dial("127.0.0.3")
	h.expectCounts("before the fourth", 3, 0)
	c4, _ := h.dial("127.0.0.4")
	h.expectEvicted(c1, []net.Conn{c2, c3, c4}, 1, 0)
	h.expectCounts("after the fourth", 3, 0)
}

func TestAVouchedConnectionLeavesThePendingList(t *testing.T) {
	h := listen(t, connbound.Config{MaxPending: 2})
	c1, s1 := h.dial("127.0.0.1")
	s1.Vouch("k")
	s1.Vouch("k") // twice is once
	h.expectCounts("after vouching (vouched ones not counted without a bound)", 0, 0)
	c2, _ := h.dial("127.0.0.2")
	c3, _ := h.dial("127.0.0.3")
	c4, _ := h.dial("127.0.0.4")
	waitClosed(t, c2)
	for _, c := range []net.Conn{c1, c3, c4} {
		if closed(c) {
			t.Fatal("the vouched connection or a younger pending one was closed")
		}
	}
}

// One source holds at most its share of the pending list: a flood from
// it pushes out its own oldest, not another source's.
func TestOneSourceHoldsItsShare(t *testing.T) {
	const limit = 32 // share 16
	h := listen(t, connbound.Config{MaxPending: limit})
	other, _ := h.dial("127.0.0.2")
	var flood []net.Conn
	for range connbound.PerSourceShare(limit) + 3 {
		c, _ := h.dial("127.0.0.1")
		flood = append(flood, c)
	}
	for _, c := range flood[:3] {
		waitClosed(t, c)
	}
	if closed(other) {
		t.Fatal("the other source's connection was closed")
	}
	h.expectCounts("after the flood", connbound.PerSourceShare(limit)+1, 0)
}

// Vouched connections are bounded per key (an account): the key's
// oldest goes, from whatever source, and no other key's.
func TestVouchedConnectionsAreBoundedPerKey(t *testing.T) {
	h := listen(t, connbound.Config{MaxPending: 64, MaxVouchedPerKey: 2})
	other, so := h.dial("127.0.0.1")
	so.Vouch("bob")
	c1, s1 := h.dial("127.0.0.1")
	c2, s2 := h.dial("127.0.0.2")
	s1.Vouch("alice")
	s2.Vouch("alice")
	h.expectCounts("three vouched", 0, 3)
	c3, s3 := h.dial("127.0.0.3")
	if closed(c1) {
		t.Fatal("a pending connection pushed out a vouched one")
	}
	s3.Vouch("alice")
	h.expectEvicted(c1, []net.Conn{c2, c3, other}, 0, 1)
	// The evicted one's owner closes it: it leaves the count once, and
	// closing a vouched one takes it off.
	_ = s1.Close()
	_ = s2.Close()
	h.expectCounts("after two closes", 0, 2)
}

// All keys' vouched connections are bounded too: past MaxVouched the
// oldest of all goes.
func TestVouchedConnectionsAreBoundedInAll(t *testing.T) {
	h := listen(t, connbound.Config{MaxPending: 64, MaxVouchedPerKey: 2, MaxVouched: 3})
	var cs []net.Conn
	for i, key := range []string{"a", "b", "c"} {
		c, s := h.dial(fmt.Sprintf("127.0.0.%d", i+1))
		s.Vouch(key)
		cs = append(cs, c)
	}
	c4, s4 := h.dial("127.0.0.4")
	s4.Vouch("d")
	h.expectEvicted(cs[0], []net.Conn{cs[1], cs[2], c4}, 0, 1)
	h.expectCounts("past the bound of all", 0, 3)
}

// A trusted connection is on a list of its own: people's floods of
// vouched connections, under any key, cannot reach it; past MaxTrusted
// the oldest trusted one goes. A vouched connection may be trusted
// later, not the other way round.
func TestTrustedConnectionsAreBoundedOnTheirOwn(t *testing.T) {
	h := listen(t, connbound.Config{MaxPending: 4, MaxVouchedPerKey: 1, MaxVouched: 1, MaxTrusted: 2})
	trusted, st := h.dial("127.0.0.1")
	st.Trust()
	later, sl := h.dial("127.0.0.1")
	sl.Vouch("k")
	sl.Trust() // it leaves the vouched list
	if st.State() != connbound.Trusted || sl.State() != connbound.Trusted || h.ln.Trusted() != 2 {
		t.Fatalf("states %v, %v, %d trusted; want both trusted", st.State(), sl.State(), h.ln.Trusted())
	}
	h.expectCounts("after trusting both", 0, 0)
	var flood []net.Conn
	for range 2 {
		c, s := h.dial("127.0.0.1")
		s.Vouch("k")
		flood = append(flood, c)
	}
	h.expectEvicted(flood[0], []net.Conn{trusted, later, flood[1]}, 0, 1)
	st.Vouch("k") // vouching a trusted one changes nothing
	h.expectCounts("after vouching a trusted one", 0, 1)
	third, s3 := h.dial("127.0.0.2")
	s3.Trust()
	h.expectEvicted(trusted, []net.Conn{later, third, flood[1]}, 0, 1)
	h.evicted.Lock()
	if n := h.evicted.from[connbound.Trusted]; n != 1 {
		t.Errorf("%d trusted evicted, want 1", n)
	}
	h.evicted.Unlock()
	st.Trust() // evicted: nothing
	if st.State() != connbound.Closed || h.ln.Trusted() != 2 {
		t.Fatalf("the evicted trusted one: %v, %d trusted", st.State(), h.ln.Trusted())
	}
	_ = sl.Close()
	if h.ln.Trusted() != 1 {
		t.Fatalf("%d trusted after a close, want 1", h.ln.Trusted())
	}
}

// One source holds at most its share of the trusted list too: whoever
// holds an edge's credentials cannot push out the other edges' from one
// host.
func TestTrustedConnectionsOfOneSourceHoldTheirShare(t *testing.T) {
	const limit = 32 // share 16
	h := listen(t, connbound.Config{MaxPending: 64, MaxTrusted: limit})
	other, so := h.dial("127.0.0.2")
	so.Trust()
	var mine []net.Conn
	for range connbound.PerSourceShare(limit) + 1 {
		c, s := h.dial("127.0.0.1")
		s.Trust()
		mine = append(mine, c)
	}
	waitClosed(t, mine[0])
	if closed(other) || closed(mine[1]) {
		t.Fatal("another source's trusted connection, or a younger one, was closed")
	}
	if n := h.ln.Trusted(); n != connbound.PerSourceShare(limit)+1 {
		t.Fatalf("%d trusted, want %d", n, connbound.PerSourceShare(limit)+1)
	}
}

// Without bounds for them, vouched and trusted connections are on no
// list at all.
func TestUnboundedListsCountNothing(t *testing.T) {
	h := listen(t, connbound.Config{MaxPending: 2})
	_, s1 := h.dial("127.0.0.1")
	_, s2 := h.dial("127.0.0.1")
	s1.Vouch("k")
	s2.Trust()
	s1.Trust()
	if s1.State() != connbound.Trusted || s2.State() != connbound.Trusted {
		t.Fatalf("states %v, %v", s1.State(), s2.State())
	}
	h.expectCounts("unbounded", 0, 0)
	if h.ln.Trusted() != 0 {
		t.Fatal("trusted counted without a bound")
	}
	_ = s1.Close()
	if s1.State().String() != "closed" || connbound.Pending.String() != "pending" || connbound.Vouched.String() != "vouched" || connbound.Trusted.String() != "trusted" {
		t.Fatal("state names")
	}
}

// Two vouches racing an Accept that evicts the same pending connection:
// it ends either vouched or evicted, once, never both or neither.
func TestVouchRacesEviction(t *testing.T) {
	h := listen(t, connbound.Config{MaxPending: 1, MaxVouchedPerKey: 1 << 20})
	for i := range 200 {
		_, s := h.dial("127.0.0.1")
		var wg sync.WaitGroup
		wg.Add(2)
		for range 2 {
			go func() { defer wg.Done(); s.Vouch("k") }()
		}
		_, next := h.dial("127.0.0.1") // evicts s, unless s was vouched first
		wg.Wait()
		h.evicted.Lock()
		evicted := h.evicted.from[connbound.Pending]
		h.evicted.Unlock()
		if got := h.ln.Vouched() + evicted; got != i+1 {
			t.Fatalf("round %d: %d vouched + %d evicted, want %d", i, h.ln.Vouched(), evicted, i+1)
		}
		_ = next.Close()
		if n := h.ln.Pending(); n != 0 {
			t.Fatalf("round %d: %d pending, want 0", i, n)
		}
	}
}

// Connections that never carried a request go first: a flood of silent
// ones, however long, pushes out its own oldest and not an older client
// whose request was served (Promoting); once only those are left, the
// first promoted goes.
func TestASilentFloodCannotPushOutAClient(t *testing.T) {
	h := listen(t, connbound.Config{MaxPending: 3})
	serve := connbound.Promoting(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	request := func(c net.Conn) {
		r := httptest.NewRequest(http.MethodGet, "/", nil)
		serve.ServeHTTP(httptest.NewRecorder(), r.WithContext(connbound.ContextWithConn(r.Context(), c)))
	}
	client, sc := h.dial("127.0.0.1")
	request(tls.Server(sc, &tls.Config{}))
	var flood []net.Conn
	var floodSC []*connbound.Conn
	for range 4 {
		c, s := h.dial("127.0.0.2")
		flood, floodSC = append(flood, c), append(floodSC, s)
	}
	h.expectEvicted(flood[0], []net.Conn{client, flood[2], flood[3]}, 2, 0)
	waitClosed(t, flood[1])
	h.expectCounts("after the flood", 3, 0)

	// The flood's survivors make requests too: now the first promoted
	// goes.
	request(floodSC[2])
	request(floodSC[3])
	request(floodSC[3]) // twice is once
	late, _ := h.dial("127.0.0.3")
	h.expectEvicted(client, []net.Conn{flood[2], flood[3], late}, 3, 0)
	floodSC[2].Vouch("k")
	floodSC[2].Promote()    // no longer pending: nothing
	request(&net.TCPConn{}) // not one of ours: nothing
}

// Through a real HTTP/2 server: a connection that finished its TLS
// handshake and sent the connection preface, but no request, is not
// promoted (net/http reports such a connection active); one that made a
// request is, and outlives a silent flood.
func TestHTTP2PrefaceAloneIsNotARequest(t *testing.T) {
	h := listen(t, connbound.Config{MaxPending: 2})
	ts := httptest.NewUnstartedServer(connbound.Promoting(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "ok")
	})))
	ts.EnableHTTP2 = true
	ts.Config.ConnContext = connbound.ContextWithConn
	ts.Config.ErrorLog = log.New(io.Discard, "", 0) // the evicted connections' handshake errors
	// The harness's accept loop races httptest's for the listener: take
	// the accepts from it and hand them back to Serve.
	ts.Listener = &handBack{Listener: h.ln, accepted: h.accepted, done: make(chan struct{})}
	ts.StartTLS()
	defer ts.Close()
	addr := h.ln.Addr().String()

	preface, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}}) //nolint:gosec // test server
	if err != nil {
		t.Fatal(err)
	}
	defer preface.Close()
	// The preface, then an empty SETTINGS frame; then nothing.
	if _, err := preface.Write(append([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), 0, 0, 0, 4, 0, 0, 0, 0, 0)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 9) // the server's SETTINGS: it took the preface
	if _, err := io.ReadFull(preface, buf); err != nil || buf[3] != 4 {
		t.Fatalf("server's first frame: %v, %v", buf, err)
	}
	silent := dialRaw(t, addr)
	late := dialRaw(t, addr) // evicts the oldest not promoted: the preface's
	_ = preface.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.ReadAll(preface); err != nil && !errors.Is(err, io.EOF) {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("the preface-only connection was not closed: it was promoted")
		}
	}
	if closed(silent) {
		t.Fatal("the silent connection was closed before the older preface-only one")
	}

	// A client's request promotes its connection.
	cl := ts.Client()
	get := func() bool {
		t.Helper()
		reused := false
		req, _ := http.NewRequest(http.MethodGet, ts.URL, nil)
		req = req.WithContext(httptrace.WithClientTrace(req.Context(), &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) { reused = i.Reused }}))
		resp, err := cl.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.ProtoMajor != 2 {
			t.Fatalf("%s, want HTTP/2", resp.Proto)
		}
		return reused
	}
	get() // evicts the silent one
	waitClosed(t, silent)
	dialRaw(t, addr) // evicts late, not the client's
	waitClosed(t, late)
	if !get() {
		t.Fatal("the client's connection was closed by a silent one")
	}
}

// handBack is a listener whose Accept takes what the harness accepted,
// until it is closed.
type handBack struct {
	net.Listener
	accepted chan *connbound.Conn
	once     sync.Once
	done     chan struct{}
}

func (l *handBack) Accept() (net.Conn, error) {
	select {
	case c := <-l.accepted:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *handBack) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil // the harness closes the listener beneath
}

// dialRaw opens a TCP connection to addr that sends nothing.
func dialRaw(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// A connection evicted while pending cannot be vouched back onto a list,
// and one closed is not counted.
func TestVouchAfterEvictionOrClose(t *testing.T) {
	h := listen(t, connbound.Config{MaxPending: 1, MaxVouchedPerKey: 4})
	c1, s1 := h.dial("127.0.0.1")
	_, s2 := h.dial("127.0.0.2")
	waitClosed(t, c1)
	s1.Vouch("k")
	h.expectCounts("after vouching an evicted one", 1, 0)
	_ = s2.Close()
	s2.Vouch("k")
	h.expectCounts("after close", 0, 0)
}

// The server's http.Server sees a *tls.Conn over the bounded one: Of,
// Vouch and ContextWithConn find it beneath.
func TestFoundThroughTLSAndAContext(t *testing.T) {
	h := listen(t, connbound.Config{MaxPending: 4})
	_, s1 := h.dial("127.0.0.1")
	if !connbound.Vouch(tls.Server(s1, &tls.Config{})) {
		t.Fatal("Vouch did not find the connection beneath TLS")
	}
	h.expectCounts("after Vouch", 0, 0)
	_, s2 := h.dial("127.0.0.1")
	ctx := connbound.ContextWithConn(context.Background(), tls.Server(s2, &tls.Config{}))
	if c, ok := connbound.FromContext(ctx); !ok || c != s2 {
		t.Fatalf("FromContext: %v, %v; want the connection", c, ok)
	}
	// Connections of other listeners, and contexts without one, are
	// left alone.
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if connbound.Vouch(a) {
		t.Fatal("Vouch claimed a connection no Listener accepted")
	}
	if got := connbound.ContextWithConn(context.Background(), a); got != context.Background() {
		t.Fatal("ContextWithConn wrapped a context for a connection it does not bound")
	}
	if _, ok := connbound.FromContext(context.Background()); ok {
		t.Fatal("FromContext found a connection in a bare context")
	}
}

func TestSourceOf(t *testing.T) {
	for _, tc := range []struct {
		addr net.Addr
		want string
	}{
		{&net.TCPAddr{IP: net.ParseIP("192.0.2.7"), Port: 1}, "192.0.2.7"},
		{&net.TCPAddr{IP: net.ParseIP("::ffff:192.0.2.7"), Port: 1}, "192.0.2.7"},
		{&net.TCPAddr{IP: net.ParseIP("2001:db8:1:2:3:4:5:6"), Port: 1}, "2001:db8:1:2::"},
		{&net.UnixAddr{Name: "/tmp/x", Net: "unix"}, "invalid IP"},
	} {
		if got := connbound.SourceOf(tc.addr); got.String() != tc.want {
			t.Errorf("SourceOf(%v) = %v, want %v", tc.addr, got, tc.want)
		}
	}
	if got := connbound.PerSourceShare(4096); got != 256 {
		t.Errorf("PerSourceShare(4096) = %d, want 256", got)
	}
	if got := connbound.PerSourceShare(8); got != 8 {
		t.Errorf("PerSourceShare(8) = %d, want 8", got)
	}
}

// Accepts, vouches and closes from many goroutines keep the counts
// exact (run with -race).
func TestConcurrentUse(t *testing.T) {
	h := listen(t, connbound.Config{MaxPending: 8, MaxVouchedPerKey: 4})
	var wg sync.WaitGroup
	var dialed atomic.Int64
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(10+g))}}
			for range 25 {
				c, err := d.Dial("tcp", h.ln.Addr().String())
				if err != nil {
					t.Error(err)
					return
				}
				dialed.Add(1)
				_ = c.Close()
			}
		}()
	}
	var served sync.WaitGroup
	var handled atomic.Int64
	stop := make(chan struct{})
	served.Add(1)
	go func() {
		defer served.Done()
		for i := 0; ; i++ {
			select {
			case c := <-h.accepted:
				if i%2 == 0 {
					c.Vouch("k")
				}
				served.Add(1)
				go func() { defer served.Done(); c.Vouch("k") }()
				_ = c.Close()
				handled.Add(1)
			case <-stop:
				return
			}
		}
	}()
	wg.Wait()
	deadline := time.Now().Add(30 * time.Second)
	for handled.Load() != dialed.Load() || h.ln.Pending() != 0 || h.ln.Vouched() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d connections handled; %d pending, %d vouched after every one closed",
				handled.Load(), dialed.Load(), h.ln.Pending(), h.ln.Vouched())
		}
		time.Sleep(time.Millisecond) // polling a condition, with a deadline
	}
	close(stop)
	served.Wait()
}
