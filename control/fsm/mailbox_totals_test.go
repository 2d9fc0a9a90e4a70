package fsm

import (
	"testing"

	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// MailboxTotals follows puts, acks and a deleted device.
func TestMailboxTotals(t *testing.T) {
	f, a := mailboxWorld(t, Config{})
	check := func(step string, want MailboxTotals) {
		t.Helper()
		got, err := f.MailboxTotals()
		if err != nil || got != want {
			t.Fatalf("%s: totals %+v (err %v), want %+v", step, got, err, want)
		}
	}
	check("empty", MailboxTotals{})
	a.apply(putOp(
		mail("alice", "a1", "a2", "e1", 10, far),
		mail("alice", "a1", "a2", "e2", 20, far),
		mail("alice", "a2", "a1", "e3", 30, far),
		mail("bob", "b1", "b1", "e4", 5, far),
		mail("alice", "nope", "a1", "e5", 10, far), // refused: not counted
	))
	check("after put", MailboxTotals{Devices: 3, Entries: 4, Bytes: 65})
	a.apply(ackOp("a1", 1, 2))
	check("after ack", MailboxTotals{Devices: 2, Entries: 2, Bytes: 35})
	a.apply(&statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: "bob"}})
	check("after deleting bob", MailboxTotals{Devices: 1, Entries: 1, Bytes: 30})
}
