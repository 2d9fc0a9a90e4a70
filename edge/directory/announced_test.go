package directory_test

import (
	"testing"

	"github.com/edge-relay/relay/edge/directory"
	"github.com/edge-relay/relay/edge/session"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
)

// AnnouncedRevision covers a mailbox announcement only once OnMailbox
// has been called for it: the session core trusts it to mean that every
// entry stored up to it was announced.
func TestAnnouncedRevisionFollowsTheAnnouncements(t *testing.T) {
	var d *directory.Directory
	var seenAt []uint64 // AnnouncedRevision while each announcement was made
	d = directory.New(directory.Config{Ring: session.NewRing(), OnMailbox: func(user, device string, seq uint64) {
		seenAt = append(seenAt, d.AnnouncedRevision())
	}})
	apply := func(rev uint64, kind any) {
		m := &edgev1.WatchResponse{Revision: rev}
		switch k := kind.(type) {
		case *edgev1.WatchEvent:
			m.Kind = &edgev1.WatchResponse_Event{Event: k}
		case *edgev1.Progress:
			m.Kind = &edgev1.WatchResponse_Progress{Progress: k}
		case *edgev1.Resync:
			m.Kind = &edgev1.WatchResponse_Resync{Resync: k}
		case *edgev1.SnapshotDone:
			m.Kind = &edgev1.WatchResponse_SnapshotDone{SnapshotDone: k}
		}
		d.Apply(m)
	}
	apply(3, &edgev1.Resync{})
	apply(3, &edgev1.SnapshotDone{})
	if got := d.AnnouncedRevision(); got != 3 {
		t.Fatalf("after a full copy of revision 3: %d", got)
	}
	mc := func(seq uint64) *edgev1.WatchEvent {
		return &edgev1.WatchEvent{Kind: &edgev1.WatchEvent_MailboxChanged{MailboxChanged: &edgev1.MailboxChanged{DeviceId: "d", UserId: "u", Seq: seq}}}
	}
	// Revision 5 carries two announcements: it is complete only when a
	// later message says so.
	apply(5, mc(1))
	apply(5, mc(2))
	if got := d.AnnouncedRevision(); got != 4 {
		t.Fatalf("inside revision 5: %d, want 4", got)
	}
	apply(5, &edgev1.Progress{})
	if got := d.AnnouncedRevision(); got != 5 {
		t.Fatalf("after revision 5's progress: %d", got)
	}
	apply(8, mc(3))
	if got := d.AnnouncedRevision(); got != 7 {
		t.Fatalf("inside revision 8: %d, want 7", got)
	}
	// Each announcement was made before the revision that carried it
	// counted as announced.
	carried := []uint64{5, 5, 8}
	if len(seenAt) != len(carried) {
		t.Fatalf("%d announcements made, want %d", len(seenAt), len(carried))
	}
	for i, rev := range carried {
		if seenAt[i] >= rev {
			t.Fatalf("announcement %d of revision %d made when AnnouncedRevision was already %d", i, rev, seenAt[i])
		}
	}
}
