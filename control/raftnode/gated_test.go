package raftnode_test

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// waitGatedApply waits until every running node's state has gated apply
// on, or off.
func waitGatedApply(t *testing.T, c *clustertest.Cluster, want bool) {
	t.Helper()
	clustertest.Eventually(t, 30*time.Second, func() error {
		for _, n := range c.Running() {
			if on, err := n.Server.Node().FSM().GatedApply(); err != nil || on != want {
				return fmt.Errorf("%s: gated apply %v (%v), want %v", n.ID, on, err, want)
			}
		}
		return nil
	})
}

// sessionKeys returns how many session keys node i's replica holds.
func sessionKeys(t *testing.T, c *clustertest.Cluster, i int) int {
	t.Helper()
	ring, err := c.Nodes[i].Server.Node().FSM().SessionKeyRing()
	if err != nil {
		t.Fatal(err)
	}
	return len(ring.GetKeys())
}

// During a rolling upgrade gated apply stays off while a member's release
// does not record it (here the first node's: a cluster of one upgraded
// node switches it on at once, and then counts the older nodes that join
// by their records); the leader switches it on once every member does.
// From then on, a command that carries a feature's field while a member's
// record does not list it (what a proposer writes whose replica had not
// applied that member's withdrawal yet) applies without that field on
// every replica, the stopped member's included once it runs again, and
// the result says so; once the member records its features again, the
// same command applies whole.
func TestGatedApplyIgnoresWhatAStoppedMemberWithdrew(t *testing.T) {
	rel := newReleases(fsm.FeatureGatedApply, "n2", "n3")
	c := clustertest.Start(t, 3, clustertest.Options{Configure: rel.configure})
	ctx := ctxT(t, 2*time.Minute)
	c.WaitReady()
	c.WaitFeature(fsm.FeatureRetireAllKeys)
	// Every member records its features, n1 without gated apply: off.
	waitGatedApply(t, c, false)

	rel.upgrade("n1")
	c.Shutdown(0)
	c.Restart(0)
	c.WaitReady()
	waitGatedApply(t, c, true)

	// rotate writes a session key rotation through node i, with
	// retire_all, as a proposer does that found every member with the
	// feature.
	rotate := func(i int, retireAll bool) *statev1.Result {
		t.Helper()
		cmd, _, err := api.NewSessionKeyCommand(time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		cmd.GetRotateSessionKey().RetireAll = retireAll
		res, err := c.Nodes[i].Server.Node().Apply(ctx, cmd)
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	stopped := c.Follower()
	c.Shutdown(stopped)
	l := c.Leader()
	if rec, err := c.Nodes[l].Server.Node().FSM().GetNode(c.Nodes[stopped].ID); err != nil || !rec.GetFeaturesWithdrawn() {
		t.Fatalf("%s's record after its graceful stop: %v, %v", c.Nodes[stopped].ID, rec, err)
	}
	rotate(l, false)
	res := rotate(l, true)
	if !slices.Equal(res.GetFeaturesIgnored(), []string{fsm.FeatureRetireAllKeys}) {
		t.Fatalf("retire_all with a member's features withdrawn: %v", res)
	}
	c.Restart(stopped)
	c.WaitReady()
	c.WaitConverged()
	for i := range c.Nodes {
		if got := sessionKeys(t, c, i); got != 3 {
			t.Fatalf("%s holds %d session keys, want 3 (retire_all ignored)", c.Nodes[i].ID, got)
		}
	}

	c.WaitFeature(fsm.FeatureRetireAllKeys)
	if res := rotate(c.Leader(), true); len(res.GetFeaturesIgnored()) != 0 {
		t.Fatalf("retire_all once every member records it again: %v", res)
	}
	c.WaitConverged()
	for i := range c.Nodes {
		if got := sessionKeys(t, c, i); got != 1 {
			t.Fatalf("%s holds %d session keys after retire_all, want 1", c.Nodes[i].ID, got)
		}
	}
}

// Once gated apply is on, a voter being added has a record (its
// addresses, no features) before the configuration entry that makes it
// a member, so that apply counts it from its first entry on; it then
// records its own features.
func TestAVoterIsRecordedBeforeItIsAMember(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	waitGatedApply(t, c, true)
	nd := c.AddNode()
	c.WaitReady()
	l := c.Nodes[c.Leader()].Server.Node()
	added, err := raftnode.ConfigurationIndex(l)
	if err != nil || added == 0 {
		t.Fatalf("configuration entry: %d, %v", added, err)
	}
	changes, err := l.FSM().Changes(0, 10_000)
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(changes, func(ch *statev1.Change) bool {
		return ch.GetKind() == statev1.ChangeKind_CHANGE_KIND_NODE_PUT && ch.GetNode().GetId() == nd.ID
	})
	if i < 0 {
		t.Fatalf("no record of %s in the change feed", nd.ID)
	}
	if first := changes[i]; first.GetRevision() >= added || len(first.GetNode().GetFeatures()) != 0 {
		t.Fatalf("%s's first record at %d (%v); it became a member at %d", nd.ID, first.GetRevision(), first.GetNode(), added)
	}
	clustertest.Eventually(t, 30*time.Second, func() error {
		rec, err := l.FSM().GetNode(nd.ID)
		if err != nil {
			return err
		}
		if !slices.Equal(rec.GetFeatures(), fsm.Features()) || rec.GetApiAddr() == "" {
			return fmt.Errorf("%s's record: %v", nd.ID, rec)
		}
		return nil
	})
	// A record of a node that is not a member counts for proposers as it
	// does for apply.
	if _, err := l.Apply(ctxT(t, time.Minute), &statev1.Command{Op: &statev1.Command_PutNode{PutNode: &statev1.PutNode{
		Node: &statev1.Node{Id: "stranger", RaftAddr: "127.0.0.1:1"}}}}); err != nil {
		t.Fatal(err)
	}
	if without, err := l.MembersWithout(fsm.FeatureRetireAllKeys); err != nil || !slices.Equal(without, []string{"stranger"}) {
		t.Fatalf("members without retire_all_keys: %v, %v", without, err)
	}
}
