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
	"errors"
	"fmt"
	"math"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/devconn"
	"github.com/edge-relay/relay/edge/frame"
	"github.com/edge-relay/relay/edge/proof"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/edge/session"
	"github.com/edge-relay/relay/edge/transport"
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

// stall logs a victim in on edge i over tr and blocks the edge's writer
// for it (relaytest.Stall).
func stall(t *testing.T, r *relaytest.Relay, i int, tr client.Transport) (victim *relaytest.Raw, dev relaytest.Device, sender *relaytest.Raw) {
	t.Helper()
	user := r.User(fmt.Sprintf("stall-%d", seq.Add(1)))
	dev = r.Device(user, "victim")
	victim, sender = relaytest.Stall(t, r.Edges[i].Addr(), tr, dev, r.Device(user, "sender"))
	return victim, dev, sender
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
		// do ends the victim's session; it returns how the victim saw
		// its session end when it had to wait for that itself.
		do func(t *testing.T, victim *relaytest.Raw, dev relaytest.Device, tr client.Transport) *relaytest.End
	}{
		{"control frames pile up", plain, relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER, func(t *testing.T, victim *relaytest.Raw, _ relaytest.Device, _ client.Transport) *relaytest.End {
			for n := range 200 {
				if err := victim.Send(&relayv1.Frame{Kind: &relayv1.Frame_Ping{Ping: &relayv1.Ping{Nonce: uint64(n)}}}); err != nil {
					break // the edge closed it already
				}
			}
			return nil
		}},
		{"a write takes too long", writeLimit, relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER, func(*testing.T, *relaytest.Raw, relaytest.Device, client.Transport) *relaytest.End { return nil }},
		{"replaced", plain, relayv1.ErrorCode_ERROR_CODE_REPLACED, func(t *testing.T, victim *relaytest.Raw, dev relaytest.Device, tr client.Transport) *relaytest.End {
			// The replacing session takes over the device's mailbox (and
			// may wait on it with a pump of its own): once the victim
			// has ended, it leaves too, so the edge must end up as it was
			// without both.
			replacement := r.DialRaw(t, plain, tr)
			replacement.Login(dev)
			end, err := victim.WaitEnd(30 * time.Second)
			if err != nil {
				t.Fatal(err)
			}
			replacement.Close()
			return &end
		}},
		{"revoked", plain, relayv1.ErrorCode_ERROR_CODE_REVOKED, func(t *testing.T, _ *relaytest.Raw, dev relaytest.Device, _ client.Transport) *relaytest.End {
			r.RevokeDevice(dev)
			return nil
		}},
		{"no answer at the maximum age", shortAge, relayv1.ErrorCode_ERROR_CODE_SESSION_EXPIRED, func(*testing.T, *relaytest.Raw, relaytest.Device, client.Transport) *relaytest.End { return nil }},
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
				ended := reason.do(t, victim, dev, tr)
				settled(t, e, base, goroutines)
				if ended == nil {
					end, err := victim.WaitEnd(30 * time.Second)
					if err != nil {
						t.Fatal(err)
					}
					ended = &end
				}
				end := *ended
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

// slowSender starts a relay whose devices may send rate bytes/s, and logs
// in two devices of one user: a sender over tr and a receiver over QUIC.
func slowSender(t *testing.T, login string, tr client.Transport, rate int) (r *relaytest.Relay, sender, receiver *relaytest.Raw, rdev relaytest.Device) {
	t.Helper()
	r = startRelay(t, 1, func(_ int, cfg *server.Config) {
		cfg.Session.Limits.BytesPerSecond = rate
	})
	user := r.User(login)
	sdev := r.Device(user, "sender")
	rdev = r.Device(user, "receiver")
	sender = r.DialRaw(t, 0, tr)
	sender.Login(sdev)
	receiver = r.DialRaw(t, 0, client.QUIC)
	receiver.Login(rdev)
	return r, sender, receiver, rdev
}

// Unknown fields are not relayed, and what they cost counts against the
// sender's bytes: padding an empty event with 60 KiB slows the sender to
// its bytes/s, it does not ride past it.
func TestUnknownFieldsAreDroppedAndCounted(t *testing.T) {
	r, sender, receiver, rdev := slowSender(t, "padding", client.QUIC, 128<<10)
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

// A WebSocket carries bytes beside its messages that the WebSocket
// library's read limit does not count and the edge still reads and
// unmasks: each fragment's header (a message may come in any number of
// empty fragments), pings and pongs. They count against the sender's
// bytes with the frame after them, and one message may carry no more
// than its frame limit and 64 KiB beside it: past that the session ends
// FRAME_TOO_LARGE, instead of reading empty fragments for as long as
// they come.
func TestWebSocketOverheadCounts(t *testing.T) {
	// A low rate: the headers come as fast as the edge reads them (six
	// bytes a frame), and a busy edge under -race must still read them
	// faster than the rate refills.
	r, sender, receiver, rdev := slowSender(t, "fragments", client.WebSocket, 16<<10)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// fragmented sends an event to the receiver as one message: empties
	// empty fragments (6 bytes each, masked), then the frame.
	fragmented := func(empties int) error {
		body, err := marshal(event([]byte("x"), rdev.ID))
		if err != nil {
			return err
		}
		w, err := sender.WS.Writer(ctx, websocket.MessageBinary)
		if err != nil {
			return err
		}
		for range empties {
			if _, err := w.Write(nil); err != nil {
				return err
			}
		}
		if _, err := w.Write(body); err != nil {
			return err
		}
		return w.Close()
	}
	paced := relaytest.Counter(t, r.Edges[0], "relay_edge_paced_seconds_total", "", "")
	const n = 3
	for range n {
		if err := fragmented(10_000); err != nil {
			t.Fatal(err)
		}
	}
	for got := 0; got < n; {
		f, err := receiver.Next(30 * time.Second)
		if err != nil {
			t.Fatalf("after %d deliveries: %v", got, err)
		}
		if f.GetDeliver() != nil {
			got++
		}
	}
	// 3 x 60 KB of headers against 16 KiB/s, with a burst of one frame
	// of the largest size (64 KiB here): about 7 s held back, less what
	// accrued while the edge read them.
	if got := relaytest.Counter(t, r.Edges[0], "relay_edge_paced_seconds_total", "", "") - paced; got < 3 {
		t.Fatalf("the sender was held back %.2f s, want about 7", got)
	}
	// 1.2 MB of headers for one message: past the frame limit (64 KiB
	// here) and the 64 KiB beside it.
	_ = fragmented(200_000) // the edge may end it before it is all written
	end, err := sender.WaitEnd(30 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if end.Code != relayv1.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE {
		t.Fatalf("a message of endless empty fragments ended the session with %+v, want FRAME_TOO_LARGE", end)
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

// A device cannot open streams beside its session's beyond the few a
// device port allows (the edge reads none of them, so what a peer may
// leave in them is bounded by their number), and its session goes on.
func TestExtraStreamsAreBounded(t *testing.T) {
	r := startRelay(t, 1, nil)
	dev := r.Device(r.User("streams"), "d")
	base := r.Edges[0].Hub().Stats()
	goroutines, _ := relaytest.SessionGoroutines()
	for _, tr := range []client.Transport{client.QUIC, client.WebTransport} {
		t.Run(tr.String(), func(t *testing.T) {
			raw := r.DialRaw(t, 0, tr)
			raw.Login(dev)
			bidi, uni := raw.OpenExtraStreams(make([]byte, 1<<10))
			// Native: the session's stream. WebTransport: the CONNECT
			// request's and the session's.
			used := 1
			if tr == client.WebTransport {
				used = 2
			}
			if bidi+used > transport.MaxIncomingStreams || uni > transport.MaxIncomingUniStreams {
				t.Fatalf("opened %d more bidirectional and %d unidirectional streams; the edge allows %d and %d in all",
					bidi, uni, transport.MaxIncomingStreams, transport.MaxIncomingUniStreams)
			}
			if err := raw.Ping(7, 10*time.Second); err != nil {
				t.Fatalf("after the extra streams: %v", err)
			}
			raw.Close()
			settled(t, r.Edges[0], base, goroutines)
		})
	}
}

// A peer that has not authenticated gets no more than a connection's
// initial receive window out of its streams while the edge reads none of
// them (quic-go's defaults would let it park 768 KiB in each pending
// connection), and its connection ends with the handshake's timeout (the
// window is the connection's: what it parked leaves its session stream no
// room either). Others log in meanwhile.
func TestUnreadBytesOfAPendingConnectionAreBounded(t *testing.T) {
	r := startRelay(t, 1, func(_ int, cfg *server.Config) { cfg.Session.HandshakeTimeout = 3 * time.Second })
	dev := r.Device(r.User("flood"), "d")
	for _, tr := range []client.Transport{client.QUIC, client.WebTransport} {
		t.Run(tr.String(), func(t *testing.T) {
			raw := r.DialRaw(t, 0, tr)
			sent := raw.FloodExtraStreams(1<<20, 2*time.Second)
			// The streams' headers (WebTransport's) and a packet's worth
			// of frames beyond the window. WebTransport sends a stream's
			// header with its first bytes, so the edge may take a flooded
			// stream for the session's and read some of it before it
			// ends the session (MALFORMED_FRAME below): a stream's window
			// more.
			bound := transport.InitialConnectionReceiveWindow + 16<<10
			if tr == client.WebTransport {
				bound += transport.InitialStreamReceiveWindow
			}
			if sent > bound {
				t.Fatalf("%d bytes left on streams the edge does not read, want at most %d", sent, bound)
			}
			t.Logf("%d bytes left before the edge's flow control held them", sent)
			other := r.DialRaw(t, 0, tr)
			other.Login(dev)
			if err := other.Ping(1, 10*time.Second); err != nil {
				t.Fatalf("another device during the flood: %v", err)
			}
			// WebTransport writes a stream's header with its first
			// bytes, so the edge may take a flooded stream for the
			// session's, and end it at its first (empty) frame.
			end, err := raw.WaitEnd(30 * time.Second)
			if err != nil || end.Code != relayv1.ErrorCode_ERROR_CODE_TIMEOUT &&
				(tr != client.WebTransport || end.Code != relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME) {
				t.Fatalf("the flooding connection ended %+v (%v), want TIMEOUT", end, err)
			}
		})
	}
}

// WebSockets that never finish their session's handshake hold places
// among the edge's sessions while they are pending on the HTTPS port; the
// port's bound follows the session cap (an eighth of it, at least 64, a
// sixteenth of that per source) so that they cannot hold every place:
// with the cap at 80 and as many such WebSockets from one address, a
// device still gets in.
func TestStalledWebSocketHandshakesLeaveRoomForDevices(t *testing.T) {
	const maxSessions = 80
	r := startRelay(t, 1, func(_ int, cfg *server.Config) {
		cfg.Session.MaxSessions = maxSessions
		// Longer than the test: a stalled handshake gives its place
		// back only when the bound closes its connection.
		cfg.Session.HandshakeTimeout = 5 * time.Minute
	})
	dev := r.Device(r.User("ws-flood"), "d")
	for range maxSessions {
		r.DialRaw(t, 0, client.WebSocket) // and no Hello
	}
	relaytest.WaitEdge(t, r.Edges[0], 30*time.Second, func(st session.Stats) error {
		if st.Serving >= maxSessions {
			return fmt.Errorf("%d sessions in the hub, all of its places", st.Serving)
		}
		return nil
	})
	raw := r.DialRaw(t, 0, client.QUIC)
	raw.Login(dev)
	if err := raw.Ping(1, 10*time.Second); err != nil {
		t.Fatalf("the device beside the stalled WebSockets: %v", err)
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
		if err := thief.SendHello(relaytest.ResumeHello(dev, ticket, nil, thief.Binding())); err != nil {
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
		if err := real.Ping(9, 20*time.Second); err != nil {
			t.Fatalf("the real device's session: %v", err)
		}
	})
	t.Run("a proof is used once", func(t *testing.T) {
		// Version 1's proofs (a browser's) name no connection: the
		// edge's replay cache is what keeps one from being used twice.
		h := relaytest.ResumeHello(dev, ticket, dev.Key, nil)
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
	t.Run("a bound proof works on its own connection only", func(t *testing.T) {
		// Made for one connection (a device talking to a machine in the
		// middle), presented on another (the middle's to the edge): the
		// ticket is refused, as for a wrong signature, though the proof
		// was never used.
		mine, other := r.DialRaw(t, 0, client.QUIC), r.DialRaw(t, 0, client.QUIC)
		h := relaytest.ResumeHello(dev, ticket, dev.Key, mine.Binding())
		if err := other.SendHello(h); err != nil {
			t.Fatal(err)
		}
		f, err := other.Next(20 * time.Second)
		if err != nil || f.GetChallenge().GetTicketError() != relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED {
			t.Fatalf("a proof on another connection: want a challenge refusing the ticket, got %v (%v)", f, err)
		}
		// On its own connection the same proof resumes.
		if err := mine.SendHello(h); err != nil {
			t.Fatal(err)
		}
		if f, err := mine.Next(20 * time.Second); err != nil || !f.GetWelcome().GetResumed() {
			t.Fatalf("want a resumed welcome, got %v (%v)", f, err)
		}
	})
}

// A machine in the middle that a device trusts (it holds a certificate
// the device pins; with --cluster-tls-tickets a session key is enough to
// pose as an edge to a resuming device) passes on all the device sends,
// over a connection of its own to a real edge. A device of protocol
// version 2 (the Go client) signs the channel binding of its own
// connection, which is not the middle's: neither its full handshake nor
// its resume opens a session there. One that passes bytes on unchanged
// passes on the edge's binding check too, and the client stops before it
// signs anything, saying TLS does not end at the edge (what a proxy that
// terminates TLS shows); one that strips the check gets the signature,
// which the edge refuses. A device of version 1 (what a browser speaks)
// is let in: that is what the binding closes.
func TestAMiddlemanCannotPassOnADevicesProofs(t *testing.T) {
	r := startRelay(t, 1, nil)
	e := r.Edges[0]
	dev := r.Device(r.User("middle"), "d")
	direct := r.Dial(0, dev, client.QUIC)
	ticket := direct.ResumeTicket()
	if len(ticket) == 0 {
		t.Fatal("no ticket")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, strip := range []bool{false, true} {
		mm := relaytest.StartMiddleman(t, e.Addr(), strip)
		want := relayv1.ErrorCode_ERROR_CODE_UNSUPPORTED_VERSION // the client saw the edge's check
		if strip {
			want = relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED // the edge refused the proofs
		}
		cfg := r.ClientConfig(0, dev, client.QUIC)
		cfg.Addr, cfg.OtherAddrs, cfg.CertHashes = mm.Addr, nil, [][]byte{mm.CertHash}
		for _, resume := range [][]byte{nil, ticket} {
			cfg.ResumeTicket = resume
			_, err := client.Dial(ctx, cfg)
			var ce *client.Error
			if !errors.As(err, &ce) || ce.Code != want {
				t.Fatalf("through the middle (stripping the check %v, resuming %v): want %v, got %v", strip, resume != nil, want, err)
			}
		}
	}
	// Two attempts signed through the stripping middle, and refused: its
	// full handshake's signature, its resume's proof and the signature
	// after it. Nobody got in.
	if n := relaytest.Counter(t, e, "relay_edge_handshakes_total", "result", "auth_failed"); n != 2 {
		t.Fatalf("%v handshakes failed authentication at the edge, want 2", n)
	}
	if n := relaytest.Counter(t, e, "relay_edge_handshake_proofs_total", "binding", "tls_exporter"); n != 1 {
		t.Fatalf("%v bound proofs passed, want 1 (the direct session)", n)
	}
	if st := e.Hub().Stats(); st.Sessions != 1 {
		t.Fatalf("%d sessions on the edge, want the device's own", st.Sessions)
	}

	// Version 1 through the same middle gets a session as the device.
	mm := relaytest.StartMiddleman(t, e.Addr(), false)
	raw := relaytest.DialRaw(t, mm.Addr, client.QUIC)
	raw.Version = proof.UnboundVersion
	raw.Login(dev)
	if n := relaytest.Counter(t, e, "relay_edge_handshake_proofs_total", "binding", "none"); n != 1 {
		t.Fatalf("%v unbound proofs passed, want 1", n)
	}
}

// An edge that requires bound proofs on QUIC (RequireBoundProofs,
// relayd --require-bound-proofs) refuses a version 1 Hello there, full
// handshake or resume, UNSUPPORTED_VERSION naming the transport, before
// any proof; version 2 gets in as before, and so does version 1 on a
// transport not listed (browsers).
func TestAnEdgeCanRequireBoundProofs(t *testing.T) {
	r := startRelay(t, 1, func(_ int, cfg *server.Config) {
		cfg.Session.RequireBoundProofs = []string{devconn.TransportQUIC}
	})
	dev := r.Device(r.User("bound"), "d")
	direct := r.Dial(0, dev, client.QUIC) // version 2
	ticket := direct.ResumeTicket()
	if len(ticket) == 0 {
		t.Fatal("no ticket")
	}
	for _, h := range []*relayv1.Hello{
		{UserId: dev.UserID, DeviceId: dev.ID, ProtocolVersion: proof.UnboundVersion, ClientTimeMs: time.Now().UnixMilli()},
		relaytest.ResumeHello(dev, ticket, dev.Key, nil),
	} {
		raw := r.DialRaw(t, 0, client.QUIC)
		if err := raw.SendHello(h); err != nil {
			t.Fatal(err)
		}
		end, err := raw.WaitEnd(30 * time.Second)
		if err != nil || end.Code != relayv1.ErrorCode_ERROR_CODE_UNSUPPORTED_VERSION || !strings.Contains(end.Msg, "requires on quic") {
			t.Fatalf("version 1 on QUIC (resuming %v): %+v, %v", len(h.GetResumeTicket()) > 0, end, err)
		}
	}
	if n := relaytest.Counter(t, r.Edges[0], "relay_edge_handshake_proofs_total", "binding", "none"); n != 0 {
		t.Fatalf("%v unbound proofs passed, want none", n)
	}
	// A resume of version 2 on QUIC, and version 1 on WebSocket.
	cfg := r.ClientConfig(0, dev, client.QUIC)
	cfg.ResumeTicket = ticket
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, cfg)
	if err != nil {
		t.Fatalf("version 2 resume: %v", err)
	}
	defer c.Close()
	raw := r.DialRaw(t, 0, client.WebSocket)
	raw.Version = proof.UnboundVersion
	raw.Login(dev)
	if n := relaytest.Counter(t, r.Edges[0], "relay_edge_handshake_proofs_total", "binding", "none"); n != 1 {
		t.Fatalf("%v unbound proofs passed, want the WebSocket one", n)
	}
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

// Every way a session can end, as docs/protocol.md's table lists them,
// walked over QUIC, WebTransport and the WebSocket with a device that
// reads: each ends with the code the table gives, in the Close frame or
// in the transport's own close. (The ends that need a device that does
// not read, SLOW_CONSUMER among them, are TestClosesWithABlockedWriter's;
// the edge not being ready is TestNotReadySendsDevicesAway's.)
func TestEveryEndIsTyped(t *testing.T) {
	const (
		main      = 0
		shortAge  = 1 // MaxSessionAge of 3 s
		fewHellos = 2 // two handshakes per address at most
	)
	r := startRelay(t, 3, func(i int, cfg *server.Config) {
		cfg.IdleTimeout = 3 * time.Second // an unfinished WebSocket message ends by it
		cfg.Session.HandshakeTimeout = 2 * time.Second
		cfg.Session.ControlQueueLen = 0
		switch i {
		case shortAge:
			cfg.IdleTimeout = time.Minute // the raw WebSocket device does not ping
			cfg.Session.MaxSessionAge = 3 * time.Second
		case fewHellos:
			cfg.Session.HandshakesPerSecond, cfg.Session.HandshakeBurst = 0.01, 2
		}
	})
	user := r.User("ends")
	dev := r.Device(user, "d")
	body := func(f *relayv1.Frame) []byte { b, _ := marshal(f); return b }
	prefixed := func(b []byte) []byte { return append(binary.AppendUvarint(nil, uint64(len(b))), b...) }
	type row struct {
		name  string
		edge  int
		code  relayv1.ErrorCode
		only  []client.Transport // nil: all three
		login bool
		do    func(t *testing.T, raw *relaytest.Raw, tr client.Transport)
	}
	rows := []row{
		{name: "the device says goodbye", login: true, do: func(t *testing.T, raw *relaytest.Raw, _ client.Transport) {
			_ = raw.Send(&relayv1.Frame{Kind: &relayv1.Frame_Close{Close: &relayv1.Close{}}})
		}},
		{name: "the device ends the stream", login: true, only: []client.Transport{client.QUIC, client.WebTransport},
			do: func(t *testing.T, raw *relaytest.Raw, _ client.Transport) { raw.CloseWrite() }},
		{name: "the device closes the websocket", login: true, only: []client.Transport{client.WebSocket},
			do: func(t *testing.T, raw *relaytest.Raw, _ client.Transport) {
				go func() { _ = raw.WS.Close(websocket.StatusNormalClosure, "bye") }()
			}},
		{name: "the stream ends inside a frame", login: true, code: relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME,
			only: []client.Transport{client.QUIC, client.WebTransport}, do: func(t *testing.T, raw *relaytest.Raw, _ client.Transport) {
				whole := prefixed(body(event([]byte("x"))))
				_ = raw.Write(whole[:len(whole)-2])
				raw.CloseWrite()
			}},
		{name: "a frame too large", login: true, code: relayv1.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE, do: func(t *testing.T, raw *relaytest.Raw, tr client.Transport) {
			if tr == client.WebSocket {
				// The message is the frame: one over the read limit.
				_ = raw.WS.Write(context.Background(), websocket.MessageBinary, make([]byte, 70<<10))
				return
			}
			_ = raw.Write(binary.AppendUvarint(nil, 1<<20))
		}},
		{name: "a frame that does not decode", login: true, code: relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME, do: func(t *testing.T, raw *relaytest.Raw, _ client.Transport) {
			_ = raw.Write(prefixed([]byte{0xff, 0xff, 0xff}))
		}},
		{name: "a frame of a kind a device may not send", login: true, code: relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME, do: func(t *testing.T, raw *relaytest.Raw, _ client.Transport) {
			_ = raw.Send(&relayv1.Frame{Kind: &relayv1.Frame_Welcome{Welcome: &relayv1.Welcome{}}})
		}},
		{name: "a text message", login: true, code: relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME, only: []client.Transport{client.WebSocket},
			do: func(t *testing.T, raw *relaytest.Raw, _ client.Transport) {
				_ = raw.WS.Write(context.Background(), websocket.MessageText, []byte("hi"))
			}},
		{name: "half a frame", login: true, code: relayv1.ErrorCode_ERROR_CODE_TIMEOUT, do: func(t *testing.T, raw *relaytest.Raw, tr client.Transport) {
			whole := prefixed(body(event([]byte("x"))))
			if tr == client.WebSocket {
				w, err := raw.WS.Writer(context.Background(), websocket.MessageBinary)
				if err == nil {
					_, _ = w.Write(whole[1:4]) // an unfinished message
				}
				return
			}
			_ = raw.Write(whole[:4])
		}},
		{name: "no handshake in time", code: relayv1.ErrorCode_ERROR_CODE_TIMEOUT, do: func(*testing.T, *relaytest.Raw, client.Transport) {}},
		{name: "a wrong signature", code: relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED, do: func(t *testing.T, raw *relaytest.Raw, _ client.Transport) {
			_ = raw.SendHello(&relayv1.Hello{UserId: dev.UserID, DeviceId: dev.ID, ProtocolVersion: proof.ProtocolVersion, ClientTimeMs: time.Now().UnixMilli()})
			if f, err := raw.Next(10 * time.Second); err == nil && f.GetChallenge() != nil {
				raw.Answer(f.GetChallenge(), mustKey(t))
			}
		}},
		{name: "an unsupported version", code: relayv1.ErrorCode_ERROR_CODE_UNSUPPORTED_VERSION, do: func(t *testing.T, raw *relaytest.Raw, _ client.Transport) {
			_ = raw.SendHello(&relayv1.Hello{UserId: dev.UserID, DeviceId: dev.ID, ProtocolVersion: 99})
		}},
		{name: "refused frame after refused frame", login: true, code: relayv1.ErrorCode_ERROR_CODE_RATE_LIMITED, do: func(t *testing.T, raw *relaytest.Raw, _ client.Transport) {
			for range 200 {
				if raw.Send(event([]byte("x"), "nobody")) != nil {
					return
				}
			}
		}},
		{name: "a newer session of the device", login: true, code: relayv1.ErrorCode_ERROR_CODE_REPLACED, do: func(t *testing.T, _ *relaytest.Raw, tr client.Transport) {
			r.DialRaw(t, main, tr).Login(dev)
		}},
		{name: "no answer at the maximum age", edge: shortAge, login: true, code: relayv1.ErrorCode_ERROR_CODE_SESSION_EXPIRED,
			do: func(*testing.T, *relaytest.Raw, client.Transport) {}},
	}
	run := func(t *testing.T, c row, tr client.Transport, raw *relaytest.Raw, d relaytest.Device) {
		t.Helper()
		if c.login {
			raw.Login(d)
		}
		c.do(t, raw, tr)
		end, err := raw.WaitEnd(30 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if end.Code != c.code {
			t.Fatalf("ended with %v (%q), want %v", end.Code, end.Msg, c.code)
		}
	}
	for _, c := range rows {
		for _, tr := range transports {
			if c.only != nil && !slices.Contains(c.only, tr) {
				continue
			}
			t.Run(c.name+"/"+tr.String(), func(t *testing.T) {
				run(t, c, tr, r.DialRaw(t, c.edge, tr), dev)
			})
		}
	}
	// Ends that take a device or an edge of their own.
	for _, tr := range transports {
		t.Run("the device is revoked/"+tr.String(), func(t *testing.T) {
			d := r.Device(user, "revoked-"+tr.String())
			run(t, row{login: true, code: relayv1.ErrorCode_ERROR_CODE_REVOKED, do: func(*testing.T, *relaytest.Raw, client.Transport) {
				r.RevokeDevice(d)
			}}, tr, r.DialRaw(t, main, tr), d)
		})
		t.Run("too many handshakes from one address/"+tr.String(), func(t *testing.T) {
			// The edge takes two handshakes per address (about one a
			// minute after that): the third is refused (on this edge the
			// first transport's handshakes spend the allowance, so the
			// later ones see every handshake refused). Each of the first
			// two is answered (a challenge, or a refusal) before the next
			// is dialled, so they reach the edge in that order: streams of
			// separate connections can otherwise be taken in any order.
			var raw *relaytest.Raw
			for i := range 3 {
				raw = r.DialRaw(t, fewHellos, tr)
				_ = raw.SendHello(&relayv1.Hello{UserId: dev.UserID, DeviceId: dev.ID, ProtocolVersion: proof.ProtocolVersion})
				if i < 2 {
					if f, err := raw.Next(10 * time.Second); err != nil || (f.GetChallenge() == nil && f.GetClose() == nil) {
						t.Fatalf("handshake %d: %v, %v; want an answer", i+1, f, err)
					}
				}
			}
			run(t, row{code: relayv1.ErrorCode_ERROR_CODE_RATE_LIMITED, do: func(t *testing.T, raw *relaytest.Raw, _ client.Transport) {
				// A QUIC stream reaches the edge with its first bytes.
				_ = raw.SendHello(&relayv1.Hello{UserId: dev.UserID, DeviceId: dev.ID, ProtocolVersion: proof.ProtocolVersion})
			}}, tr, raw, dev)
		})
		t.Run("the edge shuts down/"+tr.String(), func(t *testing.T) {
			i := len(r.Edges)
			r.StartEdge(i)
			raw := r.DialRaw(t, i, tr)
			raw.Login(dev)
			go r.StopEdge(i)
			end, err := raw.WaitEnd(30 * time.Second)
			if err != nil || end.Code != relayv1.ErrorCode_ERROR_CODE_GOING_AWAY || !end.Frame {
				t.Fatalf("ended with %+v (%v), want a Close frame with GOING_AWAY", end, err)
			}
		})
	}
}
