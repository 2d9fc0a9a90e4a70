package frame

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

func sample() []*relayv1.Frame {
	return []*relayv1.Frame{
		{Kind: &relayv1.Frame_Hello{Hello: &relayv1.Hello{UserId: "u", DeviceId: "d", ProtocolVersion: 1, ClientTimeMs: 42}}},
		{Kind: &relayv1.Frame_Event{Event: &relayv1.Event{Id: "e1", Targets: []string{"d2"}, Seq: 1, CreatedAtMs: 5, TtlMs: 60000, Type: "note", Payload: []byte("hi")}}},
		{Kind: &relayv1.Frame_Reject{Reject: &relayv1.Reject{EventId: "e1", Code: relayv1.ErrorCode_ERROR_CODE_EXPIRED}}},
		{Kind: &relayv1.Frame_Ping{Ping: &relayv1.Ping{}}},
	}
}

func TestRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf, 0)
	for _, f := range sample() {
		if err := w.Write(f); err != nil {
			t.Fatal(err)
		}
	}
	r := NewReader(&buf, 0)
	for i, want := range sample() {
		var got relayv1.Frame
		if err := r.Read(&got); err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if !proto.Equal(&got, want) {
			t.Fatalf("frame %d: %v, want %v", i, &got, want)
		}
	}
	var f relayv1.Frame
	if err := r.Read(&f); !errors.Is(err, io.EOF) {
		t.Fatalf("at the end: %v", err)
	}
}

// AppendMax refuses a frame above its limit and one protobuf cannot
// encode, leaving dst as it was either way (callers append batches).
func TestAppendMaxLeavesDstOnError(t *testing.T) {
	dst := []byte("already queued")
	big := &relayv1.Frame{Kind: &relayv1.Frame_Event{Event: &relayv1.Event{Payload: make([]byte, 100)}}}
	out, err := AppendMax(dst, big, 50)
	if !errors.Is(err, ErrTooLarge) || string(out) != "already queued" {
		t.Fatalf("too large: %q, %v", out, err)
	}
	bad := &relayv1.Frame{Kind: &relayv1.Frame_Event{Event: &relayv1.Event{Type: "\xff"}}}
	if out, err = AppendMax(dst, bad, DefaultMaxFrame); err == nil || string(out) != "already queued" {
		t.Fatalf("invalid UTF-8: %q, %v", out, err)
	}
	ok := sample()[1]
	if out, err = AppendMax(dst, ok, DefaultMaxFrame); err != nil || !bytes.HasPrefix(out, dst) {
		t.Fatalf("a good frame: %v", err)
	}
	var got relayv1.Frame
	if err := NewReader(bytes.NewReader(out[len(dst):]), 0).Read(&got); err != nil || !proto.Equal(&got, ok) {
		t.Fatalf("decoded %v, %v", &got, err)
	}
}

// SetMax moves the limit from the next frame on; zero or less is the
// default.
func TestReaderSetMax(t *testing.T) {
	big := &relayv1.Frame{Kind: &relayv1.Frame_Event{Event: &relayv1.Event{Payload: bytes.Repeat([]byte("x"), 200)}}}
	one, _ := Append(nil, big)
	r := NewReader(bytes.NewReader(bytes.Repeat(one, 3)), 100)
	var f relayv1.Frame
	r.SetMax(300)
	if err := r.Read(&f); err != nil {
		t.Fatalf("a %d-byte frame under a limit of 300: %v", len(one), err)
	}
	r.SetMax(0) // DefaultMaxFrame
	if err := r.Read(&f); err != nil {
		t.Fatalf("under the default limit: %v", err)
	}
	r.SetMax(100)
	if err := r.Read(&f); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("a %d-byte frame under a limit of 100: %v, want ErrTooLarge", len(one), err)
	}
}

func TestBadInput(t *testing.T) {
	ev := &relayv1.Frame{Kind: &relayv1.Frame_Event{Event: &relayv1.Event{Payload: bytes.Repeat([]byte("x"), 200)}}}
	whole, _ := Append(nil, ev)
	empty, _ := Append(nil, &relayv1.Frame{})
	cases := []struct {
		name string
		in   []byte
		max  int
		want error
	}{
		{"too large", whole, 100, ErrTooLarge},
		{"huge length", binary.AppendUvarint(nil, 1<<40), 0, ErrTooLarge},
		{"overflowing length", bytes.Repeat([]byte{0xff}, 11), 0, ErrMalformed},
		{"no kind", empty, 0, ErrMalformed},
		{"garbage body", append(binary.AppendUvarint(nil, 3), 0xff, 0xff, 0xff), 0, ErrMalformed},
		{"truncated body", whole[:len(whole)-5], 0, io.ErrUnexpectedEOF},
		{"truncated length", []byte{0x80}, 0, io.ErrUnexpectedEOF},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var f relayv1.Frame
			err := NewReader(bytes.NewReader(tc.in), tc.max).Read(&f)
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			var pe *Error
			if errors.As(err, &pe) && !strings.Contains(err.Error(), "ERROR_CODE_") {
				t.Fatalf("error %q does not name its code", err)
			}
		})
	}
	// The writer refuses to send what the peer would refuse.
	if err := NewWriter(io.Discard, 100).Write(ev); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("writer: %v", err)
	}
	// Datagram bodies decode with the same rules.
	var f relayv1.Frame
	if err := Decode(whole[2:], 0, &f); err != nil || f.GetEvent() == nil {
		t.Fatalf("datagram: %v", err)
	}
	if err := Decode(whole[2:], 10, &f); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("large datagram: %v", err)
	}
}

func FuzzRead(f *testing.F) {
	var stream []byte
	for _, fr := range sample() {
		stream, _ = Append(stream, fr)
	}
	f.Add(stream)
	f.Add([]byte{0})
	f.Add(bytes.Repeat([]byte{0xff}, 12))
	f.Fuzz(func(t *testing.T, data []byte) {
		r := NewReader(bytes.NewReader(data), 4096)
		for i := 0; i < 1000; i++ {
			var fr relayv1.Frame
			err := r.Read(&fr)
			if err != nil {
				var pe *Error
				if !errors.As(err, &pe) && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
					t.Fatalf("untyped error %v", err)
				}
				return
			}
			if fr.GetKind() == nil {
				t.Fatal("accepted a frame without a kind")
			}
			// What was accepted re-encodes and decodes to the same frame.
			b, err := Append(nil, &fr)
			if err != nil {
				t.Fatal(err)
			}
			var again relayv1.Frame
			if err := NewReader(bytes.NewReader(b), 1<<20).Read(&again); err != nil || !proto.Equal(&fr, &again) {
				t.Fatalf("re-decode: %v", err)
			}
		}
	})
}

func BenchmarkWriteRead(b *testing.B) {
	ev := &relayv1.Frame{Kind: &relayv1.Frame_Event{Event: &relayv1.Event{Id: "0123456789abcdef", Seq: 7, CreatedAtMs: 1, TtlMs: 1000, Payload: make([]byte, 64)}}}
	var buf bytes.Buffer
	w := NewWriter(&buf, 0)
	r := NewReader(&buf, 0)
	var f relayv1.Frame
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		if err := w.Write(ev); err != nil {
			b.Fatal(err)
		}
		if err := r.Read(&f); err != nil {
			b.Fatal(err)
		}
	}
}

// A frame must arrive whole within the frame timeout of its first byte;
// between frames the idle deadline alone applies; Stop ends a blocked
// read; and a frame that trickles in grows its buffer with what arrived,
// not with what its prefix declared.
func TestReaderDeadlines(t *testing.T) {
	ev := &relayv1.Frame{Kind: &relayv1.Frame_Event{Event: &relayv1.Event{Id: "e", Payload: bytes.Repeat([]byte("x"), 100)}}}
	whole, _ := Append(nil, ev)
	setup := func(t *testing.T) (*Reader, net.Conn) {
		t.Helper()
		a, b := net.Pipe()
		t.Cleanup(func() { a.Close(); b.Close() })
		return NewReaderConfig(a, ReaderConfig{Max: 1 << 20, BufSize: 64, FrameTimeout: 200 * time.Millisecond}), b
	}
	write := func(c net.Conn, p []byte) {
		go func() { _, _ = c.Write(p) }()
	}
	t.Run("half a frame times out", func(t *testing.T) {
		r, peer := setup(t)
		write(peer, whole[:len(whole)/2])
		var f relayv1.Frame
		err := r.Read(&f)
		var fe *Error
		if !errors.As(err, &fe) || fe.Code != relayv1.ErrorCode_ERROR_CODE_TIMEOUT {
			t.Fatalf("got %v, want a TIMEOUT error", err)
		}
	})
	t.Run("a length prefix cut in two times out", func(t *testing.T) {
		r, peer := setup(t)
		write(peer, []byte{0x80})
		var f relayv1.Frame
		if err := r.Read(&f); !errors.Is(err, &Error{Code: relayv1.ErrorCode_ERROR_CODE_TIMEOUT}) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("a frame in pieces within the timeout", func(t *testing.T) {
		r, peer := setup(t)
		go func() {
			for _, part := range [][]byte{whole[:1], whole[1:30], whole[30:]} {
				if _, err := peer.Write(part); err != nil {
					return
				}
			}
		}()
		var f relayv1.Frame
		if err := r.Read(&f); err != nil || !proto.Equal(&f, ev) {
			t.Fatalf("got %v (%v)", &f, err)
		}
		if r.LastSize() != len(whole) {
			t.Fatalf("LastSize %d, want %d", r.LastSize(), len(whole))
		}
	})
	t.Run("a timeout set after the first frame", func(t *testing.T) {
		// As a client does once the Welcome gave the edge's bound: the
		// first frame is read without one, the next times out.
		a, peer := net.Pipe()
		t.Cleanup(func() { a.Close(); peer.Close() })
		r := NewReaderConfig(a, ReaderConfig{Max: 1 << 20, BufSize: 64})
		write(peer, append(slices.Clone(whole), whole[:len(whole)/2]...))
		var f relayv1.Frame
		if err := r.Read(&f); err != nil {
			t.Fatalf("first frame: %v", err)
		}
		r.SetFrameTimeout(200 * time.Millisecond)
		if err := r.Read(&f); !errors.Is(err, &Error{Code: relayv1.ErrorCode_ERROR_CODE_TIMEOUT}) {
			t.Fatalf("second frame: %v, want a TIMEOUT error", err)
		}
	})
	t.Run("idle between frames is not a frame timeout", func(t *testing.T) {
		r, _ := setup(t)
		if err := r.SetIdleDeadline(time.Now().Add(300 * time.Millisecond)); err != nil {
			t.Fatal(err)
		}
		var f relayv1.Frame
		err := r.Read(&f)
		var fe *Error
		var ne net.Error
		if errors.As(err, &fe) || !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("got %v, want the stream's own timeout", err)
		}
	})
	t.Run("stop", func(t *testing.T) {
		r, _ := setup(t)
		done := make(chan error, 1)
		go func() {
			var f relayv1.Frame
			done <- r.Read(&f)
		}()
		r.Stop()
		if err := <-done; !errors.Is(err, ErrStopped) {
			t.Fatalf("got %v", err)
		}
		var f relayv1.Frame
		if err := r.Read(&f); !errors.Is(err, ErrStopped) {
			t.Fatalf("after Stop: %v", err)
		}
	})
	t.Run("a large frame's buffer is not kept", func(t *testing.T) {
		r, peer := setup(t)
		big, _ := Append(nil, &relayv1.Frame{Kind: &relayv1.Frame_Event{Event: &relayv1.Event{Id: "e", Payload: bytes.Repeat([]byte{1}, 20<<10)}}})
		write(peer, big)
		var f relayv1.Frame
		if err := r.Read(&f); err != nil || len(f.GetEvent().GetPayload()) != 20<<10 {
			t.Fatalf("read: %v", err)
		}
		if c := cap(r.buf); c > keepBuf {
			t.Fatalf("the reader keeps a buffer of %d bytes after a 20 KiB frame", c)
		}
	})
	t.Run("the buffer grows with what arrives", func(t *testing.T) {
		r, peer := setup(t)
		// A prefix for 60 KiB, then 100 bytes, then silence.
		write(peer, append(binary.AppendUvarint(nil, 60<<10), bytes.Repeat([]byte{1}, 100)...))
		var f relayv1.Frame
		_ = r.Read(&f)
		// A small buffer is kept for the next frame: one sized from the
		// prefix would be too large to keep, and the reader would hold none.
		if c := cap(r.buf); c == 0 || c > growStep+100 {
			t.Fatalf("a buffer of %d bytes kept for 100 received", c)
		}
	})
}
