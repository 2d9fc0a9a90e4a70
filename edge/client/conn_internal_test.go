package client

import (
	"bytes"
	"slices"
	"testing"

	"github.com/edge-relay/relay/edge/frame"
	"github.com/edge-relay/relay/edge/session"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// writesConn is a session.Conn that keeps each Write apart.
type writesConn struct {
	session.Conn // only Write is used
	writes       [][]byte
}

func (w *writesConn) Write(b []byte) (int, error) {
	w.writes = append(w.writes, bytes.Clone(b))
	return len(b), nil
}

func pingFrame(n uint64) *relayv1.Frame {
	return &relayv1.Frame{Kind: &relayv1.Frame_Ping{Ping: &relayv1.Ping{Nonce: n}}}
}

// encodedPing is pingFrame(n) encoded, as sends queue their frames.
func encodedPing(t *testing.T, n uint64) []byte {
	t.Helper()
	b, err := frame.Append(nil, pingFrame(n))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// frames decodes the frames of one write, in order.
func frames(t *testing.T, b []byte) []uint64 {
	t.Helper()
	r := frame.NewReader(bytes.NewReader(b), 0)
	var got []uint64
	for {
		var f relayv1.Frame
		if err := r.Read(&f); err != nil {
			return got
		}
		got = append(got, f.GetPing().GetNonce())
	}
}

// Frames queued by sends go out in one write, in the order they were
// queued, written by the one send told to flush; a frame written
// directly goes after what was queued before it.
func TestQueuedFramesShareOneWrite(t *testing.T) {
	wc := &writesConn{}
	cn := &conn{c: wc, w: frame.NewWriter(wc, 0)}
	for i := range uint64(3) {
		if flush := cn.queue(encodedPing(t, i+1)); flush != (i == 0) {
			t.Fatalf("queue %d: flush %v", i, flush)
		}
	}
	if len(wc.writes) != 0 {
		t.Fatal("queue wrote")
	}
	if err := cn.flush(true); err != nil {
		t.Fatal(err)
	}
	if len(wc.writes) != 1 || !slices.Equal(frames(t, wc.writes[0]), []uint64{1, 2, 3}) {
		t.Fatalf("writes: %d, first %v", len(wc.writes), frames(t, wc.writes[0]))
	}
	// Flushed: the next queued frame makes its sender the flusher again.
	if !cn.queue(encodedPing(t, 4)) {
		t.Fatal("the first frame queued after a flush must be flushed by its sender")
	}
	if err := cn.write(pingFrame(5)); err != nil {
		t.Fatal(err)
	}
	if len(wc.writes) != 3 || !slices.Equal(frames(t, wc.writes[1]), []uint64{4}) || !slices.Equal(frames(t, wc.writes[2]), []uint64{5}) {
		t.Fatalf("want the queued frame, then the direct one: %d writes", len(wc.writes))
	}
	// The flusher finds nothing left: no empty write.
	if err := cn.flush(false); err != nil || len(wc.writes) != 3 {
		t.Fatalf("empty flush: %v, %d writes", err, len(wc.writes))
	}

}
