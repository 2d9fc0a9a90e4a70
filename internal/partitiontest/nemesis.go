package partitiontest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/edge-relay/relay/internal/relaytest"
)

// Nemesis injects faults into a System on a schedule drawn from a seed:
// the same seed gives the same sequence of faults, targets and
// durations (what the processes do meanwhile still varies with timing).
type Nemesis struct {
	S   *relaytest.System
	Rng *rand.Rand
	// Logf reports each step.
	Logf func(format string, args ...any)
	// Faults to draw from [the control plane's]: "partition-leader",
	// "partition-node", "one-way-leader", "kill", "pause", "stop"
	// (SIGTERM, then a restart) of control nodes; "edge-split" (the edges from each other), "edge-cut-control"
	// (an edge from every control node), "device-cut-edge" (the test's
	// devices from an edge), "edge-kill" (SIGKILL, then a restart),
	// "edge-pause" (SIGSTOP, SIGCONT).
	Faults []string
	// Hold is the longest a fault lasts [5s]; Calm the longest healthy
	// stretch between faults [2s].
	Hold, Calm time.Duration

	// Steps are the faults injected so far, in order.
	Steps []string
}

// Run injects faults until ctx ends, then heals everything (a killed
// node is restarted, a paused one continued).
func (n *Nemesis) Run(ctx context.Context) {
	if len(n.Faults) == 0 {
		n.Faults = []string{"partition-leader", "partition-node", "one-way-leader", "kill", "pause", "stop"}
	}
	if n.Hold <= 0 {
		n.Hold = 5 * time.Second
	}
	if n.Calm <= 0 {
		n.Calm = 2 * time.Second
	}
	start := time.Now()
	sleep := func(max time.Duration) {
		d := max/2 + time.Duration(n.Rng.Int64N(int64(max/2)+1))
		select {
		case <-ctx.Done():
		case <-time.After(d):
		}
	}
	for ctx.Err() == nil {
		sleep(n.Calm)
		if ctx.Err() != nil {
			break
		}
		kind := n.Faults[n.Rng.IntN(len(n.Faults))]
		target := n.S.Control[n.Rng.IntN(len(n.S.Control))]
		if strings.Contains(kind, "leader") {
			// The leader as the nodes see it; a random node when there is
			// none right now.
			if l := n.leader(); l != nil {
				target = l
			}
		}
		edge := 0
		if len(n.S.Edges) > 0 {
			edge = n.Rng.IntN(len(n.S.Edges))
		}
		name := target.ID
		if strings.HasPrefix(kind, "edge") || strings.HasPrefix(kind, "device") {
			name = n.S.Edges[edge].ID
		}
		step := fmt.Sprintf("%6.1fs %s %s", time.Since(start).Seconds(), kind, name)
		n.Steps = append(n.Steps, step)
		n.Logf("nemesis: %s", step)
		var undo func()
		switch kind {
		case "edge-split":
			var groups [][]*relaytest.Host
			for _, e := range n.S.Edges {
				groups = append(groups, []*relaytest.Host{e.Host})
			}
			n.S.Net.Partition(groups...)
			undo = n.S.Net.Heal
		case "edge-cut-control":
			var control []*relaytest.Host
			for _, c := range n.S.Control {
				control = append(control, c.Host)
			}
			n.S.Net.Partition([]*relaytest.Host{n.S.Edges[edge].Host}, control)
			undo = n.S.Net.Heal
		case "device-cut-edge":
			n.S.Net.Cut(n.S.Net.Client, n.S.Edges[edge].Host)
			undo = n.S.Net.Heal
		case "edge-kill":
			n.S.Edges[edge].Proc.Kill()
			undo = func() { n.S.StartEdge(edge) }
		case "partition-leader", "partition-node":
			n.S.Net.Partition([]*relaytest.Host{target.Host}, n.others(target))
			undo = n.S.Net.Heal
		case "one-way-leader":
			for _, o := range n.others(target) {
				n.S.Net.CutOneWay(target.Host, o)
			}
			undo = n.S.Net.Heal
		case "kill":
			target.Proc.Kill()
			i := n.index(target)
			undo = func() { n.S.RestartControl(i) }
		case "pause":
			_ = target.Proc.Pause()
			undo = func() { _ = target.Proc.Resume() }
		case "stop":
			// A graceful stop hands leadership over and finishes what it
			// can; whatever it cuts off must answer "outcome unknown".
			if err := target.Proc.Stop(30 * time.Second); err != nil {
				n.Logf("nemesis: stop %s: %v", target.ID, err)
			}
			i := n.index(target)
			undo = func() { n.S.RestartControl(i) }
		case "edge-pause":
			e := n.S.Edges[edge]
			_ = e.Proc.Pause()
			undo = func() { _ = e.Proc.Resume() }
		}
		sleep(n.Hold)
		n.Logf("nemesis: %6.1fs heal %s %s", time.Since(start).Seconds(), kind, name)
		undo()
	}
}

func (n *Nemesis) leader() *relaytest.ControlNode {
	for _, c := range n.S.Control {
		if c.Proc.Exited() || c.Proc.Paused() {
			continue
		}
		if st, err := n.S.Status(c, 500*time.Millisecond); err == nil && st.GetState() == "Leader" {
			return c
		}
	}
	return nil
}

func (n *Nemesis) others(c *relaytest.ControlNode) []*relaytest.Host {
	var hs []*relaytest.Host
	for _, o := range n.S.Control {
		if o != c {
			hs = append(hs, o.Host)
		}
	}
	for _, e := range n.S.Edges {
		hs = append(hs, e.Host)
	}
	return hs
}

func (n *Nemesis) index(c *relaytest.ControlNode) int {
	for i, o := range n.S.Control {
		if o == c {
			return i
		}
	}
	return -1
}
