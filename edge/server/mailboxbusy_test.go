package server_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	controlserver "github.com/edge-relay/relay/control/server"
	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/internal/relaytest"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
)

// A device that comes online while the control plane reads as many
// mailboxes as it may (its one place held by a reader that takes nothing)
// gets its mailbox once a place is free, before the live event sent to it
// meanwhile, which waits behind the mailbox instead of being refused: the
// edge took the refusals for busy, not for failures.
func TestADeviceComesOnlineThroughABusyControlPlane(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{
		Cluster: clustertest.Options{Configure: func(c *controlserver.Config) {
			c.Mailbox.Fetches = api.FetchLimits{Max: 1, Wait: 50 * time.Millisecond, WriteTimeout: 10 * time.Minute}
		}},
		// Generous: the test's own waits on a busy machine must not
		// outlast it.
		Edge: func(_ int, cfg *server.Config) { cfg.Session.MailboxBusyGrace = 2 * time.Minute },
	})
	u := r.User("busy")
	a, b, h := r.Device(u, "a"), r.Device(u, "b"), r.Device(u, "h")
	ca := dial(t, r, 0, a, client.QUIC)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// h's mailbox: a page far larger than a reader that takes nothing
	// lets out, to hold the node's one place with.
	for k := range 8 {
		p := make([]byte, 40<<10)
		_, _ = rand.Read(p)
		if err := ca.Send(ctx, client.Message{Targets: []string{h.ID}, Payload: p}); err != nil {
			t.Fatalf("event %d for h: %v", k, err)
		}
	}
	var want []string
	for k := range 5 {
		want = append(want, fmt.Sprint("stored-", k))
		if err := ca.Send(ctx, client.Message{Targets: []string{b.ID}, Payload: []byte(want[k])}); err != nil {
			t.Fatalf("event %d for b: %v", k, err)
		}
	}
	edgeToken := r.Cluster.Login("edges", relaytest.EdgePassword).GetAccessToken()
	_, release := clustertest.UnreadCall(t, "http://"+r.Cluster.Nodes[0].Server.APIAddr(), "127.0.0.2",
		edgev1connect.MailboxServiceFetchMailboxProcedure, edgeToken, &edgev1.FetchMailboxRequest{DeviceId: h.ID})

	cb := dial(t, r, 0, b, client.QUIC)
	busy := func() float64 {
		return relaytest.Counter(t, r.Edges[0], "relay_edge_mailbox_fetches_total", "result", "busy")
	}
	clustertest.Eventually(t, time.Minute, func() error {
		if busy() == 0 {
			return fmt.Errorf("no mailbox read refused as busy yet")
		}
		return nil
	})
	// Sent while b's mailbox cannot be read: it waits behind it.
	live := make(chan error, 1)
	go func() { live <- ca.Send(ctx, client.Message{Targets: []string{b.ID}, Payload: []byte("live")}) }()
	seen := busy()
	clustertest.Eventually(t, time.Minute, func() error {
		if busy() < seen+2 {
			return fmt.Errorf("b's mailbox not read (and refused) again since the live event")
		}
		return nil
	})
	select {
	case err := <-live:
		t.Fatalf("the live event was answered while b's mailbox could not be read: %v", err)
	default:
	}
	release()
	var got []string
	for len(got) < 6 {
		ev, err := cb.Receive(ctx)
		if err != nil {
			t.Fatalf("b after %v: %v", got, err)
		}
		got = append(got, string(ev.Payload))
	}
	if want = append(want, "live"); !slices.Equal(got, want) {
		t.Fatalf("b got %v, want %v", got, want)
	}
	if err := <-live; err != nil {
		t.Fatalf("the live event: %v", err)
	}
}
