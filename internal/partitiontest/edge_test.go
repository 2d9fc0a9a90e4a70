package partitiontest

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/internal/relaytest"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// dial connects a device to edge i, closed by t.Cleanup.
func dial(t *testing.T, s *relaytest.System, i int, d relaytest.SystemDevice, adjust func(*client.Config)) (*client.Client, error) {
	t.Helper()
	cfg := s.ClientConfig(i, d)
	if adjust != nil {
		adjust(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, cfg)
	if err == nil {
		t.Cleanup(func() { _ = c.Close() })
	}
	return c, err
}

// sendAndReceive sends one event from a to b and waits until b has it.
func sendAndReceive(t *testing.T, a, b *client.Client, bID, payload string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := a.Send(ctx, client.Message{Targets: []string{bID}, Type: "t", Payload: []byte(payload)}); err != nil {
		t.Fatalf("send %s: %v", payload, err)
	}
	for {
		ev, err := b.Receive(ctx)
		if err != nil {
			t.Fatalf("receive %s: %v", payload, err)
		}
		if string(ev.Payload) == payload {
			return
		}
	}
}

// An edge cut off from every control node keeps relaying among the
// sessions it has; once the control plane has been silent for longer
// than --control-grace it refuses new sessions (GOING_AWAY), and since
// its peer edge still hears the control plane it steps aside (not
// ready), and stays aside after its membership lease ran out and the
// peer dropped it from its member list (the lease here is shorter than
// the grace, as by default: 30 s against 1 min). After healing, a revocation decided during the split closes
// the revoked device's session within about a second, and the edge
// admits sessions again. When both edges lose the control plane, one
// grace after the other (the whole control plane is gone from their
// view), neither leaves its load balancer at any moment: both stay
// ready, refusing new sessions and relaying for those in place.
func TestEdgeCutOffFromControlPlane(t *testing.T) {
	// The feed carries a progress message every 5 s (control/api's
	// default ProgressInterval); the grace is above it.
	const progressEvery, grace, lease = 5 * time.Second, 7 * time.Second, 4 * time.Second
	s := relaytest.StartSystem(t, relaytest.SystemOptions{Relayd: relayd, ControlNodes: 3, Edges: 2,
		ControlArgs: func(int) []string { return []string{"--edge-lease-ttl", lease.String()} },
		EdgeArgs:    func(int) []string { return []string{"--control-grace", grace.String()} }})
	user := s.User("alice")
	devA, devB, devC, devD, devE := s.Device(user, "a"), s.Device(user, "b"), s.Device(user, "c"), s.Device(user, "d"), s.Device(user, "e")
	// Each dial stays on the edge it names: a refusal is what is tested.
	onlyThere := func(c *client.Config) { c.OtherAddrs = nil }
	admitted := func(i int) error {
		c, err := dial(t, s, i, devC, onlyThere)
		if err == nil {
			_ = c.Close()
		}
		return err
	}
	refused := func(i int) {
		t.Helper()
		_, err := dial(t, s, i, devC, onlyThere)
		var ce *client.Error
		if !errors.As(err, &ce) || ce.Code != relayv1.ErrorCode_ERROR_CODE_GOING_AWAY {
			t.Fatalf("new session on cut-off edge %d: %v, want GOING_AWAY", i, err)
		}
	}
	cutOff := func(e *relaytest.EdgeNode) func() error {
		return func() error {
			if v, err := s.EdgeMetric(e, "relay_edge_control_cut_off"); err != nil || v != 1 {
				return fmt.Errorf("edge not cut off yet (%v, %v)", v, err)
			}
			return nil
		}
	}
	// Every device known to both edges before the split.
	for i := range s.Edges {
		clustertest.Eventually(t, 30*time.Second, func() error { return admitted(i) })
	}
	a, err := dial(t, s, 0, devA, onlyThere)
	if err != nil {
		t.Fatal(err)
	}
	d, err := dial(t, s, 1, devD, onlyThere)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var bLost time.Time
	var bWhy error
	b, err := dial(t, s, 0, devB, func(c *client.Config) {
		onlyThere(c)
		c.OnSessionLost = func(l client.SessionLost) {
			mu.Lock()
			defer mu.Unlock()
			if bLost.IsZero() {
				bLost, bWhy = time.Now(), l.Err
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	sendAndReceive(t, a, b, devB.ID, "before the split")
	sendAndReceive(t, a, d, devD.ID, "before the split")

	e0, e1 := s.Edges[0], s.Edges[1]
	var control []*relaytest.Host
	for _, n := range s.Control {
		control = append(control, n.Host)
	}
	cut := time.Now()
	s.Net.Partition([]*relaytest.Host{e0.Host}, control)
	sendAndReceive(t, a, b, devB.ID, "during the split")

	// B is revoked while the edge cannot hear of it.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := s.Devices(s.Control[0]).RevokeDevice(ctx, relaytest.Admin(s, &controlv1.RevokeDeviceRequest{UserId: user, DeviceId: devB.ID})); err != nil {
		t.Fatal(err)
	}

	// Past the grace: new sessions refused with GOING_AWAY.
	clustertest.Eventually(t, grace+20*time.Second, cutOff(e0))
	t.Logf("edge stopped admitting sessions %v after the cut (grace %v)", time.Since(cut).Round(10*time.Millisecond), grace)
	// The grace counts from the last message heard, at most one progress
	// interval before the cut (a second more for a busy machine), so the
	// refusals cannot start sooner than this after the cut.
	if time.Since(cut) < grace-progressEvery-time.Second {
		t.Errorf("edge refused sessions %v after the cut, before the grace", time.Since(cut))
	}
	refused(0)
	// Its peer hears the control plane: it steps aside, naming the peer.
	asideFor := func() error {
		code, body, err := s.EdgeReadyz(e0)
		if err != nil {
			return err
		}
		if code != http.StatusServiceUnavailable || !strings.Contains(body, "while peer edges hear it") || !strings.Contains(body, e1.ID) {
			return fmt.Errorf("cut-off edge not stepping aside for %s: /readyz %d %q", e1.ID, code, body)
		}
		return nil
	}
	clustertest.Eventually(t, server.StepAsideAfter+20*time.Second, asideFor)
	t.Logf("edge stepped aside %v after the cut", time.Since(cut).Round(10*time.Millisecond))
	if !s.EdgeReady(e1) {
		t.Fatal("the edge that hears the control plane is not ready")
	}
	// Its lease ran out long ago: the peer no longer links to it, and
	// tells it what it hears over its own link. Aside it stays.
	clustertest.Eventually(t, 30*time.Second, func() error {
		if v, err := s.EdgeMetric(e1, "relay_edge_mesh_links"); err != nil || v != 0 {
			return fmt.Errorf("edge 1 still links to the cut-off edge (%v, %v)", v, err)
		}
		return nil
	})
	for range 3 * server.StepBackAfter / time.Second {
		if err := asideFor(); err != nil {
			t.Fatalf("after the peer dropped it: %v", err)
		}
		<-time.After(time.Second) // observation window (workload time)
	}
	// The sessions in place still relay.
	sendAndReceive(t, a, b, devB.ID, "past the grace")

	s.Net.Heal()
	healed := time.Now()
	clustertest.Eventually(t, 20*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if bLost.IsZero() && b.Err() == nil {
			return errors.New("revoked device's session still up")
		}
		if bLost.IsZero() {
			bLost, bWhy = time.Now(), b.Err()
		}
		return nil
	})
	mu.Lock()
	took := bLost.Sub(healed)
	t.Logf("revocation decided during the split closed the session %v after healing (%v)", took.Round(time.Millisecond), bWhy)
	mu.Unlock()
	if took > 3*time.Second {
		t.Errorf("revocation took effect %v after healing, want about 1s", took)
	}
	clustertest.Eventually(t, 20*time.Second, func() error {
		if !s.EdgeReady(e0) {
			return errors.New("edge not ready after healing")
		}
		return admitted(0)
	})
	t.Logf("edge admits sessions again %v after healing", time.Since(healed).Round(10*time.Millisecond))
	// Edge 0 registers again (its lease ran out during the split) and the
	// mesh links both ways before the next split.
	for i, e := range s.Edges {
		clustertest.Eventually(t, 30*time.Second, func() error {
			for _, m := range []string{"relay_edge_member", "relay_edge_mesh_links", "relay_edge_mesh_peers_hearing_control"} {
				if v, err := s.EdgeMetric(e, m); err != nil || v != 1 {
					return fmt.Errorf("edge %d: %s %v (%v), want 1", i, m, v, err)
				}
			}
			return nil
		})
	}
	t.Logf("mesh whole again %v after healing", time.Since(healed).Round(10*time.Millisecond))
	e := mustDial(t, s, 0, devE, onlyThere)
	sendAndReceive(t, a, e, devE.ID, "after healing")
	sendAndReceive(t, a, d, devD.ID, "after healing")

	// The whole control plane goes from the edges' view, edge 1's grace
	// ending first and edge 0's up to a grace (7 s) later, more than the
	// one feed heartbeat (5 s) by which graces end apart when the control
	// plane goes down for all: while edge 1 is cut off, edge 0 still
	// hears for a while, which is no reason to step aside. Readiness of
	// both is watched all along.
	var unready []string
	stopWatching, watched := make(chan struct{}), make(chan struct{})
	cut1 := time.Now()
	go func() {
		defer close(watched)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stopWatching:
				return
			case <-tick.C:
			}
			for i, e := range s.Edges {
				if !s.EdgeReady(e) {
					unready = append(unready, fmt.Sprintf("edge %d at %v", i, time.Since(cut1).Round(10*time.Millisecond)))
				}
			}
		}
	}()
	s.Net.Partition([]*relaytest.Host{e1.Host}, control)
	clustertest.Eventually(t, grace+20*time.Second, cutOff(e1))
	cutOff1 := time.Now()
	// Edge 0 still hears the control plane, and edge 1 knows it.
	if v, err := s.EdgeMetric(e1, "relay_edge_mesh_peers_hearing_control"); err != nil || v != 1 {
		t.Fatalf("cut-off edge 1 counts %v peers hearing the control plane (%v), want 1", v, err)
	}
	cut0 := time.Now()
	s.Net.Partition([]*relaytest.Host{e0.Host}, control)
	clustertest.Eventually(t, grace+20*time.Second, cutOff(e0))
	gap := time.Since(cutOff1)
	t.Logf("whole control plane gone: edge 0 cut off %v after edge 1 (%v after its own cut)", gap.Round(10*time.Millisecond), time.Since(cut0).Round(10*time.Millisecond))
	refused(0)
	refused(1)
	// Between sessions of one edge: edge 1's lease ran out while edge 0
	// still heard the control plane, so edge 0 no longer routes to it.
	sendAndReceive(t, a, e, devE.ID, "with the whole control plane gone")
	// Watched until past the time a step aside would have taken
	// (observation window, workload time).
	<-time.After(time.Until(cut0.Add(grace + server.StepAsideAfter + 2*time.Second)))
	close(stopWatching)
	<-watched
	if len(unready) > 0 {
		t.Fatalf("with no edge hearing the control plane, an edge was not ready %d times, from %s to %s (edge 0 was cut off %v after edge 1; StepAsideAfter %v)",
			len(unready), unready[0], unready[len(unready)-1], gap.Round(10*time.Millisecond), server.StepAsideAfter)
	}
	s.Net.Heal()
	for i := range s.Edges {
		clustertest.Eventually(t, 20*time.Second, func() error { return admitted(i) })
	}
}

// The edge follows the feed through the control node it watches dying
// for good (SIGKILL, never restarted): it moves to another node, and a
// revocation made meanwhile closes the device's session.
func TestEdgeWatchMovesOffADeadControlNode(t *testing.T) {
	took := revokeWhileTheWatchedNodeFails(t, "bob", "killed", func(s *relaytest.System) { s.Control[0].Proc.Kill() })
	if took > 10*time.Second {
		t.Errorf("revocation reached the edge %v after it was made", took)
	}
}

// An edge whose control node is cut off from the other control nodes
// (the edge still reaches all three) moves its watch to a node that
// follows the writes: the cut-off node stops vouching for its copy, so
// a revocation made on the majority reaches the edge and closes the
// revoked device's session. (The cut-off node kept sending progress
// messages, the edge kept its stale copy as current, and the revoked
// device stayed connected until the edge's access token expired.)
func TestEdgeWatchMovesOffACutOffControlNode(t *testing.T) {
	revokeWhileTheWatchedNodeFails(t, "carol", "cut off", func(s *relaytest.System) {
		s.Net.Partition([]*relaytest.Host{s.Control[0].Host}, []*relaytest.Host{s.Control[1].Host, s.Control[2].Host})
	})
}

// revokeWhileTheWatchedNodeFails connects two devices of a new user to
// the one edge of three control nodes, applies fault to n1 (the node the
// edge's first watch goes to: the first URL), revokes one device through
// n2 and waits (a minute at most) until its session is closed; it
// returns how long that took after the revocation.
func revokeWhileTheWatchedNodeFails(t *testing.T, login, what string, fault func(*relaytest.System)) time.Duration {
	t.Helper()
	s := relaytest.StartSystem(t, relaytest.SystemOptions{Relayd: relayd, ControlNodes: 3, Edges: 1})
	user := s.User(login)
	devA, devB := s.Device(user, "a"), s.Device(user, "b")
	var a *client.Client
	clustertest.Eventually(t, 30*time.Second, func() error {
		var err error
		a, err = dial(t, s, 0, devA, nil)
		return err
	})
	b, err := dial(t, s, 0, devB, nil)
	if err != nil {
		t.Fatal(err)
	}
	sendAndReceive(t, a, b, devB.ID, "before")
	fault(s)
	failed := time.Now()
	clustertest.Eventually(t, 30*time.Second, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := s.Devices(s.Control[1]).RevokeDevice(ctx, relaytest.Admin(s, &controlv1.RevokeDeviceRequest{UserId: user, DeviceId: devB.ID}))
		return err
	})
	revoked := time.Now()
	clustertest.Eventually(t, time.Minute, func() error {
		if b.Err() == nil {
			return errors.New("revoked device's session still up")
		}
		return nil
	})
	took := time.Since(revoked)
	t.Logf("n1 %s; revocation through n2 %v later; session closed %v after the revocation (%v)",
		what, revoked.Sub(failed).Round(10*time.Millisecond), took.Round(10*time.Millisecond), b.Err())
	return took
}
