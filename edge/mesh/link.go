package mesh

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/internal/jitter"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
)

// link is this edge's connection to one peer: it carries this edge's
// presence and forwards, and brings back the forwards' outcomes.
type link struct {
	m          *Mesh
	peer, addr string
	key        ed25519.PublicKey // registered for peer; nil: not known
	ctx        context.Context
	cancel     context.CancelFunc
	// peerHeard is the peer's latest MeshStatus, sent back on this link
	// (relay-mesh/2); false while the link is down.
	peerHeard atomic.Bool

	mu     sync.Mutex // guards the fields below
	up     bool
	status bool // the peer speaks relay-mesh/2 (MeshStatus) on this connection
	queue  []*edgev1.MeshFrame
	queued int // bytes of the events in queue
	// presence counts the presence and status frames queued since the
	// writer last took the queue; lagging says one more came when
	// QueueLen of them were queued (see sendPresence).
	presence int
	lagging  bool
	nextID   uint64
	dials    int
	pending  map[uint64]func(edgev1.ForwardOutcome)
	wake     chan struct{} // capacity 1

	// after is closed once the link this one replaced (the same peer id at
	// another address or key) has answered what it held NOT_DELIVERED;
	// nil: none. done is closed when run returns.
	after, done chan struct{}
	waiting     atomic.Bool // run waits for after
}

// newLink returns a link to peer; replaced is the link it replaces (nil:
// none), which must have been stopped.
func newLink(m *Mesh, peer, addr string, key ed25519.PublicKey, replaced *link) *link {
	l := &link{m: m, peer: peer, addr: addr, key: key, pending: map[uint64]func(edgev1.ForwardOutcome){}, wake: make(chan struct{}, 1),
		done: make(chan struct{})}
	if replaced != nil {
		l.after = replaced.done
	}
	l.ctx, l.cancel = context.WithCancel(m.ctx)
	return l
}

func (l *link) stop() { l.cancel() }

func (l *link) signal() {
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

// sendPresence queues a presence frame if the link is up (with the
// mesh's presMu held). A link that is down gets a full set when it comes
// up.
//
// A peer that reads more slowly than devices come and go here (one that
// reads steadily keeps its link, however slowly) would have them queue
// without bound: at QueueLen of them the link is marked lagging and
// takes no more, and its writer ends it once it takes the queue; the
// link comes up again with a full set, which replaces what the peer knew.
func (l *link) sendPresence(f *edgev1.MeshFrame) {
	l.mu.Lock()
	l.queuePresence(f)
	l.mu.Unlock()
	l.signal()
}

// queuePresence queues a presence or status frame if the link is up and
// not lagging (with l.mu held).
func (l *link) queuePresence(f *edgev1.MeshFrame) {
	switch {
	case !l.up || l.lagging:
	case l.presence >= l.m.cfg.QueueLen:
		l.lagging = true
	default:
		l.queue = append(l.queue, f)
		l.presence++
	}
}

// sendStatus queues a status frame if the link is up and the peer takes
// them (with the mesh's presMu held).
func (l *link) sendStatus(heard bool) {
	l.mu.Lock()
	if l.status {
		l.queuePresence(statusFrame(heard))
	}
	l.mu.Unlock()
	l.signal()
}

func statusFrame(heard bool) *edgev1.MeshFrame {
	return &edgev1.MeshFrame{Kind: &edgev1.MeshFrame_Status{Status: &edgev1.MeshStatus{ControlHeard: heard}}}
}

func (l *link) forward(f *edgev1.Forward, done func(edgev1.ForwardOutcome)) {
	l.mu.Lock()
	size := len(f.GetEvent())
	full := len(l.queue) >= l.m.cfg.QueueLen || (len(l.queue) > 0 && l.queued+size > l.m.cfg.QueueBytes) ||
		(done != nil && len(l.pending) >= l.maxPending())
	if !l.up || full {
		l.mu.Unlock()
		if l.up {
			l.m.metrics.linkFull.Inc()
		} else {
			l.m.metrics.linkDown.Inc()
		}
		if done != nil {
			done(edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED)
		}
		return
	}
	if done != nil {
		l.nextID++
		f.Id = l.nextID
		l.pending[f.Id] = done
	} else {
		// No outcome comes back for an ephemeral event: count it here.
		l.m.metrics.ephemeral.Inc()
	}
	l.queue = append(l.queue, &edgev1.MeshFrame{Kind: &edgev1.MeshFrame_Forward{Forward: f}})
	l.queued += size
	l.mu.Unlock()
	l.signal()
}

// maxPending bounds the forwards waiting for their outcome on a link:
// those the peer holds (at most its MaxOutstanding, taken to be this
// edge's), those queued, and the batch being written. Only a peer that
// takes forwards and never answers (they would stay, with their events,
// until the link drops) reaches it; forwards beyond are answered
// NOT_DELIVERED at once, as when the queue is full.
func (l *link) maxPending() int { return l.m.cfg.MaxOutstanding + 2*l.m.cfg.QueueLen }

// run keeps the link up until stopped, reconnecting with backoff. A link
// that goes down is logged at warn level, and so is a peer that cannot be
// reached once the backoff reached its cap; the attempts in between at
// debug level.
func (l *link) run() {
	defer func() {
		// A link stopped while it waited still ends after the one it
		// replaced: the link that replaces it in turn waits on this one
		// alone, and must not come up while the first still holds
		// forwards it has not answered.
		if l.after != nil {
			<-l.after
		}
		close(l.done)
	}()
	if l.after != nil {
		// The link this one replaced may still hold forwards the peer
		// never saw (queued, or in a batch being written), and answers
		// them NOT_DELIVERED as it goes down: their senders' edges store
		// them. Up before that, this link would carry the same senders'
		// later events, which the peer would deliver live ahead of them.
		// Meanwhile forwards to the peer are answered NOT_DELIVERED at
		// once, behind those (the senders decide them in order).
		l.waiting.Store(true)
		select {
		case <-l.after:
		case <-l.ctx.Done():
			return
		}
		l.waiting.Store(false)
	}
	const maxBackoff = 5 * time.Second
	backoff := 50 * time.Millisecond
	log := l.m.cfg.Logger.With("peer", l.peer, "mesh_addr", l.addr)
	failed, warned := 0, false // attempts that failed since the link was last up; said so
	for l.ctx.Err() == nil {
		start := time.Now()
		up, err := l.session()
		if l.ctx.Err() != nil {
			return
		}
		if time.Since(start) > 10*time.Second {
			backoff = 50 * time.Millisecond
		}
		if up {
			failed, warned = 0, false
			log.Warn("mesh link down; reconnecting", "err", err)
		} else {
			failed++
			if backoff == maxBackoff && !warned {
				warned = true
				log.Warn("mesh link cannot connect; retrying every 5s", "err", err, "attempts", failed)
			} else {
				log.Debug("mesh link down; reconnecting", "err", err, "backoff", backoff)
			}
		}
		t := time.NewTimer(jitter.Spread(backoff))
		select {
		case <-t.C:
		case <-l.ctx.Done():
			t.Stop()
			return
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// session runs one connection to the peer until it fails; up reports
// whether the link came up on it.
func (l *link) session() (up bool, err error) {
	l.mu.Lock()
	l.dials++
	l.mu.Unlock()
	if !l.m.cfg.Identity.Ready() {
		return false, errors.New("no mesh certificate yet")
	}
	ctx, cancel := context.WithTimeout(l.ctx, 5*time.Second)
	defer cancel()
	udpAddr, err := resolveUDP(l.addr)
	if err != nil {
		return false, err
	}
	conn, err := l.m.tr.Dial(ctx, udpAddr, l.m.cfg.Identity.clientTLS(l.peer, l.key), quicConfig(l.m.cfg.IdleTimeout, false))
	if err != nil {
		return false, fmt.Errorf("dial: %w", err)
	}
	defer conn.CloseWithError(0, "")
	// Stopping the link (the peer left the member list, the mesh closes)
	// ends a write blocked on a peer that does not read, at once.
	defer context.AfterFunc(l.ctx, func() { _ = conn.CloseWithError(0, "link stopped") })()
	str, err := conn.OpenStreamSync(ctx)
	if err != nil {
		return false, fmt.Errorf("open stream: %w", err)
	}
	var buf []byte
	if buf, err = writeFrame(str, buf, &edgev1.MeshFrame{Kind: &edgev1.MeshFrame_Hello{Hello: &edgev1.MeshHello{EdgeId: l.m.cfg.EdgeID, PeerId: l.peer}}}); err != nil {
		return false, err
	}
	// The full set and the status, then (the link now up) every delta
	// and status change after them.
	status := conn.ConnectionState().TLS.NegotiatedProtocol == ALPNStatus
	l.m.presMu.Lock()
	first := presenceFrames(l.m.cfg.Local.LocalPresence())
	if status {
		first = append(first, statusFrame(l.m.controlHeard))
	}
	l.mu.Lock()
	l.up, l.status = true, status
	l.queue = append(first, l.queue...)
	l.mu.Unlock()
	l.m.presMu.Unlock()
	l.m.metrics.links.Inc()
	defer l.down()
	l.signal()

	w := &frameWriter{str: str, timeout: l.m.cfg.IdleTimeout, buf: buf[:0]}
	var wg sync.WaitGroup
	readErr := make(chan error, 1)
	wg.Go(func() { readErr <- l.readResults(str) })
	defer wg.Wait()
	defer conn.CloseWithError(0, "")
	for {
		select {
		case <-l.ctx.Done():
			return true, l.ctx.Err()
		case err := <-readErr:
			return true, err
		case <-conn.Context().Done():
			return true, context.Cause(conn.Context())
		case <-l.wake:
		}
		l.mu.Lock()
		batch, lagging := l.queue, l.lagging
		l.queue, l.queued, l.presence = nil, 0, 0
		l.mu.Unlock()
		if lagging {
			// What the batch holds goes NOT_DELIVERED (down), and the
			// next link sends a full set in place of what was dropped.
			l.m.metrics.presenceLag.Inc()
			return true, fmt.Errorf("the peer reads presence more slowly than it changes here: %d changes waited", l.m.cfg.QueueLen)
		}
		// A peer that takes nothing (less than a chunk) for the idle
		// timeout is as broken as a silent one: its link goes down, and
		// what it was sent and did not answer is NOT_DELIVERED (stored by
		// the senders' edges). One that reads steadily stays, however
		// long the batch takes.
		for _, f := range batch {
			if _, err = w.add(f); err != nil {
				return true, fmt.Errorf("write to the peer: %w", err)
			}
		}
		if err = w.flush(); err != nil {
			return true, fmt.Errorf("write to the peer: %w", err)
		}
	}
}

func (l *link) readResults(str *quic.Stream) error {
	r := bufio.NewReaderSize(str, 4<<10)
	var buf []byte
	f := &edgev1.MeshFrame{}
	for {
		var err error
		if buf, err = readFrameWithin(r, buf, f, str, l.m.cfg.IdleTimeout); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return fmt.Errorf("the peer stalled inside a frame for %v: %w", l.m.cfg.IdleTimeout, err)
			}
			return err
		}
		if st := f.GetStatus(); st != nil {
			if l.peerHeard.Swap(st.GetControlHeard()) != st.GetControlHeard() {
				l.m.cfg.Logger.Debug("mesh peer's view of the control plane changed", "peer", l.peer, "control_heard", st.GetControlHeard())
			}
			continue
		}
		res := f.GetForwardResult()
		if res == nil {
			return fmt.Errorf("unexpected %T from the peer", f.GetKind())
		}
		l.mu.Lock()
		done := l.pending[res.GetId()]
		delete(l.pending, res.GetId())
		l.mu.Unlock()
		if done != nil {
			l.m.metrics.outcome(res.GetOutcome()).Inc()
			done(res.GetOutcome())
		}
	}
}

// down marks the link down: what was queued or awaits an outcome is
// answered NOT_DELIVERED, in the order it was sent, so the senders' edges
// store it in the mailboxes in that order.
func (l *link) down() {
	l.m.metrics.links.Dec()
	l.peerHeard.Store(false)
	l.m.presMu.Lock()
	l.mu.Lock()
	l.up, l.lagging = false, false
	l.queue, l.queued, l.presence = nil, 0, 0
	pending := l.pending
	l.pending = map[uint64]func(edgev1.ForwardOutcome){}
	l.mu.Unlock()
	l.m.presMu.Unlock()
	for _, id := range sortedIDs(pending) {
		l.m.metrics.linkDown.Inc()
		pending[id](edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED)
	}
}

// presenceChunk bounds the devices of one presence frame, in encoded
// bytes: well under maxFrame, which a peer refuses beyond.
const presenceChunk = 256 << 10

// maxSetFrames bounds the frames a full set may say follow it
// (PresenceSet.continued_in): 16 GiB of presence, far beyond any edge's,
// but a peer cannot hold the set open, and its since checks off, for
// ever. A peer that claims more is cut off.
const maxSetFrames = 1 << 16

// presenceFrames is the full set of devices here, as a link sends it when
// it comes up: a PresenceSet (which replaces what the peer knew of this
// edge) with the first devices and the number of frames still to come,
// then PresenceDeltas adding the rest, each of at most presenceChunk
// bytes. In one frame, the set of an edge with some ten thousand devices
// is over maxFrame, and the peer would refuse it, and the link, for ever.
func presenceFrames(devs []*edgev1.DevicePresence) []*edgev1.MeshFrame {
	var frames []*edgev1.MeshFrame
	emit := func(chunk []*edgev1.DevicePresence) {
		if len(frames) == 0 {
			frames = append(frames, &edgev1.MeshFrame{Kind: &edgev1.MeshFrame_PresenceSet{PresenceSet: &edgev1.PresenceSet{Devices: chunk}}})
			return
		}
		frames = append(frames, &edgev1.MeshFrame{Kind: &edgev1.MeshFrame_PresenceDelta{PresenceDelta: &edgev1.PresenceDelta{Online: chunk}}})
	}
	start, size := 0, 0
	for i, d := range devs {
		n := proto.Size(d) + 4 // the field's tag and length
		if size+n > presenceChunk && i > start {
			emit(devs[start:i:i])
			start, size = i, 0
		}
		size += n
	}
	emit(devs[start:len(devs):len(devs)]) // also the empty set of an edge with none
	frames[0].GetPresenceSet().ContinuedIn = uint32(len(frames) - 1)
	return frames
}
