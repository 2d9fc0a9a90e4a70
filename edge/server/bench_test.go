package server_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"runtime"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/devconn"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/edge/session"
	"github.com/edge-relay/relay/internal/relaytest"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// reportPercentiles reports p50 and p99 of the samples in microseconds.
func reportPercentiles(b *testing.B, samples []time.Duration) {
	if len(samples) == 0 {
		return
	}
	slices.Sort(samples)
	us := func(p int) float64 { return float64(clustertest.Percentile(samples, p).Nanoseconds()) / 1e3 }
	b.ReportMetric(us(50), "p50-µs")
	b.ReportMetric(us(99), "p99-µs")
	b.ReportMetric(0, "ns/op")
}

func benchRelay(b *testing.B) *relaytest.Relay {
	return relaytest.Start(b, relaytest.Options{Edge: func(_ int, cfg *server.Config) { benchLimits(cfg) }})
}

// benchLimits lifts the per-device budgets, so benchmarks measure the
// edge, not its limits.
func benchLimits(cfg *server.Config) {
	cfg.Session.Limits = session.DefaultLimits()
	cfg.Session.Limits.EventsPerSecond = 1e7
	cfg.Session.Limits.BytesPerSecond = 1e9
	cfg.Session.Limits.FramesPerSecond = 1e7
	cfg.Session.HandshakesPerSecond, cfg.Session.HandshakeBurst = 1e6, 1e6
	cfg.Session.QueueLen = 4096
}

// BenchmarkRoundTrip times 64-byte events between two devices of one
// user on one edge, each path twice through the edge:
//
//   - ack: device A sends a durable event to B; Send returns when the
//     edge relays B's receipt as A's Ack (A -> edge -> B -> edge -> A).
//   - echo: A sends an ephemeral event (a datagram) to B, B sends it back.
//
// The floors, in the same process and run: a bare quic-go forwarder on
// the same path (A -> forwarder -> B -> forwarder -> A, streams), and a
// bare stream echo (A -> server -> A).
func BenchmarkRoundTrip(b *testing.B) {
	payload := make([]byte, 64)
	for _, tr := range []client.Transport{client.QUIC, client.WebTransport} {
		b.Run("relay/"+tr.String()+"/ack", func(b *testing.B) { benchRelayRTT(b, tr, payload, false) })
		b.Run("relay/"+tr.String()+"/echo", func(b *testing.B) { benchRelayRTT(b, tr, payload, true) })
	}
	b.Run("floor/quic-forward", func(b *testing.B) { benchQUICForward(b, payload) })
	b.Run("floor/quic-echo", func(b *testing.B) { benchQUICEcho(b, payload) })
}

func benchRelayRTT(b *testing.B, tr client.Transport, payload []byte, echo bool) {
	r := benchRelay(b)
	u := r.User("rtt")
	da, db := r.Device(u, "a"), r.Device(u, "b")
	ca, cb := r.Dial(0, da, tr), r.Dial(0, db, tr)
	waitOnlineB(b, ca, db.ID)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	wg.Go(func() {
		for {
			ev, err := cb.Receive(ctx)
			if err != nil {
				return
			}
			if ev.Ephemeral {
				_ = cb.SendEphemeral(client.Message{Targets: []string{da.ID}, Payload: ev.Payload})
			}
		}
	})
	one := func() time.Duration {
		start := time.Now()
		if echo {
			if err := ca.SendEphemeral(client.Message{Targets: []string{db.ID}, Payload: payload}); err != nil {
				b.Fatal(err)
			}
			// A datagram may be lost; a lost round trip is retried, its
			// time not counted.
			wctx, wcancel := context.WithTimeout(ctx, time.Second)
			_, err := ca.Receive(wctx)
			wcancel()
			if err != nil {
				return -1
			}
		} else if err := ca.Send(ctx, client.Message{Targets: []string{db.ID}, Payload: payload}); err != nil {
			b.Fatal(err)
		}
		return time.Since(start)
	}
	for range 200 {
		one()
	}
	samples := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for len(samples) < b.N {
		if d := one(); d >= 0 {
			samples = append(samples, d)
		}
	}
	b.StopTimer()
	reportPercentiles(b, samples)
}

func waitOnlineB(b *testing.B, c *client.Client, id string) {
	b.Helper()
	clustertest.Eventually(b, 30*time.Second, func() error {
		if !slices.Contains(c.Online(), id) {
			return fmt.Errorf("%s is not online yet", id)
		}
		return nil
	})
}

func benchTLS(b *testing.B) (*tls.Config, *tls.Config) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		b.Fatal(err)
	}
	srv := &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, NextProtos: []string{"bench"}}
	cli := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"bench"}} //nolint:gosec // a benchmark's own server
	return srv, cli
}

// benchQUICEcho is the floor: a quic-go stream echo of the same payload.
func benchQUICEcho(b *testing.B, payload []byte) {
	srvTLS, cliTLS := benchTLS(b)
	ln, err := quic.ListenAddr("127.0.0.1:0", srvTLS, devconn.QUICConfig(30*time.Second))
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer ln.Close()
	wg.Go(func() {
		conn, err := ln.Accept(context.Background())
		if err != nil {
			return
		}
		str, err := conn.AcceptStream(context.Background())
		if err != nil {
			return
		}
		_, _ = io.Copy(str, str)
		_ = conn.CloseWithError(0, "")
	})
	conn, err := quic.DialAddr(context.Background(), ln.Addr().String(), cliTLS, devconn.QUICConfig(30*time.Second))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.CloseWithError(0, "")
	str, err := conn.OpenStreamSync(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, len(payload))
	samples := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		if _, err := str.Write(payload); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(str, buf); err != nil {
			b.Fatal(err)
		}
		samples = append(samples, time.Since(start))
	}
	b.StopTimer()
	_ = str.Close()
	reportPercentiles(b, samples)
}

// benchQUICForward is the floor with the relay's path: A's bytes go
// through a forwarder to B, which sends them back through it to A.
func benchQUICForward(b *testing.B, payload []byte) {
	srvTLS, cliTLS := benchTLS(b)
	ln, err := quic.ListenAddr("127.0.0.1:0", srvTLS, devconn.QUICConfig(30*time.Second))
	if err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer ln.Close()
	wg.Go(func() {
		var strs []*quic.Stream
		var conns []*quic.Conn
		for range 2 {
			conn, err := ln.Accept(context.Background())
			if err != nil {
				return
			}
			str, err := conn.AcceptStream(context.Background())
			if err != nil {
				return
			}
			conns, strs = append(conns, conn), append(strs, str)
		}
		var fw sync.WaitGroup
		fw.Go(func() { _, _ = io.Copy(strs[1], strs[0]) })
		fw.Go(func() { _, _ = io.Copy(strs[0], strs[1]) })
		fw.Wait()
		for _, c := range conns {
			_ = c.CloseWithError(0, "")
		}
	})
	dial := func() (*quic.Conn, *quic.Stream) {
		conn, err := quic.DialAddr(context.Background(), ln.Addr().String(), cliTLS, devconn.QUICConfig(30*time.Second))
		if err != nil {
			b.Fatal(err)
		}
		str, err := conn.OpenStreamSync(context.Background())
		if err != nil {
			b.Fatal(err)
		}
		// The forwarder accepts a stream once bytes arrive.
		if _, err := str.Write([]byte{0}); err != nil {
			b.Fatal(err)
		}
		return conn, str
	}
	ca, sa := dial()
	defer ca.CloseWithError(0, "")
	cb, sb := dial()
	defer cb.CloseWithError(0, "")
	// Each side reads the other's hello byte.
	one := make([]byte, 1)
	if _, err := io.ReadFull(sa, one); err != nil {
		b.Fatal(err)
	}
	if _, err := io.ReadFull(sb, one); err != nil {
		b.Fatal(err)
	}
	wg.Go(func() {
		buf := make([]byte, len(payload))
		for {
			if _, err := io.ReadFull(sb, buf); err != nil {
				return
			}
			if _, err := sb.Write(buf); err != nil {
				return
			}
		}
	})
	buf := make([]byte, len(payload))
	samples := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		if _, err := sa.Write(payload); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(sa, buf); err != nil {
			b.Fatal(err)
		}
		samples = append(samples, time.Since(start))
	}
	b.StopTimer()
	_ = sa.Close()
	_ = sb.Close()
	reportPercentiles(b, samples)
}

// BenchmarkHandshake measures sessions opened per second: a full
// handshake (challenge and Ed25519 signature) and a resume with a ticket.
// Each op is one connection: dial, handshake, close.
func BenchmarkHandshake(b *testing.B) {
	r := benchRelay(b)
	u := r.User("hs")
	d := r.Device(u, "d")
	for _, mode := range []string{"full", "resume", "resume+tls"} {
		b.Run(mode, func(b *testing.B) {
			cfg := r.ClientConfig(0, d, client.QUIC)
			// "resume+tls": the clients share a TLS session cache, as one
			// device's reconnects do; the others start without one.
			cfg.TLSSessions = tls.NewLRUClientSessionCache(8)
			ctx := context.Background()
			warm, err := client.Dial(ctx, cfg)
			if err != nil {
				b.Fatal(err)
			}
			_ = warm.Close()
			cpu := cpuTime()
			b.ResetTimer()
			for range b.N {
				c := cfg
				if mode != "resume+tls" {
					c.TLSSessions = tls.NewLRUClientSessionCache(1)
				}
				if mode != "full" {
					c.ResumeTicket = warm.ResumeTicket()
				}
				cl, err := client.Dial(ctx, c)
				if err != nil {
					b.Fatal(err)
				}
				if mode != "full" && !cl.Resumed() {
					b.Fatal("not resumed")
				}
				_ = cl.Close()
			}
			b.StopTimer()
			// Client and edge run in this process: the CPU is both sides'.
			b.ReportMetric(float64((cpuTime()-cpu).Microseconds())/float64(b.N), "cpu-µs/op")
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "handshakes/s")
		})
	}
}

// BenchmarkThroughput pushes durable 64-byte events through one edge:
// 8 users, each with a sender and a receiver, every sender keeping up to
// 64 events in flight. Reported: events delivered and acknowledged per
// second, and per core (GOMAXPROCS) of this process, which also runs the
// clients and the control plane.
func BenchmarkThroughput(b *testing.B) { throughput(b, benchRelay(b)) }

// BenchmarkTracingCost is BenchmarkThroughput with tracing off (no
// provider: the per-event path builds no span), and with an SDK provider
// sampling 1% and 100% of events into a batcher whose exporter discards.
// Reported besides events/s: the process's CPU time per event (clients
// and control plane included, the same in each case).
func BenchmarkTracingCost(b *testing.B) {
	for _, c := range []struct {
		name  string
		ratio float64
	}{{"off", -1}, {"sampled-1pct", 0.01}, {"sampled-100pct", 1}} {
		b.Run(c.name, func(b *testing.B) {
			var tp *sdktrace.TracerProvider
			if c.ratio >= 0 {
				tp = sdktrace.NewTracerProvider(sdktrace.WithBatcher(discard{}),
					sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.TraceIDRatioBased(c.ratio))))
				b.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
			}
			r := relaytest.Start(b, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
				benchLimits(cfg)
				if tp != nil {
					cfg.TracerProvider = tp
				}
			}})
			throughput(b, r)
		})
	}
}

// discard is a span exporter that drops what it gets.
type discard struct{}

func (discard) ExportSpans(context.Context, []sdktrace.ReadOnlySpan) error { return nil }
func (discard) Shutdown(context.Context) error                             { return nil }

func throughput(b *testing.B, r *relaytest.Relay) {
	const pairs, window = 8, 64
	type pair struct{ tx, rx *client.Client }
	var ps []pair
	for i := range pairs {
		u := r.User("tp" + string(rune('a'+i)))
		dt, dr := r.Device(u, "tx"), r.Device(u, "rx")
		ctx := context.Background()
		cfgT, cfgR := r.ClientConfig(0, dt, client.QUIC), r.ClientConfig(0, dr, client.QUIC)
		tx, err := client.Dial(ctx, cfgT)
		if err != nil {
			b.Fatal(err)
		}
		rx, err := client.Dial(ctx, cfgR)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = tx.Close(); _ = rx.Close() })
		waitOnlineB(b, tx, dr.ID)
		ps = append(ps, pair{tx, rx})
	}
	payload := make([]byte, 64)
	per := b.N/pairs + 1
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	b.ResetTimer()
	start, cpu := time.Now(), cpuTime()
	var wg sync.WaitGroup
	for _, p := range ps {
		wg.Go(func() {
			for range per {
				if _, err := p.rx.Receive(ctx); err != nil {
					return
				}
			}
		})
		wg.Go(func() {
			sem := make(chan struct{}, window)
			var inner sync.WaitGroup
			for range per {
				sem <- struct{}{}
				inner.Go(func() {
					defer func() { <-sem }()
					if err := p.tx.Send(ctx, client.Message{Payload: payload}); err != nil {
						b.Error(err)
					}
				})
			}
			inner.Wait()
		})
	}
	wg.Wait()
	el := time.Since(start)
	b.StopTimer()
	rate := float64(per*pairs) / el.Seconds()
	b.ReportMetric(float64((cpuTime()-cpu).Nanoseconds())/1e3/float64(per*pairs), "cpu-µs/event")
	b.ReportMetric(rate, "events/s")
	b.ReportMetric(rate/float64(runtime.GOMAXPROCS(0)), "events/s/core")
}

// BenchmarkCrossEdge times a durable 64-byte event from A to B and its
// ack back, with A and B on the same edge and on two meshed edges (the
// mesh hop's cost), everything in one process.
func BenchmarkCrossEdge(b *testing.B) {
	for _, mode := range []string{"same-edge", "cross-edge"} {
		b.Run(mode, func(b *testing.B) {
			r := relaytest.Start(b, relaytest.Options{Edges: 2, Edge: func(_ int, cfg *server.Config) {
				cfg.Session.Limits = session.DefaultLimits()
				cfg.Session.Limits.EventsPerSecond = 1e7
			}})
			r.WaitEdges(func(s *server.Server) error {
				if s.Mesh().Stats().LinksUp != 1 {
					return errors.New("not meshed")
				}
				return nil
			})
			u := r.User("x")
			da, db := r.Device(u, "a"), r.Device(u, "b")
			other := 0
			if mode == "cross-edge" {
				other = 1
			}
			ca, cb := r.Dial(0, da, client.QUIC), r.Dial(other, db, client.QUIC)
			waitOnlineB(b, ca, db.ID)
			ctx, cancel := context.WithCancel(context.Background())
			var wg sync.WaitGroup
			defer wg.Wait()
			defer cancel()
			wg.Go(func() {
				for {
					if _, err := cb.Receive(ctx); err != nil {
						return
					}
				}
			})
			payload := make([]byte, 64)
			for range 200 {
				if err := ca.Send(ctx, client.Message{Targets: []string{db.ID}, Payload: payload}); err != nil {
					b.Fatal(err)
				}
			}
			samples := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for range b.N {
				start := time.Now()
				if err := ca.Send(ctx, client.Message{Targets: []string{db.ID}, Payload: payload}); err != nil {
					b.Fatal(err)
				}
				samples = append(samples, time.Since(start))
			}
			b.StopTimer()
			reportPercentiles(b, samples)
		})
	}
}

// BenchmarkEdgeFailover: devices on an edge that dies (no goodbye) move
// to the other edges with their resume tickets. Reported: from the kill
// to every device connected again (device idle timeout 3s included),
// and the reconnect storm alone (from the first to the last device
// back). b.N is ignored: one failover of FAILOVER_DEVICES (default 1000)
// devices per run.
func BenchmarkEdgeFailover(b *testing.B) {
	n := 1000
	if v := os.Getenv("FAILOVER_DEVICES"); v != "" {
		fmt.Sscan(v, &n)
	}
	r := relaytest.Start(b, relaytest.Options{Edges: 3, Edge: func(_ int, cfg *server.Config) {
		cfg.Session.HandshakesPerSecond, cfg.Session.HandshakeBurst = 1e9, 1e9
		cfg.IdleTimeout = 3 * time.Second
	}})
	const perUser = 10
	var devs []relaytest.Device
	for u := 0; len(devs) < n; u++ {
		uid := r.User(fmt.Sprintf("f%d", u))
		for d := 0; d < perUser && len(devs) < n; d++ {
			devs = append(devs, r.Device(uid, fmt.Sprintf("d%d", d)))
		}
	}
	ctx := context.Background()
	clients := make([]*client.Client, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	// Clients share UDP sockets (1,000 connections each), as many devices
	// behind few addresses would; file descriptors stay few.
	var trs []*quic.Transport
	for range (n + 999) / 1000 {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		tr := &quic.Transport{Conn: pc}
		trs = append(trs, tr)
		b.Cleanup(func() { _ = tr.Close(); _ = pc.Close() })
	}
	// Each client reports its sessions; after the kill, the first one on
	// another edge is its move.
	edge0 := r.Edges[0].Addr()
	var mu sync.Mutex
	var killed bool
	var kill, first, last time.Time
	moved := map[int]bool{}
	allMoved := make(chan struct{})
	for i, d := range devs {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			cfg := r.ClientConfig(0, d, client.QUIC)
			cfg.QUICTransport = trs[i/1000]
			cfg.IdleTimeout = 3 * time.Second
			cfg.ReconnectMin, cfg.ReconnectMax = 50*time.Millisecond, 2*time.Second
			cfg.OnSession = func(si client.SessionInfo) {
				mu.Lock()
				defer mu.Unlock()
				if !killed || si.Edge == edge0 || moved[i] {
					return
				}
				now := time.Now()
				moved[i] = true
				if first.IsZero() {
					first = now
				}
				last = now
				if len(moved) == n {
					close(allMoved)
				}
			}
			c, err := client.Dial(ctx, cfg)
			if err != nil {
				b.Error(err)
				return
			}
			clients[i] = c
		})
	}
	wg.Wait()
	if b.Failed() {
		return
	}
	defer func() {
		for _, c := range clients {
			if c != nil {
				_ = c.Close()
			}
		}
	}()
	b.ResetTimer()
	mu.Lock()
	killed, kill = true, time.Now()
	mu.Unlock()
	r.KillEdge(0)
	select {
	case <-allMoved:
	case <-time.After(5 * time.Minute):
		mu.Lock()
		b.Fatalf("only %d of %d devices moved within 5 minutes", len(moved), n)
	}
	b.StopTimer()
	mu.Lock()
	defer mu.Unlock()
	resumed := 0.0
	for _, e := range r.Edges[1:] {
		resumed += relaytest.Counter(b, e, "relay_edge_handshakes_total", "result", "resumed")
	}
	b.ReportMetric(last.Sub(kill).Seconds(), "s-kill-to-all-back")
	b.ReportMetric(last.Sub(first).Seconds(), "s-storm")
	b.ReportMetric(resumed/float64(n), "resumed-fraction")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkNeighbourUnderFlood times another user's round trips (a
// durable 64-byte event and its ack, one every 10 ms, well within the
// edge's default limits) on an edge with its default limits, quiet and
// while one device floods events and another floods pings, each as fast
// as its transport lets it. The flooders are paced at the edge's reader
// (their own QUIC flow control holds them back), so the neighbour's
// p99 should barely move.
func BenchmarkNeighbourUnderFlood(b *testing.B) {
	for _, flood := range []bool{false, true} {
		name := "quiet"
		if flood {
			name = "flood"
		}
		b.Run(name, func(b *testing.B) {
			r := relaytest.Start(b, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
				cfg.Session.HandshakesPerSecond, cfg.Session.HandshakeBurst = 1e6, 1e6
			}})
			addr := r.Edges[0].Addr()
			ctx, cancel := context.WithCancel(context.Background())
			var wg sync.WaitGroup
			defer wg.Wait()
			defer cancel()
			if flood {
				mallory := r.User("mallory")
				sink := r.Device(mallory, "sink")
				r.Dial(0, sink, client.QUIC) // reads and acknowledges
				events, pings := relaytest.DialRaw(b, addr, client.QUIC), relaytest.DialRaw(b, addr, client.QUIC)
				events.Login(r.Device(mallory, "events"))
				pings.Login(r.Device(mallory, "pings"))
				payload := make([]byte, 1000)
				wg.Go(func() {
					for n := uint64(1); ctx.Err() == nil; n++ {
						ev := &relayv1.Event{Id: fmt.Sprintf("f%d", n), Seq: n, CreatedAtMs: time.Now().UnixMilli(), TtlMs: 60000, Payload: payload, Targets: []string{sink.ID}}
						if events.Send(&relayv1.Frame{Kind: &relayv1.Frame_Event{Event: ev}}) != nil {
							return
						}
					}
				})
				wg.Go(func() {
					for n := uint64(1); ctx.Err() == nil; n++ {
						if pings.Send(&relayv1.Frame{Kind: &relayv1.Frame_Ping{Ping: &relayv1.Ping{Nonce: n}}}) != nil {
							return
						}
					}
				})
				// The flooders read what comes back, as a real client would.
				for _, raw := range []*relaytest.Raw{events, pings} {
					wg.Go(func() {
						for ctx.Err() == nil {
							if _, err := raw.Next(time.Second); err != nil && ctx.Err() == nil && !isTimeout(err) {
								return
							}
						}
					})
				}
				defer events.Close()
				defer pings.Close()
			}
			u := r.User("neighbour")
			da, db := r.Device(u, "a"), r.Device(u, "b")
			ca := r.Dial(0, da, client.QUIC)
			r.Dial(0, db, client.QUIC)
			waitOnlineB(b, ca, db.ID)
			tick := time.NewTicker(10 * time.Millisecond)
			defer tick.Stop()
			samples := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for range b.N {
				<-tick.C
				start := time.Now()
				if err := ca.Send(ctx, client.Message{Targets: []string{db.ID}, Payload: make([]byte, 64)}); err != nil {
					b.Fatal(err)
				}
				samples = append(samples, time.Since(start))
			}
			b.StopTimer()
			reportPercentiles(b, samples)
			b.ReportMetric(relaytest.Counter(b, r.Edges[0], "relay_edge_paced_seconds_total", "", ""), "paced-s")
		})
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// cpuTime is the CPU time this process has used, user and system.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
