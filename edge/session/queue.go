package session

import (
	"sync"

	"google.golang.org/protobuf/encoding/protowire"

	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// item is one thing waiting to be written to a device: a control frame,
// or a delivery whose event is already encoded (one encoding shared by
// every receiver of a fan-out).
type item struct {
	frame    *relayv1.Frame // control frame, or nil for a delivery or an ack
	ack      string         // the event id of an Ack (never empty: ValidateEvent refuses empty ids)
	event    []byte         // encoded relay.v1.Event with the sender filled in
	delivery uint64         // 0 for ephemeral deliveries
	datagram bool           // try a datagram first (ephemeral only)
}

// Outcome of offering a delivery to a queue.
type offerResult int

const (
	offered offerResult = iota
	queueFull
	queueClosed
)

// queue is a session's bounded outbound queue. Deliveries are bounded by
// count and bytes, so one slow receiver holds a bounded amount of memory
// and a sender learns at once that it is full; control frames (acks,
// rejects, presence) have a separate, larger bound whose overflow means
// the device stopped reading altogether.
//
// The queue also decides when the session has a writer: none while the
// session is idle, so an idle session parks no goroutine for it. The
// first thing queued (a frame, timer work, the close) starts one through
// start; the writer takes batches with next, waits on wake for a while
// when there is nothing left (a busy session keeps its writer), and then
// retires; the last one (after the close) never hands over.
type queue struct {
	maxItems, maxBytes, maxControl int
	// maxUnacked and maxUnackedBytes bound the durable deliveries offered
	// and not yet settled (acknowledged by the device, or handed off):
	// a device that reads but never acknowledges holds no more than this
	// of the edge's memory [0: no bound].
	maxUnacked, maxUnackedBytes int
	// start starts a writer goroutine; nil in tests that drive the
	// queue by hand.
	start func()
	// roomed, if set, is called (without mu) when the writer took
	// deliveries after an offer was refused for want of room: a mailbox
	// pump waiting for room goes on then, rather than polling.
	roomed func()

	mu       sync.Mutex // guards the fields below
	items    []item
	spare    []item // the slice handed to the writer last time, for reuse
	nItems   int    // deliveries queued
	nBytes   int    // bytes of deliveries queued
	nControl int
	// nUnacked and unackedBytes count the durable deliveries offered and
	// not settled yet.
	nUnacked, unackedBytes int
	nextID                 uint64 // last delivery id handed out
	closed                 bool
	overflow               bool // control bound exceeded
	refused                bool // an offer was refused since the writer last took deliveries
	// freed counts the times deliveries left the queue or their
	// acknowledgements came (room may have appeared): a mailbox pump
	// refused for want of room reads again only once it moved.
	freed uint64
	due   dueWork
	// running: a writer runs, or the queue is held (newQueue) until the
	// session may write (release); no second writer starts meanwhile.
	running bool

	wake chan struct{} // capacity 1: something was queued for the running writer
}

// dueWork is timer work waiting for the writer, as bits.
type dueWork uint8

const (
	dueTicket        dueWork = 1 << iota // refresh the resume ticket
	dueMaxAge                            // the session reached its maximum age: re-authenticate
	dueReauthTimeout                     // the re-authentication's answer is late
	dueAuthChanged                       // the device proved its key again
)

// newQueue returns a held queue: nothing starts a writer before release.
func newQueue(maxItems, maxBytes, maxControl int) *queue {
	return &queue{maxItems: maxItems, maxBytes: maxBytes, maxControl: maxControl, running: true, wake: make(chan struct{}, 1)}
}

// wakeLocked wakes the running writer, or claims the writer's place when
// none runs; the caller starts one (after unlocking) when it returns
// true.
func (q *queue) wakeLocked() bool {
	if q.running {
		select {
		case q.wake <- struct{}{}:
		default:
		}
		return false
	}
	q.running = true
	return q.start != nil
}

func (q *queue) startIf(start bool) {
	if start {
		q.start()
	}
}

// release lets writers start, and starts one at once if anything is
// waiting.
func (q *queue) release() {
	q.mu.Lock()
	q.running = false
	start := false
	if len(q.items) > 0 || q.due != 0 || q.closed || q.overflow {
		start = q.wakeLocked()
	}
	q.mu.Unlock()
	q.startIf(start)
}

// schedule records timer work for the writer.
func (q *queue) schedule(w dueWork) {
	q.mu.Lock()
	q.due |= w
	start := q.wakeLocked()
	q.mu.Unlock()
	q.startIf(start)
}

// offer queues a delivery. For a durable delivery it assigns the delivery
// id and calls track with it before the writer can see the item, so a
// Received for it always finds its record.
func (q *queue) offer(event []byte, durable, datagram bool, track func(id uint64)) offerResult {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return queueClosed
	}
	if q.nItems >= q.maxItems || (q.nItems > 0 && q.nBytes+len(event) > q.maxBytes) ||
		(durable && q.unackedFullLocked(len(event))) {
		q.refused = true
		q.mu.Unlock()
		return queueFull
	}
	it := item{event: event, datagram: datagram && !durable}
	if durable {
		q.nUnacked++
		q.unackedBytes += len(event)
		q.nextID++
		it.delivery = q.nextID
		track(it.delivery)
	}
	q.items = append(q.items, it)
	q.nItems++
	q.nBytes += len(event)
	start := q.wakeLocked()
	q.mu.Unlock()
	q.startIf(start)
	return offered
}

// unackedFullLocked reports whether a durable delivery of size bytes
// would be refused for the deliveries not acknowledged yet (with mu held).
func (q *queue) unackedFullLocked(size int) bool {
	return q.maxUnacked > 0 && (q.nUnacked >= q.maxUnacked || (q.nUnacked > 0 && q.unackedBytes+size > q.maxUnackedBytes))
}

// settle ends the count of n durable deliveries of size bytes in all
// (offer counted them): the device acknowledged them.
func (q *queue) settle(n, size int) {
	q.mu.Lock()
	q.nUnacked -= n
	q.unackedBytes -= size
	q.freed++
	q.mu.Unlock()
}

// freedCount is freed (see there).
func (q *queue) freedCount() uint64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.freed
}

// control queues a control frame. It reports false when the queue is
// closed or the device stopped reading (the session must then close).
func (q *queue) control(f *relayv1.Frame) bool {
	return q.controlItem(item{frame: f})
}

// ack queues an Ack for eventID, counted as a control frame: the most
// frequent control frame goes without a Frame to build and encode.
func (q *queue) ack(eventID string) bool {
	return q.controlItem(item{ack: eventID})
}

func (q *queue) controlItem(it item) bool {
	q.mu.Lock()
	if q.closed || q.overflow {
		q.mu.Unlock()
		return false
	}
	if q.nControl >= q.maxControl {
		q.overflow = true
		start := q.wakeLocked()
		q.mu.Unlock()
		q.startIf(start)
		return false
	}
	q.items = append(q.items, it)
	q.nControl++
	start := q.wakeLocked()
	q.mu.Unlock()
	q.startIf(start)
	return true
}

// next hands the writer everything queued, in order, and the timer work
// due. ok is false when there is nothing at all: the writer then waits
// on wake, or retires. Once the queue is closed or overflowed, next
// always has something (the writer's last batch ends it). The slice is
// valid until the next call.
func (q *queue) next() (batch []item, due dueWork, closed, overflow, ok bool) {
	q.mu.Lock()
	if q.emptyLocked() {
		q.mu.Unlock()
		return nil, 0, false, false, false
	}
	batch, q.items = q.items, q.spare[:0]
	q.spare = batch
	due, q.due = q.due, 0
	roomed := q.refused && q.nItems > 0
	if roomed {
		q.refused = false
	}
	if q.nItems > 0 {
		q.freed++
	}
	q.nItems, q.nBytes, q.nControl = 0, 0, 0
	closed, overflow = q.closed, q.overflow
	q.mu.Unlock()
	if roomed && q.roomed != nil {
		q.roomed()
	}
	return batch, due, closed, overflow, true
}

// room is how many more durable deliveries, and how many bytes of them,
// the queue takes now: what its own bounds and those of the deliveries
// not acknowledged yet leave (0 when it takes none). Bytes are not
// bounded while both are empty (a delivery of any size is taken then):
// bytes is maxBytes then.
func (q *queue) room() (items, bytes int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	items, bytes = q.maxItems-q.nItems, q.maxBytes
	if q.nItems > 0 {
		bytes -= q.nBytes
	}
	if q.maxUnacked > 0 {
		items = min(items, q.maxUnacked-q.nUnacked)
		if q.nUnacked > 0 {
			bytes = min(bytes, q.maxUnackedBytes-q.unackedBytes)
		}
	}
	return max(items, 0), max(bytes, 0)
}

func (q *queue) emptyLocked() bool {
	return len(q.items) == 0 && q.due == 0 && !q.closed && !q.overflow
}

// retire gives the writer's place back when there is still nothing to
// write, and reports whether it did (the writer must then return);
// otherwise the writer carries on.
func (q *queue) retire() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if !q.emptyLocked() {
		return false
	}
	q.running = false
	// A burst's slices do not stay with an idle session.
	if cap(q.items) > keepItems {
		q.items = nil
	}
	if cap(q.spare) > keepItems {
		q.spare = nil
	}
	return true
}

// keepItems is the most queue slots an idle session keeps room for.
const keepItems = 64

// close stops the queue taking more; the writer still gets what is
// queued.
func (q *queue) close() {
	q.mu.Lock()
	q.closed = true
	start := q.wakeLocked()
	q.mu.Unlock()
	q.startIf(start)
}

// Frame field numbers used to wrap a shared encoded event without
// re-encoding it per receiver.
const (
	frameDeliverField    = 7 // Frame.deliver
	deliverEventField    = 1 // Deliver.event
	deliverDeliveryField = 2 // Deliver.delivery_id
	frameAckField        = 6 // Frame.ack
	ackEventIDField      = 1 // Ack.event_id
)

// appendAckFrame appends Frame{Ack{EventId: id}} with its length prefix,
// the same bytes frame.Append writes for it, built without a Frame.
func appendAckFrame(dst []byte, id string) []byte {
	inner := 0
	if id != "" {
		inner = protowire.SizeTag(ackEventIDField) + protowire.SizeBytes(len(id))
	}
	body := protowire.SizeTag(frameAckField) + protowire.SizeBytes(inner)
	dst = protowire.AppendVarint(dst, uint64(body))
	dst = protowire.AppendTag(dst, frameAckField, protowire.BytesType)
	dst = protowire.AppendVarint(dst, uint64(inner))
	if id != "" {
		dst = protowire.AppendTag(dst, ackEventIDField, protowire.BytesType)
		dst = protowire.AppendString(dst, id)
	}
	return dst
}

// appendDeliverBody appends the protobuf encoding of
// Frame{Deliver{Event: <event>, DeliveryId: id}} given the event's
// encoding. It produces the same bytes proto.Marshal would.
func appendDeliverBody(dst, event []byte, id uint64) []byte {
	inner := protowire.SizeTag(deliverEventField) + protowire.SizeBytes(len(event))
	if id != 0 {
		inner += protowire.SizeTag(deliverDeliveryField) + protowire.SizeVarint(id)
	}
	dst = protowire.AppendTag(dst, frameDeliverField, protowire.BytesType)
	dst = protowire.AppendVarint(dst, uint64(inner))
	dst = protowire.AppendTag(dst, deliverEventField, protowire.BytesType)
	dst = protowire.AppendBytes(dst, event)
	if id != 0 {
		dst = protowire.AppendTag(dst, deliverDeliveryField, protowire.VarintType)
		dst = protowire.AppendVarint(dst, id)
	}
	return dst
}

// deliverBodySize is len(appendDeliverBody(nil, event, id)).
func deliverBodySize(eventLen int, id uint64) int {
	inner := protowire.SizeTag(deliverEventField) + protowire.SizeBytes(eventLen)
	if id != 0 {
		inner += protowire.SizeTag(deliverDeliveryField) + protowire.SizeVarint(id)
	}
	return protowire.SizeTag(frameDeliverField) + protowire.SizeBytes(inner)
}
