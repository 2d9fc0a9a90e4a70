package transport_test

// A hostile but authenticated device, tried over every transport against
// real edges: whatever it does, its session ends with a typed code within
// a bound, and the edge is left as it was (no session, no goroutine of
// it). The raw client plays the device (internal/relaytest.Raw).

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/frame"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/edge/session"
	"github.com/edge-relay/relay/internal/relaytest"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// TestMain checks that nothing is left behind, network reads included.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		goleak.IgnoreTopFunction("github.com/cockroachdb/pebble/v2/internal/cache.(*shard).releaseLoop"),
	)
}

var transports = []client.Transport{client.QUIC, client.WebTransport, client.WebSocket}

// hostileLimits are the edge settings of these tests: generous rates (so
// filling a device's stream is quick) and a small control queue.
func hostileLimits(cfg *server.Config) {
	cfg.Session.HandshakesPerSecond, cfg.Session.HandshakeBurst = 1000, 1000
	cfg.Session.ControlQueueLen = 64
	cfg.Session.CloseLinger = time.Second
	cfg.Session.WriteTimeout = time.Minute
	cfg.Session.Limits.EventsPerSecond = 10000
	cfg.Session.Limits.BytesPerSecond = 64 << 20
	cfg.Session.Limits.FramesPerSecond = 100000
	cfg.Session.Limits.FrameTimeout = time.Second
	cfg.DrainWindow = time.Second
}

func startRelay(t *testing.T, edges int, mod func(i int, cfg *server.Config)) *relaytest.Relay {
	t.Helper()
	return relaytest.Start(t, relaytest.Options{Edges: edges, Edge: func(i int, cfg *server.Config) {
		hostileLimits(cfg)
		if mod != nil {
			mod(i, cfg)
		}
	}})
}

// seq numbers events (and users) across the tests, which is fine for a
// device: seqs only have to grow.
var seq atomic.Uint64

// event is an event from the raw device as to target (none: broadcast).
func event(payload []byte, targets ...string) *relayv1.Frame {
	n := seq.Add(1)
	return &relayv1.Frame{Kind: &relayv1.Frame_Event{Event: &relayv1.Event{
		Id: fmt.Sprintf("e%d", n), Seq: n, CreatedAtMs: time.Now().UnixMilli(), TtlMs: 60000,
		Type: "t", Payload: payload, Targets: targets,
	}}}
}

// stall logs a victim device in over tr on edge i and fills its stream
// until its queue is full, so the edge's writer for it is blocked in a
// write it cannot finish: the device reads nothing. The sender is a
// device of the same user on the same edge, over QUIC.
func stall(t *testing.T, r *relaytest.Relay, i int, tr client.Transport) (victim *relaytest.Raw, dev relaytest.Device, sender *relaytest.Raw) {
	t.Helper()
	user := r.User(fmt.Sprintf("stall-%d", seq.Add(1)))
	dev = r.Device(user, "victim")
	sdev := r.Device(user, "sender")
	sender = r.DialRaw(t, i, client.QUIC)
	sender.Login(sdev)
	victim = r.DialRaw(t, i, tr)
	victim.Login(dev)
	payload := bytes.Repeat([]byte("x"), 48<<10)
	deadline := time.Now().Add(90 * time.Second)
	for time.Now().Before(deadline) {
		for range 16 {
			if err := sender.Send(event(payload, dev.ID)); err != nil {
				t.Fatalf("sender: %v", err)
			}
		}
		for {
			f, err := sender.Next(200 * time.Millisecond)
			if err != nil {
				break // nothing more for now
			}
			if ch := f.GetChallenge(); ch != nil {
				sender.Answer(ch, sdev.Key)
			}
			if f.GetReject().GetCode() == relayv1.ErrorCode_ERROR_CODE_QUEUE_FULL {
				return victim, dev, sender
			}
		}
	}
	t.Fatalf("the victim's queue never filled")
	return nil, relaytest.Device{}, nil
}

// settled waits until edge e has no more sessions than base, and no
// more connection goroutines than goroutines.
func settled(t *testing.T, e *server.Server, base session.Stats, goroutines int) {
	t.Helper()
	relaytest.WaitEdge(t, e, 20*time.Second, func(st session.Stats) error {
		if st.Sessions > base.Sessions || st.Serving > base.Serving {
			return fmt.Errorf("sessions %+v, want at most %+v", st, base)
		}
		return nil
	})
	relaytest.WaitSessionGoroutines(t, goroutines, 20*time.Second)
}

// Every reason a session is closed for ends a session whose writer is
// blocked on a device that stopped reading: the session leaves the edge
// and so do its goroutines; over QUIC the device learns the code from
// the connection's close (the Close frame cannot reach it).
func TestClosesWithABlockedWriter(t *testing.T) {
	const (
		plain      = 0 // WriteTimeout of a minute
		writeLimit = 1 // WriteTimeout of 2 s
		shortAge   = 2 // MaxSessionAge of 4 s
	)
	r := startRelay(t, 3, func(i int, cfg *server.Config) {
		switch i {
		case writeLimit:
			cfg.Session.WriteTimeout = 2 * time.Second
		case shortAge:
			cfg.Session.MaxSessionAge = 4 * time.Second
			cfg.Session.HandshakeTimeout = 2 * time.Second
		}
	})
	reasons := []struct {
		name string
		edge int
		code relayv1.ErrorCode
		do   func(t *testing.T, victim *relaytest.Raw, dev relaytest.Device, tr client.Transport)
	}{
		{"control frames pile up", plain, relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER, func(t *testing.T, victim *relaytest.Raw, _ relaytest.Device, _ client.Transport) {
			for n := range 200 {
				if err := victim.Send(&relayv1.Frame{Kind: &relayv1.Frame_Ping{Ping: &relayv1.Ping{Nonce: uint64(n)}}}); err != nil {
					return // the edge closed it already
				}
			}
		}},
		{"a write takes too long", writeLimit, relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER, func(*testing.T, *relaytest.Raw, relaytest.Device, client.Transport) {}},
		{"replaced", plain, relayv1.ErrorCode_ERROR_CODE_REPLACED, func(t *testing.T, _ *relaytest.Raw, dev relaytest.Device, tr client.Transport) {
			r.DialRaw(t, plain, tr).Login(dev)
		}},
		{"revoked", plain, relayv1.ErrorCode_ERROR_CODE_REVOKED, func(t *testing.T, _ *relaytest.Raw, dev relaytest.Device, _ client.Transport) {
			r.RevokeDevice(dev)
		}},
		{"no answer at the maximum age", shortAge, relayv1.ErrorCode_ERROR_CODE_SESSION_EXPIRED, func(*testing.T, *relaytest.Raw, relaytest.Device, client.Transport) {}},
	}
	for _, reason := range reasons {
		for _, tr := range transports {
			t.Run(fmt.Sprintf("%s/%s", reason.name, tr), func(t *testing.T) {
				e := r.Edges[reason.edge]
				victim, dev, sender := stall(t, r, reason.edge, tr)
				_ = sender
				// The baseline is the edge without the victim: the sender's
				// session and goroutines stay.
				base := e.Hub().Stats()
				base.Sessions--
				base.Serving--
				goroutines, _ := relaytest.SessionGoroutines()
				reason.do(t, victim, dev, tr)
				if reason.name == "replaced" {
					// The replacing session stays.
					base.Sessions++
					base.Serving++
				}
				settled(t, e, base, goroutines)
				end, err := victim.WaitEnd(30 * time.Second)
				if err != nil {
					t.Fatal(err)
				}
				if tr == client.QUIC && end.Code != reason.code {
					t.Fatalf("the device saw %v (%q), want %v", end.Code, end.Msg, reason.code)
				}
			})
		}
	}
}

// Shutting an edge down with a stuck device on every transport takes no
// longer than the drain window plus the close linger and the transports'
// close waits, and leaves no connection goroutine behind.
func TestShutdownWithStuckDevices(t *testing.T) {
	r := startRelay(t, 2, nil)
	goroutines, _ := relaytest.SessionGoroutines()
	for _, tr := range transports {
		stall(t, r, 1, tr)
	}
	start := time.Now()
	r.StopEdge(1)
	// Drain window 1 s, linger 1 s, close wait 1 s, and slack for a busy
	// machine: the old code hung here for minutes.
	if took := time.Since(start); took > 20*time.Second {
		t.Fatalf("shutdown took %s", took)
	}
	relaytest.WaitSessionGoroutines(t, goroutines, 20*time.Second)
}

// Half a frame, then silence, ends the session with TIMEOUT after the
// frame timeout, before and after the handshake; on a WebSocket a
// message left unfinished does the same, by the idle timeout.
func TestHalfFramesTimeOut(t *testing.T) {
	r := startRelay(t, 1, func(_ int, cfg *server.Config) { cfg.IdleTimeout = 3 * time.Second })
	user := r.User("half-frames")
	dev := r.Device(user, "d")
	e := r.Edges[0]
	half, _ := frame.Append(nil, event(bytes.Repeat([]byte("x"), 1000)))
	half = half[:len(half)/2]
	for _, tr := range []client.Transport{client.QUIC, client.WebTransport} {
		for _, login := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/after login %v", tr, login), func(t *testing.T) {
				base := e.Hub().Stats()
				raw := r.DialRaw(t, 0, tr)
				if login {
					raw.Login(dev)
				}
				if err := raw.Write(half); err != nil {
					t.Fatal(err)
				}
				end, err := raw.WaitEnd(30 * time.Second)
				if err != nil {
					t.Fatal(err)
				}
				if end.Code != relayv1.ErrorCode_ERROR_CODE_TIMEOUT || !end.Frame {
					t.Fatalf("ended with %+v, want a Close frame with TIMEOUT", end)
				}
				relaytest.WaitEdge(t, e, 10*time.Second, func(st session.Stats) error {
					if st.Serving > base.Serving {
						return fmt.Errorf("%d sessions serving, want %d", st.Serving, base.Serving)
					}
					return nil
				})
			})
		}
	}
	t.Run("websocket/an unfinished message", func(t *testing.T) {
		raw := r.DialRaw(t, 0, client.WebSocket)
		raw.Login(dev)
		w, err := raw.WS.Writer(context.Background(), websocket.MessageBinary)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(half[1:]); err != nil { // a message is a frame body
			t.Fatal(err)
		}
		end, err := raw.WaitEnd(30 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if end.Code != relayv1.ErrorCode_ERROR_CODE_TIMEOUT {
			t.Fatalf("ended with %+v, want TIMEOUT", end)
		}
	})
}

// A stream that ends inside a frame, and a text message on a WebSocket,
// are malformed, and said so.
func TestTruncatedStreamsAndTextMessages(t *testing.T) {
	r := startRelay(t, 1, nil)
	dev := r.Device(r.User("truncated"), "d")
	whole, _ := frame.Append(nil, event([]byte("hello")))
	for _, tr := range []client.Transport{client.QUIC, client.WebTransport} {
		t.Run(tr.String(), func(t *testing.T) {
			raw := r.DialRaw(t, 0, tr)
			raw.Login(dev)
			if err := raw.Write(whole[:len(whole)-3]); err != nil {
				t.Fatal(err)
			}
			raw.CloseWrite()
			end, err := raw.WaitEnd(30 * time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if end.Code != relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME || !end.Frame {
				t.Fatalf("ended with %+v, want a Close frame with MALFORMED_FRAME", end)
			}
		})
	}
	t.Run("websocket text message", func(t *testing.T) {
		raw := r.DialRaw(t, 0, client.WebSocket)
		raw.Login(dev)
		if err := raw.WS.Write(context.Background(), websocket.MessageText, []byte("hello")); err != nil {
			t.Fatal(err)
		}
		end, err := raw.WaitEnd(30 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if end.Code != relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME {
			t.Fatalf("ended with %+v, want MALFORMED_FRAME", end)
		}
	})
}

// padded is an event frame with n bytes of fields no version of the
// protocol defines (field 1000, bytes) and an empty payload.
func padded(target string, n int) []byte {
	ev, _ := marshal(event(nil, target).GetEvent())
	ev = binary.AppendUvarint(ev, 1000<<3|2)
	ev = binary.AppendUvarint(ev, uint64(n))
	ev = append(ev, bytes.Repeat([]byte{0xAB}, n)...)
	// Frame.event is field 5.
	body := binary.AppendUvarint(nil, 5<<3|2)
	body = binary.AppendUvarint(body, uint64(len(ev)))
	body = append(body, ev...)
	return append(binary.AppendUvarint(nil, uint64(len(body))), body...)
}

// Unknown fields are not relayed, and what they cost counts against the
// sender's bytes: padding an empty event with 60 KiB slows the sender to
// its bytes/s, it does not ride past it.
func TestUnknownFieldsAreDroppedAndCounted(t *testing.T) {
	r := startRelay(t, 1, func(_ int, cfg *server.Config) {
		cfg.Session.Limits.BytesPerSecond = 128 << 10
	})
	user := r.User("padding")
	sdev, rdev := r.Device(user, "sender"), r.Device(user, "receiver")
	sender := r.DialRaw(t, 0, client.QUIC)
	sender.Login(sdev)
	receiver := r.DialRaw(t, 0, client.QUIC)
	receiver.Login(rdev)
	paced := relaytest.Counter(t, r.Edges[0], "relay_edge_paced_seconds_total", "", "")
	const n = 8
	for range n {
		if err := sender.Write(padded(rdev.ID, 60<<10)); err != nil {
			t.Fatal(err)
		}
	}
	for got := 0; got < n; {
		f, err := receiver.Next(30 * time.Second)
		if err != nil {
			t.Fatalf("after %d deliveries: %v", got, err)
		}
		d := f.GetDeliver()
		if d == nil {
			continue
		}
		got++
		if u := d.GetEvent().ProtoReflect().GetUnknown(); len(u) != 0 {
			t.Fatalf("relayed %d bytes of unknown fields", len(u))
		}
		if sz, _ := marshal(d.GetEvent()); len(sz) > 200 {
			t.Fatalf("relayed an event of %d bytes", len(sz))
		}
	}
	// 8 x 60 KiB against 128 KiB/s with a burst of 128 KiB: about 2.7 s
	// held back.
	if got := relaytest.Counter(t, r.Edges[0], "relay_edge_paced_seconds_total", "", "") - paced; got < 2 {
		t.Fatalf("the sender was held back %.2f s, want about 2.7", got)
	}
}

// TTLs that overflow a time.Duration are refused as too long.
func TestTTLOverflowIsRefused(t *testing.T) {
	r := startRelay(t, 1, nil)
	user := r.User("ttl")
	sdev, rdev := r.Device(user, "s"), r.Device(user, "r")
	raw := r.DialRaw(t, 0, client.QUIC)
	raw.Login(sdev)
	for _, ttl := range []int64{1<<58 + 60000, math.MaxInt64} {
		f := event([]byte("x"), rdev.ID)
		f.GetEvent().TtlMs = ttl
		if err := raw.Send(f); err != nil {
			t.Fatal(err)
		}
		for {
			g, err := raw.Next(20 * time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if rej := g.GetReject(); rej != nil {
				if rej.GetCode() != relayv1.ErrorCode_ERROR_CODE_TTL_TOO_LONG {
					t.Fatalf("ttl %d: %v", ttl, rej)
				}
				break
			}
			if g.GetAck() != nil {
				t.Fatalf("ttl %d accepted", ttl)
			}
		}
	}
}

// A device that keeps sending what the edge must refuse is cut off with
// RATE_LIMITED, on every transport.
func TestPersistentRefusalsEndTheSession(t *testing.T) {
	// The default control queue: a Reject per refused frame must not
	// overflow it before the refusals run out.
	r := startRelay(t, 1, func(_ int, cfg *server.Config) { cfg.Session.ControlQueueLen = 0 })
	dev := r.Device(r.User("refusals"), "d")
	for _, tr := range transports {
		t.Run(tr.String(), func(t *testing.T) {
			raw := r.DialRaw(t, 0, tr)
			raw.Login(dev)
			var wg sync.WaitGroup
			defer wg.Wait()
			defer raw.Close()
			wg.Go(func() {
				for range 1000 {
					if raw.Send(event([]byte("x"), "no-such-device")) != nil {
						return
					}
				}
			})
			end, err := raw.WaitEnd(30 * time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if end.Code != relayv1.ErrorCode_ERROR_CODE_RATE_LIMITED {
				t.Fatalf("ended with %+v, want RATE_LIMITED", end)
			}
		})
	}
}

// Only the edge's own page, and origins listed, may open sessions.
func TestOrigins(t *testing.T) {
	r := startRelay(t, 1, func(_ int, cfg *server.Config) {
		cfg.AllowedOrigins = []string{"https://app.example"}
		cfg.AdminAddr = "127.0.0.1:0"
	})
	e := r.Edges[0]
	dev := r.Device(r.User("origins"), "d")
	_, port, _ := splitHostPort(e.Addr())
	_, adminPort, _ := splitHostPort(e.AdminURL()[len("http://"):])
	for _, tr := range []client.Transport{client.WebTransport, client.WebSocket} {
		for _, c := range []struct {
			origin string
			ok     bool
		}{
			{"", true},
			{"https://127.0.0.1:" + port, true},
			{"http://127.0.0.1:" + adminPort, true},
			{"http://localhost:" + adminPort, true},
			{"https://app.example", true},
			{"http://app.example", false},
			{"http://127.0.0.1:" + port, false},
			{"https://127.0.0.1:" + adminPort, false},
			{"https://evil.example", false},
			{"null", false},
		} {
			t.Run(fmt.Sprintf("%s/%q", tr, c.origin), func(t *testing.T) {
				raw, err := relaytest.DialRawOrigin(t, e.Addr(), tr, c.origin)
				if !c.ok {
					if err == nil {
						// WebTransport may open the session before the
						// refusal reaches the client: nothing gets through.
						if _, err := raw.Next(10 * time.Second); err == nil {
							t.Fatal("a refused origin got a session")
						}
					}
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				raw.Login(dev)
			})
		}
	}
}

// A ticket without the device's key resumes nothing and disturbs nobody;
// a resume proof works once.
func TestStolenTicketsAndReplayedResumes(t *testing.T) {
	r := startRelay(t, 1, nil)
	dev := r.Device(r.User("tickets"), "d")
	real := r.DialRaw(t, 0, client.QUIC)
	w := real.Login(dev)
	ticket := w.GetResumeTicket()
	if len(ticket) == 0 {
		t.Fatal("no ticket")
	}
	e := r.Edges[0]
	t.Run("ticket without proof", func(t *testing.T) {
		thief := r.DialRaw(t, 0, client.QUIC)
		if err := thief.SendHello(relaytest.ResumeHello(dev, ticket, nil)); err != nil {
			t.Fatal(err)
		}
		f, err := thief.Next(20 * time.Second)
		if err != nil || f.GetChallenge().GetTicketError() != relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED {
			t.Fatalf("want a challenge refusing the ticket, got %v (%v)", f, err)
		}
		// Without the key the thief cannot answer: a wrong signature.
		thief.Answer(f.GetChallenge(), mustKey(t))
		end, err := thief.WaitEnd(20 * time.Second)
		if err != nil || end.Code != relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED {
			t.Fatalf("thief ended with %+v (%v)", end, err)
		}
		if st := e.Hub().Stats(); st.Sessions != 1 {
			t.Fatalf("%d sessions: the real device was disturbed", st.Sessions)
		}
		if err := real.Send(&relayv1.Frame{Kind: &relayv1.Frame_Ping{Ping: &relayv1.Ping{Nonce: 9}}}); err != nil {
			t.Fatal(err)
		}
		for {
			f, err := real.Next(20 * time.Second)
			if err != nil {
				t.Fatalf("the real device's session: %v", err)
			}
			if f.GetPong().GetNonce() == 9 {
				break
			}
			if f.GetClose() != nil {
				t.Fatalf("the real device was closed: %v", f)
			}
		}
	})
	t.Run("a proof is used once", func(t *testing.T) {
		h := relaytest.ResumeHello(dev, ticket, dev.Key)
		first := r.DialRaw(t, 0, client.QUIC)
		if err := first.SendHello(h); err != nil {
			t.Fatal(err)
		}
		if f, err := first.Next(20 * time.Second); err != nil || !f.GetWelcome().GetResumed() {
			t.Fatalf("want a resumed welcome, got %v (%v)", f, err)
		}
		again := r.DialRaw(t, 0, client.QUIC)
		if err := again.SendHello(h); err != nil {
			t.Fatal(err)
		}
		f, err := again.Next(20 * time.Second)
		if err != nil || f.GetChallenge().GetTicketError() != relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED {
			t.Fatalf("a replayed resume: want a challenge refusing it, got %v (%v)", f, err)
		}
	})
}

func marshal(m proto.Message) ([]byte, error) { return proto.Marshal(m) }

func splitHostPort(s string) (string, string, error) { return net.SplitHostPort(s) }

// mustKey is a key no device has.
func mustKey(t *testing.T) ed25519.PrivateKey {
	t.Helper()
	_, k, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}
