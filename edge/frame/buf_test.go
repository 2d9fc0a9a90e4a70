package frame

import (
	"bytes"
	"errors"
	"io"
	"slices"
	"testing"

	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// chunks is a source that gives at most max bytes a read, and runs hook
// before each read.
type chunks struct {
	data []byte
	max  int
	hook func(p []byte)
}

func (c *chunks) Read(p []byte) (int, error) {
	if c.hook != nil {
		c.hook(p)
	}
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), c.max)], c.data)
	c.data = c.data[n:]
	return n, nil
}

// readAll reads frame bodies until an error, copying each at once (a
// body is valid only until the next call).
func readAll(r *Reader) ([][]byte, error) {
	var out [][]byte
	for {
		b, err := r.Next()
		if err != nil {
			return out, err
		}
		out = append(out, bytes.Clone(b))
	}
}

// sameEnd reports whether two readers ended the same way.
func sameEnd(a, b error) bool {
	var ea, eb *Error
	if errors.As(a, &ea) || errors.As(b, &eb) {
		return errors.As(a, &ea) && errors.As(b, &eb) && ea.Code == eb.Code
	}
	return errors.Is(a, io.EOF) == errors.Is(b, io.EOF) && errors.Is(a, io.ErrUnexpectedEOF) == errors.Is(b, io.ErrUnexpectedEOF)
}

// FuzzPooledReader reads the same bytes, in reads of any size, through a
// reader with its own buffer and two readers lending from one small pool
// in turn: the same frames, and the same end.
func FuzzPooledReader(f *testing.F) {
	var stream []byte
	for _, fr := range sample() {
		stream, _ = Append(stream, fr)
	}
	big, _ := Append(nil, &relayv1.Frame{Kind: &relayv1.Frame_Event{Event: &relayv1.Event{Id: "e", Payload: bytes.Repeat([]byte("p"), 600)}}})
	f.Add(stream, uint8(1))
	f.Add(stream, uint8(7))
	f.Add(append(slices.Clone(big), stream...), uint8(200))
	f.Add(stream[:len(stream)-1], uint8(64))
	f.Add([]byte{0x80}, uint8(1))
	f.Fuzz(func(t *testing.T, data []byte, chunk uint8) {
		max := int(chunk) + 1
		want, wantErr := readAll(NewReaderConfig(&chunks{data: data, max: len(data) + 1}, ReaderConfig{Max: 4096}))
		pool := NewBufferPool(waitBytes) // the smallest pool
		a := NewReaderConfig(&chunks{data: data, max: max}, ReaderConfig{Max: 4096, Pool: pool})
		b := NewReaderConfig(&chunks{data: data, max: max}, ReaderConfig{Max: 4096, Pool: pool})
		// An own buffer as small, read in the same pieces.
		own, ownErr := readAll(NewReaderConfig(&chunks{data: data, max: max}, ReaderConfig{Max: 4096, BufSize: 64}))
		if !slices.EqualFunc(own, want, bytes.Equal) || !sameEnd(ownErr, wantErr) {
			t.Fatalf("small own buffer: %d frames, %v; large: %d frames, %v", len(own), ownErr, len(want), wantErr)
		}
		var gotA, gotB [][]byte
		var errA, errB error
		for errA == nil || errB == nil {
			if errA == nil {
				var body []byte
				if body, errA = a.Next(); errA == nil {
					gotA = append(gotA, bytes.Clone(body))
				}
			}
			if errB == nil {
				var body []byte
				if body, errB = b.Next(); errB == nil {
					gotB = append(gotB, bytes.Clone(body))
				}
			}
		}
		for _, got := range []struct {
			frames [][]byte
			err    error
		}{{gotA, errA}, {gotB, errB}} {
			if !slices.EqualFunc(got.frames, want, bytes.Equal) || !sameEnd(got.err, wantErr) {
				t.Fatalf("pooled reader: %d frames, %v; own buffer: %d frames, %v", len(got.frames), got.err, len(want), wantErr)
			}
		}
	})
}

// A lending reader waits for the next frame holding no buffer: every read
// it makes at a frame boundary with nothing buffered is into its small
// array, the buffer given back; reads inside a frame that fits use the
// borrowed buffer, and no frame buffer of its own is kept.
func TestPooledReaderIdlesWithoutABuffer(t *testing.T) {
	var stream []byte
	for _, size := range []int{100, 100, 100, 600} { // the last larger than the pool's buffers
		stream, _ = Append(stream, &relayv1.Frame{Kind: &relayv1.Frame_Event{Event: &relayv1.Event{Id: "e", Payload: bytes.Repeat([]byte("p"), size)}}})
	}
	var r *Reader
	src := &chunks{data: stream, max: 50}
	var idleReads, bufferReads int
	src.hook = func(p []byte) {
		if r.r.buf == nil {
			if len(p) != waitBytes {
				t.Errorf("a read of %d bytes while holding no buffer", len(p))
			}
			idleReads++
		} else {
			bufferReads++
		}
	}
	r = NewReaderConfig(src, ReaderConfig{Max: 4096, Pool: NewBufferPool(256)})
	frames, err := readAll(r)
	if len(frames) != 4 || !errors.Is(err, io.EOF) {
		t.Fatalf("%d frames, %v", len(frames), err)
	}
	// Each frame (about 110 bytes in reads of 50) begins at a boundary
	// with nothing buffered at least once, and the end of the stream is
	// one more such wait.
	if idleReads < 2 || bufferReads == 0 {
		t.Fatalf("%d reads without a buffer, %d with one", idleReads, bufferReads)
	}
	if r.r.buf != nil || r.buf != nil {
		t.Fatal("the reader kept a buffer after the stream ended")
	}
}

// An event frame that arrives whole at a frame boundary is read with one
// read of the source, into the reader's waiting array, not a first read
// there and a second into the borrowed buffer.
func TestPooledReaderReadsAWholeEventOnce(t *testing.T) {
	one, _ := Append(nil, &relayv1.Frame{Kind: &relayv1.Frame_Event{Event: &relayv1.Event{
		Id: "0123456789abcdef01234567", Targets: []string{"0123456789abcdef0123456789abcdef"}, Seq: 1 << 40,
		CreatedAtMs: 1 << 40, TtlMs: 60000, Payload: bytes.Repeat([]byte("p"), 64)}}})
	stream := slices.Concat(one, one, one)
	reads := 0
	src := &chunks{data: stream, max: len(one), hook: func([]byte) { reads++ }}
	frames, err := readAll(NewReaderConfig(src, ReaderConfig{Max: 4096, Pool: NewBufferPool(2 << 10)}))
	if len(frames) != 3 || !errors.Is(err, io.EOF) {
		t.Fatalf("%d frames, %v", len(frames), err)
	}
	if reads != 4 { // one per frame, one for the end
		t.Fatalf("%d reads of the source for three %d-byte frames, want 4", reads, len(one))
	}
}

// A stream that ends inside a frame leaves the reader holding a lent
// buffer (the frame's first bytes are in it); Release gives it back, and
// the reader reads nothing more.
func TestReleaseGivesTheBufferBack(t *testing.T) {
	whole, _ := Append(nil, &relayv1.Frame{Kind: &relayv1.Frame_Event{Event: &relayv1.Event{Id: "e", Payload: bytes.Repeat([]byte("p"), 100)}}})
	stream := slices.Concat(whole, whole[:len(whole)/2])
	pool := NewBufferPool(2 << 10)
	pool.CountLoans()
	r := NewReaderConfig(&chunks{data: stream, max: len(whole)}, ReaderConfig{Max: 4096, Pool: pool})
	frames, err := readAll(r)
	if len(frames) != 1 || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("%d frames, %v", len(frames), err)
	}
	if pool.Lent() != 1 {
		t.Fatalf("%d buffers lent after a stream that ended inside a frame, want 1", pool.Lent())
	}
	r.Release()
	if pool.Lent() != 0 || r.r.buf != nil {
		t.Fatalf("after Release: %d buffers lent, buffer kept: %v", pool.Lent(), r.r.buf != nil)
	}
	if _, err := r.Next(); !errors.Is(err, ErrStopped) {
		t.Fatalf("a read after Release: %v, want ErrStopped", err)
	}

	// A reader with its own buffers drops them, the one that collected
	// a frame larger than the read buffer among them.
	big, _ := Append(nil, &relayv1.Frame{Kind: &relayv1.Frame_Event{Event: &relayv1.Event{Id: "e", Payload: bytes.Repeat([]byte("p"), 600)}}})
	own := NewReaderConfig(&chunks{data: big, max: 100}, ReaderConfig{Max: 4096, BufSize: 256})
	if frames, err := readAll(own); len(frames) != 1 || !errors.Is(err, io.EOF) {
		t.Fatalf("%d frames, %v", len(frames), err)
	}
	if own.buf == nil || own.r.buf == nil {
		t.Fatal("the reader kept no buffers to drop: the test reads nothing")
	}
	own.Release()
	if own.buf != nil || own.r.buf != nil {
		t.Fatal("Release kept the reader's own buffers")
	}
}
