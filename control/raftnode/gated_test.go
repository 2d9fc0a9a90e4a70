package raftnode_test

import (
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
	"github.com/edge-relay/relay/control/server"
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

// During a rolling upgrade gated apply stays off while a member's release
// does not record it (here the first node's: a cluster of one upgraded
// node switches it on at once, and then counts the older nodes that join
// by their records); the leader switches it on once every member does.
// From then on, a command that carries the field of a feature added
// after gated_apply while a member's record does not list it (what a
// writer sends whose replica had not applied that member's withdrawal
// yet) applies without that field on every replica, the stopped member's
// included once it runs again, and the result says so; once the member
// records its features again, the same command applies whole.
func TestGatedApplyIgnoresWhatAStoppedMemberWithdrew(t *testing.T) {
	rel := newReleases(fsm.FeatureGatedApply, "n2", "n3")
	c := clustertest.Start(t, 3, clustertest.Options{Configure: func(cfg *server.Config) {
		rel.configure(cfg)
		cfg.MailboxExpireEvery = 100 * time.Millisecond
	}})
	ctx := ctxT(t, 2*time.Minute)
	c.WaitReady()
	c.WaitFeature(fsm.FeatureMailboxExpireBytes)
	// Every member records its features, n1 without gated apply: off.
	// A feature gated at apply is not written then, though every member
	// lists it: only the writer's replica would check the records.
	waitGatedApply(t, c, false)
	for _, n := range c.Running() {
		if n.Server.Node().EveryMemberHas(fsm.FeatureMailboxExpireBytes) {
			t.Fatalf("%s would write %s with gated apply off", n.ID, fsm.FeatureMailboxExpireBytes)
		}
	}

	rel.upgrade("n1")
	c.Shutdown(0)
	c.Restart(0)
	c.WaitReady()
	waitGatedApply(t, c, true)
	c.WaitFeatureUsable(fsm.FeatureMailboxExpireBytes)

	if _, err := c.CreateUser(ctx, 0, "u"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.RegisterDevice(ctx, 0, "u", "d"); err != nil {
		t.Fatal(err)
	}
	// expire stores three events of 10 bytes for d, due in 50 s (so the
	// leader's own expiry leaves them while the test runs), then expires
	// through node i as of 55 s on (a command may be stamped up to a
	// minute from the leader's clock), at most 10 bytes, as a writer
	// does that found every member with the feature.
	expire := func(i int) *statev1.Result {
		t.Helper()
		now := time.Now()
		var entries []*statev1.MailboxEntry
		for k := range 3 {
			entries = append(entries, &statev1.MailboxEntry{UserId: "u", DeviceId: "d", SenderDeviceId: "s",
				EventId: fmt.Sprint(now.UnixNano(), "-", k), Event: make([]byte, 10), ExpiresAtMs: now.Add(50 * time.Second).UnixMilli()})
		}
		node := c.Nodes[i].Server.Node()
		if _, err := node.Apply(ctx, &statev1.Command{Op: &statev1.Command_PutMailbox{PutMailbox: &statev1.PutMailbox{Entries: entries}}}); err != nil {
			t.Fatal(err)
		}
		res, err := node.Apply(ctx, &statev1.Command{ProposedAtMs: now.Add(55 * time.Second).UnixMilli(),
			Op: &statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{MaxBytes: 10}}})
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	// held returns how many entries the replicas, converged, hold for d.
	held := func() uint64 {
		t.Helper()
		c.WaitConverged()
		mb, err := c.Nodes[0].Server.Node().FSM().Mailbox("d")
		if err != nil {
			t.Fatal(err)
		}
		return mb.GetCount()
	}

	stopped := c.Follower()
	c.Shutdown(stopped)
	l := c.Leader()
	if rec, err := c.Nodes[l].Server.Node().FSM().GetNode(c.Nodes[stopped].ID); err != nil || !rec.GetFeaturesWithdrawn() {
		t.Fatalf("%s's record after its graceful stop: %v, %v", c.Nodes[stopped].ID, rec, err)
	}
	if res := expire(l); !slices.Equal(res.GetFeaturesIgnored(), []string{fsm.FeatureMailboxExpireBytes}) {
		t.Fatalf("max_bytes with a member's features withdrawn: %v", res)
	}
	if n := c.Nodes[l].LabeledMetric(t, "relay_control_features_ignored_total", "feature", fsm.FeatureMailboxExpireBytes); n != 1 {
		t.Fatalf("the leader counted %v commands with a feature ignored, want 1", n)
	}
	c.Restart(stopped)
	c.WaitReady()
	if n := held(); n != 0 {
		t.Fatalf("the replicas hold %d entries, want none (max_bytes ignored)", n)
	}

	c.WaitFeature(fsm.FeatureMailboxExpireBytes)
	if res := expire(c.Leader()); len(res.GetFeaturesIgnored()) != 0 {
		t.Fatalf("max_bytes once every member records it again: %v", res)
	}
	if n := held(); n != 2 {
		t.Fatalf("the replicas hold %d entries after a bounded expiry, want 2", n)
	}

	// The leader's own expiry reads at most fsm.DefaultExpireBytes, now
	// that every member records the feature.
	soon := &statev1.MailboxEntry{UserId: "u", DeviceId: "d", SenderDeviceId: "s", EventId: "soon",
		Event: make([]byte, 10), ExpiresAtMs: time.Now().Add(300 * time.Millisecond).UnixMilli()}
	if _, err := c.Nodes[0].Server.Node().Apply(ctx, &statev1.Command{Op: &statev1.Command_PutMailbox{PutMailbox: &statev1.PutMailbox{Entries: []*statev1.MailboxEntry{soon}}}}); err != nil {
		t.Fatal(err)
	}
	clustertest.Eventually(t, 30*time.Second, func() error {
		if n := held(); n != 2 {
			return fmt.Errorf("%d entries held, want 2 once the leader expired the one due", n)
		}
		return nil
	})
	cmds, err := raftnode.LogCommands(c.Nodes[c.Leader()].Server.Node())
	if err != nil {
		t.Fatal(err)
	}
	var bounds []uint64
	for _, cmd := range cmds {
		if e := cmd.GetExpireMailboxes(); e != nil && cmd.GetProposedAtMs() < time.Now().UnixMilli() {
			bounds = append(bounds, e.GetMaxBytes())
		}
	}
	if len(bounds) == 0 || bounds[len(bounds)-1] != fsm.DefaultExpireBytes {
		t.Fatalf("the leader's expiries' max_bytes: %v, want the last at %d", bounds, fsm.DefaultExpireBytes)
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
	// A record of a node that is not a member (one a failed add left)
	// holds back every feature it does not list: the leader forgets it
	// as soon as it sees it, not only at its next election.
	if _, err := l.Apply(ctxT(t, time.Minute), &statev1.Command{Op: &statev1.Command_PutNode{PutNode: &statev1.PutNode{
		Node: &statev1.Node{Id: "stranger", RaftAddr: "127.0.0.1:1"}}}}); err != nil {
		t.Fatal(err)
	}
	clustertest.Eventually(t, 30*time.Second, func() error {
		for _, n := range c.Running() {
			if _, err := n.Server.Node().FSM().GetNode("stranger"); !errors.Is(err, fsm.ErrNotFound) {
				return fmt.Errorf("%s still has the stranger's record (%v)", n.ID, err)
			}
		}
		return nil
	})
}

// When the leader fails to forget a record of a node that is not a
// member (here two writes fail, as they do while it cannot reach a
// quorum for a moment), it tries again a second later, although nothing
// else changes meanwhile that would wake it: a record left behind holds
// back every feature it does not list.
func TestTheLeaderTriesAgainToForgetAStranger(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	c.WaitReady()
	c.WaitFeature(fsm.FeatureGatedApply)
	waitGatedApply(t, c, true)
	nd := c.Nodes[0]
	l := nd.Server.Node()
	nd.Faults.FailWrites("remove_node", 2)
	if _, err := l.Apply(ctxT(t, time.Minute), &statev1.Command{Op: &statev1.Command_PutNode{PutNode: &statev1.PutNode{
		Node: &statev1.Node{Id: "stranger", RaftAddr: "127.0.0.1:1"}}}}); err != nil {
		t.Fatal(err)
	}
	put := l.FSM().MembersVersion()
	clustertest.Eventually(t, 30*time.Second, func() error {
		if _, err := l.FSM().GetNode("stranger"); !errors.Is(err, fsm.ErrNotFound) {
			return fmt.Errorf("the stranger's record is still there (%v) after %d failed tries", err, nd.Faults.FailedWrites())
		}
		return nil
	})
	if n := nd.Faults.FailedWrites(); n != 2 {
		t.Fatalf("%d tries failed, want 2", n)
	}
	// Only the removal moved the members version: the tries after the
	// failures came from the retry, not from another change.
	if v := l.FSM().MembersVersion(); v != put+1 {
		t.Fatalf("members version %d after the removal, %d after the put", v, put)
	}
}
