// Package frame reads and writes the device protocol's frames: a uvarint
// length followed by an encoded relay.v1.Frame, the same bytes on QUIC,
// WebTransport and WebSocket. Decoding is strict and bounded: a length
// above the limit is refused before anything is allocated, and every
// failure is an *Error carrying the protocol error code to close the
// session with.
package frame

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"slices"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/proto"

	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// DefaultMaxFrame is the frame size limit when none is given.
const DefaultMaxFrame = 64 << 10

// MaxFrameLimit is the largest frame limit an edge may announce: an edge
// refuses to start with a larger one, and clients take no larger one
// from a Welcome, so an edge (faulty or not theirs) cannot make them hold
// frames of any size.
const MaxFrameLimit = 16 << 20

// DeliverSlack is how much longer than the frame limit it announces a
// frame from an edge may be: a Deliver wraps a relayed event, which the
// edge has given its sender's ids. Clients read frames up to the limit
// plus this; an edge sends no longer frame, and does not deliver an event
// (relayed from an edge with a larger limit) that would make one.
const DeliverSlack = 1 << 10

// Error is a protocol violation, with the code the peer is told.
type Error struct {
	Code relayv1.ErrorCode
	Msg  string
}

func (e *Error) Error() string {
	return fmt.Sprintf("%s: %s", e.Code, e.Msg)
}

// Is makes errors.Is(err, &Error{Code: c}) match any Error with code c.
func (e *Error) Is(target error) bool {
	var t *Error
	return errors.As(target, &t) && t.Code == e.Code && t.Msg == ""
}

// Errors a caller may compare with errors.Is.
var (
	ErrTooLarge  = &Error{Code: relayv1.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE}
	ErrMalformed = &Error{Code: relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME}
)

func tooLarge(n uint64, max int) error {
	return &Error{Code: relayv1.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE, Msg: fmt.Sprintf("frame of %d bytes, at most %d allowed", n, max)}
}

func malformed(format string, args ...any) error {
	return &Error{Code: relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME, Msg: fmt.Sprintf(format, args...)}
}

// unmarshal drops fields this version does not know: what a device sends
// beyond the schema is never kept, counted, stored or relayed
// (docs/protocol.md, "Unknown fields").
var unmarshal = proto.UnmarshalOptions{DiscardUnknown: true}

// Decode decodes one frame body (without the length prefix), as a
// datagram carries it. A body that decodes but sets no kind is malformed.
func Decode(body []byte, max int, f *relayv1.Frame) error {
	if max <= 0 {
		max = DefaultMaxFrame
	}
	if len(body) > max {
		return tooLarge(uint64(len(body)), max)
	}
	f.Reset()
	if err := unmarshal.Unmarshal(body, f); err != nil {
		return malformed("undecodable frame: %v", err)
	}
	if f.GetKind() == nil {
		return malformed("frame has no kind")
	}
	return nil
}

// Deadliner is a stream whose blocked reads a deadline can end, as a
// net.Conn's or a QUIC stream's. A reader over one bounds each frame.
type Deadliner interface {
	SetReadDeadline(t time.Time) error
}

// ErrStopped is returned by Read once Stop was called.
var ErrStopped = errors.New("frame reader stopped")

// ReaderConfig configures a Reader.
type ReaderConfig struct {
	// Max is the largest frame accepted, in bytes [DefaultMaxFrame].
	Max int
	// BufSize is the read buffer: small for the many idle sessions of an
	// edge, larger for bulk readers [16 KiB].
	BufSize int
	// Pool, if set, lends the read buffer (of the pool's size; BufSize is
	// then unused) only while bytes are buffered: a reader waiting for its
	// next frame holds none.
	Pool *BufferPool
	// FrameTimeout bounds the time from a frame's first byte to its last,
	// when the stream is a Deadliner; 0 means no bound. Between frames
	// only the idle deadline (SetIdleDeadline) applies.
	FrameTimeout time.Duration
}

// Reader reads length-prefixed frames from a stream.
//
// It never sizes a buffer from a length prefix alone: a frame that is
// not in the read buffer whole is collected in a buffer that grows with
// the bytes that actually arrive, and a frame must arrive whole within
// FrameTimeout of its first byte.
type Reader struct {
	r        *bufReader
	src      Deadliner // the stream's deadlines, if it has them
	dl       Deadliner // src while a FrameTimeout is set, else nil
	max      int
	timeout  time.Duration
	idle     time.Time // the deadline between frames (zero: none)
	armed    bool      // a frame deadline is set on the stream
	stopped  atomic.Bool
	buf      []byte
	lastSize int
}

// NewReader returns a reader refusing frames longer than max bytes
// (DefaultMaxFrame when max <= 0).
func NewReader(r io.Reader, max int) *Reader { return NewReaderSize(r, max, 16<<10) }

// NewReaderSize is NewReader with a read buffer of the given size.
func NewReaderSize(r io.Reader, max, bufSize int) *Reader {
	return NewReaderConfig(r, ReaderConfig{Max: max, BufSize: bufSize})
}

// NewReaderConfig returns a reader configured by cfg.
func NewReaderConfig(r io.Reader, cfg ReaderConfig) *Reader {
	if cfg.Max <= 0 {
		cfg.Max = DefaultMaxFrame
	}
	if cfg.BufSize <= 0 {
		cfg.BufSize = 16 << 10
	}
	rd := &Reader{r: newBufReader(r, cfg.BufSize, cfg.Pool), max: cfg.Max}
	rd.src, _ = r.(Deadliner)
	rd.SetFrameTimeout(cfg.FrameTimeout)
	return rd
}

// SetFrameTimeout changes FrameTimeout from the next frame on (0: no
// bound): a client learns the bound its edge holds frames to only from
// the handshake's last frame. Not safe to call while a read is in
// progress.
func (r *Reader) SetFrameTimeout(d time.Duration) {
	if r.src == nil || d <= 0 {
		r.dl, r.timeout = nil, 0
		return
	}
	r.dl, r.timeout = r.src, d
}

// SetMax changes the longest frame the reader accepts, from the next
// frame on (DefaultMaxFrame when max <= 0): a client learns its edge's
// limits only from the handshake's last frame. Not safe to call while a
// read is in progress.
func (r *Reader) SetMax(max int) {
	if max <= 0 {
		max = DefaultMaxFrame
	}
	r.max = max
}

// Max returns the longest frame the reader accepts.
func (r *Reader) Max() int { return r.max }

// keepBuf is the largest frame buffer a Reader keeps between frames; a
// larger one (for a rare large frame) is dropped after use, so idle
// sessions hold little memory.
const keepBuf = 4 << 10

// growStep is how much a frame buffer grows by at least, and at most
// beyond what has arrived.
const growStep = 4 << 10

// Buffered is how many bytes are already read from the stream but not
// yet returned as frames: 0 means the next Read may block.
func (r *Reader) Buffered() int { return r.r.Buffered() }

// LastSize is the size on the wire of the frame the last successful
// Read returned, length prefix included.
func (r *Reader) LastSize() int { return r.lastSize }

// SetIdleDeadline sets the deadline for reads between frames (a
// handshake's, say); the zero time removes it. Not safe to call
// concurrently with Read.
func (r *Reader) SetIdleDeadline(t time.Time) error {
	r.idle = t
	if r.dl == nil {
		return nil
	}
	return r.setDeadline(t)
}

// Stop makes a blocked Read, and every later one, return ErrStopped. It
// is safe to call from any goroutine, and does nothing for a stream
// without deadlines (close the stream instead).
func (r *Reader) Stop() {
	r.stopped.Store(true)
	if r.dl != nil {
		_ = r.dl.SetReadDeadline(time.Unix(1, 0))
	}
}

// Release ends the reader's use: it gives a lent read buffer back to its
// pool, drops what was buffered and the reader's own buffers, and makes
// every later read return ErrStopped. Call it from the reading goroutine
// once it stopped reading, when nothing still points into the last frame
// read: a session that ended mid-frame, or with frames unread, then keeps
// no buffer while something else still refers to it.
func (r *Reader) Release() {
	r.stopped.Store(true)
	r.r.release()
	r.buf = nil
}

// setDeadline sets the stream's read deadline unless the reader was
// stopped. The deadline is set before the flag is checked and Stop sets
// the flag before its deadline, so one of the two always wins over a
// concurrent Stop.
func (r *Reader) setDeadline(t time.Time) error {
	err := r.dl.SetReadDeadline(t)
	if r.stopped.Load() {
		_ = r.dl.SetReadDeadline(time.Unix(1, 0))
	}
	return err
}

// arm bounds the rest of the current frame by FrameTimeout, once per
// frame, when reading it may block.
func (r *Reader) arm() {
	if r.dl == nil || r.armed {
		return
	}
	r.armed = true
	d := time.Now().Add(r.timeout)
	if !r.idle.IsZero() && r.idle.Before(d) {
		d = r.idle
	}
	_ = r.setDeadline(d)
}

// disarm restores the idle deadline after a frame.
func (r *Reader) disarm() {
	if r.armed {
		r.armed = false
		_ = r.setDeadline(r.idle)
	}
}

// Read reads the next frame into f. It returns io.EOF when the stream
// ends cleanly between frames, io.ErrUnexpectedEOF inside one, an *Error
// for a frame that is too large, malformed or not completed within
// FrameTimeout (ERROR_CODE_TIMEOUT), ErrStopped after Stop, and the
// stream's own error otherwise (a timeout of the idle deadline among
// them).
func (r *Reader) Read(f *relayv1.Frame) error {
	body, err := r.Next()
	if err != nil {
		return err
	}
	return Decode(body, r.max, f)
}

// Next reads the next frame's body, undecoded: for a caller that decodes
// some kinds itself (Split). The body is valid until the next call of
// Next or Read. Its errors are Read's, but for the decoding ones.
func (r *Reader) Next() ([]byte, error) {
	if r.stopped.Load() {
		return nil, ErrStopped
	}
	defer r.disarm()
	r.r.idle()
	n, prefix, err := r.readLength()
	if err != nil {
		return nil, err
	}
	if n > uint64(r.max) {
		return nil, tooLarge(n, r.max)
	}
	size := int(n)
	if r.r.Buffered() < size && size <= r.r.Size() {
		// It fits the read buffer: read the rest into it.
		r.arm()
		if err := r.r.fillTo(size); err != nil {
			return nil, r.streamErr(err, true)
		}
	}
	if r.r.Buffered() >= size {
		// The common case: the whole frame is in the read buffer and is
		// returned where it lies; nothing overwrites it, or gives the
		// buffer back, before the next read.
		body := r.r.Peek(size)
		r.r.Discard(size)
		r.lastSize = prefix + size
		return body, nil
	}
	r.arm()
	body, err := r.collect(size)
	if err != nil {
		return nil, err
	}
	r.lastSize = prefix + size
	return body, nil
}

// readLength reads the uvarint length prefix and reports its size.
func (r *Reader) readLength() (uint64, int, error) {
	var x uint64
	var s uint
	for i := 0; ; i++ {
		if i > 0 && r.r.Buffered() == 0 {
			r.arm()
		}
		b, err := r.r.ReadByte()
		if err != nil {
			return 0, 0, r.streamErr(err, i > 0)
		}
		if i == binary.MaxVarintLen64-1 && b > 1 {
			return 0, 0, malformed("frame length overflows")
		}
		if b < 0x80 {
			return x | uint64(b)<<s, i + 1, nil
		}
		x |= uint64(b&0x7f) << s
		s += 7
	}
}

// collect reads a frame body of size bytes, larger than the read
// buffer, growing its own buffer with what arrives. A buffer larger than
// keepBuf (for a rare large frame), or any for a reader that lends its
// read buffer, is not kept by the reader: it is the caller's until the
// next frame, then garbage, so idle sessions hold little.
func (r *Reader) collect(size int) ([]byte, error) {
	buf := r.buf[:0]
	defer func() {
		if cap(buf) <= keepBuf && r.r.pool == nil {
			r.buf = buf[:0]
		}
	}()
	for len(buf) < size {
		if cap(buf) == len(buf) {
			want := min(size, max(2*cap(buf), len(buf)+growStep))
			buf = slices.Grow(buf, want-len(buf))
		}
		k, err := r.r.Read(buf[len(buf):min(cap(buf), size)])
		buf = buf[:len(buf)+k]
		if err != nil && len(buf) < size {
			return nil, r.streamErr(err, true)
		}
	}
	return buf, nil
}

// streamErr types an error of the stream; inFrame says whether part of
// a frame had arrived.
func (r *Reader) streamErr(err error, inFrame bool) error {
	var fe *Error
	switch {
	case r.stopped.Load():
		return ErrStopped
	case errors.As(err, &fe):
		return err
	case errors.Is(err, io.EOF):
		if inFrame {
			return io.ErrUnexpectedEOF
		}
		return io.EOF
	case errors.Is(err, io.ErrUnexpectedEOF):
		return io.ErrUnexpectedEOF
	}
	var ne net.Error
	if inFrame && r.armed && errors.As(err, &ne) && ne.Timeout() && (r.idle.IsZero() || time.Now().Before(r.idle)) {
		return &Error{Code: relayv1.ErrorCode_ERROR_CODE_TIMEOUT, Msg: fmt.Sprintf("frame not completed within %s of its first byte", r.timeout)}
	}
	return fmt.Errorf("read frame: %w", err)
}

var (
	marshal = proto.MarshalOptions{}
	// marshalSized marshals a frame whose size was just computed, without
	// computing it again.
	marshalSized = proto.MarshalOptions{UseCachedSize: true}
)

// Append appends f, length-prefixed, to dst.
func Append(dst []byte, f *relayv1.Frame) ([]byte, error) {
	return AppendMax(dst, f, math.MaxInt)
}

// AppendMax appends f, length-prefixed, to dst, refusing (with
// ERROR_CODE_FRAME_TOO_LARGE) a frame longer than max bytes. On error dst
// is returned unchanged.
func AppendMax(dst []byte, f *relayv1.Frame, max int) ([]byte, error) {
	size := marshal.Size(f)
	if size > max {
		return dst, tooLarge(uint64(size), max)
	}
	out, err := marshalSized.MarshalAppend(binary.AppendUvarint(dst, uint64(size)), f)
	if err != nil {
		return dst, fmt.Errorf("encode frame: %w", err)
	}
	return out, nil
}

// Writer writes length-prefixed frames to a stream. It is not safe for
// concurrent use: a session has one writer goroutine.
type Writer struct {
	w   io.Writer
	max int
	buf []byte
}

// NewWriter returns a writer refusing to send frames longer than max.
func NewWriter(w io.Writer, max int) *Writer {
	if max <= 0 {
		max = DefaultMaxFrame
	}
	return &Writer{w: w, max: max}
}

// Write encodes and writes one frame.
func (w *Writer) Write(f *relayv1.Frame) error {
	var err error
	w.buf, err = AppendMax(w.buf[:0], f, w.max)
	if err != nil {
		return err
	}
	if _, err := w.w.Write(w.buf); err != nil {
		return fmt.Errorf("write frame: %w", err)
	}
	return nil
}
