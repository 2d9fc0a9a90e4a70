package relaytest

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"io"
	"sync"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/edge-relay/relay/edge/devconn"
	"github.com/edge-relay/relay/edge/frame"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// Middleman is a machine in the middle of native QUIC sessions: it ends
// each device's TLS with its own certificate, which the device trusts
// (pinned: the position of whoever holds an edge's certificate key, or,
// with --cluster-tls-tickets, a session key), opens a connection of its
// own to the edge, and copies the session stream's bytes both ways
// unchanged. What it can do with a device's proofs is what the
// protocol's channel binding is for.
type Middleman struct {
	// Addr is the UDP address devices connect to.
	Addr string
	// CertHash is the SHA-256 of its certificate, for
	// client.Config.CertHashes.
	CertHash []byte

	// strip takes the binding check out of the edge's challenges.
	strip  bool
	ln     *quic.Listener
	edge   string
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// StartMiddleman starts a Middleman on 127.0.0.1 in front of the edge at
// edgeAddr; it stops when the test ends. With stripBindingCheck it takes
// the binding check out of the edge's challenges, as a middleman that
// knows the protocol would, so that the device signs anyway.
func StartMiddleman(t TB, edgeAddr string, stripBindingCheck bool) *Middleman {
	t.Helper()
	cert, err := selfSigned("127.0.0.1")
	if err != nil {
		t.Fatalf("middleman certificate: %v", err)
	}
	ln, err := quic.ListenAddr("127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{devconn.ALPN},
		MinVersion: tls.VersionTLS13}, devconn.QUICConfig(30*time.Second))
	if err != nil {
		t.Fatalf("middleman: %v", err)
	}
	sum := sha256.Sum256(cert.Certificate[0])
	ctx, cancel := context.WithCancel(context.Background())
	m := &Middleman{Addr: ln.Addr().String(), CertHash: sum[:], strip: stripBindingCheck, ln: ln, edge: edgeAddr, ctx: ctx, cancel: cancel}
	m.wg.Add(1)
	go m.accept()
	t.Cleanup(m.stop)
	return m
}

func (m *Middleman) stop() {
	m.cancel()
	_ = m.ln.Close()
	m.wg.Wait()
}

func (m *Middleman) accept() {
	defer m.wg.Done()
	for {
		conn, err := m.ln.Accept(m.ctx)
		if err != nil {
			return
		}
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			m.relay(conn)
		}()
	}
}

// relay copies one device connection's session stream to a connection of
// its own to the edge, and back, until either side ends or the
// middleman stops.
func (m *Middleman) relay(dev *quic.Conn) {
	ctx, cancel := context.WithTimeout(m.ctx, 20*time.Second)
	defer cancel()
	defer func() { _ = dev.CloseWithError(0, "") }()
	dstr, err := dev.AcceptStream(ctx)
	if err != nil {
		return
	}
	// The middleman checks nothing of the edge: it only needs to reach it.
	edge, err := quic.DialAddr(ctx, m.edge, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{devconn.ALPN}, //nolint:gosec // a test's attacker
		MinVersion: tls.VersionTLS13}, devconn.QUICConfig(30*time.Second))
	if err != nil {
		return
	}
	defer func() { _ = edge.CloseWithError(0, "") }()
	estr, err := edge.OpenStreamSync(ctx)
	if err != nil {
		return
	}
	// The copies end when the connections do: one side finishing its
	// stream (the edge after its Close frame) is passed on as it is, and
	// the device hangs up once it read the rest.
	var copies sync.WaitGroup
	copies.Go(func() { _, _ = io.Copy(estr, dstr); _ = estr.Close() })
	copies.Go(func() {
		if m.strip {
			_ = stripBindingChecks(dstr, estr)
		} else {
			_, _ = io.Copy(dstr, estr)
		}
		_ = dstr.Close()
	})
	select {
	case <-m.ctx.Done():
	case <-dev.Context().Done():
	case <-edge.Context().Done():
	}
	// Whichever ended first, both connections end now, which ends both
	// copies; the device is told the code the edge closed with, as the
	// edge would have told it.
	var code quic.ApplicationErrorCode
	var msg string
	if appErr, ok := errors.AsType[*quic.ApplicationError](context.Cause(edge.Context())); ok && appErr.Remote {
		code, msg = appErr.ErrorCode, appErr.ErrorMessage
	}
	_ = dev.CloseWithError(code, msg)
	_ = edge.CloseWithError(0, "")
	copies.Wait()
}

// stripBindingChecks copies the edge's frames from r to w, frame by
// frame, with the binding check taken out of every Challenge.
func stripBindingChecks(w io.Writer, r io.Reader) error {
	fr, fw := frame.NewReader(r, frame.MaxFrameLimit), frame.NewWriter(w, frame.MaxFrameLimit)
	for {
		var f relayv1.Frame
		if err := fr.Read(&f); err != nil {
			return err
		}
		if ch := f.GetChallenge(); ch != nil {
			ch.BindingCheck = nil
		}
		if err := fw.Write(&f); err != nil {
			return err
		}
	}
}
