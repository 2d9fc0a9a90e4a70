package transport

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"log/slog"
	"math/big"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
)

// quicConn returns the server's end of a real QUIC connection on
// loopback, closed when the test ends.
func quicConn(t *testing.T) *quic.Conn {
	t.Helper()
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotAfter: time.Now().Add(time.Hour), DNSNames: []string{"localhost"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	srvTLS := &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, NextProtos: []string{"h3"}}
	ln, err := quic.ListenAddr("127.0.0.1:0", srvTLS, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	cli, err := quic.DialAddr(ctx, ln.Addr().String(), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h3"}}, nil) //nolint:gosec // a test's own server
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cli.CloseWithError(0, "") })
	srv, err := ln.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.CloseWithError(0, "") })
	return srv
}

// An HTTP/3 connection leaves the pending list while a session the hub
// admitted is on it, and is pending again once its last session ended:
// a client that keeps the connection and opens sessions that never
// authenticate on it must not hold it outside MaxPendingQUIC's bound.
func TestAnHTTP3ConnectionWithoutASessionIsPendingAgain(t *testing.T) {
	l := &Listener{cfg: Config{StreamTimeout: time.Minute}, h3conns: map[*quic.Conn]*h3Conn{},
		pending: newPendingQUIC(8, slog.New(slog.DiscardHandler))}
	l.pending.closeConn = func(f func()) { f() }
	conn := quicConn(t)
	l.h3Opened(conn, l.pending.add(conn))
	t.Cleanup(func() { l.h3Closed(conn) })
	listed := l.pending.list.Len
	pc, _ := l.h3Session(conn, 1)
	pc.admitted()
	if n := listed(); n != 0 {
		t.Fatalf("%d connections pending with an admitted session on the only one", n)
	}
	if _, left := l.h3Session(conn, -1); left != 0 {
		t.Fatalf("%d sessions left, want none", left)
	}
	if n := listed(); n != 1 {
		t.Fatalf("%d connections pending once its session ended, want it listed again", n)
	}
	next, _ := l.h3Session(conn, 1)
	if next == pc || next.wasAdmitted() {
		t.Fatal("the next session's place on the list is the admitted one's")
	}
	next.admitted()
	if n := listed(); n != 0 {
		t.Fatalf("%d connections pending with the next session admitted", n)
	}
}
