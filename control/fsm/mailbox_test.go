package fsm

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	statev1 "github.com/edge-relay/relay/proto/state/v1"
	"github.com/edge-relay/relay/storage/state"
)

const (
	stored  = statev1.MailboxStatus_MAILBOX_STATUS_STORED
	full    = statev1.MailboxStatus_MAILBOX_STATUS_FULL
	gone    = statev1.MailboxStatus_MAILBOX_STATUS_TARGET_GONE
	expired = statev1.MailboxStatus_MAILBOX_STATUS_EXPIRED
)

// far is an expiry no test command reaches (test commands run at about
// 1_000_000 ms), within the maximum TTL.
const far = int64(20_000_000_000)

func mail(uid, did, sender, id string, size int, exp int64) *statev1.MailboxEntry {
	return &statev1.MailboxEntry{UserId: uid, DeviceId: did, SenderDeviceId: sender, EventId: id,
		Event: bytes.Repeat([]byte{'e'}, size), ExpiresAtMs: exp}
}

func putOp(entries ...*statev1.MailboxEntry) isCommandOp {
	return &statev1.Command_PutMailbox{PutMailbox: &statev1.PutMailbox{Entries: entries}}
}

func ackOp(did string, seqs ...uint64) isCommandOp {
	return &statev1.Command_AckMailbox{AckMailbox: &statev1.AckMailbox{DeviceId: did, Seqs: seqs}}
}

// outcomes renders a result's per-entry outcomes as "STATUS/seq".
func outcomes(r *statev1.Result) string {
	var out []string
	for _, m := range r.GetMailboxResults() {
		out = append(out, fmt.Sprintf("%s/%d", strings.TrimPrefix(m.GetStatus().String(), "MAILBOX_STATUS_"), m.GetSeq()))
	}
	return strings.Join(out, " ")
}

// mailboxWorld sets up users alice (devices a1, a2, revoked r1), bob (b1)
// and a disabled user off (o1).
func mailboxWorld(t *testing.T, cfg Config) (*FSM, *applier) {
	t.Helper()
	f := newFSM(t, cfg)
	a := &applier{t: t, f: f}
	ok := statev1.ResultCode_RESULT_CODE_OK
	for _, u := range []string{"alice", "bob", "off"} {
		if r := a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: u, Login: u}}}); r.Code != ok {
			t.Fatal(r)
		}
	}
	for i, d := range [][2]string{{"alice", "a1"}, {"alice", "a2"}, {"alice", "r1"}, {"bob", "b1"}, {"off", "o1"}} {
		if r := a.apply(&statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: d[1], UserId: d[0], Name: "n", PublicKey: key32(byte(i))}}}); r.Code != ok {
			t.Fatal(r)
		}
	}
	a.apply(&statev1.Command_RevokeDevice{RevokeDevice: &statev1.RevokeDevice{UserId: "alice", DeviceId: "r1"}})
	a.apply(&statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "off", Fields: []string{"status"}, User: &statev1.User{Status: statev1.UserStatus_USER_STATUS_DISABLED}}})
	return f, a
}

func TestMailboxPutFetchAck(t *testing.T) {
	f, a := mailboxWorld(t, Config{})
	before := a.idx
	now := 1_000_000 + int64(a.idx) + 1 // the next command's time
	r := a.apply(putOp(
		mail("alice", "a1", "a2", "e1", 10, far),
		mail("alice", "a1", "a2", "e2", 20, far),
		mail("alice", "a2", "a1", "e3", 30, far),
		mail("alice", "b1", "a1", "e4", 10, far), // bob's device named as alice's
		mail("alice", "nope", "a1", "e5", 10, far),
		mail("alice", "r1", "a1", "e6", 10, far), // revoked
		mail("off", "o1", "a1", "e7", 10, far),   // disabled user
		mail("alice", "a1", "a2", "e8", 10, now), // expires at the command's time
		mail("alice", "a1", "a2", "e1", 10, far), // the same event again
	))
	if r.GetCode() != statev1.ResultCode_RESULT_CODE_OK {
		t.Fatal(r)
	}
	want := "STORED/1 STORED/2 STORED/1 TARGET_GONE/0 TARGET_GONE/0 TARGET_GONE/0 TARGET_GONE/0 EXPIRED/0 STORED/1"
	if got := outcomes(r); got != want {
		t.Fatalf("outcomes\n got  %s\n want %s", got, want)
	}
	// One change per device that got entries, with its highest seq.
	cs, _ := f.Changes(before, 10)
	if len(cs) != 2 {
		t.Fatalf("%d changes, want 2: %v", len(cs), cs)
	}
	for i, w := range []*statev1.MailboxChanged{{DeviceId: "a1", UserId: "alice", Seq: 2}, {DeviceId: "a2", UserId: "alice", Seq: 1}} {
		if cs[i].GetKind() != statev1.ChangeKind_CHANGE_KIND_MAILBOX_CHANGED || !proto.Equal(cs[i].GetMailboxChanged(), w) {
			t.Fatalf("change %d: %v, want %v", i, cs[i], w)
		}
	}

	got, more, err := f.FetchMailbox("a1", 0, 1, 0, now)
	if err != nil || len(got) != 1 || !more || got[0].GetSeq() != 1 || got[0].GetEventId() != "e1" || got[0].GetStoredAtMs() != now {
		t.Fatalf("fetch 1: %v more=%v err=%v", got, more, err)
	}
	got, more, _ = f.FetchMailbox("a1", 1, 10, 0, now)
	if len(got) != 1 || more || got[0].GetSeq() != 2 || len(got[0].GetEvent()) != 20 || got[0].GetSenderDeviceId() != "a2" {
		t.Fatalf("fetch after 1: %v more=%v", got, more)
	}
	// Entries whose time has passed are not returned, even before expiry
	// removed them.
	if got, _, _ := f.FetchMailbox("a1", 0, 10, 0, far); len(got) != 0 {
		t.Fatalf("fetch at a later time returned %d expired entries", len(got))
	}
	if _, _, err := f.FetchMailbox("nope", 0, 10, 0, now); !errors.Is(err, ErrNotFound) {
		t.Fatalf("fetch of a missing device: %v", err)
	}
	if got, more, err := f.FetchMailbox("b1", 0, 10, 0, now); err != nil || len(got) != 0 || more {
		t.Fatalf("empty mailbox: %v %v %v", got, more, err)
	}

	// Retrying the put stores nothing and answers the same seqs.
	digest, _ := f.Digest()
	r = a.apply(putOp(mail("alice", "a1", "a2", "e2", 20, far), mail("alice", "a2", "a1", "e3", 30, far)))
	if outcomes(r) != "STORED/2 STORED/1" {
		t.Fatalf("retry: %s", outcomes(r))
	}
	if d, _ := f.Digest(); d != digest {
		t.Fatal("a retried put changed the state")
	}

	// Acks delete; unknown seqs are ignored; seqs are never reused.
	if r := a.apply(ackOp("a1", 1, 99, 1)); r.GetCode() != statev1.ResultCode_RESULT_CODE_OK {
		t.Fatal(r)
	}
	if r := a.apply(ackOp("nope", 1)); r.GetCode() != statev1.ResultCode_RESULT_CODE_OK {
		t.Fatalf("ack for a device without a mailbox: %v", r)
	}
	mb, _ := f.Mailbox("a1")
	if mb.GetCount() != 1 || mb.GetBytes() != 20 || mb.GetLastSeq() != 2 {
		t.Fatalf("counters after ack: %v", mb)
	}
	a.apply(ackOp("a1", 2))
	if r := a.apply(putOp(mail("alice", "a1", "a2", "e9", 10, far))); outcomes(r) != "STORED/3" {
		t.Fatalf("after acking everything: %s, want seq 3", outcomes(r))
	}
	// An acked event may be stored again (its dedup record went with it).
	if r := a.apply(putOp(mail("alice", "a1", "a2", "e1", 10, far))); outcomes(r) != "STORED/4" {
		t.Fatalf("acked event put again: %s", outcomes(r))
	}
}

func TestMailboxQuotas(t *testing.T) {
	f, a := mailboxWorld(t, Config{})
	quota := func(entries ...*statev1.MailboxEntry) *statev1.Result {
		return a.apply(&statev1.Command_PutMailbox{PutMailbox: &statev1.PutMailbox{Entries: entries, MaxEntriesPerDevice: 2, MaxBytesPerDevice: 100}})
	}
	r := quota(mail("alice", "a1", "x", "1", 10, far), mail("alice", "a1", "x", "2", 10, far), mail("alice", "a1", "x", "3", 10, far),
		mail("alice", "a2", "x", "4", 60, far), mail("alice", "a2", "x", "5", 41, far), mail("alice", "a2", "x", "6", 40, far))
	if got, want := outcomes(r), "STORED/1 STORED/2 FULL/0 STORED/1 FULL/0 STORED/2"; got != want {
		t.Fatalf("outcomes\n got  %s\n want %s", got, want)
	}
	// A full mailbox keeps what it holds.
	for did, n := range map[string]int{"a1": 2, "a2": 2} {
		if got, _, _ := f.FetchMailbox(did, 0, 10, 0, 0); len(got) != n {
			t.Fatalf("%s holds %d entries, want %d", did, len(got), n)
		}
	}
	// Nothing stored: no change for watchers.
	before := a.idx
	if r := quota(mail("alice", "a1", "x", "7", 1, far)); outcomes(r) != "FULL/0" {
		t.Fatal(outcomes(r))
	}
	if cs, _ := f.Changes(before, 10); len(cs) != 0 {
		t.Fatalf("a refused put emitted %v", cs)
	}
	a.apply(ackOp("a1", 1))
	if r := quota(mail("alice", "a1", "x", "7", 1, far)); outcomes(r) != "STORED/3" {
		t.Fatalf("after an ack: %s", outcomes(r))
	}
	// Without quotas in the command the defaults apply.
	big := make([]*statev1.MailboxEntry, 0, MaxMailboxBatch)
	for i := 0; i < DefaultMailboxMaxEntries; i++ {
		big = append(big, mail("bob", "b1", "x", fmt.Sprint("b", i), 1, far))
	}
	if r := a.apply(putOp(big...)); r.GetMailboxResults()[DefaultMailboxMaxEntries-1].GetSeq() != DefaultMailboxMaxEntries {
		t.Fatalf("default quota: %v", r.GetMailboxResults()[DefaultMailboxMaxEntries-1])
	}
	if r := a.apply(putOp(mail("bob", "b1", "x", "over", 1, far))); outcomes(r) != "FULL/0" {
		t.Fatalf("beyond the default count quota: %s", outcomes(r))
	}
}

func TestMailboxExpiry(t *testing.T) {
	f, a := mailboxWorld(t, Config{})
	base := 1_000_000 + int64(a.idx)
	r := a.apply(putOp(
		mail("alice", "a1", "x", "soon", 10, base+5),
		mail("alice", "a2", "x", "soon2", 10, base+6),
		mail("alice", "a1", "x", "later", 10, base+50),
		mail("alice", "a1", "x", "never", 10, far),
	))
	if outcomes(r) != "STORED/1 STORED/1 STORED/2 STORED/3" {
		t.Fatal(outcomes(r))
	}
	if due, _ := f.MailboxExpiryDue(base+4, false); due {
		t.Fatal("expiry due before any entry expired")
	}
	a.advanceTo(base + 6)
	// The next command's time is base+7: both "soon" entries are due, but
	// a limit of 1 removes one, oldest expiry first.
	if due, _ := f.MailboxExpiryDue(base+7, false); !due {
		t.Fatal("expiry not due")
	}
	a.apply(&statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{Limit: 1}})
	if got, _, _ := f.FetchMailbox("a1", 0, 10, 0, 0); len(got) != 2 || got[0].GetEventId() != "later" {
		t.Fatalf("a1 after expiring one: %v", got)
	}
	if got, _, _ := f.FetchMailbox("a2", 0, 10, 0, 0); len(got) != 1 {
		t.Fatalf("a2 lost its entry to a limited expiry: %v", got)
	}
	a.apply(&statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{}})
	if got, _, _ := f.FetchMailbox("a2", 0, 10, 0, 0); len(got) != 0 {
		t.Fatalf("a2 after expiry: %v", got)
	}
	for did, want := range map[string][2]uint64{"a1": {2, 20}, "a2": {0, 0}} {
		mb, _ := f.Mailbox(did)
		if mb.GetCount() != want[0] || mb.GetBytes() != want[1] {
			t.Fatalf("%s counters %v, want %v", did, mb, want)
		}
	}
	if due, _ := f.MailboxExpiryDue(base+49, false); due {
		t.Fatal("expiry still due")
	}
	// The expired event's dedup record went with it: put again, it is new.
	if r := a.apply(putOp(mail("alice", "a1", "x", "soon", 10, far))); outcomes(r) != "STORED/4" {
		t.Fatal(outcomes(r))
	}
}

// An expiry with max_bytes stops once the events it removed reach it
// (the entry that reaches it goes too), oldest expiry first; the next
// one goes on. Without it, the limit of entries is the only bound.
func TestExpiryStopsAtItsBytes(t *testing.T) {
	f, a := mailboxWorld(t, Config{})
	base := 1_000_000 + int64(a.idx)
	a.apply(putOp(mail("alice", "a1", "x", "e1", 100, base+5), mail("alice", "a1", "x", "e2", 100, base+6),
		mail("alice", "a2", "x", "e3", 100, base+7), mail("alice", "a2", "x", "e4", 100, base+8)))
	// A claim record due too: it goes with the command that removes the
	// last entries due, not with one the bytes stopped.
	if w := won(t, a.apply(claimOp(claim("alice", "a1", "s", "c1", base+6)))); w != "true" {
		t.Fatal(w)
	}
	a.advanceTo(base + 8)
	left := func() []string {
		var ids []string
		for _, did := range []string{"a1", "a2"} {
			got, _, _ := f.FetchMailbox(did, 0, 10, 0, 0)
			for _, e := range got {
				ids = append(ids, e.GetEventId())
			}
		}
		return ids
	}
	for i, want := range [][]string{{"e3", "e4"}, nil} { // e1 and e2 (which reaches 150), then the rest
		a.apply(&statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{MaxBytes: 150}})
		if got := left(); !slices.Equal(got, want) {
			t.Fatalf("left %v, want %v", got, want)
		}
		if _, err := f.Claim("s", "c1"); (i == 0) != (err == nil) {
			t.Fatalf("round %d: the claim record: %v", i, err)
		}
	}
	for _, did := range []string{"a1", "a2"} {
		if mb, err := f.Mailbox(did); err != nil || mb.GetCount() != 0 || mb.GetBytes() != 0 {
			t.Fatalf("%s counters %v, %v", did, mb, err)
		}
	}
}

// A resend of an event whose first copy expired but is not removed yet
// (no ExpireMailboxes since) is stored anew, in place of that copy, as
// it would be once the copy was removed: answered STORED with the old
// seq it would be acknowledged while no fetch returns it. A resend of a
// copy still live is the duplicate it was. Only with replace_expired,
// which proposers set once every member's release applies it: without,
// the command is applied as releases before it did.
func TestAResendOfAnExpiredCopyIsStoredAnew(t *testing.T) {
	f, a := mailboxWorld(t, Config{})
	base := 1_000_000 + int64(a.idx) + 1
	if r := a.apply(putOp(mail("alice", "a1", "a2", "ev", 10, base+5), mail("alice", "a1", "a2", "live", 7, far))); outcomes(r) != "STORED/1 STORED/2" {
		t.Fatal(outcomes(r))
	}
	a.advanceTo(base + 10)
	if r := a.apply(putOp(mail("alice", "a1", "a2", "ev", 10, far))); outcomes(r) != "STORED/1" {
		t.Fatalf("a resend without replace_expired: %s, want the older releases' STORED/1", outcomes(r))
	}
	r := a.apply(&statev1.Command_PutMailbox{PutMailbox: &statev1.PutMailbox{ReplaceExpired: true,
		Entries: []*statev1.MailboxEntry{mail("alice", "a1", "a2", "ev", 10, far), mail("alice", "a1", "a2", "live", 7, far)}}})
	if outcomes(r) != "STORED/3 STORED/2" {
		t.Fatalf("resends: %s, want the expired one stored anew and the live one a duplicate", outcomes(r))
	}
	now := 1_000_000 + int64(a.idx)
	got, _, err := f.FetchMailbox("a1", 0, 10, 0, now)
	if err != nil || len(got) != 2 || got[0].GetEventId() != "live" || got[1].GetEventId() != "ev" || got[1].GetSeq() != 3 {
		t.Fatalf("a1's mailbox: %v, %v", got, err)
	}
	mb, _ := f.Mailbox("a1")
	if mb.GetCount() != 2 || mb.GetBytes() != 17 || mb.GetLastSeq() != 3 {
		t.Fatalf("a1's counters %v, want 2 entries, 17 bytes, last seq 3", mb)
	}
	// The old copy left nothing behind for expiry to find.
	a.apply(&statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{}})
	if got, _, _ := f.FetchMailbox("a1", 0, 10, 0, now); len(got) != 2 {
		t.Fatalf("a1's mailbox after expiry: %v", got)
	}
	if keys := mailKeys(t, f, "a1"); len(keys) != 7 {
		t.Fatalf("a1's records: %v (want 2 entries, 2 expiry, 2 dedup, 1 mailbox)", keys)
	}
}

// mailKeys lists every mailbox record that mentions a device.
func mailKeys(t *testing.T, f *FSM, did string) []string {
	t.Helper()
	var out []string
	err := f.store.Iterate(nil, nil, func(k, _ []byte) (bool, error) {
		for _, p := range [][]byte{prefixMailEntry, prefixMailbox, prefixMailExpiry, prefixMailDedup} {
			if bytes.HasPrefix(k, p) && bytes.Contains(k, []byte(did)) {
				out = append(out, fmt.Sprintf("%q", k))
			}
		}
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Deleting or revoking a device, or deleting its user, removes its
// mailbox in the same entry.
func TestMailboxGoesWithDeviceAndUser(t *testing.T) {
	f, a := mailboxWorld(t, Config{})
	a.apply(&statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: "a3", UserId: "alice", Name: "n", PublicKey: key32(9)}}})
	for _, did := range []string{"a1", "a2", "a3"} {
		if r := a.apply(putOp(mail("alice", did, "x", "1", 10, far), mail("alice", did, "x", "2", 10, far))); outcomes(r) != "STORED/1 STORED/2" {
			t.Fatal(outcomes(r))
		}
		if len(mailKeys(t, f, did)) != 7 { // 2 entries x 3 records + counters
			t.Fatalf("%s: %v", did, mailKeys(t, f, did))
		}
	}
	a.apply(&statev1.Command_DeleteDevice{DeleteDevice: &statev1.DeleteDevice{UserId: "alice", DeviceId: "a1"}})
	if k := mailKeys(t, f, "a1"); len(k) != 0 {
		t.Fatalf("deleted device's mailbox left %v", k)
	}
	a.apply(&statev1.Command_RevokeDevice{RevokeDevice: &statev1.RevokeDevice{UserId: "alice", DeviceId: "a3"}})
	if k := mailKeys(t, f, "a3"); len(k) != 0 {
		t.Fatalf("revoked device's mailbox left %v", k)
	}
	a.apply(&statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: "alice"}})
	if k := mailKeys(t, f, "a2"); len(k) != 0 {
		t.Fatalf("deleted user's mailbox left %v", k)
	}
	if due, _ := f.MailboxExpiryDue(far, false); due {
		t.Fatal("expiry index still holds entries")
	}
}

// testCA returns a CA record for an Ed25519 key made from seed byte s.
func testCA(t testing.TB, s byte, certFor byte) *statev1.ClusterCA {
	t.Helper()
	seed := bytes.Repeat([]byte{s}, ed25519.SeedSize)
	key := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{certFor}, ed25519.SeedSize))
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Unix(0, 0), NotAfter: time.Unix(1<<33, 0),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	return &statev1.ClusterCA{PrivateSeed: seed, Certificate: der}
}

func TestClusterCA(t *testing.T) {
	f := newFSM(t, Config{})
	a := &applier{t: t, f: f}
	set := func(ca *statev1.ClusterCA) *statev1.Result {
		return a.apply(&statev1.Command_SetClusterCa{SetClusterCa: &statev1.SetClusterCA{Ca: ca}})
	}
	if _, err := f.ClusterCA(); !errors.Is(err, ErrNotFound) {
		t.Fatalf("new FSM has a CA: %v", err)
	}
	if r := set(testCA(t, 1, 2)); r.GetCode() != statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT || !strings.Contains(r.GetMessage(), "private_seed") {
		t.Fatalf("certificate for another key: %v", r)
	}
	ca := testCA(t, 1, 1)
	if r := set(ca); r.GetCode() != statev1.ResultCode_RESULT_CODE_OK || !r.GetInitialized() {
		t.Fatalf("first CA: %v", r)
	}
	if r := set(testCA(t, 3, 3)); r.GetCode() != statev1.ResultCode_RESULT_CODE_OK || r.GetInitialized() {
		t.Fatalf("second CA: %v", r)
	}
	got, err := f.ClusterCA()
	if err != nil || !bytes.Equal(got.GetCertificate(), ca.GetCertificate()) || got.GetCreatedAtMs() == 0 {
		t.Fatalf("CA replaced or missing: %v", err)
	}

	// InitCluster carries the CA for a new cluster.
	g := newFSM(t, Config{})
	ga := &applier{t: t, f: g}
	init := &statev1.InitCluster{
		Admin:      &statev1.User{Id: "admin", Login: "admin", Role: "admin"},
		SigningKey: &statev1.SigningKey{Id: "s1", PrivateSeed: key32(1), PublicKey: key32(2)},
		SessionKey: &statev1.SessionKey{Id: "k1", Secret: key32(3)},
		ClusterCa:  testCA(t, 4, 5),
	}
	if r := ga.apply(&statev1.Command_InitCluster{InitCluster: init}); r.GetCode() != statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT || !strings.Contains(r.GetMessage(), "cluster_ca") {
		t.Fatalf("init with a bad CA: %v", r)
	}
	init.ClusterCa = testCA(t, 4, 4)
	if r := ga.apply(&statev1.Command_InitCluster{InitCluster: init}); !r.GetInitialized() {
		t.Fatalf("init: %v", r)
	}
	if got, err := g.ClusterCA(); err != nil || !bytes.Equal(got.GetPrivateSeed(), init.ClusterCa.GetPrivateSeed()) {
		t.Fatalf("CA after init: %v", err)
	}
}

// A page holds at most MaxMailboxPageBytes of events, whatever the limit,
// and says more follow; the next page goes on from where it ended.
func TestMailboxPagesAreBoundedInBytes(t *testing.T) {
	f, a := mailboxWorld(t, Config{})
	const size = 200 << 10 // five fit a page, a sixth would not
	var entries []*statev1.MailboxEntry
	for i := range 8 {
		entries = append(entries, mail("alice", "a1", "a2", fmt.Sprint("big", i), size, far))
	}
	if r := a.apply(putOp(entries...)); outcomes(r) != "STORED/1 STORED/2 STORED/3 STORED/4 STORED/5 STORED/6 STORED/7 STORED/8" {
		t.Fatalf("put: %v", outcomes(r))
	}
	got, more, err := f.FetchMailbox("a1", 0, 100, 0, 0)
	if err != nil || len(got) != MaxMailboxPageBytes/size || !more {
		t.Fatalf("first page: %d entries, more=%v, err=%v; want %d and more", len(got), more, err, MaxMailboxPageBytes/size)
	}
	last := got[len(got)-1].GetSeq()
	got, more, err = f.FetchMailbox("a1", last, 100, 0, 0)
	if err != nil || len(got) != 8-int(last) || more {
		t.Fatalf("second page after %d: %d entries, more=%v, err=%v", last, len(got), more, err)
	}
	if got[0].GetSeq() != last+1 {
		t.Fatalf("second page starts at %d, want %d", got[0].GetSeq(), last+1)
	}
	// A smaller byte bound (what an edge's queue has room for) holds
	// fewer, and always one entry; a larger one is the page's.
	for _, tc := range []struct{ maxBytes, want int }{
		{2*size + 1, 2}, {size, 1}, {1, 1}, {4 * MaxMailboxPageBytes, MaxMailboxPageBytes / size},
	} {
		got, more, err := f.FetchMailbox("a1", 0, 100, tc.maxBytes, 0)
		if err != nil || len(got) != tc.want || !more {
			t.Fatalf("at most %d bytes: %d entries, more=%v, err=%v; want %d and more", tc.maxBytes, len(got), more, err, tc.want)
		}
	}
}

// purgeState reports whether a device's mailbox has a purge record, and
// what its owner record holds ("-" for none).
func purgeState(t *testing.T, f *FSM, did string) (bool, string) {
	t.Helper()
	_, err := f.store.Get(mailPurgeKey(did))
	if err != nil && !errors.Is(err, state.ErrNotFound) {
		t.Fatal(err)
	}
	owner, oerr := f.store.Get(deviceOwnerKey(did))
	if errors.Is(oerr, state.ErrNotFound) {
		return err == nil, "-"
	} else if oerr != nil {
		t.Fatal(oerr)
	}
	return err == nil, string(owner)
}

func fill(t *testing.T, a *applier, uid, did string, n int) {
	t.Helper()
	var entries []*statev1.MailboxEntry
	for i := range n {
		e := mail(uid, did, "x", fmt.Sprint(did, "-", i), 10, far)
		e.AnyOne = i%2 == 0
		entries = append(entries, e)
	}
	if r := a.apply(putOp(entries...)); r.GetCode() != statev1.ResultCode_RESULT_CODE_OK || strings.Count(outcomes(r), "STORED/") != n {
		t.Fatalf("fill %s: %v %s", did, r, outcomes(r))
	}
}

func expireOp(purge uint32) isCommandOp {
	return &statev1.Command_ExpireMailboxes{ExpireMailboxes: &statev1.ExpireMailboxes{PurgeLimit: purge}}
}

// With purge_limit, a deleted or revoked device's mailbox goes a bounded
// number of entries per command, the rest under a purge record that
// ExpireMailboxes' purge_limit works off; meanwhile nothing of it can be
// fetched or announced, and a deleted device's id cannot be registered
// again (a new device under it would otherwise fetch the old one's
// events).
func TestADeletedDevicesMailboxIsEmptiedInSteps(t *testing.T) {
	f, a := mailboxWorld(t, Config{})
	ok := statev1.ResultCode_RESULT_CODE_OK
	fill(t, a, "alice", "a1", 10)
	fill(t, a, "alice", "a2", 3)

	if r := a.apply(&statev1.Command_DeleteDevice{DeleteDevice: &statev1.DeleteDevice{UserId: "alice", DeviceId: "a1", PurgeLimit: 4}}); r.GetCode() != ok {
		t.Fatal(r)
	}
	// 6 entries left, each with its entry, expiry and dedup records (and
	// the any_one ones an event index record, which mailKeys does not
	// list), plus the counters.
	if k := mailKeys(t, f, "a1"); len(k) != 6*3+1 {
		t.Fatalf("after deleting with a limit of 4: %d records, want 19: %v", len(k), k)
	}
	if p, owner := purgeState(t, f, "a1"); !p || owner != "" {
		t.Fatalf("purge record %v, owner %q; want one and an empty owner", p, owner)
	}
	if _, _, err := f.FetchMailbox("a1", 0, 100, 0, 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("fetching a deleted device's mailbox: %v", err)
	}
	if _, err := f.DeviceOwner("a1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("owner of a deleted device: %v", err)
	}
	if tot, err := f.MailboxTotals(); err != nil || tot.Purging != 1 || tot.Entries != 6+3 {
		t.Fatalf("totals %+v, %v; want 1 purging and 9 entries", tot, err)
	}
	r := a.apply(&statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: "a1", UserId: "bob", Name: "n", PublicKey: key32(20)}}})
	if r.GetCode() != statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION || !strings.Contains(r.GetMessage(), "still being emptied") {
		t.Fatalf("registering a1 again while its mailbox is emptied: %v", r)
	}
	if due, _ := f.MailboxExpiryDue(0, false); due {
		t.Fatal("due without purge")
	}
	if due, _ := f.MailboxExpiryDue(0, true); !due {
		t.Fatal("not due with purge while a mailbox is being emptied")
	}
	// An ExpireMailboxes without purge_limit (an older release's) leaves it.
	a.apply(expireOp(0))
	if k := mailKeys(t, f, "a1"); len(k) != 19 {
		t.Fatalf("ExpireMailboxes without a purge limit removed records: %d left", len(k))
	}
	a.apply(expireOp(4))
	if k := mailKeys(t, f, "a1"); len(k) != 2*3+1 {
		t.Fatalf("after one purge of 4: %d records, want 7", len(k))
	}
	a.apply(expireOp(4))
	if k := mailKeys(t, f, "a1"); len(k) != 0 {
		t.Fatalf("after the last purge: %v", k)
	}
	if p, owner := purgeState(t, f, "a1"); p || owner != "-" {
		t.Fatalf("after the last purge: purge record %v, owner %q", p, owner)
	}
	if due, _ := f.MailboxExpiryDue(0, true); due {
		t.Fatal("still due once every mailbox is emptied")
	}
	// The id is free: a new device under it starts with an empty mailbox.
	if r := a.apply(&statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: "a1", UserId: "bob", Name: "n", PublicKey: key32(20)}}}); r.GetCode() != ok {
		t.Fatal(r)
	}
	if got, _, err := f.FetchMailbox("a1", 0, 100, 0, 0); err != nil || len(got) != 0 {
		t.Fatalf("the new a1's mailbox: %v, %v", got, err)
	}
	if r := a.apply(putOp(mail("bob", "a1", "x", "a1-1", 10, far))); outcomes(r) != "STORED/1" {
		t.Fatalf("the new a1's first entry: %s (its seqs start again)", outcomes(r))
	}

	// A revoked device stays, and so does its owner record; its mailbox
	// is not announced while it is emptied.
	if r := a.apply(&statev1.Command_RevokeDevice{RevokeDevice: &statev1.RevokeDevice{UserId: "alice", DeviceId: "a2", PurgeLimit: 1}}); r.GetCode() != ok {
		t.Fatal(r)
	}
	if p, owner := purgeState(t, f, "a2"); !p || owner != "alice" {
		t.Fatalf("revoked: purge record %v, owner %q", p, owner)
	}
	if got, more, err := f.FetchMailbox("a2", 0, 100, 0, 0); err != nil || len(got) != 0 || more {
		t.Fatalf("fetching a revoked device's mailbox being emptied: %d entries, more %v, %v", len(got), more, err)
	}
	v, err := f.View()
	if err != nil {
		t.Fatal(err)
	}
	err = v.EachStoredMailbox(func(_ string, mb *statev1.Mailbox) error {
		if mb.GetDeviceId() == "a2" {
			return fmt.Errorf("the revoked device's mailbox is announced: %v", mb)
		}
		return nil
	})
	v.Close()
	if err != nil {
		t.Fatal(err)
	}
	// Deleting it meanwhile goes on with its mailbox and takes its id.
	if r := a.apply(&statev1.Command_DeleteDevice{DeleteDevice: &statev1.DeleteDevice{UserId: "alice", DeviceId: "a2", PurgeLimit: 1}}); r.GetCode() != ok {
		t.Fatal(r)
	}
	if p, owner := purgeState(t, f, "a2"); !p || owner != "" || len(mailKeys(t, f, "a2")) != 3+1 {
		t.Fatalf("deleted while emptied: purge record %v, owner %q, %d records", p, owner, len(mailKeys(t, f, "a2")))
	}
	a.apply(expireOp(100))
	if p, owner := purgeState(t, f, "a2"); p || owner != "-" || len(mailKeys(t, f, "a2")) != 0 {
		t.Fatalf("after the purge: purge record %v, owner %q, records %v", p, owner, mailKeys(t, f, "a2"))
	}
	if err := indexRecordsOf(t, f, "a1", "a2"); err != nil {
		t.Fatal(err)
	}
}

// indexRecordsOf fails when any_one index records of the devices' old
// events remain (the new a1's are of events named a1-1).
func indexRecordsOf(t *testing.T, f *FSM, dids ...string) error {
	t.Helper()
	return f.store.Iterate(prefixEventIndex, prefixEnd(prefixEventIndex), func(k, _ []byte) (bool, error) {
		for _, d := range dids {
			if bytes.Contains(k, []byte(d+"-")) && !bytes.Contains(k, []byte("a1-1")) {
				return false, fmt.Errorf("index record %q left", k)
			}
		}
		return true, nil
	})
}

// A user's deletion shares one budget among its devices, and one purge
// goes on over several devices' mailboxes, in device id order.
func TestAUsersMailboxesShareOnePurgeBudget(t *testing.T) {
	f, a := mailboxWorld(t, Config{})
	fill(t, a, "alice", "a1", 3)
	fill(t, a, "alice", "a2", 3)
	if r := a.apply(&statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: "alice", PurgeLimit: 4}}); r.GetCode() != statev1.ResultCode_RESULT_CODE_OK {
		t.Fatal(r)
	}
	// a1 first: emptied (3), then one of a2's.
	if p, owner := purgeState(t, f, "a1"); p || owner != "-" {
		t.Fatalf("a1: purge record %v, owner %q", p, owner)
	}
	if p, owner := purgeState(t, f, "a2"); !p || owner != "" || len(mailKeys(t, f, "a2")) != 2*3+1 {
		t.Fatalf("a2: purge record %v, owner %q, records %d", p, owner, len(mailKeys(t, f, "a2")))
	}
	// Bob's device, deleted with a limit that empties nothing: its id is
	// taken, its mailbox waits.
	fill(t, a, "bob", "b1", 2)
	a.apply(&statev1.Command_DeleteDevice{DeleteDevice: &statev1.DeleteDevice{UserId: "bob", DeviceId: "b1", PurgeLimit: 1}})
	if tot, _ := f.MailboxTotals(); tot.Purging != 2 || tot.Entries != 2+1 {
		t.Fatalf("totals %+v", tot)
	}
	a.apply(expireOp(3))
	for _, did := range []string{"a2", "b1"} {
		if p, owner := purgeState(t, f, did); p || owner != "-" || len(mailKeys(t, f, did)) != 0 {
			t.Fatalf("%s: purge record %v, owner %q, records %v", did, p, owner, mailKeys(t, f, did))
		}
	}
	if tot, _ := f.MailboxTotals(); tot != (MailboxTotals{}) {
		t.Fatalf("totals %+v, want none", tot)
	}
}

// A purge reads entries until their events reach MaxPurgeBytes, whatever
// its entry limit.
func TestAPurgeIsBoundedInBytes(t *testing.T) {
	f, a := mailboxWorld(t, Config{})
	const perPut = MaxMailboxBatchBytes / MaxMailboxEventBytes
	n := 0
	for n*MaxMailboxEventBytes <= MaxPurgeBytes+8*MaxMailboxEventBytes {
		var entries []*statev1.MailboxEntry
		for range perPut {
			entries = append(entries, mail("alice", "a1", "x", fmt.Sprint("big", n), MaxMailboxEventBytes, far))
			n++
		}
		r := a.apply(&statev1.Command_PutMailbox{PutMailbox: &statev1.PutMailbox{Entries: entries, MaxEntriesPerDevice: MaxMailboxQuotaEntries, MaxBytesPerDevice: MaxMailboxQuotaBytes}})
		if r.GetCode() != statev1.ResultCode_RESULT_CODE_OK || strings.Count(outcomes(r), "STORED/") != perPut {
			t.Fatalf("put: %v", r)
		}
	}
	a.apply(&statev1.Command_DeleteDevice{DeleteDevice: &statev1.DeleteDevice{UserId: "alice", DeviceId: "a1", PurgeLimit: MaxExpireLimit}})
	tot, err := f.MailboxTotals()
	if err != nil {
		t.Fatal(err)
	}
	removed := uint64(n) - tot.Entries
	if removed != MaxPurgeBytes/MaxMailboxEventBytes || tot.Purging != 1 {
		t.Fatalf("%d of %d entries removed (%+v); want %d", removed, n, tot, MaxPurgeBytes/MaxMailboxEventBytes)
	}
	if tot.Bytes != tot.Entries*MaxMailboxEventBytes {
		t.Fatalf("counters %+v: bytes do not match the entries left", tot)
	}
}
