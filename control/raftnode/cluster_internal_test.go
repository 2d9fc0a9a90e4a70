package raftnode

import (
	"errors"
	"slices"
	"testing"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/control/fsm"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
	"github.com/edge-relay/relay/storage/state"
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

// Feature writers count every node record, members or not (apply does,
// with gated apply), and members without a record; the cluster check and
// the withdrawal count the members alone, so that a record an add in
// progress wrote does not hold them back.
func TestWhoLacksAFeature(t *testing.T) {
	st, err := state.Open(state.Config{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	f, err := fsm.New(fsm.Config{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	for i, rec := range []*statev1.Node{
		{Id: "n1", RaftAddr: "a:1", ApiAddr: "a:2", Features: []string{"x"}},
		{Id: "n2", RaftAddr: "b:1", ApiAddr: "b:2"},
		{Id: "n3", RaftAddr: "c:1", ApiAddr: "c:2"},                          // not a member
		{Id: "n5", RaftAddr: "e:1", ApiAddr: "e:2", Features: []string{"x"}}, // not a member
	} {
		data, err := proto.Marshal(&statev1.Command{ProposedAtMs: 1, Op: &statev1.Command_PutNode{PutNode: &statev1.PutNode{Node: rec}}})
		if err != nil {
			t.Fatal(err)
		}
		if res := f.Apply(&raft.Log{Index: uint64(i + 1), Term: 1, Type: raft.LogCommand, Data: data}).(*statev1.Result); fsm.ResultError(res) != nil {
			t.Fatal(res)
		}
	}
	n := &Node{fsm: f}
	servers := []raft.Server{{ID: "n1"}, {ID: "n2"}, {ID: "n4"}} // n4 has no record
	if got, err := n.membersWithout(servers, "x"); err != nil || !slices.Equal(got, []string{"n2", "n3", "n4"}) {
		t.Fatalf("membersWithout: %v, %v", got, err)
	}
	if got, err := n.onlyMembersWithout(servers, "x"); err != nil || !slices.Equal(got, []string{"n2", "n4"}) {
		t.Fatalf("onlyMembersWithout: %v, %v", got, err)
	}
}
