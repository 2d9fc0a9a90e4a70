// Package frame reads and writes the device protocol's frames: a uvarint
// length followed by an encoded relay.v1.Frame, the same bytes on QUIC,
// WebTransport and WebSocket. Decoding is strict and bounded: a length
// above the limit is refused before anything is allocated, and every
// failure is an *Error carrying the protocol error code to close the
// session with.
package frame

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"google.golang.org/protobuf/proto"

	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// DefaultMaxFrame is the frame size limit when none is given.
const DefaultMaxFrame = 64 << 10

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

var unmarshal = proto.UnmarshalOptions{DiscardUnknown: false}

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

// Reader reads length-prefixed frames from a stream.
type Reader struct {
	r   *bufio.Reader
	max int
	buf []byte
}

// NewReader returns a reader refusing frames longer than max bytes
// (DefaultMaxFrame when max <= 0).
func NewReader(r io.Reader, max int) *Reader { return NewReaderSize(r, max, 16<<10) }

// NewReaderSize is NewReader with a read buffer of the given size: small
// for the many idle sessions of an edge, larger for bulk readers.
func NewReaderSize(r io.Reader, max, bufSize int) *Reader {
	if max <= 0 {
		max = DefaultMaxFrame
	}
	return &Reader{r: bufio.NewReaderSize(r, bufSize), max: max}
}

// keepBuf is the largest frame buffer a Reader keeps between frames; a
// larger one (for a rare large frame) is dropped after use, so idle
// sessions hold little memory.
const keepBuf = 4 << 10

// Buffered is how many bytes are already read from the stream but not
// yet returned as frames: 0 means the next Read may block.
func (r *Reader) Buffered() int { return r.r.Buffered() }

// Read reads the next frame into f. It returns io.EOF when the stream
// ends cleanly between frames, io.ErrUnexpectedEOF inside one, and an
// *Error for a frame that is too large or malformed.
func (r *Reader) Read(f *relayv1.Frame) error {
	n, err := binary.ReadUvarint(r.r)
	if err != nil {
		if errors.Is(err, io.EOF) {
			return io.EOF
		}
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return io.ErrUnexpectedEOF
		}
		var ce *Error
		if errors.As(err, &ce) {
			return err
		}
		if err.Error() == "binary: varint overflows a 64-bit integer" {
			return malformed("frame length overflows")
		}
		return fmt.Errorf("read frame length: %w", err)
	}
	if n > uint64(r.max) {
		return tooLarge(n, r.max)
	}
	if cap(r.buf) < int(n) {
		r.buf = make([]byte, n)
	}
	body := r.buf[:n]
	if _, err := io.ReadFull(r.r, body); err != nil {
		if errors.Is(err, io.EOF) {
			return io.ErrUnexpectedEOF
		}
		return err
	}
	err = Decode(body, r.max, f)
	if cap(r.buf) > keepBuf {
		r.buf = nil // the decoded frame holds copies, not this buffer
	}
	return err
}

var marshal = proto.MarshalOptions{}

// Append appends f, length-prefixed, to dst.
func Append(dst []byte, f *relayv1.Frame) ([]byte, error) {
	size := marshal.Size(f)
	dst = binary.AppendUvarint(dst, uint64(size))
	out, err := marshal.MarshalAppend(dst, f)
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
	if size := marshal.Size(f); size > w.max {
		return tooLarge(uint64(size), w.max)
	}
	var err error
	w.buf, err = Append(w.buf[:0], f)
	if err != nil {
		return err
	}
	if _, err := w.w.Write(w.buf); err != nil {
		return fmt.Errorf("write frame: %w", err)
	}
	return nil
}
