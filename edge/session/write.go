package session

import (
	"encoding/binary"
	"time"

	"github.com/edge-relay/relay/edge/frame"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// control queues a control frame; a device that let them pile up is
// closed.
func (s *Session) control(f *relayv1.Frame) {
	if !s.out.control(f) {
		s.closeWith(closeErr(relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER, "the device stopped reading"), 0)
	}
}

// ack queues the Ack of a durable event, as control does a frame.
func (s *Session) ack(eventID string) {
	if !s.out.ack(eventID) {
		s.closeWith(closeErr(relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER, "the device stopped reading"), 0)
	}
}

// startWriter is the queue's start function: the session's writer runs
// only while there is something to write.
func (s *Session) startWriter() { go s.writeLoop() }

// startTimers arms the writer's timers once the session is open: the
// resume ticket's refresh and the maximum age. Each schedules work for
// the writer instead of keeping a goroutine waiting on it.
func (s *Session) startTimers() {
	now := s.hub.cfg.Now()
	s.timersMu.Lock()
	defer s.timersMu.Unlock()
	s.ticketT = time.AfterFunc(s.nextTicketRefresh(now), func() { s.out.schedule(dueTicket) })
	s.ageT = time.AfterFunc(s.untilMaxAge(now), func() { s.out.schedule(dueMaxAge) })
	s.reauthT = time.AfterFunc(time.Hour, func() { s.out.schedule(dueReauthTimeout) })
	s.reauthT.Stop()
}

// stopTimers stops the writer's timers for good.
func (s *Session) stopTimers() {
	s.timersMu.Lock()
	defer s.timersMu.Unlock()
	for _, t := range []*time.Timer{s.ticketT, s.ageT, s.reauthT} {
		if t != nil {
			t.Stop()
		}
	}
	s.timersStopped = true
}

// timerWork does the timer work that came due: a fresh resume ticket,
// the re-authentication challenge at the maximum age (and the close when
// it goes unanswered), and the new schedule once the device proved its
// key again. The writer runs it, so the frames it queues follow what was
// queued before.
func (s *Session) timerWork(due dueWork) {
	cfg := &s.hub.cfg
	s.timersMu.Lock()
	defer s.timersMu.Unlock()
	if s.timersStopped {
		return
	}
	now := cfg.Now()
	if due&dueAuthChanged != 0 {
		s.reauthT.Stop()
		s.ageT.Reset(s.untilMaxAge(now))
		due |= dueTicket
		due &^= dueMaxAge | dueReauthTimeout
	}
	if due&dueTicket != 0 {
		s.sendTicket(now)
		s.ticketT.Reset(s.nextTicketRefresh(now))
	}
	if due&dueMaxAge != 0 {
		if d := s.untilMaxAge(now); d > 0 {
			s.ageT.Reset(d) // early (a timer that fired as it was reset)
		} else {
			s.authMu.Lock()
			ch, err := s.hs.reauth()
			s.authMu.Unlock()
			if err != nil {
				s.closeWith(closeErr(relayv1.ErrorCode_ERROR_CODE_INTERNAL, "re-authentication: %v", err), 0)
			} else {
				s.control(&relayv1.Frame{Kind: &relayv1.Frame_Challenge{Challenge: ch}})
				s.reauthT.Reset(cfg.HandshakeTimeout)
			}
		}
	}
	if due&dueReauthTimeout != 0 {
		s.authMu.Lock()
		pending := !s.hs.done()
		s.authMu.Unlock()
		if pending {
			s.closeWith(closeErr(relayv1.ErrorCode_ERROR_CODE_SESSION_EXPIRED, "the session reached its maximum age and did not authenticate again"), 0)
		}
	}
}

// writeLoop writes what the queue holds, in batches (one write per
// batch, or per writeChunk of whole frames of a larger one); once the
// queue has stayed empty for WriterLinger it returns, and the next thing
// queued starts it again. It also does the timer work that came due, and
// finally sends the Close frame and closes the connection. Every write
// has a deadline: WriteTimeout while the session runs (a device that
// takes less than a write in that long is a SLOW_CONSUMER),
// closeDeadline once it is closing. The writer that ends the session
// closes writerDone.
func (s *Session) writeLoop() {
	m := s.hub.cfg.Metrics
	var buf, dg []byte
	// dgStuck aborts the session should a datagram not be taken in
	// WriteTimeout (made at the writer's first datagram).
	var dgStuck *time.Timer
	defer func() {
		if dgStuck != nil {
			dgStuck.Stop()
		}
	}()
	// The linger timer runs while the writer does and is not reset per
	// batch (a busy session's writer would pay for that on every wake):
	// when it fires, a writer that wrote since the last time carries on,
	// one that did not retires. So an idle session loses its writer
	// between one and two WriterLinger after its last write.
	linger := time.NewTimer(s.hub.cfg.WriterLinger)
	defer linger.Stop()
	wrote := true
	for {
		batch, due, closed, overflow, ok := s.out.next()
		if !ok {
			select {
			case <-s.out.wake:
			case <-linger.C:
				if !wrote && s.out.retire() {
					return
				}
				wrote = false
				linger.Reset(s.hub.cfg.WriterLinger)
			}
			continue
		}
		wrote = true
		if due != 0 {
			s.timerWork(due)
		}
		if overflow {
			s.closeWith(closeErr(relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER, "the device stopped reading"), 0)
			closed = true
		}
		buf = buf[:0]
		var durable, ephemeral int
		// quic-go packs one DATAGRAM frame into a packet: only an event
		// alone in its batch goes as a datagram (no worse than a stream
		// frame, and never behind a lost one); events that queued up
		// together share the stream write, and so QUIC's packets.
		lone := len(batch) == 1
		for i := range batch {
			it := &batch[i]
			switch {
			case it.frame != nil:
				buf, _ = frame.Append(buf, it.frame)
				it.frame = nil
			case it.ack != "":
				buf = appendAckFrame(buf, it.ack)
				it.ack = ""
			default:
				if it.delivery != 0 {
					durable++
				} else {
					ephemeral++
				}
				if it.datagram && lone {
					dg = appendDeliverBody(dg[:0], it.event, 0)
					// quic-go queues 32 datagrams and then blocks the sender
					// until a packet takes one, with no deadline; packets
					// stop when the peer acknowledges none. Bounded as a
					// write is.
					if dgStuck == nil {
						dgStuck = time.AfterFunc(s.hub.cfg.WriteTimeout, s.datagramStuck)
					} else {
						dgStuck.Reset(s.hub.cfg.WriteTimeout)
					}
					err := s.conn.SendDatagram(dg)
					dgStuck.Stop()
					if err == nil {
						it.event = nil
						continue
					}
				}
				buf = appendFramed(buf, it.event, it.delivery)
				it.event = nil
			}
			if len(buf) >= writeChunk {
				// A large batch goes out a chunk of whole frames at a
				// time, each under its own deadline (see write): acks and
				// control frames too, of which thousands may queue up.
				if err := s.write(buf); err != nil {
					s.abort(err)
					s.writerEnded()
					return
				}
				buf = buf[:0]
			}
		}
		if durable > 0 {
			m.deliveredDurable.Add(float64(durable))
		}
		if ephemeral > 0 {
			m.deliveredEphemeral.Add(float64(ephemeral))
		}
		if closed && s.closeReason.Code != relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED {
			buf, _ = frame.Append(buf, closeFrame(s.closeReason, s.reconnectIn))
		}
		if len(buf) > 0 {
			if err := s.write(buf); err != nil {
				s.abort(err)
				s.writerEnded()
				return
			}
		}
		if cap(buf) > keepWriteBuf {
			buf = nil // a burst's buffer is not kept for the next batch
		}
		if closed {
			_ = s.conn.Close(s.closeReason.Code, s.closeReason.Msg)
			s.writerEnded()
			return
		}
	}
}

// writerEnded is the last writer's goodbye: no timer schedules work any
// more, and run may finish the session. No writer starts after it: the
// queue is closed and this writer never gave its place back.
func (s *Session) writerEnded() {
	s.stopTimers()
	close(s.writerDone)
}

// keepWriteBuf is the largest write buffer a session keeps between
// batches.
const keepWriteBuf = 16 << 10

// writeChunk is how much of a batch the writer gathers before it writes:
// a larger batch (up to a queue's worth, 1 MiB) goes out in writes of
// whole frames of about this size (at most this plus one frame), each
// under its own deadline, so a device reading slowly but steadily is not
// closed because a whole batch takes it longer than WriteTimeout. Whole
// frames, because a transport that frames messages (the WebSocket) would
// otherwise copy and keep a split frame.
const writeChunk = 64 << 10

// write writes b under the writer's deadline.
func (s *Session) write(b []byte) error {
	select {
	case <-s.closing:
		// closeWith has set the deadline; it is not moved later.
	default:
		_ = s.conn.SetWriteDeadline(time.Now().Add(s.hub.cfg.WriteTimeout))
		select {
		case <-s.closing:
			// closeWith ran meanwhile: put its deadline back.
			_ = s.conn.SetWriteDeadline(s.closeDeadline)
		default:
		}
	}
	_, err := s.conn.Write(b)
	return err
}

// datagramStuck ends a session whose connection took no datagram in
// WriteTimeout, as a write past its deadline does: the device stopped
// acknowledging what it is sent. Aborting the connection ends the send.
func (s *Session) datagramStuck() {
	s.closeWith(closeErr(relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER, "the device's connection took no datagram in %s", s.hub.cfg.WriteTimeout), 0)
	_ = s.conn.Abort(s.closeReason.Code, s.closeReason.Msg)
}

// abort ends a session whose write failed: a write that timed out while
// the session was open means the device stopped reading.
func (s *Session) abort(err error) {
	if isTimeout(err) {
		s.closeWith(closeErr(relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER, "the device did not take a write (at most %d KiB and a frame) in %s", writeChunk>>10, s.hub.cfg.WriteTimeout), 0)
	} else {
		s.closeWith(&CloseError{Code: relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, Msg: "write failed: " + err.Error()}, 0)
	}
	_ = s.conn.Abort(s.closeReason.Code, s.closeReason.Msg)
}

// appendFramed appends a length-prefixed Deliver frame.
func appendFramed(dst, event []byte, id uint64) []byte {
	n := deliverBodySize(len(event), id)
	dst = binary.AppendUvarint(dst, uint64(n))
	return appendDeliverBody(dst, event, id)
}
