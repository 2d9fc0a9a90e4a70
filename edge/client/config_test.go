package client_test

import (
	"context"
	"encoding/base64"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/internal/relaytest"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// A zero TTL takes the default; a negative one, or a positive one below
// the edge's unit of a millisecond, is refused by the client with the
// code the edge would give, before anything is sent (the edge counts no
// event for them), instead of being replaced by the default or ending as
// a Reject from the edge. A millisecond is taken as it is.
func TestMessageTTL(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{})
	u := r.User("ttl")
	a, b := r.Device(u, "a"), r.Device(u, "b")
	ca, cb := r.Dial(0, a, client.QUIC), r.Dial(0, b, client.QUIC)
	waitOnline(t, ca, b.ID)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	received := func() float64 { return relaytest.Counter(t, r.Edges[0], "relay_edge_events_total", "", "") }

	malformed := &client.Error{Code: relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME}
	for _, ttl := range []time.Duration{-time.Minute, -1, 1, 999 * time.Microsecond} {
		m := client.Message{Targets: []string{b.ID}, Payload: []byte("refused"), TTL: ttl}
		if err := ca.Send(ctx, m); !errors.Is(err, malformed) {
			t.Errorf("Send with TTL %v: %v, want MALFORMED_FRAME", ttl, err)
		}
		if err := ca.SendEphemeral(m); !errors.Is(err, malformed) {
			t.Errorf("SendEphemeral with TTL %v: %v, want MALFORMED_FRAME", ttl, err)
		}
	}
	if n := received(); n != 0 {
		t.Fatalf("the edge received %v events, want none: the client sent what it refused", n)
	}

	for _, tc := range []struct {
		ttl, want time.Duration
	}{
		{0, client.DefaultTTL},
		{time.Millisecond, time.Millisecond},
		{1500 * time.Microsecond, time.Millisecond}, // whole milliseconds
		{time.Hour, time.Hour},
	} {
		m := client.Message{Targets: []string{b.ID}, Payload: []byte("taken"), TTL: tc.ttl}
		if err := ca.Send(ctx, m); err != nil {
			t.Fatalf("Send with TTL %v: %v", tc.ttl, err)
		}
		ev, err := cb.Receive(ctx)
		if err != nil || ev.TTL != tc.want {
			t.Fatalf("TTL %v arrived as %v (%v), want %v", tc.ttl, ev.TTL, err, tc.want)
		}
	}
	if ca.Err() != nil {
		t.Fatalf("client stopped: %v", ca.Err())
	}
}

// A client pinning a hash the edge's certificate does not have (a typo,
// a renewed certificate) says, over every transport, the hash the edge
// presented in full, in the encoding the edge publishes it (base64, as
// its certificate-hashes document serves it), and where to get it.
func TestAWrongPinNamesTheEdgesHash(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{})
	d := r.Device(r.User("pinner"), "d")
	edge := r.Edges[0]
	var published []string
	for _, h := range edge.CertHashes() {
		published = append(published, base64.StdEncoding.EncodeToString(h.SHA256[:]))
	}
	wrong := make([]byte, 32)
	for _, tr := range []client.Transport{client.QUIC, client.WebTransport, client.WebSocket} {
		t.Run(tr.String(), func(t *testing.T) {
			cfg := r.ClientConfig(0, d, tr)
			cfg.CertHashes = [][]byte{wrong}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			c, err := client.Dial(ctx, cfg)
			if err == nil {
				_ = c.Close()
				t.Fatal("connected to an edge whose certificate is not pinned")
			}
			msg := err.Error()
			for _, want := range []string{
				published[0],                             // the edge's hash, in full
				base64.StdEncoding.EncodeToString(wrong), // what was pinned
				"https://" + edge.Addr() + server.CertHashesPath,
			} {
				if !strings.Contains(msg, want) {
					t.Errorf("the error does not name %s:\n%s", want, msg)
				}
			}
		})
	}
}
