package session

import (
	"context"
	"hash/maphash"
	"slices"
	"sync"
	"time"

	"github.com/edge-relay/relay/edge/frame"
	"github.com/edge-relay/relay/edge/idwindow"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// inflight is a durable event on its way to its targets on this edge:
// the sender's Ack goes out when every target acknowledged it.
type inflight struct {
	sender  *Session // nil for an event forwarded from another edge
	eventID string
	digest  uint64
	arrived time.Time
	expires time.Time // when it may no longer be delivered (TTL plus skew)
	// fwd reports the outcome of an event another edge forwarded here;
	// origin names its sender and target device.
	fwd    func(edgev1.ForwardOutcome)
	origin fwdKey
	// An "any one" event: the first copy delivered (or stored) completes
	// it, and it fails only when every copy did. claim identifies it for
	// the control plane's claims.
	anyOne bool
	claim  *edgev1.EventClaim
	// trace is the event's span on this edge, ended with its outcome.
	trace eventTrace

	mu        sync.Mutex // guards the fields below
	remaining int
	failures  int
	done      bool
	failed    bool
}

// key is the event's id, which the sender's duplicate window finds it by.
func (f *inflight) key() string { return f.eventID }

// finish marks the event done (once); false when it already was.
func (f *inflight) finish(failed bool) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.done {
		return false
	}
	f.done, f.failed = true, failed
	return true
}

// confirm records one target's acknowledgement, taken at now (the
// event's ack latency ends there).
func (f *inflight) confirm(now time.Time) {
	f.mu.Lock()
	if f.done {
		f.mu.Unlock()
		return
	}
	f.remaining--
	if f.remaining > 0 && !f.anyOne {
		f.mu.Unlock()
		return
	}
	f.done = true
	f.mu.Unlock()
	f.trace.end(relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED)
	if f.fwd != nil {
		f.fwd(edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED)
		return
	}
	f.sender.acked(f, now)
}

// fail refuses the event to its sender (once); an "any one" event only
// when its last copy failed.
func (f *inflight) fail(code relayv1.ErrorCode, msg string) {
	if f.anyOne {
		f.mu.Lock()
		f.failures++
		last := f.failures >= f.remaining
		f.mu.Unlock()
		if !last {
			return
		}
	}
	if !f.finish(true) {
		return
	}
	f.trace.end(code)
	if f.fwd != nil {
		switch code {
		case relayv1.ErrorCode_ERROR_CODE_QUEUE_FULL:
			f.fwd(edgev1.ForwardOutcome_FORWARD_OUTCOME_QUEUE_FULL)
		case relayv1.ErrorCode_ERROR_CODE_TARGET_DELETED:
			f.fwd(edgev1.ForwardOutcome_FORWARD_OUTCOME_TARGET_GONE)
		default:
			f.fwd(edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED)
		}
		return
	}
	f.sender.sendReject(f.eventID, &RejectError{Code: code, Msg: msg})
}

// state returns (done, failed).
func (f *inflight) state() (bool, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.done, f.failed
}

func (s *Session) acked(f *inflight, now time.Time) {
	s.hub.cfg.Metrics.ackLatency.Observe(now.Sub(f.arrived).Seconds())
	s.ack(f.eventID)
}

// refuse rejects an event for the device's own fault (it was invalid,
// reused an id, named a target it may not): a device that keeps doing
// that runs out of refusals (see refused).
func (s *Session) refuse(eventID string, r *RejectError) {
	s.reject(eventID, r)
	switch r.Code {
	case relayv1.ErrorCode_ERROR_CODE_TARGET_OFFLINE, relayv1.ErrorCode_ERROR_CODE_QUEUE_FULL,
		relayv1.ErrorCode_ERROR_CODE_MAILBOX_FULL, relayv1.ErrorCode_ERROR_CODE_INTERNAL:
		// The edge's or the targets' state, not the device's fault.
	default:
		s.refused()
	}
}

// reject refuses an event on arrival (counted as its result).
func (s *Session) reject(eventID string, r *RejectError) {
	s.hub.cfg.Metrics.refuse(r.Code)
	s.queueReject(eventID, r)
}

// sendReject tells the device that an event accepted earlier failed.
func (s *Session) sendReject(eventID string, r *RejectError) {
	s.hub.cfg.Metrics.reject(r.Code)
	s.queueReject(eventID, r)
}

func (s *Session) queueReject(eventID string, r *RejectError) {
	s.control(&relayv1.Frame{Kind: &relayv1.Frame_Reject{Reject: &relayv1.Reject{EventId: eventID, Code: r.Code, Message: r.Msg}}})
}

// handleEvent validates an event that arrived at now and hands it to
// its targets on this edge. It runs on the sender's reader goroutine, so
// the events of one sender reach every receiver's queue in the order they
// were sent. The event's payload may point into the reader's buffer:
// nothing keeps it beyond this call (the encoding made here is a copy).
func (s *Session) handleEvent(ctx context.Context, ev *relayv1.Event, now time.Time) {
	tr := s.traceEvent(ctx, ev)
	expires, rej := ValidateEvent(ev, s.hub.cfg.Limits, now)
	if rej != nil {
		s.refuse(ev.GetId(), rej)
		tr.end(rej.Code)
		return
	}
	// Until an inflight takes the span over, it ends here with the
	// event's fate at intake.
	if outcome, handedOver := s.acceptEvent(ev, tr, now, expires); !handedOver {
		tr.end(outcome)
	}
}

// acceptEvent is handleEvent for a valid event, under the sender's event
// lock: the duplicate and order checks, then the hand-off to each target.
// It reports the event's outcome at intake, and whether an inflight took
// the trace over (then it ends the trace with the event's fate). (Its own function, so that its one defer, and none per
// return, costs nothing on the way through.)
func (s *Session) acceptEvent(ev *relayv1.Event, tr eventTrace, now, expires time.Time) (relayv1.ErrorCode, bool) {
	cfg := &s.hub.cfg
	s.evMu.Lock()
	defer s.evMu.Unlock()
	durable := !ev.GetEphemeral()
	var digest uint64
	if durable {
		digest = eventDigest(s.hub.seed, ev)
		if s.dedup == nil {
			s.dedup = idwindow.New(s.hub.seed, s.hub.cfg.DedupWindow, (*inflight).key)
		}
		if prev := s.dedup.Get(ev.GetId()); prev != nil {
			done, failed := prev.state()
			switch {
			case prev.digest != digest:
				code := relayv1.ErrorCode_ERROR_CODE_DUPLICATE_ID
				s.refuse(ev.GetId(), reject(code, "event id %s was used for a different event", ev.GetId()))
				return code, false
			case !failed:
				// Acked already, or its Ack will come: not relayed again.
				cfg.Metrics.duplicate.Inc()
				if done {
					s.ack(ev.GetId())
				}
				return relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, false
			}
			// A refused event may be sent again.
		}
		if ev.GetSeq() <= s.lastSeq {
			code := relayv1.ErrorCode_ERROR_CODE_SEQ_OUT_OF_ORDER
			s.refuse(ev.GetId(), reject(code, "event %s: seq %d not above %d", ev.GetId(), ev.GetSeq(), s.lastSeq))
			return code, false
		}
	}
	if s.dirCache == nil {
		s.dirCache = &dirCache{dir: cfg.Directory}
	}
	s.dirCache.refresh()
	if !s.dirCache.senderActive(s.userID, s.deviceID) {
		code := relayv1.ErrorCode_ERROR_CODE_SENDER_REVOKED
		s.reject(ev.GetId(), reject(code, "this device was revoked"))
		return code, false
	}
	var routeBuf [4]route // most events have few targets: no allocation
	routes, rej := s.resolveTargets(ev, durable, routeBuf[:0])
	if rej != nil {
		s.refuse(ev.GetId(), rej)
		return rej.Code, false
	}
	// The encoding every receiver gets (the sender filled in, unknown
	// fields gone), which also copies the payload out of the read buffer.
	ev.SenderDeviceId = s.deviceID
	enc := frame.AppendEvent(make([]byte, 0, frame.EventSize(ev)), ev)
	if !durable {
		for _, r := range routes {
			if r.edge != "" {
				cfg.Remote.Forward(r.edge, &edgev1.Forward{DeviceId: r.device, UserId: s.userID, Event: enc, Traceparent: tr.traceparent()}, nil)
				continue
			}
			if r.to != nil && r.to.out.offer(enc, false, true, nil) == queueFull {
				cfg.Metrics.droppedQueueFull.Inc()
			}
		}
		cfg.Metrics.accepted.Inc()
		s.noteActive(now)
		return relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, false
	}
	f := &inflight{sender: s, eventID: ev.GetId(), digest: digest, arrived: now, expires: expires, remaining: len(routes), anyOne: ev.GetAnyOne(), trace: tr}
	if f.anyOne {
		f.claim = &edgev1.EventClaim{SenderDeviceId: s.deviceID, EventId: ev.GetId(), UserId: s.userID, ExpiresAtMs: expires.UnixMilli()}
	}
	s.dedup.Add(f)
	s.lastSeq = ev.GetSeq()
	cfg.Metrics.accepted.Inc()
	s.noteActive(now)
	if len(routes) == 0 {
		f.remaining = 1
		f.confirm(now)
		return relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, true
	}
	// Each mailbox write is a Raft entry replicated to every control node:
	// the sender pays for every copy beyond the one its frame paid for, in
	// events and bytes, so a broadcast to many offline devices writes no
	// faster than the device's event and byte rates.
	if n := mailboxRoutes(routes); n > 1 {
		s.budget.charge(now, n-1, (n-1)*len(enc))
	}
	for _, r := range routes {
		if r.edge != "" {
			s.forward(f, r, enc, expires)
			continue
		}
		if r.to == nil {
			s.storeMailbox(f, r.device, enc, expires, nil)
			continue
		}
		switch r.to.deliverLive(enc, f, r.need, s.openRev.Load()) {
		case queueFull:
			f.fail(relayv1.ErrorCode_ERROR_CODE_QUEUE_FULL, "a target's queue is full; retry later")
		case queueClosed:
			f.fail(relayv1.ErrorCode_ERROR_CODE_TARGET_OFFLINE, "a target went offline; retry later")
		}
	}
	return relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, true
}

// mailboxRoutes counts the routes that go to a mailbox.
func mailboxRoutes(routes []route) int {
	n := 0
	for _, r := range routes {
		if r.to == nil && r.edge == "" {
			n++
		}
	}
	return n
}

// dirCache keeps the directory's answers a sender's events ask for most,
// for as long as the directory's generation stays the one they were read
// at: a revocation, a deletion or a new device applied before an event is
// read is seen by that event, as when every event asked. The session's
// is made at its first event and used under evMu.
type dirCache struct {
	dir Directory
	gen uint64 // the generation the answers below were read at (0: keep none)
	// active: the sender's device and user were found active.
	active bool
	// target is what the last explicit target looked up, targetID, is.
	targetID string
	target   DeviceInfo
	// userDevs is the user's active devices (nil: not read).
	userDevs []string
}

// refresh drops what was read at an older generation; once per event,
// before the answers it vouches for are read.
func (c *dirCache) refresh() {
	if g := c.dir.Generation(); g == 0 || g != c.gen {
		*c = dirCache{dir: c.dir, gen: g}
	}
}

// senderActive reports whether the session's device and its user are
// active.
func (c *dirCache) senderActive(user, device string) bool {
	if c.active {
		return true
	}
	if d := c.dir.LookupDevice(device); d.State != DeviceActive || !c.dir.UserActive(user) {
		return false
	}
	c.active = c.gen != 0
	return true
}

// lookup is the directory's LookupDevice.
func (c *dirCache) lookup(id string) DeviceInfo {
	if c.targetID == id && id != "" {
		return c.target
	}
	d := c.dir.LookupDevice(id)
	if c.gen != 0 {
		c.targetID, c.target = id, d
	}
	return d
}

// userDevices is the directory's UserDevices (not to be changed).
func (c *dirCache) userDevices(user string) []string {
	if c.userDevs != nil {
		return c.userDevs
	}
	devs := c.dir.UserDevices(user)
	if c.gen != 0 && devs != nil {
		c.userDevs = devs
	}
	return devs
}

// route is where an event goes for one target: a session here (to), or
// the target's mailbox (to == nil). need is the target's mailbox seq the
// device must have been given first.
type route struct {
	to     *Session
	edge   string // another edge holds the device (to == nil)
	device string
	need   uint64
}

// resolveTargets finds where an event goes, appending to out. Every explicit target must be
// an active device of the sender's user; no targets means every device of
// the user but the sender, on this edge or another. With mailboxes, a
// durable event reaches every target: the connected ones live, the others
// through their mailboxes; without, a durable event for a target that is
// not connected is refused whole, before anything is delivered (a
// broadcast goes to the connected ones).
func (s *Session) resolveTargets(ev *relayv1.Event, durable bool, out []route) ([]route, *RejectError) {
	dir := s.dirCache // refreshed for this event (acceptEvent)
	mailboxes := durable && s.hub.cfg.Mailbox != nil
	r := s.room
	if len(ev.GetTargets()) == 0 {
		// Every device of the user: through the mailbox or on another edge
		// too, where there are mailboxes or other edges; else the ones
		// here.
		if mailboxes || s.hub.cfg.Remote != nil {
			devs := dir.userDevices(s.userID)
			out = slices.Grow(out, len(devs))
			r.mu.RLock()
			for _, id := range devs {
				if id != s.deviceID {
					out = append(out, route{to: r.devices[id], device: id})
				}
			}
			r.mu.RUnlock()
			s.locateRemote(out)
		} else {
			r.mu.RLock()
			out = slices.Grow(out, len(r.devices))
			for id, o := range r.devices {
				if id != s.deviceID {
					out = append(out, route{to: o, device: id})
				}
			}
			r.mu.RUnlock()
		}
	} else {
		out = slices.Grow(out, len(ev.GetTargets()))
		for i, t := range ev.GetTargets() {
			for _, prev := range ev.GetTargets()[:i] {
				if prev == t {
					return nil, reject(relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME, "event %s: target %q listed twice", ev.GetId(), t)
				}
			}
			if t == s.deviceID {
				return nil, reject(relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME, "event %s: a device cannot target itself", ev.GetId())
			}
			d := dir.lookup(t)
			if d.State == DeviceUnknown || d.UserID != s.userID {
				// One answer for "another user's" and "no such device".
				return nil, reject(relayv1.ErrorCode_ERROR_CODE_UNKNOWN_TARGET, "event %s: %q is not one of your devices", ev.GetId(), t)
			}
			if d.State != DeviceActive {
				return nil, reject(relayv1.ErrorCode_ERROR_CODE_TARGET_DELETED, "event %s: device %q was deleted or revoked", ev.GetId(), t)
			}
			r.mu.RLock()
			o := r.devices[t]
			r.mu.RUnlock()
			rt := route{to: o, device: t}
			if o == nil {
				rt.edge = s.locate(t)
			}
			if o == nil && rt.edge == "" && durable && !mailboxes {
				return nil, reject(relayv1.ErrorCode_ERROR_CODE_TARGET_OFFLINE, "event %s: device %q is offline", ev.GetId(), t)
			}
			out = append(out, rt)
		}
	}
	if !mailboxes {
		// Ephemeral events go to connected devices only, in no order; so
		// does a durable broadcast without mailboxes (a durable event's
		// explicit targets were all found above, or it was refused).
		n := 0
		for _, rt := range out {
			if rt.to != nil || rt.edge != "" {
				out[n] = rt
				n++
			}
		}
		return out[:n], nil
	}
	if mailboxes {
		// Nothing may overtake this sender's earlier events for a target:
		// while some are on their way to its mailbox, this one follows
		// them there; while some are forwarded to an edge, this one goes
		// the same way (that edge answers in order). A target reached live
		// must first be given what this sender stored for it.
		// Until the session knows its start revision, a target cannot tell
		// whether this sender's earlier sessions stored events for it: the
		// mailbox keeps the order.
		unknownStart := !s.openKnown.Load()
		s.routeMu.Lock()
		for i := range out {
			rt := &out[i]
			// Forwards first: while some are undecided, this one takes
			// its place behind them (forward), even when an earlier one's
			// store is under way, which it must not overtake either.
			if pf, ok := s.fwdPending[rt.device]; ok {
				rt.to, rt.edge = nil, pf.edge
			} else if s.mbPending[rt.device] > 0 || unknownStart {
				rt.to, rt.edge = nil, ""
			}
			rt.need = s.mbLast[rt.device]
		}
		s.routeMu.Unlock()
	}
	return out, nil
}

// locate says which other edge holds a device ("" for none).
func (s *Session) locate(device string) string {
	if s.hub.cfg.Remote == nil {
		return ""
	}
	e, _ := s.hub.cfg.Remote.Locate(device)
	return e
}

// locateRemote fills in the edge of routes whose device is not here.
func (s *Session) locateRemote(rs []route) {
	for i := range rs {
		if rs[i].to == nil {
			rs[i].edge = s.locate(rs[i].device)
		}
	}
}

// eventDigest identifies an event's content to tell a duplicate from a
// reused id: its targets, type, payload and TTL. Not its seq, which a
// resend may change, nor its creation time: a sender retrying a refused
// event (QUEUE_FULL, TARGET_OFFLINE) builds it again a moment later.
func eventDigest(seed maphash.Seed, ev *relayv1.Event) uint64 {
	var h maphash.Hash
	h.SetSeed(seed)
	for _, t := range ev.GetTargets() {
		_, _ = h.WriteString(t)
		_ = h.WriteByte(0)
	}
	_ = h.WriteByte(1)
	_, _ = h.WriteString(ev.GetType())
	_ = h.WriteByte(0)
	_, _ = h.Write(ev.GetPayload())
	var n [8]byte
	for i := range 8 {
		n[i] = byte(uint64(ev.GetTtlMs()) >> (8 * i))
	}
	_, _ = h.Write(n[:])
	return h.Sum64()
}
