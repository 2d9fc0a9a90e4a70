package client_test

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/internal/relaytest"
)

// countingConn is a UDP socket that counts the packets written through
// it.
type countingConn struct {
	net.PacketConn
	written atomic.Int64
}

func (c *countingConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	c.written.Add(1)
	return c.PacketConn.WriteTo(b, addr)
}

// Config.QUICTransport carries the client's QUIC connections over
// WebTransport as well as over QUIC: the session's packets go through its
// socket, and the client leaves it open when it closes, for the next
// client.
func TestQUICTransportCarriesEveryQUICConnection(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{})
	u := r.User("sharing")
	a, b := r.Device(u, "a"), r.Device(u, "b")
	rx := r.Dial(0, b, client.QUIC)
	for _, tr := range []client.Transport{client.QUIC, client.WebTransport} {
		t.Run(tr.String(), func(t *testing.T) {
			udp, err := net.ListenPacket("udp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			sock := &countingConn{PacketConn: udp}
			qt := &quic.Transport{Conn: sock}
			t.Cleanup(func() { _ = qt.Close(); _ = udp.Close() })
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cfg := r.ClientConfig(0, a, tr)
			cfg.QUICTransport = qt
			for i := range 2 { // the second client on the socket the first left open
				c := dialWith(ctx, t, cfg)
				before := sock.written.Load()
				if err := c.Send(ctx, client.Message{Targets: []string{b.ID}, Payload: []byte(tr.String())}); err != nil {
					t.Fatalf("client %d: send: %v", i+1, err)
				}
				if ev, err := rx.Receive(ctx); err != nil || string(ev.Payload) != tr.String() {
					t.Fatalf("client %d: received %q, %v", i+1, ev.Payload, err)
				}
				if n := sock.written.Load(); before == 0 || n == before {
					t.Fatalf("client %d over %s: %d packets through Config.QUICTransport's socket before the send, %d after: the session does not use it", i+1, tr, before, n)
				}
				if err := c.Close(); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}
