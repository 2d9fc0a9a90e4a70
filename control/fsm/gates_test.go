package fsm

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
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

// Once gated apply is on, a command's field of a feature added after
// gated_apply that some node record does not list is ignored at apply,
// as a release without that feature ignores it, at the same entry on
// every replica, and the result says so; before, the command applies as
// written. The switch needs every record to list gated_apply, and stays
// on.
func TestGatedApplyIgnoresWhatARecordDoesNotList(t *testing.T) {
	f, a := mailboxWorld(t, Config{})
	ok := statev1.ResultCode_RESULT_CODE_OK
	// expire stores three entries of 10 bytes, due at once, and expires
	// with max_bytes 10; it returns the result and how many are left.
	expire := func() (*statev1.Result, int) {
		t.Helper()
		now := 1_000_000 + int64(a.idx)
		var entries []*statev1.MailboxEntry
		for i := range 3 {
			entries = append(entries, mail("alice", "a1", "x", fmt.Sprint("e", a.idx, "-", i), 10, now+3))
		}
		if r := a.apply(putOp(entries...)); outcomes(r) != "STORED/"+fmt.Sprint(r.GetMailboxResults()[0].GetSeq())+" STORED/"+fmt.Sprint(r.GetMailboxResults()[0].GetSeq()+1)+" STORED/"+fmt.Sprint(r.GetMailboxResults()[0].GetSeq()+2) {
			t.Fatalf("put: %s", outcomes(r))
		}
		a.advanceTo(now + 3)
		r := a.apply(&statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{MaxBytes: 10}})
		if r.Code != ok {
			t.Fatalf("expire: %v", r)
		}
		left, _, _ := f.FetchMailbox("a1", 0, 100, 0, 0)
		// Empty the mailbox for the next round.
		a.apply(&statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{}})
		return r, len(left)
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
	// Off: applied as written, whatever the records say (the writers'
	// check is all there is, as in releases before gated apply).
	a.apply(putNode("n3", withoutFeature(FeatureMailboxExpireBytes)))
	if r, left := expire(); left != 2 || len(r.GetFeaturesIgnored()) != 0 {
		t.Fatalf("switch off: %d left, %v", left, r)
	}
	a.apply(putNode("n3", withoutFeature(FeatureGatedApply)))
	if r := enable(); r.Code != statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION || !errors.Is(ResultError(r), ErrFailedPrecondition) || on() {
		t.Fatalf("switched on while n3 does not list gated_apply: %v", r)
	}
	a.apply(putNode("n3", withoutFeature(FeatureMailboxExpireBytes)))
	if r := enable(); r.Code != ok || !on() {
		t.Fatalf("switch on: %v", r)
	}
	if r := a.apply(bare); r.Code != ok {
		t.Fatalf("record without an API address while the switch is on: %v", r)
	}
	a.apply(&statev1.Command_RemoveNode{RemoveNode: &statev1.RemoveNode{Id: "n9"}})
	// n3 does not list mailbox_expire_bytes: the bound is ignored.
	if r, left := expire(); left != 0 || !slices.Equal(r.GetFeaturesIgnored(), []string{FeatureMailboxExpireBytes}) {
		t.Fatalf("max_bytes applied while n3 does not list it: %d left, %v", left, r)
	}
	// Features before gated_apply are not gated at apply: a release
	// without gated apply may know them.
	a.apply(putNode("n3", withoutFeature(FeatureRetireAllKeys)))
	a.apply(&statev1.Command_RotateSigningKey{RotateSigningKey: &statev1.RotateSigningKey{Key: testSigningKey("s1"), RetainMs: 1_000_000}})
	a.apply(&statev1.Command_RotateSigningKey{RotateSigningKey: &statev1.RotateSigningKey{Key: testSigningKey("s2"), RetainMs: 1_000_000}})
	if r := a.apply(&statev1.Command_RotateSigningKey{RotateSigningKey: &statev1.RotateSigningKey{Key: testSigningKey("s3"), RetainMs: 1_000_000, RetireAll: true}}); r.Code != ok || len(r.GetFeaturesIgnored()) != 0 {
		t.Fatalf("retire_all: %v", r)
	}
	if keys, _, _ := f.SigningKeys(); len(keys) != 1 {
		t.Fatalf("retire_all, a feature before gated apply, was ignored: %v", keys)
	}
	a.apply(putNode("n3", Features()))
	if r, left := expire(); left != 2 || len(r.GetFeaturesIgnored()) != 0 {
		t.Fatalf("every record lists it: %d left, %v", left, r)
	}

	// In one batch, each entry sees the records as the entries before
	// it left them: a withdrawal shuts the gate for the next command, a
	// record listing the feature opens it again.
	now := 1_000_000 + int64(a.idx)
	var entries []*statev1.MailboxEntry
	for i := range 6 {
		entries = append(entries, mail("alice", "a1", "x", fmt.Sprint("b", i), 10, now+3))
	}
	a.apply(putOp(entries...))
	a.advanceTo(now + 3)
	exp := func() *statev1.Command {
		return &statev1.Command{ProposedAtMs: 1_000_000 + int64(a.idx) + 1,
			Op: &statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{MaxBytes: 10}}}
	}
	cmds := []*statev1.Command{
		{Op: &statev1.Command_PutNode{PutNode: &statev1.PutNode{Node: &statev1.Node{Id: "n2"}, WithdrawFeatures: true}}},
		exp(), // all six go
	}
	var batch []*raft.Log
	for _, c := range cmds {
		a.idx++
		batch = append(batch, entry(t, a.idx, c))
	}
	out := f.ApplyBatch(batch)
	if r := out[1].(*statev1.Result); r.Code != ok || !slices.Equal(r.GetFeaturesIgnored(), []string{FeatureMailboxExpireBytes}) {
		t.Fatalf("after a withdrawal in the batch: %v", r)
	}
	now = 1_000_000 + int64(a.idx)
	entries = nil
	for i := range 3 {
		entries = append(entries, mail("alice", "a1", "x", fmt.Sprint("c", i), 10, now+3))
	}
	a.apply(putOp(entries...))
	a.advanceTo(now + 3)
	batch = nil
	for _, c := range []*statev1.Command{{Op: putNode("n2", Features())}, exp()} {
		a.idx++
		batch = append(batch, entry(t, a.idx, c))
	}
	out = f.ApplyBatch(batch)
	if r := out[1].(*statev1.Result); r.Code != ok || len(r.GetFeaturesIgnored()) != 0 {
		t.Fatalf("after a record listing it in the batch: %v", r)
	}
	if left, _, _ := f.FetchMailbox("a1", 0, 100, 0, 0); len(left) != 2 {
		t.Fatalf("%d entries left after a bounded expiry, want 2", len(left))
	}
	a.apply(&statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{}})

	// Sticky: a record without gated_apply does not turn it off, and it
	// shuts every gated feature it does not list.
	a.apply(putNode("n4", nil))
	if r := enable(); r.Code != ok || !on() {
		t.Fatalf("switch after a record without gated_apply: %v", r)
	}
	if r, left := expire(); left != 0 || !slices.Equal(r.GetFeaturesIgnored(), []string{FeatureMailboxExpireBytes}) {
		t.Fatalf("n4 lists nothing: %d left, %v", left, r)
	}
	// A record removed counts no more.
	a.apply(&statev1.Command_RemoveNode{RemoveNode: &statev1.RemoveNode{Id: "n4"}})
	if r, left := expire(); left != 2 || len(r.GetFeaturesIgnored()) != 0 {
		t.Fatalf("n4 removed: %d left, %v", left, r)
	}
	// A command without the feature's fields is not reported.
	a.apply(putNode("n4", nil))
	if r := a.apply(&statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{}}); r.Code != ok || len(r.GetFeaturesIgnored()) != 0 {
		t.Fatalf("plain expiry: %v", r)
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

// The gates a batch starts from are those the last batch left, unless a
// restore came between: then the restored records decide.
func TestARestoreDecidesTheGatesAnew(t *testing.T) {
	// snapshot returns a state with gated apply on whose n3 does or does
	// not list mailbox_expire_bytes.
	snapshot := func(n3 []string) []byte {
		g := newFSM(t, Config{})
		a := &applier{t: t, f: g}
		a.apply(putNode("n1", Features()))
		a.apply(putNode("n3", n3))
		a.apply(&statev1.Command_EnableGatedApply{EnableGatedApply: &statev1.EnableGatedApply{}})
		snap, err := g.Snapshot()
		if err != nil {
			t.Fatal(err)
		}
		defer snap.Release()
		var sink bufSink
		if err := snap.Persist(&sink); err != nil {
			t.Fatal(err)
		}
		return sink.Bytes()
	}
	f := newFSM(t, Config{})
	a := &applier{t: t, f: f}
	for i, c := range []struct {
		n3      []string
		ignored bool
	}{{Features(), false}, {withoutFeature(FeatureMailboxExpireBytes), true}, {Features(), false}} {
		if err := f.Restore(io.NopCloser(bytes.NewReader(snapshot(c.n3)))); err != nil {
			t.Fatal(err)
		}
		a.idx = f.AppliedIndex()
		for range 2 { // the second from the gates the first left
			r := a.apply(&statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{MaxBytes: 1}})
			if r.GetCode() != statev1.ResultCode_RESULT_CODE_OK || (len(r.GetFeaturesIgnored()) > 0) != c.ignored {
				t.Fatalf("restore %d: %v, want ignored %v", i, r, c.ignored)
			}
		}
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
	return map[string][][2]*statev1.Command{
		FeatureMailboxExpireBytes: {{
			{Op: &statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{Limit: 3, PurgeLimit: 9, MaxBytes: 7}}},
			{Op: &statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{Limit: 3, PurgeLimit: 9}}},
		}},
		FeatureRefreshKeepRotated: {{
			{Op: &statev1.Command_RotateRefreshToken{RotateRefreshToken: &statev1.RotateRefreshToken{TokenId: "t1", PresentedSecretHash: key32(1),
				Next: tok("t2", "f", "u", 2, 5_000_000), KeepRotatedUntilMs: 9_000_000}}},
			{Op: &statev1.Command_RotateRefreshToken{RotateRefreshToken: &statev1.RotateRefreshToken{TokenId: "t1", PresentedSecretHash: key32(1),
				Next: tok("t2", "f", "u", 2, 5_000_000)}}},
		}},
		FeaturePasswordRehash: {{
			{Op: &statev1.Command_RehashPassword{RehashPassword: &statev1.RehashPassword{UserId: "u", ExpectPasswordHash: "old", PasswordHash: "new"}}},
			{},
		}},
		FeatureSessionCap: {{
			{Op: &statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: tok("t1", "f", "u", 2, 5_000_000), MaxSessions: 3, EndedKeptUntilMs: 9}}},
			{Op: &statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: tok("t1", "f", "u", 2, 5_000_000)}}},
		}, {
			{Op: &statev1.Command_RevokeTokenFamily{RevokeTokenFamily: &statev1.RevokeTokenFamily{FamilyId: "f", UserId: "u", Reason: "logout", End: true, EndedKeptUntilMs: 9}}},
			{Op: &statev1.Command_RevokeTokenFamily{RevokeTokenFamily: &statev1.RevokeTokenFamily{FamilyId: "f", UserId: "u", Reason: "logout"}}},
		}, {
			{Op: &statev1.Command_RotateRefreshToken{RotateRefreshToken: &statev1.RotateRefreshToken{TokenId: "t1", PresentedSecretHash: key32(1),
				Next: tok("t2", "f", "u", 2, 5_000_000), BoundRotations: true}}},
			{Op: &statev1.Command_RotateRefreshToken{RotateRefreshToken: &statev1.RotateRefreshToken{TokenId: "t1", PresentedSecretHash: key32(1),
				Next: tok("t2", "f", "u", 2, 5_000_000)}}},
		}},
	}
}

// Every feature gated at apply clears exactly its own fields, and a
// feature added to Features must be given its fields (or be said not to
// be gated at apply) before this passes.
func TestEveryGatedFeatureHasItsFields(t *testing.T) {
	samples := gatedSamples()
	for _, feature := range Features() {
		if !GatedAtApply(feature) {
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

// BenchmarkApplyGates is the cost of gated apply on the apply path: one
// small command per batch (the worst case: the records are read once per
// batch), with three node records, the switch off and on, and with one
// record shutting a feature the command carries.
func BenchmarkApplyGates(b *testing.B) {
	for _, c := range []struct {
		name     string
		on       bool
		features []string // of the third record
	}{
		{"off", false, Features()},
		{"on", true, Features()},
		{"on-shut", true, withoutFeature(FeatureMailboxExpireBytes)},
	} {
		b.Run(c.name, func(b *testing.B) {
			f := newFSM(b, Config{Logger: slog.New(slog.DiscardHandler)})
			var idx uint64
			apply := func(cmd *statev1.Command) *statev1.Result {
				idx++
				res, _ := f.Apply(entry(b, idx, cmd)).(*statev1.Result)
				return res
			}
			for i, fs := range [][]string{Features(), Features(), c.features} {
				id := fmt.Sprint("n", i)
				apply(&statev1.Command{Op: &statev1.Command_PutNode{PutNode: &statev1.PutNode{Node: &statev1.Node{Id: id, RaftAddr: id + ":1", ApiAddr: id + ":2", Features: fs}}}})
			}
			if c.on {
				if r := apply(&statev1.Command{Op: &statev1.Command_EnableGatedApply{EnableGatedApply: &statev1.EnableGatedApply{}}}); r.GetCode() != statev1.ResultCode_RESULT_CODE_OK {
					b.Fatal(r)
				}
			}
			cmd := &statev1.Command{ProposedAtMs: 1_000_000, Op: &statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{MaxBytes: 1}}}
			b.ResetTimer()
			for range b.N {
				apply(cmd) // nothing due
			}
		})
	}
}
