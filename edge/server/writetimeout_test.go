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
	"github.com/edge-relay/relay/internal/h2probe"
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

// h2WithoutWindow opens an HTTP/2 connection to s's HTTPS port that gives
// the edge no flow-control window (SETTINGS_INITIAL_WINDOW_SIZE 0), and
// returns it with the header block of GET /relay.js (91 KB, more than a
// handler buffers): each such request holds its handler. HPACK: :method
// GET, :scheme https (static 2, 7), then :path and :authority as
// literals without indexing on static names 4 and 1.
func h2WithoutWindow(t *testing.T, s *server.Server) (*tls.Conn, []byte) {
	t.Helper()
	c, err := tls.Dial("tcp", strings.TrimPrefix(s.HTTPSURL(), "https://"), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	if _, err := c.Write([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	h2Frame(t, c, 4, 0, 0, []byte{0, 4, 0, 0, 0, 0})
	block := append([]byte{0x82, 0x87, 0x04, byte(len("/relay.js"))}, "/relay.js"...)
	return c, append(block, 0x01, 1, 'x')
}

// An HTTP/2 client that gives the edge no flow-control window can open
// streams whose answers never get out. Each held a handler goroutine
// and its buffers for as long as the connection lived (the idle timeout
// does not run while streams are open); HTTPWriteTimeout now ends each
// such stream (RST_STREAM) and frees its handler.
func TestHTTPSFreesStreamsAClientDoesNotRead(t *testing.T) {
	s := startLoneEdge(t, server.Config{EdgeID: "stalled", HTTPWriteTimeout: 300 * time.Millisecond})
	c, block := h2WithoutWindow(t, s)
	// GET /relay.js on 20 streams.
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

// An HTTP/2 connection to the HTTPS port carries at most MaxHTTP2Streams
// requests at once (net/http's default is 250): with each request's
// handler held up to HTTPWriteTimeout, one connection, counted once
// against MaxPendingHTTPS, would hold 250 handlers. The edge says so in
// its SETTINGS, and refuses a stream beyond it.
func TestHTTPSBoundsStreamsPerConnection(t *testing.T) {
	s := startLoneEdge(t, server.Config{EdgeID: "streams", HTTPWriteTimeout: time.Minute})
	c, block := h2WithoutWindow(t, s) // every GET /relay.js holds its handler
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	var h [9]byte
	advertised, sent := uint32(0), uint32(0)
	for {
		if _, err := io.ReadFull(c, h[:]); err != nil {
			t.Fatalf("reading the server's frames (advertised %d streams, sent %d): %v", advertised, sent, err)
		}
		n := int(h[0])<<16 | int(h[1])<<8 | int(h[2])
		payload := make([]byte, n)
		if _, err := io.ReadFull(c, payload); err != nil {
			t.Fatal(err)
		}
		switch typ, id := h[3], binary.BigEndian.Uint32(h[5:])&0x7fffffff; typ {
		case 4: // SETTINGS
			if h[4]&1 != 0 {
				continue // the ack of ours
			}
			for p := payload; len(p) >= 6; p = p[6:] {
				if binary.BigEndian.Uint16(p) == 3 { // SETTINGS_MAX_CONCURRENT_STREAMS
					advertised = binary.BigEndian.Uint32(p[2:])
				}
			}
			if advertised != server.MaxHTTP2Streams {
				t.Fatalf("the edge advertises %d concurrent streams, want %d", advertised, server.MaxHTTP2Streams)
			}
			h2Frame(t, c, 4, 1, 0, nil) // ack: the limit now holds
			// One stream more than the limit.
			for i := range uint32(server.MaxHTTP2Streams + 1) {
				h2Frame(t, c, 1, 0x5, 2*i+1, block)
			}
			sent = server.MaxHTTP2Streams + 1
		case 3: // RST_STREAM
			if id != 2*server.MaxHTTP2Streams+1 {
				t.Fatalf("stream %d reset, want only the one beyond the limit (%d)", id, 2*server.MaxHTTP2Streams+1)
			}
			return
		case 7: // GOAWAY: a connection error for the stream beyond the limit is also a refusal
			if sent == 0 {
				t.Fatal("GOAWAY before any stream")
			}
			return
		}
	}
}

// An HTTP/2 client that gives the edge no flow-control window can open
// streams whose answers never get out, each held until HTTPWriteTimeout
// (60 s), and send request bodies the handlers never read: what the
// edge granted it in flow-control window, net/http then keeps. With
// net/http's defaults (1 MiB a stream and a connection) that was 1 MiB
// a connection. The client here sends every byte of body it is granted
// on all MaxHTTP2Streams streams (GET /healthz, whose handler reads no
// body).
func TestHTTPSBoundsWhatAStalledConnectionBuffers(t *testing.T) {
	s := startLoneEdge(t, server.Config{EdgeID: "buffers", HTTPWriteTimeout: time.Minute})
	c, err := tls.Dial("tcp", strings.TrimPrefix(s.HTTPSURL(), "https://"), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	sent, err := h2probe.Buffered(c, "https", "GET", "/healthz", server.MaxHTTP2Streams, server.MaxHTTPSReceiveBuffer)
	if err != nil {
		t.Fatalf("a stalled connection to the HTTPS port (MaxHTTPSReceiveBuffer %d KiB): %v", server.MaxHTTPSReceiveBuffer>>10, err)
	}
	t.Logf("a stalled connection made the edge buffer %d bytes of request bodies", sent)
}
