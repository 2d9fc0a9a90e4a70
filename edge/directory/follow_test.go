package directory_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
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
