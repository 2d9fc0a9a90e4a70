package fsm

import (
	"fmt"

	"google.golang.org/protobuf/proto"

	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// MailboxTotals sums the mailboxes of every device.
type MailboxTotals struct {
	// Devices is the number of devices with at least one stored entry.
	Devices uint64
	// Entries and Bytes are the stored entries and their event bytes.
	Entries, Bytes uint64
	// Purging is the number of deleted or revoked devices whose mailboxes
	// are still being emptied (their entries are counted above).
	Purging uint64
}

// MailboxTotals reads every device's mailbox counters from one consistent
// view of this replica. It costs one read per device that ever had a
// mailbox: callers that poll it (metrics) should not do so more than
// every few seconds.
func (f *FSM) MailboxTotals() (MailboxTotals, error) {
	snap := f.store.Snapshot()
	defer snap.Close()
	var t MailboxTotals
	var mb statev1.Mailbox
	err := snap.Iterate(prefixMailbox, prefixEnd(prefixMailbox), func(_, v []byte) (bool, error) {
		mb.Reset()
		if err := proto.Unmarshal(v, &mb); err != nil {
			return false, fmt.Errorf("decode mailbox counters: %w", err)
		}
		if mb.GetCount() > 0 {
			t.Devices++
		}
		t.Entries += mb.GetCount()
		t.Bytes += mb.GetBytes()
		return true, nil
	})
	if err == nil {
		err = snap.Iterate(prefixMailPurge, prefixEnd(prefixMailPurge), func(_, _ []byte) (bool, error) {
			t.Purging++
			return true, nil
		})
	}
	if err != nil {
		return MailboxTotals{}, fmt.Errorf("sum mailboxes: %w", err)
	}
	return t, nil
}
