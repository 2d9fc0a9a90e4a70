package session

import (
	"context"
	"errors"
	"io"
	"net"
	"time"

	"github.com/edge-relay/relay/edge/frame"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// readLoop reads the device's frames until the session ends, and returns
// why it ended (nil when closeWith already has a reason). Every frame is
// paced before it is handled, so a device above its rate finds the edge
// reading more slowly rather than answering faster.
//
// Events and receipts, nearly every frame of a busy session, are decoded
// by the frame package's protobuf-free decoders; an event's payload then
// points into the read buffer until the next read.
func (s *Session) readLoop(ctx context.Context) *CloseError {
	var ids []uint64
	var events frame.EventDecoder
	// One Event for all of them: handleEvent keeps nothing of it (what
	// goes on is its encoding, a copy), and Decode resets it.
	ev := &relayv1.Event{}
	oc, _ := s.conn.(overheadConn)
	for {
		body, err := s.reader.Next()
		if err != nil {
			return readEnd(err)
		}
		size := s.reader.LastSize()
		if oc != nil {
			size += oc.TakeOverhead()
		}
		switch kind, inner, ok := frame.Split(body); {
		case ok && kind == frame.KindEvent:
			if err := events.Decode(inner, ev); err != nil {
				return readEnd(err)
			}
			now, ok := s.pace(true, size)
			if !ok {
				return nil
			}
			ephemeral := ev.GetEphemeral()
			s.handleEvent(ctx, ev, now)
			if ephemeral {
				s.streamEphemeral()
			}
		case ok && kind == frame.KindReceived:
			if ids, err = frame.AppendReceivedIDs(ids[:0], inner); err != nil {
				return readEnd(err)
			}
			now, ok := s.pace(false, size)
			if !ok {
				return nil
			}
			s.handleReceived(ids, now)
			if cap(ids) > keepIDs {
				ids = nil // a burst's receipt does not stay with an idle session
			}
		default:
			// A Frame keeps pointers to its parts and handlers may keep
			// them, so every frame gets a new one.
			f := &relayv1.Frame{}
			if err := frame.Decode(body, s.hub.cfg.Limits.MaxFrameBytes, f); err != nil {
				return readEnd(err)
			}
			now, ok := s.pace(f.GetEvent() != nil, size)
			if !ok {
				return nil
			}
			if !s.handle(ctx, f, now) {
				return nil
			}
		}
	}
}

// overheadConn is a transport that carries bytes beside the session
// stream (a WebSocket's frame headers, pings and pongs): the budgets
// count them with the frame read after them, so that limits count the
// bytes a device actually sends.
type overheadConn interface{ TakeOverhead() int }

// keepIDs is the most delivery ids a reader keeps room for between
// receipts.
const keepIDs = 1024

// readEnd types the end of the stream as a close reason: every way a
// read can fail has one (docs/protocol.md, "Ending a session").
func readEnd(err error) *CloseError {
	switch {
	case errors.Is(err, frame.ErrStopped):
		return nil // closeWith stopped the reader and holds the reason
	case errors.Is(err, io.EOF):
		return &CloseError{Code: relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, Msg: "the device ended the stream"}
	case errors.Is(err, io.ErrUnexpectedEOF):
		return closeErr(relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME, "the stream ended inside a frame")
	case isProtocolError(err):
		return asCloseError(err)
	}
	return &CloseError{Code: relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, Msg: "connection lost: " + err.Error()}
}

// isTimeout reports whether err is a deadline's.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// pace takes a frame of size bytes (an event or not) from the device's
// budgets, waiting while they are empty, and returns the time it is let
// through (one clock read serves the budget and the frame's handling);
// false when the session closed meanwhile. Only the stream reader calls
// it.
func (s *Session) pace(event bool, size int) (time.Time, bool) {
	now := s.hub.cfg.Now()
	wait := s.budget.take(now, event, size)
	if wait <= 0 {
		return now, true
	}
	s.hub.cfg.Metrics.paced.Add(wait.Seconds())
	if s.paceT == nil {
		s.paceT = time.NewTimer(wait)
	} else {
		s.paceT.Reset(wait)
	}
	select {
	case <-s.paceT.C:
		return s.hub.cfg.Now(), true
	case <-s.closing:
		s.paceT.Stop()
		return time.Time{}, false
	}
}

// admitDatagram takes a datagram from the device's budgets without
// waiting (a datagram cannot be held back): false drops it.
func (s *Session) admitDatagram(size int) bool {
	return s.budget.admit(s.hub.cfg.Now(), size)
}

// refused counts a frame refused for the device's own fault (an invalid
// event, a datagram over the rate); a device that keeps sending them is
// closed with RATE_LIMITED. Honest clients get a Reject now and then,
// never a stream of them.
func (s *Session) refused() {
	if !s.refusals.Allow() {
		s.closeWith(closeErr(relayv1.ErrorCode_ERROR_CODE_RATE_LIMITED, "too many refused frames: above %g per second", s.hub.cfg.RefusalsPerSecond), 0)
	}
}

// handle acts on one frame from the device's stream (the datagram reader
// hands its events to handleEvent), let through at now; false ends the
// session.
func (s *Session) handle(ctx context.Context, f *relayv1.Frame, now time.Time) bool {
	switch k := f.GetKind().(type) {
	case *relayv1.Frame_Event:
		s.handleEvent(ctx, k.Event, now)
		if k.Event.GetEphemeral() {
			s.streamEphemeral()
		}
	case *relayv1.Frame_Received:
		s.handleReceived(k.Received.GetDeliveryIds(), now)
	case *relayv1.Frame_Ping:
		s.control(&relayv1.Frame{Kind: &relayv1.Frame_Pong{Pong: &relayv1.Pong{Nonce: k.Ping.GetNonce()}}})
	case *relayv1.Frame_Pong:
	case *relayv1.Frame_Authenticate:
		return s.handleReauth(f)
	case *relayv1.Frame_Close:
		s.closeWith(&CloseError{Code: relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, Msg: "closed by the device"}, 0)
		return false
	default:
		s.closeWith(closeErr(relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME, "unexpected %T from a device", k), 0)
		return false
	}
	return true
}

// streamEphemeral notes an ephemeral event that came on the stream and
// was handled: the first one of a client that defers its datagrams
// starts their reader (after the event, so datagrams that waited cannot
// overtake it), unless the session is closing. Only the stream reader
// calls it.
func (s *Session) streamEphemeral() {
	if s.startDatagrams == nil {
		return
	}
	select {
	case <-s.closing:
	default:
		s.startDatagrams()
	}
	s.startDatagrams = nil
}

// datagramLoop reads the device's datagrams: ephemeral events only,
// within the device's budgets. Anything else, or anything over the rate,
// is dropped and counted as refused.
func (s *Session) datagramLoop(ctx context.Context) {
	m := s.hub.cfg.Metrics
	var events frame.EventDecoder
	for {
		b, err := s.conn.ReceiveDatagram(ctx)
		if err != nil {
			return
		}
		select {
		case <-s.closing:
			// A closed session relays nothing more, as its reader stops at
			// once; this loop's context ends only with the hand-off.
			return
		default:
		}
		if !s.admitDatagram(len(b)) {
			m.droppedRate.Inc()
			s.refused()
			continue
		}
		ev, err := decodeDatagram(&events, b, s.hub.cfg.Limits.MaxFrameBytes)
		if err != nil {
			s.closeWith(asCloseError(err), 0)
			return
		}
		if !ev.GetEphemeral() {
			m.droppedNotEphemeral.Inc()
			s.refused()
			continue
		}
		s.handleEvent(ctx, ev, s.hub.cfg.Now())
	}
}

// decodeDatagram decodes a datagram's frame body: the event it carries,
// or nil when it is another kind of frame.
func decodeDatagram(events *frame.EventDecoder, b []byte, max int) (*relayv1.Event, error) {
	if kind, inner, ok := frame.Split(b); ok && kind == frame.KindEvent && len(b) <= max {
		ev := &relayv1.Event{}
		return ev, events.Decode(inner, ev)
	}
	var f relayv1.Frame
	if err := frame.Decode(b, max, &f); err != nil {
		return nil, err
	}
	return f.GetEvent(), nil
}

// handleReauth checks the answer to a re-authentication challenge.
func (s *Session) handleReauth(f *relayv1.Frame) bool {
	s.authMu.Lock()
	_, err := s.hs.step(f) // refused unless a challenge is pending
	if err != nil {
		s.authMu.Unlock()
		s.closeWith(asCloseError(err), 0)
		return false
	}
	s.authMu.Unlock()
	s.hub.cfg.Metrics.handshakes.WithLabelValues("reauthenticated").Inc()
	s.out.schedule(dueAuthChanged)
	return true
}
