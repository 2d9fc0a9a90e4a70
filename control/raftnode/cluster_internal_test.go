package raftnode

import (
	"errors"
	"testing"

	"github.com/hashicorp/raft"
)

// hashicorp/raft's refusals map to the errors the API answers with: a
// configuration change refused during a leadership hand-over (every
// graceful stop makes one) is "not the leader", which the API retries on
// the next leader, not an internal error.
func TestRaftRefusalsMapToTheNodesErrors(t *testing.T) {
	for _, tc := range []struct {
		in   error
		want error
	}{
		{raft.ErrNotLeader, ErrNotLeader},
		{raft.ErrLeadershipTransferInProgress, ErrNotLeader},
		{raft.ErrRaftShutdown, ErrShutdown},
		{raft.ErrLeadershipLost, ErrUnknownOutcome},
		{raft.ErrEnqueueTimeout, ErrUnknownOutcome},
	} {
		if err := mapRaftErr("add voter n2", tc.in); !errors.Is(err, tc.want) {
			t.Errorf("%v: mapped to %v, want %v", tc.in, err, tc.want)
		}
	}
}
