package server_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/edge/session"
	"github.com/edge-relay/relay/internal/relaytest"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// Devices deleted (not revoked) while they send and while they are sent
// to, across two edges, with an offline device's mailbox full of
// events: every send ends in an outcome the protocol names, the deleted
// devices' sessions end REVOKED, and nothing of them is left: no mailbox
// entry or mailbox in the control plane's state on any node, no session,
// no presence on any edge.
func TestDeletingDevicesDuringTraffic(t *testing.T) {
	r := startMulti(t, relaytest.Options{})
	u := r.User("deletion")
	sender, target := r.Device(u, "sender"), r.Device(u, "target")
	talker := r.Device(u, "talker")   // deleted while it sends
	listener := r.Device(u, "listen") // deleted while it is sent to
	offline := r.Device(u, "offline") // deleted with a mailbox
	cs := dial(t, r, 0, sender, client.QUIC)
	ct := dial(t, r, 1, target, client.WebTransport)
	ctalk := dial(t, r, 1, talker, client.QUIC)
	clis := dial(t, r, 1, listener, client.WebSocket)
	r.WaitEdges(func(s *server.Server) error {
		for _, d := range []relaytest.Device{sender, target, talker, listener} {
			if _, there := s.Mesh().Locate(d.ID); !there && !hosts(s, d) {
				return fmt.Errorf("an edge does not see %s yet", d.ID)
			}
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	// The offline device gets a mailbox first.
	for i := range 20 {
		if err := sendRetrying(ctx, cs, client.Message{Targets: []string{offline.ID}, Payload: fmt.Appendf(nil, "waiting %d", i)}); err != nil {
			t.Fatalf("store for the offline device: %v", err)
		}
	}
	if mb, err := r.Cluster.Nodes[r.Cluster.Leader()].Server.Node().FSM().Mailbox(offline.ID); err != nil || mb.GetCount() == 0 {
		t.Fatalf("the offline device's mailbox: %v (%v)", mb, err)
	}

	// Traffic: the sender to everyone, the talker to the target.
	outcomes := make(chan error, 100_000)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	loop := func(c *client.Client, targets ...string) {
		wg.Go(func() {
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				sctx, scancel := context.WithTimeout(ctx, 10*time.Second)
				outcomes <- c.Send(sctx, client.Message{Targets: targets, Payload: fmt.Appendf(nil, "%d", n)})
				scancel()
			}
		})
	}
	loop(cs, target.ID, listener.ID, offline.ID)
	loop(cs, listener.ID)
	loop(ctalk, target.ID)
	// Receivers read what they get.
	for _, c := range []*client.Client{ct, clis} {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				case <-c.Events():
				}
			}
		})
	}
	clustertest.Eventually(t, 30*time.Second, func() error {
		if len(outcomes) < 50 {
			return errors.New("traffic not flowing yet")
		}
		return nil
	})
	r.DeleteDevice(talker)
	r.DeleteDevice(listener)
	r.DeleteDevice(offline)
	deleted := time.Now()
	for _, c := range []*client.Client{ctalk, clis} {
		for c.Err() == nil {
			if time.Since(deleted) > 3*time.Second {
				t.Fatal("a deleted device is still connected after 3 s")
			}
			time.Sleep(5 * time.Millisecond)
		}
		if !errors.Is(c.Err(), &client.Error{Code: relayv1.ErrorCode_ERROR_CODE_REVOKED}) {
			t.Fatalf("a deleted device's session ended with %v", c.Err())
		}
	}
	// The sender is told, whatever was in flight.
	clustertest.Eventually(t, 30*time.Second, func() error {
		err := cs.Send(ctx, client.Message{Targets: []string{listener.ID}})
		if !errors.Is(err, &client.Error{Code: relayv1.ErrorCode_ERROR_CODE_TARGET_DELETED}) {
			return fmt.Errorf("a send to a deleted device: %v", err)
		}
		return nil
	})
	close(stop)
	wg.Wait()
	close(outcomes)
	allowed := []relayv1.ErrorCode{
		relayv1.ErrorCode_ERROR_CODE_TARGET_DELETED, relayv1.ErrorCode_ERROR_CODE_UNKNOWN_TARGET,
		relayv1.ErrorCode_ERROR_CODE_SENDER_REVOKED, relayv1.ErrorCode_ERROR_CODE_REVOKED,
		relayv1.ErrorCode_ERROR_CODE_TARGET_OFFLINE, relayv1.ErrorCode_ERROR_CODE_QUEUE_FULL,
	}
	for err := range outcomes {
		if err == nil {
			continue
		}
		var ce *client.Error
		ok := errors.As(err, &ce)
		for _, c := range allowed {
			ok = ok || errors.Is(err, &client.Error{Code: c})
		}
		if !ok || (ce != nil && !isOneOf(ce.Code, allowed)) {
			t.Errorf("a send ended with %v", err)
		}
	}

	gone := []relaytest.Device{talker, listener, offline}
	// Nothing left in the control plane, on any replica.
	for _, n := range r.Cluster.Running() {
		f := n.Server.Node().FSM()
		clustertest.Eventually(t, 30*time.Second, func() error {
			for _, d := range gone {
				if _, err := f.GetDevice(d.UserID, d.ID); !errors.Is(err, fsm.ErrNotFound) {
					return fmt.Errorf("node %s still has device %s (%v)", n.ID, d.ID, err)
				}
				if _, err := f.Mailbox(d.ID); !errors.Is(err, fsm.ErrNotFound) {
					return fmt.Errorf("node %s still has the mailbox of %s (%v)", n.ID, d.ID, err)
				}
				if es, _, err := f.FetchMailbox(d.ID, 0, 10, 0, 0); len(es) > 0 || !errors.Is(err, fsm.ErrNotFound) {
					return fmt.Errorf("node %s still has %d mailbox entries of %s (%v)", n.ID, len(es), d.ID, err)
				}
			}
			return nil
		})
	}
	// Nothing left on any edge: no session, no presence, and the
	// directory knows them deleted.
	r.WaitEdges(func(s *server.Server) error {
		for _, d := range gone {
			if hosts(s, d) {
				return fmt.Errorf("an edge still holds a session of %s", d.ID)
			}
			if where, ok := s.Mesh().Locate(d.ID); ok {
				return fmt.Errorf("an edge still sees %s on %s", d.ID, where)
			}
			if st := s.Directory().LookupDevice(d.ID).State; st == session.DeviceActive {
				return fmt.Errorf("an edge still has %s active", d.ID)
			}
		}
		return nil
	})
	// The sender and the target are unharmed.
	if err := sendRetrying(ctx, cs, client.Message{Targets: []string{target.ID}, Payload: []byte("still here")}); err != nil {
		t.Fatalf("after the deletions: %v", err)
	}
}

func isOneOf(c relayv1.ErrorCode, codes []relayv1.ErrorCode) bool {
	for _, x := range codes {
		if c == x {
			return true
		}
	}
	return false
}

// hosts reports whether edge s holds a session of d.
func hosts(s *server.Server, d relaytest.Device) bool {
	for _, p := range s.Hub().LocalPresence() {
		if p.GetDeviceId() == d.ID {
			return true
		}
	}
	return false
}

// Deleting a user ends its sessions on every edge (within a second on a
// quiet machine: the figure -v prints).
func TestDeletingAUserClosesItsSessionsOnEveryEdge(t *testing.T) {
	r := startMulti(t, relaytest.Options{})
	u := r.User("gone")
	var cs []*client.Client
	for i, tr := range transports {
		cs = append(cs, dial(t, r, i, r.Device(u, tr.String()), tr))
	}
	waitOnline(t, cs)
	r.DeleteUser(u)
	waitEnded(t, time.Now(), "the deleted user's devices", cs...)
	for _, c := range cs {
		if !errors.Is(c.Err(), &client.Error{Code: relayv1.ErrorCode_ERROR_CODE_REVOKED}) {
			t.Fatalf("ended with %v", c.Err())
		}
	}
	r.WaitEdges(func(s *server.Server) error {
		if st := s.Hub().Stats(); st.Sessions != 0 || st.Rooms != 0 {
			return fmt.Errorf("tables not empty: %+v", st)
		}
		return nil
	})
}

// A device's last activity reaches the control plane: a session too
// short for any reporting tick (connect, send, leave), and the events of
// a long one, not only the moment it connected.
func TestActivityReachesTheControlPlane(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
		cfg.ActivityEvery = 300 * time.Millisecond
	}})
	u := r.User("active")
	short, long, peer := r.Device(u, "short"), r.Device(u, "long"), r.Device(u, "peer")
	lastSeen := func(d relaytest.Device) time.Time {
		t.Helper()
		dev, err := r.Cluster.Nodes[r.Cluster.Leader()].Server.Node().FSM().GetDevice(d.UserID, d.ID)
		if err != nil {
			t.Fatal(err)
		}
		return time.UnixMilli(dev.GetLastSeenMs())
	}
	r.Dial(0, peer, client.QUIC) // online, so events to it are acknowledged
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// Connect, send, leave, well within one tick.
	before := time.Now()
	c := r.Dial(0, short, client.QUIC)
	if err := c.Send(ctx, client.Message{Targets: []string{peer.ID}}); err != nil {
		t.Fatal(err)
	}
	_ = c.Close()
	clustertest.Eventually(t, 30*time.Second, func() error {
		if seen := lastSeen(short); seen.Before(before.Add(-time.Second)) {
			return fmt.Errorf("last seen %v, the session was at %v", seen, before)
		}
		return nil
	})

	// A long session: its last seen follows its events.
	cl := r.Dial(0, long, client.QUIC)
	clustertest.Eventually(t, 30*time.Second, func() error {
		if lastSeen(long).IsZero() || lastSeen(long).Before(before.Add(-time.Second)) {
			return errors.New("the long session is not reported yet")
		}
		return nil
	})
	first := lastSeen(long)
	clustertest.Eventually(t, 30*time.Second, func() error {
		// Activity is kept to the second: send until a report moves it.
		if err := cl.Send(ctx, client.Message{Targets: []string{peer.ID}}); err != nil {
			return err
		}
		if seen := lastSeen(long); !seen.After(first) {
			return fmt.Errorf("last seen still %v after sending", seen)
		}
		return nil
	})
}
