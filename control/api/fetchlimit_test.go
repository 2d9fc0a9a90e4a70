package api_test

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/server"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
)

// stuckFetch makes a FetchMailbox call of device from the address from
// that never reads its answer (clustertest.UnreadCall): it holds its
// place until stop, or until the node's write deadline passes.
func stuckFetch(t *testing.T, nodeURL, from, token, device string) (body io.ReadCloser, stop func()) {
	t.Helper()
	return clustertest.UnreadCall(t, nodeURL, from, edgev1connect.MailboxServiceFetchMailboxProcedure, token, &edgev1.FetchMailboxRequest{DeviceId: device})
}

// fetchLimitCluster starts one node with limits and stores a page far
// larger than a stuck reader takes for device a1; fetchFrom reads it as
// an edge calling from an address.
func fetchLimitCluster(t *testing.T, limits api.FetchLimits, configure ...func(*server.Config)) (c *clustertest.Cluster, n *clustertest.Node, token string, fetchFrom func(from, token string) error) {
	t.Helper()
	c = clustertest.Start(t, 1, clustertest.Options{Configure: func(cfg *server.Config) {
		cfg.Mailbox.Fetches = limits
		for _, f := range configure {
			f(cfg)
		}
	}})
	mailboxUsers(t, c)
	token = c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	n = c.Nodes[0]
	e := entry("alice", "a1", "e1", 0, time.Now().Add(time.Hour))
	e.Event = make([]byte, 64<<10)
	_, _ = rand.Read(e.Event) // so that compression cannot shrink it
	put(t, mailboxClient(t, n, token), e)
	clients := map[string]*http.Client{} // one connection per address: no call frees a place by making the node evict one
	fetchFrom = func(from, token string) error {
		if clients[from] == nil {
			clients[from] = clientFrom(t, from)
		}
		fc := edgev1connect.NewMailboxServiceClient(clients[from], url(n), connect.WithInterceptors(bearer(token)))
		resp, err := fc.FetchMailbox(ctxT(t, 30*time.Second), connect.NewRequest(&edgev1.FetchMailboxRequest{DeviceId: "a1"}))
		if err == nil && ids(resp.Msg.GetEntries()) != "1:e1" {
			err = fmt.Errorf("fetched %s", ids(resp.Msg.GetEntries()))
		}
		return err
	}
	return c, n, token, fetchFrom
}

// busyRefusal checks that err is a fetch refused for want of a place:
// unavailable, with Retry-After and marked busy (what an edge retries
// without refusing what it holds).
func busyRefusal(err error) error {
	var ce *connect.Error
	if !errors.As(err, &ce) || ce.Code() != connect.CodeUnavailable || ce.Meta().Get("Retry-After") == "" || ce.Meta().Get(api.BusyHeader) == "" {
		return fmt.Errorf("got %v, want unavailable with Retry-After and %s", err, api.BusyHeader)
	}
	return nil
}

// A node reads and answers at most FetchLimits.Max fetches at once, an
// edge's address at most PerSource of them: a call beyond waits for the
// Wait, then is refused as busy; calls from other edges go on while one
// holds its share; a call that is not an edge's takes no place; and each
// place comes back once its answer ends.
func TestMailboxFetchesAreBoundedPerNodeAndSource(t *testing.T) {
	c, n, token, fetchFrom := fetchLimitCluster(t, api.FetchLimits{Max: 4, PerSource: 2, Wait: time.Second, WriteTimeout: 10 * time.Minute})
	inFlight := func() float64 {
		return clustertest.MetricValue(t, n.Server.Registry(), "relay_control_mailbox_fetches_in_flight")
	}

	// 127.0.0.1 holds its two places: its next call is refused, another
	// edge's is served.
	_, stop1 := stuckFetch(t, url(n), "127.0.0.1", token, "a1")
	_, _ = stuckFetch(t, url(n), "127.0.0.1", token, "a1")
	if v := inFlight(); v != 2 {
		t.Fatalf("relay_control_mailbox_fetches_in_flight = %v with two answers unread, want 2", v)
	}
	if err := busyRefusal(fetchFrom("127.0.0.1", token)); err != nil {
		t.Fatalf("a third fetch from the same edge: %v", err)
	}
	if err := fetchFrom("127.0.0.2", token); err != nil {
		t.Fatalf("another edge while one holds its share: %v", err)
	}
	// (Its place comes back just after its answer: a call that comes
	// sooner waits the second for it.)
	// Another edge holds the node's other two places: a third edge is
	// refused at the node's bound.
	_, _ = stuckFetch(t, url(n), "127.0.0.2", token, "a1")
	_, _ = stuckFetch(t, url(n), "127.0.0.2", token, "a1")
	if err := busyRefusal(fetchFrom("127.0.0.3", token)); err != nil {
		t.Fatalf("a fetch beyond the node's bound: %v", err)
	}
	for reason, want := range map[string]float64{"source": 1, "node": 1} {
		if v := clustertest.MetricValue(t, n.Server.Registry(), "relay_control_mailbox_fetches_refused_total", "reason", reason); v != want {
			t.Errorf("relay_control_mailbox_fetches_refused_total{reason=%q} = %v, want %v", reason, v, want)
		}
	}
	// Whoever is not an edge is refused by the role check, not held.
	userToken := c.TokenFor("carol", controlv1.Role_ROLE_USER)
	if err := fetchFrom("127.0.0.3", userToken); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Fatalf("a user's fetch while the node is full: %v, want permission_denied", err)
	}
	// A place comes back once the call holding it ends.
	stop1()
	clustertest.Eventually(t, 30*time.Second, func() error {
		if v := inFlight(); v != 3 {
			return fmt.Errorf("relay_control_mailbox_fetches_in_flight = %v once a call ended, want 3", v)
		}
		return nil
	})
	if err := fetchFrom("127.0.0.1", token); err != nil {
		t.Fatalf("from the first edge once its call ended: %v", err)
	}
}

// An answer nobody reads holds its place only until its write deadline:
// then its stream is reset and the place comes back.
func TestAFetchNobodyReadsLosesItsPlace(t *testing.T) {
	_, n, token, fetchFrom := fetchLimitCluster(t, api.FetchLimits{Max: 1, Wait: 100 * time.Millisecond, WriteTimeout: 2 * time.Second})
	body, _ := stuckFetch(t, url(n), "127.0.0.1", token, "a1")
	clustertest.Eventually(t, 30*time.Second, func() error { return fetchFrom("127.0.0.1", token) })
	if _, err := io.ReadAll(body); err == nil {
		t.Fatal("the answer nobody read came whole after its write deadline")
	}
	// The served call gives its place back just after its last byte.
	clustertest.Eventually(t, 30*time.Second, func() error {
		if v := clustertest.MetricValue(t, n.Server.Registry(), "relay_control_mailbox_fetches_in_flight"); v != 0 {
			return fmt.Errorf("relay_control_mailbox_fetches_in_flight = %v once every call ended, want 0", v)
		}
		return nil
	})
}

// pausedConn is a client's connection that reads nothing until resume
// closes: what the node writes fills the socket buffers (the receive
// buffer is set small when dialing), then the node's writes block in TCP
// with every HTTP/2 window open.
type pausedConn struct {
	net.Conn
	resume <-chan struct{}
}

func (c pausedConn) Read(p []byte) (int, error) {
	<-c.resume
	return c.Conn.Read(p)
}

// A reader whose connection stops taking bytes at all (a frozen edge, a
// partition: the TCP window stays shut, however open the HTTP/2 windows
// are) holds its places only until the node closes the connection, after
// Limits.WriteByteTimeout: the answers' write deadline alone cannot
// reset their streams, as the resets wait behind the stuck write.
func TestAConnectionThatTakesNothingLosesItsPlaces(t *testing.T) {
	const fetches = 8 // full pages: more than the node's socket buffer (4 MiB at most) holds
	_, n, token, _ := fetchLimitCluster(t, api.FetchLimits{Max: fetches, PerSource: fetches, WriteTimeout: 10 * time.Minute}, func(cfg *server.Config) {
		cfg.Limits.WriteByteTimeout = time.Second
	})
	cl := mailboxClient(t, n, token)
	for i := range 4 {
		e := entry("alice", "a1", fmt.Sprint("big", i), 0, time.Now().Add(time.Hour))
		e.Event = make([]byte, 255<<10)
		_, _ = rand.Read(e.Event)
		put(t, cl, e)
	}
	resume := make(chan struct{})
	var once sync.Once
	unpause := func() { once.Do(func() { close(resume) }) }
	t.Cleanup(unpause)
	d := &net.Dialer{Timeout: 10 * time.Second, Control: func(_, _ string, c syscall.RawConn) error {
		var err error
		if cerr := c.Control(func(fd uintptr) { err = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) }); cerr != nil {
			return cerr
		}
		return err
	}}
	var protos http.Protocols
	protos.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: &protos, DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return pausedConn{Conn: c, resume: resume}, nil
	}}
	t.Cleanup(tr.CloseIdleConnections)
	fc := edgev1connect.NewMailboxServiceClient(&http.Client{Transport: tr}, url(n), connect.WithInterceptors(bearer(token)))
	done := make(chan error, fetches)
	for range fetches {
		go func() {
			_, err := fc.FetchMailbox(ctxT(t, time.Minute), connect.NewRequest(&edgev1.FetchMailboxRequest{DeviceId: "a1"}))
			done <- err
		}()
	}
	inFlight := func() float64 {
		return clustertest.MetricValue(t, n.Server.Registry(), "relay_control_mailbox_fetches_in_flight")
	}
	clustertest.Eventually(t, 30*time.Second, func() error {
		if inFlight() == 0 {
			return errors.New("no fetch holds a place yet")
		}
		return nil
	})
	clustertest.Eventually(t, 30*time.Second, func() error {
		if v := inFlight(); v != 0 {
			return fmt.Errorf("relay_control_mailbox_fetches_in_flight = %v, want 0 once the node closed the connection", v)
		}
		return nil
	})
	unpause()
	failed := 0
	for range fetches {
		if err := <-done; err != nil {
			failed++
		}
	}
	if failed == 0 {
		t.Fatal("every fetch succeeded: the node's writes never stalled, so this test showed nothing")
	}
}
