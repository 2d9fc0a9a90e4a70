package client_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/edge/session"
	"github.com/edge-relay/relay/internal/relaytest"
	"github.com/edge-relay/relay/internal/stacks"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		goleak.IgnoreTopFunction("github.com/cockroachdb/pebble/v2/internal/cache.(*shard).releaseLoop"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
	)
}

func counter(t *testing.T, reg *prometheus.Registry, name, label, value string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

// dialWith dials a client with cfg (r.Dial's with a setting changed) and
// closes it when the test ends.
func dialWith(ctx context.Context, t *testing.T, cfg client.Config) *client.Client {
	t.Helper()
	c, err := client.Dial(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func waitOnline(t *testing.T, c *client.Client, id string) {
	t.Helper()
	clustertest.Eventually(t, 30*time.Second, func() error {
		for _, o := range c.Online() {
			if o == id {
				return nil
			}
		}
		return fmt.Errorf("%s not online yet", id)
	})
}

// When an edge goes away, its devices move to another edge with their
// resume tickets (no new signature), and a sender that retries what was
// refused while its target moved gets every event delivered exactly
// once, in order.
func TestDevicesMoveToAnotherEdge(t *testing.T) {
	for _, tr := range []client.Transport{client.QUIC, client.WebTransport} {
		t.Run(tr.String(), func(t *testing.T) {
			r := relaytest.Start(t, relaytest.Options{Edges: 2, Edge: func(_ int, cfg *server.Config) {
				cfg.DrainWindow = 200 * time.Millisecond
				cfg.ClusterTLSTickets = true
			}})
			u := r.User("mover")
			a, b := r.Device(u, "a"), r.Device(u, "b")
			// b's client says when its session goes, and why.
			lost := make(chan client.SessionLost, 4)
			cfgB := r.ClientConfig(0, b, tr)
			cfgB.OnSessionLost = func(l client.SessionLost) { lost <- l }
			dctx, dcancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer dcancel()
			cb, err := client.Dial(dctx, cfgB)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = cb.Close() })
			firstSession := cb.SessionID()
			ca := r.Dial(0, a, tr)
			waitOnline(t, ca, b.ID)
			edge0, edge1 := r.Edges[0].Addr(), r.Edges[1]

			const n = 300
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			defer cancel()
			var wg sync.WaitGroup
			sendErr := make(chan error, 1)
			acked := make(chan int, n)
			wg.Go(func() {
				for k := range n {
					m := client.Message{ID: fmt.Sprintf("ev-%d", k), Targets: []string{b.ID}, Payload: fmt.Appendf(nil, "%d", k)}
					for {
						err := ca.Send(ctx, m)
						var ce *client.Error
						if err == nil {
							break
						}
						if errors.As(err, &ce) && ce.Retryable() {
							continue
						}
						sendErr <- fmt.Errorf("event %d: %w", k, err)
						return
					}
					acked <- k
				}
			})
			// Move both devices halfway through.
			for range n / 2 {
				<-acked
			}
			r.StopEdge(0)
			got := 0
			for got < n {
				ev, err := cb.Receive(ctx)
				if err != nil {
					t.Fatalf("after %d events: %v", got, err)
				}
				if string(ev.Payload) != fmt.Sprint(got) {
					t.Fatalf("event %d arrived as %q", got, ev.Payload)
				}
				got++
			}
			wg.Wait()
			select {
			case err := <-sendErr:
				t.Fatal(err)
			default:
			}
			select {
			case l := <-lost:
				var ce *client.Error
				if l.SessionID != firstSession || l.Edge != edge0 || !errors.As(l.Err, &ce) || ce.Code != relayv1.ErrorCode_ERROR_CODE_GOING_AWAY {
					t.Fatalf("session lost: %+v, want session %s on the first edge, GOING_AWAY", l, firstSession)
				}
			default:
				t.Fatal("OnSessionLost was not called when the edge went away")
			}
			if ca.Edge() != edge1.Addr() || cb.Edge() != edge1.Addr() {
				t.Fatalf("devices on %s and %s, want %s", ca.Edge(), cb.Edge(), edge1.Addr())
			}
			if got := counter(t, edge1.Registry(), "relay_edge_handshakes_total", "result", "resumed"); got < 2 {
				t.Fatalf("%v resumed handshakes on the second edge, want 2", got)
			}
			// Their TLS sessions resumed there too, on the first edge's
			// tickets (with --cluster-tls-tickets the cluster's key seals
			// them; the clients pin both edges' certificates): no
			// certificate signature on the way over.
			if got := counter(t, edge1.Registry(), "relay_edge_connections_total", "tls", "resumed"); got < 2 {
				t.Fatalf("%v TLS sessions resumed on the second edge, want 2", got)
			}
			// Nothing more arrives: no duplicates reached the application.
			short, cancel2 := context.WithTimeout(ctx, 300*time.Millisecond)
			defer cancel2()
			if ev, err := cb.Receive(short); err == nil {
				t.Fatalf("extra event %q", ev.Payload)
			}
		})
	}
}

// The client learns the edge's clock and stamps its events in it: with
// the edge ten minutes ahead, far beyond the skew tolerance, events are
// still accepted.
func TestClockOffsetIsLearnt(t *testing.T) {
	ahead := 10 * time.Minute
	r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
		cfg.Session.Now = func() time.Time { return time.Now().Add(ahead) }
	}})
	u := r.User("clock")
	a, b := r.Device(u, "a"), r.Device(u, "b")
	ca, cb := r.Dial(0, a, client.QUIC), r.Dial(0, b, client.QUIC)
	if off := ca.ClockOffset(); off < ahead-time.Second || off > ahead+time.Second {
		t.Fatalf("offset %s, want about %s", off, ahead)
	}
	waitOnline(t, ca, b.ID)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := ca.Send(ctx, client.Message{Targets: []string{b.ID}, Payload: []byte("now")}); err != nil {
		t.Fatal(err)
	}
	ev, err := cb.Receive(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if d := ev.CreatedAt.Sub(time.Now().Add(ahead)); d > time.Second || d < -5*time.Second {
		t.Fatalf("created at %s, %s off the edge's clock", ev.CreatedAt, d)
	}
}

// A session older than the maximum age is asked to sign again; the
// client does, and the session goes on.
func TestReauthenticationKeepsTheSession(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
		cfg.Session.MaxSessionAge = 500 * time.Millisecond
		cfg.Session.TicketTTL = 300 * time.Millisecond
	}})
	u := r.User("old")
	a, b := r.Device(u, "a"), r.Device(u, "b")
	ca, cb := r.Dial(0, a, client.QUIC), r.Dial(0, b, client.WebTransport)
	sa, sb := ca.SessionID(), cb.SessionID()
	reg := r.Edges[0].Registry()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Traffic across three maximum ages, paced below the rate limit.
	pace := time.NewTicker(20 * time.Millisecond)
	defer pace.Stop()
	for deadline := time.Now().Add(1500 * time.Millisecond); time.Now().Before(deadline); <-pace.C {
		if err := ca.Send(ctx, client.Message{Targets: []string{b.ID}, Payload: []byte("still here")}); err != nil {
			t.Fatal(err)
		}
		if _, err := cb.Receive(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if ca.SessionID() != sa || cb.SessionID() != sb {
		t.Fatal("a session was replaced")
	}
	if got := counter(t, reg, "relay_edge_session_closes_total", "code", "session_expired"); got != 0 {
		t.Fatalf("%v sessions expired", got)
	}
	if got := counter(t, reg, "relay_edge_handshakes_total", "result", "reauthenticated"); got < 4 {
		t.Fatalf("%v re-authentications, want at least 2 per session", got)
	}
}

func TestClose(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{})
	u := r.User("closer")
	a, b := r.Device(u, "a"), r.Device(u, "b")
	ca, cb := r.Dial(0, a, client.QUIC), r.Dial(0, b, client.QUIC)
	waitOnline(t, ca, b.ID)
	if err := cb.Close(); err != nil {
		t.Fatal(err)
	}
	// The edge learns at once (the client says goodbye).
	clustertest.Eventually(t, 10*time.Second, func() error {
		if len(ca.Online()) != 0 {
			return errors.New("b still online")
		}
		return nil
	})
	ctx := context.Background()
	if err := cb.Send(ctx, client.Message{}); !errors.Is(err, client.ErrClosed) {
		t.Fatalf("send after close: %v", err)
	}
	if _, err := cb.Receive(ctx); !errors.Is(err, client.ErrClosed) {
		t.Fatalf("receive after close: %v", err)
	}
	// What is sent to it meanwhile waits in its mailbox.
	if err := ca.Send(ctx, client.Message{Targets: []string{b.ID}, Payload: []byte("later")}); err != nil {
		t.Fatalf("send to a closed device: %v", err)
	}
	cb2 := r.Dial(0, b, client.QUIC)
	if ev, err := cb2.Receive(ctx); err != nil || string(ev.Payload) != "later" {
		t.Fatalf("after reconnecting: %q %v", ev.Payload, err)
	}
}

// OnSession may send ephemeral events (it runs once the session is set
// up, not under the client's send lock), and the client still closes.
func TestOnSessionMaySendEphemeral(t *testing.T) {
	r, _, a, b, rx := receiverOnOneEdge(t, "greeter")
	self := make(chan *client.Client, 1)
	sent := make(chan error, 1)
	cfg := r.ClientConfig(0, a, client.QUIC)
	cfg.OnSession = func(client.SessionInfo) {
		c := <-self
		sent <- c.SendEphemeral(client.Message{Targets: []string{b.ID}, Payload: []byte("hello")})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ca, err := client.Dial(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	self <- ca
	select {
	case err := <-sent:
		if err != nil {
			t.Fatalf("SendEphemeral from OnSession: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("SendEphemeral from OnSession did not return")
	}
	if ev, err := rx.Receive(ctx); err != nil || string(ev.Payload) != "hello" {
		t.Fatalf("received %q, %v", ev.Payload, err)
	}
	closeWithin(t, ca, 20*time.Second)
}

// Close does not wait for a write the edge is not taking: here the edge
// paces the device to one event a second while megabytes of events wait
// for the stream; in a session, and in the resend of a reconnect (the
// session ends with the events still waiting, and the client writes them
// all again in one write).
func TestCloseIsNotHeldByABlockedWrite(t *testing.T) {
	for _, resend := range []bool{false, true} {
		t.Run(fmt.Sprint("resend=", resend), func(t *testing.T) {
			r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
				cfg.Session.Limits = session.DefaultLimits()
				cfg.Session.Limits.EventsPerSecond = 1
			}})
			u := r.User("stuck")
			a, b := r.Device(u, "a"), r.Device(u, "b")
			rx := r.Dial(0, b, client.QUIC)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			ca, err := client.Dial(ctx, r.ClientConfig(0, a, client.QUIC))
			if err != nil {
				t.Fatal(err)
			}
			const n = 100 // 4 MB: far beyond what the edge's stream window takes
			payload := make([]byte, 40<<10)
			var wg sync.WaitGroup
			for range n {
				wg.Go(func() { _ = ca.Send(ctx, client.Message{Targets: []string{b.ID}, Payload: payload}) })
			}
			// Two events through: the edge is pacing and the rest wait.
			for range 2 {
				if _, err := rx.Receive(ctx); err != nil {
					t.Fatal(err)
				}
			}
			if resend {
				r.Edges[0].Hub().CloseDevice(u, a.ID, relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER, "the test ends the session")
				// An event from the resend: the new session is writing it.
				if _, err := rx.Receive(ctx); err != nil {
					t.Fatal(err)
				}
			}
			closeWithin(t, ca, 20*time.Second)
			wg.Wait() // every Send returned
		})
	}
}

// A device whose sessions the edge ends soon after they begin is not
// reconnected in a tight loop: each short session doubles the wait, drawn
// between half the backoff and the backoff, so three such ends in a row
// cost at least 150 + 300 + 600 ms with ReconnectMin 300 ms (a lower
// bound: a slow machine only adds to it).
func TestShortSessionsBackOff(t *testing.T) {
	r, _, a, _, _ := receiverOnOneEdge(t, "flappy")
	up := make(chan string, 8)
	cfg := r.ClientConfig(0, a, client.QUIC)
	cfg.ReconnectMin, cfg.ReconnectMax = 300*time.Millisecond, 10*time.Second
	cfg.OnSession = func(s client.SessionInfo) { up <- s.SessionID }
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ca := dialWith(ctx, t, cfg)
	next := func() string {
		t.Helper()
		select {
		case id := <-up:
			return id
		case <-ctx.Done():
			t.Fatal("no new session")
			return ""
		}
	}
	id := next()
	began := time.Now()
	for range 3 {
		r.Edges[0].Hub().CloseDevice(a.UserID, a.ID, relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER, "the test ends the session")
		if again := next(); again == id {
			t.Fatalf("session %s again", id)
		} else {
			id = again
		}
	}
	if took, least := time.Since(began), 1050*time.Millisecond; took < least {
		t.Fatalf("three short sessions reconnected within %v, want at least %v of backoff", took, least)
	}
	if ca.Err() != nil {
		t.Fatalf("client stopped: %v", ca.Err())
	}
}

// The client follows the frame limit its edge tells in the Welcome: an
// edge that takes larger frames relays larger events between clients
// (both sending and receiving them), and one that takes only smaller ones
// gets no frame it would end the session for: the client refuses the
// event itself, with FRAME_TOO_LARGE, and goes on.
func TestClientsFollowTheEdgesFrameLimit(t *testing.T) {
	limits := func(frameBytes, payloadBytes int) relaytest.Options {
		return relaytest.Options{Edge: func(_ int, cfg *server.Config) {
			cfg.Session.Limits = session.DefaultLimits()
			cfg.Session.Limits.MaxFrameBytes, cfg.Session.Limits.MaxPayloadBytes = frameBytes, payloadBytes
		}}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Larger than the default, over QUIC; and over a WebSocket above the
	// 1 MiB a client's WebSocket reads before the Welcome.
	for _, tc := range []struct {
		name                 string
		frame, payload, send int
		transport            client.Transport
	}{
		{"larger", 256 << 10, 200 << 10, 150 << 10, client.QUIC},
		{"larger than a megabyte", 2 << 20, 3 << 19, 3 << 19, client.WebSocket},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := relaytest.Start(t, limits(tc.frame, tc.payload))
			u := r.User("large")
			a, b := r.Device(u, "a"), r.Device(u, "b")
			ca, cb := r.Dial(0, a, client.QUIC), r.Dial(0, b, tc.transport)
			payload := bytes.Repeat([]byte{7}, tc.send)
			if err := ca.Send(ctx, client.Message{Targets: []string{b.ID}, Payload: payload}); err != nil {
				t.Fatalf("send an event of %d bytes: %v", tc.send, err)
			}
			if ev, err := cb.Receive(ctx); err != nil || !bytes.Equal(ev.Payload, payload) {
				t.Fatalf("received %d bytes, %v", len(ev.Payload), err)
			}
		})
	}
	t.Run("smaller", func(t *testing.T) {
		r := relaytest.Start(t, limits(16<<10, 12<<10))
		u := r.User("small")
		a, b := r.Device(u, "a"), r.Device(u, "b")
		ca, cb := r.Dial(0, a, client.QUIC), r.Dial(0, b, client.QUIC)
		var ce *client.Error
		err := ca.Send(ctx, client.Message{Targets: []string{b.ID}, Payload: make([]byte, 20<<10)})
		if !errors.As(err, &ce) || ce.Code != relayv1.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE {
			t.Fatalf("send a 20 KiB event through a 16 KiB limit: %v, want FRAME_TOO_LARGE", err)
		}
		if err := ca.SendEphemeral(client.Message{Targets: []string{b.ID}, Payload: make([]byte, 20<<10)}); !errors.As(err, &ce) || ce.Code != relayv1.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE {
			t.Fatalf("send a 20 KiB ephemeral event through a 16 KiB limit: %v, want FRAME_TOO_LARGE", err)
		}
		// The session goes on.
		if err := ca.Send(ctx, client.Message{Targets: []string{b.ID}, Payload: []byte("small")}); err != nil || ca.Err() != nil {
			t.Fatalf("a small event after: %v (client: %v)", err, ca.Err())
		}
		if ev, err := cb.Receive(ctx); err != nil || string(ev.Payload) != "small" {
			t.Fatalf("received %q, %v", ev.Payload, err)
		}
	})
}

// closeWithin closes c and fails the test if Close has not returned
// within d (a hang, not a timing: Close takes a second at most here).
func closeWithin(t *testing.T, c *client.Client, d time.Duration) {
	t.Helper()
	closed := make(chan error, 1)
	go func() { closed <- c.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatalf("close: %v", err)
		}
	case <-time.After(d):
		t.Fatalf("Close has not returned after %v", d)
	}
}

// A client defers its datagrams (the default): its session on the edge
// has no datagram reader until the client's first ephemeral event, which
// goes on the stream; the later ones go as datagrams. Each event is
// awaited before the next is sent, so one sent as a datagram before the
// edge reads them would hold the test up - also after a reconnect, where
// the first one goes on the stream again.
func TestEphemeralEventsStartTheEdgesDatagramReader(t *testing.T) {
	r, user, a, b, rx := receiverOnOneEdge(t, "deferred")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sessions := make(chan client.SessionInfo, 4)
	cfg := r.ClientConfig(0, a, client.QUIC)
	cfg.OnSession = func(i client.SessionInfo) { sessions <- i }
	tx := dialWith(ctx, t, cfg)
	<-sessions
	waitOnline(t, tx, b.ID)
	readers := func(want int) {
		t.Helper()
		clustertest.Eventually(t, 10*time.Second, func() error {
			if n := datagramReaders(); n != want {
				return fmt.Errorf("%d datagram readers on the edge, want %d", n, want)
			}
			return nil
		})
	}
	readers(0) // two idle sessions
	for conn := range 2 {
		if conn == 1 {
			r.Edges[0].Hub().CloseDevice(user, a.ID, relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, "move along")
			select {
			case <-sessions:
			case <-ctx.Done():
				t.Fatal("the client did not reconnect")
			}
			readers(0) // the new session's reader waits for an event again
		}
		for i := range 3 {
			if err := tx.SendEphemeral(client.Message{Targets: []string{b.ID}, Payload: []byte{byte(conn), byte(i)}}); err != nil {
				t.Fatal(err)
			}
			short, cancel := context.WithTimeout(ctx, 10*time.Second)
			ev, err := rx.Receive(short)
			cancel()
			if err != nil || !ev.Ephemeral || !bytes.Equal(ev.Payload, []byte{byte(conn), byte(i)}) {
				t.Fatalf("connection %d, event %d: %+v, %v", conn, i, ev, err)
			}
			readers(1) // the sender's; the receiver sent none
		}
	}
}

// receiverOnOneEdge starts a relay with one edge and a user (login) with
// devices a and b, b connected over QUIC (rx).
func receiverOnOneEdge(t *testing.T, login string) (r *relaytest.Relay, user string, a, b relaytest.Device, rx *client.Client) {
	t.Helper()
	r = relaytest.Start(t, relaytest.Options{Edges: 1})
	user = r.User(login)
	a, b = r.Device(user, "a"), r.Device(user, "b")
	return r, user, a, b, r.Dial(0, b, client.QUIC)
}

// datagramReaders counts the datagram readers of the edge sessions in
// this process (the tests' edges run in it).
func datagramReaders() int { return stacks.Count("session.(*Session).datagramLoop(") }

// A client with NoDatagrams sends its ephemeral events on the stream: the
// edge, told so in the Hello, reads no datagrams from it, so one sent as
// a datagram would be lost.
func TestNoDatagramsSendsEphemeralEventsOnTheStream(t *testing.T) {
	r, _, a, b, rx := receiverOnOneEdge(t, "no-datagrams")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg := r.ClientConfig(0, a, client.QUIC)
	cfg.NoDatagrams = true
	tx := dialWith(ctx, t, cfg)
	waitOnline(t, tx, b.ID)
	for i := range 3 {
		if err := tx.SendEphemeral(client.Message{Targets: []string{b.ID}, Payload: []byte{byte(i)}}); err != nil {
			t.Fatal(err)
		}
		ev, err := rx.Receive(ctx)
		if err != nil || !ev.Ephemeral || len(ev.Payload) != 1 || ev.Payload[0] != byte(i) {
			t.Fatalf("event %d: %+v, %v", i, ev, err)
		}
	}
}

// Sends from many goroutines at once, none waiting for an earlier one's
// ack, share stream writes (see TestQueuedFramesShareOneWrite): the
// frames queued while a write is under way go out together. Each send
// still gets its ack, which it would not if the edge had read one of them
// out of seq order (SEQ_OUT_OF_ORDER), and the receiver gets every event,
// the sender's seq strictly increasing.
func TestConcurrentSendsKeepTheirOrder(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{Edges: 1})
	user := r.User("concurrent")
	a, b := r.Device(user, "a"), r.Device(user, "b")
	rx := r.Dial(0, b, client.QUIC)
	tx := r.Dial(0, a, client.QUIC)
	waitOnline(t, tx, b.ID)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const senders, each = 32, 20 // 640 sends at once, within MaxPending
	var wg sync.WaitGroup
	errs := make(chan error, senders*each)
	for g := range senders {
		for i := range each {
			wg.Go(func() {
				if err := tx.Send(ctx, client.Message{Targets: []string{b.ID}, Payload: []byte{byte(g), byte(i)}}); err != nil {
					errs <- fmt.Errorf("sender %d, event %d: %w", g, i, err)
				}
			})
		}
	}
	// An event too large for a frame is refused at once (it would never
	// be sent, and would hold back the resend of later ones).
	err := tx.Send(context.Background(), client.Message{Targets: []string{b.ID}, Payload: make([]byte, 70<<10)})
	var ce *client.Error
	if !errors.As(err, &ce) || ce.Code != relayv1.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE {
		t.Fatalf("oversized send: %v", err)
	}
	got := map[[2]byte]bool{}
	var last uint64
	for range senders * each {
		ev, err := rx.Receive(ctx)
		if err != nil {
			t.Fatalf("after %d events: %v (send errors: %d)", len(got), err, len(errs))
		}
		if ev.Seq <= last {
			t.Fatalf("event seq %d after %d: the sender's events out of order", ev.Seq, last)
		}
		last = ev.Seq
		got[[2]byte(ev.Payload)] = true
	}
	if len(got) != senders*each {
		t.Fatalf("%d distinct events of %d", len(got), senders*each)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// A sender that gets ahead of its acks is held back at MaxPending sends
// under way: a further Send waits for a slot and, when its context ends
// first, was never sent (the receiver never gets it).
func TestSendWaitsForASlot(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{Edges: 1})
	user := r.User("slots")
	a, b := r.Device(user, "a"), r.Device(user, "b")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// The receiver takes one event into its buffer and acknowledges it;
	// while nobody reads, the next ones wait in its session's inbox,
	// unacknowledged.
	rcfg := r.ClientConfig(0, b, client.QUIC)
	rcfg.ReceiveBuffer = 1
	rx := dialWith(ctx, t, rcfg)
	cfg := r.ClientConfig(0, a, client.QUIC)
	cfg.MaxPending = 2
	tx := dialWith(ctx, t, cfg)
	waitOnline(t, tx, b.ID)
	to := []string{b.ID}
	if err := tx.Send(ctx, client.Message{Targets: to, Payload: []byte{1}}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	errs := make(chan error, 2)
	for _, p := range []byte{2, 3} {
		wg.Go(func() { errs <- tx.Send(ctx, client.Message{Targets: to, Payload: []byte{p}}) })
	}
	reg := r.Edges[0].Registry()
	clustertest.Eventually(t, 30*time.Second, func() error {
		if got := counter(t, reg, "relay_edge_events_total", "result", "accepted"); got != 3 {
			return fmt.Errorf("%v events accepted, want 3", got)
		}
		return nil
	})
	short, cancelShort := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancelShort()
	if err := tx.Send(short, client.Message{Targets: to, Payload: []byte{4}}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a send beyond MaxPending: %v, want it to wait and give up", err)
	}
	var got []byte
	for range 3 {
		ev, err := rx.Receive(ctx)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, ev.Payload...)
	}
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	wg.Go(func() { errs <- tx.Send(ctx, client.Message{Targets: to, Payload: []byte{5}}) })
	ev, err := rx.Receive(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got = append(got, ev.Payload...)
	if got[0] != 1 || got[3] != 5 || got[1]+got[2] != 5 {
		t.Fatalf("received %v, want 1, then 2 and 3, then 5 (4 was never sent)", got)
	}
	if err := <-errs; err != nil {
		t.Fatal(err)
	}
	if n := counter(t, reg, "relay_edge_events_total", "result", "accepted"); n != 4 {
		t.Fatalf("%v events accepted, want 4", n)
	}
}

// waitGoroutines waits until some goroutine's stack holds fn (present),
// or none does.
func waitGoroutines(t *testing.T, fn string, present bool) {
	t.Helper()
	clustertest.Eventually(t, 30*time.Second, func() error {
		if n := stacks.Count(fn); (n > 0) != present {
			return fmt.Errorf("%d goroutines in %s", n, fn)
		}
		return nil
	})
}

// An event the client had read but could not yet give the application
// (its channel full) when the connection broke is given once after the
// reconnect: the edge sends it again, unacknowledged, and the client must
// not take that copy for a duplicate of an event it never gave. Here the
// receiver's channel holds one event and the application does not read:
// the session's inbox holds the others, unacknowledged, while the reader
// reads on. The edge then ends the session; once the connection is
// closed on the client's side the application reads, and gets every
// event once, in order: the one in its channel, then the others again
// from the next session.
func TestEventsHeldUpByTheApplicationSurviveABrokenConnection(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{Edges: 1})
	u := r.User("held-up")
	a, b := r.Device(u, "a"), r.Device(u, "b")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// Stored in b's mailbox while b is offline, so that the edge sends
	// them together when b connects.
	const n = 20
	ca := r.Dial(0, a, client.QUIC)
	for k := range n {
		if err := ca.Send(ctx, client.Message{ID: fmt.Sprintf("ev-%d", k), Targets: []string{b.ID}, Payload: fmt.Appendf(nil, "%d", k)}); err != nil {
			t.Fatalf("event %d: %v", k, err)
		}
	}
	closeWithin(t, ca, 20*time.Second)
	lost := make(chan client.SessionLost, 8)
	cfg := r.ClientConfig(0, b, client.QUIC)
	cfg.ReceiveBuffer = 1
	cfg.OnSessionLost = func(l client.SessionLost) { lost <- l }
	cb := dialWith(ctx, t, cfg)
	// The edge has sent b all of them: one is in the application's
	// channel, the others in the session's inbox (or on their way).
	waitSent(t, r, n)
	r.Edges[0].Hub().CloseDevice(u, b.ID, relayv1.ErrorCode_ERROR_CODE_GOING_AWAY, "the test ends the session")
	// The connection is closed on the client's side: quic-go fails the
	// streams before it ends the datagram reader's wait.
	waitGoroutines(t, "client.(*Client).readDatagrams(", false)
	for k := range n {
		ev, err := cb.Receive(ctx)
		if err != nil {
			t.Fatalf("after %d events: %v", k, err)
		}
		if string(ev.Payload) != fmt.Sprint(k) {
			t.Fatalf("event %d arrived as %q", k, ev.Payload)
		}
	}
	// The reader ends the session once it has handed the last event over,
	// which may be just after the application took it.
	select {
	case <-lost:
	case <-time.After(20 * time.Second):
		t.Fatal("the session did not end")
	}
	short, cancelShort := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancelShort()
	if ev, err := cb.Receive(short); err == nil {
		t.Fatalf("extra event %q", ev.Payload)
	}
}

// An application that sends from its Events loop cannot deadlock its own
// client: while its channel is full, the events behind wait in the
// session's inbox, unacknowledged, and the reader reads on, so the Ack a
// Send waits for is read although deliveries came before it. (The reader
// waited for the application with the next delivery, the Ack behind it
// was never read, and Send never returned.)
func TestSendWhileEventsWait(t *testing.T) {
	r, ctx, a, ca, b, cb := lagging(t, "busy", 1)
	// Five events for b, which reads none yet: one fills its channel,
	// the others wait (their senders' Sends with them).
	const n = 5
	sent := make(chan error, n)
	for k := range n {
		sendAsync(ctx, ca, b.ID, fmt.Sprint(k), sent)
	}
	waitSent(t, r, n)
	sctx, scancel := context.WithTimeout(ctx, 20*time.Second)
	defer scancel()
	if err := cb.Send(sctx, client.Message{Targets: []string{a.ID}, Payload: []byte("reply")}); err != nil {
		t.Fatalf("b's send while its events wait: %v", err)
	}
	var last uint64
	for k := range n {
		ev, err := cb.Receive(ctx)
		if err != nil {
			t.Fatalf("event %d: %v", k, err)
		}
		if ev.Seq <= last {
			t.Fatalf("event seq %d after %d", ev.Seq, last)
		}
		last = ev.Seq
	}
	for range n {
		if err := <-sent; err != nil {
			t.Fatalf("a's send: %v", err)
		}
	}
}

// With an unbuffered Events channel (ReceiveBuffer < 0) an event is
// acknowledged only once the application received it: its sender's Send
// waits until then, and a process that ends before (killed in the
// background) loses nothing: the edge keeps the event for the device's
// next connection, from a new process.
func TestAnUnbufferedReceiverAcknowledgesWhatItReceived(t *testing.T) {
	r, ctx, _, ca, b, first := lagging(t, "careful", -1)
	sent := make(chan error, 1)
	sendAsync(ctx, ca, b.ID, "kept", sent)
	waitSent(t, r, 1)
	select {
	case err := <-sent:
		t.Fatalf("a's send ended (%v) before b's application received the event", err)
	default:
	}
	// b's process ends without having received it.
	closeWithin(t, first, 20*time.Second)
	if err := <-sent; err != nil {
		t.Fatalf("a's send: %v", err)
	}
	cfg := r.ClientConfig(0, b, client.QUIC)
	cfg.ReceiveBuffer = -1
	second := dialWith(ctx, t, cfg)
	ev, err := second.Receive(ctx)
	if err != nil || string(ev.Payload) != "kept" {
		t.Fatalf("b's next process received %q, %v", ev.Payload, err)
	}
}

// When a session ends, every device it reported online is reported
// offline (it may go while the client reconnects, and nothing would say
// so), and the next session reports it online again; the channel is
// closed after Close.
func TestPresenceAcrossAReconnect(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{Edges: 1})
	u := r.User("present")
	a, b := r.Device(u, "a"), r.Device(u, "b")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ca, err := client.Dial(ctx, r.ClientConfig(0, a, client.QUIC))
	if err != nil {
		t.Fatal(err)
	}
	r.Dial(0, b, client.QUIC)
	next := func(want client.Presence) {
		t.Helper()
		for {
			select {
			case p := <-ca.Presence():
				if p == want {
					return
				}
			case <-ctx.Done():
				t.Fatalf("no presence %+v", want)
			}
		}
	}
	next(client.Presence{DeviceID: b.ID, Online: true})
	r.Edges[0].Hub().CloseDevice(u, a.ID, relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER, "the test ends the session")
	next(client.Presence{DeviceID: b.ID, Online: false})
	next(client.Presence{DeviceID: b.ID, Online: true})
	closeWithin(t, ca, 20*time.Second)
	drained := make(chan struct{})
	go func() {
		for range ca.Presence() {
		}
		close(drained)
	}()
	select {
	case <-drained:
	case <-time.After(20 * time.Second):
		t.Fatal("Presence is still open after Close")
	}
}

// An event waiting for its ack when the client moves to an edge with a
// smaller frame limit than the one it was encoded under fails alone
// (FRAME_TOO_LARGE): resent, it would end the session for good, and with
// it the client.
func TestAPendingEventTooLargeForTheNextEdgeFailsAlone(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{Edges: 2, Edge: func(i int, cfg *server.Config) {
		cfg.Session.Limits = session.DefaultLimits()
		if i == 0 {
			cfg.Session.Limits.MaxFrameBytes, cfg.Session.Limits.MaxPayloadBytes = 1<<20, 512<<10
		}
	}})
	ctx, _, ca, b, _ := aboutToMove(t, r, "moving", nil)
	sent := make(chan error, 1)
	go func() { sent <- ca.Send(ctx, client.Message{Targets: []string{b.ID}, Payload: make([]byte, 200<<10)}) }()
	waitSent(t, r, 1)
	r.KillEdge(0) // a moves to edge 1, whose limit is 64 KiB
	var ce *client.Error
	if err := <-sent; !errors.As(err, &ce) || ce.Code != relayv1.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE {
		t.Fatalf("the large event after the move: %v, want FRAME_TOO_LARGE", err)
	}
	if err := ca.WaitConnected(ctx); err != nil {
		t.Fatalf("the client after the move: %v", err)
	}
	if err := ca.SendEphemeral(client.Message{Targets: []string{b.ID}, Payload: []byte("small")}); err != nil || ca.Err() != nil {
		t.Fatalf("a small event after the move: %v (client: %v)", err, ca.Err())
	}
}

// An event accepted by an edge whose frame limit is larger than the
// receiver's edge's is not delivered by that edge: its Deliver frame
// would be longer than the receiver reads (this client would reconnect
// and meet it again; relay.js would stop). The receiver's edge answers the
// forward not delivered, the sender's edge stores it, and the receiver's
// edge passes it by in the mailbox: the sender's next event arrives on
// the same session, and the large one waits in the mailbox, delivered
// once the device is on an edge that can. An ephemeral one is dropped.
func TestAnEventTooLargeForTheReceiversEdgeWaitsInTheMailbox(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{Edges: 2, Edge: func(i int, cfg *server.Config) {
		cfg.Session.Limits = session.DefaultLimits()
		if i == 0 {
			cfg.Session.Limits.MaxFrameBytes, cfg.Session.Limits.MaxPayloadBytes = 1<<20, 512<<10
		}
	}})
	u := r.User("mismatched")
	a, b := r.Device(u, "a"), r.Device(u, "b")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ca := r.Dial(0, a, client.QUIC)
	lost := make(chan client.SessionLost, 16)
	bcfg := r.ClientConfig(1, b, client.QUIC)
	bcfg.OnSessionLost = func(l client.SessionLost) { lost <- l }
	cb := dialWith(ctx, t, bcfg)
	waitOnline(t, ca, b.ID)

	large := bytes.Repeat([]byte("L"), 200<<10)
	if err := ca.SendEphemeral(client.Message{ID: "large-ephemeral", Targets: []string{b.ID}, Payload: large}); err != nil {
		t.Fatalf("send the large ephemeral event: %v", err)
	}
	for _, m := range []client.Message{
		{ID: "large", Targets: []string{b.ID}, Payload: large},
		{ID: "after", Targets: []string{b.ID}, Payload: []byte("after")},
	} {
		if err := ca.Send(ctx, m); err != nil {
			t.Fatalf("send %s: %v", m.ID, err)
		}
	}
	ev, err := cb.Receive(ctx)
	if err != nil || ev.ID != "after" {
		t.Fatalf("b on the edge with the smaller limit received %q (%v), want the event after the large one", ev.ID, err)
	}
	select {
	case l := <-lost:
		t.Fatalf("b lost its session: %+v", l)
	default:
	}
	clustertest.Eventually(t, 30*time.Second, func() error {
		for _, c := range []struct{ name, label, value string }{
			{"relay_edge_undeliverable_total", "source", "forward"},
			{"relay_edge_undeliverable_total", "source", "mailbox"},
			{"relay_edge_dropped_total", "reason", "too_large"},
		} {
			if got := relaytest.Counter(t, r.Edges[1], c.name, c.label, c.value); got != 1 {
				return fmt.Errorf("%s{%s=%q} = %v, want 1", c.name, c.label, c.value, got)
			}
		}
		return nil
	})
	if err := cb.Close(); err != nil {
		t.Fatalf("close b: %v", err)
	}

	// On the sender's edge, whose limit took it, the large event is
	// delivered from the mailbox, and only it: "after" was acknowledged.
	cb = r.Dial(0, b, client.QUIC)
	ev, err = cb.Receive(ctx)
	if err != nil || ev.ID != "large" || !bytes.Equal(ev.Payload, large) {
		t.Fatalf("b on the larger edge received %q of %d bytes (%v), want the large event", ev.ID, len(ev.Payload), err)
	}
	if err := ca.Send(ctx, client.Message{ID: "last", Targets: []string{b.ID}, Payload: []byte("last")}); err != nil {
		t.Fatalf("send last: %v", err)
	}
	if ev, err = cb.Receive(ctx); err != nil || ev.ID != "last" {
		t.Fatalf("b received %q (%v), want the last event", ev.ID, err)
	}
}

// Sends whose events expired while the device was away fail alone, with
// the EXPIRED *Error the edge would give, and are not sent again: the
// edge would refuse each one for the device's fault, and a device back
// with more of them than its refusal budget was closed as RATE_LIMITED,
// session after session, while the events behind them waited. Here the
// second edge's clock is a minute ahead (as if the device had slept that
// long) and takes one refusal: the events with a TTL of 10 s are expired
// by its clock, tolerance included, those with an hour are not. The
// client learns the edge's clock in the handshake, refuses the expired
// ones itself, and the edge refuses none: the session stays up and the
// others reach the receiver.
func TestExpiredPendingSendsFailWithoutBeingSent(t *testing.T) {
	const ahead = time.Minute
	r := relaytest.Start(t, relaytest.Options{Edges: 2, Edge: func(i int, cfg *server.Config) {
		cfg.Session.Limits = session.DefaultLimits()
		cfg.Session.Limits.SkewTolerance = time.Second
		cfg.Session.RefusalBurst, cfg.Session.RefusalsPerSecond = 1, 0.001
		if i == 1 {
			cfg.Session.Now = func() time.Time { return time.Now().Add(ahead) }
		}
	}})
	lost := make(chan client.SessionLost, 16)
	ctx, _, ca, b, cb := aboutToMove(t, r, "sleeper", func(l client.SessionLost) { lost <- l })

	const expiring, lasting = 6, 3
	send := func(k int, ttl time.Duration) <-chan error {
		done := make(chan error, 1)
		m := client.Message{ID: fmt.Sprintf("ev-%d", k), Targets: []string{b.ID}, Payload: fmt.Appendf(nil, "%d", k), TTL: ttl}
		go func() { done <- ca.Send(ctx, m) }()
		return done
	}
	var sends []<-chan error
	for k := range expiring {
		sends = append(sends, send(k, 10*time.Second))
		waitSent(t, r, k+1) // in seq order
	}
	r.KillEdge(0)
	// Sent while the device is cut off, behind the expiring ones.
	for k := expiring; k < expiring+lasting; k++ {
		sends = append(sends, send(k, time.Hour))
	}
	var ce *client.Error
	for k, done := range sends[:expiring] {
		if err := <-done; !errors.As(err, &ce) || ce.Code != relayv1.ErrorCode_ERROR_CODE_EXPIRED || !strings.Contains(ce.Message, fmt.Sprintf("ev-%d", k)) {
			t.Fatalf("send %d (expired): %v, want EXPIRED", k, err)
		}
	}
	// Sent at once, the lasting ones took their seqs in any order, and
	// arrive in that order. (b may still be on the dead edge, holding
	// expiring ones it delivered before it died: given, in order too.)
	got := map[string]bool{}
	var last uint64
	for len(got) < lasting {
		ev, err := cb.Receive(ctx)
		if err != nil {
			t.Fatalf("after %d events: %v", len(got), err)
		}
		if got[ev.ID] || ev.Seq <= last {
			t.Fatalf("received event %q (seq %d, after %d), want each once, in seq order", ev.Payload, ev.Seq, last)
		}
		last = ev.Seq
		if k, _ := strconv.Atoi(string(ev.Payload)); k >= expiring {
			got[ev.ID] = true
		}
	}
	for k, done := range sends[expiring:] {
		if err := <-done; err != nil {
			t.Fatalf("send %d: %v", expiring+k, err)
		}
	}
	// One session lost, the first edge's; the second's is up.
	if l := <-lost; l.Edge == r.Edges[1].Addr() {
		t.Fatalf("lost the session on the second edge: %v", l.Err)
	}
	select {
	case l := <-lost:
		t.Fatalf("lost a second session: %v", l.Err)
	default:
	}
	if n := relaytest.Counter(t, r.Edges[1], "relay_edge_events_total", "result", "expired"); n != 0 {
		t.Fatalf("the second edge refused %v events as expired: the client sent them again", n)
	}
	if ca.Edge() != r.Edges[1].Addr() || ca.SessionID() == "" {
		t.Fatalf("a is on %s (session %q), want a session on the second edge", ca.Edge(), ca.SessionID())
	}
}

// A device that comes back with much to resend, to an edge that paces
// its reading (bytes_per_second), reads what the edge has for it while
// its resend goes out: an edge whose writes to the device find no room
// for its write timeout ends the session as SLOW_CONSUMER, and the
// device would resend everything again on the next (a loop). Here a's
// events, 2 MB, wait for b's acks on edge 0, which is killed; a moves to
// edge 1, which reads 256 KiB a second from it (8 s for the resend) and
// gives a device 2 s to take a write, while c there sends a 1.2 MB of
// events: a receives them all, and its session on edge 1 lasts.
func TestAResendDoesNotStopTheReader(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{Edges: 2, Edge: func(i int, cfg *server.Config) {
		if i == 1 {
			cfg.Session.Limits = session.DefaultLimits()
			cfg.Session.Limits.BytesPerSecond = 256 << 10
			cfg.Session.WriteTimeout = 2 * time.Second
		}
	}})
	lost := make(chan client.SessionLost, 16)
	ctx, a, ca, b, _ := aboutToMove(t, r, "mover", func(l client.SessionLost) { lost <- l })
	cd := r.Device(b.UserID, "c")
	cc := r.Dial(1, cd, client.QUIC)
	const pending, pushed, size = 50, 30, 40 << 10
	for range pending {
		go func() { _ = ca.Send(ctx, client.Message{Targets: []string{b.ID}, Payload: make([]byte, size)}) }()
	}
	waitSent(t, r, pending)
	r.KillEdge(0)
	clustertest.Eventually(t, 30*time.Second, func() error {
		if ca.Edge() != r.Edges[1].Addr() || ca.SessionID() == "" {
			return errors.New("a is not on edge 1 yet")
		}
		return nil
	})
	sent := make(chan error, pushed)
	for k := range pushed {
		go func() {
			for {
				err := cc.Send(ctx, client.Message{ID: fmt.Sprint("push-", k), Targets: []string{a.ID}, Payload: make([]byte, size)})
				var ce *client.Error
				if errors.As(err, &ce) && ce.Retryable() && ctx.Err() == nil {
					continue
				}
				sent <- err
				return
			}
		}()
	}
	for got := 0; got < pushed; {
		select {
		case ev := <-ca.Events():
			if strings.HasPrefix(ev.ID, "push-") {
				got++
			}
		case l := <-lost:
			if l.Edge == r.Edges[1].Addr() {
				t.Fatalf("a's session on edge 1 ended after %d of c's events: %v", got, l.Err)
			}
		case <-ctx.Done():
			t.Fatalf("a received %d of c's %d events", got, pushed)
		}
	}
	for range pushed {
		if err := <-sent; err != nil {
			t.Fatalf("c's send: %v", err)
		}
	}
}

// aboutToMove connects two devices of a new user, a and b, to edge 0 of
// r over QUIC, both noticing a dead edge within 2 s (to move to the
// next); b's application takes nothing (until the test receives), so
// a's events wait for their acks. lost, if set, is a's OnSessionLost.
// The context ends with the test (a minute at most).
func aboutToMove(t *testing.T, r *relaytest.Relay, login string, lost func(client.SessionLost)) (ctx context.Context, a relaytest.Device, ca *client.Client, b relaytest.Device, cb *client.Client) {
	t.Helper()
	u := r.User(login)
	a, b = r.Device(u, "a"), r.Device(u, "b")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	acfg := r.ClientConfig(0, a, client.QUIC)
	acfg.IdleTimeout, acfg.OnSessionLost = 2*time.Second, lost
	ca = dialWith(ctx, t, acfg)
	bcfg := r.ClientConfig(0, b, client.QUIC)
	bcfg.ReceiveBuffer, bcfg.IdleTimeout = -1, 2*time.Second
	cb = dialWith(ctx, t, bcfg)
	waitOnline(t, ca, b.ID)
	return ctx, a, ca, b, cb
}

// waitSent waits until edge 0 of r has sent n durable deliveries.
func waitSent(t *testing.T, r *relaytest.Relay, n int) {
	t.Helper()
	clustertest.Eventually(t, 30*time.Second, func() error {
		if got := relaytest.Counter(t, r.Edges[0], "relay_edge_deliveries_total", "kind", "durable"); got < float64(n) {
			return fmt.Errorf("%v of %d events sent", got, n)
		}
		return nil
	})
}

// lagging starts a relay with two devices of one user connected over
// QUIC, a and b, b with the given ReceiveBuffer; the context ends with
// the test (a minute at most).
func lagging(t *testing.T, login string, receiveBuffer int) (r *relaytest.Relay, ctx context.Context, a relaytest.Device, ca *client.Client, b relaytest.Device, cb *client.Client) {
	t.Helper()
	r = relaytest.Start(t, relaytest.Options{Edges: 1})
	u := r.User(login)
	a, b = r.Device(u, "a"), r.Device(u, "b")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	ca = r.Dial(0, a, client.QUIC)
	cfg := r.ClientConfig(0, b, client.QUIC)
	cfg.ReceiveBuffer = receiveBuffer
	cb = dialWith(ctx, t, cfg)
	waitOnline(t, ca, b.ID)
	return r, ctx, a, ca, b, cb
}

// sendAsync sends payload from c to device to, and the outcome to out.
func sendAsync(ctx context.Context, c *client.Client, to, payload string, out chan<- error) {
	go func() { out <- c.Send(ctx, client.Message{Targets: []string{to}, Payload: []byte(payload)}) }()
}

// What a client wrote before Close reaches the edge: Close says goodbye
// after it and waits (within its bound) for the edge to hang up, because
// a QUIC or WebTransport close discards stream data not yet sent. Here
// each client sends one ephemeral event (on the stream: a new session's
// first) and closes at once, as `relayctl relay send --ephemeral` does;
// every one of them must arrive.
func TestCloseDeliversWhatWasWritten(t *testing.T) {
	for _, tr := range []client.Transport{client.QUIC, client.WebTransport, client.WebSocket} {
		t.Run(tr.String(), func(t *testing.T) {
			r := relaytest.Start(t, relaytest.Options{Edges: 1})
			u := r.User("parting")
			a, b := r.Device(u, "a"), r.Device(u, "b")
			rx := r.Dial(0, b, tr)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			var slowest time.Duration
			defer func() { t.Logf("the slowest Close took %v", slowest) }()
			for i := range 8 {
				tx, err := client.Dial(ctx, r.ClientConfig(0, a, tr))
				if err != nil {
					t.Fatal(err)
				}
				want := fmt.Sprint("parting ", i)
				if err := tx.SendEphemeral(client.Message{Targets: []string{b.ID}, Payload: []byte(want)}); err != nil {
					t.Fatal(err)
				}
				began := time.Now()
				closeWithin(t, tx, 20*time.Second)
				slowest = max(slowest, time.Since(began))
				rctx, rcancel := context.WithTimeout(ctx, 10*time.Second)
				ev, err := rx.Receive(rctx)
				rcancel()
				if err != nil || string(ev.Payload) != want {
					t.Fatalf("event %d: received %q, %v; want %q", i, ev.Payload, err, want)
				}
			}
		})
	}
}

// Close loses nothing written before it also while other goroutines are
// sending: the goodbye takes the write lock once, so no send comes between
// it and the wait for the edge, and every send that returned nil before
// it reaches the edge (here all ephemeral on the stream, NoDatagrams, so
// none may be lost on the way); sends after it fail.
func TestCloseDeliversWhatWasWrittenWhileOthersSend(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{Edges: 1})
	u := r.User("busy-parting")
	a, b := r.Device(u, "a"), r.Device(u, "b")
	rx := r.Dial(0, b, client.QUIC)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for round := range 5 {
		cfg := r.ClientConfig(0, a, client.QUIC)
		cfg.NoDatagrams = true
		tx, err := client.Dial(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		const senders, each = 3, 40
		var sent atomic.Int64
		var wg sync.WaitGroup
		for s := range senders {
			wg.Go(func() {
				for i := range each {
					m := client.Message{Targets: []string{b.ID}, Payload: fmt.Appendf(nil, "%d-%d-%d", round, s, i)}
					if tx.SendEphemeral(m) != nil {
						return
					}
					sent.Add(1)
				}
			})
		}
		// Close while the senders are busy.
		for sent.Load() < senders*each/4 {
			runtime.Gosched()
		}
		closeWithin(t, tx, 20*time.Second)
		wg.Wait()
		want := sent.Load()
		for got := int64(0); got < want; {
			rctx, rcancel := context.WithTimeout(ctx, 10*time.Second)
			ev, err := rx.Receive(rctx)
			rcancel()
			if err != nil {
				t.Fatalf("round %d: received %d of the %d events sent before Close: %v", round, got, want, err)
			}
			if strings.HasPrefix(string(ev.Payload), fmt.Sprint(round, "-")) {
				got++
			}
		}
	}
}
