package session

import (
	"maps"
	"slices"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"

	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// await is a delivery the device has not acknowledged yet: a live event
// (f, with its encoding for a hand-off to the mailbox) or a mailbox entry
// (mbSeq).
type await struct {
	f     *inflight
	event []byte
	mbSeq uint64
	// mbHistory is the history of the page the entry came from.
	mbHistory string
	// For an "any one" event: what to claim when the device acknowledges.
	claim *edgev1.EventClaim
	// size is the encoded event's length, which the queue counts until
	// the device acknowledges the delivery.
	size int
}

// track records a delivery this device must acknowledge.
func (s *Session) track(id uint64, a await) {
	s.awaitMu.Lock()
	if s.awaiting == nil {
		s.awaiting = make(map[uint64]await)
	}
	s.awaiting[id] = a
	s.awaitMu.Unlock()
}

// handleReceived takes the device's acknowledgements, read at now.
func (s *Session) handleReceived(ids []uint64, now time.Time) {
	var acked []uint64
	history := "" // the history of the pages the acked entries came from
	settled, settledBytes := 0, 0
	for _, id := range ids {
		s.awaitMu.Lock()
		a, ok := s.awaiting[id]
		delete(s.awaiting, id)
		s.awaitMu.Unlock()
		if ok {
			settled++
			settledBytes += a.size
		}
		switch {
		case !ok:
		case a.claim != nil && s.hub.cfg.Mailbox != nil:
			s.claim(a)
		case a.mbSeq != 0 && (len(acked) == 0 || a.mbHistory == history):
			acked, history = append(acked, a.mbSeq), a.mbHistory
		case a.mbSeq != 0:
			// Entries of two histories (the control plane was restored
			// between two pages): each ack goes in its own.
			s.hub.cfg.Mailbox.Ack(s.deviceID, a.mbHistory, a.mbSeq)
			s.mailboxAcked(1)
		default:
			a.f.confirm(now)
		}
	}
	if settled > 0 {
		s.out.settle(settled, settledBytes)
		if s.mb.wake != nil {
			// A pump waiting for room may go on.
			signal(s.mb.wake)
		}
	}
	if len(acked) > 0 {
		s.hub.cfg.Mailbox.Ack(s.deviceID, history, acked...)
		s.mailboxAcked(len(acked))
	}
}

// claim asks the control plane whether this device is the one that takes
// an "any one" event it acknowledged. Either way the delivery counts as
// done (the event was taken care of); a device that lost gets a Cancel.
func (s *Session) claim(a await) {
	c := proto.Clone(a.claim).(*edgev1.EventClaim)
	c.DeviceId, c.UserId = s.deviceID, s.userID
	// Only what the answer needs: not the event, which the claim would
	// keep in memory for as long as the control plane takes to answer.
	f, mbSeq, history := a.f, a.mbSeq, a.mbHistory
	s.hub.cfg.Mailbox.Claim(c, func(won bool) {
		if !won {
			s.out.control(&relayv1.Frame{Kind: &relayv1.Frame_Cancel{Cancel: &relayv1.Cancel{EventId: c.GetEventId(), SenderDeviceId: c.GetSenderDeviceId()}}})
		}
		if mbSeq != 0 {
			s.hub.cfg.Mailbox.Ack(s.deviceID, history, mbSeq)
			s.mailboxAcked(1)
			return
		}
		f.confirm(s.hub.cfg.Now())
	})
}

// handOff gives the events this device never acknowledged to its
// mailbox (they count as delivered once stored), or, without mailboxes
// or when the device was revoked, refuses them to their senders: they
// must not count as delivered. done is called once every store it made
// is answered, with the highest seq stored (0: none) in all and by
// sender.
func (s *Session) handOff(done func(stored handedOff)) {
	t := &handoffStores{done: done}
	defer t.issued()
	// What the session this one replaced handed off comes first for the
	// next one too: once this one's stores are answered, and that one
	// said it stored its own, done gets both (a device replaced twice in
	// a row: the third session must not take the first one's floor for
	// the second's alone, nor open before the first one's are stored).
	m := &s.mb
	m.mu.Lock()
	if m.gate {
		t.add()
		m.passOn = t.merge
	} else {
		t.got = handedOff{max: m.floor, bySender: maps.Clone(m.floorBy)}
	}
	m.mu.Unlock()
	s.awaitMu.Lock()
	pending := s.awaiting
	s.awaiting = nil
	s.awaitMu.Unlock()
	held := s.takeHeld()
	ids := make([]uint64, 0, len(pending))
	for id, a := range pending {
		if a.f != nil {
			ids = append(ids, id)
		}
	}
	// In the order they were queued, so each sender's order holds in the
	// mailbox.
	slices.Sort(ids)
	revoked := s.closeReason.Code == relayv1.ErrorCode_ERROR_CODE_REVOKED
	give := func(f *inflight, event []byte) {
		switch {
		case f.fwd != nil:
			// The sending edge stores it (keeping its sender's order).
			if revoked {
				f.fail(relayv1.ErrorCode_ERROR_CODE_TARGET_DELETED, "")
			} else {
				f.fail(relayv1.ErrorCode_ERROR_CODE_TARGET_OFFLINE, "")
			}
		case revoked:
			f.fail(relayv1.ErrorCode_ERROR_CODE_TARGET_DELETED, "a target was revoked or deleted")
		case s.hub.cfg.Mailbox == nil:
			f.fail(relayv1.ErrorCode_ERROR_CODE_TARGET_OFFLINE, "a target went offline before receiving it; retry later")
		default:
			t.add()
			sender := f.sender.deviceID
			f.sender.storeMailbox(f, s.deviceID, event, f.expires, func(seq uint64) { t.stored(sender, seq) })
		}
	}
	for _, id := range ids {
		a := pending[id]
		give(a.f, a.event)
	}
	for _, h := range held {
		give(h.f, h.event)
	}
}

// handedOff is what a hand-off stored: the highest seq in all, and each
// sender's highest (0: none).
type handedOff struct {
	max      uint64
	bySender map[string]uint64
}

// handoffStores counts a hand-off's stores until each is answered.
type handoffStores struct {
	mu      sync.Mutex
	pending int
	all     bool // every store was issued
	got     handedOff
	done    func(handedOff)
}

func (t *handoffStores) add() {
	t.mu.Lock()
	t.pending++
	t.mu.Unlock()
}

// note records seq (0: nothing) stored for sender.
func (h *handedOff) note(sender string, seq uint64) {
	if seq == 0 {
		return
	}
	h.max = max(h.max, seq)
	if h.bySender == nil {
		h.bySender = map[string]uint64{}
	}
	h.bySender[sender] = max(h.bySender[sender], seq)
}

// answered takes one of the answers the hand-off waits for (add), which
// record notes, and calls done once the last is in and every store was
// issued.
func (t *handoffStores) answered(record func(*handedOff)) {
	t.mu.Lock()
	t.pending--
	record(&t.got)
	fire, got := t.all && t.pending == 0, t.got
	t.mu.Unlock()
	if fire {
		t.done(got)
	}
}

func (t *handoffStores) stored(sender string, seq uint64) {
	t.answered(func(h *handedOff) { h.note(sender, seq) })
}

// merge takes what the replaced session stored, which the hand-off
// waited for (add).
func (t *handoffStores) merge(prev handedOff) {
	t.answered(func(h *handedOff) {
		h.max = max(h.max, prev.max)
		for sender, seq := range prev.bySender {
			h.note(sender, seq)
		}
	})
}

func (t *handoffStores) issued() {
	t.mu.Lock()
	t.all = true
	fire, got := t.pending == 0, t.got
	t.mu.Unlock()
	if fire {
		t.done(got)
	}
}
