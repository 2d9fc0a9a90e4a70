package partitiontest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/internal/relaytest"
)

const relayTTL = 2 * time.Minute

// traffic runs senders and receivers, recording into a RelayLog.
type traffic struct {
	log  *RelayLog
	stop chan struct{}
	wg   sync.WaitGroup // the receivers
	// senders end on stop, once the event they are sending is acked or
	// failed: an ack after finish stopped waiting would find its event
	// missing at a receiver already closed.
	senders sync.WaitGroup
}

func newTraffic() *traffic { return &traffic{log: NewRelayLog(), stop: make(chan struct{})} }

// send makes c send events to targets, one at a time, until Stop.
func (tr *traffic) send(c *client.Client, sender string, targets []string) {
	tr.senders.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-tr.stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			id := fmt.Sprintf("%s-%d", sender, i)
			tr.log.Sending(sender, id, targets, relayTTL)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			err := c.Send(ctx, client.Message{ID: id, Targets: targets, Type: "t", TTL: relayTTL})
			cancel()
			if err == nil {
				tr.log.Acked(id)
			} else if c.Err() != nil {
				return
			}
		}
	})
}

// receive records what c gets until it is closed.
func (tr *traffic) receive(c *client.Client, device string) {
	tr.wg.Go(func() {
		for {
			ev, err := c.Receive(context.Background())
			if err != nil {
				return
			}
			tr.log.Received(device, ev.Sender, ev.ID)
		}
	})
}

// finish stops the senders and waits for their last sends, waits until
// every acknowledged event has arrived (or within passed), closes the
// clients and checks the log.
func (tr *traffic) finish(t *testing.T, within time.Duration, clients ...*client.Client) {
	t.Helper()
	close(tr.stop)
	tr.senders.Wait()
	tr.log.WaitComplete(within)
	for _, c := range clients {
		_ = c.Close()
	}
	tr.wg.Wait()
	sent, acked, delivered := tr.log.Stats()
	t.Logf("relay: %d events sent, %d acknowledged, %d deliveries", sent, acked, delivered)
	bad := tr.log.Check()
	for i, b := range bad {
		if i == 20 {
			t.Errorf("... and %d more", len(bad)-20)
			break
		}
		t.Errorf("relay: %s", b)
	}
}

func relaySystem(t *testing.T, extra ...string) *relaytest.System {
	return relaytest.StartSystem(t, relaytest.SystemOptions{Relayd: relayd, ControlNodes: 3, Edges: 2,
		EdgeArgs: func(int) []string {
			return append([]string{"--mesh-idle-timeout", "3s", "--idle-timeout", "4s"}, extra...)
		}})
}

func mustDial(t *testing.T, s *relaytest.System, i int, d relaytest.SystemDevice, adjust func(*client.Config)) *client.Client {
	t.Helper()
	var c *client.Client
	clustertest.Eventually(t, 30*time.Second, func() error {
		var err error
		c, err = dial(t, s, i, d, adjust)
		return err
	})
	return c
}

// Two edges that cannot reach each other: events between their devices
// go through the mailboxes, and every event a sender saw acknowledged
// reaches each target once, in order, during or after the split.
func TestEdgesSplitFromEachOther(t *testing.T) {
	s := relaySystem(t)
	user := s.User("carol")
	s1, r1, s2, r2 := s.Device(user, "s1"), s.Device(user, "r1"), s.Device(user, "s2"), s.Device(user, "r2")
	onE1 := func(c *client.Config) { c.OtherAddrs = nil }
	onE2 := func(c *client.Config) { c.OtherAddrs = nil }
	cs1, cr1 := mustDial(t, s, 0, s1, onE1), mustDial(t, s, 0, r1, onE1)
	cs2, cr2 := mustDial(t, s, 1, s2, onE2), mustDial(t, s, 1, r2, onE2)
	tr := newTraffic()
	tr.receive(cr1, r1.ID)
	tr.receive(cr2, r2.ID)
	tr.send(cs1, s1.ID, []string{r1.ID, r2.ID})
	tr.send(cs2, s2.ID, []string{r1.ID, r2.ID})
	time.Sleep(2 * time.Second) // traffic before the split (workload time)
	_, before, _ := tr.log.Stats()
	stored := func() float64 {
		total := 0.0
		for _, e := range s.Edges {
			v, err := s.EdgeMetric(e, "relay_edge_mailbox_entries_total")
			if err != nil {
				t.Fatal(err)
			}
			total += v
		}
		return total
	}
	storedBefore := stored()
	s.Net.Cut(s.Edges[0].Host, s.Edges[1].Host)
	time.Sleep(8 * time.Second) // the split lasts (workload time)
	_, during, _ := tr.log.Stats()
	storedDuring := stored() - storedBefore
	s.Net.Heal()
	time.Sleep(3 * time.Second) // traffic after healing (workload time)
	t.Logf("acknowledged: %d before the split, %d during it (8 s); mailbox entries written during it: %v", before, during-before, storedDuring)
	if storedDuring == 0 {
		t.Errorf("no event went to a mailbox during the split")
	}
	tr.finish(t, 60*time.Second, cs1, cr1, cs2, cr2)
}

// A device cut off from its edge (the network between them drops
// everything): the client notices within its idle timeout, resumes on
// the other edge, and receives every event acknowledged to the sender
// once, in order.
func TestDeviceCutOffFromItsEdge(t *testing.T) {
	s := relaySystem(t)
	user := s.User("dave")
	snd, rcv := s.Device(user, "sender"), s.Device(user, "receiver")
	cs := mustDial(t, s, 1, snd, func(c *client.Config) { c.OtherAddrs = nil })
	var mu sync.Mutex
	var moved time.Time
	var resumed bool
	cr := mustDial(t, s, 0, rcv, func(c *client.Config) {
		c.IdleTimeout = 4 * time.Second
		c.OnSession = func(si client.SessionInfo) {
			mu.Lock()
			defer mu.Unlock()
			if si.Edge == s.Edges[1].Addr() && moved.IsZero() {
				moved, resumed = time.Now(), si.Resumed
			}
		}
	})
	tr := newTraffic()
	tr.receive(cr, rcv.ID)
	tr.send(cs, snd.ID, []string{rcv.ID})
	time.Sleep(2 * time.Second) // traffic before the cut (workload time)
	cut := time.Now()
	// The devices' port only: the test still reads the edge's metrics.
	s.Net.CutPort(s.Net.Client, s.Edges[0].Host, "udp", relaytest.PortEdge)
	s.Net.CutPort(s.Net.Client, s.Edges[0].Host, "tcp", relaytest.PortEdge)
	clustertest.Eventually(t, 30*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if moved.IsZero() {
			return fmt.Errorf("receiver not on edge 2 yet")
		}
		return nil
	})
	mu.Lock()
	t.Logf("receiver on the other edge %v after the cut (idle timeout 4 s; resumed with its ticket: %v)", moved.Sub(cut).Round(10*time.Millisecond), resumed)
	mu.Unlock()
	// The edge it left lets the session go within its idle timeout (4 s).
	clustertest.Eventually(t, 15*time.Second, func() error {
		n, err := s.EdgeMetric(s.Edges[0], "relay_edge_sessions")
		if err != nil {
			return err
		}
		if n != 0 {
			return fmt.Errorf("edge 1 holds %v sessions", n)
		}
		return nil
	})
	t.Logf("edge 1 dropped the receiver's session %v after the cut (its idle timeout 4 s)", time.Since(cut).Round(10*time.Millisecond))

	time.Sleep(3 * time.Second) // traffic after the move (workload time)
	s.Net.Heal()
	tr.finish(t, 60*time.Second, cs, cr)
}

// A seeded nemesis over the whole relay: control-plane partitions, kills
// and pauses, edges split from each other and from the control plane,
// the devices cut off from an edge, edges killed and restarted; devices
// on both edges send to each other all along (moving between edges as
// they must). Every event a sender saw acknowledged reaches each target
// exactly once, in order, within its TTL.
func TestRelayNemesis(t *testing.T) {
	seed, d, out := chaosConfig(t, 20*time.Second)
	s := relaySystem(t)
	keepOnFailure(t, s, nil, out)
	user := s.User("erin")
	var devs []relaytest.SystemDevice
	var clients []*client.Client
	for i := range 4 {
		dev := s.Device(user, fmt.Sprintf("d%d", i))
		devs = append(devs, dev)
		clients = append(clients, mustDial(t, s, i%2, dev, func(c *client.Config) { c.IdleTimeout = 4 * time.Second }))
	}
	tr := newTraffic()
	for i, c := range clients {
		tr.receive(c, devs[i].ID)
	}
	// d0 (edge 1) and d1 (edge 2) send to everyone else.
	tr.send(clients[0], devs[0].ID, []string{devs[1].ID, devs[2].ID, devs[3].ID})
	tr.send(clients[1], devs[1].ID, []string{devs[0].ID, devs[2].ID, devs[3].ID})
	faults := faultsFromEnv()
	if faults == nil {
		faults = []string{"partition-leader", "kill", "pause", "edge-split", "edge-cut-control", "device-cut-edge", "edge-kill", "edge-pause"}
	}
	nem := &Nemesis{S: s, Rng: rand.New(rand.NewPCG(seed, 2<<32)), Logf: t.Logf, Faults: faults}
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	nem.Run(ctx)
	s.Net.Heal()
	// Everyone gets going again: the senders' events are acknowledged.
	_, ackedAtHeal, _ := tr.log.Stats()
	clustertest.Eventually(t, 60*time.Second, func() error {
		if _, acked, _ := tr.log.Stats(); acked < ackedAtHeal+20 {
			return fmt.Errorf("%d events acknowledged since the last heal", acked-ackedAtHeal)
		}
		return nil
	})
	t.Logf("nemesis steps: %d", len(nem.Steps))
	tr.finish(t, 90*time.Second, clients...)
}
