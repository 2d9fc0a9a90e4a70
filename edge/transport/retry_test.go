package transport_test

// Source address validation on the device port: a Retry exactly when the
// handshakes from unvalidated addresses in progress reach the limit, and
// clients that get one go on to relay as usual.

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/devconn"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/edge/session"
	"github.com/edge-relay/relay/internal/relaytest"
)

const (
	retries    = "relay_edge_quic_retries_total"
	unverified = "relay_edge_quic_unvalidated_handshakes"
)

// sniffer is a client's UDP socket that notes the QUIC Retry packets it
// receives: what the client saw on the wire, not what the edge says.
type sniffer struct {
	net.PacketConn
	retries atomic.Int64
}

func (s *sniffer) ReadFrom(b []byte) (int, net.Addr, error) {
	n, addr, err := s.PacketConn.ReadFrom(b)
	if err == nil && isRetry(b[:n]) {
		s.retries.Add(1)
	}
	return n, addr, err
}

// isRetry says whether a datagram is a QUIC Retry (RFC 9000 section
// 17.2.5; version 2, RFC 9369, numbers the long header types anew).
func isRetry(b []byte) bool {
	if len(b) < 5 || b[0]&0x80 == 0 {
		return false
	}
	typ := b[0] >> 4 & 0x3
	switch binary.BigEndian.Uint32(b[1:5]) {
	case 0x00000001:
		return typ == 3
	case 0x6b3343cf:
		return typ == 0
	}
	return false
}

// dialSniffed connects a device to edge i with the Go client over QUIC,
// through a socket that notes Retries.
func dialSniffed(t *testing.T, r *relaytest.Relay, i int, d relaytest.Device) (*client.Client, *sniffer) {
	t.Helper()
	return dialSniffedWith(t, r, i, d, nil)
}

// dialSniffedWith is dialSniffed with tokens as the client's QUIC token
// store (nil: the client's own).
func dialSniffedWith(t *testing.T, r *relaytest.Relay, i int, d relaytest.Device, tokens quic.TokenStore) (*client.Client, *sniffer) {
	t.Helper()
	udp, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sn := &sniffer{PacketConn: udp}
	tr := &quic.Transport{Conn: sn}
	t.Cleanup(func() { _ = tr.Close(); _ = udp.Close() })
	cfg := r.ClientConfig(i, d, client.QUIC)
	cfg.QUICTransport = tr
	cfg.QUICTokens = tokens
	return r.DialWith(cfg), sn
}

// deaf is a socket that takes in everything and hands nothing on.
type deaf struct{ net.PacketConn }

func (d deaf) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		if _, _, err := d.PacketConn.ReadFrom(b); err != nil {
			return 0, nil, err
		}
	}
}

// holdHandshake starts a QUIC handshake with the edge at addr from a
// client that never reads the edge's answer, as a spoofed source would
// not: the edge holds it as in progress until it gives up (the handshake
// timeout), long after the test is done.
func holdHandshake(t *testing.T, addr string) {
	t.Helper()
	holdHandshakeFrom(t, addr, "127.0.0.1")
}

// holdHandshakeFrom is holdHandshake from the loopback address src: a
// spoofed Initial from an address of its own.
func holdHandshakeFrom(t *testing.T, addr, src string) {
	t.Helper()
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.ParseIP(src)})
	if err != nil {
		t.Fatal(err)
	}
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	tr := &quic.Transport{Conn: deaf{udp}}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		conf := devconn.QUICConfig(time.Minute)
		conf.HandshakeIdleTimeout = time.Minute
		tlsConf := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{devconn.ALPN}, MinVersion: tls.VersionTLS13} //nolint:gosec // never gets that far
		_, _ = tr.Dial(ctx, ua, tlsConf, conf)
	})
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		_ = tr.Close()
		_ = udp.Close()
	})
}

// relays sends an event from one client to another and waits for it.
func relays(t *testing.T, from, to *client.Client, toID string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := from.Send(ctx, client.Message{Targets: []string{toID}, Type: "t", Payload: []byte("through a retry")}); err != nil {
		t.Fatal(err)
	}
	ev, err := to.Receive(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if string(ev.Payload) != "through a retry" {
		t.Fatalf("received %q", ev.Payload)
	}
}

func waitGauge(t *testing.T, e *server.Server, want func(float64) bool) {
	t.Helper()
	relaytest.WaitEdge(t, e, 20*time.Second, func(session.Stats) error {
		if v := relaytest.Gauge(t, e, unverified, "", ""); !want(v) {
			return fmt.Errorf("%s is %v", unverified, v)
		}
		return nil
	})
}

// With one unvalidated handshake allowed at a time: a device that comes
// while none is in progress connects without a Retry; one that comes
// while a handshake that will never finish is held gets a Retry, goes
// through it and relays, and the edge counts the Retry.
func TestRetryAtTheLimit(t *testing.T) {
	r := startRelay(t, 1, func(_ int, cfg *server.Config) { cfg.MaxUnvalidatedHandshakes = 1 })
	e := r.Edges[0]
	user := r.User("retry-at-the-limit")
	first, second := r.Device(user, "first"), r.Device(user, "second")

	waitGauge(t, e, func(v float64) bool { return v == 0 })
	a, asn := dialSniffed(t, r, 0, first)
	if n := asn.retries.Load(); n != 0 {
		t.Fatalf("below the limit the client got %d Retries", n)
	}
	if n := relaytest.Counter(t, e, retries, "", ""); n != 0 {
		t.Fatalf("below the limit the edge counted %v Retries", n)
	}

	// The first device's handshake is over; one that never finishes
	// takes the only place.
	waitGauge(t, e, func(v float64) bool { return v == 0 })
	holdHandshake(t, e.Addr())
	waitGauge(t, e, func(v float64) bool { return v >= 1 })
	b, bsn := dialSniffed(t, r, 0, second)
	// (A client that resends its first Initial before the Retry comes
	// gets a second, and ignores it.)
	if n := bsn.retries.Load(); n < 1 {
		t.Fatal("at the limit the client got no Retry")
	}
	if n := relaytest.Counter(t, e, retries, "", ""); n < 1 {
		t.Fatal("the edge counted no Retry")
	}
	relays(t, b, a, first.ID)
	relays(t, a, b, second.ID)
}

// With the limit at "always", every new connection gets a Retry, over
// native QUIC and WebTransport alike, and sessions run as usual.
func TestRetryAlways(t *testing.T) {
	r := startRelay(t, 1, func(_ int, cfg *server.Config) { cfg.MaxUnvalidatedHandshakes = -1 })
	e := r.Edges[0]
	user := r.User("retry-always")
	native, web := r.Device(user, "native"), r.Device(user, "web")
	q, qsn := dialSniffed(t, r, 0, native)
	if n := qsn.retries.Load(); n < 1 {
		t.Fatal("the client got no Retry")
	}
	w := r.Dial(0, web, client.WebTransport)
	if n := relaytest.Counter(t, e, retries, "", ""); n < 2 {
		t.Fatalf("the edge counted %v Retries, want one a connection", n)
	}
	relays(t, q, w, web.ID)
	relays(t, w, q, native.ID)
	// Every handshake was from a validated address: none was counted.
	if v := relaytest.Gauge(t, e, unverified, "", ""); v != 0 {
		t.Fatalf("%s is %v", unverified, v)
	}
}

// notedTokens is a client token store that counts the tokens put in it.
type notedTokens struct {
	quic.TokenStore
	puts atomic.Int64
}

func (n *notedTokens) Put(key string, token *quic.ClientToken) {
	n.puts.Add(1)
	n.TokenStore.Put(key, token)
}

// After each handshake the edge gives the client an address-validation
// token; a client that kept it (client.Config.QUICTokens) comes back
// without a Retry even while the edge makes every unknown address prove
// itself.
func TestAKeptTokenSkipsTheRetry(t *testing.T) {
	r := startRelay(t, 1, func(_ int, cfg *server.Config) { cfg.MaxUnvalidatedHandshakes = -1 })
	e := r.Edges[0]
	user := r.User("retry-token")
	first, second := r.Device(user, "first"), r.Device(user, "second")
	tokens := &notedTokens{TokenStore: quic.NewLRUTokenStore(4, 4)}
	a, asn := dialSniffedWith(t, r, 0, first, tokens)
	if n := asn.retries.Load(); n < 1 {
		t.Fatal("the first connection got no Retry")
	}
	clustertest.Eventually(t, 20*time.Second, func() error {
		if tokens.puts.Load() == 0 {
			return errors.New("the edge gave no token")
		}
		return nil
	})
	before := relaytest.Counter(t, e, retries, "", "")
	b, bsn := dialSniffedWith(t, r, 0, second, tokens)
	if n := bsn.retries.Load(); n != 0 {
		t.Fatalf("a client with a token got %d Retries", n)
	}
	if n := relaytest.Counter(t, e, retries, "", ""); n != before {
		t.Fatalf("the edge counted %v Retries more", n-before)
	}
	relays(t, a, b, second.ID)
}
