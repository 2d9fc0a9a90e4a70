package session

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"

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
	seq       map[string]uint64
	boxes     map[string][]*edgev1.MailboxEntry
	quota     int
	fails     map[string]int           // fail this many fetches of a device
	fetchGate map[string]chan struct{} // if set, a device's fetches wait for it
	snapshots chan string              // if set, told the device of each fetch once it read
	acked     map[string][]uint64
	claims    map[string]string // sender/event -> the device that took it

	queue chan func()
	hold  sync.Mutex // held by tests to pause the writer
	done  chan struct{}
}

func newMemMailbox(t testing.TB) *memMailbox {
	m := &memMailbox{seq: map[string]uint64{}, boxes: map[string][]*edgev1.MailboxEntry{}, acked: map[string][]uint64{},
		queue: make(chan func(), 1024), done: make(chan struct{}), quota: 1000,
		fails: map[string]int{}, fetchGate: map[string]chan struct{}{}}
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
		if len(m.boxes[e.GetDeviceId()]) >= m.quota {
			r.Status = edgev1.MailboxStatus_MAILBOX_STATUS_FULL
		} else {
			m.seq[e.GetDeviceId()]++
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
func (m *memMailbox) Fetch(ctx context.Context, device string, after uint64, limit int) ([]*edgev1.MailboxEntry, bool, error) {
	m.mu.Lock()
	gate := m.fetchGate[device]
	if m.fails[device] > 0 {
		m.fails[device]--
		m.mu.Unlock()
		return nil, false, errors.New("control plane unavailable")
	}
	var out []*edgev1.MailboxEntry
	more := false
	for _, e := range m.boxes[device] {
		if e.GetSeq() > after {
			if len(out) == limit {
				more = true
				break
			}
			out = append(out, e)
		}
	}
	snaps := m.snapshots
	m.mu.Unlock()
	if snaps != nil {
		snaps <- device
	}
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, false, ctx.Err()
		}
	}
	return out, more, nil
}

func (m *memMailbox) Ack(device string, seqs ...uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
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
	mb.hold.Lock() // the writer stalls
	held := true
	release := func() {
		if held {
			held = false
			mb.hold.Unlock()
		}
	}
	t.Cleanup(release) // a failure below must not leave the writer stalled
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

// A live event that must follow a stored one waits until the stored one
// is queued, even when the mailbox cannot be read for a while.
func TestLiveEventWaitsForTheMailbox(t *testing.T) {
	e, mb := mailboxEnv(t, nil)
	e.device("u1", "a")
	e.device("u1", "b")
	a := e.online("a")
	e1 := a.sendPayload("stored", "b")
	a.expectAck(e1)
	// b connects while the mailbox cannot be read, then the mailbox
	// answers only when the test says.
	gate := make(chan struct{})
	mb.mu.Lock()
	mb.fails["b"], mb.fetchGate["b"] = 1, gate
	mb.mu.Unlock()
	b := e.online("b")
	a.sendPayload("live", "b")
	b.expectNothing("a live event before the stored one", func(f *relayv1.Frame) bool { return f.GetDeliver() != nil })
	close(gate)
	if got := b.payloads(2); !slices.Equal(got, []string{"stored", "live"}) {
		t.Fatalf("b got %v", got)
	}
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
