package mesh

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/edge-relay/relay/internal/stacks"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
)

// stuckLocal stops in DeliverForwarded until release is closed: the
// peer's reader stops, as a wedged or hostile peer's does, while its
// QUIC connection stays alive.
type stuckLocal struct {
	fakeLocal
	release chan struct{}
}

func (s *stuckLocal) DeliverForwarded(*edgev1.Forward, func(edgev1.ForwardOutcome)) { <-s.release }

// outcomes counts the answers forwards get.
type outcomes struct {
	mu sync.Mutex
	n  map[edgev1.ForwardOutcome]int
}

func (o *outcomes) done(out edgev1.ForwardOutcome) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.n == nil {
		o.n = map[edgev1.ForwardOutcome]int{}
	}
	o.n[out]++
}

func (o *outcomes) total() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	sum := 0
	for _, n := range o.n {
		sum += n
	}
	return sum
}

// A peer that keeps its connection alive but stops reading: what waits
// on the link stays within QueueBytes (the rest is answered NOT_DELIVERED
// at once); once nothing was taken for the idle timeout the link goes
// down and every forward sent is answered NOT_DELIVERED; and stopping a
// mesh whose writer is blocked returns at once rather than after the
// idle timeout.
func TestAPeerThatStopsReading(t *testing.T) {
	ca := newTestCA(t)
	stuck := &stuckLocal{release: make(chan struct{})}
	defer close(stuck.release) // before the meshes close (cleanups run after)
	b := startMeshWith(t, ca, "edge-b", stuck, nil)
	// Members of b (their own links never come up): b reads what they send.
	b.SetMembers([]Member{{ID: "edge-a-short", MeshAddr: "127.0.0.1:9"}, {ID: "edge-a-long", MeshAddr: "127.0.0.1:9"}})
	payload := make([]byte, 48<<10)
	for _, tc := range []struct {
		name string
		idle time.Duration
	}{{"cut off after the idle timeout", time.Second}, {"stopped while blocked", time.Minute}} {
		t.Run(tc.name, func(t *testing.T) {
			a := startMeshWith(t, ca, "edge-a-"+map[bool]string{true: "short", false: "long"}[tc.idle < time.Minute], &fakeLocal{},
				func(c *Config) { c.QueueBytes, c.IdleTimeout = 1<<20, tc.idle })
			a.SetMembers([]Member{{ID: "edge-b", MeshAddr: b.Addr().String()}})
			waitFor(t, "the link up", func() bool { return a.Stats().LinksUp == 1 })
			var got outcomes
			const n = 2000 // 94 MiB offered
			for range n {
				a.Forward("edge-b", &edgev1.Forward{DeviceId: "d", UserId: "u", Event: payload}, got.done)
				a.mu.Lock()
				l := a.links["edge-b"]
				a.mu.Unlock()
				l.mu.Lock()
				queued := l.queued
				l.mu.Unlock()
				if queued > 1<<20 {
					t.Fatalf("%d bytes wait on the link, bound 1 MiB", queued)
				}
			}
			if tc.idle < time.Minute {
				waitFor(t, "every forward answered", func() bool { return got.total() == n })
			} else {
				closed := make(chan struct{})
				go func() { _ = a.Close(); close(closed) }()
				select {
				case <-closed:
				case <-time.After(20 * time.Second):
					t.Fatal("Close waited on a writer blocked on a peer that does not read")
				}
				if got.total() != n {
					t.Fatalf("%d of %d forwards answered after Close", got.total(), n)
				}
			}
			got.mu.Lock()
			defer got.mu.Unlock()
			if got.n[edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED] != n {
				t.Fatalf("outcomes %v, want all %d NOT_DELIVERED", got.n, n)
			}
			// The metrics tell a full link from a broken one.
			full, down := counterValue(a.metrics.forwards.WithLabelValues("link_full")), counterValue(a.metrics.forwards.WithLabelValues("link_down"))
			if full == 0 || full+down != n {
				t.Fatalf("forwards counted link_full %v, link_down %v; want some full, %d in all", full, down, n)
			}
		})
	}
}

// A peer that sends forwards and never reads their outcomes: this edge
// stops reading it once MaxOutstanding outcomes wait, instead of queueing
// them without bound.
func TestAPeerThatDoesNotReadItsOutcomes(t *testing.T) {
	ca := newTestCA(t)
	lb := &fakeLocal{outcome: edgev1.ForwardOutcome_FORWARD_OUTCOME_TARGET_GONE}
	const outstanding = 1000
	b := startMeshWith(t, ca, "edge-b", lb, func(c *Config) { c.MaxOutstanding = outstanding })
	b.SetMembers([]Member{{ID: "edge-evil", MeshAddr: "127.0.0.1:9"}}) // a member gone bad
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn, str := rawLink(ctx, t, b.Addr().String(), testIdentity(t, ca, "edge-evil").clientTLS("edge-b", nil), 15*time.Second)
	w := bufio.NewWriterSize(str, 64<<10)
	var buf []byte
	var err error
	if buf, err = writeFrame(w, buf, &edgev1.MeshFrame{Kind: &edgev1.MeshFrame_Hello{Hello: &edgev1.MeshHello{EdgeId: "edge-evil", PeerId: "edge-b"}}}); err != nil {
		t.Fatal(err)
	}
	// Far more than fit in flow control and the bound together; written
	// from a goroutine, as the writes block once edge-b stops reading.
	const n = 300_000
	wrote := make(chan error, 1)
	go func() {
		var err error
		for i := range n {
			f := &edgev1.MeshFrame{Kind: &edgev1.MeshFrame_Forward{Forward: &edgev1.Forward{Id: uint64(i + 1), DeviceId: "nobody", UserId: "u"}}}
			if buf, err = writeFrame(w, buf, f); err != nil {
				break
			}
		}
		if err == nil {
			err = w.Flush()
		}
		wrote <- err
	}()
	// edge-b reads until its outcomes fill the stream's flow-control
	// window and the bound, then no further: the reads stop moving for a
	// second while the writer is still blocked. (Without the bound it
	// reads them all and the writer finishes.)
	finished := false
	for last, deadline := -1, time.Now().Add(time.Minute); ; {
		cur := lb.forwards()
		if cur == last || time.Now().After(deadline) {
			break
		}
		last = cur
		select {
		case <-wrote:
			finished = true
		case <-time.After(time.Second):
		}
		if finished {
			break
		}
	}
	b.mu.Lock()
	in := b.inbound["edge-evil"]
	b.mu.Unlock()
	in.mu.Lock()
	queued := len(in.out)
	in.mu.Unlock()
	if finished || queued > outstanding || lb.forwards() >= n {
		t.Fatalf("%d outcomes queued, %d of %d forwards read (all written: %v) from a peer that reads none: want at most %d queued and reading stopped",
			queued, lb.forwards(), n, finished, outstanding)
	}
	_ = conn.CloseWithError(0, "")
	if !finished {
		<-wrote
	}
}

// A peer that opens its link's stream and stalls inside its hello is
// dropped after HelloTimeout (2 s, long enough to be seen waiting in it
// on a busy machine), and cannot hold up Close meanwhile: a
// connection that is not registered yet is closed with the mesh too
// (there with a HelloTimeout far beyond the test's waits).
func TestAPeerStalledInItsHello(t *testing.T) {
	ca := newTestCA(t)
	for _, closeMesh := range []bool{false, true} {
		hello := 2 * time.Second
		if closeMesh {
			hello = time.Hour
		}
		b, err := New(Config{EdgeID: "edge-b", Identity: testIdentity(t, ca, "edge-b"), Local: &fakeLocal{},
			HelloTimeout: hello, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		if err != nil {
			t.Fatal(err)
		}
		ran := make(chan struct{})
		go func() { b.Run(); close(ran) }()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		conn, err := quic.DialAddr(ctx, b.Addr().String(), testIdentity(t, ca, "edge-evil").clientTLS("edge-b", nil), quicConfig(time.Minute, false))
		if err != nil {
			t.Fatal(err)
		}
		str, err := conn.OpenStreamSync(ctx)
		if err != nil {
			t.Fatal(err)
		}
		// The first byte of a hello's length, and nothing more: b waits
		// in the hello's read.
		if _, err := str.Write([]byte{0x20}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "b reading the hello", func() bool { return stacks.Count("mesh.readFrame(", "mesh.(*Mesh).serveInbound(") > 0 })
		closed := make(chan error, 1)
		if closeMesh {
			go func() { closed <- b.Close() }()
		}
		select {
		case <-conn.Context().Done():
		case <-time.After(30 * time.Second):
			t.Fatalf("close %v: a peer stalled in its hello is still connected after 30 s", closeMesh)
		}
		if !closeMesh {
			go func() { closed <- b.Close() }()
		}
		select {
		case <-closed:
		case <-time.After(30 * time.Second):
			t.Fatalf("close %v: Close did not return", closeMesh)
		}
		<-ran
		_ = conn.CloseWithError(0, "")
		cancel()
	}
}

// peerListener listens as edge-b, a peer a test drives by hand, with
// flow-control windows of window bytes a stream (twice that a
// connection), so that a peer that does not read holds a's writer soon;
// it closes when the test ends.
func peerListener(t *testing.T, ca *testCA, idle time.Duration, window int) *quic.Listener {
	t.Helper()
	qc := quicConfig(idle, true)
	qc.InitialStreamReceiveWindow, qc.MaxStreamReceiveWindow = uint64(window), uint64(window)
	qc.InitialConnectionReceiveWindow, qc.MaxConnectionReceiveWindow = uint64(2*window), uint64(2*window)
	ln, err := quic.ListenAddr("127.0.0.1:0", testIdentity(t, ca, "edge-b").serverTLS(), qc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	return ln
}

// pacedReader reads at most max bytes a tick: a peer that reads steadily
// but slowly.
type pacedReader struct {
	r    io.Reader
	tick <-chan time.Time
	max  int
}

func (p *pacedReader) Read(b []byte) (int, error) {
	<-p.tick
	return p.r.Read(b[:min(len(b), p.max)])
}

// A peer that reads steadily, but more slowly than a burst is queued
// for it, keeps its link: the batch is written in chunks, each given
// the idle timeout, rather than the whole batch in it. The peer (driven
// by hand, with small flow-control windows) reads at most 16 KiB every
// 10 ms, 1.6 MB/s, and 6 MiB of forwards are queued at once with an
// idle timeout of 1 s: they take about 4 s, a chunk (64 KiB) some 40 ms
// (25 times less than the timeout, for a busy machine). Before, the link
// went down a second into a batch, and the forwards not answered by then
// were NOT_DELIVERED. (a's writer may take some of the forwards before
// the rest are queued, but at most two batches carry them, as the peer
// reads nothing until all are queued: the larger is over 3 MiB, which
// the peer cannot take in a second.)
func TestASteadyButSlowPeerKeepsItsLink(t *testing.T) {
	ca := newTestCA(t)
	a := startMeshWith(t, ca, "edge-a", &fakeLocal{}, func(c *Config) { c.IdleTimeout = time.Second })
	ln := peerListener(t, ca, time.Second, 64<<10)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	a.SetMembers([]Member{{ID: "edge-b", MeshAddr: ln.Addr().String()}})
	const n, size = 192, 32 << 10
	// The peer: once every forward is queued (so all but the few a's
	// writer took first go in one batch), reads a's frames at its pace
	// and answers each forward DELIVERED, until it has read them all or
	// its link breaks.
	queued := make(chan struct{})
	peer := make(chan error, 1)
	go func() {
		peer <- func() error {
			conn, err := ln.Accept(ctx)
			if err != nil {
				return err
			}
			defer conn.CloseWithError(0, "")
			str, err := conn.AcceptStream(ctx)
			if err != nil {
				return err
			}
			select {
			case <-queued:
			case <-ctx.Done():
				return ctx.Err()
			}
			tick := time.NewTicker(10 * time.Millisecond)
			defer tick.Stop()
			r := bufio.NewReaderSize(&pacedReader{r: str, tick: tick.C, max: 16 << 10}, 16<<10)
			var buf, out []byte
			for seen := 0; seen < n; {
				f := &edgev1.MeshFrame{}
				if buf, err = readFrame(r, buf, f); err != nil {
					return fmt.Errorf("after %d forwards: %w", seen, err)
				}
				if fw := f.GetForward(); fw != nil {
					seen++
					res := &edgev1.MeshFrame{Kind: &edgev1.MeshFrame_ForwardResult{ForwardResult: &edgev1.ForwardResult{Id: fw.GetId(), Outcome: edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED}}}
					if out, err = writeFrame(str, out, res); err != nil {
						return err
					}
				}
			}
			<-ctx.Done() // the link stays until the test has looked at it
			return nil
		}()
	}()
	waitFor(t, "the link up", func() bool { return a.Stats().LinksUp == 1 })
	var got outcomes
	start := time.Now()
	for range n {
		a.Forward("edge-b", &edgev1.Forward{DeviceId: "d", UserId: "u", Event: make([]byte, size)}, got.done)
	}
	close(queued)
	waitFor(t, "every forward answered", func() bool { return got.total() == n })
	t.Logf("%d KiB taken in %v", n*size>>10, time.Since(start).Round(time.Millisecond))
	got.mu.Lock()
	delivered, all := got.n[edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED], fmt.Sprint(got.n)
	got.mu.Unlock()
	if st := a.Stats(); delivered != n || st.LinksUp != 1 || st.Dials != 1 {
		t.Fatalf("a steadily reading peer: %d of %d forwards DELIVERED (%s), links up %d after %d dials; want all, one link, never down",
			delivered, n, all, st.LinksUp, st.Dials)
	}
	cancel()
	if err := <-peer; err != nil {
		t.Fatalf("the peer: %v", err)
	}
}

// A peer that begins a frame and stops sending it has its link closed
// after the idle timeout (1 s here), on either side of the link: before,
// a peer stalled inside a frame held the link, and the part of the frame
// it sent, for as long as its QUIC keep-alives kept the connection up.
// Only a frame under way is bounded: a peer that has been idle longer
// still, between frames, keeps its link, and so does one that sends a
// large frame slowly but steadily (768 KiB at 8 KiB every 20 ms, some
// 2 s; 64 KiB, what must come within the timeout, some 160 ms).
func TestAPeerStalledInsideAFrameLosesItsLink(t *testing.T) {
	ca := newTestCA(t)
	w := &warnings{}
	local := &fakeLocal{}
	a := startMeshWith(t, ca, "edge-a", local, func(c *Config) { c.IdleTimeout, c.Logger = time.Second, slog.New(w) })
	ln, err := quic.ListenAddr("127.0.0.1:0", testIdentity(t, ca, "edge-b").serverTLS(), quicConfig(time.Second, true))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	a.SetMembers([]Member{{ID: "edge-b", MeshAddr: ln.Addr().String()},
		{ID: "edge-x", MeshAddr: "127.0.0.1:9"}, {ID: "edge-y", MeshAddr: "127.0.0.1:9"}, {ID: "edge-z", MeshAddr: "127.0.0.1:9"}})
	// peer dials a as id, sends its hello and frames, and returns its
	// connection and link stream.
	peer := func(id string, frames ...*edgev1.MeshFrame) (*quic.Conn, *quic.Stream) {
		conn, str := rawLink(ctx, t, a.Addr().String(), testIdentity(t, ca, id).clientTLS("edge-a", nil), time.Second)
		frames = append([]*edgev1.MeshFrame{{Kind: &edgev1.MeshFrame_Hello{Hello: &edgev1.MeshHello{EdgeId: id, PeerId: "edge-a"}}}}, frames...)
		for _, f := range frames {
			if _, err := writeFrame(str, nil, f); err != nil {
				t.Fatal(err)
			}
		}
		return conn, str
	}
	set := func(dev string) *edgev1.MeshFrame {
		return &edgev1.MeshFrame{Kind: &edgev1.MeshFrame_PresenceSet{PresenceSet: &edgev1.PresenceSet{Devices: presenceOf(dev)}}}
	}
	forward := func(size int) *edgev1.MeshFrame {
		return &edgev1.MeshFrame{Kind: &edgev1.MeshFrame_Forward{Forward: &edgev1.Forward{UserId: "u", DeviceId: "d", Event: make([]byte, size)}}}
	}
	// The start of a frame: its length, and a tenth of it.
	begun := append(binary.AppendUvarint(nil, 100<<10), make([]byte, 10<<10)...)

	// y: up, then idle from before z begins its frame to after z's link
	// is gone.
	y, ys := peer("edge-y", set("dy"))
	waitFor(t, "y's device located", func() bool { e, ok := a.Locate("dy"); return ok && e == "edge-y" })
	// x: begins a large frame, and sends it slowly but steadily.
	x, xs := peer("edge-x", set("dx"))
	waitFor(t, "x's device located", func() bool { e, ok := a.Locate("dx"); return ok && e == "edge-x" })
	var slow bytes.Buffer
	if _, err := writeFrame(&slow, nil, forward(768<<10)); err != nil {
		t.Fatal(err)
	}
	sent := make(chan error, 1)
	go func() {
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for b := slow.Bytes(); len(b) > 0; b = b[min(len(b), 8<<10):] {
			if _, err := xs.Write(b[:min(len(b), 8<<10)]); err != nil {
				sent <- err
				return
			}
			<-tick.C
		}
		sent <- nil
	}()
	// stall begins a frame on str, stops there, and waits for conn to
	// be closed.
	stall := func(conn *quic.Conn, str *quic.Stream, who string) {
		t.Helper()
		if _, err := str.Write(begun); err != nil {
			t.Fatal(err)
		}
		select {
		case <-conn.Context().Done():
		case <-ctx.Done():
			t.Fatalf("%s stalled inside a frame still holds the link", who)
		}
	}
	// z: begins a frame and stalls in it.
	z, zs := peer("edge-z")
	stall(z, zs, "a peer")
	if !w.has("mesh peer stalled inside a frame; its link is closed") {
		t.Fatal("the stall was not logged at warn level")
	}
	if err := context.Cause(y.Context()); err != nil {
		t.Fatalf("an idle peer lost its link: %v", err)
	}
	if _, err := writeFrame(ys, nil, forward(1)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "y's forward delivered", func() bool { return local.forwards() >= 1 })
	if err := <-sent; err != nil {
		t.Fatalf("the slow peer's frame: %v", err)
	}
	waitFor(t, "x's slow forward delivered", func() bool { return local.forwards() == 2 })
	if err := context.Cause(x.Context()); err != nil {
		t.Fatalf("a slow but steady peer lost its link: %v", err)
	}

	// The other side: a peer a dialed begins a frame on its link (an
	// outcome's) and stalls in it; a's link goes down, and a dials again.
	conn, err := ln.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	str, err := conn.AcceptStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a's link to b up", func() bool { return a.Stats().LinksUp == 1 })
	stall(conn, str, "a dialed peer")
	// Logged once the link's loop has returned, which closed the
	// connection first.
	waitFor(t, "the link's end logged at warn level", func() bool { return w.has("mesh link down; reconnecting") })
	again, err := ln.Accept(ctx)
	if err != nil {
		t.Fatalf("a did not dial again: %v", err)
	}
	_ = again.CloseWithError(0, "")
}

// A peer's link that is replaced (the peer's address or key changed)
// is followed by one that comes up only once the old one answered what
// it held. A forward the peer never answered on the old link is answered
// NOT_DELIVERED there, and its sender's edge stores it; up before that,
// the new link would carry the same sender's later events to the peer,
// which would deliver them live ahead of it. Meanwhile forwards are
// answered NOT_DELIVERED at once; after, they reach the peer.
func TestAReplacedLinkAnswersWhatItHeldBeforeTheNextCarriesAny(t *testing.T) {
	// Replaced once; and twice before the first link answered what it
	// held (the peer's address changed twice, or it left and came back,
	// within that time): the newest link still waits for the first, not
	// only for the one in between, which was stopped while it waited
	// (before, that one ended at once, and the newest came up and carried
	// the senders' later events ahead of the first link's answers).
	for _, replacements := range []int{1, 2} {
		t.Run(fmt.Sprintf("replaced %d times", replacements), func(t *testing.T) { replacedLinkWaits(t, replacements) })
	}
}

// replacedLinkWaits has a's link to edge-b (at b1, which never answers)
// replaced by links to other addresses of edge-b, the given number of
// times, while a forward on the first is unanswered.
func replacedLinkWaits(t *testing.T, replacements int) {
	ca := newTestCA(t)
	stuck := &stuckLocal{release: make(chan struct{})}
	defer close(stuck.release) // before the meshes close (cleanups run after)
	b1 := startMeshWith(t, ca, "edge-b", stuck, nil)
	bs := []*Mesh{b1}
	var locals []*fakeLocal
	for range replacements {
		l := &fakeLocal{outcome: edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED}
		locals = append(locals, l)
		bs = append(bs, startMeshWith(t, ca, "edge-b", l, nil))
	}
	a := startMesh(t, ca, "edge-a", &fakeLocal{})
	for _, b := range bs {
		b.SetMembers([]Member{{ID: "edge-a", MeshAddr: a.Addr().String()}})
	}
	a.SetMembers([]Member{{ID: "edge-b", MeshAddr: b1.Addr().String()}})
	waitFor(t, "the link to b1 up", func() bool { return a.Stats().LinksUp == 1 })

	// F1 reaches b1, which never answers; its sender's edge takes the
	// NOT_DELIVERED slowly (held until released).
	hold, first := make(chan struct{}), make(chan edgev1.ForwardOutcome, 1)
	var release sync.Once
	defer release.Do(func() { close(hold) }) // a failure below must not leave the old link held
	a.Forward("edge-b", &edgev1.Forward{DeviceId: "d", UserId: "u", Event: []byte("1")}, func(o edgev1.ForwardOutcome) { <-hold; first <- o })
	waitFor(t, "F1 sent, unanswered", func() bool { return a.Stats().Pending == 1 })
	for _, b := range bs[1:] {
		a.SetMembers([]Member{{ID: "edge-b", MeshAddr: b.Addr().String()}})
	}
	waitFor(t, "the newest link up, or waiting for the old one", func() bool { st := a.Stats(); return st.LinksUp == 1 || st.Waiting == 1 })
	second := make(chan edgev1.ForwardOutcome, 1)
	a.Forward("edge-b", &edgev1.Forward{DeviceId: "d", UserId: "u", Event: []byte("2")}, func(o edgev1.ForwardOutcome) { second <- o })
	if o := nextOutcome(t, second); o != edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED {
		t.Fatalf("F2, sent while F1 was unanswered: %v, want NOT_DELIVERED (stored behind F1)", o)
	}
	release.Do(func() { close(hold) })
	if o := nextOutcome(t, first); o != edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED {
		t.Fatalf("F1: %v", o)
	}
	waitFor(t, "the newest link up", func() bool { return a.Stats().LinksUp == 1 })
	third := make(chan edgev1.ForwardOutcome, 1)
	a.Forward("edge-b", &edgev1.Forward{DeviceId: "d", UserId: "u", Event: []byte("3")}, func(o edgev1.ForwardOutcome) { third <- o })
	if o := nextOutcome(t, third); o != edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED {
		t.Fatalf("F3, after F1 was answered: %v", o)
	}
	for i, l := range locals {
		if n, want := l.forwards(), map[bool]int{false: 0, true: 1}[i == len(locals)-1]; n != want {
			t.Fatalf("replacement %d got %d forwards, want %d (F3 alone, at the newest)", i+1, n, want)
		}
	}
}

// A peer that keeps its link but reads presence more slowly than it
// changes here (a reconnect storm behind a degraded link) does not have
// the changes queue without bound: at QueueLen of them the link takes no
// more, and is ended once its writer takes the queue; it comes up again
// with a full set, which replaces what the peer knew of this edge. Here
// the peer reads nothing until 20 times QueueLen changes were announced,
// then everything.
func TestPresenceForASlowPeerIsBounded(t *testing.T) {
	ca := newTestCA(t)
	local := &fakeLocal{devices: presenceOf("kept")}
	const queueLen = 64
	a := startMeshWith(t, ca, "edge-a", local, func(c *Config) { c.QueueLen, c.IdleTimeout = queueLen, time.Minute })
	ln := peerListener(t, ca, time.Minute, 4<<10)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	a.SetMembers([]Member{{ID: "edge-b", MeshAddr: ln.Addr().String()}})
	announced := make(chan struct{})
	peer := make(chan error, 1)
	go func() {
		peer <- func() error {
			// The first link: read nothing until every change was
			// announced, then all of it, until a ends the link.
			conn, err := ln.Accept(ctx)
			if err != nil {
				return err
			}
			select {
			case <-announced:
			case <-ctx.Done():
				return ctx.Err()
			}
			// a may have ended the link already (its writer took the
			// queue): then its stream is gone with it.
			str, err := conn.AcceptStream(ctx)
			if err == nil {
				_, _ = io.Copy(io.Discard, str)
			}
			_ = conn.CloseWithError(0, "")
			// The next link starts with the hello and a full set. (A
			// connection a gave up before its stream, which a busy
			// machine can show, is passed by.)
			for {
				if conn, err = ln.Accept(ctx); err != nil {
					return err
				}
				defer conn.CloseWithError(0, "")
				if str, err = conn.AcceptStream(ctx); err == nil {
					break
				}
				if ctx.Err() != nil {
					return err
				}
			}
			r := bufio.NewReader(str)
			var buf []byte
			f := &edgev1.MeshFrame{}
			if buf, err = readFrame(r, buf, f); err != nil || f.GetHello() == nil {
				return fmt.Errorf("hello on the second link: %v %v", f, err)
			}
			if _, err = readFrame(r, buf, f); err != nil || f.GetPresenceSet() == nil {
				return fmt.Errorf("a full set on the second link: %v %v", f, err)
			}
			return nil
		}()
	}()
	waitFor(t, "the link up", func() bool { return a.Stats().LinksUp == 1 })
	a.mu.Lock()
	l := a.links["edge-b"]
	a.mu.Unlock()
	for i := range 20 * queueLen {
		a.Announce(&edgev1.DevicePresence{DeviceId: fmt.Sprintf("d%d", i), UserId: "u", SinceNs: int64(i + 1)}, i%2 == 0)
		l.mu.Lock()
		queued := len(l.queue)
		l.mu.Unlock()
		if queued > queueLen+1 { // the changes, and the writer's own frames at most
			t.Fatalf("%d frames wait on the link after %d changes, bound %d", queued, i+1, queueLen)
		}
	}
	close(announced)
	if err := <-peer; err != nil {
		t.Fatalf("the peer: %v", err)
	}
	if n := counterValue(a.metrics.presenceLag); n != 1 {
		t.Fatalf("presence lag counted %v times, want 1", n)
	}
}

// A peer that takes forwards and never answers them (it reads, so its
// link stays up) holds at most MaxOutstanding + 2 x QueueLen of them
// waiting here, with their events; later ones are answered NOT_DELIVERED
// at once, and their senders' edges store them. Before, they piled up
// until the link dropped.
func TestAPeerThatNeverAnswersHoldsABoundedNumberOfForwards(t *testing.T) {
	ca := newTestCA(t)
	const outstanding, queueLen = 4, 4
	a := startMeshWith(t, ca, "edge-a", &fakeLocal{}, func(c *Config) { c.MaxOutstanding, c.QueueLen = outstanding, queueLen })
	ln := peerListener(t, ca, time.Minute, 1<<20)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	read := make(chan uint64, 64) // the ids of the forwards the peer read
	go func() {
		conn, err := ln.Accept(ctx)
		if err != nil {
			return
		}
		str, err := conn.AcceptStream(ctx)
		if err != nil {
			return
		}
		r := bufio.NewReader(str)
		for {
			f := &edgev1.MeshFrame{}
			if _, err := readFrame(r, nil, f); err != nil {
				return
			}
			if fw := f.GetForward(); fw != nil {
				read <- fw.GetId()
			}
		}
	}()
	a.SetMembers([]Member{{ID: "edge-b", MeshAddr: ln.Addr().String()}})
	waitFor(t, "the link up", func() bool { return a.Stats().LinksUp == 1 })
	const bound = outstanding + 2*queueLen
	for i := range bound + 3 {
		out := make(chan edgev1.ForwardOutcome, 1)
		a.Forward("edge-b", &edgev1.Forward{DeviceId: "d", UserId: "u", Event: []byte("x")}, func(o edgev1.ForwardOutcome) { out <- o })
		select {
		case <-read:
			if i >= bound {
				t.Fatalf("forward %d reached the peer, with %d unanswered before it", i+1, i)
			}
		case o := <-out:
			if i < bound || o != edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED {
				t.Fatalf("forward %d answered %v, with %d unanswered before it (bound %d)", i+1, o, i, bound)
			}
		case <-ctx.Done():
			t.Fatalf("forward %d neither reached the peer nor was answered", i+1)
		}
	}
	if n := a.Stats().Pending; n != bound {
		t.Fatalf("%d forwards wait for their outcome, want the bound, %d", n, bound)
	}
}
