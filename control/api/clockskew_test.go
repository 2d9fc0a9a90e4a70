package api_test

import (
	"errors"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// Apply decides expiry by a command's time, its proposer's clock: one
// node with its clock a year ahead would expire every refresh token and
// login record on every replica at its next pruning revision, one a year
// behind would keep honouring expired ones. The leader refuses a command
// stamped more than MaxProposalSkew from its own clock, proposed on it or
// forwarded by a follower, and nothing is written; within the bound it
// goes through.
func TestACommandStampedFarFromTheLeadersClockIsRefused(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	ctx := ctxT(t, time.Minute)
	leader, follower := c.Leader(), c.Follower()
	create := func(node int, id string, at time.Time) error {
		_, err := c.Nodes[node].Server.Node().Apply(ctx, &statev1.Command{ProposedAtMs: at.UnixMilli(),
			Op: &statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: id, Login: id}}}})
		return err
	}
	for _, tc := range []struct {
		name, id string
		node     int
		off      time.Duration
	}{
		{"on the leader, a year ahead", "u1", leader, 365 * 24 * time.Hour},
		{"on the leader, a year behind", "u2", leader, -365 * 24 * time.Hour},
		{"through a follower, a year ahead", "u3", follower, 365 * 24 * time.Hour},
		{"through a follower, two minutes behind", "u4", follower, -2 * time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := tc.id
			err := create(tc.node, id, time.Now().Add(tc.off))
			if !errors.Is(err, raftnode.ErrClockSkew) {
				t.Fatalf("a command stamped %v off: %v, want ErrClockSkew", tc.off, err)
			}
			if _, err := c.Nodes[leader].Server.Node().FSM().GetUser(id); !errors.Is(err, fsm.ErrNotFound) {
				t.Fatalf("the refused command's user is in the state: %v", err)
			}
		})
	}
	if err := create(follower, "near", time.Now().Add(20*time.Second)); err != nil {
		t.Fatalf("a command stamped 20 s ahead, through a follower: %v", err)
	}
}
