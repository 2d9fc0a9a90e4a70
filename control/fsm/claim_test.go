package fsm

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

func anyOne(uid, did, sender, id string, size int, exp int64) *statev1.MailboxEntry {
	e := mail(uid, did, sender, id, size, exp)
	e.AnyOne = true
	return e
}

func claim(uid, did, sender, id string, exp int64) *statev1.EventClaim {
	return &statev1.EventClaim{UserId: uid, DeviceId: did, SenderDeviceId: sender, EventId: id, ExpiresAtMs: exp}
}

func claimOp(claims ...*statev1.EventClaim) isCommandOp {
	return &statev1.Command_ClaimEvents{ClaimEvents: &statev1.ClaimEvents{Claims: claims}}
}

// won renders a ClaimEvents result as "true false ...".
func won(t *testing.T, r *statev1.Result) string {
	t.Helper()
	if r.GetCode() != statev1.ResultCode_RESULT_CODE_OK {
		t.Fatalf("claim: %v", r)
	}
	return strings.Trim(fmt.Sprint(r.GetClaimsWon()), "[]")
}

// keysWith lists the keys under prefix p.
func keysWith(t *testing.T, f *FSM, p []byte) []string {
	t.Helper()
	var out []string
	if err := f.store.Iterate(p, prefixEnd(p), func(k, _ []byte) (bool, error) {
		out = append(out, fmt.Sprintf("%q", k))
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

// eventIDs lists a device's stored event ids, oldest first.
func eventIDs(t *testing.T, f *FSM, did string) string {
	t.Helper()
	got, _, err := f.FetchMailbox(did, 0, 100, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range got {
		s := e.GetEventId()
		if e.GetAnyOne() {
			s += "*"
		}
		out = append(out, s)
	}
	return strings.Join(out, " ")
}

// The first claim of an event wins and deletes the event's any_one
// entries of every other device in the same entry; later claims by
// others lose, the winner's retries win; dead devices lose.
func TestClaimEvents(t *testing.T) {
	f, a := mailboxWorld(t, Config{})
	a.apply(&statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: "a3", UserId: "alice", Name: "n", PublicKey: key32(9)}}})
	r := a.apply(putOp(
		anyOne("alice", "a1", "s", "call", 10, far),
		anyOne("alice", "a2", "s", "call", 20, far),
		anyOne("alice", "a3", "s", "call", 30, far),
		mail("alice", "a2", "s", "plain", 5, far),
		anyOne("alice", "a2", "s", "task", 7, far),
		anyOne("alice", "a2", "other", "call", 8, far), // same event id, another sender
	))
	if outcomes(r) != "STORED/1 STORED/1 STORED/1 STORED/2 STORED/3 STORED/4" {
		t.Fatal(outcomes(r))
	}
	if got := eventIDs(t, f, "a2"); got != "call* plain task* call*" {
		t.Fatalf("a2 holds %s", got)
	}
	if n := len(keysWith(t, f, prefixEventIndex)); n != 5 {
		t.Fatalf("%d event index records, want 5 (one per any_one entry)", n)
	}

	before, _ := f.Digest()
	if w := won(t, a.apply(claimOp(claim("alice", "a1", "s", "call", far)))); w != "true" {
		t.Fatalf("first claim: %s", w)
	}
	after, _ := f.Digest()
	if before == after {
		t.Fatal("a winning claim changed nothing")
	}
	// One entry decided the claim and deleted the siblings: a2's and a3's
	// "call" from s are gone, with their counters; the winner keeps its
	// own entry; other events and senders are untouched.
	for did, want := range map[string]string{"a1": "call*", "a2": "plain task* call*", "a3": ""} {
		if got := eventIDs(t, f, did); got != want {
			t.Fatalf("%s holds %q, want %q", did, got, want)
		}
	}
	for did, want := range map[string][3]uint64{"a1": {1, 10, 1}, "a2": {3, 20, 4}, "a3": {0, 0, 1}} {
		mb, _ := f.Mailbox(did)
		if mb.GetCount() != want[0] || mb.GetBytes() != want[1] || mb.GetLastSeq() != want[2] {
			t.Fatalf("%s counters %v, want count/bytes/last seq %v", did, mb, want)
		}
	}
	if n := len(keysWith(t, f, prefixEventIndex)); n != 3 {
		t.Fatalf("event index after the claim: %v", keysWith(t, f, prefixEventIndex))
	}
	c, err := f.Claim("s", "call")
	if err != nil || c.GetDeviceId() != "a1" || c.GetUserId() != "alice" || c.GetExpiresAtMs() != far || c.GetClaimedAtMs() != 1_000_000+int64(a.idx) {
		t.Fatalf("claim record %v, %v", c, err)
	}

	// Another device loses; the winner's retry wins; neither writes.
	digest, _ := f.Digest()
	if w := won(t, a.apply(claimOp(claim("alice", "a2", "s", "call", far), claim("alice", "a1", "s", "call", far+5)))); w != "false true" {
		t.Fatalf("later claims: %s", w)
	}
	if d, _ := f.Digest(); d != digest {
		t.Fatal("a decided claim changed the state")
	}
	// Dead or foreign devices lose, also as the first claim, and record
	// nothing: a missing device, a revoked one, another user's, a disabled
	// user's. A claim of an event that is over when it is applied, which
	// nobody claimed in time, is won by every device that makes it, and
	// records nothing either: none of them was beaten to it.
	if w := won(t, a.apply(claimOp(
		claim("alice", "nope", "s", "task", far),
		claim("alice", "r1", "s", "task", far),
		claim("alice", "b1", "s", "task", far),
		claim("off", "o1", "s", "task", far),
		claim("alice", "a1", "s", "old", 1_000_000+int64(a.idx)+1), // expires at the command's time
		claim("alice", "a2", "s", "old", 1_000_000+int64(a.idx)+1),
	))); w != "false false false false true true" {
		t.Fatalf("dead claims: %s", w)
	}
	for _, id := range []string{"task", "old"} {
		if _, err := f.Claim("s", id); !errors.Is(err, ErrNotFound) {
			t.Fatalf("claim of %s recorded: %v", id, err)
		}
	}
	if got := eventIDs(t, f, "a2"); got != "plain task* call*" {
		t.Fatalf("a lost claim deleted entries: %s", got)
	}
	// Within one command claims are decided in order; a claim for an event
	// nobody stored still decides it.
	if w := won(t, a.apply(claimOp(claim("alice", "a2", "s", "task", far), claim("alice", "a1", "s", "task", far),
		claim("bob", "b1", "s", "unstored", far), claim("alice", "a2", "s", "task", far)))); w != "true false true true" {
		t.Fatalf("claims in one command: %s", w)
	}
	if got := eventIDs(t, f, "a2"); got != "plain task* call*" {
		t.Fatalf("the winner's own entry went: %s", got)
	}
	// Acking an any_one entry removes its index record.
	a.apply(ackOp("a2", 3))
	if got := keysWith(t, f, prefixEventIndex); len(got) != 2 {
		t.Fatalf("event index after an ack: %v", got)
	}
	// An event id with a NUL and one that extends another stay distinct.
	a.apply(putOp(anyOne("alice", "a2", "s", "x\x00y", 1, far), anyOne("alice", "a3", "s", "x", 1, far)))
	if w := won(t, a.apply(claimOp(claim("alice", "a1", "s", "x\x00y", far)))); w != "true" {
		t.Fatal(w)
	}
	if got := eventIDs(t, f, "a3"); got != "x*" {
		t.Fatalf("a claim of another event deleted %q", got)
	}
}

// A claim's record outlives its event by record_grace_ms: a claim of
// another device that comes late, after the event's expiry, still finds
// who took it and loses; once the grace has passed the record goes.
func TestAClaimRecordOutlivesItsEventByTheGrace(t *testing.T) {
	f, a := mailboxWorld(t, Config{})
	base := 1_000_000 + int64(a.idx) + 1
	graced := func(grace int64, claims ...*statev1.EventClaim) isCommandOp {
		return &statev1.Command_ClaimEvents{ClaimEvents: &statev1.ClaimEvents{Claims: claims, RecordGraceMs: grace}}
	}
	if w := won(t, a.apply(graced(100, claim("alice", "a1", "s", "call", base+5)))); w != "true" {
		t.Fatal(w)
	}
	a.advanceTo(base + 50)
	a.apply(&statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{}})
	if w := won(t, a.apply(graced(100, claim("alice", "a2", "s", "call", base+5)))); w != "false" {
		t.Fatalf("a late claim of another device within the grace: %s, want lost", w)
	}
	a.advanceTo(base + 110)
	a.apply(&statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{}})
	if _, err := f.Claim("s", "call"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the record after the grace: %v", err)
	}
	for _, g := range []int64{-1, MaxClaimRecordGraceMs + 1} {
		if r := a.apply(graced(g, claim("alice", "a1", "s", "other", far))); r.GetCode() != statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT {
			t.Fatalf("record_grace_ms %d: %v", g, r)
		}
	}
}

// Claim records expire with ExpireMailboxes (sharing its limit, after
// the entries); removed, the event can be decided again.
func TestClaimExpiry(t *testing.T) {
	f, a := mailboxWorld(t, Config{})
	base := 1_000_000 + int64(a.idx)
	a.apply(putOp(anyOne("alice", "a2", "s", "e0", 10, base+3)))
	if w := won(t, a.apply(claimOp(claim("alice", "a1", "s", "e1", base+5), claim("alice", "a1", "s", "e2", base+6), claim("alice", "a1", "s", "e3", far)))); w != "true true true" {
		t.Fatal(w)
	}
	if due, _ := f.MailboxExpiryDue(base+2, false); due {
		t.Fatal("expiry due early")
	}
	a.advanceTo(base + 6)
	if due, _ := f.MailboxExpiryDue(base+5, false); !due {
		t.Fatal("claim expiry not due")
	}
	// Next command's time is base+7: the entry and two claims are due; a
	// limit of 2 takes the entry and the oldest claim.
	a.apply(&statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{Limit: 2}})
	if _, err := f.Claim("s", "e1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("e1: %v", err)
	}
	if _, err := f.Claim("s", "e2"); err != nil {
		t.Fatalf("e2 expired beyond the limit: %v", err)
	}
	if got := keysWith(t, f, prefixEventIndex); len(got) != 0 {
		t.Fatalf("expired entry left its index record: %v", got)
	}
	a.apply(&statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{}})
	if got := append(keysWith(t, f, prefixClaim), keysWith(t, f, prefixClaimExpiry)...); len(got) != 2 {
		t.Fatalf("after expiry: %v", got)
	}
	if due, _ := f.MailboxExpiryDue(far-1, false); due {
		t.Fatal("still due")
	}
	if w := won(t, a.apply(claimOp(claim("alice", "a2", "s", "e1", far), claim("alice", "a2", "s", "e3", far)))); w != "true false" {
		t.Fatalf("after expiry: %s", w)
	}
}

// Deleting the winner (or its user) keeps its claim until expiry:
// others still lose, the gone device loses too, and expiry removes the
// record. A deleted device's index records go with its mailbox.
func TestClaimOutlivesDevice(t *testing.T) {
	f, a := mailboxWorld(t, Config{})
	exp := 1_000_000 + int64(a.idx) + 20
	a.apply(putOp(anyOne("alice", "a1", "s", "e", 1, far), anyOne("alice", "a2", "s", "e", 1, far), anyOne("alice", "a2", "s", "f", 1, far)))
	if w := won(t, a.apply(claimOp(claim("alice", "a1", "s", "e", exp)))); w != "true" {
		t.Fatal(w)
	}
	a.apply(&statev1.Command_DeleteDevice{DeleteDevice: &statev1.DeleteDevice{UserId: "alice", DeviceId: "a1"}})
	a.apply(&statev1.Command_RevokeDevice{RevokeDevice: &statev1.RevokeDevice{UserId: "alice", DeviceId: "a2"}})
	if got := keysWith(t, f, prefixEventIndex); len(got) != 0 {
		t.Fatalf("deleted and revoked devices left index records: %v", got)
	}
	if w := won(t, a.apply(claimOp(claim("alice", "a1", "s", "e", exp), claim("bob", "b1", "s", "e", exp), claim("bob", "b1", "s", "f", exp)))); w != "false false true" {
		t.Fatal(w)
	}
	a.apply(&statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: "bob"}})
	if c, err := f.Claim("s", "f"); err != nil || c.GetDeviceId() != "b1" {
		t.Fatalf("claim of a deleted user's device: %v %v", c, err)
	}
	a.advanceTo(exp)
	a.apply(&statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{}})
	if got := append(keysWith(t, f, prefixClaim), keysWith(t, f, prefixClaimExpiry)...); len(got) != 0 {
		t.Fatalf("claims of gone devices outlived expiry: %v", got)
	}
}

// An any_one entry written after its event was claimed (the write raced
// the claim) is not stored: no other device may see a taken event.
func TestPutAfterClaimIsTaken(t *testing.T) {
	f, a := mailboxWorld(t, Config{})
	if w := won(t, a.apply(claimOp(claim("alice", "a1", "s", "call", far)))); w != "true" {
		t.Fatalf("claim: %s", w)
	}
	r := a.apply(putOp(anyOne("alice", "a2", "s", "call", 10, far), anyOne("alice", "a2", "s", "other", 10, far), mail("alice", "a2", "s", "call", 10, far)))
	if got := outcomes(r); got != "TAKEN/0 STORED/1 STORED/2" {
		t.Fatalf("outcomes %s", got)
	}
	if got := eventIDs(t, f, "a2"); got != "other* call" {
		t.Fatalf("a2 holds %q", got)
	}
}
