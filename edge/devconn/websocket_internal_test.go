package devconn

import (
	"bytes"
	"context"
	"encoding/binary"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// A WebSocket session reads each message as its length prefix and body,
// in as many reads as its reader takes, and keeps nothing of a message
// once it was read: a session that once received a large frame does not
// hold a buffer of that size for the rest of its life.
func TestWebSocketReadKeepsNoMessage(t *testing.T) {
	conns := make(chan *wsConn, 1)
	done := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := websocket.Accept(w, r, nil)
		if err != nil {
			t.Error(err)
			return
		}
		conns <- NewWebSocketConn(ws, nil, nil, time.Minute, 1<<20).(*wsConn)
		<-done
	}))
	defer srv.Close()
	defer close(done)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cl, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.CloseNow()
	w := <-conns
	defer func() { _ = w.Abort(relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED, "") }()

	for _, size := range []int{64 << 10, 0, 3} {
		msg := bytes.Repeat([]byte{byte(size)}, size)
		if err := cl.Write(ctx, websocket.MessageBinary, msg); err != nil {
			t.Fatal(err)
		}
		want := append(binary.AppendUvarint(nil, uint64(size)), msg...)
		got := make([]byte, len(want))
		// Small reads: the prefix and the body come in pieces.
		for off := 0; off < len(got); {
			n, err := w.Read(got[off:min(len(got), off+1000)])
			if err != nil {
				t.Fatalf("read: %v", err)
			}
			off += n
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("message of %d bytes read back wrong", size)
		}
		if w.body != nil || w.hoff != w.hlen {
			t.Fatalf("after a message of %d bytes was read, the conn still holds %d bytes of it (cap %d)", size, len(w.body), cap(w.body))
		}
	}
}
