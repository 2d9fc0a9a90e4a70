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

// writeLoop owns writes to the connection once the session is open: it
// drains the queue in batches (one write per batch), refreshes the resume
// ticket, runs re-authentication at the maximum age, and finally sends
// the Close frame and closes the connection. Every write has a deadline:
// WriteTimeout while the session runs (a device that takes nothing for
// that long is a SLOW_CONSUMER), closeDeadline once it is closing.
func (s *Session) writeLoop() {
	cfg := &s.hub.cfg
	var buf, dg []byte
	ticketT := time.NewTimer(s.nextTicketRefresh(cfg.Now()))
	defer ticketT.Stop()
	ageT := time.NewTimer(s.untilMaxAge(cfg.Now()))
	defer ageT.Stop()
	reauthT := time.NewTimer(time.Hour)
	reauthT.Stop()
	defer reauthT.Stop()
	m := cfg.Metrics
	for {
		select {
		case <-s.out.wake:
		case <-ticketT.C:
			now := cfg.Now()
			s.sendTicket(now)
			ticketT.Reset(s.nextTicketRefresh(now))
			continue
		case <-ageT.C:
			s.authMu.Lock()
			ch, err := s.hs.reauth()
			s.authMu.Unlock()
			if err != nil {
				s.closeWith(closeErr(relayv1.ErrorCode_ERROR_CODE_INTERNAL, "re-authentication: %v", err), 0)
			} else {
				s.control(&relayv1.Frame{Kind: &relayv1.Frame_Challenge{Challenge: ch}})
				reauthT.Reset(cfg.HandshakeTimeout)
			}
			continue
		case <-reauthT.C:
			s.authMu.Lock()
			pending := !s.hs.done()
			s.authMu.Unlock()
			if pending {
				s.closeWith(closeErr(relayv1.ErrorCode_ERROR_CODE_SESSION_EXPIRED, "the session reached its maximum age and did not authenticate again"), 0)
			}
			continue
		case <-s.authChanged:
			now := cfg.Now()
			reauthT.Stop()
			ageT.Reset(s.untilMaxAge(now))
			s.sendTicket(now)
			ticketT.Reset(s.nextTicketRefresh(now))
			continue
		}
		batch, closed, overflow := s.out.take()
		if overflow {
			s.closeWith(closeErr(relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER, "the device stopped reading"), 0)
			closed = true
		}
		buf = buf[:0]
		var durable, ephemeral int
		for i := range batch {
			it := &batch[i]
			if it.frame != nil {
				buf, _ = frame.Append(buf, it.frame)
				it.frame = nil
				continue
			}
			if it.ack != "" {
				buf = appendAckFrame(buf, it.ack)
				it.ack = ""
				continue
			}
			if it.delivery != 0 {
				durable++
			} else {
				ephemeral++
			}
			if it.datagram {
				dg = appendDeliverBody(dg[:0], it.event, 0)
				if err := s.conn.SendDatagram(dg); err == nil {
					it.event = nil
					continue
				}
			}
			buf = appendFramed(buf, it.event, it.delivery)
			it.event = nil
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
				return
			}
		}
		if cap(buf) > keepWriteBuf {
			buf = nil // a burst's buffer is not kept by an idle session
		}
		if closed {
			_ = s.conn.Close(s.closeReason.Code, s.closeReason.Msg)
			return
		}
	}
}

// keepWriteBuf is the largest write buffer a session keeps between
// batches.
const keepWriteBuf = 16 << 10

// write writes one batch under the writer's deadline.
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

// abort ends a session whose write failed: a write that timed out while
// the session was open means the device stopped reading.
func (s *Session) abort(err error) {
	if isTimeout(err) {
		s.closeWith(closeErr(relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER, "the device took nothing for %s", s.hub.cfg.WriteTimeout), 0)
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
