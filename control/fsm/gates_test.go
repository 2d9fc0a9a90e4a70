package fsm

import (
	"bytes"
	"errors"
	"io"
	"slices"
	"testing"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// withoutFeature returns Features() without f.
func withoutFeature(f string) []string {
	return slices.DeleteFunc(Features(), func(g string) bool { return g == f })
}

func putNode(id string, features []string) *statev1.Command_PutNode {
	return &statev1.Command_PutNode{PutNode: &statev1.PutNode{Node: &statev1.Node{Id: id, RaftAddr: id + ":1", ApiAddr: id + ":2", Features: features}}}
}

// Once gated apply is on, a command's field of a feature that some node
// record does not list is ignored at apply, as a release without that
// feature ignores it, at the same entry on every replica, and the result
// says so; before, the command applies as written. The switch needs
// every record to list gated_apply, and stays on.
func TestGatedApplyIgnoresWhatARecordDoesNotList(t *testing.T) {
	f := newFSM(t, Config{})
	a := &applier{t: t, f: f}
	ok := statev1.ResultCode_RESULT_CODE_OK
	sk := testSigningKey
	// rotate rotates the signing key with retire_all and returns the
	// result and how many keys are left.
	rotate := func(id string) (*statev1.Result, int) {
		t.Helper()
		a.apply(&statev1.Command_RotateSigningKey{RotateSigningKey: &statev1.RotateSigningKey{Key: sk(id + "-a"), RetainMs: 1_000_000}})
		r := a.apply(&statev1.Command_RotateSigningKey{RotateSigningKey: &statev1.RotateSigningKey{Key: sk(id), RetainMs: 1_000_000, RetireAll: true}})
		if r.Code != ok {
			t.Fatalf("rotate %s: %v", id, r)
		}
		keys, _, err := f.SigningKeys()
		if err != nil {
			t.Fatal(err)
		}
		return r, len(keys)
	}
	enable := func() *statev1.Result {
		return a.apply(&statev1.Command_EnableGatedApply{EnableGatedApply: &statev1.EnableGatedApply{}})
	}
	on := func() bool {
		t.Helper()
		on, err := f.GatedApply()
		if err != nil {
			t.Fatal(err)
		}
		return on
	}

	// No record at all: the switch stays off.
	if r := enable(); r.Code != statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION || on() {
		t.Fatalf("switched on without records: %v", r)
	}
	a.apply(putNode("n1", Features()))
	a.apply(putNode("n2", Features()))
	a.apply(putNode("n3", withoutFeature(FeatureGatedApply)))
	// A record without an API address (what AddVoter writes before the
	// node is a member) only once the switch is on.
	bare := &statev1.Command_PutNode{PutNode: &statev1.PutNode{Node: &statev1.Node{Id: "n9", RaftAddr: "n9:1", Features: Features()}}}
	if r := a.apply(bare); r.Code != statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT {
		t.Fatalf("record without an API address while the switch is off: %v", r)
	}
	// Off: applied as written, whatever the records say (the proposers'
	// check is all there is, as in releases before gated apply).
	if r, keys := rotate("s1"); keys != 1 || len(r.GetFeaturesIgnored()) != 0 {
		t.Fatalf("switch off: %d keys, %v", keys, r)
	}
	if r := enable(); r.Code != statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION || !errors.Is(ResultError(r), ErrFailedPrecondition) || on() {
		t.Fatalf("switched on while n3 does not list gated_apply: %v", r)
	}
	a.apply(putNode("n3", withoutFeature(FeatureRetireAllKeys)))
	if r := enable(); r.Code != ok || !on() {
		t.Fatalf("switch on: %v", r)
	}
	if r := a.apply(bare); r.Code != ok {
		t.Fatalf("record without an API address while the switch is on: %v", r)
	}
	a.apply(&statev1.Command_RemoveNode{RemoveNode: &statev1.RemoveNode{Id: "n9"}})
	// n3 does not list retire_all_keys: the older keys stay.
	r, keys := rotate("s2")
	if keys != 3 || !slices.Equal(r.GetFeaturesIgnored(), []string{FeatureRetireAllKeys}) {
		t.Fatalf("retire_all applied while n3 does not list it: %d keys, %v", keys, r)
	}
	a.apply(putNode("n3", Features()))
	if r, keys := rotate("s3"); keys != 1 || len(r.GetFeaturesIgnored()) != 0 {
		t.Fatalf("every record lists it: %d keys, %v", keys, r)
	}

	// In one batch, each entry sees the records as the entries before
	// it left them: a withdrawal shuts the gate for the next command, a
	// record listing the feature opens it again.
	rot := func(id string) *statev1.Command {
		return &statev1.Command{ProposedAtMs: 1_000_000 + int64(a.idx),
			Op: &statev1.Command_RotateSigningKey{RotateSigningKey: &statev1.RotateSigningKey{Key: sk(id), RetainMs: 1_000_000, RetireAll: true}}}
	}
	cmds := []*statev1.Command{
		{Op: &statev1.Command_PutNode{PutNode: &statev1.PutNode{Node: &statev1.Node{Id: "n2"}, WithdrawFeatures: true}}},
		rot("s4"),
		{Op: putNode("n2", Features())},
		rot("s5"),
	}
	var batch []*raft.Log
	for _, c := range cmds {
		a.idx++
		batch = append(batch, entry(t, a.idx, c))
	}
	out := f.ApplyBatch(batch)
	for i, want := range [][]string{nil, {FeatureRetireAllKeys}, nil, nil} {
		if r := out[i].(*statev1.Result); r.Code != ok || !slices.Equal(r.GetFeaturesIgnored(), want) {
			t.Fatalf("batch entry %d: %v, want ignored %v", i, r, want)
		}
	}
	if keys, _, _ := f.SigningKeys(); len(keys) != 1 {
		t.Fatalf("after the batch: %v", keys)
	}

	// Sticky: a record without gated_apply does not turn it off, and it
	// shuts every gated feature it does not list.
	a.apply(putNode("n4", nil))
	if r := enable(); r.Code != ok || !on() {
		t.Fatalf("switch after a record without gated_apply: %v", r)
	}
	if r, keys := rotate("s6"); keys != 3 || !slices.Equal(r.GetFeaturesIgnored(), []string{FeatureRetireAllKeys}) {
		t.Fatalf("n4 lists nothing: %d keys, %v", keys, r)
	}
	// A record removed counts no more.
	a.apply(&statev1.Command_RemoveNode{RemoveNode: &statev1.RemoveNode{Id: "n4"}})
	if r, keys := rotate("s7"); keys != 1 || len(r.GetFeaturesIgnored()) != 0 {
		t.Fatalf("n4 removed: %d keys, %v", keys, r)
	}
	// A command without the feature's fields is not reported.
	a.apply(putNode("n4", nil))
	if r := a.apply(&statev1.Command_RotateSigningKey{RotateSigningKey: &statev1.RotateSigningKey{Key: sk("s8")}}); r.Code != ok || len(r.GetFeaturesIgnored()) != 0 {
		t.Fatalf("plain rotation: %v", r)
	}

	// The switch goes with the state: a snapshot restored elsewhere has
	// it, and the MembersVersion moved.
	g := newFSM(t, Config{})
	v := g.MembersVersion()
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var sink bufSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatal(err)
	}
	snap.Release()
	if err := g.Restore(io.NopCloser(bytes.NewReader(sink.Bytes()))); err != nil {
		t.Fatal(err)
	}
	if on, _ := g.GatedApply(); !on || g.MembersVersion() == v {
		t.Fatalf("restored: gated apply %v, members version %d (was %d)", on, g.MembersVersion(), v)
	}
}

// MembersVersion moves with a batch that changes a node record or the
// configuration, and not with other batches.
func TestMembersVersion(t *testing.T) {
	f := newFSM(t, Config{})
	a := &applier{t: t, f: f}
	v := f.MembersVersion()
	a.apply(&statev1.Command_Noop{Noop: &statev1.Noop{}})
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "u", Login: "u"}}})
	if f.MembersVersion() != v {
		t.Fatal("moved without a record change")
	}
	a.apply(putNode("n1", nil))
	if f.MembersVersion() == v {
		t.Fatal("a new record did not move it")
	}
	v = f.MembersVersion()
	a.idx++
	f.Apply(&raft.Log{Index: a.idx, Term: 1, Type: raft.LogConfiguration, Data: []byte("conf")})
	if f.MembersVersion() == v {
		t.Fatal("a configuration entry did not move it")
	}
	v = f.MembersVersion()
	a.apply(&statev1.Command_RemoveNode{RemoveNode: &statev1.RemoveNode{Id: "n1"}})
	if f.MembersVersion() == v {
		t.Fatal("a removal did not move it")
	}
}

// gatedSamples holds, for each feature gated at apply, commands that
// carry its fields, each with the command as a release without the
// feature applies it.
func gatedSamples() map[string][][2]*statev1.Command {
	attempt := &statev1.LoginAttempt{Login: "l"}
	return map[string][][2]*statev1.Command{
		FeatureChangePassword: {{
			{Op: &statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "u", Succeeded: attempt, ExpectPasswordHash: "h"}}},
			{Op: &statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "u"}}},
		}},
		FeatureOnlyUserAccount: {
			{{Op: &statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "u", OnlyUserAccount: true}}}, {Op: &statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "u"}}}},
			{{Op: &statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: "u", OnlyUserAccount: true}}}, {Op: &statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: "u"}}}},
			{{Op: &statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{OnlyUserAccount: true}}}, {Op: &statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{}}}},
			{{Op: &statev1.Command_RevokeDevice{RevokeDevice: &statev1.RevokeDevice{DeviceId: "d", OnlyUserAccount: true}}}, {Op: &statev1.Command_RevokeDevice{RevokeDevice: &statev1.RevokeDevice{DeviceId: "d"}}}},
			{{Op: &statev1.Command_DeleteDevice{DeleteDevice: &statev1.DeleteDevice{DeviceId: "d", OnlyUserAccount: true}}}, {Op: &statev1.Command_DeleteDevice{DeleteDevice: &statev1.DeleteDevice{DeviceId: "d"}}}},
			{{Op: &statev1.Command_RenameDevice{RenameDevice: &statev1.RenameDevice{DeviceId: "d", OnlyUserAccount: true}}}, {Op: &statev1.Command_RenameDevice{RenameDevice: &statev1.RenameDevice{DeviceId: "d"}}}},
		},
		FeatureMailboxPurge: {
			{{Op: &statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: "u", PurgeLimit: 9}}}, {Op: &statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: "u"}}}},
			{{Op: &statev1.Command_RevokeDevice{RevokeDevice: &statev1.RevokeDevice{DeviceId: "d", PurgeLimit: 9}}}, {Op: &statev1.Command_RevokeDevice{RevokeDevice: &statev1.RevokeDevice{DeviceId: "d"}}}},
			{{Op: &statev1.Command_DeleteDevice{DeleteDevice: &statev1.DeleteDevice{DeviceId: "d", PurgeLimit: 9}}}, {Op: &statev1.Command_DeleteDevice{DeleteDevice: &statev1.DeleteDevice{DeviceId: "d"}}}},
			{{Op: &statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{Limit: 3, PurgeLimit: 9}}}, {Op: &statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{Limit: 3}}}},
		},
		FeatureMailboxReplaceExpired: {{
			{Op: &statev1.Command_PutMailbox{PutMailbox: &statev1.PutMailbox{MaxEntriesPerDevice: 2, ReplaceExpired: true}}},
			{Op: &statev1.Command_PutMailbox{PutMailbox: &statev1.PutMailbox{MaxEntriesPerDevice: 2}}},
		}},
		FeatureClaimRecordGrace: {{
			{Op: &statev1.Command_ClaimEvents{ClaimEvents: &statev1.ClaimEvents{Claims: []*statev1.EventClaim{{EventId: "e"}}, RecordGraceMs: 5}}},
			{Op: &statev1.Command_ClaimEvents{ClaimEvents: &statev1.ClaimEvents{Claims: []*statev1.EventClaim{{EventId: "e"}}}}},
		}},
		FeatureLoginCeiling: {{
			{Op: &statev1.Command_LoginAttempt{LoginAttempt: &statev1.LoginAttempt{Login: "l", Policy: &statev1.ThrottlePolicy{AddrFree: 2, LoginCeiling: 7}}}},
			{Op: &statev1.Command_LoginAttempt{LoginAttempt: &statev1.LoginAttempt{Login: "l", Policy: &statev1.ThrottlePolicy{AddrFree: 2}}}},
		}},
		FeatureRetireAllKeys: {
			{{Op: &statev1.Command_RotateSigningKey{RotateSigningKey: &statev1.RotateSigningKey{RetainMs: 4, RetireAll: true}}}, {Op: &statev1.Command_RotateSigningKey{RotateSigningKey: &statev1.RotateSigningKey{RetainMs: 4}}}},
			{{Op: &statev1.Command_RotateSessionKey{RotateSessionKey: &statev1.RotateSessionKey{GraceMs: 4, RetireAll: true}}}, {Op: &statev1.Command_RotateSessionKey{RotateSessionKey: &statev1.RotateSessionKey{GraceMs: 4}}}},
		},
	}
}

// Every feature gated at apply clears exactly its own fields, and a
// feature added to Features must be given its fields (or be said not to
// be gated at apply) before this passes.
func TestEveryGatedFeatureHasItsFields(t *testing.T) {
	samples := gatedSamples()
	for _, feature := range Features() {
		if !gatedAtApply(feature) {
			if _, ok := samples[feature]; ok {
				t.Errorf("%s has samples but is not gated at apply", feature)
			}
			continue
		}
		if len(samples[feature]) == 0 {
			t.Errorf("feature %s is gated at apply but has no sample command: add its fields to ignoreFeature and a sample here", feature)
		}
		for i, s := range samples[feature] {
			cmd := proto.Clone(s[0]).(*statev1.Command)
			if !ignoreFeature(feature, cmd) || !proto.Equal(cmd, s[1]) {
				t.Errorf("%s sample %d: ignoring it gave %v, want %v", feature, i, cmd, s[1])
			}
			if ignoreFeature(feature, cmd) {
				t.Errorf("%s sample %d: reported again once cleared", feature, i)
			}
			for _, other := range Features() {
				cmd := proto.Clone(s[0]).(*statev1.Command)
				if other != feature && (ignoreFeature(other, cmd) || !proto.Equal(cmd, s[0])) {
					t.Errorf("%s sample %d: feature %s touched it: %v", feature, i, other, cmd)
				}
			}
		}
	}
	// A command of no gated feature is left alone.
	for _, feature := range Features() {
		cmd := &statev1.Command{Op: &statev1.Command_Noop{Noop: &statev1.Noop{Padding: []byte("x")}}}
		if ignoreFeature(feature, cmd) {
			t.Errorf("%s: a no-op carries it", feature)
		}
	}
}
