package server_test

import (
	"context"
	"errors"
	"log/slog"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/clustertest"
	controlserver "github.com/edge-relay/relay/control/server"
	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/internal/relaytest"
)

// A device that connects right after its registration, to an edge whose
// copy of the control plane has not got the registration yet, is held
// until it has instead of being refused as unknown: the Go client names
// the registration's revision in its Hello. The edge's watch goes to a
// control node that is cut off from the others, and stays there, so the
// edge cannot know the device until that node is healed.
func TestAFreshDeviceWaitsForItsRegistration(t *testing.T) {
	rec := clustertest.NewLogRecorder()
	r := relaytest.Start(t, relaytest.Options{
		ControlNodes: 3,
		Cluster: clustertest.Options{Configure: func(c *controlserver.Config) {
			c.Watch.LeaderTimeout = 10 * time.Minute // the watch stays on the cut-off node
		}},
		Edge: func(_ int, cfg *server.Config) {
			cfg.Session.HandshakeTimeout, cfg.Session.RevisionWait = 2*time.Minute, time.Minute
			cfg.Logger = slog.New(rec)
		},
	})
	// The node to cut off: a follower (the leader stays, so the
	// registration commits), not node 0 (registrations go through it).
	cut := 1
	if r.Cluster.Leader() == 1 {
		cut = 2
	}
	// The edge again, its watch on that node (the first URL).
	cfg := r.EdgeConfig(0)
	urls := r.ControlURLs()
	cfg.Control.URLs = append([]string{urls[cut]}, append(urls[:cut:cut], urls[cut+1:]...)...)
	r.StopEdge(0)
	r.StartEdgeWith(0, cfg)
	u := r.User("fresh")
	r.Cluster.Isolate(cut)
	t.Cleanup(func() { r.Cluster.Heal(cut) })
	d := r.RegisterDevice(u, "new") // through node 0
	if d.Revision == 0 {
		t.Fatal("the registration named no revision")
	}
	if r.Edges[0].Directory().LookupDevice(d.ID).UserID != "" {
		t.Fatal("the edge knew the device although its control node was cut off")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dialed := make(chan error, 1)
	var c *client.Client
	go func() {
		var err error
		c, err = client.Dial(ctx, r.ClientConfig(0, d, client.QUIC))
		dialed <- err
	}()
	const waits = "handshake waits for the directory to reach the hello's revision"
	clustertest.Eventually(t, 30*time.Second, func() error {
		select {
		case err := <-dialed:
			t.Fatalf("the dial ended while the edge was behind: %v", err)
		default:
		}
		if len(rec.Find(waits, nil)) == 0 {
			return errors.New("no handshake waits for a revision yet")
		}
		return nil
	})
	if w := rec.Find(waits, nil)[0]; w.Attrs["min_revision"].Uint64() != d.Revision || w.Attrs["revision"].Uint64() >= d.Revision {
		t.Fatalf("wait logged as %v", w.Attrs)
	}
	r.Cluster.Heal(cut)
	if err := <-dialed; err != nil {
		t.Fatalf("the fresh device, once the edge caught up: %v", err)
	}
	defer c.Close()
	if len(rec.Find("handshake went on before the directory reached the hello's revision", nil)) != 0 {
		t.Fatal("the handshake gave up waiting")
	}
}
