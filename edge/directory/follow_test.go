package directory_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/edge/controlconn"
	"github.com/edge-relay/relay/edge/directory"
	"github.com/edge-relay/relay/edge/session"
	"github.com/edge-relay/relay/internal/relaytest"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
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

// feedNode is a control node reduced to what following its feed takes:
// logins for the edge, and a watch that either holds the stream open
// without a word (silent: a node whose applied index lags the edge's
// revision, or that hangs, while HTTP/2 pings are answered), or breaks
// off every full copy halfway (cut), or sends a full copy and then a
// progress now and then.
type feedNode struct {
	controlv1connect.UnimplementedAuthServiceHandler
	edgev1connect.UnimplementedWatchServiceHandler
	silent bool
	cut    atomic.Bool
	// expire makes a cut stream end as the control plane ends one whose
	// access token expired.
	expire  atomic.Bool
	watches atomic.Int32
}

func (f *feedNode) Login(context.Context, *connect.Request[controlv1.LoginRequest]) (*connect.Response[controlv1.LoginResponse], error) {
	return connect.NewResponse(&controlv1.LoginResponse{Tokens: &controlv1.Tokens{AccessToken: "t",
		AccessTokenExpiresAt: timestamppb.New(time.Now().Add(time.Hour)), Role: controlv1.Role_ROLE_EDGE}}), nil
}

func (f *feedNode) Watch(ctx context.Context, _ *connect.Request[edgev1.WatchRequest], s *connect.ServerStream[edgev1.WatchResponse]) error {
	f.watches.Add(1)
	if f.silent {
		<-ctx.Done()
		return ctx.Err()
	}
	if f.cut.Load() {
		for _, m := range []*edgev1.WatchResponse{
			{Revision: 7, Kind: &edgev1.WatchResponse_Resync{Resync: &edgev1.Resync{}}},
			{Revision: 7, Kind: &edgev1.WatchResponse_Event{Event: &edgev1.WatchEvent{Kind: &edgev1.WatchEvent_UserPut{UserPut: &edgev1.UserState{Id: "u1", Active: true}}}}},
		} {
			if err := s.Send(m); err != nil {
				return err
			}
		}
		if f.expire.Load() {
			err := connect.NewError(connect.CodeUnauthenticated, errors.New("access token expired"))
			err.Meta().Set("Relay-Stream-End", "token-expired")
			return err
		}
		return connect.NewError(connect.CodeUnavailable, errors.New("the copy breaks off"))
	}
	for _, m := range []*edgev1.WatchResponse{
		{Revision: 7, Kind: &edgev1.WatchResponse_Resync{Resync: &edgev1.Resync{}}},
		{Revision: 7, Kind: &edgev1.WatchResponse_SnapshotDone{SnapshotDone: &edgev1.SnapshotDone{History: "h"}}},
	} {
		if err := s.Send(m); err != nil {
			return err
		}
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
			if err := s.Send(&edgev1.WatchResponse{Revision: 7, Kind: &edgev1.WatchResponse_Progress{Progress: &edgev1.Progress{}}}); err != nil {
				return err
			}
		}
	}
}

// passOn records how streams ended and tells the client it wraps, as
// Follow tells controlconn's.
type passOn struct{ failRecorder }

func (p passOn) StreamFailed(err error) {
	p.failRecorder.StreamFailed(err)
	p.WatchServiceClient.(directory.StreamFailer).StreamFailed(err)
}

// serveFeedNode serves f as a control node until the test ends, and
// returns its URL.
func serveFeedNode(t *testing.T, f *feedNode) string {
	mux := http.NewServeMux()
	mux.Handle(controlv1connect.NewAuthServiceHandler(f))
	mux.Handle(edgev1connect.NewWatchServiceHandler(f))
	return relaytest.ServeH2C(t, mux)
}

// A watch stream that brings nothing is given up after StallTimeout and
// reported as unavailable, so that controlconn sends the next watch to
// the next control node, where the edge gets its copy. Without the stall
// timer the edge sat on the silent stream for good: its copy stale, its
// LastHeard still, and past --control-grace it refused new sessions
// though a healthy node was there.
func TestFollowGivesUpASilentStream(t *testing.T) {
	silent, good := &feedNode{silent: true}, &feedNode{}
	cc, err := controlconn.New(controlconn.Config{URLs: []string{serveFeedNode(t, silent), serveFeedNode(t, good)}, Login: "edge", Password: "p"})
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	rec := passOn{failRecorder{cc.Watch(), make(chan error, 8)}}
	// Twenty of the good node's 100 ms progress gaps: a busy machine
	// under -race does not stretch one gap that far.
	const stall = 2 * time.Second
	d := directory.New(directory.Config{Ring: session.NewRing(), StallTimeout: stall})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- d.Follow(ctx, rec, cc.Token) }()
	defer func() { cancel(); <-done }()
	select {
	case err := <-rec.failed:
		if connect.CodeOf(err) != connect.CodeUnavailable || !strings.Contains(err.Error(), "silent") {
			t.Fatalf("StreamFailed(%v), want unavailable: silent", err)
		}
		if took := time.Since(start); took < stall {
			t.Fatalf("the silent stream was given up after %v, before StallTimeout (%v)", took, stall)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("a silent stream was not given up in 30 s")
	}
	clustertest.Eventually(t, 30*time.Second, func() error {
		if !d.Synced() || d.Revision() != 7 {
			return fmt.Errorf("synced %v at revision %d, want the good node's copy at 7", d.Synced(), d.Revision())
		}
		return nil
	})
	if silent.watches.Load() != 1 {
		t.Fatalf("%d watches on the silent node, want 1", silent.watches.Load())
	}
	// A stream that does bring messages, whatever the gaps between them
	// (below the timeout), stays: no second watch on the good node.
	heard := d.LastHeard()
	clustertest.Eventually(t, 30*time.Second, func() error {
		if !d.LastHeard().After(heard.Add(2 * stall)) {
			return errors.New("not two stall timeouts of progress yet")
		}
		return nil
	})
	if n := good.watches.Load(); n != 1 {
		t.Fatalf("%d watches on the good node, want 1: its stream was given up", n)
	}
}

// A full copy that breaks off halfway, again and again, does not count as
// hearing the control plane: the edge's state stays that of its last
// complete copy, however many messages the broken copies bring, so past
// --control-grace the edge must refuse new sessions as if it heard
// nothing. Once a copy completes, LastHeard moves again.
func TestCopiesThatKeepBreakingAreNotHearing(t *testing.T) {
	f := &feedNode{}
	f.cut.Store(true)
	cc, err := controlconn.New(controlconn.Config{URLs: []string{serveFeedNode(t, f)}, Login: "edge", Password: "p"})
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	d := directory.New(directory.Config{Ring: session.NewRing()})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Follow(ctx, cc.Watch(), cc.Token) }()
	defer func() { cancel(); <-done }()
	// The first copy's messages count (nothing was cut before them);
	// once the second stream begins they are all applied.
	clustertest.Eventually(t, 30*time.Second, func() error {
		if n := f.watches.Load(); n < 2 {
			return fmt.Errorf("%d watches", n)
		}
		return nil
	})
	heard := d.LastHeard()
	if heard.IsZero() {
		t.Fatal("the first copy's messages were not heard")
	}
	clustertest.Eventually(t, 60*time.Second, func() error {
		if n := f.watches.Load(); n < 5 {
			return fmt.Errorf("%d watches", n)
		}
		return nil
	})
	if h := d.LastHeard(); !h.Equal(heard) {
		t.Fatalf("LastHeard moved from %v to %v with copies that all broke off", heard, h)
	}
	if d.Synced() {
		t.Fatal("synced without a complete copy")
	}
	f.cut.Store(false)
	clustertest.Eventually(t, 30*time.Second, func() error {
		if !d.Synced() || !d.LastHeard().After(heard) {
			return errors.New("no complete copy heard yet")
		}
		return nil
	})

	// A stream that ends with its access token, as every long one does,
	// cuts nothing: the copy after it counts message by message.
	d2 := directory.New(directory.Config{Ring: session.NewRing()})
	f2 := &feedNode{}
	f2.cut.Store(true)
	f2.expire.Store(true)
	cc2, err := controlconn.New(controlconn.Config{URLs: []string{serveFeedNode(t, f2)}, Login: "edge", Password: "p"})
	if err != nil {
		t.Fatal(err)
	}
	defer cc2.Close()
	ctx2, cancel2 := context.WithCancel(context.Background())
	done2 := make(chan error, 1)
	go func() { done2 <- d2.Follow(ctx2, cc2.Watch(), cc2.Token) }()
	defer func() { cancel2(); <-done2 }()
	var first time.Time
	clustertest.Eventually(t, 30*time.Second, func() error {
		if n := f2.watches.Load(); n < 2 || d2.LastHeard().IsZero() {
			return fmt.Errorf("%d watches", n)
		}
		first = d2.LastHeard()
		return nil
	})
	clustertest.Eventually(t, 30*time.Second, func() error {
		if !d2.LastHeard().After(first) {
			return errors.New("the copies after a token expiry are not heard")
		}
		return nil
	})

	// Within one stream too: a copy begun while another is under way
	// counts only once it is complete; then messages count again.
	d = directory.New(directory.Config{Ring: session.NewRing()})
	apply := func(m *edgev1.WatchResponse) time.Time {
		t.Helper()
		for !time.Now().After(d.LastHeard()) {
			runtime.Gosched() // LastHeard must be able to move past its value
		}
		m.Revision = 9
		d.Apply(m)
		return d.LastHeard()
	}
	resync := &edgev1.WatchResponse{Kind: &edgev1.WatchResponse_Resync{Resync: &edgev1.Resync{}}}
	event := &edgev1.WatchResponse{Kind: &edgev1.WatchResponse_Event{Event: &edgev1.WatchEvent{Kind: &edgev1.WatchEvent_UserPut{UserPut: &edgev1.UserState{Id: "u1", Active: true}}}}}
	done1 := &edgev1.WatchResponse{Kind: &edgev1.WatchResponse_SnapshotDone{SnapshotDone: &edgev1.SnapshotDone{History: "h"}}}
	apply(resync)
	h1 := apply(event)
	if h := apply(resync); !h.Equal(h1) {
		t.Fatal("a copy begun over another counted")
	}
	if h := apply(event); !h.Equal(h1) {
		t.Fatal("the second copy's event counted")
	}
	h2 := apply(done1)
	if !h2.After(h1) {
		t.Fatal("the complete copy did not count")
	}
	apply(resync)
	if h := apply(event); !h.After(h2) {
		t.Fatal("after a complete copy, a new copy's messages do not count")
	}
}
