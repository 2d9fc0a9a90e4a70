package directory_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"slices"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/edge/directory"
	"github.com/edge-relay/relay/edge/session"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
)

// LastHeard moves with every message of the feed, whatever its kind.
func TestLastHeard(t *testing.T) {
	d := directory.New(directory.Config{Ring: session.NewRing()})
	if !d.LastHeard().IsZero() {
		t.Fatalf("LastHeard before any message: %v", d.LastHeard())
	}
	before := time.Now()
	d.Apply(&edgev1.WatchResponse{Revision: 1, Kind: &edgev1.WatchResponse_Progress{Progress: &edgev1.Progress{}}})
	if h := d.LastHeard(); h.Before(before) || h.After(time.Now()) {
		t.Fatalf("LastHeard %v, want between %v and now", h, before)
	}
}

// failRecorder is a watch client that records how its streams ended.
type failRecorder struct {
	edgev1connect.WatchServiceClient
	failed chan error
}

func (f failRecorder) StreamFailed(err error) {
	select {
	case f.failed <- err:
	default:
	}
}

// A stream's error, which arrives after Watch returned, reaches the
// client's StreamFailed (so it can move to another control node); a
// failure to get a token, before any stream, does not.
func TestFollowReportsStreamFailures(t *testing.T) {
	// The unimplemented handler fails every watch stream.
	mux := http.NewServeMux()
	mux.Handle(edgev1connect.NewWatchServiceHandler(edgev1connect.UnimplementedWatchServiceHandler{}))
	srv := httptest.NewServer(mux)
	defer srv.Close()
	rec := failRecorder{edgev1connect.NewWatchServiceClient(srv.Client(), srv.URL), make(chan error, 1)}
	d := directory.New(directory.Config{Ring: session.NewRing()})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	// The first tokens fail: no stream is tried, so nothing to report.
	tokens := 0
	token := func(context.Context) (string, error) {
		if tokens++; tokens <= 2 {
			return "", connect.NewError(connect.CodeUnavailable, errors.New("no control node"))
		}
		return "t", nil
	}
	go func() { done <- d.Follow(ctx, rec, token) }()
	defer func() { cancel(); <-done }()
	select {
	case err := <-rec.failed:
		if connect.CodeOf(err) != connect.CodeUnimplemented {
			t.Fatalf("StreamFailed(%v), want the stream's Unimplemented", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("StreamFailed was not called")
	}
}

// OnMailboxFeed follows whether the feed announces stored entries: not
// before the first full copy is in, then yes, no again while another
// full copy comes (it announces none), and yes once it is in; each
// change told once, and announcements only while live.
func TestMailboxFeedState(t *testing.T) {
	var got []bool
	var notes []string
	d := directory.New(directory.Config{Ring: session.NewRing(),
		OnMailboxFeed: func(live bool) { got = append(got, live) },
		OnMailbox:     func(_, device string, _ uint64) { notes = append(notes, device) },
	})
	resync := &edgev1.WatchResponse{Revision: 1, Kind: &edgev1.WatchResponse_Resync{Resync: &edgev1.Resync{}}}
	done := &edgev1.WatchResponse{Revision: 1, Kind: &edgev1.WatchResponse_SnapshotDone{SnapshotDone: &edgev1.SnapshotDone{}}}
	stored := func(rev uint64, device string) *edgev1.WatchResponse {
		return &edgev1.WatchResponse{Revision: rev, Kind: &edgev1.WatchResponse_Event{Event: &edgev1.WatchEvent{
			Kind: &edgev1.WatchEvent_MailboxChanged{MailboxChanged: &edgev1.MailboxChanged{UserId: "u", DeviceId: device, Seq: 1}}}}}
	}
	progress := &edgev1.WatchResponse{Revision: 2, Kind: &edgev1.WatchResponse_Progress{Progress: &edgev1.Progress{}}}
	d.Apply(resync)
	d.Apply(stored(1, "during-first-copy"))
	d.Apply(done)
	d.Apply(stored(2, "a"))
	d.Apply(progress)
	d.Apply(resync)
	d.Apply(stored(3, "during-second-copy"))
	d.Apply(done)
	d.Apply(stored(4, "b"))
	if want := []bool{true, false, true}; !slices.Equal(got, want) {
		t.Fatalf("OnMailboxFeed calls %v, want %v", got, want)
	}
	if want := []string{"a", "b"}; !slices.Equal(notes, want) {
		t.Fatalf("announcements %v, want %v", notes, want)
	}
}
