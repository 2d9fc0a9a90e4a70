package partitiontest

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/internal/relaytest"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
)

// Watcher follows the control plane's watch feed the way an edge does
// (with the edges' account), through every fault: it moves to the next
// node when a stream fails or stays silent longer than the feed's
// progress interval allows, and resumes from the last complete revision.
// It records every change once and notes every violation: a revision
// going back, a change repeated within what was already complete.
type Watcher struct {
	s     *relaytest.System
	token string

	mu         sync.Mutex // guards the fields below
	synced     bool
	history    string // of the first full copy, sent back on every resume, as edges do
	base       uint64 // revision of the first full copy
	complete   uint64 // last revision whose changes are all recorded
	lastEvent  uint64
	events     []watchRecord
	violations []string
	streams    int
	resyncs    int
	// ends is how the last stream on each node ended, for a failure's
	// message: when it ended, what it received, and why.
	ends map[string]string
}

type watchRecord struct {
	rev  uint64
	body string
}

// stallAfter: the control plane sends progress at least every 5 s on an
// idle stream, so a silent stream is a broken one.
const stallAfter = 8 * time.Second

// NewWatcher logs in as the edges' account.
func NewWatcher(t *testing.T, s *relaytest.System) *Watcher {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := controlv1connect.NewAuthServiceClient(s.HTTPClient(), s.URL(s.Control[0])).
		Login(ctx, connect.NewRequest(&controlv1.LoginRequest{Login: "edges", Password: relaytest.EdgePassword}))
	if err != nil {
		t.Fatalf("log in as the edges: %v", err)
	}
	return &Watcher{s: s, token: resp.Msg.GetTokens().GetAccessToken()}
}

// Run follows the feed until ctx ends.
func (w *Watcher) Run(ctx context.Context) {
	for i := 0; ctx.Err() == nil; i++ {
		w.once(ctx, w.s.Control[i%len(w.s.Control)])
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (w *Watcher) once(ctx context.Context, n *relaytest.ControlNode) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	w.mu.Lock()
	from, history := w.complete, w.history
	if !w.synced {
		from = 0
	}
	w.streams++
	streams := w.streams
	w.mu.Unlock()
	stall := time.AfterFunc(stallAfter, cancel)
	defer stall.Stop()
	// Streams end by themselves too, every few seconds, so the watcher
	// resumes on every node, including those just restarted or healed
	// (and behind): a resume must never go back in time. Entries that
	// are no change for watchers (a new leader's no-op, activity
	// reports) reach a watcher only in a progress message: a resumed
	// stream gets one as soon as it has caught up, an idle one every 5 s.
	// Every fourth stream lives past that interval, so the idle path is
	// checked as well as the resumed one.
	lifetime := 2*time.Second + time.Duration(streams%4)*time.Second
	if streams%4 == 3 {
		lifetime = 7 * time.Second
	}
	life := time.AfterFunc(lifetime, cancel)
	defer life.Stop()
	req := connect.NewRequest(&edgev1.WatchRequest{FromRevision: from, History: history})
	req.Header().Set("Authorization", "Bearer "+w.token)
	start := time.Now()
	stream, err := edgev1connect.NewWatchServiceClient(w.s.HTTPClient(), w.s.URL(n)).Watch(ctx, req)
	if err != nil {
		w.ended(n.ID, start, from, 0, err)
		return
	}
	defer stream.Close()
	received := 0
	for stream.Receive() {
		stall.Reset(stallAfter)
		received++
		w.apply(from, stream.Msg())
	}
	w.ended(n.ID, start, from, received, stream.Err())
	// Changes of a revision only partly received come again on resume.
	w.mu.Lock()
	keep := len(w.events)
	for keep > 0 && w.events[keep-1].rev > w.complete {
		keep--
	}
	w.events = w.events[:keep]
	w.lastEvent = w.complete
	w.mu.Unlock()
}

// ended records how a stream on node ended.
func (w *Watcher) ended(node string, start time.Time, from uint64, received int, err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.ends == nil {
		w.ends = map[string]string{}
	}
	w.ends[node] = fmt.Sprintf("%s: from %d, %d messages in %v, ended at %s: %v",
		node, from, received, time.Since(start).Round(time.Millisecond), time.Now().Format("15:04:05.000"), err)
}

// describeEnds lists how the last stream on each node ended. Call it
// with mu held.
func (w *Watcher) describeEnds() string {
	ids := make([]string, 0, len(w.ends))
	for id := range w.ends {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	var b strings.Builder
	for _, id := range ids {
		b.WriteString("; last stream on ")
		b.WriteString(w.ends[id])
	}
	return b.String()
}

func (w *Watcher) apply(from uint64, m *edgev1.WatchResponse) {
	w.mu.Lock()
	defer w.mu.Unlock()
	rev := m.GetRevision()
	switch k := m.GetKind().(type) {
	case *edgev1.WatchResponse_Resync:
		if w.synced {
			w.resyncs++
			w.violations = append(w.violations, fmt.Sprintf("full resync on a resume from %d (compacted?)", from))
		}
	case *edgev1.WatchResponse_SnapshotDone:
		if !w.synced {
			w.synced, w.base, w.complete, w.lastEvent = true, rev, rev, rev
			w.history = k.SnapshotDone.GetHistory()
		}
	case *edgev1.WatchResponse_Event:
		if !w.synced {
			return // part of the first full copy
		}
		if rev <= w.complete {
			w.violations = append(w.violations, fmt.Sprintf("change at revision %d after revision %d was complete (stream resumed from %d): repeated or back in time", rev, w.complete, from))
			return
		}
		if rev < w.lastEvent {
			w.violations = append(w.violations, fmt.Sprintf("change at revision %d after one at %d: back in time", rev, w.lastEvent))
		}
		b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(k.Event)
		w.events = append(w.events, watchRecord{rev, string(b)})
		w.lastEvent = rev
		if rev-1 > w.complete {
			w.complete = rev - 1
		}
	case *edgev1.WatchResponse_Progress:
		if !w.synced {
			return
		}
		if rev < w.complete {
			w.violations = append(w.violations, fmt.Sprintf("progress at revision %d after %d was complete: back in time", rev, w.complete))
			return
		}
		w.complete = rev
	}
}

// CheckAgainstFreshRead writes a marker, waits until the watcher has it,
// then reads the feed afresh from the watcher's first revision on a
// node and requires the same changes, in the same order, once each.
func (w *Watcher) CheckAgainstFreshRead(t *testing.T, within time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	var marker uint64
	clustertest.Eventually(t, within, func() error {
		login := fmt.Sprintf("marker-%d", time.Now().UnixNano())
		if _, err := w.s.Users(w.s.Control[0]).CreateUser(ctx, relaytest.Admin(w.s, &controlv1.CreateUserRequest{Login: login})); err != nil {
			return err
		}
		// A failed login after it: an entry that is no change for
		// watchers, so the marker (the applied index below) is complete
		// for the watcher only through a progress message, as the end of
		// a quiet feed always is.
		_, err := controlv1connect.NewAuthServiceClient(w.s.HTTPClient(), w.s.URL(w.s.Control[0])).
			Login(ctx, connect.NewRequest(&controlv1.LoginRequest{Login: login, Password: "not the marker's password"}))
		if connect.CodeOf(err) != connect.CodeUnauthenticated {
			return fmt.Errorf("a failed login after the marker: %v, want unauthenticated", err)
		}
		st, err := w.s.Status(w.s.Control[0], 5*time.Second)
		if err != nil {
			return err
		}
		marker = st.GetAppliedIndex()
		return nil
	})
	clustertest.Eventually(t, within, func() error {
		w.mu.Lock()
		defer w.mu.Unlock()
		if w.complete < marker {
			return fmt.Errorf("watcher complete up to %d, marker at %d (%d streams%s)", w.complete, marker, w.streams, w.describeEnds())
		}
		return nil
	})
	w.mu.Lock()
	base, events, violations := w.base, w.events, w.violations
	var mine []watchRecord
	for _, e := range events {
		if e.rev <= marker {
			mine = append(mine, e)
		}
	}
	streams := w.streams
	w.mu.Unlock()
	for _, v := range violations {
		t.Errorf("watch: %s", v)
	}
	// The fresh read, from the watcher's first revision; a long run's
	// feed may have been compacted past it (the control plane keeps the
	// last ChangeRetention revisions), and then the comparison starts at
	// the oldest revision of the watcher's that the feed still answers
	// from, found by bisection over them.
	from := base
	fresh, compacted := w.freshRead(ctx, t, from, marker, false)
	if compacted {
		lo, hi := 0, len(mine) // from mine[i].rev: compacted for i < lo, answered for i >= hi
		for lo < hi {
			mid := (lo + hi) / 2
			if _, c := w.freshRead(ctx, t, mine[mid].rev, marker, true); c {
				lo = mid + 1
			} else {
				hi = mid
			}
		}
		if hi == len(mine) {
			t.Fatalf("the feed is compacted past every change the watcher recorded (%d, from revision %d)", len(mine), base)
		}
		from = mine[hi].rev
		mine = slices.DeleteFunc(mine, func(e watchRecord) bool { return e.rev <= from })
		t.Logf("watch: the feed was compacted past revision %d; comparing the %d changes after %d", base, len(mine), from)
		if fresh, compacted = w.freshRead(ctx, t, from, marker, false); compacted {
			t.Fatalf("the feed was compacted past revision %d while it was being read", from)
		}
	}
	t.Logf("watch: %d changes from revision %d to %d over %d streams; fresh read: %d", len(mine), from, marker, streams, len(fresh))
	if len(fresh) != len(mine) {
		t.Errorf("watcher recorded %d changes, a fresh read has %d", len(mine), len(fresh))
	}
	for i := range min(len(fresh), len(mine)) {
		if fresh[i] != mine[i] {
			t.Errorf("change %d: watcher has revision %d, a fresh read %d (or different content)", i, mine[i].rev, fresh[i].rev)
			break
		}
	}
}

// freshRead reads the feed on a node from revision from (exclusive) up to
// marker, or reports that it answered with a full copy (compacted); a
// probe only looks at the first message.
func (w *Watcher) freshRead(ctx context.Context, t *testing.T, from, marker uint64, probe bool) ([]watchRecord, bool) {
	t.Helper()
	w.mu.Lock()
	history := w.history
	w.mu.Unlock()
	req := connect.NewRequest(&edgev1.WatchRequest{FromRevision: from, History: history})
	req.Header().Set("Authorization", "Bearer "+w.token)
	stream, err := edgev1connect.NewWatchServiceClient(w.s.HTTPClient(), w.s.URL(w.s.Control[1])).Watch(ctx, req)
	if err != nil {
		t.Fatalf("fresh watch: %v", err)
	}
	defer stream.Close()
	var fresh []watchRecord
	for stream.Receive() {
		m := stream.Msg()
		if _, ok := m.GetKind().(*edgev1.WatchResponse_Resync); ok {
			return nil, true
		}
		if probe {
			return nil, false
		}
		if ev := m.GetEvent(); ev != nil && m.GetRevision() <= marker {
			b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(ev)
			fresh = append(fresh, watchRecord{m.GetRevision(), string(b)})
		}
		if m.GetRevision() >= marker && m.GetEvent() == nil {
			return fresh, false
		}
	}
	t.Fatalf("fresh watch from %d ended before revision %d: %v", from, marker, stream.Err())
	return nil, false
}
