package session

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/edge-relay/relay/internal/testcerts"
)

func testCertificate(t *testing.T) tls.Certificate {
	t.Helper()
	ca, err := testcerts.NewCA(t.TempDir(), "test")
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.IssuePair("edge")
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

// tlsHandshake runs a TLS handshake between a client with conf and a
// server with srv over TCP on the loopback (a pipe has no buffer, and a
// TLS 1.3 server writes its ticket while the client writes its Finished),
// lets the client take the session ticket the server sends after it, and
// reports whether the session resumed.
func tlsHandshake(t *testing.T, srv, conf *tls.Config) bool {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan error, 1)
	go func() {
		a, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer a.Close()
		_ = a.SetDeadline(time.Now().Add(10 * time.Second))
		s := tls.Server(a, srv)
		if err := s.Handshake(); err != nil {
			done <- err
			return
		}
		// Something to read: the client takes the ticket before it.
		_, err = s.Write([]byte{1})
		done <- err
	}()
	b, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	c := tls.Client(b, conf)
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := c.Handshake(); err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatalf("client read: %v", err)
	}
	if err := <-done; err != nil {
		t.Fatalf("server: %v", err)
	}
	return c.ConnectionState().DidResume
}

// A TLS session begun with one edge resumes on any edge whose ring holds
// the key that sealed its ticket; not on one without it, nor once that
// key's grace ended. TLS 1.2 tickets, and those issued before the ring
// has a current key, stay with the process that issued them.
func TestTLSTicketsResumeOnAnyEdgeOfTheCluster(t *testing.T) {
	cert := testCertificate(t)
	k1 := SessionKey{ID: "k1", Secret: bytes.Repeat([]byte{1}, 32)}
	k2 := SessionKey{ID: "k2", Secret: bytes.Repeat([]byte{2}, 32)}
	port := func(purpose string, maxVersion uint16, current string, keys ...SessionKey) *tls.Config {
		r := NewRing()
		if current != "" {
			r.Set(current, keys)
		}
		c := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12, MaxVersion: maxVersion}
		ShareTLSTickets(c, r, purpose, time.Now)
		return c
	}
	edge := func(maxVersion uint16, current string, keys ...SessionKey) *tls.Config {
		return port("quic", maxVersion, current, keys...)
	}
	device := func() *tls.Config {
		return &tls.Config{InsecureSkipVerify: true, ServerName: "edge", ClientSessionCache: tls.NewLRUClientSessionCache(4)}
	}
	a := edge(tls.VersionTLS13, "k1", k1)
	b := edge(tls.VersionTLS13, "k1", k1)
	rotated := edge(tls.VersionTLS13, "k2", k2, k1)                                                                         // k1 in its grace
	gone := edge(tls.VersionTLS13, "k2", k2, SessionKey{ID: "k1", Secret: k1.Secret, Expiry: time.Now().Add(-time.Second)}) // k1's grace ended
	other := edge(tls.VersionTLS13, "k2", k2)
	unsynced := edge(tls.VersionTLS13, "")

	for _, c := range []struct {
		name   string
		first  *tls.Config
		then   *tls.Config
		resume bool
	}{
		{"same edge", a, a, true},
		{"another edge of the cluster", a, b, true},
		{"an edge that rotated to a new key", a, rotated, true},
		{"an edge where the old key's grace ended", a, gone, false},
		{"an edge without the key", a, other, false},
		{"a ticket of the edge's own, before its ring had a key", unsynced, unsynced, true},
		{"another edge, for a ticket of an edge's own", unsynced, a, false},
		{"TLS 1.2: the same edge", edge(tls.VersionTLS12, "k1", k1), nil, true},
		{"TLS 1.2: another edge of the cluster", edge(tls.VersionTLS12, "k1", k1), edge(tls.VersionTLS12, "k1", k1), false},
		{"the other port of an edge of the cluster", a, port("https", tls.VersionTLS13, "k1", k1), false},
	} {
		t.Run(c.name, func(t *testing.T) {
			then := c.then
			if then == nil {
				then = c.first
			}
			dev := device()
			if tlsHandshake(t, c.first, dev) {
				t.Fatal("the first handshake resumed: the cache was not empty")
			}
			if got := tlsHandshake(t, then, dev); got != c.resume {
				t.Fatalf("resumed %v, want %v", got, c.resume)
			}
		})
	}

	// A ticket the ring sealed, altered, is not resumed (and does not
	// fail the handshake).
	dev := device()
	tlsHandshake(t, a, dev)
	cs, ok := dev.ClientSessionCache.Get("edge")
	if !ok {
		t.Fatal("no session cached")
	}
	ticket, state, err := cs.ResumptionState()
	if err != nil || len(ticket) == 0 || ticket[0] != tlsTicketVersion {
		t.Fatalf("the edge's ticket (%v) is not the ring's", err)
	}
	ticket = bytes.Clone(ticket)
	ticket[len(ticket)-1] ^= 1
	forged, err := tls.NewResumptionState(ticket, state)
	if err != nil {
		t.Fatal(err)
	}
	dev.ClientSessionCache.Put("edge", forged)
	if tlsHandshake(t, b, dev) {
		t.Fatal("a forged ticket resumed")
	}

	// Neither kind of ticket opens as the other, though one ring seals
	// both.
	ring := NewRing()
	ring.Set("k1", []SessionKey{k1})
	tlsTicket, err := ring.seal(tlsTicketVersion, tlsTicketAAD("quic"), []byte("state"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ring.Open(tlsTicket, time.Now()); !errors.Is(err, ErrTicketMalformed) {
		t.Fatalf("a TLS ticket opened as a resume ticket: %v", err)
	}
	resume, err := ring.Seal(Ticket{UserID: "u", DeviceID: "d", AuthAt: time.Now(), ExpiresAt: time.Now().Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	resume[0] = tlsTicketVersion
	if _, err := ring.open(tlsTicketVersion, tlsTicketAAD("quic"), maxTLSTicket, resume, time.Now()); !errors.Is(err, ErrTicketForged) {
		t.Fatalf("a resume ticket opened as a TLS ticket: %v", err)
	}
}
