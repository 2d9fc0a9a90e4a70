package server_test

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/internal/relaytest"
)

// h2Frame writes one HTTP/2 frame.
func h2Frame(t *testing.T, w io.Writer, typ, flags byte, stream uint32, payload []byte) {
	t.Helper()
	var h [9]byte
	h[0], h[1], h[2] = byte(len(payload)>>16), byte(len(payload)>>8), byte(len(payload))
	h[3], h[4] = typ, flags
	binary.BigEndian.PutUint32(h[5:], stream)
	if _, err := w.Write(append(h[:], payload...)); err != nil {
		t.Fatal(err)
	}
}

// An HTTP/2 client that gives the edge no flow-control window can open
// streams whose answers never get out. Each held a handler goroutine
// and its buffers for as long as the connection lived (the idle timeout
// does not run while streams are open); HTTPWriteTimeout now ends each
// such stream (RST_STREAM) and frees its handler.
func TestHTTPSFreesStreamsAClientDoesNotRead(t *testing.T) {
	s := startLoneEdge(t, server.Config{EdgeID: "stalled", HTTPWriteTimeout: 300 * time.Millisecond})
	c, err := tls.Dial("tcp", strings.TrimPrefix(s.HTTPSURL(), "https://"), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	// SETTINGS: SETTINGS_INITIAL_WINDOW_SIZE (4) = 0.
	h2Frame(t, c, 4, 0, 0, []byte{0, 4, 0, 0, 0, 0})
	// GET /relay.js (91 KB, more than the handler buffers) on 20 streams.
	// HPACK: :method GET, :scheme https (static 2, 7), then :path and
	// :authority as literals without indexing on static names 4 and 1.
	block := append([]byte{0x82, 0x87, 0x04, byte(len("/relay.js"))}, "/relay.js"...)
	block = append(block, 0x01, 1, 'x')
	const streams = 20
	open := map[uint32]bool{}
	for i := range uint32(streams) {
		id := 2*i + 1
		h2Frame(t, c, 1, 0x5, id, block) // HEADERS, END_STREAM|END_HEADERS
		open[id] = true
	}
	// Read the server's frames until every stream was reset; a read that
	// times out means streams still held.
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	var h [9]byte
	for len(open) > 0 {
		if _, err := io.ReadFull(c, h[:]); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("%d of %d streams the client gave no window to are still open after 30 s", len(open), streams)
			}
			t.Fatalf("reading the server's frames: %v (%d streams open)", err, len(open))
		}
		n := int(h[0])<<16 | int(h[1])<<8 | int(h[2])
		if _, err := io.CopyN(io.Discard, c, int64(n)); err != nil {
			t.Fatal(err)
		}
		switch typ, id := h[3], binary.BigEndian.Uint32(h[5:])&0x7fffffff; typ {
		case 3: // RST_STREAM
			delete(open, id)
		case 4: // SETTINGS
			if h[4]&1 == 0 {
				h2Frame(t, c, 4, 1, 0, nil) // ack
			}
		case 7: // GOAWAY
			t.Fatalf("the server ended the connection (GOAWAY) with %d streams open", len(open))
		}
	}
}

// The HTTPS port's write timeout is the connection's write deadline over
// HTTP/1.1 (from each request's headers, and for the TLS handshake); a
// WebSocket session, whose upgrade hijacks the connection, relays past
// it (net/http lifts the deadline when it hands the connection over).
func TestWebSocketSessionOutlivesTheHTTPWriteTimeout(t *testing.T) {
	const timeout = 500 * time.Millisecond
	r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
		cfg.HTTPWriteTimeout = timeout
	}})
	u := r.User("ws-write")
	a, b := r.Device(u, "a"), r.Device(u, "b")
	ca := r.Dial(0, a, client.QUIC)
	dialed := time.Now()
	cb := r.Dial(0, b, client.WebSocket)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Events to the WebSocket device until three timeouts have passed
	// since it dialed: each one written to it by the edge.
	for i := 0; time.Since(dialed) < 3*timeout; i++ {
		if err := ca.Send(ctx, client.Message{Targets: []string{b.ID}, Payload: []byte{byte(i)}}); err != nil {
			t.Fatalf("send %d to the WebSocket device, %s after it dialed: %v", i, time.Since(dialed), err)
		}
		select {
		case ev := <-cb.Events():
			if len(ev.Payload) != 1 || ev.Payload[0] != byte(i) {
				t.Fatalf("event %d: got payload %v", i, ev.Payload)
			}
		case <-ctx.Done():
			t.Fatalf("event %d never reached the WebSocket device, %s after it dialed: %v", i, time.Since(dialed), cb.Err())
		}
	}
}
