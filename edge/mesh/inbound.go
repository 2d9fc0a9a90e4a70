package mesh

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
)

// inbound is a peer's link to this edge: its presence and forwards come
// in, outcomes go back.
type inbound struct {
	peer string
	key  ed25519.PublicKey // of the peer's certificate
	conn *quic.Conn
	// status: the link speaks relay-mesh/2, so this edge sends its own
	// MeshStatus back on it; controlHeard is the peer's latest.
	status       bool
	controlHeard atomic.Bool
	// member: the peer is in the member list, under the key it presented,
	// so what it sends counts. A link from anyone else (an edge that left
	// the list, or one this edge has not heard of yet) carries only this
	// edge's status back, which a cut-off edge whose lease ran out needs
	// to step aside (docs/consistency.md, "Partitions"): its presence is
	// dropped, its durable forwards answered NOT_DELIVERED, its ephemeral
	// ones and its status ignored. Cleared (under the mesh's mu) when the
	// peer leaves the list; a link from a peer that joins it is closed, so
	// the peer dials again and sends its full set on a member's link.
	member atomic.Bool

	mu   sync.Mutex // guards out and users
	out  []*edgev1.MeshFrame
	wake chan struct{}
	// slots holds a token per forward whose outcome is not written yet
	// (Config.MaxOutstanding): the reader takes one before it hands a
	// forward on, the writer gives it back once the outcome is written,
	// so a peer that does not read its outcomes is read no further.
	slots chan struct{}
	// users counts, per user, the forwards whose outcome is not decided
	// yet, and undecided all of them (guarded by mu). Devices that take
	// deliveries and never acknowledge them hold their slots until their
	// sessions end: a user may hold at most userShare of them and all
	// users together maxUndecided (half the slots), and forwards beyond
	// either are answered QUEUE_FULL at once. Once the half is held, a
	// user holding fewer than reserveFloor still gets forwards through,
	// from a reserve of a quarter of the slots: a few users' devices
	// cannot stop every other user's durable forwards on the link (it
	// takes a sixteenth of the slots' count in users to hold the reserve
	// too). The quarter left is for outcomes decided at once, so the
	// reader waits for a slot only while the peer does not read its
	// outcomes, never because of devices: the link's presence and
	// ephemeral forwards keep flowing.
	users                            map[string]int
	undecided                        int
	userShare, maxUndecided, reserve int
}

// reserveFloor is how few undecided forwards a user must hold to draw on
// the reserve.
const reserveFloor = 4

// admitLocked reports whether a durable forward of user may wait for its
// outcome (with mu held), and counts it if so.
func (in *inbound) admitLocked(user string) bool {
	n := in.users[user]
	switch {
	case n >= in.userShare:
		return false
	case in.undecided >= in.maxUndecided && (n >= reserveFloor || in.undecided >= in.maxUndecided+in.reserve):
		return false
	}
	in.users[user]++
	in.undecided++
	return true
}

func (in *inbound) send(f *edgev1.MeshFrame) { in.sendFor(f, false, "") }

// sendFor queues f; counted: f is the outcome of a forward of user that
// counted in in.users, counted out under the same lock.
func (in *inbound) sendFor(f *edgev1.MeshFrame, counted bool, user string) {
	in.mu.Lock()
	if counted {
		in.undecided--
		if in.users[user]--; in.users[user] <= 0 {
			delete(in.users, user)
		}
	}
	in.out = append(in.out, f)
	in.mu.Unlock()
	select {
	case in.wake <- struct{}{}:
	default:
	}
}

func resolveUDP(addr string) (*net.UDPAddr, error) {
	a, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("mesh address %q: %w", addr, err)
	}
	return a, nil
}

func (m *Mesh) serveInbound(conn *quic.Conn) {
	defer conn.CloseWithError(0, "")
	// Closing the mesh ends the connection whatever it is waiting for
	// (its hello, a read, a write), registered yet or not, so Close never
	// waits on a peer.
	defer context.AfterFunc(m.ctx, func() { _ = conn.CloseWithError(0, "edge shutting down") })()
	log := m.cfg.Logger.With("remote", conn.RemoteAddr().String())
	certs := conn.ConnectionState().TLS.PeerCertificates
	if len(certs) == 0 {
		return
	}
	peer, err := EdgeIDOf(certs[0])
	if err != nil {
		log.Warn("mesh peer refused", "err", err)
		return
	}
	key, _ := certs[0].PublicKey.(ed25519.PublicKey)
	// The stream and the hello on it come within HelloTimeout, together:
	// a peer that stalls at either holds nothing for longer.
	helloBy := time.Now().Add(m.cfg.HelloTimeout)
	ctx, cancel := context.WithDeadline(m.ctx, helloBy)
	str, err := conn.AcceptStream(ctx)
	cancel()
	if err != nil {
		return
	}
	r := bufio.NewReaderSize(str, 16<<10)
	var buf []byte
	f := &edgev1.MeshFrame{}
	_ = str.SetReadDeadline(helloBy)
	buf, err = readFrame(r, buf, f)
	_ = str.SetReadDeadline(time.Time{})
	if err != nil || f.GetHello() == nil {
		log.Warn("mesh peer sent no hello", "peer", peer, "err", err)
		return
	}
	if h := f.GetHello(); h.GetEdgeId() != peer || h.GetPeerId() != m.cfg.EdgeID {
		log.Warn("mesh hello does not match the certificate", "certificate", peer, "hello", h.GetEdgeId(), "to", h.GetPeerId())
		return
	}
	in := &inbound{peer: peer, key: key, conn: conn, wake: make(chan struct{}, 1), slots: make(chan struct{}, m.cfg.MaxOutstanding),
		users: map[string]int{}, userShare: max(1, m.cfg.MaxOutstanding/8), maxUndecided: max(1, m.cfg.MaxOutstanding/2),
		reserve: m.cfg.MaxOutstanding / 4, status: conn.ConnectionState().TLS.NegotiatedProtocol == ALPNStatus}
	m.mu.Lock()
	if !m.keyHolds(peer, key) {
		// An older process of that id, whose certificate is still valid:
		// the control plane registered another key for it since.
		m.mu.Unlock()
		log.Warn("mesh peer refused: its key is not the one registered for its edge id", "peer", peer)
		return
	}
	member := m.links[peer] != nil
	in.member.Store(member)
	old := m.inbound[peer]
	if old != nil && member && old.member.Load() && in.status && old.key.Equal(key) {
		// The same process reconnected: its status holds until the new
		// link brings one.
		in.controlHeard.Store(old.controlHeard.Load())
	}
	m.inbound[peer] = in
	m.mu.Unlock()
	if !member {
		log.Info("mesh link from an edge that is not a member: it hears this edge's status, nothing it sends counts", "peer", peer)
	}
	if old != nil {
		// The peer reconnected: its new link replaces the old one
		// (closed outside mu: closing waits for the connection's loop).
		_ = old.conn.CloseWithError(0, "replaced")
	}
	m.presMu.Lock()
	// What the peer announced on its last link stays until this one's
	// full set settles it.
	m.endGraceLocked(peer)
	if in.status {
		// This edge's status goes back on the link (ordered with
		// SetControlHeard, which sends to registered links).
		in.send(statusFrame(m.controlHeard))
	}
	m.presMu.Unlock()
	defer func() {
		// presMu first, held until the peer's presence is forgotten: a
		// newer link of the peer that registered in between (after this
		// one was taken out, before its presence went) would otherwise
		// have the set it brought forgotten with this one's.
		m.presMu.Lock()
		m.mu.Lock()
		current := m.inbound[peer] == in
		if current {
			delete(m.inbound, peer)
		}
		// A member whose key still holds may come back: its devices wait
		// out the grace period. Anyone else's go at once.
		member := m.links[peer] != nil && m.keyHolds(peer, in.key)
		m.mu.Unlock()
		switch {
		case !current:
			m.presMu.Unlock()
		case member:
			m.linkEndedLocked(peer)
		default:
			m.dropPeerLocked(peer)
		}
	}()

	var wg sync.WaitGroup
	wctx, stopWriter := context.WithCancel(m.ctx)
	wg.Go(func() { in.writeLoop(wctx, str, m.cfg.IdleTimeout) })
	defer func() {
		// Closed before the wait: a writer blocked on a peer that does
		// not read returns at once.
		stopWriter()
		_ = conn.CloseWithError(0, "")
		wg.Wait()
	}()
	var setLeft uint32 // PresenceDeltas still to come that complete the peer's full set
	sets := 0          // PresenceSets on this link: a peer sends one, first
	for {
		f = &edgev1.MeshFrame{}
		if buf, err = readFrameWithin(r, buf, f, str, m.cfg.IdleTimeout); err != nil {
			switch {
			case errors.Is(err, os.ErrDeadlineExceeded):
				log.Warn("mesh peer stalled inside a frame; its link is closed", "peer", peer, "stall", m.cfg.IdleTimeout)
			case !errors.Is(err, context.Canceled):
				log.Debug("mesh link from peer ended", "peer", peer, "err", err)
			}
			return
		}
		switch k := f.GetKind().(type) {
		case *edgev1.MeshFrame_PresenceSet:
			if sets++; sets > 1 && in.member.Load() {
				// Only a broken or hostile peer: each set marks the
				// devices before it unconfirmed, and they would hold
				// room beside the new set's for as long as it lasts.
				// (A link that is not a member's counts nothing it
				// sends, and stays for the status it hears.)
				log.Warn("mesh peer sent a second presence set on one link; its link is closed", "peer", peer)
				return
			}
			setLeft = k.PresenceSet.GetContinuedIn()
			if setLeft > maxSetFrames {
				log.Warn("mesh peer's presence set claims too many frames", "peer", peer, "frames", setLeft)
				return
			}
			m.presenceFromPeer(peer, in, setPart{inSet: true, first: true, last: setLeft == 0}, k.PresenceSet.GetDevices(), nil)
		case *edgev1.MeshFrame_PresenceDelta:
			part := deltaFrame
			if setLeft > 0 {
				setLeft--
				part = setPart{inSet: true, last: setLeft == 0}
			}
			m.presenceFromPeer(peer, in, part, k.PresenceDelta.GetOnline(), k.PresenceDelta.GetOffline())
		case *edgev1.MeshFrame_Status:
			if !in.member.Load() {
				continue
			}
			if in.controlHeard.Swap(k.Status.GetControlHeard()) != k.Status.GetControlHeard() {
				log.Debug("mesh peer's view of the control plane changed", "peer", peer, "control_heard", k.Status.GetControlHeard())
			}
		case *edgev1.MeshFrame_Forward:
			fw := k.Forward
			member := in.member.Load()
			if fw.GetId() == 0 {
				if member {
					m.cfg.Local.DeliverForwarded(fw, nil)
				}
				continue
			}
			select {
			case in.slots <- struct{}{}:
			case <-conn.Context().Done():
				return
			case <-m.ctx.Done():
				return
			}
			id, user := fw.GetId(), fw.GetUserId()
			if !member {
				in.send(&edgev1.MeshFrame{Kind: &edgev1.MeshFrame_ForwardResult{ForwardResult: &edgev1.ForwardResult{Id: id, Outcome: edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED}}})
				continue
			}
			in.mu.Lock()
			full := !in.admitLocked(user)
			in.mu.Unlock()
			if full {
				in.send(&edgev1.MeshFrame{Kind: &edgev1.MeshFrame_ForwardResult{ForwardResult: &edgev1.ForwardResult{Id: id, Outcome: edgev1.ForwardOutcome_FORWARD_OUTCOME_QUEUE_FULL}}})
				continue
			}
			var once sync.Once
			m.cfg.Local.DeliverForwarded(fw, func(o edgev1.ForwardOutcome) {
				once.Do(func() {
					in.sendFor(&edgev1.MeshFrame{Kind: &edgev1.MeshFrame_ForwardResult{ForwardResult: &edgev1.ForwardResult{Id: id, Outcome: o}}}, true, user)
				})
			})
		default:
			log.Warn("unexpected mesh frame", "peer", peer, "kind", fmt.Sprintf("%T", k))
			return
		}
	}
}

func (m *Mesh) notifyMoved(peer string, ps []*edgev1.DevicePresence) {
	for _, p := range ps {
		m.cfg.Local.PeerHolds(p.GetUserId(), p.GetDeviceId(), time.Unix(0, p.GetSinceNs()), p.GetInstance(), peer)
	}
}

// writeLoop writes the outcomes, in chunks (frameWriter); a peer that
// takes less than a chunk in timeout is cut off. A forward's slot is
// given back once its outcome is written.
func (in *inbound) writeLoop(ctx context.Context, str *quic.Stream, timeout time.Duration) {
	w := &frameWriter{str: str, timeout: timeout}
	for {
		select {
		case <-ctx.Done():
			return
		case <-in.wake:
		}
		in.mu.Lock()
		batch := in.out
		in.out = nil
		in.mu.Unlock()
		unwritten := 0 // outcomes gathered, not written yet
		for _, f := range batch {
			if f.GetForwardResult() != nil {
				unwritten++
			}
			wrote, err := w.add(f)
			if err != nil {
				_ = in.conn.CloseWithError(0, "write failed")
				return
			}
			if wrote {
				in.release(unwritten)
				unwritten = 0
			}
		}
		if err := w.flush(); err != nil {
			_ = in.conn.CloseWithError(0, "write failed")
			return
		}
		in.release(unwritten)
	}
}

// release gives back n forwards' slots.
func (in *inbound) release(n int) {
	for range n {
		<-in.slots
	}
}
