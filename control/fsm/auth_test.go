package fsm

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"

	"github.com/edge-relay/relay/control/auth"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

func tok(id, fam, uid string, hash byte, exp int64) *statev1.RefreshToken {
	return &statev1.RefreshToken{Id: id, FamilyId: fam, UserId: uid, SecretHash: key32(hash), ExpiresAtMs: exp}
}

func TestRefreshTokenLifecycle(t *testing.T) {
	f := newFSM(t, Config{PruneEvery: 4})
	a := &applier{t: t, f: f}
	ok := statev1.ResultCode_RESULT_CODE_OK
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "u", Login: "u"}}})
	far := int64(1 << 50)
	if r := a.apply(&statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: tok("t1", "f1", "u", 1, far)}}); r.Code != ok {
		t.Fatal(r)
	}
	if r := a.apply(&statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: tok("t9", "f1", "u", 1, far)}}); r.Code != statev1.ResultCode_RESULT_CODE_ALREADY_EXISTS {
		t.Fatalf("second family with the same id: %v", r)
	}
	rotate := func(id string, hash byte, next *statev1.RefreshToken) *statev1.Result {
		return a.apply(&statev1.Command_RotateRefreshToken{RotateRefreshToken: &statev1.RotateRefreshToken{TokenId: id, PresentedSecretHash: key32(hash), Next: next}})
	}
	if r := rotate("t1", 7, tok("t2", "f1", "u", 2, far)); r.Code != statev1.ResultCode_RESULT_CODE_NOT_FOUND {
		t.Fatalf("wrong secret: %v", r)
	}
	if r := rotate("t1", 1, tok("t2", "f2", "u", 2, far)); r.Code != statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT {
		t.Fatalf("next in another family: %v", r)
	}
	if r := rotate("t1", 1, tok("t2", "f1", "u", 2, far)); r.Code != ok || r.GetRefreshToken().GetId() != "t2" {
		t.Fatalf("rotate: %v", r)
	}
	// Presenting t1 again is reuse: family revoked, successor dead.
	if r := rotate("t1", 1, tok("t3", "f1", "u", 3, far)); r.Code != ok || !r.ReuseDetected {
		t.Fatalf("reuse: %v", r)
	}
	if fam, _ := f.GetTokenFamily("f1"); !fam.GetRevoked() {
		t.Fatal("family not revoked after reuse")
	}
	if r := rotate("t2", 2, tok("t4", "f1", "u", 4, far)); r.Code != statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION {
		t.Fatalf("successor after reuse: %v", r)
	}
	// Logout: another family, revoked by its owner only.
	a.apply(&statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: tok("t5", "f5", "u", 5, far)}})
	if r := a.apply(&statev1.Command_RevokeTokenFamily{RevokeTokenFamily: &statev1.RevokeTokenFamily{FamilyId: "f5", UserId: "other"}}); r.Code != statev1.ResultCode_RESULT_CODE_NOT_FOUND {
		t.Fatalf("revoke by another user: %v", r)
	}
	for i := 0; i < 2; i++ { // twice: idempotent
		if r := a.apply(&statev1.Command_RevokeTokenFamily{RevokeTokenFamily: &statev1.RevokeTokenFamily{FamilyId: "f5", UserId: "u", Reason: "logout"}}); r.Code != ok {
			t.Fatal(r)
		}
	}
	// Expired tokens are refused and pruned at the next pruning revision.
	a.apply(&statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: tok("t6", "f6", "u", 6, 1_000_000+int64(a.idx)+2)}})
	for i := 0; i < 8; i++ {
		a.apply(&statev1.Command_Noop{Noop: &statev1.Noop{}})
	}
	if r := rotate("t6", 6, tok("t7", "f6", "u", 7, far)); r.Code == ok {
		t.Fatalf("expired token rotated: %v", r)
	}
	if _, err := f.GetRefreshToken("t6"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("expired token not pruned: %v", err)
	}
}

// A rotation that says to keep the rotated token until its login ends
// keeps it past its own expiry: presented then, it is still reuse and
// revokes the family (the owner of a stolen token, back after the token
// expired, cuts off the thief who used it first). It goes at the keep,
// with its family once nothing else of it is left. Without the keep the
// rotated token goes at its own expiry and presenting it later is not
// recognised.
func TestARotatedTokenIsKeptUntilItsLoginEnds(t *testing.T) {
	f := newFSM(t, Config{PruneEvery: 4})
	a := &applier{t: t, f: f}
	ok := statev1.ResultCode_RESULT_CODE_OK
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "u", Login: "u"}}})
	issue := func(id, fam string, hash byte, exp int64) {
		t.Helper()
		if r := a.apply(&statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: tok(id, fam, "u", hash, exp)}}); r.Code != ok {
			t.Fatal(r)
		}
	}
	rotate := func(id string, hash byte, next *statev1.RefreshToken, keep int64) *statev1.Result {
		return a.apply(&statev1.Command_RotateRefreshToken{RotateRefreshToken: &statev1.RotateRefreshToken{
			TokenId: id, PresentedSecretHash: key32(hash), Next: next, KeepRotatedUntilMs: keep}})
	}
	now := func() int64 { return 1_000_000 + int64(a.idx) }
	if r := rotate("t1", 1, tok("t2", "f1", "u", 2, now()+1000), -1); r.Code != statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT {
		t.Fatalf("a negative keep: %v", r)
	}

	// f1: t1 expires at +20 and is kept until +200; the thief's t2 (and
	// its successor) live long.
	exp1, keep := now()+20, now()+200
	issue("t1", "f1", 1, exp1)
	if got := keysWith(t, f, prefixTokenExpiry); !slices.Contains(got, fmt.Sprintf("%q", tokenExpiryKey(exp1, "t1"))) {
		t.Fatalf("t1's expiry index: %v; want it at %d", got, exp1)
	}
	if r := rotate("t1", 1, tok("t2", "f1", "u", 2, now()+10_000), keep); r.Code != ok {
		t.Fatalf("rotate with a keep: %v", r)
	}
	if got := keysWith(t, f, prefixTokenExpiry); !slices.Contains(got, fmt.Sprintf("%q", tokenExpiryKey(keep, "t1"))) ||
		slices.Contains(got, fmt.Sprintf("%q", tokenExpiryKey(exp1, "t1"))) {
		t.Fatalf("t1's expiry index after the keep: %v; want it at %d only", got, keep)
	}
	// f2: the same without the keep.
	exp3 := now() + 20
	issue("t3", "f2", 3, exp3)
	if r := rotate("t3", 3, tok("t4", "f2", "u", 4, now()+10_000), 0); r.Code != ok {
		t.Fatalf("rotate without a keep: %v", r)
	}
	// f3: a keep earlier than the token's own expiry changes nothing.
	exp5 := now() + 500
	issue("t5", "f3", 5, exp5)
	if r := rotate("t5", 5, tok("t6", "f3", "u", 6, now()+10_000), now()+100); r.Code != ok {
		t.Fatalf("rotate with an early keep: %v", r)
	}
	if got, err := f.GetRefreshToken("t5"); err != nil || got.GetExpiresAtMs() != exp5 {
		t.Fatalf("t5 after a keep before its expiry: %v, %v; want its expiry %d", got, err, exp5)
	}
	a.advanceTo(max(exp1, exp3) + 10) // past both expiries, prunes included
	if got, err := f.GetRefreshToken("t1"); err != nil || !got.GetRotated() || got.GetExpiresAtMs() != keep {
		t.Fatalf("t1 past its own expiry: %v, %v; want kept, rotated, until %d", got, err, keep)
	}
	if _, err := f.GetRefreshToken("t3"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("t3, rotated without a keep, past its expiry: %v, want pruned", err)
	}
	if r := rotate("t3", 3, tok("t7", "f2", "u", 7, now()+10_000), 0); r.Code != statev1.ResultCode_RESULT_CODE_NOT_FOUND {
		t.Fatalf("t3 presented again after its expiry: %v, want not found", r)
	}
	if r := rotate("t1", 1, tok("t8", "f1", "u", 8, now()+10_000), keep); r.Code != ok || !r.ReuseDetected {
		t.Fatalf("t1 presented again after its own expiry: %v, want reuse detected", r)
	}
	if fam, _ := f.GetTokenFamily("f1"); !fam.GetRevoked() {
		t.Fatal("f1 not revoked on the reuse of a kept token")
	}
	if r := rotate("t2", 2, tok("t9", "f1", "u", 9, now()+10_000), keep); r.Code != statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION {
		t.Fatalf("the thief's t2 after the reuse: %v, want refused", r)
	}
	if fam, _ := f.GetTokenFamily("f2"); fam.GetRevoked() {
		t.Fatal("f2 revoked: nothing of it was reused")
	}
	// At the keep t1 goes, and its family with it once nothing else of
	// it is left (t2 lives on).
	a.advanceTo(keep + 10)
	if _, err := f.GetRefreshToken("t1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("t1 past its keep: %v, want pruned", err)
	}
	if _, err := f.GetTokenFamily("f1"); err != nil {
		t.Fatalf("f1 with t2 alive: %v", err)
	}
	// Deleting the user takes every token, kept ones included, with
	// their index entries.
	issue("t10", "f4", 10, now()+20)
	if r := rotate("t10", 10, tok("t11", "f4", "u", 11, now()+10_000), now()+5000); r.Code != ok {
		t.Fatal(r)
	}
	if r := a.apply(&statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: "u"}}); r.Code != ok {
		t.Fatalf("delete the user: %v", r)
	}
	if got := keysWith(t, f, prefixTokenExpiry); len(got) != 0 {
		t.Fatalf("expiry index entries after the user's deletion: %v", got)
	}
}

// oneLogin is a state with user u logged in once: token t0 (secret
// key32(0)) of family f, expiring at far, never pruned.
func oneLogin(t *testing.T) (*FSM, *applier) {
	t.Helper()
	f := newFSM(t, Config{PruneEvery: 1 << 20})
	a := &applier{t: t, f: f}
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "u", Login: "u"}}})
	if r := a.apply(&statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: tok("t0", "f", "u", 0, far)}}); r.Code != statev1.ResultCode_RESULT_CODE_OK {
		t.Fatal(r)
	}
	return f, a
}

// A family keeps at most MaxKeptRotated of its rotated tokens past their
// own expiry: a login refreshed in a loop stops piling up records, and
// the first ones (a thief's loop cannot push them out) stay kept.
func TestKeptRotatedTokensAreBoundedPerLogin(t *testing.T) {
	f, a := oneLogin(t)
	ok := statev1.ResultCode_RESULT_CODE_OK
	keep := far + 1
	for i := range MaxKeptRotated + 1 {
		r := a.apply(&statev1.Command_RotateRefreshToken{RotateRefreshToken: &statev1.RotateRefreshToken{
			TokenId: fmt.Sprint("t", i), PresentedSecretHash: key32(byte(i)), Next: tok(fmt.Sprint("t", i+1), "f", "u", byte(i+1), far), KeepRotatedUntilMs: keep}})
		if r.Code != ok {
			t.Fatalf("rotation %d: %v", i, r)
		}
	}
	for id, want := range map[string]int64{"t0": keep, fmt.Sprint("t", MaxKeptRotated-1): keep, fmt.Sprint("t", MaxKeptRotated): far} {
		if got, err := f.GetRefreshToken(id); err != nil || got.GetExpiresAtMs() != want || !got.GetRotated() {
			t.Fatalf("%s: %v, %v; want rotated, expiring at %d", id, got, err, want)
		}
	}
	if fam, err := f.GetTokenFamily("f"); err != nil || fam.GetKeptRotated() != MaxKeptRotated {
		t.Fatalf("family: %v, %v; want %d kept", fam, err, MaxKeptRotated)
	}
}

// testSigningKey is a signing key with fixed bytes.
func testSigningKey(id string) *statev1.SigningKey {
	return &statev1.SigningKey{Id: id, PrivateSeed: key32(1), PublicKey: key32(2)}
}

func TestKeysEdgesActivityAndInit(t *testing.T) {
	f := newFSM(t, Config{})
	a := &applier{t: t, f: f}
	ok := statev1.ResultCode_RESULT_CODE_OK
	sk := testSigningKey
	ss := func(id string) *statev1.SessionKey { return &statev1.SessionKey{Id: id, Secret: key32(3)} }
	init := &statev1.Command_InitCluster{InitCluster: &statev1.InitCluster{
		Admin:      &statev1.User{Id: "admin", Login: "admin", Role: "admin"},
		SigningKey: sk("s1"), SessionKey: ss("k1"),
	}}
	if r := a.apply(init); r.Code != ok || !r.Initialized {
		t.Fatalf("init: %v", r)
	}
	if done, _ := f.Initialized(); !done {
		t.Fatal("not initialized")
	}
	if r := a.apply(init); r.Code != ok || r.Initialized {
		t.Fatalf("second init: %v", r)
	}
	// Rotations keep the previous key for its window, then drop it.
	if r := a.apply(&statev1.Command_RotateSigningKey{RotateSigningKey: &statev1.RotateSigningKey{Key: sk("s2"), RetainMs: 5}}); r.Code != ok {
		t.Fatal(r)
	}
	keys, cur, _ := f.SigningKeys()
	if cur != "s2" || len(keys) != 2 || keys[0].GetVerifyUntilMs() == 0 {
		t.Fatalf("signing keys %v current %s", keys, cur)
	}
	if r := a.apply(&statev1.Command_RotateSigningKey{RotateSigningKey: &statev1.RotateSigningKey{Key: sk("s2")}}); r.Code != statev1.ResultCode_RESULT_CODE_ALREADY_EXISTS {
		t.Fatal(r)
	}
	for i := 0; i < 10; i++ {
		a.apply(&statev1.Command_Noop{Noop: &statev1.Noop{}})
	}
	a.apply(&statev1.Command_RotateSigningKey{RotateSigningKey: &statev1.RotateSigningKey{Key: sk("s3"), RetainMs: 1000}})
	keys, cur, _ = f.SigningKeys()
	if cur != "s3" || len(keys) != 2 || keys[0].GetId() != "s2" {
		t.Fatalf("after the window: %v", keys)
	}
	before := a.idx
	if r := a.apply(&statev1.Command_RotateSessionKey{RotateSessionKey: &statev1.RotateSessionKey{Key: ss("k2"), GraceMs: 1000}}); r.Code != ok {
		t.Fatal(r)
	}
	ring, _ := f.SessionKeyRing()
	if ring.GetCurrentId() != "k2" || len(ring.GetKeys()) != 2 {
		t.Fatalf("ring %v", ring)
	}
	cs, _ := f.Changes(before, 10)
	if len(cs) != 1 || cs[0].Kind != statev1.ChangeKind_CHANGE_KIND_SESSION_KEYS || len(cs[0].GetSessionKeys().GetKeys()) != 2 {
		t.Fatalf("session key change %v", cs)
	}
	// retire_all (after a leak): every other key goes at once, the one
	// replaced and those still in the window of earlier rotations; the
	// edges are told a ring of the new key alone.
	a.apply(&statev1.Command_RotateSessionKey{RotateSessionKey: &statev1.RotateSessionKey{Key: ss("k3"), GraceMs: 1000}})
	if ring, _ := f.SessionKeyRing(); len(ring.GetKeys()) != 3 {
		t.Fatalf("ring before retire_all %v", ring)
	}
	before = a.idx
	if r := a.apply(&statev1.Command_RotateSessionKey{RotateSessionKey: &statev1.RotateSessionKey{Key: ss("k4"), GraceMs: 1000, RetireAll: true}}); r.Code != ok {
		t.Fatal(r)
	}
	if ring, _ := f.SessionKeyRing(); ring.GetCurrentId() != "k4" || len(ring.GetKeys()) != 1 {
		t.Fatalf("ring after retire_all %v", ring)
	}
	if cs, _ := f.Changes(before, 10); len(cs) != 1 || len(cs[0].GetSessionKeys().GetKeys()) != 1 {
		t.Fatalf("retire_all's change %v", cs)
	}
	a.apply(&statev1.Command_RotateSigningKey{RotateSigningKey: &statev1.RotateSigningKey{Key: sk("s4"), RetainMs: 1000}})
	if keys, _, _ := f.SigningKeys(); len(keys) != 3 {
		t.Fatalf("signing keys before retire_all %v", keys)
	}
	a.apply(&statev1.Command_RotateSigningKey{RotateSigningKey: &statev1.RotateSigningKey{Key: sk("s5"), RetainMs: 1000, RetireAll: true}})
	if keys, cur, _ := f.SigningKeys(); cur != "s5" || len(keys) != 1 {
		t.Fatalf("signing keys after retire_all %v", keys)
	}
	// Edges: register, renew (no change event), expire.
	edge := func(id string, addrs []string, lease int64) *statev1.Result {
		return a.apply(&statev1.Command_RegisterEdge{RegisterEdge: &statev1.RegisterEdge{Edge: &statev1.Edge{Id: id, Addrs: addrs, LeaseExpiresAtMs: lease}}})
	}
	now := func() int64 { return 1_000_000 + int64(a.idx) + 1 }
	if r := edge("e1", []string{"a:1"}, now()+3); r.Code != ok {
		t.Fatal(r)
	}
	before = a.idx
	edge("e1", []string{"a:1"}, now()+3)
	if cs, _ := f.Changes(before, 10); len(cs) != 0 {
		t.Fatalf("lease renewal announced: %v", cs)
	}
	edge("e2", []string{"b:1"}, now()+1000)
	for i := 0; i < 5; i++ {
		a.apply(&statev1.Command_Noop{Noop: &statev1.Noop{}})
	}
	before = a.idx
	a.apply(&statev1.Command_ExpireEdges{ExpireEdges: &statev1.ExpireEdges{}})
	edges, _ := f.Edges()
	if len(edges) != 1 || edges[0].GetId() != "e2" {
		t.Fatalf("edges after expiry %v", edges)
	}
	if cs, _ := f.Changes(before, 10); len(cs) != 1 || cs[0].Kind != statev1.ChangeKind_CHANGE_KIND_EDGE_DELETED {
		t.Fatalf("expiry changes %v", cs)
	}
	if r := a.apply(&statev1.Command_DeregisterEdge{DeregisterEdge: &statev1.DeregisterEdge{Id: "e2"}}); r.Code != ok {
		t.Fatal(r)
	}
	// Activity only raises times, skips what is gone, bounds batch size.
	a.apply(&statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: "d", UserId: "admin", Name: "x", PublicKey: key32(4)}}})
	act := func(at int64) *statev1.Result {
		return a.apply(&statev1.Command_RecordActivity{RecordActivity: &statev1.RecordActivity{Entries: []*statev1.Activity{
			{UserId: "admin", DeviceId: "d", SeenAtMs: at}, {UserId: "admin", DeviceId: "gone", SeenAtMs: at}, {UserId: "gone", SeenAtMs: at},
		}}})
	}
	act(500)
	act(100)
	if d, _ := f.GetDevice("admin", "d"); d.GetLastSeenMs() != 500 {
		t.Fatalf("last seen %d", d.GetLastSeenMs())
	}
	big := make([]*statev1.Activity, MaxActivityBatch+1)
	if r := a.apply(&statev1.Command_RecordActivity{RecordActivity: &statev1.RecordActivity{Entries: big}}); r.Code != statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT {
		t.Fatal(r)
	}
	// Rename, and the view sees everything consistently.
	if r := a.apply(&statev1.Command_RenameDevice{RenameDevice: &statev1.RenameDevice{UserId: "admin", DeviceId: "d", Name: "tablet"}}); r.GetDevice().GetName() != "tablet" {
		t.Fatal(r)
	}
	v, err := f.View()
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	var users, devs int
	_ = v.EachUser(func(*statev1.User) error { users++; return nil })
	_ = v.EachDevice(func(*statev1.Device) error { devs++; return nil })
	_ = v.EachEdge(func(*statev1.Edge) error { return fmt.Errorf("no edges expected") })
	r2, _ := v.SessionKeyRing()
	if users != 1 || devs != 1 || v.AppliedIndex() != a.idx || r2.GetCurrentId() != "k4" {
		t.Fatalf("view: %d users %d devices at %d", users, devs, v.AppliedIndex())
	}
}

func TestReads(t *testing.T) {
	f := newFSM(t, Config{})
	a := &applier{t: t, f: f}
	for i := 0; i < 5; i++ {
		a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: fmt.Sprint("u", i), Login: fmt.Sprint("l", i)}}})
	}
	page, more, err := f.ListUsers("", 2)
	if err != nil || len(page) != 2 || !more || page[0].GetId() != "u0" {
		t.Fatalf("page 1: %v %v %v", page, more, err)
	}
	page, more, _ = f.ListUsers("u3", 2)
	if len(page) != 1 || more || page[0].GetId() != "u4" {
		t.Fatalf("last page: %v %v", page, more)
	}
	if u, err := f.GetUserByLogin("l2"); err != nil || u.GetId() != "u2" {
		t.Fatal(u, err)
	}
	for _, err := range []error{
		func() error { _, err := f.GetUser("x"); return err }(),
		func() error { _, err := f.GetUserByLogin("x"); return err }(),
		func() error { _, err := f.GetDevice("u0", "x"); return err }(),
		func() error { _, err := f.GetNode("x"); return err }(),
		func() error { _, err := f.GetTokenFamily("x"); return err }(),
		func() error { _, err := f.DeviceOwner("x"); return err }(),
	} {
		if !errors.Is(err, ErrNotFound) {
			t.Errorf("missing record: %v", err)
		}
	}
	a.apply(&statev1.Command_PutNode{PutNode: &statev1.PutNode{Node: &statev1.Node{Id: "n1", RaftAddr: "r", ApiAddr: "a"}}})
	a.apply(&statev1.Command_PutNode{PutNode: &statev1.PutNode{Node: &statev1.Node{Id: "n1", RaftAddr: "r", ApiAddr: "a"}}})
	// withdraw_features empties the features of a record that is there,
	// and nothing else (an outdated address in the command is ignored)...
	a.apply(&statev1.Command_PutNode{PutNode: &statev1.PutNode{Node: &statev1.Node{Id: "n1", RaftAddr: "r", ApiAddr: "a2", Features: []string{"f"}}}})
	withdraw := &statev1.PutNode{Node: &statev1.Node{Id: "n1", ApiAddr: "outdated"}, WithdrawFeatures: true}
	if r := a.apply(&statev1.Command_PutNode{PutNode: withdraw}); r.GetCode() != statev1.ResultCode_RESULT_CODE_OK {
		t.Fatal(r)
	}
	if n, err := f.GetNode("n1"); err != nil || n.GetApiAddr() != "a2" || n.GetRaftAddr() != "r" || len(n.GetFeatures()) != 0 || !n.GetFeaturesWithdrawn() {
		t.Fatalf("after withdraw_features: %v, %v", n, err)
	}
	a.apply(&statev1.Command_PutNode{PutNode: withdraw}) // nothing left to withdraw: no change
	a.apply(&statev1.Command_RemoveNode{RemoveNode: &statev1.RemoveNode{Id: "n1"}})
	a.apply(&statev1.Command_RemoveNode{RemoveNode: &statev1.RemoveNode{Id: "n1"}})
	// ...and brings back no record that was removed.
	if r := a.apply(&statev1.Command_PutNode{PutNode: withdraw}); r.GetCode() != statev1.ResultCode_RESULT_CODE_OK {
		t.Fatal(r)
	}
	if nodes, _ := f.Nodes(); len(nodes) != 0 {
		t.Fatal(nodes)
	}
	cs, _ := f.Changes(0, 100)
	kinds := map[statev1.ChangeKind]int{}
	for _, c := range cs {
		kinds[c.Kind]++
	}
	if kinds[statev1.ChangeKind_CHANGE_KIND_NODE_PUT] != 3 || kinds[statev1.ChangeKind_CHANGE_KIND_NODE_DELETED] != 1 {
		t.Fatalf("an unchanged put, a withdrawal with nothing to withdraw or a missing remove made a change: %v", kinds)
	}
	if got, _ := f.Changes(0, 2); len(got) != 2 {
		t.Fatal("limit")
	}
	if _, err := New(Config{}); err == nil {
		t.Fatal("New without a store")
	}
}

func TestUpdateUserFields(t *testing.T) {
	f := newFSM(t, Config{})
	a := &applier{t: t, f: f}
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "u", Login: "old"}}})
	a.apply(&statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: "d1", UserId: "u", Name: "a", PublicKey: key32(1)}}})
	a.apply(&statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: "d2", UserId: "u", Name: "b", PublicKey: key32(2)}}})
	a.apply(&statev1.Command_PutNode{PutNode: &statev1.PutNode{Node: &statev1.Node{Id: "n1", RaftAddr: "r", ApiAddr: "a"}}})
	hash, err := auth.HashPassword("a long enough password", auth.TestParams)
	if err != nil {
		t.Fatal(err)
	}
	r := a.apply(&statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "u",
		Fields: []string{"display_name", "status", "password_hash", "role", "login"},
		User:   &statev1.User{DisplayName: "New", Status: statev1.UserStatus_USER_STATUS_DISABLED, PasswordHash: hash, Role: "viewer", Login: "new"}}})
	u := r.GetUser()
	if r.Code != statev1.ResultCode_RESULT_CODE_OK || u.GetLogin() != "new" || u.GetRole() != "viewer" || u.GetPasswordHash() != hash || u.GetStatus() != statev1.UserStatus_USER_STATUS_DISABLED {
		t.Fatal(r)
	}
	// Clearing the hash (no password login) and the role (a user) is allowed.
	if r := a.apply(&statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "u", Fields: []string{"password_hash", "role"}, User: &statev1.User{}}}); r.Code != statev1.ResultCode_RESULT_CODE_OK || r.GetUser().GetPasswordHash() != "" || r.GetUser().GetRole() != "" {
		t.Fatal(r)
	}
	if _, err := f.GetUserByLogin("old"); !errors.Is(err, ErrNotFound) {
		t.Fatal("old login still indexed")
	}
	if got, err := f.GetUserByLogin("new"); err != nil || got.GetId() != "u" {
		t.Fatal(got, err)
	}
	if r := a.apply(&statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "u", Fields: []string{"status"}, User: &statev1.User{Status: 7}}}); r.Code != statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT {
		t.Fatal(r)
	}
	if r := a.apply(&statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "u", Fields: []string{"login"}, User: &statev1.User{}}}); r.Code != statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT {
		t.Fatal(r)
	}
	devs, _ := f.ListDevices("u")
	nodes, _ := f.Nodes()
	if len(devs) != 2 || devs[0].GetId() != "d1" || len(nodes) != 1 {
		t.Fatalf("devices %v nodes %v", devs, nodes)
	}
	if owner, err := f.DeviceOwner("d2"); err != nil || owner != "u" {
		t.Fatal(owner, err)
	}
	// Revoking twice is idempotent; a revoked device keeps its record.
	for i := 0; i < 2; i++ {
		if r := a.apply(&statev1.Command_RevokeDevice{RevokeDevice: &statev1.RevokeDevice{UserId: "u", DeviceId: "d1"}}); !r.GetDevice().GetRevoked() {
			t.Fatal(r)
		}
	}
	if r := a.apply(&statev1.Command_DeleteDevice{DeleteDevice: &statev1.DeleteDevice{UserId: "u", DeviceId: "d2"}}); r.Code != statev1.ResultCode_RESULT_CODE_OK {
		t.Fatal(r)
	}
	if n, err := f.UserTokenCount("u"); n != 0 || err != nil {
		t.Fatal(n, err)
	}
	if ok, err := f.Initialized(); ok || err != nil {
		t.Fatal(ok, err)
	}
}

// Activity never moves last_seen or last_activity backwards, and a time
// after the command's proposed_at_ms (a reporter whose clock runs ahead,
// or garbage) counts as that proposal time: it cannot pin the record in
// the future, where later true reports could not raise it.
func TestActivityNeverBackwardsNorInTheFuture(t *testing.T) {
	f := newFSM(t, Config{})
	a := &applier{t: t, f: f}
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "u", Login: "u"}}})
	a.apply(&statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: "d", UserId: "u", Name: "x", PublicKey: key32(1)}}})
	// The applier proposes command i at 1_000_000 + i.
	report := func(at int64) (now int64) {
		t.Helper()
		r := a.apply(&statev1.Command_RecordActivity{RecordActivity: &statev1.RecordActivity{Entries: []*statev1.Activity{{UserId: "u", DeviceId: "d", SeenAtMs: at}}}})
		if r.Code != statev1.ResultCode_RESULT_CODE_OK {
			t.Fatal(r)
		}
		return 1_000_000 + int64(a.idx)
	}
	times := func() (seen, active int64) {
		t.Helper()
		d, err := f.GetDevice("u", "d")
		if err != nil {
			t.Fatal(err)
		}
		u, err := f.GetUser("u")
		if err != nil {
			t.Fatal(err)
		}
		return d.GetLastSeenMs(), u.GetLastActivityMs()
	}
	cases := []struct {
		name string
		at   func(prev int64) int64 // seen_at from the current last_seen
		want func(prev, now int64) int64
	}{
		{"in the past", func(int64) int64 { return 999_000 }, func(_, _ int64) int64 { return 999_000 }},
		{"older than recorded", func(p int64) int64 { return p - 500 }, func(p, _ int64) int64 { return p }},
		{"far in the future", func(int64) int64 { return 1 << 50 }, func(_, now int64) int64 { return now }},
		{"just after the proposal", func(int64) int64 { return 2_000_000 }, func(_, now int64) int64 { return now }},
		{"older than the clamped time", func(p int64) int64 { return p - 1 }, func(p, _ int64) int64 { return p }},
		{"at the proposal time", func(int64) int64 { return 1_000_000 + int64(a.idx) + 1 }, func(_, now int64) int64 { return now }},
	}
	for _, tc := range cases {
		prev, _ := times()
		at := tc.at(prev)
		now := report(at)
		want := tc.want(prev, now)
		seen, active := times()
		if seen != want || active != want {
			t.Fatalf("%s: report at %d (proposed at %d, last seen %d): last_seen %d, last_activity %d, want %d",
				tc.name, at, now, prev, seen, active, want)
		}
		if seen < prev {
			t.Fatalf("%s: last_seen went back from %d to %d", tc.name, prev, seen)
		}
	}
}

// A new password, a new role and disabling an account revoke its
// sessions (token families), so the access tokens issued in them stop
// working; the caller's own session survives its own password change.
// Other changes, and a status set back to active, revoke nothing.
func TestAccountChangesRevokeSessions(t *testing.T) {
	f := newFSM(t, Config{})
	a := &applier{t: t, f: f}
	far := int64(1 << 50)
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "u", Login: "u"}}})
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "v", Login: "v"}}})
	n := 0
	login := func(uid string) string {
		n++
		fam := fmt.Sprintf("f%d", n)
		if r := a.apply(&statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: tok(fmt.Sprintf("t%d", n), fam, uid, byte(n), far)}}); r.Code != statev1.ResultCode_RESULT_CODE_OK {
			t.Fatal(r)
		}
		return fam
	}
	open := func(fam string) bool {
		t.Helper()
		got, err := f.GetTokenFamily(fam)
		if err != nil {
			t.Fatal(err)
		}
		return !got.GetRevoked()
	}
	update := func(keep string, fields []string, u *statev1.User) {
		t.Helper()
		if r := a.apply(&statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "u", Fields: fields, User: u, KeepSessionId: keep}}); r.Code != statev1.ResultCode_RESULT_CODE_OK {
			t.Fatal(r)
		}
	}
	hash, err := auth.HashPassword("a new password", auth.TestParams)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		fields []string
		user   *statev1.User
		revoke bool
	}{
		{"display name", []string{"display_name"}, &statev1.User{DisplayName: "U"}, false},
		{"login", []string{"login"}, &statev1.User{Login: "u2"}, false},
		{"same role", []string{"role"}, &statev1.User{Role: ""}, false},
		{"password", []string{"password_hash"}, &statev1.User{PasswordHash: hash}, true},
		{"role", []string{"role"}, &statev1.User{Role: "viewer"}, true},
		{"disabled", []string{"status"}, &statev1.User{Status: statev1.UserStatus_USER_STATUS_DISABLED}, true},
	} {
		mine, other, theirs := login("u"), login("u"), login("v")
		update(mine, tc.fields, tc.user)
		if !open(mine) {
			t.Errorf("%s: the caller's own session was revoked", tc.name)
		}
		if open(other) == tc.revoke {
			t.Errorf("%s: another session of the account open = %v, want %v", tc.name, open(other), !tc.revoke)
		}
		if !open(theirs) {
			t.Errorf("%s: another account's session was revoked", tc.name)
		}
	}
	// Enabled again (no session can be opened while disabled), and set
	// active while active: nothing revoked.
	active := &statev1.User{Status: statev1.UserStatus_USER_STATUS_ACTIVE}
	update("", []string{"status"}, active)
	s := login("u")
	update("", []string{"status"}, active)
	if !open(s) {
		t.Error("setting an active account active revoked its session")
	}
	// Without a session to keep, every one goes.
	update("", []string{"password_hash"}, &statev1.User{PasswordHash: hash})
	if open(s) {
		t.Error("password change without keep_session_id left a session open")
	}
	if r := a.apply(&statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "u", Fields: []string{"display_name"}, KeepSessionId: "bad id!"}}); r.Code != statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT {
		t.Errorf("malformed keep_session_id: %v", r)
	}
}

// A rehash stores the same password under a new hash: the account's
// sessions stay open and nothing else of it changes, and it applies only
// over the hash the login checked, so a password change committed in
// between wins.
func TestARehashKeepsThePasswordAndItsSessions(t *testing.T) {
	f := newFSM(t, Config{})
	a := &applier{t: t, f: f}
	hash := func(params auth.Params) string {
		h, err := auth.HashPassword("the same password", params)
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	old, cheaper := hash(auth.TestParams), hash(auth.Params{Memory: 32, Time: 1, Threads: 1, SaltLen: 16, KeyLen: 32})
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "u", Login: "u", DisplayName: "U", PasswordHash: old}}})
	if r := a.apply(&statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: tok("t1", "f1", "u", 1, 1<<50)}}); r.Code != statev1.ResultCode_RESULT_CODE_OK {
		t.Fatal(r)
	}
	rehash := func(uid, expect, next string) *statev1.Result {
		return a.apply(&statev1.Command_RehashPassword{RehashPassword: &statev1.RehashPassword{UserId: uid, ExpectPasswordHash: expect, PasswordHash: next}})
	}
	for _, tc := range []struct {
		name        string
		uid, expect string
		next        string
		code        statev1.ResultCode
	}{
		{"malformed id", "bad id!", old, cheaper, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT},
		{"no expected hash", "u", "", cheaper, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT},
		{"no new hash", "u", old, "", statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT},
		{"malformed new hash", "u", old, "$argon2id$nonsense", statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT},
		{"no such account", "nobody", old, cheaper, statev1.ResultCode_RESULT_CODE_NOT_FOUND},
		{"over another hash", "u", cheaper, cheaper, statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION},
	} {
		if r := rehash(tc.uid, tc.expect, tc.next); r.Code != tc.code {
			t.Errorf("%s: %v, want %v", tc.name, r, tc.code)
		}
		if u, _ := f.GetUser("u"); u.GetPasswordHash() != old {
			t.Fatalf("%s: a refused rehash changed the hash", tc.name)
		}
	}
	rev := f.AppliedIndex()
	if r := rehash("u", old, cheaper); r.Code != statev1.ResultCode_RESULT_CODE_OK || r.GetUser().GetPasswordHash() != cheaper {
		t.Fatalf("rehash: %v", r)
	}
	u, err := f.GetUser("u")
	if err != nil {
		t.Fatal(err)
	}
	if u.GetPasswordHash() != cheaper || u.GetLogin() != "u" || u.GetDisplayName() != "U" || u.GetStatus() != statev1.UserStatus_USER_STATUS_ACTIVE {
		t.Errorf("after the rehash the account is %v", u)
	}
	if ok, err := auth.VerifyPassword(u.GetPasswordHash(), "the same password"); err != nil || !ok {
		t.Errorf("the password no longer verifies: %v %v", ok, err)
	}
	if fam, err := f.GetTokenFamily("f1"); err != nil || fam.GetRevoked() {
		t.Errorf("the rehash ended the account's session: %v %v", fam, err)
	}
	changes, err := f.Changes(rev, 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(changes) != 1 || changes[0].GetKind() != statev1.ChangeKind_CHANGE_KIND_USER_PUT {
		t.Errorf("watchers were told %v, want the account put", changes)
	}
	// A second login's rehash, over the hash the first replaced, changes
	// nothing.
	if r := rehash("u", old, hash(auth.TestParams)); r.Code != statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION {
		t.Errorf("a rehash over a replaced hash: %v", r)
	}
}

// A login checks the password, then issues its session in another
// command: a change of password applied in between (which revoked every
// session open then) makes the issue fail, so the old password cannot
// open a session that outlives the change.
func TestLoginRacingAPasswordChangeOpensNothing(t *testing.T) {
	f := newFSM(t, Config{})
	a := &applier{t: t, f: f}
	far := int64(1 << 50)
	old, err := auth.HashPassword("the old password", auth.TestParams)
	if err != nil {
		t.Fatal(err)
	}
	changed, err := auth.HashPassword("a new password", auth.TestParams)
	if err != nil {
		t.Fatal(err)
	}
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "u", Login: "u", PasswordHash: old}}})
	issue := func(id, hash string) statev1.ResultCode {
		return a.apply(&statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: tok(id, "f-"+id, "u", 1, far), PasswordHash: hash}}).Code
	}
	if got := issue("t1", old); got != statev1.ResultCode_RESULT_CODE_OK {
		t.Fatalf("issue with the current password's hash: %v", got)
	}
	a.apply(&statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "u", Fields: []string{"password_hash"}, User: &statev1.User{PasswordHash: changed}}})
	if got := issue("t2", old); got != statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION {
		t.Fatalf("issue with the old password's hash after the change: %v, want FAILED_PRECONDITION", got)
	}
	if _, err := f.GetTokenFamily("f-t2"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the refused issue left a session: %v", err)
	}
	if got := issue("t3", changed); got != statev1.ResultCode_RESULT_CODE_OK {
		t.Fatalf("issue with the new password's hash: %v", got)
	}
}

// A family (a login's session) goes with its last refresh token: once
// every token of it expired and was pruned, so is it, and logins do not
// pile families up in the state. A family with a token left stays, rotated
// tokens included (they are what detects reuse).
func TestExpiredFamiliesArePruned(t *testing.T) {
	f := newFSM(t, Config{PruneEvery: 4})
	a := &applier{t: t, f: f}
	ok := statev1.ResultCode_RESULT_CODE_OK
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "u", Login: "u"}}})
	soon := 1_000_000 + int64(a.idx) + 100 // after the issues below
	for i := range 50 {
		if r := a.apply(&statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{
			Token: tok(fmt.Sprintf("t%d", i), fmt.Sprintf("f%d", i), "u", 1, soon)}}); r.Code != ok {
			t.Fatal(r)
		}
	}
	// f-live: one token expires with the others, its rotation lives on.
	far := int64(1 << 50)
	if r := a.apply(&statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: tok("old", "f-live", "u", 2, soon)}}); r.Code != ok {
		t.Fatal(r)
	}
	if r := a.apply(&statev1.Command_RotateRefreshToken{RotateRefreshToken: &statev1.RotateRefreshToken{
		TokenId: "old", PresentedSecretHash: key32(2), Next: tok("new", "f-live", "u", 3, far)}}); r.Code != ok {
		t.Fatal(r)
	}
	a.advanceTo(soon + 50)
	families := func() (ids []string) {
		_ = f.store.Iterate(prefixFamily, prefixEnd(prefixFamily), func(k, _ []byte) (bool, error) {
			ids = append(ids, string(k[len(prefixFamily):]))
			return true, nil
		})
		return ids
	}
	if got := families(); len(got) != 1 || got[0] != "f-live" {
		t.Fatalf("families after the tokens expired: %v, want only f-live", got)
	}
	if _, err := f.GetTokenFamily("f0"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a pruned family: %v, want not found", err)
	}
	if n, _ := f.UserTokenCount("u"); n != 1 {
		t.Fatalf("%d tokens left, want f-live's new one", n)
	}
}

// RegisterDevice's max_devices_per_user bounds an account's devices,
// revoked ones included; deleting one makes room; other accounts are
// counted apart; 0 is no limit.
func TestDevicesPerUserAreBounded(t *testing.T) {
	f := newFSM(t, Config{})
	a := &applier{t: t, f: f}
	for _, u := range []string{"u", "v"} {
		a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: u, Login: u}}})
	}
	register := func(user, id string, limit uint32) statev1.ResultCode {
		return a.apply(&statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{
			Device: &statev1.Device{Id: id, UserId: user, Name: id, PublicKey: key32(1)}, MaxDevicesPerUser: limit}}).GetCode()
	}
	ok, full := statev1.ResultCode_RESULT_CODE_OK, statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION
	for i, want := range []statev1.ResultCode{ok, ok, ok, full, full} {
		if got := register("u", fmt.Sprintf("d%d", i), 3); got != want {
			t.Fatalf("device %d of 3 allowed: %v, want %v", i+1, got, want)
		}
	}
	if got := register("v", "v0", 3); got != ok {
		t.Fatalf("another account's first device: %v", got)
	}
	a.apply(&statev1.Command_RevokeDevice{RevokeDevice: &statev1.RevokeDevice{UserId: "u", DeviceId: "d0"}})
	if got := register("u", "d5", 3); got != full {
		t.Fatalf("after a revocation (still listed): %v, want %v", got, full)
	}
	a.apply(&statev1.Command_DeleteDevice{DeleteDevice: &statev1.DeleteDevice{UserId: "u", DeviceId: "d0"}})
	if got := register("u", "d6", 3); got != ok {
		t.Fatalf("after a deletion: %v, want ok", got)
	}
	if got := register("u", "d7", 0); got != ok {
		t.Fatalf("no limit: %v, want ok", got)
	}
	if list, _ := f.ListDevices("u"); len(list) != 4 {
		t.Fatalf("%d devices, want 4", len(list))
	}
}

// An edge id belongs to the key that holds its lease: another key at
// another mesh address is refused while the lease is live (a second
// process with the same id), takes the id once it has run out, and cannot
// deregister the holder; at the same address (the holder restarted) it
// takes over at once.
func TestEdgeIDsBelongToTheKeyHoldingTheLease(t *testing.T) {
	f := newFSM(t, Config{})
	a := &applier{t: t, f: f}
	ok := statev1.ResultCode_RESULT_CODE_OK
	k1, k2 := key32(1), key32(2)
	now := func() int64 { return 1_000_000 + int64(a.idx) + 1 }
	registerAt := func(meshAddr string, key []byte, lease int64) *statev1.Result {
		return a.apply(&statev1.Command_RegisterEdge{RegisterEdge: &statev1.RegisterEdge{Edge: &statev1.Edge{
			Id: "e1", Addrs: []string{"a:1"}, MeshAddr: meshAddr, LeaseExpiresAtMs: lease, MeshPublicKey: key,
		}}})
	}
	register := func(key []byte, lease int64) *statev1.Result { return registerAt("a:2", key, lease) }
	held := func() []byte {
		t.Helper()
		edges, err := f.Edges()
		if err != nil || len(edges) != 1 {
			t.Fatalf("edges %v %v", edges, err)
		}
		return edges[0].GetMeshPublicKey()
	}
	if r := register(k1, now()+10); r.Code != ok {
		t.Fatal(r)
	}
	lease := now() + 9
	before := a.idx
	if r := register(k1, lease); r.Code != ok {
		t.Fatal(r)
	}
	// The clone (another host): refused, naming what happened; the holder
	// keeps the id and nothing is announced.
	r := registerAt("b:2", k2, now()+10)
	if r.Code != statev1.ResultCode_RESULT_CODE_ALREADY_EXISTS || !strings.Contains(r.GetMessage(), "another running edge") {
		t.Fatalf("second key while the lease is live: %v", r)
	}
	if !bytes.Equal(held(), k1) {
		t.Fatal("the refused key took the id")
	}
	if cs, _ := f.Changes(before, 10); len(cs) != 0 {
		t.Fatalf("changes: %v", cs)
	}
	if r := registerAt("b:2", []byte{1, 2, 3}, now()+10); r.Code != statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT {
		t.Fatalf("short key: %v", r)
	}
	// Its deregistration (it shuts down) leaves the holder alone.
	if r := a.apply(&statev1.Command_DeregisterEdge{DeregisterEdge: &statev1.DeregisterEdge{Id: "e1", MeshPublicKey: k2}}); r.Code != statev1.ResultCode_RESULT_CODE_NOT_FOUND {
		t.Fatalf("deregistration by another key: %v", r)
	}
	if !bytes.Equal(held(), k1) {
		t.Fatal("another key deregistered the holder")
	}
	// Once the lease has run out (not yet expired from the list), a new
	// process takes the id, and watchers hear of the new key.
	a.advanceTo(lease)
	before = a.idx
	if r := registerAt("b:2", k2, now()+10); r.Code != ok {
		t.Fatalf("second key after the lease ran out: %v", r)
	}
	if !bytes.Equal(held(), k2) {
		t.Fatal("the id did not move to the new key")
	}
	cs, _ := f.Changes(before, 10)
	if len(cs) != 1 || cs[0].Kind != statev1.ChangeKind_CHANGE_KIND_EDGE_PUT || !bytes.Equal(cs[0].GetEdge().GetMeshPublicKey(), k2) {
		t.Fatalf("key change announced as %v", cs)
	}
	// The holder restarted after a crash: a new key at the same mesh
	// address takes over its live lease at once.
	if r := registerAt("b:2", k1, now()+10); r.Code != ok || !bytes.Equal(held(), k1) {
		t.Fatalf("a restarted holder at the same address: %v", r)
	}
	if r := a.apply(&statev1.Command_DeregisterEdge{DeregisterEdge: &statev1.DeregisterEdge{Id: "e1", MeshPublicKey: k1}}); r.Code != ok {
		t.Fatalf("deregistration by the holder: %v", r)
	}
	// A record from before keys were kept binds nothing; a deregistration
	// without a key (an admin, an older edge) removes whoever holds it.
	if r := register(nil, now()+10); r.Code != ok {
		t.Fatal(r)
	}
	if r := register(k1, now()+10); r.Code != ok {
		t.Fatalf("key over a keyless record: %v", r)
	}
	if r := a.apply(&statev1.Command_DeregisterEdge{DeregisterEdge: &statev1.DeregisterEdge{Id: "e1"}}); r.Code != ok {
		t.Fatalf("deregistration without a key: %v", r)
	}
	if edges, _ := f.Edges(); len(edges) != 0 {
		t.Fatalf("edges left: %v", edges)
	}
}

// BenchmarkRotateRefreshToken is the apply of one refresh, a chain of
// rotations in one login: without a keep, and with one (the family's
// count written, the rotated token's index entry moved).
func BenchmarkRotateRefreshToken(b *testing.B) {
	for _, c := range []struct {
		name  string
		keep  int64
		bound bool
	}{{"plain", 0, false}, {"kept", 1 << 51, false}, {"kept-bounded", 1 << 51, true}} {
		b.Run(c.name, func(b *testing.B) {
			f := newFSM(b, Config{Logger: slog.New(slog.DiscardHandler)})
			var idx uint64
			apply := func(cmd *statev1.Command) *statev1.Result {
				idx++
				cmd.ProposedAtMs = 1_000_000
				res, _ := f.Apply(entry(b, idx, cmd)).(*statev1.Result)
				return res
			}
			ok := statev1.ResultCode_RESULT_CODE_OK
			const far = int64(1 << 50)
			if r := apply(&statev1.Command{Op: &statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "u", Login: "u"}}}}); r.GetCode() != ok {
				b.Fatal(r)
			}
			if r := apply(&statev1.Command{Op: &statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: tok("t0", "f", "u", 0, far)}}}); r.GetCode() != ok {
				b.Fatal(r)
			}
			b.ResetTimer()
			for i := range b.N {
				r := apply(&statev1.Command{Op: &statev1.Command_RotateRefreshToken{RotateRefreshToken: &statev1.RotateRefreshToken{
					TokenId: fmt.Sprint("t", i), PresentedSecretHash: key32(byte(i)), Next: tok(fmt.Sprint("t", i+1), "f", "u", byte(i+1), far), KeepRotatedUntilMs: c.keep, BoundRotations: c.bound}}})
				if r.GetCode() != ok {
					b.Fatal(r)
				}
			}
		})
	}
}

// BenchmarkLogin is a login's apply (IssueRefreshToken) without a
// session cap and at a steady cap (every login ends the oldest session),
// the account holding as many sessions as its cap allows.
func BenchmarkLogin(b *testing.B) {
	for _, limit := range []uint32{0, 100, MaxSessionCap} {
		b.Run(fmt.Sprint("cap-", limit), func(b *testing.B) {
			f := newFSM(b, Config{Logger: slog.New(slog.DiscardHandler), PruneEvery: 1 << 40})
			var idx uint64
			login := func(i int) {
				idx++
				cmd := &statev1.Command{ProposedAtMs: 1_000_000 + int64(idx), Op: &statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{
					Token: tok(fmt.Sprint("t", i), fmt.Sprint("f", i), "u", byte(i), 1<<50), MaxSessions: limit}}}
				if r, _ := f.Apply(entry(b, idx, cmd)).(*statev1.Result); r.GetCode() != statev1.ResultCode_RESULT_CODE_OK {
					b.Fatal(r)
				}
			}
			idx++
			f.Apply(entry(b, idx, &statev1.Command{ProposedAtMs: 1_000_000, Op: &statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "u", Login: "u"}}}}))
			for i := range int(max(limit, 100)) {
				login(-1 - i)
			}
			b.ResetTimer()
			for i := range b.N {
				login(i)
			}
		})
	}
}

// cappedWorld is a state where the feature session_cap is in use (gated
// apply on, the one node record lists every feature) with user u.
func cappedWorld(t *testing.T, pruneEvery uint64) (*FSM, *applier) {
	t.Helper()
	f := newFSM(t, Config{PruneEvery: pruneEvery})
	a := &applier{t: t, f: f}
	a.apply(putNode("n1", Features()))
	if r := a.apply(&statev1.Command_EnableGatedApply{EnableGatedApply: &statev1.EnableGatedApply{}}); r.Code != statev1.ResultCode_RESULT_CODE_OK {
		t.Fatal(r)
	}
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "u", Login: "u"}}})
	return f, a
}

// A login under a session cap ends the account's oldest sessions past
// it: their tokens and index entries go (their records too, when the
// login keeps them for no access token), so that an
// account's sessions hold a bounded part of the state however often it
// logs in. A logged-out session (RevokeTokenFamily.end) goes at once and
// takes no room; a revoked one counts in its turn. Sessions opened
// without a cap are not counted; a lowered cap is reached over several
// logins; an index entry whose family is gone counts nothing once it
// comes up.
func TestASessionCapEndsTheOldestSessions(t *testing.T) {
	f, a := cappedWorld(t, 1<<20)
	ok := statev1.ResultCode_RESULT_CODE_OK
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "v", Login: "v"}}})
	const far = int64(1 << 50)
	n := 0
	login := func(uid, fam string, limit uint32) string {
		t.Helper()
		n++
		id := fmt.Sprint("t", n)
		if r := a.apply(&statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: tok(id, fam, uid, byte(n), far), MaxSessions: limit}}); r.Code != ok {
			t.Fatalf("login %s: %v", fam, r)
		}
		return id
	}
	families := func(want ...string) {
		t.Helper()
		var got []string
		if err := f.store.Iterate(prefixFamily, prefixEnd(prefixFamily), func(k, _ []byte) (bool, error) {
			got = append(got, string(k[len(prefixFamily):]))
			return true, nil
		}); err != nil {
			t.Fatal(err)
		}
		if slices.Sort(want); !slices.Equal(got, want) {
			t.Fatalf("families %v, want %v", got, want)
		}
		// Every token and index entry left belongs to a family left.
		for _, p := range [][]byte{prefixUserTokens, prefixUserFamily} {
			for _, k := range keysWith(t, f, p) {
				if !slices.ContainsFunc(want, func(fam string) bool { return strings.Contains(k, fam) }) {
					t.Fatalf("%s left of a family that is gone", k)
				}
			}
		}
		if toks, exps := len(keysWith(t, f, prefixToken)), len(keysWith(t, f, prefixTokenExpiry)); toks != len(keysWith(t, f, prefixUserTokens)) || toks != exps {
			t.Fatalf("%d tokens, %d expiry entries, %d user entries", toks, exps, len(keysWith(t, f, prefixUserTokens)))
		}
	}
	revoke := func(fam string, end bool) {
		t.Helper()
		if r := a.apply(&statev1.Command_RevokeTokenFamily{RevokeTokenFamily: &statev1.RevokeTokenFamily{FamilyId: fam, UserId: "u", End: end}}); r.Code != ok {
			t.Fatalf("revoke %s: %v", fam, r)
		}
	}

	if r := a.apply(&statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: tok("tx", "fx", "u", 1, far), MaxSessions: MaxSessionCap + 1}}); r.Code != statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT || !strings.Contains(r.Message, "max_sessions") {
		t.Fatalf("a cap past MaxSessionCap: %v", r)
	}
	login("u", "f0", 0) // no cap: not counted, never ended by one
	t1, h1 := login("u", "f1", 3), byte(n)
	// f1 refreshed twice: its rotated tokens, kept, go with it.
	for i := range 2 {
		next := tok(fmt.Sprint("r", i), "f1", "u", byte(100+i), far)
		if r := a.apply(&statev1.Command_RotateRefreshToken{RotateRefreshToken: &statev1.RotateRefreshToken{TokenId: t1, PresentedSecretHash: key32(h1), Next: next, KeepRotatedUntilMs: far + 1}}); r.Code != ok {
			t.Fatalf("rotate f1: %v", r)
		}
		t1, h1 = next.Id, byte(100+i)
	}
	login("u", "f2", 3)
	t3 := login("u", "f3", 3)
	login("v", "g1", 1)
	families("f0", "f1", "f2", "f3", "g1")
	login("u", "f4", 3) // f1, the oldest, ends
	families("f0", "f2", "f3", "f4", "g1")
	if r := a.apply(&statev1.Command_RotateRefreshToken{RotateRefreshToken: &statev1.RotateRefreshToken{TokenId: t1, PresentedSecretHash: key32(h1), Next: tok("r9", "f1", "u", 9, far)}}); r.Code != statev1.ResultCode_RESULT_CODE_NOT_FOUND {
		t.Fatalf("a token of an ended session: %v, want not recognised", r)
	}
	// A logout that ends its session leaves nothing of it, and frees its
	// room: the next login ends nothing.
	revoke("f3", true)
	families("f0", "f2", "f4", "g1")
	if r := a.apply(&statev1.Command_RotateRefreshToken{RotateRefreshToken: &statev1.RotateRefreshToken{TokenId: t3, PresentedSecretHash: key32(4), Next: tok("r8", "f3", "u", 8, far)}}); r.Code != statev1.ResultCode_RESULT_CODE_NOT_FOUND {
		t.Fatalf("a token of a logged-out session: %v, want not recognised", r)
	}
	login("u", "f5", 3)
	families("f0", "f2", "f4", "f5", "g1")
	// A revoked session (reuse, a new password) is kept, and counts.
	revoke("f2", false)
	login("u", "f6", 3)
	families("f0", "f4", "f5", "f6", "g1")
	// Another account's logins leave u's sessions alone; its cap of 1
	// keeps one.
	login("v", "g2", 1)
	families("f0", "f4", "f5", "f6", "g2")
	// A lowered cap ends at most MaxEndedPerLogin a login.
	login("u", "f7", 1)
	families("f0", "f6", "f7", "g2")
	login("u", "f8", 1)
	families("f0", "f8", "g2")
	// Entries whose family is gone (as the index is left when a family is
	// pruned while the feature is shut), the oldest, count nothing once
	// they come up, and go.
	b := f.store.NewBatch()
	if err := b.Set(userFamilyKey("u", 1, "gone"), nil); err != nil {
		t.Fatal(err)
	}
	if err := b.Set(userFamilyKey("u", 2, "g2"), nil); err != nil { // v's family
		t.Fatal(err)
	}
	if err := b.Set(userFamilyKey("u", 3, "f8"), nil); err != nil { // u's, but not opened then
		t.Fatal(err)
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	login("u", "f9", 2)
	families("f0", "f8", "f9", "g2")
	var left []string
	for _, k := range keysWith(t, f, userFamiliesPrefix("u")) {
		left = append(left, k[len(k)-3:len(k)-1])
	}
	if !slices.Equal(left, []string{"f8", "f9"}) {
		t.Fatalf("u's index: %v, want f8, f9", left)
	}
	// Deleting the user leaves none of its entries.
	if r := a.apply(&statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: "u"}}); r.Code != ok {
		t.Fatal(r)
	}
	families("g2")
	if got := keysWith(t, f, prefixUserFamily); len(got) != 1 {
		t.Fatalf("index after u's deletion: %v, want v's entry only", got)
	}
}

// With bound_rotations a family counts its rotations and, past
// MaxKeptRotated of them, keeps only the token rotated last of those
// rotated since: a login refreshed in a loop holds at most
// MaxKeptRotated + 2 tokens, whatever their expiry. The early ones stay,
// and so does the last (reuse of either is still seen); one in between
// presented again is not recognised.
func TestBoundRotationsKeepALoginsTokensBounded(t *testing.T) {
	ok := statev1.ResultCode_RESULT_CODE_OK
	const rotations = MaxKeptRotated + 3
	looped := func(t *testing.T) (*FSM, *applier) {
		f, a := oneLogin(t)
		for i := range rotations {
			// Half without a keep (a login with no longest life): counted too.
			r := a.apply(&statev1.Command_RotateRefreshToken{RotateRefreshToken: &statev1.RotateRefreshToken{
				TokenId: fmt.Sprint("t", i), PresentedSecretHash: key32(byte(i)), Next: tok(fmt.Sprint("t", i+1), "f", "u", byte(i+1), far),
				KeepRotatedUntilMs: int64(i%2) * (far + 1), BoundRotations: true}})
			if r.Code != ok {
				t.Fatalf("rotation %d: %v", i, r)
			}
		}
		return f, a
	}
	present := func(a *applier, i int) *statev1.Result {
		return a.apply(&statev1.Command_RotateRefreshToken{RotateRefreshToken: &statev1.RotateRefreshToken{TokenId: fmt.Sprint("t", i),
			PresentedSecretHash: key32(byte(i % 256)), Next: tok(fmt.Sprint("x", i), "f", "u", 1, far), BoundRotations: true}})
	}
	f, a := looped(t)
	for _, i := range []int{0, MaxKeptRotated - 1, rotations - 1} {
		if got, err := f.GetRefreshToken(fmt.Sprint("t", i)); err != nil || !got.GetRotated() {
			t.Fatalf("t%d: %v, %v; want kept, rotated", i, got, err)
		}
	}
	for _, i := range []int{MaxKeptRotated, MaxKeptRotated + 1} {
		if _, err := f.GetRefreshToken(fmt.Sprint("t", i)); !errors.Is(err, ErrNotFound) {
			t.Fatalf("t%d, rotated past the bound and not last: %v, want deleted", i, err)
		}
	}
	if got, err := f.GetRefreshToken(fmt.Sprint("t", rotations)); err != nil || got.GetRotated() {
		t.Fatalf("the live token: %v, %v", got, err)
	}
	fam, err := f.GetTokenFamily("f")
	if err != nil || fam.GetRotations() != MaxKeptRotated+1 || fam.GetKeptRotated() != MaxKeptRotated/2 || fam.GetLastRotatedId() != fmt.Sprint("t", rotations-1) {
		t.Fatalf("family: %v, %v; want %d rotations counted, %d kept, the last rotated t%d", fam, err, MaxKeptRotated+1, MaxKeptRotated/2, rotations-1)
	}
	for _, p := range [][]byte{prefixToken, prefixTokenExpiry, prefixUserTokens} {
		if got := len(keysWith(t, f, p)); got != MaxKeptRotated+2 {
			t.Fatalf("%d %q entries, want %d", got, p, MaxKeptRotated+2)
		}
	}
	if r := present(a, MaxKeptRotated); r.Code != statev1.ResultCode_RESULT_CODE_NOT_FOUND {
		t.Fatalf("a deleted rotated token: %v, want not recognised", r)
	}
	if r := present(a, rotations-1); r.Code != ok || !r.ReuseDetected {
		t.Fatalf("the token rotated last: %v, want reuse", r)
	}
	_, a = looped(t)
	if r := present(a, 1); r.Code != ok || !r.ReuseDetected {
		t.Fatalf("an early rotated token: %v, want reuse", r)
	}
}

// A session opened under a cap whose tokens all expire is pruned with its
// index entry while the feature is in use. While a record lacks it the
// index is left as a release without the feature leaves it (so that its
// replicas hold the same), and the entry left counts nothing once it
// comes up at a capped login.
func TestAPrunedSessionLeavesNoIndexEntry(t *testing.T) {
	f, a := cappedWorld(t, 4)
	ok := statev1.ResultCode_RESULT_CODE_OK
	now := func() int64 { return 1_000_000 + int64(a.idx) }
	login := func(i int, exp int64) {
		t.Helper()
		if r := a.apply(&statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{
			Token: tok(fmt.Sprint("t", i), fmt.Sprint("f", i), "u", byte(i), exp), MaxSessions: 3}}); r.Code != ok || len(r.FeaturesIgnored) != 0 {
			t.Fatal(r)
		}
	}
	index := func() (out []string) {
		for _, k := range keysWith(t, f, prefixUserFamily) {
			out = append(out, k[len(k)-3:len(k)-1]) // the family id, inside the quotes
		}
		return out
	}
	login(0, now()+10)
	login(1, now()+1_000_000)
	if got := index(); !slices.Equal(got, []string{"f0", "f1"}) {
		t.Fatalf("index: %v", got)
	}
	a.advanceTo(now() + 20)
	if _, err := f.GetTokenFamily("f0"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("f0 past its token's expiry: %v, want pruned", err)
	}
	if got := index(); !slices.Equal(got, []string{"f1"}) {
		t.Fatalf("index after f0 was pruned: %v, want f1's entry only", got)
	}

	// Shut: f2 is pruned, its entry stays; so do the entries of a user
	// deleted meanwhile.
	login(2, now()+10)
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "w", Login: "w"}}})
	if r := a.apply(&statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: tok("tw", "fw", "w", 9, now()+1_000_000), MaxSessions: 3}}); r.Code != ok {
		t.Fatal(r)
	}
	a.apply(putNode("n2", withoutFeature(FeatureSessionCap)))
	if r := a.apply(&statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: "w"}}); r.Code != ok {
		t.Fatal(r)
	}
	a.advanceTo(now() + 20)
	if _, err := f.GetTokenFamily("f2"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("f2 past its token's expiry: %v, want pruned", err)
	}
	if got := index(); !slices.Equal(got, []string{"f1", "f2", "fw"}) {
		t.Fatalf("index after f2 was pruned and w deleted with the feature shut: %v, want their entries kept", got)
	}
	// Open again: f3's login counts f2's entry too (3 of 3), f4's ends
	// the oldest, f1; f5's, under a cap of 1, drops f2's entry without
	// counting it among the sessions it may end, and ends f3 and f4.
	a.apply(putNode("n2", Features()))
	login(3, now()+1_000_000)
	login(4, now()+1_000_000)
	if got := index(); !slices.Equal(got, []string{"f2", "f3", "f4", "fw"}) {
		t.Fatalf("index: %v, want f2, f3, f4 (and the deleted w's fw)", got)
	}
	if r := a.apply(&statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{
		Token: tok("t5", "f5", "u", 5, now()+1_000_000), MaxSessions: 1}}); r.Code != ok {
		t.Fatal(r)
	}
	if got := index(); !slices.Equal(got, []string{"f5", "fw"}) {
		t.Fatalf("index after a login with a cap of 1: %v, want f5 (and the deleted w's fw)", got)
	}
	for _, fam := range []string{"f1", "f3", "f4"} {
		if _, err := f.GetTokenFamily(fam); !errors.Is(err, ErrNotFound) {
			t.Fatalf("%s: %v, want ended", fam, err)
		}
	}
}

// An ended session (by the cap, or a logout that ends it) loses its
// tokens at once, and its record stays, revoked, until the time the
// command gives (at most MaxEndedKeepMs away), so every node refuses its
// access tokens from its own state until they expire; pruning then
// deletes it, while the feature is in use.
func TestAnEndedSessionIsKeptRevokedForItsAccessTokens(t *testing.T) {
	f, a := cappedWorld(t, 4)
	ok := statev1.ResultCode_RESULT_CODE_OK
	now := func() int64 { return 1_000_000 + int64(a.idx) }
	login := func(i int, limit uint32, keep int64) {
		t.Helper()
		if r := a.apply(&statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{
			Token: tok(fmt.Sprint("t", i), fmt.Sprint("f", i), "u", byte(i), far), MaxSessions: limit, EndedKeptUntilMs: keep}}); r.Code != ok {
			t.Fatal(r)
		}
	}
	end := func(i int, keep int64) {
		t.Helper()
		if r := a.apply(&statev1.Command_RevokeTokenFamily{RevokeTokenFamily: &statev1.RevokeTokenFamily{
			FamilyId: fmt.Sprint("f", i), UserId: "u", Reason: "logout", End: true, EndedKeptUntilMs: keep}}); r.Code != ok {
			t.Fatal(r)
		}
	}
	// kept reports whether family i is kept revoked without tokens (and
	// fails if it is there otherwise).
	kept := func(i int) bool {
		t.Helper()
		fam, err := f.GetTokenFamily(fmt.Sprint("f", i))
		if errors.Is(err, ErrNotFound) {
			return false
		}
		if err != nil || !fam.GetRevoked() {
			t.Fatalf("f%d: %v, %v; want revoked", i, fam, err)
		}
		if n, _ := f.UserTokenCount("u"); slices.ContainsFunc(keysWith(t, f, prefixUserTokens), func(k string) bool { return strings.Contains(k, fmt.Sprintf(`\x00f%d\x00`, i)) }) {
			t.Fatalf("f%d ended with tokens left (%d for u)", i, n)
		}
		return true
	}
	login(1, 1, 0)
	at := now()
	login(2, 1, at+50) // ends f1, kept until +50
	end(2, at+65)      // a logout: kept until +65
	end(2, at+60)      // again (a logout racing the cap): one entry, the later keep
	login(3, 5, 0)
	end(3, at+10*MaxEndedKeepMs) // kept a day at most
	if !kept(1) || !kept(2) || !kept(3) {
		t.Fatal("an ended session's record is not kept")
	}
	if got, want := keysWith(t, f, prefixEndedFamily), []string{
		fmt.Sprintf("%q", endedFamilyKey(at+50, "f1")), fmt.Sprintf("%q", endedFamilyKey(at+65, "f2")), fmt.Sprintf("%q", endedFamilyKey(now()+MaxEndedKeepMs, "f3")),
	}; !slices.Equal(got, want) {
		t.Fatalf("ended families: %v, want %v", got, want)
	}
	// f4, ended with no keep: deleted at once.
	login(4, 5, 0)
	end(4, 0)
	if kept(4) {
		t.Fatal("f4 ended without a keep is still there")
	}
	a.advanceTo(at + 55)
	if kept(1) || !kept(2) {
		t.Fatal("past f1's keep: want f1 pruned, f2 kept")
	}
	// While a record lacks the feature, nothing is pruned (a release
	// without it would not); once all list it again, it is.
	a.apply(putNode("n2", withoutFeature(FeatureSessionCap)))
	a.advanceTo(at + 70)
	if !kept(2) {
		t.Fatal("f2 pruned while the feature was shut")
	}
	a.apply(putNode("n2", Features()))
	a.advanceTo(at + 80)
	if kept(2) || !kept(3) {
		t.Fatal("with the feature open again: want f2 pruned, f3 kept")
	}
}

// Ending a session deletes at most maxEndTokens of its tokens in one
// entry: a session from before the bound on rotations may hold more
// (they go at their own expiry). Its record stays, revoked, until both
// its keep and its last token have passed, whichever passes first.
func TestEndingASessionDeletesABoundedNumberOfTokens(t *testing.T) {
	for _, c := range []struct {
		name          string
		left, keptFor int64 // the tokens left expire, the keep ends, this long after the end
	}{{"tokens left go first", 500, 1000}, {"the keep ends first", 1000, 500}} {
		t.Run(c.name, func(t *testing.T) {
			f, a := cappedWorld(t, 64)
			ok := statev1.ResultCode_RESULT_CODE_OK
			const total = maxEndTokens + 2
			// Ids sort as they were issued, so the two last (short-lived)
			// are the ones left.
			id := func(i int) string { return fmt.Sprintf("t%05d", i) }
			at := 1_000_000 + int64(a.idx) + total + 1 // when the rotations are done
			exp := func(i int) int64 {
				if i >= total-2 {
					return at + c.left
				}
				return far
			}
			if r := a.apply(&statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: tok(id(0), "f", "u", 0, far)}}); r.Code != ok {
				t.Fatal(r)
			}
			for i := range total - 1 {
				if r := a.apply(&statev1.Command_RotateRefreshToken{RotateRefreshToken: &statev1.RotateRefreshToken{
					TokenId: id(i), PresentedSecretHash: key32(byte(i)), Next: tok(id(i+1), "f", "u", byte(i+1), exp(i+1))}}); r.Code != ok {
					t.Fatalf("rotation %d: %v", i, r)
				}
			}
			keep := at + c.keptFor
			if r := a.apply(&statev1.Command_RevokeTokenFamily{RevokeTokenFamily: &statev1.RevokeTokenFamily{FamilyId: "f", UserId: "u", End: true, EndedKeptUntilMs: keep}}); r.Code != ok {
				t.Fatal(r)
			}
			if n, err := f.UserTokenCount("u"); err != nil || n != total-maxEndTokens {
				t.Fatalf("tokens left: %d, %v; want %d", n, err, total-maxEndTokens)
			}
			for _, i := range []int{total - 2, total - 1} {
				if _, err := f.GetRefreshToken(id(i)); err != nil {
					t.Fatalf("%s, left: %v", id(i), err)
				}
			}
			if fam, err := f.GetTokenFamily("f"); err != nil || !fam.GetRevoked() || fam.GetEndedUntilMs() != keep {
				t.Fatalf("the family with tokens left: %v, %v; want kept, revoked, until %d", fam, err, keep)
			}
			// Past the first of the two (a prune or more): still there.
			a.advanceTo(at + min(c.left, c.keptFor) + 100)
			if fam, err := f.GetTokenFamily("f"); err != nil || !fam.GetRevoked() {
				t.Fatalf("the family past the first of its keep and its last token: %v, %v; want kept, revoked", fam, err)
			}
			a.advanceTo(at + max(c.left, c.keptFor) + 100)
			if _, err := f.GetTokenFamily("f"); !errors.Is(err, ErrNotFound) {
				t.Fatalf("the family past both: %v, want pruned", err)
			}
			if n, _ := f.UserTokenCount("u"); n != 0 {
				t.Fatalf("%d tokens left past their expiry", n)
			}
			if got := keysWith(t, f, prefixEndedFamily); len(got) != 0 {
				t.Fatalf("ended-family entries left: %v", got)
			}
		})
	}
}
