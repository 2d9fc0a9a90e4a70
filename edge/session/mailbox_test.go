package session

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// memMailbox keeps mailboxes in memory with the control plane's
// semantics (per-device increasing seqs, FIFO stores, results through a
// callback from a writer goroutine), plus gates to hold its writer and
// its fetches so tests can force the races the core must survive.
type memMailbox struct {
	mu        sync.Mutex
	rev       uint64 // the revision: one per write
	seq       map[string]uint64
	boxes     map[string][]*edgev1.MailboxEntry
	quota     int
	maxEvent  int                      // if set, larger events are refused as edge/mailbox does
	fails     map[string]int           // fail this many fetches of a device
	busy      map[string]int           // refuse this many fetches of a device as busy (ErrMailboxBusy)
	busyReads map[string]int           // fetches refused as busy
	fetchGate map[string]chan struct{} // if set, a device's fetches wait for it
	snapshots chan string              // if set, told the device of each fetch once it read
	reads     map[string]int           // fetches that read a device's mailbox
	fetched   map[string]int           // entries those fetches returned
	acked     map[string][]uint64
	history   string            // the history its pages name
	ackedIn   []string          // the history each Ack named
	claims    map[string]string // sender/event -> the device that took it

	queue chan func()
	hold  sync.Mutex // held by tests to pause the writer
	done  chan struct{}
}

func newMemMailbox(t testing.TB) *memMailbox {
	m := &memMailbox{seq: map[string]uint64{}, boxes: map[string][]*edgev1.MailboxEntry{}, acked: map[string][]uint64{},
		queue: make(chan func(), 1024), done: make(chan struct{}), quota: 1000,
		fails: map[string]int{}, busy: map[string]int{}, busyReads: map[string]int{}, fetchGate: map[string]chan struct{}{}, reads: map[string]int{}, fetched: map[string]int{}}
	go func() {
		defer close(m.done)
		for f := range m.queue {
			m.hold.Lock()
			m.hold.Unlock() //nolint:staticcheck // a gate, not a critical section
			f()
		}
	}()
	t.Cleanup(func() { close(m.queue); <-m.done })
	return m
}

func (m *memMailbox) Store(e *edgev1.MailboxEntry, done func(MailboxResult)) {
	m.queue <- func() {
		m.mu.Lock()
		var r MailboxResult
		if m.maxEvent > 0 && len(e.GetEvent()) > m.maxEvent {
			r.Err = fmt.Errorf("mailbox entry's event over %d bytes: %w", m.maxEvent, ErrMailboxEventTooLarge)
		} else if len(m.boxes[e.GetDeviceId()]) >= m.quota {
			r.Status = edgev1.MailboxStatus_MAILBOX_STATUS_FULL
		} else {
			m.seq[e.GetDeviceId()]++
			m.rev++
			c := proto.Clone(e).(*edgev1.MailboxEntry)
			c.Seq = m.seq[e.GetDeviceId()]
			m.boxes[e.GetDeviceId()] = append(m.boxes[e.GetDeviceId()], c)
			r.Status, r.Seq = edgev1.MailboxStatus_MAILBOX_STATUS_STORED, c.Seq
		}
		m.mu.Unlock()
		done(r)
	}
}

// Fetch reads like a linearizable read: what is stored when the request
// arrives, answered after the device's gate (if any) opens.
func (m *memMailbox) Fetch(ctx context.Context, device string, after uint64, limit, maxBytes int) (MailboxPage, error) {
	m.mu.Lock()
	gate := m.fetchGate[device]
	if m.fails[device] > 0 {
		m.fails[device]--
		m.mu.Unlock()
		return MailboxPage{}, errors.New("control plane unavailable")
	}
	if m.busy[device] > 0 {
		m.busy[device]--
		m.busyReads[device]++
		m.mu.Unlock()
		return MailboxPage{}, fmt.Errorf("fetch mailbox of %s: %w", device, ErrMailboxBusy)
	}
	rev, history := m.rev, m.history
	m.reads[device]++
	var out []*edgev1.MailboxEntry
	more, size := false, 0
	for _, e := range m.boxes[device] {
		if e.GetSeq() > after {
			size += len(e.GetEvent())
			if len(out) == limit || (len(out) > 0 && maxBytes > 0 && size > maxBytes) {
				more = true
				break
			}
			out = append(out, e)
		}
	}
	m.fetched[device] += len(out)
	snaps := m.snapshots
	m.mu.Unlock()
	if snaps != nil {
		snaps <- device
	}
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return MailboxPage{}, ctx.Err()
		}
	}
	return MailboxPage{Entries: out, More: more, Revision: rev, History: history}, nil
}

func (m *memMailbox) Ack(device, history string, seqs ...uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.ackedIn = append(m.ackedIn, history)
	m.rev++
	m.acked[device] = append(m.acked[device], seqs...)
	m.boxes[device] = slices.DeleteFunc(m.boxes[device], func(e *edgev1.MailboxEntry) bool { return slices.Contains(seqs, e.GetSeq()) })
}

// Claim: the first device to claim an event takes it, and the event's
// entries for the other devices go.
func (m *memMailbox) Claim(c *edgev1.EventClaim, done func(bool)) {
	m.queue <- func() {
		m.mu.Lock()
		if m.claims == nil {
			m.claims = map[string]string{}
		}
		key := c.GetSenderDeviceId() + "/" + c.GetEventId()
		winner, ok := m.claims[key]
		if !ok {
			m.rev++
			winner = c.GetDeviceId()
			m.claims[key] = winner
			for dev, box := range m.boxes {
				if dev != winner {
					m.boxes[dev] = slices.DeleteFunc(box, func(e *edgev1.MailboxEntry) bool {
						return e.GetSenderDeviceId() == c.GetSenderDeviceId() && e.GetEventId() == c.GetEventId()
					})
				}
			}
		}
		m.mu.Unlock()
		done(winner == c.GetDeviceId())
	}
}

func (m *memMailbox) readsOf(device string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.reads[device]
}

// storeAsAnotherEdge stores an entry the way another edge would (no
// announcement here) and returns its seq.
func (m *memMailbox) storeAsAnotherEdge(t *testing.T, device, sender, payload string) uint64 {
	t.Helper()
	done := make(chan MailboxResult, 1)
	m.Store(&edgev1.MailboxEntry{DeviceId: device, UserId: "u1", Event: mustEvent(t, payload), EventId: payload, SenderDeviceId: sender},
		func(r MailboxResult) { done <- r })
	r := <-done
	if r.Status != edgev1.MailboxStatus_MAILBOX_STATUS_STORED {
		t.Fatalf("store for %s: %v", device, r.Status)
	}
	return r.Seq
}

// pause holds the writer (stores wait) until the returned resume is
// called, or the test ends: a failure cannot leave it held.
func (m *memMailbox) pause(t testing.TB) (resume func()) {
	m.hold.Lock()
	var once sync.Once
	resume = func() { once.Do(m.hold.Unlock) }
	t.Cleanup(resume)
	return resume
}

func (m *memMailbox) stored(device string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.boxes[device])
}

func mailboxEnv(t *testing.T, mod func(*Config)) (*env, *memMailbox) {
	mb := newMemMailbox(t)
	e := newEnv(t, func(c *Config) {
		c.Mailbox = mb
		c.Limits = DefaultLimits()
		c.Limits.EventsPerSecond = 1e6
		if mod != nil {
			mod(c)
		}
	})
	return e, mb
}

// payloads reads n deliveries, acknowledging each, and returns their
// payloads.
func (d *dev) payloads(n int) []string {
	d.t.Helper()
	var out []string
	for range n {
		dl := d.nextDeliver()
		d.received(dl.GetDeliveryId())
		out = append(out, string(dl.GetEvent().GetPayload()))
	}
	return out
}

func (d *dev) sendPayload(p string, targets ...string) *relayv1.Event {
	ev := d.event(targets...)
	ev.Payload = []byte(p)
	d.sendEvent(ev)
	return ev
}

// relay sends payload to the device to, which must get it next (acknowledging
// it), and waits for the sender's ack.
func (d *dev) relay(to *dev, payload string) {
	d.t.Helper()
	ev := d.sendPayload(payload, to.id)
	if got := to.payloads(1); got[0] != payload {
		d.t.Fatalf("%s got %q, want %q", to.id, got[0], payload)
	}
	d.expectAck(ev)
}

func (d *dev) expectAck(ev *relayv1.Event) {
	d.t.Helper()
	d.expectAcks(ev)
}

// expectAcks waits for the acks of all the events, in any order (acks
// come as targets answer, not in the order events were sent), skipping
// other frames.
func (d *dev) expectAcks(evs ...*relayv1.Event) {
	d.t.Helper()
	want := map[string]bool{}
	for _, ev := range evs {
		want[ev.GetId()] = true
	}
	for len(want) > 0 {
		f := d.next("acks", func(f *relayv1.Frame) bool {
			return want[f.GetAck().GetEventId()] || want[f.GetReject().GetEventId()]
		})
		if f.GetAck() == nil {
			d.t.Fatalf("%s: want acks of %v, got %v", d.id, want, f)
		}
		delete(want, f.GetAck().GetEventId())
	}
}

func TestOfflineTargetGetsItsMailboxOnConnect(t *testing.T) {
	e, mb := mailboxEnv(t, nil)
	e.device("u1", "a")
	e.device("u1", "b")
	e.device("u1", "c")
	a, c := e.online("a"), e.online("c")
	// A broadcast and a targeted event while b is offline: acked once
	// stored, and c (online) gets the broadcast live.
	e1 := a.sendPayload("one")
	c.payloads(1)
	e2 := a.sendPayload("two", "b")
	a.expectAcks(e1, e2)
	if got := mb.stored("b"); got != 2 {
		t.Fatalf("b's mailbox holds %d", got)
	}
	b := e.online("b")
	if got := b.payloads(2); !slices.Equal(got, []string{"one", "two"}) {
		t.Fatalf("b got %v", got)
	}
	waitFor(t, "acked entries deleted", func() bool { return mb.stored("b") == 0 })
}

// Stored events come before live ones, in each sender's order, even when
// a live event is sent the moment the device is back.
func TestMailboxBeforeLive(t *testing.T) {
	e, _ := mailboxEnv(t, nil)
	e.device("u1", "a")
	e.device("u1", "b")
	a := e.online("a")
	var evs []*relayv1.Event
	for i := range 5 {
		evs = append(evs, a.sendPayload(fmt.Sprint(i), "b"))
	}
	a.expectAcks(evs...)
	b := e.online("b")
	for i := 5; i < 10; i++ {
		a.sendPayload(fmt.Sprint(i), "b")
	}
	want := []string{"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"}
	if got := b.payloads(10); !slices.Equal(got, want) {
		t.Fatalf("b got %v", got)
	}
}

// While a sender's mailbox write for a device is in flight, its next
// events for that device follow it into the mailbox even if the device
// came back meanwhile: nothing overtakes.
func TestNothingOvertakesAMailboxWrite(t *testing.T) {
	e, mb := mailboxEnv(t, nil)
	e.device("u1", "a")
	e.device("u1", "b")
	a := e.online("a")
	release := mb.pause(t) // the writer stalls
	e1 := a.sendPayload("first", "b")
	b := e.connect("b")
	h := b.hello(nil)
	b.send(h)
	b.send(sign(h.GetHello(), b.readDirect().GetChallenge(), e.keys["b"]))
	if b.readDirect().GetWelcome() == nil {
		t.Fatal("no welcome")
	}
	b.startReading()
	e2 := a.sendPayload("second", "b")
	release()
	if got := b.payloads(2); !slices.Equal(got, []string{"first", "second"}) {
		t.Fatalf("b got %v", got)
	}
	a.expectAcks(e1, e2)
}

// storedForOfflineB connects a, which sends "stored" to b while b is
// offline; the event is acknowledged once in b's mailbox.
func storedForOfflineB(t *testing.T, mod func(*Config)) (*env, *memMailbox, *dev) {
	t.Helper()
	e, mb := mailboxEnv(t, mod)
	e.devices("u1", "a", "b")
	a := e.online("a")
	a.expectAck(a.sendPayload("stored", "b"))
	return e, mb, a
}

// A mailbox entry's ack names the history of the page it was read from,
// not the one current when the device acknowledges: after a restore from
// a backup the restored history numbers entries from the backup's seqs
// again, and an ack of an entry read before it must be refused there,
// not delete the restored entry of the same seq.
func TestAMailboxAckNamesItsPagesHistory(t *testing.T) {
	e, mb, _ := storedForOfflineB(t, nil)
	mb.mu.Lock()
	mb.history = "before"
	mb.mu.Unlock()
	b := e.connect("b").login()
	d := b.nextDeliver()
	mb.mu.Lock()
	mb.history = "restored"
	mb.mu.Unlock()
	b.received(d.GetDeliveryId())
	waitFor(t, "b's ack", func() bool {
		mb.mu.Lock()
		defer mb.mu.Unlock()
		return len(mb.ackedIn) == 1
	})
	mb.mu.Lock()
	defer mb.mu.Unlock()
	if mb.ackedIn[0] != "before" {
		t.Fatalf("the ack named history %q, want the page's, %q", mb.ackedIn[0], "before")
	}
}

// A live event that must follow a stored one waits until the stored one
// is queued, even when the mailbox cannot be read for a while.
func TestLiveEventWaitsForTheMailbox(t *testing.T) {
	_, a, b, gate := heldBehindTheMailbox(t, nil)
	a.sendPayload("live", "b")
	b.expectNothing("a live event before the stored one", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil })
	close(gate)
	if got := b.payloads(2); !slices.Equal(got, []string{"stored", "live"}) {
		t.Fatalf("b got %v", got)
	}
}

// heldBehindTheMailbox has a store an entry for b while b is offline,
// then brings b online while its mailbox cannot be read (the first read
// fails, the next waits for the returned gate): live events from a to b
// wait behind the stored one.
func heldBehindTheMailbox(t *testing.T, mod func(*Config)) (e *env, a, b *dev, gate chan struct{}) {
	t.Helper()
	e, mb, a := storedForOfflineB(t, mod)
	gate = make(chan struct{})
	mb.mu.Lock()
	mb.fails["b"], mb.fetchGate["b"] = 1, gate
	mb.mu.Unlock()
	return e, a, e.online("b"), gate
}

// Live deliveries held behind the mailbox are bounded by bytes as the
// queue is, not by count alone (256 events of up to 64 KiB each): past
// a queue's worth their senders get QUEUE_FULL, and what was held
// arrives, in order, once the mailbox before it has.
func TestHeldDeliveriesAreBoundedInBytes(t *testing.T) {
	const queueBytes = 256 << 10
	_, a, b, gate := heldBehindTheMailbox(t, func(c *Config) {
		c.QueueBytes = queueBytes
		c.Limits.BytesPerSecond = 64 << 20
	})
	big := strings.Repeat("x", 20<<10)
	var sent []*relayv1.Event
	for i := range 20 { // 400 KiB
		sent = append(sent, a.sendPayload(fmt.Sprintf("%02d%s", i, big), "b"))
	}
	refused := 0
	for range sent[queueBytes/len(big):] {
		f := a.nextAckOrReject()
		if f.GetReject().GetCode() != relayv1.ErrorCode_ERROR_CODE_QUEUE_FULL {
			t.Fatalf("past the held bound: %v", f)
		}
		refused++
	}
	b.expectNothing("a held event before the stored one", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil })
	close(gate)
	if got := b.payloads(1); got[0] != "stored" {
		t.Fatalf("b got %q first", got[0])
	}
	held := len(sent) - refused
	for i := range held {
		if p := b.payloads(1)[0]; p[:2] != fmt.Sprintf("%02d", i) {
			t.Fatalf("held delivery %d is %s", i, p[:2])
		}
	}
	a.expectAcks(sent[:held]...)
}

// A live delivery held behind the mailbox is never delivered after its
// event expired: when the mailbox before it is queued, an expired one is
// refused EXPIRED to its sender instead.
func TestAHeldDeliveryThatExpiredIsRefused(t *testing.T) {
	var ahead atomic.Int64
	_, a, b, gate := heldBehindTheMailbox(t, func(c *Config) {
		c.Now = func() time.Time { return time.Now().Add(time.Duration(ahead.Load())) }
	})
	late := a.sendPayload("late", "b") // 60 s and 5 min of skew
	// a's pong comes after its reader handled "late" (held, so neither
	// acked nor refused): only then may the clock move and the mailbox
	// open. Handled after them, by a clock read before the move, it went
	// to b live, unexpired, and a waited for b's ack.
	a.expectNothing("an outcome of the held event", func(f *relayv1.Frame) bool { return f.GetAck() != nil || f.GetReject() != nil })
	b.expectNothing("a held event before the stored one", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil })
	ahead.Store(int64(6 * time.Minute))
	close(gate)
	if got := b.payloads(1); got[0] != "stored" {
		t.Fatalf("b got %q", got[0])
	}
	if f := a.nextAckOrReject(); f.GetReject().GetEventId() != late.GetId() || f.GetReject().GetCode() != relayv1.ErrorCode_ERROR_CODE_EXPIRED {
		t.Fatalf("the expired held event: %v", f)
	}
	b.expectNothing("an expired event", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil })
}

// So is one another edge forwarded, by the expiry the forward carries:
// its edge learns it was not delivered (and stores it, or finds it
// expired).
func TestAHeldForwardThatExpiredIsNotDelivered(t *testing.T) {
	var ahead atomic.Int64
	e, _, b, gate := heldBehindTheMailbox(t, func(c *Config) {
		c.Now = func() time.Time { return time.Now().Add(time.Duration(ahead.Load())) }
	})
	outcome := make(chan edgev1.ForwardOutcome, 1)
	e.hub.DeliverForwarded(&edgev1.Forward{Id: 1, DeviceId: "b", UserId: "u1", Event: mustEvent(t, "late"), SenderDeviceId: "a",
		NeedMailboxSeq: 1, ExpiresAtMs: time.Now().Add(time.Minute).UnixMilli()}, func(o edgev1.ForwardOutcome) { outcome <- o })
	b.expectNothing("a held event before the stored one", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil })
	ahead.Store(int64(time.Minute))
	close(gate)
	if got := b.payloads(1); got[0] != "stored" {
		t.Fatalf("b got %q", got[0])
	}
	wantOutcome(t, outcome, edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED, "the expired forward")
	b.expectNothing("an expired event", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil })
}

// Nor does its sender wait for the target to move: a session whose pump
// waits (here for the device's acknowledgements, at a mailbox window of
// one) refuses a held delivery as it expires.
func TestAHeldDeliveryIsRefusedWhenItExpires(t *testing.T) {
	e, _ := mailboxEnv(t, func(c *Config) {
		c.MailboxWindow = 1
		c.Limits.SkewTolerance = 10 * time.Millisecond
	})
	e.devices("u1", "a", "b")
	a := e.online("a")
	a.expectAcks(a.sendPayload("s1", "b"), a.sendPayload("s2", "b"))
	b := e.online("b")
	first := b.nextDeliver() // and not acknowledged: the pump waits
	short := a.event("b")
	short.Payload, short.TtlMs = []byte("short"), 300
	a.sendEvent(short)
	if f := a.nextAckOrReject(); f.GetReject().GetEventId() != short.GetId() || f.GetReject().GetCode() != relayv1.ErrorCode_ERROR_CODE_EXPIRED {
		t.Fatalf("the held event that expired: %v", f)
	}
	b.received(first.GetDeliveryId())
	if got := b.payloads(1); got[0] != "s2" {
		t.Fatalf("after s1 came %q", got[0])
	}
	b.expectNothing("an expired event", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil })
}

// What a device did not acknowledge before it left goes to its mailbox
// and counts as delivered; it arrives again on its next session.
func TestUnacknowledgedDeliveriesAreHandedOff(t *testing.T) {
	e, mb := mailboxEnv(t, nil)
	e.device("u1", "a")
	e.device("u1", "b")
	a, b := e.online("a"), e.online("b")
	ev := a.sendPayload("keep me", "b")
	b.nextDeliver() // never acknowledged
	_ = b.conn.Close(0, "")
	a.expectAck(ev)
	if got := mb.stored("b"); got != 1 {
		t.Fatalf("b's mailbox holds %d", got)
	}
	b2 := e.online("b")
	if got := b2.payloads(1); got[0] != "keep me" {
		t.Fatalf("b got %v", got)
	}
}

func TestMailboxRefusals(t *testing.T) {
	e, mb := mailboxEnv(t, nil)
	mb.quota = 2
	e.device("u1", "a")
	e.device("u1", "b")
	a := e.online("a")
	e1, e2 := a.sendPayload("1", "b"), a.sendPayload("2", "b")
	e3 := a.sendPayload("3", "b")
	a.expectAcks(e1, e2)
	f := a.next("reject", func(f *relayv1.Frame) bool { return f.GetReject().GetEventId() == e3.GetId() })
	if f.GetReject().GetCode() != relayv1.ErrorCode_ERROR_CODE_MAILBOX_FULL {
		t.Fatalf("third event: %v", f)
	}
	// Nothing stored was dropped to make room.
	b := e.online("b")
	if got := b.payloads(2); !slices.Equal(got, []string{"1", "2"}) {
		t.Fatalf("b got %v", got)
	}
}

// An event larger than an offline target's mailbox holds is refused with
// PAYLOAD_TOO_LARGE: no retry can store it, which INTERNAL would invite.
// The sender's next event is stored as usual.
func TestAnEventTooLargeForTheMailboxIsRefusedAsSuch(t *testing.T) {
	e, mb := mailboxEnv(t, nil)
	mb.maxEvent = 1 << 10
	e.device("u1", "a")
	e.device("u1", "b")
	a := e.online("a")
	big := a.sendPayload(strings.Repeat("x", 2<<10), "b")
	f := a.next("reject", func(f *relayv1.Frame) bool { return f.GetReject().GetEventId() == big.GetId() })
	if f.GetReject().GetCode() != relayv1.ErrorCode_ERROR_CODE_PAYLOAD_TOO_LARGE {
		t.Fatalf("an event too large for the mailbox: %v", f)
	}
	small := a.sendPayload("small", "b")
	a.expectAcks(small)
	b := e.online("b")
	if got := b.payloads(1); got[0] != "small" {
		t.Fatalf("b got %v", got)
	}
}

// A large mailbox is delivered in windows: at most MailboxWindow entries
// wait for the device's acknowledgement at a time.
func TestMailboxFlowControl(t *testing.T) {
	e, mb := mailboxEnv(t, func(c *Config) { c.MailboxWindow = 8 })
	e.device("u1", "a")
	e.device("u1", "b")
	a := e.online("a")
	var last *relayv1.Event
	for i := range 50 {
		last = a.sendPayload(fmt.Sprint(i), "b")
	}
	a.expectAck(last)
	b := e.online("b")
	var got []string
	for len(got) < 50 {
		// Take what arrives without acknowledging: never more than 8.
		var batch []*relayv1.Deliver
		for range 8 {
			batch = append(batch, b.nextDeliver())
		}
		b.expectNothing("a ninth unacknowledged entry", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil })
		for _, d := range batch {
			got = append(got, string(d.GetEvent().GetPayload()))
			b.received(d.GetDeliveryId())
		}
		if len(got) == 48 {
			got = append(got, b.payloads(2)...)
		}
	}
	for i, p := range got {
		if p != fmt.Sprint(i) {
			t.Fatalf("entry %d is %q", i, p)
		}
	}
	waitFor(t, "all acked", func() bool { return mb.stored("b") == 0 })
}

// An entry announced while a fetch is in flight, committed after the
// fetch read the mailbox, is fetched next, not skipped.
func TestEntryAnnouncedDuringAFetch(t *testing.T) {
	e, mb := mailboxEnv(t, nil)
	e.device("u1", "b")
	b := e.online("b")
	gate := make(chan struct{})
	snaps := make(chan string, 16)
	mb.mu.Lock()
	mb.fetchGate["b"], mb.snapshots = gate, snaps
	mb.mu.Unlock()
	e.hub.MailboxChanged("u1", "b", 0) // a fetch starts and reads an empty mailbox
	for d := range snaps {
		if d == "b" {
			break
		}
	}
	mb.mu.Lock()
	mb.snapshots = nil
	mb.mu.Unlock()
	// Meanwhile another edge stores an entry and the feed announces it.
	done := make(chan MailboxResult, 1)
	mb.Store(&edgev1.MailboxEntry{DeviceId: "b", UserId: "u1", Event: mustEvent(t, "late"), EventId: "x", SenderDeviceId: "a"},
		func(r MailboxResult) { done <- r })
	r := <-done
	e.hub.MailboxChanged("u1", "b", r.Seq)
	mb.mu.Lock()
	delete(mb.fetchGate, "b")
	mb.mu.Unlock()
	close(gate)
	if got := b.payloads(1); got[0] != "late" {
		t.Fatalf("b got %v", got)
	}
}

func mustEvent(t *testing.T, payload string) []byte {
	t.Helper()
	b, err := proto.Marshal(&relayv1.Event{Id: "x", SenderDeviceId: "a", Seq: 1, CreatedAtMs: 1, TtlMs: 1, Payload: []byte(payload)})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// An "any one" event reaches every target; the first to acknowledge it
// takes it, a later one gets a Cancel, and the copy waiting in an
// offline target's mailbox is withdrawn.
func TestAnyOneDelivery(t *testing.T) {
	e, mb := mailboxEnv(t, nil)
	for _, id := range []string{"a", "b", "c", "off"} {
		e.device("u1", id)
	}
	a, b, c := e.online("a"), e.online("b"), e.online("c")
	ev := a.event()
	ev.AnyOne = true
	a.sendEvent(ev)
	db, dc := b.nextDeliver(), c.nextDeliver()
	waitFor(t, "the offline device's copy stored", func() bool { return mb.stored("off") == 1 })
	// The sender's ack comes with the first copy taken care of (here the
	// offline device's copy, once stored), and only once.
	a.expectAck(ev)
	b.received(db.GetDeliveryId())
	waitFor(t, "b's claim decided", func() bool {
		mb.mu.Lock()
		defer mb.mu.Unlock()
		return len(mb.claims) == 1
	})
	c.received(dc.GetDeliveryId())
	cancel := c.next("cancel", func(f *relayv1.Frame) bool { return f.GetCancel() != nil }).GetCancel()
	if cancel.GetEventId() != ev.GetId() || cancel.GetSenderDeviceId() != "a" {
		t.Fatalf("cancel: %v", cancel)
	}
	b.expectNothing("a cancel for the winner", func(f *relayv1.Frame) bool { return f.GetCancel() != nil })
	if got := mb.stored("off"); got != 0 {
		t.Fatalf("the offline device's copy was not withdrawn: %d left", got)
	}
	off := e.online("off")
	off.expectNothing("the withdrawn event", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil })
	a.expectNothing("a second ack", func(f *relayv1.Frame) bool { return f.GetAck() != nil })

	// Not with ephemeral.
	bad := a.event()
	bad.AnyOne, bad.Ephemeral = true, true
	a.sendEvent(bad)
	if f := a.nextAckOrReject(); f.GetReject().GetCode() != relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME {
		t.Fatalf("ephemeral any-one: %v", f)
	}
}

// storedWhileTheFeedLags connects b, then stores an event of a for b the
// way a's earlier session on another edge would have (that edge took b
// for offline), while this edge's feed has not announced it yet.
func storedWhileTheFeedLags(t *testing.T) (*env, *memMailbox, *dev) {
	e, mb := mailboxEnv(t, nil)
	e.device("u1", "a")
	e.device("u1", "b")
	b := e.online("b")
	e.dir.setFeed(0)
	mb.storeAsAnotherEdge(t, "b", "a", "stored")
	return e, mb, b
}

// A sender's live event never overtakes what its earlier session stored
// for the target, even when this edge has not heard of the entry yet and
// the sender's new session knows nothing of it: when its feed lags, or
// when the feed resumed with a full copy that announced no mailboxes (an
// older control plane), after which the feed no longer vouches for what
// was stored before.
func TestReconnectedSenderWaitsForItsStoredEvents(t *testing.T) {
	for _, tc := range []struct {
		name string
		feed func(*memDir)
	}{
		{"the feed lags", func(*memDir) {}},
		{"a copy announced no mailboxes", func(d *memDir) { d.blindCopy(); d.setFeed(math.MaxUint64) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, mb, b := storedWhileTheFeedLags(t)
			tc.feed(e.dir)
			a := e.online("a")
			live := a.sendPayload("live", "b")
			if got := b.payloads(2); !slices.Equal(got, []string{"stored", "live"}) {
				t.Fatalf("b got %v", got)
			}
			a.expectAck(live)
			// Once b's mailbox was read past a's start, a's events go
			// straight through.
			reads := mb.readsOf("b")
			a.relay(b, "next")
			if n := mb.readsOf("b"); n != reads {
				t.Fatalf("b's mailbox was read %d more times for a live event", n-reads)
			}
		})
	}
}

// storedWhileConnecting starts b's handshake and, while b's first
// mailbox read waits at gate (having read an empty mailbox), stores an
// event of a for b and announces it, when no session of b can hear it.
func storedWhileConnecting(t *testing.T, e *env, mb *memMailbox, gate chan struct{}) *dev {
	t.Helper()
	mb.mu.Lock()
	mb.fetchGate["b"] = gate
	mb.mu.Unlock()
	b := e.connect("b")
	h := b.hello(nil)
	b.send(h)
	b.send(sign(h.GetHello(), b.readDirect().GetChallenge(), e.keys["b"]))
	waitFor(t, "b's first read", func() bool { return mb.readsOf("b") == 1 })
	seq := mb.storeAsAnotherEdge(t, "b", "a", "stored")
	e.hub.MailboxChanged("u1", "b", seq)
	return b
}

// An entry stored while the target's session is being set up is
// announced when the session cannot hear it yet: until the read due
// after its registration is done, a live event that may have to follow
// the entry waits.
func TestEntryStoredWhileTheTargetRegisters(t *testing.T) {
	e, mb := mailboxEnv(t, nil)
	e.device("u1", "a")
	e.device("u1", "b")
	gate := make(chan struct{})
	b := storedWhileConnecting(t, e, mb, gate)
	gate <- struct{}{} // the first read answers: empty
	if b.readDirect().GetWelcome() == nil {
		t.Fatal("no welcome")
	}
	b.startReading()
	// The read due since the registration (the mailbox was announced
	// meanwhile) finds the entry, and answers when the test says.
	waitFor(t, "b's second read", func() bool { return mb.readsOf("b") == 2 })
	a := e.online("a")
	live := a.sendPayload("live", "b")
	// a's session has handled the event once it answers a ping.
	a.expectNothing("an ack before b has the event", func(f *relayv1.Frame) bool { return f.GetAck() != nil })
	b.expectNothing("the live event before the stored one", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil })
	close(gate)
	if got := b.payloads(2); !slices.Equal(got, []string{"stored", "live"}) {
		t.Fatalf("b got %v", got)
	}
	a.expectAck(live)
}

// An event another edge forwards carries its sender session's start
// revision: it waits for what was stored before, like a local one.
func TestForwardedEventWaitsForStoredEvents(t *testing.T) {
	e, mb, b := storedWhileTheFeedLags(t)
	mb.mu.Lock()
	rev := mb.rev // a's session on the other edge started after the store
	mb.mu.Unlock()
	outcome := make(chan edgev1.ForwardOutcome, 1)
	e.hub.DeliverForwarded(&edgev1.Forward{Id: 1, DeviceId: "b", UserId: "u1", Event: mustEvent(t, "live"), SenderRevision: rev},
		func(o edgev1.ForwardOutcome) { outcome <- o })
	if got := b.payloads(2); !slices.Equal(got, []string{"stored", "live"}) {
		t.Fatalf("b got %v", got)
	}
	if o := <-outcome; o != edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED {
		t.Fatalf("outcome %v", o)
	}
}

// captureRemote is a mesh where every device but the local ones is on
// edge "e2", which takes every forward.
type captureRemote struct {
	mu       sync.Mutex
	forwards []*edgev1.Forward
}

func (r *captureRemote) Locate(string) (string, bool) { return "e2", true }
func (r *captureRemote) Forward(_ string, f *edgev1.Forward, done func(edgev1.ForwardOutcome)) {
	r.mu.Lock()
	r.forwards = append(r.forwards, f)
	r.mu.Unlock()
	if done != nil {
		done(edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED)
	}
}
func (r *captureRemote) Announce(*edgev1.DevicePresence, bool) {}
func (r *captureRemote) Online(string) []string                { return nil }
func (r *captureRemote) Since(string) (time.Time, bool)        { return time.Time{}, false }

// The outcomes of a sender's forwards to a device are acted on in the
// order the events were forwarded, whatever order they come in: a later
// forward refused at once (the link down or full, the target's session
// there closing) while an earlier one is still undecided is stored in
// the mailbox after it, not before.
func TestForwardOutcomesAreTakenInOrder(t *testing.T) {
	remote := &heldRemote{ch: make(chan heldForward, 4)}
	e, mb := mailboxEnv(t, func(c *Config) { c.Remote = remote })
	e.device("u1", "a")
	e.device("u1", "far")
	a := e.online("a")
	first, second := a.sendPayload("first", "far"), a.sendPayload("second", "far")
	var dones []func(edgev1.ForwardOutcome)
	for range 2 {
		select {
		case h := <-remote.ch:
			dones = append(dones, h.done)
		case <-time.After(10 * time.Second):
			t.Fatal("the events were not forwarded")
		}
	}
	dones[1](edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED)
	a.expectNothing("an answer before the first forward's outcome", func(f *relayv1.Frame) bool { return f.GetAck() != nil || f.GetReject() != nil })
	if n := mb.stored("far"); n != 0 {
		t.Fatalf("the second event was stored ahead of the first: %d entries", n)
	}
	dones[0](edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED)
	a.expectAcks(first, second)
	mb.mu.Lock()
	defer mb.mu.Unlock()
	var got []string
	for _, en := range mb.boxes["far"] {
		got = append(got, en.GetEventId())
	}
	if !slices.Equal(got, []string{first.GetId(), second.GetId()}) {
		t.Fatalf("far's mailbox holds %v", got)
	}
}

// A forward this edge answers NOT_DELIVERED itself (its link to B was
// down or replaced) while an earlier one is undecided is stored after
// it; B never saw the refused one, so nothing there would hold back the
// sender's next event for the device. That one must follow the refused
// one into the mailbox, not be forwarded and delivered live ahead of it;
// and once those stores are done, a new event is forwarded again.
func TestAForwardRefusedHereTakesTheSendersNextEventsToTheMailbox(t *testing.T) {
	remote := &refusingRemote{heldRemote: heldRemote{ch: make(chan heldForward, 16)}, refuse: "two"}
	eA, mb := mailboxEnv(t, func(c *Config) { c.Remote = remote })
	eA.devices("u1", "s", "t")
	eB := eA.otherEdge("B", func(c *Config) { c.Mailbox = mb })
	s := eA.online("s")
	tt := eB.online("t")

	one := s.sendPayload("one", "t")
	f1 := <-remote.ch
	two := s.sendPayload("two", "t") // refused by A's link at once, behind "one"
	three := s.sendPayload("three", "t")
	s.expectNothing("an answer before the first forward's outcome", func(f *relayv1.Frame) bool { return f.GetAck() != nil || f.GetReject() != nil })
	select {
	case f := <-remote.ch:
		t.Fatalf("forwarded behind a refusal this edge is about to store: %s", f.fw.GetEvent())
	default:
	}
	eB.hub.DeliverForwarded(f1.fw, f1.done)
	if got := tt.payloads(1); got[0] != "one" {
		t.Fatalf("t got %v, want one", got)
	}
	waitFor(t, "two and three stored", func() bool { return mb.stored("t") == 2 })
	s.expectAcks(one, two, three)
	eB.hub.MailboxChanged("u1", "t", 2)
	if got := tt.payloads(2); !slices.Equal(got, []string{"two", "three"}) {
		t.Fatalf("t got %v from its mailbox, want [two three]", got)
	}
	// Both stores answered: the next event goes live through B again,
	// needing what was stored.
	four := s.sendPayload("four", "t")
	f4 := <-remote.ch
	if f4.fw.GetNeedMailboxSeq() != 2 {
		t.Fatalf("the forward after the stores needs mailbox seq %d, want 2", f4.fw.GetNeedMailboxSeq())
	}
	eB.hub.DeliverForwarded(f4.fw, f4.done)
	if got := tt.payloads(1); got[0] != "four" {
		t.Fatalf("t got %v, want four", got)
	}
	s.expectAck(four)
}

// While the first of two forwards is being stored (the edge holding the
// target refused it) and the second is undecided, the sender's next event
// must not go straight to the mailbox: it would be stored ahead of the
// second, which that edge is about to refuse too. It waits behind both.
func TestAnEventWaitsBehindAForwardStillUndecided(t *testing.T) {
	remote := &heldRemote{ch: make(chan heldForward, 4)}
	e, mb := mailboxEnv(t, func(c *Config) { c.Remote = remote })
	e.devices("u1", "a", "far")
	a := e.online("a")
	one, two := a.sendPayload("one", "far"), a.sendPayload("two", "far")
	f1, f2 := <-remote.ch, <-remote.ch
	resume := mb.pause(t)
	f1.done(edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED) // one's store under way
	three := a.sendPayload("three", "far")
	a.expectNothing("an answer while two is undecided", func(f *relayv1.Frame) bool { return f.GetAck() != nil || f.GetReject() != nil })
	f2.done(edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED)
	resume()
	a.expectAcks(one, two, three)
	mb.mu.Lock()
	defer mb.mu.Unlock()
	var got []string
	for _, en := range mb.boxes["far"] {
		got = append(got, en.GetEventId())
	}
	if want := []string{one.GetId(), two.GetId(), three.GetId()}; !slices.Equal(got, want) {
		t.Fatalf("far's mailbox holds %v, want %v", got, want)
	}
}

// A forward whose outcome does not come (the target's edge holds it)
// holds back the sender's later events for that device, and what waits
// behind it is bounded: beyond maxPendingForwards, QUEUE_FULL.
func TestForwardsWaitingForAnOutcomeAreBounded(t *testing.T) {
	remote := &heldRemote{ch: make(chan heldForward, maxPendingForwards+1)}
	e, _ := mailboxEnv(t, func(c *Config) { c.Remote = remote })
	e.devices("u1", "a", "far")
	a := e.online("a")
	for i := range maxPendingForwards {
		a.sendEvent(&relayv1.Event{Id: fmt.Sprintf("e%d", i), Seq: uint64(i + 1), Targets: []string{"far"}, TtlMs: 60_000, CreatedAtMs: time.Now().UnixMilli()})
	}
	over := &relayv1.Event{Id: "over", Seq: maxPendingForwards + 1, Targets: []string{"far"}, TtlMs: 60_000, CreatedAtMs: time.Now().UnixMilli()}
	a.sendEvent(over)
	f := a.nextAckOrReject()
	if f.GetReject().GetEventId() != "over" || f.GetReject().GetCode() != relayv1.ErrorCode_ERROR_CODE_QUEUE_FULL {
		t.Fatalf("the event beyond the bound: %v", f)
	}
	if n := len(remote.ch); n != maxPendingForwards {
		t.Fatalf("%d forwards made, want %d", n, maxPendingForwards)
	}
}

// The events a sender's forwards hold while their outcomes wait are
// bounded in bytes too (PendingForwardBytes), across its targets: a
// target's edge that holds the first forward (its device reads and never
// acknowledges) while the later ones are answered made this edge keep
// every later event, up to 4,096 a target. An answer that stores
// nothing frees its event at once, though it waits for the first's
// outcome to be acted on; one that stores keeps it until it is stored.
func TestForwardsWaitingForAnOutcomeAreBoundedInBytes(t *testing.T) {
	remote := &heldRemote{ch: make(chan heldForward, 64)}
	e, _ := mailboxEnv(t, func(c *Config) { c.Remote = remote; c.PendingForwardBytes = 64 << 10 })
	e.devices("u1", "a", "far", "other")
	a := e.online("a")
	payload := strings.Repeat("x", 10<<10)
	send := func(target string) *relayv1.Event { return a.sendPayload(payload, target) }
	next := func() heldForward {
		t.Helper()
		select {
		case h := <-remote.ch:
			return h
		case <-time.After(10 * time.Second):
			t.Fatal("no forward made")
			return heldForward{}
		}
	}
	refused := func(ev *relayv1.Event) {
		t.Helper()
		f := a.nextAckOrReject()
		if f.GetReject().GetEventId() != ev.GetId() || f.GetReject().GetCode() != relayv1.ErrorCode_ERROR_CODE_QUEUE_FULL {
			t.Fatalf("%s beyond the bytes: %v, want QUEUE_FULL", ev.GetId(), f)
		}
	}
	// Six events of 10 KiB fit 64 KiB; the seventh does not, whatever
	// its target.
	var held []heldForward
	var sent []*relayv1.Event
	for range 6 {
		sent = append(sent, send("far"))
		held = append(held, next())
	}
	refused(send("other"))
	// Answers that store nothing free their events while the first is
	// still undecided (they wait behind it): room again.
	for _, h := range held[1:] {
		h.done(edgev1.ForwardOutcome_FORWARD_OUTCOME_QUEUE_FULL)
	}
	a.expectNothing("an answer before the first forward's outcome", func(f *relayv1.Frame) bool { return f.GetAck() != nil || f.GetReject() != nil })
	more := send("other")
	next().done(edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED)
	a.expectAck(more)
	// Outcomes that store hold their events until stored: behind the
	// undecided first, one forward answered NOT_DELIVERED and the four
	// events that follow it to the mailbox (not forwarded) fill the bytes
	// again.
	stores := []*relayv1.Event{send("far")}
	next().done(edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED)
	for range 4 {
		stores = append(stores, send("far"))
	}
	refused(send("other"))
	held[0].done(edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED)
	a.expectAcks(append(stores, sent[0])...)
	// All acted on: the bytes are free.
	last := send("other")
	next().done(edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED)
	a.expectAck(last)
}

// refusingRemote answers NOT_DELIVERED at once for a forward whose event
// holds refuse, as the mesh does for a link that is down, and holds the
// others like heldRemote.
type refusingRemote struct {
	heldRemote
	refuse string
}

func (r *refusingRemote) Forward(p string, f *edgev1.Forward, done func(edgev1.ForwardOutcome)) {
	if done != nil && bytes.Contains(f.GetEvent(), []byte(r.refuse)) {
		done(edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED)
		return
	}
	r.heldRemote.Forward(p, f, done)
}

// A forwarded event carries the revision its sender's session started
// at: the one of its first mailbox read.
func TestForwardCarriesTheSenderRevision(t *testing.T) {
	remote := &captureRemote{}
	e, mb := mailboxEnv(t, func(c *Config) { c.Remote = remote })
	e.device("u1", "a")
	e.device("u1", "far")
	mb.storeAsAnotherEdge(t, "far", "a", "x")
	mb.storeAsAnotherEdge(t, "far", "a", "y")
	a := e.online("a")
	ev := a.sendPayload("over", "far")
	a.expectAck(ev)
	remote.mu.Lock()
	defer remote.mu.Unlock()
	if len(remote.forwards) != 1 || remote.forwards[0].GetSenderRevision() != 2 {
		t.Fatalf("forwards: %v", remote.forwards)
	}
	// And when it expires, which the receiving edge delivers it no later.
	if got, want := remote.forwards[0].GetExpiresAtMs(), ev.GetCreatedAtMs()+ev.GetTtlMs()+DefaultLimits().SkewTolerance.Milliseconds(); got != want {
		t.Fatalf("the forward expires at %d, want %d", got, want)
	}
}

// A session whose first read was complete and whose mailbox nobody
// announced while it was set up reads it once: what is stored later is
// announced to it.
func TestOneMailboxReadPerQuietConnect(t *testing.T) {
	e, mb, a := storedForOfflineB(t, nil)
	b := e.online("b")
	if got := b.payloads(1); got[0] != "stored" {
		t.Fatalf("b got %v", got)
	}
	a.relay(b, "live")
	b.expectNothing("anything else", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil })
	if n := mb.readsOf("b"); n != 1 {
		t.Fatalf("b's mailbox was read %d times", n)
	}
	// Stored later (another edge took b for offline) and announced: read.
	seq := mb.storeAsAnotherEdge(t, "b", "a", "later")
	e.hub.MailboxChanged("u1", "b", seq)
	if got := b.payloads(1); got[0] != "later" {
		t.Fatalf("b got %v", got)
	}
	waitFor(t, "the listeners gone", func() bool {
		for i := range e.hub.shards {
			sh := &e.hub.shards[i]
			sh.mu.Lock()
			n := len(sh.listening)
			sh.mu.Unlock()
			if n > 0 {
				return false
			}
		}
		return true
	})
}

// A sender session whose first mailbox read failed does not know the
// revision it started at: its events for a device go through the
// device's mailbox, behind what its earlier sessions stored there.
func TestSenderWithoutAStartRevisionGoesThroughTheMailbox(t *testing.T) {
	e, mb, b := storedWhileTheFeedLags(t)
	mb.mu.Lock()
	mb.fails["a"] = 1 << 20
	mb.mu.Unlock()
	a := e.online("a")
	live := a.sendPayload("live", "b")
	a.expectAck(live)                                     // stored
	seq := mb.storeAsAnotherEdge(t, "b", "x", "announce") // the feed catches up
	e.hub.MailboxChanged("u1", "b", seq)
	if got := b.payloads(3); !slices.Equal(got, []string{"stored", "live", "announce"}) {
		t.Fatalf("b got %v", got)
	}
}

// A live event waiting for the target's mailbox is refused (retryably)
// when the mailbox cannot be read, and so is what would wait behind it,
// rather than held for as long as the control plane is away; other
// senders' events that need not wait still go through.
func TestWaitingEventsAreRefusedWhileTheMailboxCannotBeRead(t *testing.T) {
	e, mb := mailboxEnv(t, nil)
	e.devices("u1", "a", "b", "c")
	b, c := e.online("b"), e.online("c")
	e.dir.setFeed(0)
	mb.storeAsAnotherEdge(t, "b", "a", "stored")
	mb.mu.Lock()
	mb.fails["b"] = 1 << 20
	mb.mu.Unlock()
	a := e.online("a")
	refused := func(d *dev, ev *relayv1.Event) {
		t.Helper()
		f := d.nextAckOrReject()
		if f.GetReject().GetEventId() != ev.GetId() || f.GetReject().GetCode() != relayv1.ErrorCode_ERROR_CODE_INTERNAL {
			t.Fatalf("%s: want INTERNAL for %s, got %v", d.id, ev.GetId(), f)
		}
	}
	refused(a, a.sendPayload("live", "b"))
	refused(a, a.sendPayload("again", "b"))
	// c started before b's last read: nothing for it to wait for.
	c.relay(b, "from-c")
	// The control plane is back: the session's next read (it keeps
	// trying) queues the stored event, and a's retry goes after it.
	reads := mb.readsOf("b")
	mb.mu.Lock()
	mb.fails["b"] = 0
	mb.mu.Unlock()
	waitFor(t, "b's mailbox read again", func() bool { return mb.readsOf("b") > reads })
	if got := b.payloads(1); got[0] != "stored" {
		t.Fatalf("b got %v", got)
	}
	a.relay(b, "retry")
}

// A control plane that refuses reads as busy is answering: a live event
// waiting for the target's mailbox stays held while the session reads
// again, and goes after the stored one once a read is served.
func TestHeldDeliveriesWaitWhileTheMailboxIsBusy(t *testing.T) {
	e, mb, a := storedForOfflineB(t, nil)
	mb.mu.Lock()
	mb.busy["b"] = 1 << 20
	mb.mu.Unlock()
	b := e.online("b")
	live := a.sendPayload("live", "b")
	a.expectNothing("an outcome of the held event", func(f *relayv1.Frame) bool { return f.GetAck() != nil || f.GetReject() != nil })
	// Reads refused after the event was held: none refused it.
	refused := func() int {
		mb.mu.Lock()
		defer mb.mu.Unlock()
		return mb.busyReads["b"]
	}
	after := refused()
	waitFor(t, "two more of b's reads refused as busy", func() bool { return refused() >= after+2 })
	a.expectNothing("an outcome of the event held while the mailbox is busy", func(f *relayv1.Frame) bool { return f.GetAck() != nil || f.GetReject() != nil })
	mb.mu.Lock()
	mb.busy["b"] = 0
	mb.mu.Unlock()
	if got := b.payloads(2); !slices.Equal(got, []string{"stored", "live"}) {
		t.Fatalf("b got %v", got)
	}
	a.expectAcks(live)
}

// Only for a while: once the reads were refused as busy for
// MailboxBusyGrace, what waits behind the mailbox is refused (retryably)
// as after any failed read.
func TestHeldDeliveriesAreRefusedOnceTheMailboxWasBusyTooLong(t *testing.T) {
	e, mb, a := storedForOfflineB(t, func(c *Config) { c.MailboxBusyGrace = time.Nanosecond })
	mb.mu.Lock()
	mb.busy["b"] = 1 << 20
	mb.mu.Unlock()
	e.online("b")
	live := a.sendPayload("live", "b")
	if f := a.nextAckOrReject(); f.GetReject().GetEventId() != live.GetId() || f.GetReject().GetCode() != relayv1.ErrorCode_ERROR_CODE_INTERNAL {
		t.Fatalf("want INTERNAL for %s, got %v", live.GetId(), f)
	}
}

// An edge without mailboxes has nothing to wait for: a forwarded event
// that names a revision is delivered at once.
func TestNoMailboxesNoWait(t *testing.T) {
	e := newEnv(t, nil)
	e.device("u1", "b")
	e.dir.setFeed(0)
	b := e.online("b")
	outcome := make(chan edgev1.ForwardOutcome, 1)
	e.hub.DeliverForwarded(&edgev1.Forward{Id: 1, DeviceId: "b", UserId: "u1", Event: mustEvent(t, "live"), SenderRevision: 5},
		func(o edgev1.ForwardOutcome) { outcome <- o })
	if got := b.payloads(1); got[0] != "live" {
		t.Fatalf("b got %v", got)
	}
	if o := <-outcome; o != edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED {
		t.Fatalf("outcome %v", o)
	}
}

// announceHook is a mesh that runs a function when the nth session of
// device b (the first when nth is 0) is announced: inside the hub's
// registration, before the session has looked at its mailbox again, and
// with an older session of b told to close but maybe not yet handed off.
type announceHook struct {
	nth        int32
	seen       atomic.Int32
	onAnnounce func()
}

func (r *announceHook) Locate(string) (string, bool) { return "", false }
func (r *announceHook) Forward(_ string, _ *edgev1.Forward, done func(edgev1.ForwardOutcome)) {
	if done != nil {
		done(edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED)
	}
}
func (r *announceHook) Announce(p *edgev1.DevicePresence, online bool) {
	if online && p.GetDeviceId() == "b" && r.seen.Add(1) == max(r.nth, 1) {
		r.onAnnounce()
	}
}
func (r *announceHook) Online(string) []string         { return nil }
func (r *announceHook) Since(string) (time.Time, bool) { return time.Time{}, false }

// A live event that arrives the moment the target is registered, before
// its session has looked at what was announced while it was set up,
// waits for that.
func TestLiveEventRightAfterRegistration(t *testing.T) {
	hook := &announceHook{}
	e, mb := mailboxEnv(t, func(c *Config) { c.Remote = hook })
	e.device("u1", "b")
	gate := make(chan struct{})
	outcome := make(chan edgev1.ForwardOutcome, 1)
	hook.onAnnounce = func() {
		e.hub.DeliverForwarded(&edgev1.Forward{Id: 1, DeviceId: "b", UserId: "u1", Event: mustEvent(t, "live"), SenderRevision: 1},
			func(o edgev1.ForwardOutcome) { outcome <- o })
	}
	b := storedWhileConnecting(t, e, mb, gate)
	close(gate)
	if b.readDirect().GetWelcome() == nil {
		t.Fatal("no welcome")
	}
	b.startReading()
	if got := b.payloads(2); !slices.Equal(got, []string{"stored", "live"}) {
		t.Fatalf("b got %v", got)
	}
	if o := <-outcome; o != edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED {
		t.Fatalf("outcome %v", o)
	}
}

// When a device's new session replaces its old one here, the old one
// hands what the device did not acknowledge to the mailbox after the new
// one is reachable: a sender's live event arriving in between must not
// overtake those. (The event is sent the moment the new session
// registers; whether it is routed before the old session hands off,
// while that is stored, or after, b gets the events in order.)
func TestReplacedSessionHandsOffBeforeTheNewOneGetsLiveEvents(t *testing.T) {
	hook := &announceHook{nth: 2}
	e, _ := mailboxEnv(t, func(c *Config) { c.Remote = hook })
	e.devices("u1", "a", "b")
	a, b1 := e.online("a"), e.online("b")
	first := a.sendPayload("first", "b")
	b1.nextDeliver() // never acknowledged
	sent := make(chan *relayv1.Event, 1)
	hook.onAnnounce = func() { sent <- a.sendPayload("second", "b") }
	b2 := e.online("b")
	if got := b2.payloads(2); !slices.Equal(got, []string{"first", "second"}) {
		t.Fatalf("b got %v", got)
	}
	a.expectAcks(first, <-sent)
}

// The same, with the sender's next event stored in the mailbox while the
// one sent in between waits in b's new session: "first" is handed off
// and "third" follows it into the mailbox (its store is pending), and
// both are committed in one batch, as edge/mailbox's writer does, so one
// fetch brings both. "second", held until the hand-off is stored, must
// be queued between them, not after the whole page.
func TestAHeldLiveEventGoesBetweenTheHandOffAndTheSendersLaterStores(t *testing.T) {
	hook := &announceHook{nth: 2}
	var bm *batchingMailbox
	e, _ := mailboxEnv(t, func(c *Config) {
		c.Remote = hook
		bm = &batchingMailbox{memMailbox: c.Mailbox.(*memMailbox)}
		c.Mailbox = bm
	})
	e.devices("u1", "a", "b")
	a, b1 := e.online("a"), e.online("b")
	first := a.sendPayload("first", "b")
	b1.nextDeliver() // never acknowledged

	gate := make(chan struct{})
	e.hub.beforeHandOff = func(s *Session) {
		if s.deviceID == "b" {
			<-gate
		}
	}
	sent := make(chan *relayv1.Event, 1)
	hook.onAnnounce = func() { sent <- a.sendPayload("second", "b") }
	b2 := e.online("b")
	second := <-sent
	waitFor(t, "second held in b's new session", func() bool {
		ss := e.hub.sessionsOf("u1", "b")
		if len(ss) == 0 {
			return false
		}
		ss[0].mb.mu.Lock()
		defer ss[0].mb.mu.Unlock()
		return len(ss[0].mb.held) == 1
	})
	bm.hold()
	close(gate) // b's old session hands "first" off now
	as := e.hub.sessionsOf("u1", "a")[0]
	waitFor(t, "first's store pending", func() bool {
		as.routeMu.Lock()
		defer as.routeMu.Unlock()
		return as.mbPending["b"] == 1
	})
	third := a.sendPayload("third", "b")
	waitFor(t, "third stored behind first", func() bool { return bm.waiting() == 2 })
	bm.commit()
	if got := b2.payloads(3); !slices.Equal(got, []string{"first", "second", "third"}) {
		t.Fatalf("b got %v, want [first second third]", got)
	}
	a.expectAcks(first, second, third)
}

// heldIn counts the live deliveries held in the current session of dev.
func heldIn(e *env, dev string) int {
	ss := e.hub.sessionsOf("u1", dev)
	if len(ss) == 0 {
		return -1
	}
	ss[0].mb.mu.Lock()
	defer ss[0].mb.mu.Unlock()
	return len(ss[0].mb.held)
}

// b1HandsOffLater has a send "first" to b's session b1, which never
// acknowledges it; b1 hands it off, once b1 ends, only when gate closes.
func b1HandsOffLater(t *testing.T) (e *env, mb *memMailbox, a *dev, first *relayv1.Event, gate chan struct{}) {
	t.Helper()
	e, mb = mailboxEnv(t, nil)
	e.devices("u1", "a", "x", "b")
	a = e.online("a")
	b1 := e.online("b")
	first = a.sendPayload("first", "b")
	b1.nextDeliver()
	s1 := e.hub.sessionsOf("u1", "b")[0]
	gate = make(chan struct{})
	e.hub.beforeHandOff = func(s *Session) {
		if s == s1 {
			<-gate
		}
	}
	return e, mb, a, first, gate
}

// A device replaced twice in a row (sessions b1, b2, b3): what b1 handed
// off comes before what is held in b3 too, not only what b2 handed off.
// b2's report to b3 waits for b1's to b2 and carries both.
func TestATwiceReplacedDeviceKeepsTheFirstHandOffFirst(t *testing.T) {
	t.Run("both hand off", func(t *testing.T) {
		e, _, a, first, gate := b1HandsOffLater(t)
		x := e.online("x")
		e.online("b")
		xev := x.sendPayload("xev", "b") // held in b2 until b1's hand-off is stored; then b2's to hand off
		waitFor(t, "xev held in b2", func() bool { return heldIn(e, "b") == 1 })
		b3 := e.online("b")
		second := a.sendPayload("second", "b")
		waitFor(t, "second held in b3", func() bool { return heldIn(e, "b") == 1 })
		close(gate)
		if got := b3.payloads(3); !slices.Equal(got, []string{"first", "xev", "second"}) {
			t.Fatalf("b3 got %v, want [first xev second]", got)
		}
		a.expectAcks(first, second)
		x.expectAck(xev)
	})
	t.Run("the middle one hands off nothing", func(t *testing.T) {
		e, mb, a, first, gate := b1HandsOffLater(t)
		e.online("b")
		b3 := e.online("b")
		second := a.sendPayload("second", "b")
		waitFor(t, "second held in b3", func() bool { return heldIn(e, "b") == 1 })
		resume := mb.pause(t) // b1's store of "first" waits
		close(gate)
		b3.expectNothing("a delivery before b1's hand-off is stored", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil })
		resume()
		if got := b3.payloads(2); !slices.Equal(got, []string{"first", "second"}) {
			t.Fatalf("b3 got %v, want [first second]", got)
		}
		a.expectAcks(first, second)
	})
}

// batchingMailbox, once held, keeps the stores it is given until commit,
// which stores them all and only then answers them, in order: one
// PutMailbox of edge/mailbox's writer.
type batchingMailbox struct {
	*memMailbox
	bmu    sync.Mutex
	held   bool
	stores []func() func()
}

func (b *batchingMailbox) hold() {
	b.bmu.Lock()
	b.held = true
	b.bmu.Unlock()
}

func (b *batchingMailbox) waiting() int {
	b.bmu.Lock()
	defer b.bmu.Unlock()
	return len(b.stores)
}

func (b *batchingMailbox) Store(e *edgev1.MailboxEntry, done func(MailboxResult)) {
	b.bmu.Lock()
	defer b.bmu.Unlock()
	if !b.held {
		b.memMailbox.Store(e, done)
		return
	}
	b.stores = append(b.stores, func() func() {
		m := b.memMailbox
		m.seq[e.GetDeviceId()]++
		m.rev++
		c := proto.Clone(e).(*edgev1.MailboxEntry)
		c.Seq = m.seq[e.GetDeviceId()]
		m.boxes[e.GetDeviceId()] = append(m.boxes[e.GetDeviceId()], c)
		return func() { done(MailboxResult{Status: edgev1.MailboxStatus_MAILBOX_STATUS_STORED, Seq: c.Seq}) }
	})
}

func (b *batchingMailbox) commit() {
	b.bmu.Lock()
	stores := b.stores
	b.stores, b.held = nil, false
	b.bmu.Unlock()
	b.memMailbox.mu.Lock()
	answers := make([]func(), 0, len(stores))
	for _, store := range stores {
		answers = append(answers, store())
	}
	b.memMailbox.mu.Unlock()
	for _, answer := range answers {
		answer()
	}
}

// A session whose handshake succeeded but that the edge started draining
// before it could register (here: during its first mailbox read) is
// refused with GOING_AWAY, and the sessions gauge never counted it.
func TestSessionRefusedWhenTheEdgeDrainsDuringItsOpening(t *testing.T) {
	e, mb := mailboxEnv(t, nil)
	e.device("u1", "b")
	gate := make(chan struct{})
	snaps := make(chan string, 16)
	mb.mu.Lock()
	mb.fetchGate["b"], mb.snapshots = gate, snaps
	mb.mu.Unlock()
	b := e.connect("b")
	h := b.hello(nil)
	b.send(h)
	b.send(sign(h.GetHello(), b.readDirect().GetChallenge(), e.keys["b"]))
	for d := range snaps {
		if d == "b" {
			break // the first mailbox read is under way
		}
	}
	mb.mu.Lock()
	mb.snapshots = nil
	mb.mu.Unlock()
	if got := e.metric("relay_edge_sessions", "transport", "pipe"); got != 0 {
		t.Fatalf("a session not yet registered counts: %v", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	drained := make(chan error, 1)
	go func() { drained <- e.hub.Drain(ctx, time.Minute) }()
	waitFor(t, "the edge draining", func() bool {
		e.hub.mu.Lock()
		defer e.hub.mu.Unlock()
		return e.hub.draining
	})
	b.startReading()
	close(gate)
	if c := b.nextClose(); c.GetCode() != relayv1.ErrorCode_ERROR_CODE_GOING_AWAY {
		t.Fatalf("device told %v", c)
	}
	if err := <-b.serve; err != ErrDraining {
		t.Fatalf("session ended with %v", err)
	}
	if err := <-drained; err != nil {
		t.Fatal(err)
	}
	if got := e.metric("relay_edge_sessions", "transport", "pipe"); got != 0 {
		t.Fatalf("after the refusal: %v sessions", got)
	}
}

// twentyStoredForB has a send payloads "0" to "19" to b while b is
// offline, then brings b online.
func twentyStoredForB(t *testing.T, mod func(*Config)) (*memMailbox, *dev) {
	t.Helper()
	e, mb := mailboxEnv(t, mod)
	e.devices("u1", "a", "b")
	a := e.online("a")
	var last *relayv1.Event
	for i := range 20 {
		last = a.sendPayload(fmt.Sprint(i), "b")
	}
	a.expectAck(last)
	return mb, e.online("b")
}

// Mailbox entries count toward a device's unacknowledged deliveries
// (UnackedLen) like live ones: a device that reads but does not
// acknowledge gets no more, and its session waits for its acks without
// reading the mailbox again and again meanwhile; its acks let the rest
// come, in order.
func TestMailboxWaitsForAcksAtTheUnacknowledgedBound(t *testing.T) {
	const bound = 8
	mb, b := twentyStoredForB(t, func(c *Config) { c.UnackedLen = bound })
	var got []string
	for len(got) < 20 {
		var batch []*relayv1.Deliver
		for range min(bound, 20-len(got)) {
			batch = append(batch, b.nextDeliver())
		}
		if len(got)+len(batch) < 20 {
			b.expectNothing("a delivery beyond the bound", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil })
			// Held at the bound: the mailbox is not polled.
			mb.notPolled(t, "b", fmt.Sprintf("while the device held %d unacknowledged", bound))
		}
		for _, d := range batch {
			got = append(got, string(d.GetEvent().GetPayload()))
			b.received(d.GetDeliveryId())
		}
	}
	for i, p := range got {
		if p != fmt.Sprint(i) {
			t.Fatalf("entry %d is %q", i, p)
		}
	}
	waitFor(t, "all acked", func() bool { return mb.stored("b") == 0 })
}

// notPolled checks that device's mailbox is read at most twice more in
// the next half second (a pump that polled would read it every few
// milliseconds).
func (m *memMailbox) notPolled(t *testing.T, device, while string) {
	t.Helper()
	before := m.readsOf(device)
	watch := time.NewTicker(20 * time.Millisecond)
	defer watch.Stop()
	for range 25 {
		<-watch.C
		if n := m.readsOf(device); n > before+2 {
			t.Fatalf("the mailbox was read %d times %s", n-before, while)
		}
	}
}

// A device that reads slowly (here: not at all, with a megabyte of
// mailbox entries waiting) holds what its queue holds; its mailbox is
// read again once the writer takes what the queue holds, not polled
// while the writer waits on the device. Every entry still arrives, in
// order, once it reads.
func TestASlowReaderDoesNotMakeItsMailboxBePolled(t *testing.T) {
	e, mb := mailboxEnv(t, func(c *Config) { c.Limits.BytesPerSecond = 64 << 20 })
	e.devices("u1", "a", "b")
	a := e.online("a")
	big := strings.Repeat("x", 40<<10)
	var sent []*relayv1.Event
	for i := range 60 { // 2.4 MB: more than two queues' worth
		sent = append(sent, a.sendPayload(fmt.Sprintf("%02d%s", i, big), "b"))
	}
	a.expectAcks(sent...)
	b := e.connect("b")
	b.handshake() // and reads nothing
	// The writer blocks on its first batch; the queue fills again behind
	// it, up to a refusal.
	waitFor(t, "the queue to fill behind a blocked write", func() bool {
		ss := e.hub.sessionsOf("u1", "b")
		if len(ss) != 1 {
			return false
		}
		q := ss[0].out
		q.mu.Lock()
		defer q.mu.Unlock()
		return q.refused && q.nItems > 0
	})
	mb.notPolled(t, "b", "while the device read nothing")
	// Nor do announcements of entries stored meanwhile make it read: the
	// queue has no room for them.
	before := mb.readsOf("b")
	for i := 60; i < 80; i++ {
		e.hub.MailboxChanged("u1", "b", mb.storeAsAnotherEdge(t, "b", "a", fmt.Sprintf("%02d", i)))
	}
	mb.notPolled(t, "b", "after entries were announced while the device read nothing")
	if n := mb.readsOf("b") - before; n > 2 {
		t.Fatalf("20 announcements while the queue had no room made %d reads of the mailbox", n)
	}
	b.startReading()
	for i := range 80 {
		d := b.nextDeliver()
		if p := string(d.GetEvent().GetPayload()); p[:2] != fmt.Sprintf("%02d", i) {
			t.Fatalf("delivery %d is entry %s", i, p[:2])
		}
		b.received(d.GetDeliveryId())
	}
	waitFor(t, "all acked", func() bool { return mb.stored("b") == 0 })
	// Each read asks for what the queue has room for, so what was read
	// and not queued (to be read again) is at most the one entry a read
	// returns whatever its size.
	mb.mu.Lock()
	fetched, reads := mb.fetched["b"], mb.reads["b"]
	mb.mu.Unlock()
	if fetched > 80+reads {
		t.Fatalf("80 entries took %d entries read from the mailbox, in %d reads", fetched, reads)
	}
}

// The mailbox window bounds the mailbox deliveries awaiting the device's
// acknowledgement: one acknowledgement lets one more through, not a
// window's worth.
func TestTheMailboxWindowIsNeverExceeded(t *testing.T) {
	const window = 8
	mb, b := twentyStoredForB(t, func(c *Config) { c.MailboxWindow = window })
	var first []*relayv1.Deliver
	for range window {
		first = append(first, b.nextDeliver())
	}
	b.expectNothing("a delivery beyond the window", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil })
	b.received(first[0].GetDeliveryId())
	if got := string(b.nextDeliver().GetEvent().GetPayload()); got != fmt.Sprint(window) {
		t.Fatalf("after the first acknowledgement came %q, want %d", got, window)
	}
	waitFor(t, "the acknowledgement to reach the mailbox", func() bool { return mb.stored("b") == 19 })
	b.expectNothing("a second delivery for one acknowledgement", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil })
}

// farRemote says one device, far, is on another edge, and records what
// is forwarded there.
type farRemote struct{ captureRemote }

func (r *farRemote) Locate(device string) (string, bool) {
	if device == "far" {
		return "e2", true
	}
	return "", false
}

// A broadcast (no targets) reaches the user's devices on other edges as
// well as those here, as an event naming them does: ephemeral ones with
// or without mailboxes, durable ones on an edge without mailboxes (with
// mailboxes every device gets it anyway). A device nowhere gets an
// ephemeral or mailbox-less broadcast nowhere.
func TestBroadcastsReachDevicesOnOtherEdges(t *testing.T) {
	for _, tc := range []struct {
		name      string
		mailboxes bool
		durable   bool
	}{
		{"ephemeral, mailboxes", true, false},
		{"ephemeral, no mailboxes", false, false},
		{"durable, no mailboxes", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			remote := &farRemote{}
			mod := func(c *Config) { c.Remote = remote }
			var e *env
			if tc.mailboxes {
				e, _ = mailboxEnv(t, mod)
			} else {
				e = newEnv(t, mod)
			}
			e.devices("u1", "a", "near", "far", "nowhere")
			// near takes no datagrams: its ephemeral deliveries come on
			// the stream, where the harness reads.
			a, near := e.online("a"), e.connectFrom("near", "127.0.0.1:5000", false).login()
			ev := a.event()
			ev.Ephemeral = !tc.durable
			a.sendEvent(ev)
			d := near.nextDeliver()
			if d.GetEvent().GetId() != ev.GetId() {
				t.Fatalf("near got %v", d)
			}
			if tc.durable {
				near.received(d.GetDeliveryId())
				a.expectAck(ev)
			}
			waitFor(t, "the forward to far's edge", func() bool {
				remote.mu.Lock()
				defer remote.mu.Unlock()
				return len(remote.forwards) > 0
			})
			remote.mu.Lock()
			defer remote.mu.Unlock()
			if len(remote.forwards) != 1 || remote.forwards[0].GetDeviceId() != "far" || remote.forwards[0].GetEvent() == nil {
				t.Fatalf("forwards: %v, want one, to far", remote.forwards)
			}
		})
	}
}

// heldRemote says every device not here is on edge "B" and keeps each
// forward for the test to hand to B's hub.
type heldRemote struct{ ch chan heldForward }

type heldForward struct {
	fw   *edgev1.Forward
	done func(edgev1.ForwardOutcome)
}

func (r *heldRemote) Locate(string) (string, bool) { return "B", true }
func (r *heldRemote) Forward(_ string, f *edgev1.Forward, done func(edgev1.ForwardOutcome)) {
	r.ch <- heldForward{f, done}
}
func (r *heldRemote) Announce(*edgev1.DevicePresence, bool) {}
func (r *heldRemote) Online(string) []string                { return nil }
func (r *heldRemote) Since(string) (time.Time, bool)        { return time.Time{}, false }

// A sender on edge A forwards "one" then "two" to t on edge B before it
// hears back. "one" reaches B while t is between sessions (NOT_DELIVERED:
// A stores it); "two" reaches B once t is back. "two" must not be
// delivered live ahead of "one": B refuses it the same way, A stores it
// after "one", and t gets both from its mailbox in order. A forward sent
// after A's store (needing its seq) is delivered live again.
func TestMeshHopKeepsSenderOrderAcrossAReconnect(t *testing.T) {
	remote := &heldRemote{ch: make(chan heldForward, 16)}
	eA, mb := mailboxEnv(t, func(c *Config) { c.Remote = remote })
	eA.devices("u1", "s", "t")
	eB := eA.otherEdge("B", func(c *Config) {
		c.Mailbox = mb
	})
	hubB := eB.hub

	s := eA.online("s")
	one := s.sendPayload("one", "t")
	f1 := <-remote.ch
	two := s.sendPayload("two", "t")
	f2 := <-remote.ch
	resume := mb.pause(t)                 // A's store of "one" waits
	hubB.DeliverForwarded(f1.fw, f1.done) // t is between sessions on B
	tt := eB.online("t")
	hubB.DeliverForwarded(f2.fw, f2.done)
	tt.expectNothing("a live delivery ahead of the stored one", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil })
	resume()
	waitFor(t, "both stored", func() bool { return mb.stored("t") == 2 })
	hubB.MailboxChanged("u1", "t", 2) // the watch feed's announcement
	if got := tt.payloads(2); !slices.Equal(got, []string{"one", "two"}) {
		t.Fatalf("t got %v, want [one two]", got)
	}
	s.expectAcks(one, two)
	// Sent after A's stores: it needs them, so B delivers it live.
	three := s.sendPayload("three", "t")
	f3 := <-remote.ch
	if f3.fw.GetNeedMailboxSeq() == 0 {
		t.Fatalf("the forward after the stores needs no mailbox seq: %v", f3.fw)
	}
	hubB.DeliverForwarded(f3.fw, f3.done)
	if got := tt.payloads(1); got[0] != "three" {
		t.Fatalf("t got %v, want three", got)
	}
	s.expectAck(three)
}

// The same with two senders: s1's "one" reaches B while t is between
// sessions (A stores it), then a forward of s2 that needs s2's own stored
// entry, then s1's "two". s2's forward shows nothing of s1's store: B
// still refuses "two", which A stores after "one", so t gets s1's events
// in s1's order.
func TestMeshHopKeepsEachSendersOrder(t *testing.T) {
	remote := &heldRemote{ch: make(chan heldForward, 16)}
	eA, mb := mailboxEnv(t, func(c *Config) { c.Remote = remote })
	eA.devices("u1", "s1", "s2", "t")
	eB := eA.otherEdge("B", func(c *Config) { c.Mailbox = mb })
	hubB := eB.hub
	s1, s2 := eA.online("s1"), eA.online("s2")

	// s2's first event finds t nowhere: A stores it, seq 1.
	early := s2.sendPayload("early", "t")
	fe := <-remote.ch
	if fe.fw.GetSenderDeviceId() != "s2" {
		t.Fatalf("a durable forward without its sender: %v", fe.fw)
	}
	hubB.DeliverForwarded(fe.fw, fe.done)
	waitFor(t, "early stored", func() bool { return mb.stored("t") == 1 })
	s2.expectAck(early)

	one := s1.sendPayload("one", "t")
	f1 := <-remote.ch
	two := s1.sendPayload("two", "t")
	f2 := <-remote.ch
	resume := mb.pause(t)                 // A's store of "one" waits
	hubB.DeliverForwarded(f1.fw, f1.done) // t is between sessions on B
	tt := eB.online("t")
	if got := tt.payloads(1); got[0] != "early" {
		t.Fatalf("t got %v first, want early", got)
	}
	late := s2.sendPayload("late", "t")
	fl := <-remote.ch
	if fl.fw.GetNeedMailboxSeq() != 1 {
		t.Fatalf("s2's forward after its store needs %d, want 1", fl.fw.GetNeedMailboxSeq())
	}
	hubB.DeliverForwarded(fl.fw, fl.done)
	if got := tt.payloads(1); got[0] != "late" {
		t.Fatalf("t got %v, want late (s2's, after its stored one)", got)
	}
	hubB.DeliverForwarded(f2.fw, f2.done)
	tt.expectNothing("s1's two live ahead of its stored one", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil })
	resume()
	waitFor(t, "one and two stored", func() bool {
		mb.mu.Lock()
		defer mb.mu.Unlock()
		return mb.seq["t"] == 3
	})
	hubB.MailboxChanged("u1", "t", 3)
	if got := tt.payloads(2); !slices.Equal(got, []string{"one", "two"}) {
		t.Fatalf("t got %v, want [one two]", got)
	}
	s1.expectAcks(one, two)
	s2.expectAck(late)
}

// The same with a hand-back: "one" was delivered to b's session on B and
// not acknowledged; b reconnects to B, and "two" (forwarded before A
// heard of any of this) arrives as the new session registers, while the
// old one may not have handed "one" back yet. Whether "two" comes before
// the hand-back (held in the new session until it) or after, B refuses
// it, A stores it after "one", and b gets them in order.
func TestMeshHopKeepsSenderOrderAcrossAHandBack(t *testing.T) {
	remote := &heldRemote{ch: make(chan heldForward, 16)}
	eA, mb := mailboxEnv(t, func(c *Config) { c.Remote = remote })
	eA.devices("u1", "s", "b")
	hook := &announceHook{nth: 2}
	eB := eA.otherEdge("B", func(c *Config) {
		c.Mailbox = mb
		c.Remote = hook
	})
	hubB := eB.hub
	outcomes := make(chan string, 2)
	answer := func(name string, f heldForward) func(edgev1.ForwardOutcome) {
		return func(o edgev1.ForwardOutcome) {
			outcomes <- name + " " + o.String()
			f.done(o)
		}
	}

	s, b1 := eA.online("s"), eB.online("b")
	one := s.sendPayload("one", "b")
	f1 := <-remote.ch
	hubB.DeliverForwarded(f1.fw, answer("one", f1))
	b1.nextDeliver() // never acknowledged
	two := s.sendPayload("two", "b")
	f2 := <-remote.ch
	resume := mb.pause(t) // A's stores wait
	hook.onAnnounce = func() { hubB.DeliverForwarded(f2.fw, answer("two", f2)) }
	b2 := eB.online("b")
	for _, want := range []string{"one FORWARD_OUTCOME_NOT_DELIVERED", "two FORWARD_OUTCOME_NOT_DELIVERED"} {
		select {
		case got := <-outcomes:
			if got != want {
				t.Fatalf("outcome %q, want %q", got, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no outcome within 10s, want %q", want)
		}
	}
	bothFromTheMailbox(t, hubB, mb, resume, s, b2, one, two)
}

// The same hand-back at the worst moment: "two" has arrived at B (nothing
// was handed back yet) when b reconnects, its old session hands "one"
// back and its new session's gate opens; only then is "two" delivered. It must follow "one" to the mailbox, not go live ahead of it
// (it did, rarely, under load: TestMeshHopKeepsSenderOrderAcrossAHandBack
// then waited for ever for its outcome).
func TestAForwardCheckedBeforeAHandBackFollowsIt(t *testing.T) {
	remote := &heldRemote{ch: make(chan heldForward, 16)}
	eA, mb := mailboxEnv(t, func(c *Config) { c.Remote = remote })
	eA.devices("u1", "s", "b")
	eB := eA.otherEdge("B", func(c *Config) {
		c.Mailbox = mb
		c.Remote = &announceHook{onAnnounce: func() {}}
	})
	hubB := eB.hub

	s, b1 := eA.online("s"), eB.online("b")
	one := s.sendPayload("one", "b")
	f1 := <-remote.ch
	oneOut := make(chan edgev1.ForwardOutcome, 1)
	hubB.DeliverForwarded(f1.fw, func(o edgev1.ForwardOutcome) { oneOut <- o; f1.done(o) })
	b1.nextDeliver() // never acknowledged
	two := s.sendPayload("two", "b")
	f2 := <-remote.ch
	resume := mb.pause(t) // A's stores wait

	var b2 *dev
	hubB.afterForwardArrived = func() {
		b2 = eB.online("b")
		wantOutcome(t, oneOut, edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED, "one, handed back by the old session")
		waitFor(t, "the new session's gate open", func() bool {
			ss := hubB.sessionsOf("u1", "b")
			return len(ss) == 1 && !ss[0].mb.slow.Load()
		})
	}
	twoOut := make(chan edgev1.ForwardOutcome, 1)
	hubB.DeliverForwarded(f2.fw, func(o edgev1.ForwardOutcome) { twoOut <- o; f2.done(o) })
	// Without an outcome, two was delivered live, ahead of one.
	wantOutcome(t, twoOut, edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED, "two, after the hand-back of one")
	bothFromTheMailbox(t, hubB, mb, resume, s, b2, one, two)
}

// bothFromTheMailbox ends a hand-back test: b's new session got nothing
// live; once A's stores resume, "one" and "two" come from the mailbox in
// that order, and s has both acknowledged.
func bothFromTheMailbox(t *testing.T, hubB *Hub, mb *memMailbox, resume func(), s, b *dev, one, two *relayv1.Event) {
	t.Helper()
	b.expectNothing("a live delivery ahead of the stored one", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil })
	resume()
	waitFor(t, "both stored", func() bool { return mb.stored("b") == 2 })
	hubB.MailboxChanged("u1", "b", 2)
	if got := b.payloads(2); !slices.Equal(got, []string{"one", "two"}) {
		t.Fatalf("b got %v, want [one two]", got)
	}
	s.expectAcks(one, two)
}

// wantOutcome waits (10 s at most) for a forward's outcome on ch.
func wantOutcome(t *testing.T, ch <-chan edgev1.ForwardOutcome, want edgev1.ForwardOutcome, what string) {
	t.Helper()
	select {
	case o := <-ch:
		if o != want {
			t.Fatalf("outcome for %s: %v, want %v", what, o, want)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("no outcome for %s within 10s, want %v", what, want)
	}
}

// A device revoked (or whose account was disabled) while its session was
// between the handshake and its registration, waiting for its first
// mailbox read, does not stay: the edge's revocation closed the sessions
// registered then, and the session looks again once it is registered.
func TestRevokedWhileOpeningDoesNotStay(t *testing.T) {
	for _, c := range []struct {
		name   string
		revoke func(e *env)
		left   float64 // sessions after it: b's, unless its user went too
	}{
		{"device revoked", func(e *env) {
			e.dir.setState("a", DeviceRevoked)
			e.hub.CloseDevice("u1", "a", relayv1.ErrorCode_ERROR_CODE_REVOKED, "device revoked")
		}, 1},
		{"user disabled", func(e *env) {
			e.dir.setUser("u1", false)
			e.hub.CloseUser("u1", relayv1.ErrorCode_ERROR_CODE_REVOKED, "user disabled")
		}, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			e, mb := mailboxEnv(t, nil)
			e.devices("u1", "a", "b")
			e.online("b")
			gate, snaps := make(chan struct{}), make(chan string, 16)
			mb.mu.Lock()
			mb.fetchGate["a"], mb.snapshots = gate, snaps
			mb.mu.Unlock()
			a := e.connect("a")
			a.answer(a.challenged(nil))
			for d := range snaps { // a's first mailbox read has begun
				if d == "a" {
					break
				}
			}
			c.revoke(e) // as the edge does when the feed brings it
			close(gate)
			f := a.readDirect()
			if f.GetClose().GetCode() != relayv1.ErrorCode_ERROR_CODE_REVOKED {
				t.Fatalf("after the revocation the device got %v, want a Close with REVOKED", f)
			}
			waitFor(t, "the session gone", func() bool { return e.metric("relay_edge_sessions", "transport", "pipe") == c.left })
		})
	}
}

// An event queued to a session in the moment between its entering the
// room and its being refused there (its device revoked meanwhile) is
// answered: the refused session ends as any other does, handing what it
// holds back (TARGET_DELETED for a revoked target), instead of leaving
// the sender waiting for an ack that never comes and dropping its
// retries as duplicates in flight. The device gets the Close, no Welcome.
func TestAnEventQueuedToASessionRefusedAsItRegistersIsAnswered(t *testing.T) {
	e, _ := mailboxEnv(t, nil)
	e.devices("u1", "a", "b")
	b := e.online("b")
	var ev *relayv1.Event
	e.hub.inRoom = func(s *Session) {
		if s.deviceID != "a" {
			return
		}
		ev = b.sendPayload("for a", "a")
		waitFor(t, "b's event accepted", func() bool { return e.metric("relay_edge_events_total", "result", "accepted") == 1 })
		e.dir.setState("a", DeviceRevoked)
	}
	a := e.connect("a")
	a.answer(a.challenged(nil))
	if f := a.readDirect(); f.GetClose().GetCode() != relayv1.ErrorCode_ERROR_CODE_REVOKED {
		t.Fatalf("a got %v, want a Close with REVOKED", f)
	}
	f := b.nextAckOrReject()
	if f.GetReject().GetEventId() != ev.GetId() || f.GetReject().GetCode() != relayv1.ErrorCode_ERROR_CODE_TARGET_DELETED {
		t.Fatalf("b's event to the refused session: %v, want TARGET_DELETED", f)
	}
	waitFor(t, "a's session gone", func() bool { return e.metric("relay_edge_sessions", "transport", "pipe") == 1 })
}

// A durable event stored for n offline targets costs its sender n times
// its bytes: a broadcast to many offline devices is paced to the
// device's byte rate, while the same events for one offline target are
// not.
func TestMailboxFanOutIsChargedToTheSender(t *testing.T) {
	const rate = 128 << 10
	e, mb := mailboxEnv(t, func(c *Config) {
		c.Limits.BytesPerSecond = rate // the burst is the same
	})
	offline := []string{"b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8", "b9"}
	e.devices("u1", append([]string{"a"}, offline...)...)
	a := e.online("a")
	payload := strings.Repeat("x", 4<<10)
	ping := func(nonce uint64) {
		a.send(&relayv1.Frame{Kind: &relayv1.Frame_Ping{Ping: &relayv1.Ping{Nonce: nonce}}})
		a.next("pong", func(f *relayv1.Frame) bool { return f.GetPong().GetNonce() == nonce })
	}
	// Ten events of 4 KiB for one offline device: 41 KiB, inside the
	// burst.
	var evs []*relayv1.Event
	for range 10 {
		evs = append(evs, a.sendPayload(payload, "b1"))
	}
	a.expectAcks(evs...)
	ping(1)
	if got := e.metric("relay_edge_paced_seconds_total"); got != 0 {
		t.Fatalf("events for one offline device paced %.2f s", got)
	}
	// Ten broadcasts to the nine offline devices: 370 KiB of mailbox
	// writes, about 240 KiB beyond the burst, about 1.9 s at the rate. The
	// ping is read once the last broadcast's debt is repaid.
	evs = evs[:0]
	for range 10 {
		evs = append(evs, a.sendPayload(payload))
	}
	a.expectAcks(evs...)
	ping(2)
	if got := e.metric("relay_edge_paced_seconds_total"); got < 1 {
		t.Fatalf("broadcasts to nine offline devices paced %.2f s, want about 1.9 s", got)
	}
	for _, d := range offline {
		want := 10
		if d == "b1" {
			want = 20
		}
		if got := mb.stored(d); got != want {
			t.Fatalf("%s's mailbox holds %d entries, want %d", d, got, want)
		}
	}
}

// The copies count as events too: small broadcasts to many offline
// devices, cheap in bytes, each make a Raft entry per device, so they
// write no faster than the device's event rate.
func TestMailboxFanOutIsChargedInEvents(t *testing.T) {
	e, _ := mailboxEnv(t, func(c *Config) { c.Limits.EventsPerSecond = 100 }) // the burst is the same
	offline := []string{"b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8", "b9"}
	e.devices("u1", append([]string{"a"}, offline...)...)
	a := e.online("a")
	// 20 broadcasts of 5 bytes to nine offline devices: 180 mailbox
	// writes, 80 beyond the burst, 0.8 s at the rate.
	var evs []*relayv1.Event
	for range 20 {
		evs = append(evs, a.sendPayload("small"))
	}
	a.expectAcks(evs...)
	if got := e.metric("relay_edge_paced_seconds_total"); got < 0.5 {
		t.Fatalf("small broadcasts to nine offline devices paced %.2f s, want about 0.8 s", got)
	}
}

// aheadRemote is a mesh on which every device's newest session started
// at a time it is set to: on another edge, whose clock may be ahead. It
// records what this edge announces.
type aheadRemote struct {
	captureRemote
	at        atomic.Pointer[time.Time]
	announced chan *edgev1.DevicePresence
}

func (r *aheadRemote) Since(string) (time.Time, bool) { return *r.at.Load(), true }
func (r *aheadRemote) Announce(p *edgev1.DevicePresence, online bool) {
	if online {
		r.announced <- p
	}
}

// next is the start this edge announces for the next session.
func (r *aheadRemote) next(t *testing.T) time.Time {
	t.Helper()
	select {
	case p := <-r.announced:
		return time.Unix(0, p.GetSinceNs())
	case <-time.After(30 * time.Second):
		t.Fatal("no session announced")
		return time.Time{}
	}
}

// A session is announced as newer than the device's session on another
// edge, whose clock may be ahead, so that it wins there: as far as
// clocks are let be off (SkewTolerance), and no further. The device's
// activity still reads this edge's clock. Two edges that both took the
// start just after a third's tell their sessions apart by edge id.
func TestANewSessionIsNewerThanOneElsewhere(t *testing.T) {
	remote := &aheadRemote{announced: make(chan *edgev1.DevicePresence, 4)}
	e := newEnv(t, func(c *Config) { c.Remote = remote })
	tolerance := e.hub.cfg.Limits.SkewTolerance
	e.device("u1", "b")
	e.device("u1", "c")

	ahead := time.Now().Add(tolerance / 2)
	remote.at.Store(&ahead)
	b := e.online("b")
	bSince := remote.next(t)
	if !bSince.After(ahead) {
		t.Fatalf("announced since %v, not after the other edge's %v", bSince, ahead)
	}
	acts := e.hub.TakeActivity()
	i := slices.IndexFunc(acts, func(a Activity) bool { return a.DeviceID == "b" })
	if i < 0 {
		t.Fatal("no activity for b")
	}
	if at := acts[i].At; at.After(time.Now()) {
		t.Fatalf("b's activity is at %v, in this edge's future", at)
	}

	far := time.Now().Add(24 * time.Hour)
	remote.at.Store(&far)
	e.online("c")
	if since := remote.next(t); since.After(time.Now().Add(tolerance + time.Second)) {
		t.Fatalf("a peer a day ahead moved this edge's start to %v, beyond the tolerance of %v", since, tolerance)
	}

	// A peer with b's start: the lower edge id wins.
	e.hub.PeerHolds("u1", "b", bSince, "other", "edge-z")
	e.hub.PeerHolds("u1", "b", bSince.Add(-time.Nanosecond), "other", "edge-a")
	b.expectNothing("close after a tie with a higher edge id and an older start", func(f *relayv1.Frame) bool { return f.GetClose() != nil })
	e.hub.PeerHolds("u1", "b", bSince, "other", "edge-a")
	waitFor(t, "b's session to close for the tie with a lower edge id", func() bool { return len(e.hub.sessionsOf("u1", "b")) == 0 })
}
