package session

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/edge/devconn"
	"github.com/edge-relay/relay/edge/frame"
	"github.com/edge-relay/relay/edge/proof"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// The session core runs on any Conn; these tests give it an in-memory
// one (net.Pipe for the stream, channels for datagrams), which behaves
// like a transport with flow control: a writer blocks until the other
// side reads.

type pipeConn struct {
	net.Conn
	addr      net.Addr
	datagrams bool
	in        chan []byte // datagrams to this side
	peer      *pipeConn

	once   sync.Once
	closed chan struct{}
	mu     sync.Mutex
	code   relayv1.ErrorCode
	// datagramReads counts ReceiveDatagram calls (a session's datagram
	// reader makes at least one).
	datagramReads atomic.Int32
	// onWrite, if set, sees every Write from then on.
	onWrite atomic.Pointer[func([]byte)]
	// stuckDatagrams makes SendDatagram block until the pipe closes, as
	// quic-go's does once its queue is full and the peer acknowledges no
	// packets.
	stuckDatagrams atomic.Bool
	// binding is the channel binding both ends see (pipeBinding unless
	// a test gives the pipe another, as a machine in the middle would
	// have; nil: TLS does not end here).
	binding []byte
}

// pipeBinding is the channel binding of a test's pipes, which the
// harness's devices sign (proof.ProtocolVersion binds proofs to it).
var pipeBinding = bytes.Repeat([]byte{0xcb}, proof.BindingSize)

// ChannelBinding is the pipe's binding.
func (p *pipeConn) ChannelBinding() []byte { return p.binding }

func (p *pipeConn) Write(b []byte) (int, error) {
	if f := p.onWrite.Load(); f != nil {
		(*f)(b)
	}
	return p.Conn.Write(b)
}

func newPipe(addr string, datagrams bool) (server, client *pipeConn) {
	a, b := net.Pipe()
	ua, _ := net.ResolveUDPAddr("udp", addr)
	server = &pipeConn{Conn: a, addr: ua, datagrams: datagrams, in: make(chan []byte, 64), closed: make(chan struct{}), binding: pipeBinding}
	client = &pipeConn{Conn: b, addr: ua, datagrams: datagrams, in: make(chan []byte, 64), closed: make(chan struct{}), binding: pipeBinding}
	server.peer, client.peer = client, server
	return server, client
}

func (p *pipeConn) SendDatagram(b []byte) error {
	if !p.datagrams || len(b) > 1200 {
		return devconn.ErrNoDatagrams
	}
	if p.stuckDatagrams.Load() {
		<-p.closed
		return net.ErrClosed
	}
	select {
	case p.peer.in <- bytes.Clone(b):
	default: // lost, as datagrams may be
	}
	return nil
}

func (p *pipeConn) ReceiveDatagram(ctx context.Context) ([]byte, error) {
	p.datagramReads.Add(1)
	if !p.datagrams {
		return nil, devconn.ErrNoDatagrams
	}
	select {
	case b := <-p.in:
		return b, nil
	case <-p.closed:
		return nil, net.ErrClosed
	case <-p.peer.closed:
		return nil, net.ErrClosed
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (p *pipeConn) Close(code relayv1.ErrorCode, msg string) error {
	p.once.Do(func() {
		p.mu.Lock()
		p.code = code
		p.mu.Unlock()
		close(p.closed)
		_ = p.Conn.Close()
	})
	return nil
}

// Abort is Close: a pipe has nothing to flush.
func (p *pipeConn) Abort(code relayv1.ErrorCode, msg string) error { return p.Close(code, msg) }

func (p *pipeConn) RemoteAddr() net.Addr { return p.addr }
func (p *pipeConn) Transport() string    { return "pipe" }

// memDir is an in-memory Directory. Its feed is caught up with every
// revision unless a test holds it back (setFeed).
type memDir struct {
	mu      sync.Mutex
	devices map[string]DeviceInfo
	users   map[string]bool
	feed    uint64
	lagging bool
	blind   uint64
	gen     atomic.Uint64 // moves with every change (Generation)
	// asked, looked and listed count UserActive, LookupDevice and
	// UserDevices calls; revisionWaits counts WaitRevision calls.
	asked, looked, listed, revisionWaits atomic.Int64
	fed                                  chan struct{} // closed and replaced by setFeed
}

// setUser makes a user active or not.
func (d *memDir) setUser(id string, active bool) {
	d.mu.Lock()
	d.users[id] = active
	d.gen.Add(1)
	d.mu.Unlock()
}

func (d *memDir) Generation() uint64 { return d.gen.Load() }

func (d *memDir) AnnouncedRevision() (uint64, uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.lagging {
		return math.MaxUint64, d.blind
	}
	return d.feed, d.blind
}

// blindCopy counts a full copy of the feed that announced no mailboxes.
func (d *memDir) blindCopy() {
	d.mu.Lock()
	d.blind++
	d.mu.Unlock()
}

// setFeed holds the feed at rev (it is caught up again with
// math.MaxUint64).
func (d *memDir) setFeed(rev uint64) {
	d.mu.Lock()
	d.feed, d.lagging = rev, rev != math.MaxUint64
	close(d.fed)
	d.fed = make(chan struct{})
	d.mu.Unlock()
}

// Revision is the feed's revision: caught up, the largest there is.
func (d *memDir) Revision() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.lagging {
		return math.MaxUint64
	}
	return d.feed
}

// WaitRevision waits for the feed to reach rev (setFeed).
func (d *memDir) WaitRevision(ctx context.Context, rev uint64) error {
	d.revisionWaits.Add(1)
	for {
		d.mu.Lock()
		ok, fed := !d.lagging || d.feed >= rev, d.fed
		d.mu.Unlock()
		if ok {
			return nil
		}
		select {
		case <-fed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func newMemDir() *memDir {
	return &memDir{devices: map[string]DeviceInfo{}, users: map[string]bool{}, fed: make(chan struct{})}
}

func (d *memDir) LookupDevice(id string) DeviceInfo {
	d.looked.Add(1)
	d.mu.Lock()
	defer d.mu.Unlock()
	if dev, ok := d.devices[id]; ok {
		return dev
	}
	return DeviceInfo{ID: id}
}

func (d *memDir) UserActive(id string) bool {
	d.asked.Add(1)
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.users[id]
}

func (d *memDir) UserDevices(user string) []string {
	d.listed.Add(1)
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []string
	for id, dev := range d.devices {
		if dev.UserID == user && dev.State == DeviceActive {
			out = append(out, id)
		}
	}
	slices.Sort(out)
	return out
}

func (d *memDir) set(dev DeviceInfo) {
	d.mu.Lock()
	d.devices[dev.ID] = dev
	d.users[dev.UserID] = true
	d.gen.Add(1)
	d.mu.Unlock()
}

func (d *memDir) setState(id string, st DeviceState) {
	d.mu.Lock()
	dev := d.devices[id]
	dev.State = st
	d.devices[id] = dev
	d.gen.Add(1)
	d.mu.Unlock()
}

// env is a hub with a directory of devices and their keys.
type env struct {
	t     testing.TB
	hub   *Hub
	dir   *memDir
	ring  *Ring
	keys  map[string]ed25519.PrivateKey
	users map[string]string // device -> user
	reg   *prometheus.Registry
	wg    sync.WaitGroup
}

func newEnv(t testing.TB, mod func(*Config)) *env {
	t.Helper()
	e := &env{t: t, dir: newMemDir(), ring: NewRing(), keys: map[string]ed25519.PrivateKey{}, users: map[string]string{}, reg: prometheus.NewRegistry()}
	e.ring.Set("k1", []SessionKey{{ID: "k1", Secret: bytes.Repeat([]byte{1}, 32)}})
	e.startHub("edge-test", mod)
	return e
}

// otherEdge starts a second edge's hub beside e's: the same directory,
// ring and device keys (one control plane), a hub and metrics of its own;
// mod adjusts its configuration (its mailbox, its mesh).
func (e *env) otherEdge(edgeID string, mod func(*Config)) *env {
	e.t.Helper()
	o := &env{t: e.t, dir: e.dir, ring: e.ring, keys: e.keys, users: e.users, reg: prometheus.NewRegistry()}
	o.startHub(edgeID, mod)
	return o
}

// startHub starts e's hub, drained and waited for at cleanup.
func (e *env) startHub(edgeID string, mod func(*Config)) {
	t := e.t
	t.Helper()
	cfg := Config{
		EdgeID: edgeID, Directory: e.dir, Ring: e.ring, Metrics: NewMetrics(e.reg),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), CloseLinger: time.Second,
		// Writers retire quickly, so tests go through their start and end often.
		WriterLinger: 10 * time.Millisecond,
	}
	if mod != nil {
		mod(&cfg)
	}
	h, err := NewHub(cfg)
	if err != nil {
		t.Fatal(err)
	}
	e.hub = h
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := h.Drain(ctx, 0); err != nil {
			t.Errorf("drain: %v", err)
		}
		e.wg.Wait()
	})
}

// devices adds several devices of one user.
func (e *env) devices(user string, ids ...string) {
	for _, id := range ids {
		e.device(user, id)
	}
}

func (e *env) device(user, id string) {
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	e.keys[id] = priv
	e.users[id] = user
	e.dir.set(DeviceInfo{ID: id, UserID: user, PublicKey: pub, State: DeviceActive})
}

// metric returns a counter's or gauge's value.
func (e *env) metric(name string, labels ...string) float64 {
	e.t.Helper()
	mfs, err := e.reg.Gather()
	if err != nil {
		e.t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(labels); i += 2 {
				if !hasLabel(m, labels[i], labels[i+1]) {
					continue next
				}
			}
			if c := m.GetCounter(); c != nil {
				return c.GetValue()
			}
			return m.GetGauge().GetValue()
		}
	}
	return 0
}

// histogram returns a histogram's sample count and sum.
func (e *env) histogram(name string) (uint64, float64) {
	e.t.Helper()
	mfs, err := e.reg.Gather()
	if err != nil {
		e.t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			h := mf.GetMetric()[0].GetHistogram()
			return h.GetSampleCount(), h.GetSampleSum()
		}
	}
	return 0, 0
}

func hasLabel(m *dto.Metric, k, v string) bool {
	for _, l := range m.GetLabel() {
		if l.GetName() == k && l.GetValue() == v {
			return true
		}
	}
	return false
}

// dev is a raw protocol client over a pipe: it shows exactly what the
// edge sends.
type dev struct {
	t      testing.TB
	e      *env
	id     string
	user   string
	conn   *pipeConn
	r      *frame.Reader
	w      *frame.Writer
	frames chan *relayv1.Frame
	done   chan struct{}
	serve  chan error // Serve's result

	reading   bool
	welcome   *relayv1.Welcome
	lastHello *relayv1.Hello
	seq       uint64
}

// connect opens a raw connection to the hub (no handshake yet).
func (e *env) connect(id string) *dev {
	return e.connectFrom(id, "127.0.0.1:5000", true)
}

func (e *env) connectFrom(id, addr string, datagrams bool) *dev {
	e.t.Helper()
	srv, cli := newPipe(addr, datagrams)
	d := &dev{t: e.t, e: e, id: id, user: e.users[id], conn: cli, r: frame.NewReader(cli, 1<<20), w: frame.NewWriter(cli, 1<<20),
		frames: make(chan *relayv1.Frame, 4096), done: make(chan struct{}), serve: make(chan error, 1)}
	e.wg.Go(func() { d.serve <- e.hub.Serve(context.Background(), srv) })
	e.t.Cleanup(func() {
		_ = cli.Close(0, "")
		if d.reading {
			<-d.done
		}
	})
	return d
}

// served waits (10 s at most) for the hub's Serve of d's connection to
// return, and returns what it returned.
func (d *dev) served() error {
	d.t.Helper()
	select {
	case err := <-d.serve:
		return err
	case <-time.After(10 * time.Second):
		d.t.Fatalf("%s: the session did not end within 10s", d.id)
		return nil
	}
}

// startReading reads frames into d.frames from now on.
func (d *dev) startReading() {
	d.reading = true
	d.e.wg.Go(func() {
		defer close(d.done)
		for {
			f := &relayv1.Frame{}
			if err := d.r.Read(f); err != nil {
				return
			}
			d.frames <- f
		}
	})
}

func (d *dev) send(f *relayv1.Frame) {
	d.t.Helper()
	if err := d.w.Write(f); err != nil {
		d.t.Fatalf("%s: write %T: %v", d.id, f.GetKind(), err)
	}
}

// readDirect reads one frame synchronously (before startReading).
func (d *dev) readDirect() *relayv1.Frame {
	d.t.Helper()
	f := &relayv1.Frame{}
	_ = d.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer func() { _ = d.conn.SetReadDeadline(time.Time{}) }()
	if err := d.r.Read(f); err != nil {
		d.t.Fatalf("%s: no frame within 10s: %v", d.id, err)
	}
	return f
}

// hello opens a session, resuming with ticket (signed with the device's
// key, as clients do) when one is given.
func (d *dev) hello(ticket []byte) *relayv1.Frame {
	f := d.helloUnproven(ticket)
	if len(ticket) > 0 {
		proveResume(f.GetHello(), d.e.keys[d.id])
	}
	return f
}

// helloUnproven is hello with a ticket but no resume proof: what a thief
// holding only the ticket can send.
func (d *dev) helloUnproven(ticket []byte) *relayv1.Frame {
	return &relayv1.Frame{Kind: &relayv1.Frame_Hello{Hello: &relayv1.Hello{
		UserId: d.user, DeviceId: d.id, ProtocolVersion: proof.ProtocolVersion, ClientTimeMs: time.Now().UnixMilli(), ResumeTicket: ticket,
	}}}
}

// proveResume adds a fresh resume proof to h, signed with key.
func proveResume(h *relayv1.Hello, key ed25519.PrivateKey) {
	h.ResumeNonce = make([]byte, proof.ResumeNonceSize)
	_, _ = rand.Read(h.ResumeNonce)
	h.ResumeProof = proof.ResumeTranscript{
		UserID: h.GetUserId(), DeviceID: h.GetDeviceId(), ProtocolVersion: h.GetProtocolVersion(), ClientTimeMs: h.GetClientTimeMs(),
		Instance: h.GetInstance(), Nonce: h.GetResumeNonce(), Ticket: h.GetResumeTicket(), Binding: pipeBinding,
	}.Sign(key)
}

// sign answers a challenge for hello h with key.
func sign(h *relayv1.Hello, ch *relayv1.Challenge, key ed25519.PrivateKey) *relayv1.Frame {
	tr := proof.Transcript{UserID: h.GetUserId(), DeviceID: h.GetDeviceId(), ProtocolVersion: h.GetProtocolVersion(),
		ClientTimeMs: h.GetClientTimeMs(), EdgeID: ch.GetEdgeId(), Nonce: ch.GetNonce(), ServerTimeMs: ch.GetServerTimeMs(), Binding: pipeBinding}
	return &relayv1.Frame{Kind: &relayv1.Frame_Authenticate{Authenticate: &relayv1.Authenticate{Signature: tr.Sign(key)}}}
}

// login runs a full handshake and starts reading.
func (d *dev) login() *dev {
	d.t.Helper()
	d.handshake()
	d.startReading()
	return d
}

// handshake runs a full handshake without starting the reader, so a
// caller (a benchmark) may read d's frames itself.
func (d *dev) handshake() {
	d.t.Helper()
	d.handshakeWith(nil)
}

// handshakeWith is handshake with a Hello that mod changed first.
func (d *dev) handshakeWith(mod func(*relayv1.Hello)) {
	d.t.Helper()
	d.answer(d.challenged(mod))
	if d.welcome = d.readDirect().GetWelcome(); d.welcome == nil {
		d.t.Fatalf("%s: expected a welcome", d.id)
	}
}

// challenged sends a Hello (adjusted by mod, if set) and returns it with
// the edge's challenge, leaving the handshake there.
func (d *dev) challenged(mod func(*relayv1.Hello)) (*relayv1.Hello, *relayv1.Challenge) {
	d.t.Helper()
	h := d.hello(nil)
	if mod != nil {
		mod(h.GetHello())
	}
	d.lastHello = h.GetHello()
	d.send(h)
	ch := d.readDirect().GetChallenge()
	if ch == nil {
		d.t.Fatalf("%s: expected a challenge", d.id)
	}
	return h.GetHello(), ch
}

// answer signs a challenge with the device's key.
func (d *dev) answer(h *relayv1.Hello, ch *relayv1.Challenge) {
	d.send(sign(h, ch, d.e.keys[d.id]))
}

// online connects and logs in a device.
func (e *env) online(id string) *dev { return e.connect(id).login() }

// next waits for the next frame matching pred, skipping others (which
// are kept in skipped order only for the returned frame's caller).
func (d *dev) next(what string, pred func(*relayv1.Frame) bool) *relayv1.Frame {
	d.t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case f := <-d.frames:
			if pred(f) {
				return f
			}
		case <-deadline:
			d.t.Fatalf("%s: no %s within 10s", d.id, what)
			return nil
		}
	}
}

func (d *dev) nextDeliver() *relayv1.Deliver {
	d.t.Helper()
	return d.next("deliver", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil }).GetDeliver()
}

func (d *dev) nextAckOrReject() *relayv1.Frame {
	d.t.Helper()
	return d.next("ack or reject", func(f *relayv1.Frame) bool { return f.GetAck() != nil || f.GetReject() != nil })
}

func (d *dev) nextClose() *relayv1.Close {
	d.t.Helper()
	return d.next("close", func(f *relayv1.Frame) bool { return f.GetClose() != nil }).GetClose()
}

// expectNothing checks that no frame matching pred arrives while the
// edge handles a Ping round trip (everything sent before the Pong has
// been processed by then).
func (d *dev) expectNothing(what string, pred func(*relayv1.Frame) bool) {
	d.t.Helper()
	nonce := uint64(time.Now().UnixNano())
	d.send(&relayv1.Frame{Kind: &relayv1.Frame_Ping{Ping: &relayv1.Ping{Nonce: nonce}}})
	deadline := time.After(10 * time.Second)
	for {
		select {
		case f := <-d.frames:
			if pred(f) {
				d.t.Fatalf("%s: unexpected %s: %v", d.id, what, f)
			}
			if f.GetPong().GetNonce() == nonce {
				return
			}
		case <-deadline:
			d.t.Fatalf("%s: no pong within 10s", d.id)
		}
	}
}

func (d *dev) event(targets ...string) *relayv1.Event {
	d.seq++
	return &relayv1.Event{Id: fmt.Sprintf("%s-%d", d.id, d.seq), Seq: d.seq, CreatedAtMs: time.Now().UnixMilli(),
		TtlMs: 60_000, Type: "test", Payload: []byte("hello"), Targets: targets}
}

func (d *dev) sendEvent(ev *relayv1.Event) {
	d.t.Helper()
	d.send(&relayv1.Frame{Kind: &relayv1.Frame_Event{Event: ev}})
}

func (d *dev) received(ids ...uint64) {
	d.t.Helper()
	d.send(&relayv1.Frame{Kind: &relayv1.Frame_Received{Received: &relayv1.Received{DeliveryIds: ids}}})
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func codeOf(err error) relayv1.ErrorCode {
	var ce *CloseError
	if errors.As(err, &ce) {
		return ce.Code
	}
	return -1
}

// marshalDeterministic encodes what tests send outside the frame writer.
var marshalDeterministic = proto.MarshalOptions{Deterministic: true}
