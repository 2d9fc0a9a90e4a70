package fsm

import (
	"testing"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// FuzzApply applies arbitrary bytes as a log entry to a small world
// (users, devices, a mailbox): whatever they hold, applying answers with
// a result and does not panic (which would stop every replica at the same
// entry), and a command refused without a request id writes nothing.
func FuzzApply(f *testing.F) {
	seeds := []*statev1.Command{
		{ProposedAtMs: 5, Op: &statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "carol", Login: "carol"}}}},
		{ProposedAtMs: 5, Op: &statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: "a3", UserId: "alice", Name: "n", PublicKey: key32(9)}}}},
		{ProposedAtMs: 5, Op: &statev1.Command_RevokeDevice{RevokeDevice: &statev1.RevokeDevice{UserId: "alice", DeviceId: "a1"}}},
		{ProposedAtMs: 5, Op: &statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: "bob"}}},
		{ProposedAtMs: 5, RequestId: "r1", Op: &statev1.Command_PutMailbox{PutMailbox: &statev1.PutMailbox{Entries: []*statev1.MailboxEntry{mail("alice", "a1", "a2", "e1", 10, far)}}}},
		{ProposedAtMs: 5, Op: &statev1.Command_AckMailbox{AckMailbox: &statev1.AckMailbox{DeviceId: "a1", Seqs: []uint64{1, 2}}}},
		{ProposedAtMs: 5, Op: &statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{}}},
		{ProposedAtMs: 5, Op: &statev1.Command_ClaimEvents{ClaimEvents: &statev1.ClaimEvents{}}},
		{ProposedAtMs: 5, Op: &statev1.Command_PutNode{PutNode: &statev1.PutNode{}}},
		{ProposedAtMs: 5, Op: &statev1.Command_InitCluster{InitCluster: &statev1.InitCluster{}}},
		{ProposedAtMs: 5, Op: &statev1.Command_LoginAttempt{LoginAttempt: &statev1.LoginAttempt{}}},
		{ProposedAtMs: 5, Op: &statev1.Command_RehashPassword{RehashPassword: &statev1.RehashPassword{UserId: "alice", ExpectPasswordHash: "x", PasswordHash: "y"}}},
		{ProposedAtMs: 5, Op: &statev1.Command_Noop{Noop: &statev1.Noop{}}},
	}
	for _, c := range seeds {
		b, err := proto.Marshal(c)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte{0xff, 0x01})
	f.Fuzz(func(t *testing.T, data []byte) {
		fsm, a := mailboxWorld(t, Config{PruneEvery: 1 << 40})
		before, err := fsm.Digest()
		if err != nil {
			t.Fatal(err)
		}
		idx := a.idx + 1
		res, _ := fsm.Apply(&raft.Log{Index: idx, Term: 1, Type: raft.LogCommand, Data: data}).(*statev1.Result)
		if res == nil {
			t.Fatal("no result")
		}
		if fsm.AppliedIndex() != idx {
			t.Fatalf("applied %d after entry %d", fsm.AppliedIndex(), idx)
		}
		var cmd statev1.Command
		if res.GetCode() == statev1.ResultCode_RESULT_CODE_OK || (proto.Unmarshal(data, &cmd) == nil && cmd.GetRequestId() != "") {
			return
		}
		if after, err := fsm.Digest(); err != nil || after != before {
			t.Fatalf("refused (%v %q) and wrote: %v", res.GetCode(), res.GetMessage(), err)
		}
	})
}
