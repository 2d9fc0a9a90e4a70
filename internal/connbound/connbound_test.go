package connbound_test

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
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
		pending, vouched int
	}
}

func listen(t *testing.T, cfg connbound.Config) *harness {
	t.Helper()
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{t: t, accepted: make(chan *connbound.Conn, 64)}
	cfg.Evicted = func(vouched bool, _ netip.Addr) {
		h.evicted.Lock()
		defer h.evicted.Unlock()
		if vouched {
			h.evicted.vouched++
		} else {
			h.evicted.pending++
		}
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
	p, v := h.evicted.pending, h.evicted.vouched
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
	s1.Vouch()
	s1.Vouch() // twice is once
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

// Vouched connections are bounded per source: the source's oldest goes,
// and no other source's.
func TestVouchedConnectionsAreBoundedPerSource(t *testing.T) {
	h := listen(t, connbound.Config{MaxPending: 64, MaxVouchedPerSource: 2})
	other, so := h.dial("127.0.0.2")
	so.Vouch()
	c1, s1 := h.dial("127.0.0.1")
	c2, s2 := h.dial("127.0.0.1")
	s1.Vouch()
	s2.Vouch()
	h.expectCounts("three vouched", 0, 3)
	c3, s3 := h.dial("127.0.0.1")
	if closed(c1) {
		t.Fatal("a pending connection pushed out a vouched one")
	}
	s3.Vouch()
	h.expectEvicted(c1, []net.Conn{c2, c3, other}, 0, 1)
	// The evicted one's owner closes it: it leaves the count once, and
	// closing a vouched one takes it off.
	_ = s1.Close()
	_ = s2.Close()
	h.expectCounts("after two closes", 0, 2)
}

// All sources' vouched connections are bounded too: past MaxVouched the
// oldest of all goes.
func TestVouchedConnectionsAreBoundedInAll(t *testing.T) {
	h := listen(t, connbound.Config{MaxPending: 64, MaxVouchedPerSource: 2, MaxVouched: 3})
	var cs []net.Conn
	for _, from := range []string{"127.0.0.1", "127.0.0.2", "127.0.0.3"} {
		c, s := h.dial(from)
		s.Vouch()
		cs = append(cs, c)
	}
	c4, s4 := h.dial("127.0.0.4")
	s4.Vouch()
	h.expectEvicted(cs[0], []net.Conn{cs[1], cs[2], c4}, 0, 1)
	h.expectCounts("past the bound of all", 0, 3)
}

// A trusted connection is on neither list: not counted, and never
// closed to make room, even among many of its source's.
func TestATrustedConnectionIsNeverEvicted(t *testing.T) {
	h := listen(t, connbound.Config{MaxPending: 2, MaxVouchedPerSource: 1})
	trusted, st := h.dial("127.0.0.1")
	st.Trust()
	vouched, sv := h.dial("127.0.0.1")
	sv.Vouch()
	sv.Trust() // a vouched one may be trusted later: it leaves its list
	h.expectCounts("after trusting both", 0, 0)
	var flood []net.Conn
	for range 2 {
		c, s := h.dial("127.0.0.1")
		s.Vouch()
		flood = append(flood, c)
	}
	h.expectEvicted(flood[0], []net.Conn{trusted, vouched, flood[1]}, 0, 1)
	st.Vouch() // vouching a trusted one changes nothing
	h.expectCounts("after vouching a trusted one", 0, 1)
	_ = st.Close()
	st.Trust()
	h.expectCounts("after closing a trusted one", 0, 1)
}

// Two vouches racing an Accept that evicts the same pending connection:
// it ends either vouched or evicted, once, never both or neither.
func TestVouchRacesEviction(t *testing.T) {
	h := listen(t, connbound.Config{MaxPending: 1, MaxVouchedPerSource: 1 << 20})
	for i := range 200 {
		_, s := h.dial("127.0.0.1")
		var wg sync.WaitGroup
		wg.Add(2)
		for range 2 {
			go func() { defer wg.Done(); s.Vouch() }()
		}
		_, next := h.dial("127.0.0.1") // evicts s, unless s was vouched first
		wg.Wait()
		h.evicted.Lock()
		evicted := h.evicted.pending
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

// Connections whose peer never sent a byte go first: a flood of silent
// ones, however long, pushes out its own oldest and not an older client
// that spoke; once only those that spoke are left, their oldest goes.
func TestASilentFloodCannotPushOutAClientThatSpoke(t *testing.T) {
	h := listen(t, connbound.Config{MaxPending: 3})
	speak := func(c net.Conn, sc *connbound.Conn) {
		t.Helper()
		if _, err := c.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(sc, make([]byte, 5)); err != nil {
			t.Fatal(err)
		}
	}
	client, sc := h.dial("127.0.0.1")
	speak(client, sc)
	var flood []net.Conn
	var floodSC []*connbound.Conn
	for range 4 {
		c, s := h.dial("127.0.0.2")
		flood, floodSC = append(flood, c), append(floodSC, s)
	}
	h.expectEvicted(flood[0], []net.Conn{client, flood[2], flood[3]}, 2, 0)
	waitClosed(t, flood[1])
	h.expectCounts("after the flood", 3, 0)

	// The flood's survivors speak too: now the first that spoke goes.
	speak(flood[2], floodSC[2])
	speak(flood[3], floodSC[3])
	late, _ := h.dial("127.0.0.3")
	h.expectEvicted(client, []net.Conn{flood[2], flood[3], late}, 3, 0)
}

// A connection evicted while pending cannot be vouched back onto a list,
// and one closed is not counted.
func TestVouchAfterEvictionOrClose(t *testing.T) {
	h := listen(t, connbound.Config{MaxPending: 1, MaxVouchedPerSource: 4})
	c1, s1 := h.dial("127.0.0.1")
	_, s2 := h.dial("127.0.0.2")
	waitClosed(t, c1)
	s1.Vouch()
	h.expectCounts("after vouching an evicted one", 1, 0)
	_ = s2.Close()
	s2.Vouch()
	h.expectCounts("after close", 0, 0)
}

// The server's http.Server sees a *tls.Conn over the bounded one:
// Vouch and ContextWithConn find it beneath.
func TestVouchThroughTLSAndAContext(t *testing.T) {
	h := listen(t, connbound.Config{MaxPending: 4})
	_, s1 := h.dial("127.0.0.1")
	if !connbound.Vouch(tls.Server(s1, &tls.Config{})) {
		t.Fatal("Vouch did not find the connection beneath TLS")
	}
	h.expectCounts("after Vouch", 0, 0)
	_, s2 := h.dial("127.0.0.1")
	ctx := connbound.ContextWithConn(context.Background(), tls.Server(s2, &tls.Config{}))
	connbound.VouchContext(ctx)
	h.expectCounts("after VouchContext", 0, 0)
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
	connbound.VouchContext(context.Background())
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
	h := listen(t, connbound.Config{MaxPending: 8, MaxVouchedPerSource: 4})
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
					c.Vouch()
				}
				served.Add(1)
				go func() { defer served.Done(); c.Vouch() }()
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
