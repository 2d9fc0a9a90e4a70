package fsm

import (
	"fmt"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// storedMailboxes renders what a fresh view's EachStoredMailbox yields as
// "user/device/last_seq/count".
func storedMailboxes(t *testing.T, f *FSM) string {
	t.Helper()
	v, err := f.View()
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	var out []string
	err = v.EachStoredMailbox(func(uid string, mb *statev1.Mailbox) error {
		out = append(out, fmt.Sprintf("%s/%s/%d/%d", uid, mb.GetDeviceId(), mb.GetLastSeq(), mb.GetCount()))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return strings.Join(out, " ")
}

// A view yields the mailboxes that hold entries, with their owners and
// the highest seq given out; emptied and deleted ones are left out, and
// a counter record without a device owner is skipped, not an error.
func TestViewStoredMailboxes(t *testing.T) {
	f, a := mailboxWorld(t, Config{})
	if got := storedMailboxes(t, f); got != "" {
		t.Fatalf("no entries yet: %q", got)
	}
	a.apply(putOp(
		mail("alice", "a1", "a2", "e1", 10, far),
		mail("alice", "a1", "a2", "e2", 10, far),
		mail("alice", "a1", "a2", "e3", 10, far),
		mail("alice", "a2", "a1", "e4", 10, far),
		mail("bob", "b1", "b1", "e5", 10, far),
	))
	if got, want := storedMailboxes(t, f), "alice/a1/3/3 alice/a2/1/1 bob/b1/1/1"; got != want {
		t.Fatalf("after put: %q, want %q", got, want)
	}
	// a1's newest entry acked: still announced with the highest seq given
	// out (a fetch after the session's cursor finds what is left); a2
	// emptied; bob's device gone with him.
	a.apply(ackOp("a1", 3))
	a.apply(ackOp("a2", 1))
	a.apply(&statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: "bob"}})
	if got, want := storedMailboxes(t, f), "alice/a1/3/2"; got != want {
		t.Fatalf("after acks and a deletion: %q, want %q", got, want)
	}

	// A counter record whose device has no owner (no command leaves one):
	// skipped, the others still yielded.
	rec, err := proto.Marshal(&statev1.Mailbox{DeviceId: "ghost", LastSeq: 7, Count: 1, Bytes: 10})
	if err != nil {
		t.Fatal(err)
	}
	b := f.store.NewBatch()
	if err := b.Set(mailboxKey("ghost"), rec); err != nil {
		t.Fatal(err)
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	if got, want := storedMailboxes(t, f), "alice/a1/3/2"; got != want {
		t.Fatalf("with an ownerless record: %q, want %q", got, want)
	}
}

// A state has no history id until a restore draws one (SetHistory, before
// Raft starts); every reader sees it, the view as the store.
func TestHistoryIsWhatARestoreSet(t *testing.T) {
	f := newFSM(t, Config{})
	if h, err := f.History(); err != nil || h != "" {
		t.Fatalf("history of a new state %q, %v", h, err)
	}
	for _, bad := range []string{"", strings.Repeat("h", MaxHistoryLen+1)} {
		if err := SetHistory(f.store, bad); err == nil {
			t.Fatalf("a history id of %d bytes was set", len(bad))
		}
	}
	if err := SetHistory(f.store, "restored-1"); err != nil {
		t.Fatal(err)
	}
	v, err := f.View()
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	vh, verr := v.History()
	if h, err := f.History(); err != nil || verr != nil || h != "restored-1" || vh != "restored-1" {
		t.Fatalf("history %q (%v), in a view %q (%v)", h, err, vh, verr)
	}
}

// ClearHistory drops an id a failed bootstrap left in a state that has
// applied nothing; a state that has applied entries keeps its history.
func TestClearHistoryOnlyWithNothingApplied(t *testing.T) {
	f := newFSM(t, Config{})
	if err := SetHistory(f.store, "left-by-a-bootstrap"); err != nil {
		t.Fatal(err)
	}
	if err := ClearHistory(f.store); err != nil {
		t.Fatal(err)
	}
	if h, err := f.History(); err != nil || h != "" {
		t.Fatalf("history after the clear %q, %v", h, err)
	}
	if err := ClearHistory(f.store); err != nil {
		t.Fatalf("clearing no history: %v", err)
	}
	a := &applier{t: t, f: f}
	a.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "u", Login: "u"}}})
	if err := SetHistory(f.store, "the-cluster"); err != nil {
		t.Fatal(err)
	}
	if err := ClearHistory(f.store); err == nil {
		t.Fatal("cleared the history of a state with applied entries")
	}
	if h, err := f.History(); err != nil || h != "the-cluster" {
		t.Fatalf("history %q, %v; want it kept", h, err)
	}
}

// InitCluster draws the new cluster's history: a watcher of a cluster it
// replaced (rebuilt from nothing) resumes in another history. An id too
// long refuses the whole command; a later InitCluster changes nothing.
func TestInitClusterSetsTheHistory(t *testing.T) {
	f := newFSM(t, Config{})
	a := &applier{t: t, f: f}
	init := func(history string) *statev1.Command_InitCluster {
		return &statev1.Command_InitCluster{InitCluster: &statev1.InitCluster{
			Admin:      &statev1.User{Id: "admin", Login: "admin", Role: "admin"},
			SigningKey: &statev1.SigningKey{Id: "s1", PrivateSeed: key32(1), PublicKey: key32(2)},
			SessionKey: &statev1.SessionKey{Id: "k1", Secret: key32(3)},
			History:    history,
		}}
	}
	if r := a.apply(init(strings.Repeat("h", MaxHistoryLen+1))); r.GetCode() != statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT || !strings.Contains(r.GetMessage(), "history") {
		t.Fatalf("init with a history of %d bytes: %v", MaxHistoryLen+1, r)
	}
	if done, _ := f.Initialized(); done {
		t.Fatal("a refused init initialized the cluster")
	}
	if r := a.apply(init("new-cluster")); !r.GetInitialized() {
		t.Fatalf("init: %v", r)
	}
	if r := a.apply(init("another")); r.GetInitialized() {
		t.Fatalf("second init: %v", r)
	}
	if h, err := f.History(); err != nil || h != "new-cluster" {
		t.Fatalf("history %q (%v), want the first init's", h, err)
	}
}
