package session

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"errors"
	"math"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/edge/frame"
	"github.com/edge-relay/relay/edge/proof"
	"github.com/edge-relay/relay/internal/stacks"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// The operations of FuzzSessionFrames' scripts: each byte of a script
// picks one (modulo their number), and some read an argument byte.
const (
	opHello = iota
	opAuthenticate
	opBadSignature
	opEvent
	opBadEvent // argument: which field is wrong
	opReceived // argument: a delivery id
	opPing
	opGarbage // argument: how many bytes
	opHalfFrame
	opStall // toggles reading
	opClose
	opDatagram
	opResume
	opPace // waits a little, so timers can fire mid-script
	opCount
)

// fuzzDevice is device "a" of FuzzSessionFrames, driven by a script.
type fuzzDevice struct {
	conn *pipeConn
	w    *frame.Writer
	key  ed25519.PrivateKey

	mu        sync.Mutex // guards the fields below
	hello     *relayv1.Hello
	challenge chan *relayv1.Challenge
	ticket    []byte
	stalled   bool
	resume    chan struct{} // closed when reading resumes
	seq       uint64
}

func (d *fuzzDevice) read(r *frame.Reader) {
	for {
		d.mu.Lock()
		wait := d.resume
		d.mu.Unlock()
		if wait != nil {
			<-wait
		}
		var f relayv1.Frame
		if err := r.Read(&f); err != nil {
			return
		}
		d.mu.Lock()
		switch k := f.GetKind().(type) {
		case *relayv1.Frame_Challenge:
			select {
			case d.challenge <- k.Challenge:
			default:
			}
		case *relayv1.Frame_Welcome:
			d.ticket = k.Welcome.GetResumeTicket()
		case *relayv1.Frame_Ticket:
			d.ticket = k.Ticket.GetResumeTicket()
		}
		d.mu.Unlock()
	}
}

func (d *fuzzDevice) setStalled(stall bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	switch {
	case stall && d.resume == nil:
		d.resume = make(chan struct{})
	case !stall && d.resume != nil:
		close(d.resume)
		d.resume = nil
	}
}

func (d *fuzzDevice) nextEvent(mod func(*relayv1.Event)) *relayv1.Frame {
	d.mu.Lock()
	d.seq++
	n := d.seq
	d.mu.Unlock()
	ev := &relayv1.Event{Id: "e" + string(rune('a'+n%26)) + strings.Repeat("x", int(n%5)), Seq: n, CreatedAtMs: time.Now().UnixMilli(),
		TtlMs: 60000, Type: "t", Payload: []byte("p"), Targets: []string{"b"}}
	if mod != nil {
		mod(ev)
	}
	return &relayv1.Frame{Kind: &relayv1.Frame_Event{Event: ev}}
}

// badEvents are ways an event can be wrong.
var badEvents = []func(*relayv1.Event){
	func(e *relayv1.Event) { e.TtlMs = 1<<58 + 60000 },
	func(e *relayv1.Event) { e.TtlMs = math.MaxInt64 },
	func(e *relayv1.Event) { e.TtlMs = -1 },
	func(e *relayv1.Event) { e.CreatedAtMs = math.MinInt64 },
	func(e *relayv1.Event) { e.CreatedAtMs = math.MaxInt64 },
	func(e *relayv1.Event) { e.Id = "" },
	func(e *relayv1.Event) { e.Seq = 0 },
	func(e *relayv1.Event) { e.Targets = []string{"nobody"} },
	func(e *relayv1.Event) { e.Targets = []string{"a"} },
	func(e *relayv1.Event) { e.Payload = bytes.Repeat([]byte("x"), 70<<10) },
	func(e *relayv1.Event) { e.Ephemeral, e.AnyOne = true, true },
}

// FuzzSessionFrames runs scripts of frames, garbage, stalls and pauses
// from one device against the session core, with a second device
// receiving, and checks what must hold whatever a device does: no
// panic; the session ends within a bound once the device hangs up;
// Serve's answer is typed (nil for a goodbye, else a *CloseError with a
// code, or ErrDraining); and the hub and the session goroutines return to
// nothing.
func FuzzSessionFrames(f *testing.F) {
	for _, s := range [][]byte{
		{opHello, opAuthenticate, opEvent, opEvent, opPing, opReceived, 1, opClose},
		{opHello, opAuthenticate, opStall, opEvent, opEvent, opEvent, opPing, opPing, opPing, opPace, opStall},
		{opHello, opBadSignature},
		{opHello, opAuthenticate, opBadEvent, 0, opBadEvent, 1, opBadEvent, 7, opEvent},
		{opHello, opAuthenticate, opHalfFrame, opPace, opPace},
		{opHalfFrame},
		{opGarbage, 9, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff},
		{opHello, opAuthenticate, opDatagram, opDatagram, opResume, opAuthenticate},
		{opHello, opAuthenticate, opResume, opEvent, opClose, opEvent},
		{opEvent, opHello, opHello},
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, script []byte) {
		if len(script) > 64 {
			script = script[:64]
		}
		e := newEnv(t, func(c *Config) {
			c.HandshakeTimeout = 300 * time.Millisecond
			c.CloseLinger = 100 * time.Millisecond
			c.WriteTimeout = 300 * time.Millisecond
			c.Limits.FrameTimeout = 100 * time.Millisecond
			c.ControlQueueLen, c.QueueLen = 16, 8
			c.RefusalBurst = 20
			c.HandshakesPerSecond, c.HandshakeBurst = 1e6, 1e6
		})
		e.device("u1", "a")
		e.device("u1", "b")
		b := e.online("b")
		srv, cli := newPipe("127.0.0.1:5000", true)
		d := &fuzzDevice{conn: cli, w: frame.NewWriter(cli, 1<<20), key: e.keys["a"], challenge: make(chan *relayv1.Challenge, 1)}
		served := make(chan error, 1)
		go func() { served <- e.hub.Serve(context.Background(), srv) }()
		var readers sync.WaitGroup
		readers.Go(func() { d.read(frame.NewReader(cli, 1<<20)) })

		send := func(f *relayv1.Frame) { _ = d.w.Write(f) }
		for i := 0; i < len(script); i++ {
			arg := func() byte {
				if i+1 < len(script) {
					i++
					return script[i]
				}
				return 0
			}
			switch script[i] % opCount {
			case opHello:
				h := &relayv1.Hello{UserId: "u1", DeviceId: "a", ProtocolVersion: proof.ProtocolVersion, ClientTimeMs: time.Now().UnixMilli()}
				d.mu.Lock()
				d.hello = h
				d.mu.Unlock()
				send(&relayv1.Frame{Kind: &relayv1.Frame_Hello{Hello: h}})
			case opAuthenticate, opBadSignature:
				var ch *relayv1.Challenge
				select {
				case ch = <-d.challenge:
				case <-time.After(200 * time.Millisecond):
					ch = &relayv1.Challenge{Nonce: make([]byte, proof.NonceSize)}
				}
				d.mu.Lock()
				h := d.hello
				d.mu.Unlock()
				if h == nil {
					h = &relayv1.Hello{}
				}
				key := d.key
				if script[i]%opCount == opBadSignature {
					key = e.keys["b"]
				}
				send(sign(h, ch, key))
			case opEvent:
				send(d.nextEvent(nil))
			case opBadEvent:
				send(d.nextEvent(badEvents[int(arg())%len(badEvents)]))
			case opReceived:
				send(&relayv1.Frame{Kind: &relayv1.Frame_Received{Received: &relayv1.Received{DeliveryIds: []uint64{uint64(arg())}}}})
			case opPing:
				send(&relayv1.Frame{Kind: &relayv1.Frame_Ping{Ping: &relayv1.Ping{Nonce: uint64(i)}}})
			case opGarbage:
				n := int(arg()) % 16
				g := make([]byte, 0, n)
				for range n {
					g = append(g, arg())
				}
				_, _ = cli.Write(g)
			case opHalfFrame:
				whole, _ := frame.Append(nil, d.nextEvent(nil))
				_, _ = cli.Write(whole[:len(whole)/2])
			case opStall:
				d.mu.Lock()
				stalled := d.resume != nil
				d.mu.Unlock()
				d.setStalled(!stalled)
			case opClose:
				send(&relayv1.Frame{Kind: &relayv1.Frame_Close{Close: &relayv1.Close{}}})
			case opDatagram:
				ev := d.nextEvent(func(e *relayv1.Event) { e.Ephemeral = arg()%2 == 0 })
				body, _ := proto.Marshal(ev)
				_ = cli.SendDatagram(body)
			case opResume:
				d.mu.Lock()
				h := &relayv1.Hello{UserId: "u1", DeviceId: "a", ProtocolVersion: proof.ProtocolVersion, ClientTimeMs: time.Now().UnixMilli(), ResumeTicket: d.ticket}
				d.hello = h
				d.mu.Unlock()
				if len(h.ResumeTicket) > 0 {
					proveResume(h, d.key)
				}
				send(&relayv1.Frame{Kind: &relayv1.Frame_Hello{Hello: h}})
			case opPace:
				time.Sleep(time.Duration(arg()%8) * 20 * time.Millisecond) // lets timers fire mid-script; not synchronisation
			}
		}

		// The device hangs up: whatever state the session is in, it ends.
		d.setStalled(false)
		_ = cli.Close(0, "")
		var err error
		select {
		case err = <-served:
		case <-time.After(10 * time.Second):
			t.Fatal("the session did not end within 10 s of the device hanging up")
		}
		readers.Wait()
		var ce *CloseError
		switch {
		case err == nil, errors.Is(err, ErrDraining):
		case errors.As(err, &ce):
			if ce.Code == relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED {
				t.Fatalf("Serve returned an untyped close: %v", err)
			}
		default:
			t.Fatalf("Serve returned %T %v, not a CloseError", err, err)
		}
		if st := e.hub.Stats(); st.Sessions != 1 || st.Serving != 1 {
			t.Fatalf("after the script the hub holds %+v, want b's session only", st)
		}
		_ = b.conn.Close(0, "")
		<-b.serve
		<-b.done
		waitFor(t, "no session goroutine left", func() bool { return sessionGoroutines() == 0 })
	})
}

// sessionGoroutines counts goroutines running the session core.
func sessionGoroutines() int {
	return stacks.Count("edge/session.(*") - stacks.Count("edge/session.(*", "FuzzSessionFrames")
}
