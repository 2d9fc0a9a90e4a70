package server_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/clustertest"
	controlserver "github.com/edge-relay/relay/control/server"
	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/edge/session"
	"github.com/edge-relay/relay/internal/relaytest"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// startMulti starts 3 control nodes and 3 edges, meshed, with timeouts
// short enough for fault tests.
func startMulti(t *testing.T, opts relaytest.Options) *relaytest.Relay {
	t.Helper()
	opts.ControlNodes, opts.Edges = 3, 3
	mod := opts.Edge
	opts.Edge = func(i int, cfg *server.Config) {
		cfg.DrainWindow = 300 * time.Millisecond
		cfg.IdleTimeout, cfg.MeshIdleTimeout = 2*time.Second, 2*time.Second
		cfg.Session.Limits = session.DefaultLimits()
		cfg.Session.Limits.EventsPerSecond = 1e6
		cfg.Session.HandshakesPerSecond, cfg.Session.HandshakeBurst = 1e6, 1e6
		if mod != nil {
			mod(i, cfg)
		}
	}
	r := relaytest.Start(t, opts)
	waitMeshed(t, r)
	return r
}

// waitMeshed waits until every running edge has a link up to every other.
func waitMeshed(t *testing.T, r *relaytest.Relay) {
	t.Helper()
	n := 0
	for _, e := range r.Edges {
		if e != nil {
			n++
		}
	}
	r.WaitEdges(func(s *server.Server) error {
		if up := s.Mesh().Stats().LinksUp; up != n-1 {
			return fmt.Errorf("edge has %d links up, want %d", up, n-1)
		}
		return nil
	})
}

// dial connects a device to edge i with a short idle timeout, so a
// killed edge is noticed quickly.
func dial(t *testing.T, r *relaytest.Relay, i int, d relaytest.Device, tr client.Transport) *client.Client {
	t.Helper()
	cfg := r.ClientConfig(i, d, tr)
	cfg.IdleTimeout = 2 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, cfg)
	if err != nil {
		t.Fatalf("dial edge %d as %s: %v", i, d.ID, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// sendRetrying sends m until it is acknowledged, retrying what the relay
// says may succeed later (the same id: receivers never see it twice),
// pausing a little when a queue or mailbox is full.
func sendRetrying(ctx context.Context, c *client.Client, m client.Message) error {
	for {
		err := c.Send(ctx, m)
		var ce *client.Error
		if err == nil || !errors.As(err, &ce) || !ce.Retryable() || ctx.Err() != nil {
			return err
		}
		if ce.Code == relayv1.ErrorCode_ERROR_CODE_MAILBOX_FULL || ce.Code == relayv1.ErrorCode_ERROR_CODE_QUEUE_FULL {
			select {
			case <-time.After(20 * time.Millisecond):
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
}

// Devices of one user spread over 3 edges exchange events both ways:
// all delivered once, in per-sender order, all acknowledged.
func TestDevicesAcrossEdges(t *testing.T) {
	r := startMulti(t, relaytest.Options{})
	u := r.User("spread")
	const n, per = 6, 100
	var cs []*client.Client
	var ids []string
	for i := range n {
		d := r.Device(u, fmt.Sprintf("d%d", i))
		tr := []client.Transport{client.QUIC, client.WebTransport, client.WebSocket}[i%3]
		cs = append(cs, dial(t, r, i%3, d, tr))
		ids = append(ids, d.ID)
	}
	// Presence crosses edges too.
	clustertest.Eventually(t, 30*time.Second, func() error {
		for i, c := range cs {
			if got := len(c.Online()); got != n-1 {
				return fmt.Errorf("device %d sees %d others online", i, got)
			}
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	errs := make(chan error, 2*n)
	var wg sync.WaitGroup
	for i, c := range cs {
		wg.Go(func() {
			for k := range per {
				if err := c.Send(ctx, client.Message{Payload: fmt.Appendf(nil, "%d/%d", i, k)}); err != nil {
					errs <- fmt.Errorf("sender %d event %d: %w", i, k, err)
					return
				}
			}
		})
		wg.Go(func() {
			next := map[string]int{}
			for range (n - 1) * per {
				ev, err := c.Receive(ctx)
				if err != nil {
					errs <- fmt.Errorf("receiver %d: %w", i, err)
					return
				}
				var from, k int
				if _, err := fmt.Sscanf(string(ev.Payload), "%d/%d", &from, &k); err != nil || ids[from] != ev.Sender || k != next[ev.Sender] {
					errs <- fmt.Errorf("receiver %d: %q from %s, want event %d", i, ev.Payload, ev.Sender, next[ev.Sender])
					return
				}
				next[ev.Sender]++
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// The events crossed the mesh (not only mailboxes).
	forwarded := 0.0
	for _, e := range r.Edges {
		forwarded += relaytest.Counter(t, e, "relay_edge_mesh_forwards_total", "outcome", "delivered")
	}
	if forwarded < float64(n*per) {
		t.Fatalf("only %v events crossed the mesh", forwarded)
	}
	// An ephemeral broadcast reaches every other device, on every edge.
	if err := cs[0].SendEphemeral(client.Message{Type: "wave", Payload: []byte("everyone")}); err != nil {
		t.Fatal(err)
	}
	for i, c := range cs[1:] {
		ev, err := c.Receive(ctx)
		if err != nil || !ev.Ephemeral || ev.Sender != ids[0] || string(ev.Payload) != "everyone" {
			t.Fatalf("device %d (edge %d): %+v, %v; want the ephemeral broadcast", i+1, (i+1)%3, ev, err)
		}
	}
}

// An offline device gets what was sent while it was away when it
// connects to any edge, in order; expired events never arrive; a full
// mailbox refuses with its own code.
func TestOfflineDeviceAndMailboxes(t *testing.T) {
	r := startMulti(t, relaytest.Options{
		Edge: func(_ int, cfg *server.Config) { cfg.Session.Limits.SkewTolerance = 50 * time.Millisecond },
		Cluster: clustertest.Options{Configure: func(c *controlserver.Config) {
			c.Mailbox.MaxEntriesPerDevice = 25
		}},
	})
	u := r.User("away")
	a, b := r.Device(u, "a"), r.Device(u, "b")
	ca := dial(t, r, 0, a, client.QUIC)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// Every fifth event lives a second: gone by the time b connects. A
	// loaded machine may take longer than that to store one, which the
	// control plane then refuses as expired: it never arrives either way.
	var shortGone time.Time
	for k := range 20 {
		ttl, short := time.Hour, k%5 == 4
		if short {
			ttl = time.Second
		}
		err := ca.Send(ctx, client.Message{Targets: []string{b.ID}, Payload: fmt.Appendf(nil, "%d", k), TTL: ttl})
		if err != nil && !(short && errors.Is(err, &client.Error{Code: relayv1.ErrorCode_ERROR_CODE_EXPIRED})) {
			t.Fatalf("event %d: %v", k, err)
		}
		if short {
			// Created before now, so expired by then (TTL and tolerance).
			shortGone = time.Now().Add(ttl + 50*time.Millisecond)
		}
	}
	// The short-lived ones expire: wait for the clock to pass them.
	<-time.After(time.Until(shortGone) + 10*time.Millisecond)
	cb := dial(t, r, 2, b, client.WebTransport)
	var got []string
	for len(got) < 16 {
		ev, err := cb.Receive(ctx)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, string(ev.Payload))
	}
	var want []string
	for k := range 20 {
		if k%5 != 4 {
			want = append(want, fmt.Sprint(k))
		}
	}
	if !slices.Equal(got, want) {
		t.Fatalf("b got %v, want %v", got, want)
	}
	short, cancel2 := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel2()
	if ev, err := cb.Receive(short); err == nil {
		t.Fatalf("an expired event arrived: %q", ev.Payload)
	}

	// A full mailbox refuses with MAILBOX_FULL and keeps what it holds.
	c := r.Device(u, "c")
	for k := range 30 {
		err := ca.Send(ctx, client.Message{Targets: []string{c.ID}, Payload: fmt.Appendf(nil, "%d", k)})
		switch {
		case k < 25 && err != nil:
			t.Fatalf("event %d: %v", k, err)
		case k >= 25 && !errors.Is(err, &client.Error{Code: relayv1.ErrorCode_ERROR_CODE_MAILBOX_FULL}):
			t.Fatalf("event %d beyond the quota: %v", k, err)
		}
	}
	cc := dial(t, r, 1, c, client.QUIC)
	for k := range 25 {
		ev, err := cc.Receive(ctx)
		if err != nil || string(ev.Payload) != fmt.Sprint(k) {
			t.Fatalf("c's event %d: %q %v", k, ev.Payload, err)
		}
	}
}

// Kill an edge (no graceful shutdown) while devices on it send and
// receive: they reconnect to other edges with their resume tickets, and
// every event acknowledged to its sender is delivered exactly once at
// the receiving client API.
func TestKillAnEdgeDuringTraffic(t *testing.T) {
	r := startMulti(t, relaytest.Options{})
	runTrafficThrough(t, r, func() { r.KillEdge(0) })
	resumed := 0.0
	for _, e := range r.Edges {
		if e != nil {
			resumed += relaytest.Counter(t, e, "relay_edge_handshakes_total", "result", "resumed")
		}
	}
	if resumed < 2 {
		t.Fatalf("%v resumed handshakes on the surviving edges", resumed)
	}
}

// Kill the control plane's leader during the same traffic: same
// guarantee.
func TestKillTheLeaderDuringTraffic(t *testing.T) {
	r := startMulti(t, relaytest.Options{})
	runTrafficThrough(t, r, func() { r.Cluster.Kill(r.Cluster.Leader()) })
}

// SIGTERM an edge under traffic: nothing is lost, clients move.
func TestGracefulEdgeShutdownDuringTraffic(t *testing.T) {
	r := startMulti(t, relaytest.Options{})
	runTrafficThrough(t, r, func() { r.StopEdge(0) })
}

// runTrafficThrough has two devices on edge 0 and one on edge 1 send to
// each other, a fault strike halfway, and checks that every acked event
// arrived exactly once (and nothing unacked arrived twice).
func runTrafficThrough(t *testing.T, r *relaytest.Relay, fault func()) {
	t.Helper()
	u := r.User("faulty")
	devs := []relaytest.Device{r.Device(u, "a"), r.Device(u, "b"), r.Device(u, "c")}
	edges := []int{0, 0, 1}
	cs := make([]*client.Client, len(devs))
	for i, d := range devs {
		cs[i] = dial(t, r, edges[i], d, client.QUIC)
	}
	const per = 1667 // events per (sender, target): 6 pairs, 10,002 events
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	type key struct{ from, to int }
	var mu sync.Mutex
	acked := map[key]map[string]bool{}
	received := map[int]map[string]int{}
	for i := range devs {
		received[i] = map[string]int{}
	}
	// Per-sender order: each pair's events are sent one after the other
	// (the next once the last was acked), so they must arrive in order
	// (the client drops duplicates by id, and reorders nothing).
	last := map[key]int{}
	var reordered []string
	var sent atomic.Int64
	var senders, receivers sync.WaitGroup
	rctx, stopReceivers := context.WithCancel(ctx)
	for i, c := range cs {
		receivers.Go(func() {
			for {
				ev, err := c.Receive(rctx)
				if err != nil {
					return
				}
				mu.Lock()
				received[i][ev.ID]++
				var from, to, n int
				if _, err := fmt.Sscanf(ev.ID, "%d-%d-%d", &from, &to, &n); err == nil && received[i][ev.ID] == 1 {
					k := key{from, to}
					if prev, ok := last[k]; ok && n < prev {
						reordered = append(reordered, fmt.Sprintf("%s after %d-%d-%d", ev.ID, from, to, prev))
					}
					last[k] = max(last[k], n)
				}
				mu.Unlock()
			}
		})
		for j := range devs {
			if j == i {
				continue
			}
			// Under mu: senders started earlier read acked meanwhile.
			mine := map[string]bool{}
			mu.Lock()
			acked[key{i, j}] = mine
			mu.Unlock()
			senders.Go(func() {
				for n := range per {
					id := fmt.Sprintf("%d-%d-%d", i, j, n)
					err := sendRetrying(ctx, c, client.Message{ID: id, Targets: []string{devs[j].ID}, Payload: []byte(id)})
					if err != nil {
						t.Errorf("%s: %v", id, err)
						return
					}
					mu.Lock()
					mine[id] = true
					mu.Unlock()
					sent.Add(1)
				}
			})
		}
	}
	clustertest.Eventually(t, time.Minute, func() error {
		if sent.Load() < 6*per/2 {
			return fmt.Errorf("%d acked so far", sent.Load())
		}
		return nil
	})
	fault()
	senders.Wait()
	// Every acked event reaches its receiver.
	clustertest.Eventually(t, time.Minute, func() error {
		mu.Lock()
		defer mu.Unlock()
		for k, ids := range acked {
			for id := range ids {
				if received[k.to][id] == 0 {
					return fmt.Errorf("acked %s not received by %d", id, k.to)
				}
			}
		}
		return nil
	})
	stopReceivers()
	receivers.Wait()
	mu.Lock()
	defer mu.Unlock()
	for to, ids := range received {
		for id, n := range ids {
			if n != 1 {
				t.Errorf("device %d got %s %d times", to, id, n)
			}
		}
	}
	if len(reordered) > 0 {
		t.Errorf("%d events overtook an earlier one of their sender, e.g. %v", len(reordered), reordered[:min(5, len(reordered))])
	}
}

// Routing state does not leak: 10,000 device sessions connect to and
// leave 3 edges (with events crossing the mesh while they are up), and
// then every table is back to its starting size. goleak (TestMain)
// checks that no goroutine is left.
func TestNoRoutingStateLeaks(t *testing.T) {
	// Default idle timeouts: with the race detector and 32 handshakes at
	// once on 2 cores, a handshake can be silent for over 2 s.
	r := startMulti(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
		cfg.IdleTimeout, cfg.MeshIdleTimeout = 30*time.Second, 15*time.Second
	}})
	const users, perUser, rounds = 50, 10, 20 // 500 devices, 10,000 sessions
	var devs [][]relaytest.Device
	for u := range users {
		uid := r.User(fmt.Sprintf("leak%d", u))
		var ds []relaytest.Device
		for d := range perUser {
			ds = append(ds, r.Device(uid, fmt.Sprintf("d%d", d)))
		}
		devs = append(devs, ds)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	sem := make(chan struct{}, 32)
	for round := range rounds {
		clients := make([][]*client.Client, users)
		var wg sync.WaitGroup
		var mu sync.Mutex
		for u := range users {
			clients[u] = make([]*client.Client, perUser)
			for d := range perUser {
				sem <- struct{}{}
				wg.Go(func() {
					defer func() { <-sem }()
					cfg := r.ClientConfig((u+d+round)%3, devs[u][d], client.QUIC)
					c, err := client.Dial(ctx, cfg)
					for try := 0; err != nil && try < 3; try++ {
						// A device retries a failed connection, as clients do.
						c, err = client.Dial(ctx, cfg)
					}
					if err != nil {
						t.Errorf("round %d: %v", round, err)
						return
					}
					mu.Lock()
					clients[u][d] = c
					mu.Unlock()
				})
			}
		}
		wg.Wait()
		if t.Failed() {
			return
		}
		// One event per user, to a device on another edge.
		for u := range users {
			wg.Go(func() {
				if err := sendRetrying(ctx, clients[u][0], client.Message{Targets: []string{devs[u][1].ID}, Payload: []byte("x")}); err != nil {
					t.Errorf("round %d: %v", round, err)
				}
			})
		}
		wg.Wait()
		for u := range users {
			for _, c := range clients[u] {
				wg.Go(func() { _ = c.Close() })
			}
		}
		wg.Wait()
	}
	r.WaitEdges(func(s *server.Server) error {
		if st := s.Hub().Stats(); st != (session.Stats{}) {
			return fmt.Errorf("hub tables: %+v", st)
		}
		if st := s.Mesh().Stats(); st.RemoteDevices != 0 || st.RemoteUsers != 0 || st.PeerSets != 0 || st.Pending != 0 {
			return fmt.Errorf("mesh tables: %+v", st)
		}
		return nil
	})
}

// An "any one" event across edges and a mailbox: both online targets
// receive it, exactly one keeps it (the other is told it was taken), and
// the offline target never gets it.
func TestAnyOneAcrossEdges(t *testing.T) {
	r := startMulti(t, relaytest.Options{})
	u := r.User("caller")
	a, b, c, d := r.Device(u, "a"), r.Device(u, "b"), r.Device(u, "c"), r.Device(u, "d")
	ca, cb, cc := dial(t, r, 0, a, client.QUIC), dial(t, r, 1, b, client.QUIC), dial(t, r, 2, c, client.WebTransport)
	clustertest.Eventually(t, 30*time.Second, func() error {
		if len(ca.Online()) != 2 {
			return fmt.Errorf("a sees %v", ca.Online())
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const calls = 20
	for k := range calls {
		if err := ca.Send(ctx, client.Message{ID: fmt.Sprintf("call-%d", k), Payload: []byte("ring"), AnyOne: true}); err != nil {
			t.Fatal(err)
		}
	}
	// Each of b and c gets every call; for each call exactly one of them
	// is told afterwards that the other took it.
	// They are read until all 3 per call arrived (a claim may wait for an
	// election on a loaded machine), then for another half second, in
	// which any more would show.
	got := map[string]map[string]int{} // call -> device -> events
	var (
		mu       sync.Mutex
		wg       sync.WaitGroup
		total    int
		allInAt  time.Time
		expected = 3 * calls
	)
	for name, cl := range map[string]*client.Client{"b": cb, "c": cc} {
		wg.Go(func() {
			for {
				rctx, rcancel := context.WithTimeout(ctx, 100*time.Millisecond)
				ev, err := cl.Receive(rctx)
				rcancel()
				if err != nil {
					if ctx.Err() != nil || !errors.Is(err, context.DeadlineExceeded) {
						return
					}
					mu.Lock()
					done := total >= expected && time.Since(allInAt) > 500*time.Millisecond
					mu.Unlock()
					if done {
						return
					}
					continue
				}
				if !ev.AnyOne && !ev.Cancelled {
					t.Errorf("%s: not an any-one event: %+v", name, ev)
				}
				mu.Lock()
				if got[ev.ID] == nil {
					got[ev.ID] = map[string]int{}
				}
				got[ev.ID][name]++
				if total++; total == expected {
					allInAt = time.Now()
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if len(got) != calls {
		t.Fatalf("%d calls arrived, want %d", len(got), calls)
	}
	for id, m := range got {
		// One device: the event only (it took it); the other: the event
		// and its cancellation.
		if !(m["b"] == 1 && m["c"] == 2) && !(m["b"] == 2 && m["c"] == 1) {
			t.Errorf("%s: %v", id, m)
		}
	}
	// The offline device's copies were withdrawn when the calls were taken.
	cd := dial(t, r, 0, d, client.QUIC)
	short, cancel2 := context.WithTimeout(ctx, time.Second)
	defer cancel2()
	if ev, err := cd.Receive(short); err == nil {
		t.Fatalf("the offline device got %s after it was taken", ev.ID)
	}
}

// An edge told to advertise a host alone for its mesh (as Kubernetes
// substitutes $(POD_IP)) registers it with the port its mesh bound, and
// the edges link.
func TestMeshAdvertiseAHostAlone(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{Edges: 2, Edge: func(_ int, cfg *server.Config) {
		cfg.MeshAdvertise = "127.0.0.1"
	}})
	clustertest.Eventually(t, 30*time.Second, func() error {
		for i, e := range r.Edges {
			if up := e.Mesh().Stats().LinksUp; up != 1 {
				return fmt.Errorf("edge %d: %d mesh links up, want 1", i, up)
			}
		}
		return nil
	})
}

// The newer session of a device wins across edges, by the start each
// edge announces; a device that moves to an edge whose clock is behind
// that of the edge it left (here by two minutes, well within the skew
// events tolerate) keeps its new session, and the old one is replaced.
// Before, the new edge's start looked older: the old session, whose
// client may be gone with its network, stayed, and the device could not
// be reached where it now was.
func TestAMoveToAnEdgeWhoseClockIsBehind(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{ControlNodes: 1, Edges: 2, Edge: func(i int, cfg *server.Config) {
		if i == 0 {
			cfg.Session.Now = func() time.Time { return time.Now().Add(2 * time.Minute) }
		}
	}})
	waitMeshed(t, r)
	u := r.User("mover")
	d, w := r.Device(u, "moving"), r.Device(u, "watching")
	watcher := dial(t, r, 1, w, client.QUIC)
	old := dial(t, r, 0, d, client.QUIC)
	clustertest.Eventually(t, 30*time.Second, func() error {
		if at, ok := r.Edges[1].Mesh().Locate(d.ID); !ok || at != "edge-0" {
			return fmt.Errorf("edge-1 places the device at %q %v, want edge-0", at, ok)
		}
		return nil
	})

	moved := dial(t, r, 1, d, client.QUIC)
	clustertest.Eventually(t, 30*time.Second, func() error {
		if err := moved.Err(); err != nil {
			return fmt.Errorf("the new session on the edge behind ended: %v", err)
		}
		if old.Err() == nil {
			return errors.New("the old session on the edge ahead still runs")
		}
		return nil
	})
	var ce *client.Error
	if err := old.Err(); !errors.As(err, &ce) || ce.Code != relayv1.ErrorCode_ERROR_CODE_REPLACED {
		t.Fatalf("the old session ended with %v, want REPLACED", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := watcher.Send(ctx, client.Message{Targets: []string{d.ID}, Payload: []byte("here")}); err != nil {
		t.Fatal(err)
	}
	if ev, err := moved.Receive(ctx); err != nil || string(ev.Payload) != "here" {
		t.Fatalf("the moved device got %+v, %v; want the watcher's event", ev, err)
	}
	if err := moved.Err(); err != nil {
		t.Fatalf("the new session ended: %v", err)
	}
}
