package session

import (
	"maps"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/edge-relay/relay/internal/telemetry"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// Remote is the mesh of edges as the session core uses it (edge/mesh
// provides it).
type Remote interface {
	// Locate says which other edge holds a device.
	Locate(deviceID string) (edgeID string, ok bool)
	// Since says when the newest session of a device on another edge
	// started, by that edge's clock, as it announced it.
	Since(deviceID string) (time.Time, bool)
	// Forward sends an event to the edge holding its device; done (nil
	// for an ephemeral event) gets the outcome once.
	Forward(edgeID string, f *edgev1.Forward, done func(edgev1.ForwardOutcome))
	// Announce tells the other edges a device came online here or left.
	Announce(p *edgev1.DevicePresence, online bool)
	// Online lists a user's devices that other edges hold.
	Online(userID string) []string
}

// pendingForward is a sender's forwards to one device still waiting for
// their outcome, in the order they were forwarded, and the edge they went
// to (with routeMu).
//
// Outcomes are acted on in that order, whatever order they come in: a
// refusal can come at once (the link is down or was replaced, the
// target's session there is closing) while an earlier forward is still
// undecided, and storing the later one first would put it ahead in the
// mailbox.
type pendingForward struct {
	edge  string
	slots []*fwdSlot
	// draining: a goroutine is acting on decided outcomes from the head;
	// others only record theirs, which it takes in turn.
	draining bool
	// storing: an outcome was decided for the mailbox. The sender's later
	// events for the device follow it there, in a slot of their own, and
	// are not forwarded: the edge they would go to may never have seen
	// the refused one (this edge answered for a link that was down or
	// replaced), so nothing there would hold them back.
	storing bool
}

// fwdSlot is one forward's place in its pendingForward.
type fwdSlot struct {
	decided bool
	act     func() // what its outcome does, once it is the head's turn
	// bytes is what its event weighs in Session.fwdBytes while the slot
	// may still need it (0 once released).
	bytes int
}

// releaseFwd takes a slot's event out of Session.fwdBytes. With routeMu.
func (s *Session) releaseFwd(slot *fwdSlot) {
	s.fwdBytes -= slot.bytes
	slot.bytes = 0
}

// decide records a forward's outcome, and acts on every decided outcome
// at the head, in order, unless another goroutine already does: actions
// run without routeMu, and the device's pending entry goes once none is
// left (after the last action, so a store it made is pending by then).
//
// store says the outcome stores the event in the mailbox: from then on
// the sender's events for the device follow it (pendingForward.storing).
func (s *Session) decide(device string, pf *pendingForward, slot *fwdSlot, store bool, act func()) {
	s.routeMu.Lock()
	slot.decided, slot.act = true, act
	pf.storing = pf.storing || store
	if !store {
		// Its action holds no event (forward builds it so).
		s.releaseFwd(slot)
	}
	if pf.draining {
		s.routeMu.Unlock()
		return
	}
	pf.draining = true
	for len(pf.slots) > 0 && pf.slots[0].decided {
		run := pf.slots[0].act
		s.releaseFwd(pf.slots[0]) // a store hands its event on to the mailbox writer
		pf.slots[0] = nil
		pf.slots = pf.slots[1:]
		s.routeMu.Unlock()
		run()
		s.routeMu.Lock()
	}
	pf.draining = false
	if len(pf.slots) == 0 && s.fwdPending[device] == pf {
		delete(s.fwdPending, device)
	}
	s.routeMu.Unlock()
}

// forward sends a durable event to the edge holding its target. What
// that edge could not deliver is stored in the target's mailbox by this
// edge, which keeps the sender's order there.
//
// The route was chosen before this looks again, under routeMu: if an
// earlier forward's outcome sent it to the mailbox meanwhile, this one
// follows it there instead: in a slot of the device's pending forwards,
// decided as a store, while any are undecided; straight to the mailbox
// once none is left and a store is under way.
func (s *Session) forward(f *inflight, r route, event []byte, expires time.Time) {
	store := func() { s.storeMailbox(f, r.device, event, expires, nil) }
	s.routeMu.Lock()
	if s.fwdPending == nil {
		s.fwdPending = map[string]*pendingForward{}
	}
	pf := s.fwdPending[r.device]
	if pf == nil && s.mbPending[r.device] > 0 {
		s.routeMu.Unlock()
		store()
		return
	}
	if n := len(event); s.fwdBytes+n > s.hub.cfg.PendingForwardBytes && s.fwdBytes > 0 {
		// The events of forwards whose outcomes are not acted on yet
		// weigh what one session may hold: a target's edge that holds an
		// early forward (its device reads but does not acknowledge) must
		// not make this edge keep the sender's later events, each up to
		// the frame limit, four thousand a target. (Before an entry is
		// made for the device: an empty one would route its next events
		// to the mailbox.)
		s.routeMu.Unlock()
		f.fail(relayv1.ErrorCode_ERROR_CODE_QUEUE_FULL, "too many bytes of events wait for an earlier one's outcome; retry later")
		return
	}
	if pf == nil {
		pf = &pendingForward{}
		s.fwdPending[r.device] = pf
	}
	if len(pf.slots) >= maxPendingForwards {
		// An earlier forward has been undecided for long (its target's
		// edge holds it): what queues behind it, events and all, is
		// bounded.
		s.routeMu.Unlock()
		f.fail(relayv1.ErrorCode_ERROR_CODE_QUEUE_FULL, "too many events for a target wait for an earlier one's outcome; retry later")
		return
	}
	slot := &fwdSlot{bytes: len(event)}
	s.fwdBytes += slot.bytes
	pf.slots = append(pf.slots, slot)
	if pf.storing || s.mbPending[r.device] > 0 {
		s.routeMu.Unlock()
		s.decide(r.device, pf, slot, true, store)
		return
	}
	pf.edge = r.edge
	s.routeMu.Unlock()
	tr := f.trace.child(s.hub.cfg.Tracer, "relay.mesh.forward", trace.SpanKindProducer, attribute.String("relay.edge", r.edge))
	// With the sender: the receiving edge's refusals after a NOT_DELIVERED
	// are per sender, as r.need is (refuseForward).
	fw := &edgev1.Forward{DeviceId: r.device, UserId: s.userID, Event: event, NeedMailboxSeq: r.need, SenderRevision: s.openRev.Load(),
		Traceparent: tr.traceparent(), SenderDeviceId: s.deviceID, ExpiresAtMs: expires.UnixMilli()}
	if f.anyOne {
		fw.AnyOne, fw.EventId = true, f.eventID
	}
	s.hub.cfg.Remote.Forward(r.edge, fw, func(o edgev1.ForwardOutcome) {
		if tr.span != nil {
			tr.span.SetAttributes(attribute.String("relay.forward.outcome", o.String()))
		}
		tr.end(relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED)
		stores := s.hub.cfg.Mailbox != nil && o != edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED &&
			o != edgev1.ForwardOutcome_FORWARD_OUTCOME_QUEUE_FULL && o != edgev1.ForwardOutcome_FORWARD_OUTCOME_TARGET_GONE
		// Only the action that stores refers to the event: the others
		// let it go now, though they wait for earlier outcomes.
		var act func()
		switch {
		case o == edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED:
			act = func() { f.confirm(s.hub.cfg.Now()) }
		case o == edgev1.ForwardOutcome_FORWARD_OUTCOME_QUEUE_FULL:
			act = func() { f.fail(relayv1.ErrorCode_ERROR_CODE_QUEUE_FULL, "a target's queue is full; retry later") }
		case o == edgev1.ForwardOutcome_FORWARD_OUTCOME_TARGET_GONE:
			act = func() { f.fail(relayv1.ErrorCode_ERROR_CODE_TARGET_DELETED, "a target was deleted or revoked") }
		case stores:
			// Stored before the pending entry goes, so no later event
			// finds both paths clear and overtakes it.
			act = store
		default:
			act = func() { f.fail(relayv1.ErrorCode_ERROR_CODE_TARGET_OFFLINE, "a target went offline; retry later") }
		}
		s.decide(r.device, pf, slot, stores, act)
	})
}

// maxPendingForwards bounds a sender's forwards to one device that wait
// for their outcome, with the stores decided behind them.
const maxPendingForwards = 4096

// undeliveredFor is how long a sender's forwards for a device are
// refused after one of them was answered NOT_DELIVERED (unless they show
// the sending edge has stored it since): far longer than the answer
// takes to reach the sending edge, after which it forwards nothing for
// the device before that store is done.
const undeliveredFor = 30 * time.Second

// maxUndelivered bounds the refusals remembered per shard; beyond it
// (after expired ones are swept) no more are noted.
const maxUndelivered = 10_000

// fwdKey names a sender's forwards for one target device.
type fwdKey struct{ sender, device string }

// undelivered is a forward this edge answered NOT_DELIVERED: the mailbox
// seq it needed (what its sender had stored for the device then), and
// until when later forwards that need no more are refused.
type undelivered struct {
	need  uint64
	until time.Time
}

// refuseForward reports whether a durable forward must be answered
// NOT_DELIVERED because an earlier one of its sender for the device was:
// the sending edge is storing that one in the mailbox, and this one,
// forwarded before it knew, would overtake it if delivered live now. A
// forward that needs a later mailbox seq was sent after that store, and
// ends the refusal.
func (h *Hub) refuseForward(user string, k fwdKey, need uint64, now time.Time) bool {
	sh := h.shardOf(user)
	sh.umu.Lock()
	defer sh.umu.Unlock()
	u, ok := sh.undelivered[k]
	if !ok {
		return false
	}
	if need > u.need || !now.Before(u.until) {
		delete(sh.undelivered, k)
		return false
	}
	return true
}

// noteUndelivered remembers that fw was answered NOT_DELIVERED.
func (h *Hub) noteUndelivered(fw *edgev1.Forward, now time.Time) {
	sh := h.shardOf(fw.GetUserId())
	k := fwdKey{fw.GetSenderDeviceId(), fw.GetDeviceId()}
	sh.umu.Lock()
	defer sh.umu.Unlock()
	u, ok := sh.undelivered[k]
	if !ok && len(sh.undelivered) >= maxUndelivered {
		maps.DeleteFunc(sh.undelivered, func(_ fwdKey, u undelivered) bool { return !now.Before(u.until) })
		if len(sh.undelivered) >= maxUndelivered {
			return
		}
	}
	sh.undelivered[k] = undelivered{need: max(u.need, fw.GetNeedMailboxSeq()), until: now.Add(undeliveredFor)}
}

// DeliverForwarded hands an event another edge forwarded to the device's
// session here; report (nil for an ephemeral event) gets the outcome.
//
// A durable forward answered NOT_DELIVERED (the device was between
// sessions, or its session ended before acknowledging it) is stored by
// the sending edge; the same sender's later forwards for the device may
// already be on their way, and are refused the same way until one shows
// that store done (refuseForward), so none is delivered live before it.
// The look is taken where a delivery goes live, after the device's session
// has seen every hand-off before it: deliverLive for one queued at once,
// releaseHeld for one held meanwhile in the device's new session until
// its old one handed off. (Taken here, on arrival, it would miss a
// hand-off between arrival and delivery.)
func (h *Hub) DeliverForwarded(fw *edgev1.Forward, report func(edgev1.ForwardOutcome)) {
	if d := h.cfg.Directory.LookupDevice(fw.GetDeviceId()); d.UserID != fw.GetUserId() || d.State != DeviceActive {
		if report != nil {
			report(edgev1.ForwardOutcome_FORWARD_OUTCOME_TARGET_GONE)
		}
		return
	}
	if report != nil && h.cfg.Mailbox != nil {
		// (Without mailboxes the sending edge stores nothing: it refuses
		// the event to its sender, and later ones may go on.)
		answer := report
		report = func(o edgev1.ForwardOutcome) {
			if o == edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED {
				h.noteUndelivered(fw, h.cfg.Now())
			}
			answer(o)
		}
	}
	if h.afterForwardArrived != nil {
		h.afterForwardArrived()
	}
	ss := h.sessionsOf(fw.GetUserId(), fw.GetDeviceId())
	if len(ss) == 0 {
		if report != nil {
			report(edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED)
		}
		return
	}
	if !h.cfg.Limits.deliverable(len(fw.GetEvent())) {
		// Accepted by an edge with a larger limit. Durable, it goes back
		// to be stored, as for a device not here: an edge that can
		// deliver it will, and this one passes it by in the mailbox
		// (queueEntries); the sender's later events are held behind it
		// until then, as after any NOT_DELIVERED.
		if report == nil {
			h.undeliverable(h.cfg.Metrics.droppedTooLarge, "forward", len(fw.GetEvent()))
			return
		}
		h.undeliverable(h.cfg.Metrics.tooLargeForward, "forward", len(fw.GetEvent()))
		report(edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED)
		return
	}
	d := ss[0]
	if report == nil {
		if d.out.offer(fw.GetEvent(), false, true, nil) == queueFull {
			h.cfg.Metrics.droppedQueueFull.Inc()
		}
		return
	}
	f := &inflight{fwd: report, remaining: 1, arrived: h.cfg.Now(), origin: fwdKey{fw.GetSenderDeviceId(), fw.GetDeviceId()},
		trace: h.remoteTrace("relay.mesh.deliver", fw.GetTraceparent(), true, attribute.String("relay.device", telemetry.HashID(fw.GetDeviceId())))}
	if ms := fw.GetExpiresAtMs(); ms > 0 {
		f.expires = time.UnixMilli(ms)
	}
	if fw.GetAnyOne() {
		f.claim = &edgev1.EventClaim{SenderDeviceId: fw.GetSenderDeviceId(), EventId: fw.GetEventId(), ExpiresAtMs: fw.GetExpiresAtMs()}
	}
	switch d.deliverLive(fw.GetEvent(), f, fw.GetNeedMailboxSeq(), fw.GetSenderRevision()) {
	case queueFull:
		f.fail(relayv1.ErrorCode_ERROR_CODE_QUEUE_FULL, "")
	case queueClosed:
		f.fail(relayv1.ErrorCode_ERROR_CODE_TARGET_OFFLINE, "")
	}
}

// LocalPresence lists the devices with a session here, for other edges.
func (h *Hub) LocalPresence() []*edgev1.DevicePresence {
	var out []*edgev1.DevicePresence
	for i := range h.shards {
		sh := &h.shards[i]
		sh.mu.Lock()
		for _, r := range sh.rooms {
			r.mu.RLock()
			for _, s := range r.devices {
				out = append(out, s.presence())
			}
			r.mu.RUnlock()
		}
		sh.mu.Unlock()
	}
	return out
}

// PeerHolds closes the session of a device here that is older than its
// session on edge edgeID: the device moved, the newer session wins. Two
// sessions as old (two edges both took a start just after the device's
// session on a third, register) are told apart as the mesh's table of
// where devices are does: the lower edge id wins.
func (h *Hub) PeerHolds(userID, deviceID string, since time.Time, instance, edgeID string) {
	for _, s := range h.sessionsOf(userID, deviceID) {
		if s.since.Before(since) || (s.since.Equal(since) && edgeID < h.cfg.EdgeID) {
			ce := closeErr(relayv1.ErrorCode_ERROR_CODE_REPLACED, "a newer session of this device is on another edge")
			ce.ReplacedBy = instance
			s.closeWith(ce, 0)
		}
	}
}

func (s *Session) presence() *edgev1.DevicePresence {
	return &edgev1.DevicePresence{DeviceId: s.deviceID, UserId: s.userID, SinceNs: s.since.UnixNano(), Instance: s.instance}
}

// PeerPresence tells the user's devices here that one of their devices
// came online on another edge, or is on none any more. A device with a
// session here is online whatever the other edges say: it moved here,
// and the edge it left forgot it.
func (h *Hub) PeerPresence(userID, deviceID string, online bool) {
	if !online && len(h.sessionsOf(userID, deviceID)) > 0 {
		return
	}
	for _, s := range h.sessionsOf(userID, "") {
		if s.deviceID != deviceID {
			s.out.control(presence(deviceID, online))
		}
	}
}
