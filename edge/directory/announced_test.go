package directory_test

import (
	"fmt"
	"slices"
	"testing"

	"github.com/edge-relay/relay/edge/directory"
	"github.com/edge-relay/relay/edge/session"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
)

// AnnouncedRevision covers a mailbox announcement only once OnMailbox
// has been called for it - live, or from a full copy - and counts the
// full copies that announced no mailboxes: the session core trusts it to
// mean that every entry stored up to it was announced.
func TestAnnouncedRevisionFollowsTheAnnouncements(t *testing.T) {
	var d *directory.Directory
	type seen struct {
		device string
		at     uint64
	}
	var calls []seen // AnnouncedRevision while each announcement was made
	d = directory.New(directory.Config{Ring: session.NewRing(), OnMailbox: func(user, device string, seq uint64) {
		rev, _ := d.AnnouncedRevision()
		calls = append(calls, seen{device, rev})
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
	announced := func(wantRev, wantBlind uint64) {
		t.Helper()
		if rev, blind := d.AnnouncedRevision(); rev != wantRev || blind != wantBlind {
			t.Fatalf("AnnouncedRevision = %d, %d blind copies; want %d, %d", rev, blind, wantRev, wantBlind)
		}
	}
	mc := func(device string, seq uint64) *edgev1.WatchEvent {
		return &edgev1.WatchEvent{Kind: &edgev1.WatchEvent_MailboxChanged{MailboxChanged: &edgev1.MailboxChanged{DeviceId: device, UserId: "u", Seq: seq}}}
	}
	apply(3, &edgev1.Resync{})
	apply(3, mc("copied", 4))
	announced(0, 0) // nothing while the copy is staged
	apply(3, &edgev1.SnapshotDone{MailboxesAnnounced: true})
	announced(3, 0)
	// Revision 5 carries two announcements: it is complete only when a
	// later message says so.
	apply(5, mc("d", 1))
	apply(5, mc("d", 2))
	announced(4, 0)
	apply(5, &edgev1.Progress{})
	announced(5, 0)
	apply(8, mc("d", 3))
	announced(7, 0)
	// A copy from a control plane that does not announce mailboxes: the
	// gap it covers may hold entries nobody will announce.
	apply(12, &edgev1.Resync{})
	apply(12, &edgev1.SnapshotDone{})
	announced(12, 1)
	// Each announcement was made before the revision that carried it
	// counted as announced.
	want := []seen{{"copied", 3}, {"d", 5}, {"d", 5}, {"d", 8}}
	if len(calls) != len(want) {
		t.Fatalf("announcements %v, want one each for %v", calls, want)
	}
	for i, c := range calls {
		if c.device != want[i].device || c.at >= want[i].at {
			t.Fatalf("announcement %d (%s) made when AnnouncedRevision was %d, want below %d", i, c.device, c.at, want[i].at)
		}
	}
}

// A full copy sets the directory's revision even when it is lower than
// the one the directory had: after a restore from an older backup the
// control plane's revisions go on from the backup's, and the directory
// must resume from those (else every resume would be answered with
// another full copy, and announcements of the new history would count
// as covered by the old one's). OnRewind hears of it, once, before the
// copy's mailbox announcements; a copy at a later revision (the feed was
// compacted) is no rewind.
func TestAFullCopyFromARestoredClusterSetsTheRevision(t *testing.T) {
	var calls []string
	d := directory.New(directory.Config{Ring: session.NewRing(),
		OnRewind:  func(from, to uint64) { calls = append(calls, fmt.Sprintf("rewind %d->%d", from, to)) },
		OnMailbox: func(_, device string, _ uint64) { calls = append(calls, "mailbox "+device) },
	})
	d.Apply(&edgev1.WatchResponse{Revision: 100, Kind: &edgev1.WatchResponse_Resync{Resync: &edgev1.Resync{}}})
	d.Apply(&edgev1.WatchResponse{Revision: 100, Kind: &edgev1.WatchResponse_SnapshotDone{SnapshotDone: &edgev1.SnapshotDone{MailboxesAnnounced: true}}})
	d.Apply(&edgev1.WatchResponse{Revision: 120, Kind: &edgev1.WatchResponse_Progress{Progress: &edgev1.Progress{}}})
	if got := d.Revision(); got != 120 {
		t.Fatalf("revision %d, want 120", got)
	}
	// A compacted feed's copy, later than what the directory had.
	d.Apply(&edgev1.WatchResponse{Revision: 130, Kind: &edgev1.WatchResponse_Resync{Resync: &edgev1.Resync{}}})
	d.Apply(&edgev1.WatchResponse{Revision: 130, Kind: &edgev1.WatchResponse_SnapshotDone{SnapshotDone: &edgev1.SnapshotDone{MailboxesAnnounced: true}}})
	if len(calls) != 0 {
		t.Fatalf("calls %v before any rewind", calls)
	}
	d.Apply(&edgev1.WatchResponse{Revision: 40, Kind: &edgev1.WatchResponse_Resync{Resync: &edgev1.Resync{}}})
	d.Apply(&edgev1.WatchResponse{Revision: 40, Kind: &edgev1.WatchResponse_Event{Event: &edgev1.WatchEvent{
		Kind: &edgev1.WatchEvent_MailboxChanged{MailboxChanged: &edgev1.MailboxChanged{UserId: "u", DeviceId: "d", Seq: 3}}}}})
	if got := d.Revision(); got != 130 {
		t.Fatalf("revision %d while the copy is staged, want 130 (the copy is not complete)", got)
	}
	d.Apply(&edgev1.WatchResponse{Revision: 40, Kind: &edgev1.WatchResponse_SnapshotDone{SnapshotDone: &edgev1.SnapshotDone{MailboxesAnnounced: true}}})
	if got := d.Revision(); got != 40 {
		t.Fatalf("revision %d after the restored cluster's copy at 40, want 40", got)
	}
	if want := []string{"rewind 130->40", "mailbox d"}; !slices.Equal(calls, want) {
		t.Fatalf("calls %v, want %v", calls, want)
	}
	if rev, _ := d.AnnouncedRevision(); rev != 40 {
		t.Fatalf("announced revision %d, want 40", rev)
	}
	d.Apply(&edgev1.WatchResponse{Revision: 41, Kind: &edgev1.WatchResponse_Progress{Progress: &edgev1.Progress{}}})
	if got := d.Revision(); got != 41 {
		t.Fatalf("revision %d, want 41: the new history goes on", got)
	}
}
