package api_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// watcher reads one Watch stream into a channel from a goroutine the
// test owns.
type watcher struct {
	msgs   chan *edgev1.WatchResponse
	done   chan struct{}
	err    error
	cancel context.CancelFunc
	// stream is owned by the reading goroutine when reading is set.
	stream  *connect.ServerStreamForClient[edgev1.WatchResponse]
	reading bool
}

func startWatch(t *testing.T, n *clustertest.Node, token string, from uint64, read bool) *watcher {
	return startWatchWith(t, httpClient(t), n, token, from, read)
}

func startWatchWith(t *testing.T, hc *http.Client, n *clustertest.Node, token string, from uint64, read bool) *watcher {
	t.Helper()
	req := &edgev1.WatchRequest{FromRevision: from}
	if from > 0 {
		// A watcher resumes in the history of its last copy: this
		// cluster's (drawn by its InitCluster).
		h, err := n.Server.Node().FSM().History()
		if err != nil {
			t.Fatal(err)
		}
		req.History = h
	}
	return startWatchReq(t, hc, n, token, req, read)
}

func startWatchReq(t *testing.T, hc *http.Client, n *clustertest.Node, token string, req *edgev1.WatchRequest, read bool) *watcher {
	t.Helper()
	cl := edgev1connect.NewWatchServiceClient(hc, url(n), connect.WithInterceptors(bearer(token)))
	ctx, cancel := context.WithCancel(context.Background())
	w := &watcher{msgs: make(chan *edgev1.WatchResponse, 1<<16), done: make(chan struct{}), cancel: cancel, reading: read}
	open := func() error {
		// The call returns once the server sent its headers, which a
		// node still waiting to catch up has not done yet.
		s, err := cl.Watch(ctx, connect.NewRequest(req))
		w.stream = s
		return err
	}
	if read {
		go w.loop(open)
	} else if err := open(); err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(w.stop)
	return w
}

func (w *watcher) loop(open func() error) {
	defer close(w.done)
	if err := open(); err != nil {
		w.err = err
		return
	}
	defer w.stream.Close()
	for w.stream.Receive() {
		w.msgs <- w.stream.Msg()
	}
	w.err = w.stream.Err()
}

func (w *watcher) stop() {
	w.cancel()
	if w.reading {
		// The reading goroutine owns the stream; cancelling ends it.
		<-w.done
		return
	}
	_ = w.stream.Close()
	select {
	case <-w.done:
	case <-time.After(10 * time.Second):
		// Only a watcher that was never read from lands here.
	}
}

// next returns the next message that is not a progress heartbeat.
func (w *watcher) next(t *testing.T) *edgev1.WatchResponse {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		select {
		case m := <-w.msgs:
			if m.GetProgress() != nil {
				continue
			}
			return m
		case <-w.done:
			t.Fatalf("stream ended: %v", w.err)
		case <-deadline:
			t.Fatal("no watch message within 20s")
		}
	}
}

func mkUser(t *testing.T, c *clustertest.Cluster, via int, id string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := c.CreateUser(ctx, via, id); err != nil {
		t.Fatal(err)
	}
}

// expectedEvents returns the edge-visible changes after `after` from the
// feed itself, in order, as "revision:kind:id" strings.
func expectedEvents(t *testing.T, f *fsm.FSM, after uint64) []string {
	t.Helper()
	cs, err := f.Changes(after, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, c := range cs {
		switch c.GetKind() {
		case statev1.ChangeKind_CHANGE_KIND_NODE_PUT, statev1.ChangeKind_CHANGE_KIND_NODE_DELETED:
			continue
		}
		out = append(out, fmt.Sprintf("%d:%s", c.GetRevision(), c.GetKind()))
	}
	return out
}

func describe(m *edgev1.WatchResponse) string {
	kinds := map[string]string{
		"user_put": "CHANGE_KIND_USER_PUT", "user_deleted": "CHANGE_KIND_USER_DELETED",
		"device_put": "CHANGE_KIND_DEVICE_PUT", "device_deleted": "CHANGE_KIND_DEVICE_DELETED",
		"session_keys": "CHANGE_KIND_SESSION_KEYS", "edge_put": "CHANGE_KIND_EDGE_PUT", "edge_deleted": "CHANGE_KIND_EDGE_DELETED",
		"mailbox_changed": "CHANGE_KIND_MAILBOX_CHANGED",
	}
	ev := m.GetEvent().ProtoReflect()
	fd := ev.WhichOneof(ev.Descriptor().Oneofs().ByName("kind"))
	return fmt.Sprintf("%d:%s", m.GetRevision(), kinds[string(fd.Name())])
}

// collect reads events until the stream confirms revision `until`
// complete with a progress message, returning them as described strings.
// An event at revision `until` does not end it: one revision may carry
// several changes, and only a progress message says that all of them
// were sent.
func (w *watcher) collect(t *testing.T, until uint64) []string {
	t.Helper()
	var out []string
	var last uint64
	deadline := time.After(30 * time.Second)
	for {
		select {
		case m := <-w.msgs:
			if m.GetRevision() < last {
				t.Fatalf("revision went back from %d to %d", last, m.GetRevision())
			}
			last = m.GetRevision()
			if m.GetEvent() != nil {
				out = append(out, describe(m))
			}
			if m.GetProgress() != nil && last >= until {
				return out
			}
		case <-w.done:
			t.Fatalf("stream ended at %d before %d was confirmed: %v", last, until, w.err)
		case <-deadline:
			t.Fatalf("stream stuck at revision %d, want progress at %d", last, until)
		}
	}
}

// collectUntilCut is collect for a watcher the server may cut off: it
// returns the events received, the revision of the last one, and whether
// a progress message confirmed until (false: the server ended the
// stream with an error first).
func (w *watcher) collectUntilCut(t *testing.T, until uint64) (out []string, last uint64, done bool) {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		select {
		case m := <-w.msgs:
			if m.GetRevision() < last {
				t.Fatalf("revision went back from %d to %d", last, m.GetRevision())
			}
			if m.GetEvent() != nil {
				out = append(out, describe(m))
				last = m.GetRevision()
			}
			if m.GetProgress() != nil && m.GetRevision() >= until {
				return out, last, true
			}
		case <-w.done:
			for len(w.msgs) > 0 { // what arrived before the end
				m := <-w.msgs
				if m.GetEvent() != nil {
					out = append(out, describe(m))
					last = m.GetRevision()
				}
			}
			if w.err == nil || connect.CodeOf(w.err) == connect.CodeCanceled {
				t.Fatalf("stream ended at %d before %d was confirmed: %v", last, until, w.err)
			}
			return out, last, false
		case <-deadline:
			t.Fatalf("stream stuck at revision %d, want progress at %d", last, until)
		}
	}
}

// feedEnd returns the revision of the newest change in f's feed (after
// `after`), the revision a watcher's progress must reach once it has been
// sent everything.
func feedEnd(t *testing.T, f *fsm.FSM, after uint64) uint64 {
	t.Helper()
	cs, err := f.Changes(after, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if len(cs) == 0 {
		return after
	}
	return cs[len(cs)-1].GetRevision()
}

func equalSeq(t *testing.T, got, want []string) {
	t.Helper()
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("events differ:\n got  %v\n want %v", got, want)
	}
}

func TestWatchFullCopyThenLiveThenResume(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{Watch: api.WatchConfig{ProgressInterval: 50 * time.Millisecond}})
	edge := c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	mkUser(t, c, 0, "before")
	node := c.Nodes[c.Follower()]
	f := node.Server.Node().FSM()
	if err := node.Server.Node().Barrier(context.Background()); err != nil {
		t.Fatal(err)
	}

	w := startWatch(t, node, edge, 0, true)
	first := w.next(t)
	if first.GetResync() == nil {
		t.Fatalf("first message %v, want resync", first)
	}
	users := map[string]bool{}
	var ring *edgev1.SessionKeyRing
	for {
		m := w.next(t)
		if m.GetSnapshotDone() != nil {
			if m.GetRevision() != first.GetRevision() {
				t.Fatalf("copy spans revisions %d..%d", first.GetRevision(), m.GetRevision())
			}
			break
		}
		if u := m.GetEvent().GetUserPut(); u != nil {
			users[u.GetId()] = u.GetActive()
		}
		if r := m.GetEvent().GetSessionKeys(); r != nil {
			ring = r
		}
	}
	if !users["before"] || !users["admin"] || ring == nil || ring.GetCurrentId() == "" || len(ring.GetKeys()[0].GetSecret()) != 32 {
		t.Fatalf("full copy: users %v ring %v", users, ring)
	}
	base := first.GetRevision()
	for i := 0; i < 5; i++ {
		mkUser(t, c, i%3, fmt.Sprintf("live%d", i))
	}
	if err := node.Server.Node().Barrier(context.Background()); err != nil {
		t.Fatal(err)
	}
	live := w.collect(t, feedEnd(t, f, base))
	equalSeq(t, live, expectedEvents(t, f, base))

	// Disconnect, change more, resume from the last revision seen on
	// another node: every later change exactly once.
	w.stop()
	seen := base
	if n := len(live); n > 0 {
		fmt.Sscanf(live[n-1], "%d:", &seen)
	}
	for i := 0; i < 5; i++ {
		mkUser(t, c, i%3, fmt.Sprintf("offline%d", i))
	}
	other := c.Nodes[c.Leader()]
	w2 := startWatch(t, other, edge, seen, true)
	if err := other.Server.Node().Barrier(context.Background()); err != nil {
		t.Fatal(err)
	}
	of := other.Server.Node().FSM()
	equalSeq(t, w2.collect(t, feedEnd(t, of, seen)), expectedEvents(t, of, seen))

	// Idle streams get progress at the applied revision.
	deadline := time.After(10 * time.Second)
	for {
		select {
		case m := <-w2.msgs:
			if m.GetProgress() != nil && m.GetRevision() >= seen {
				return
			}
		case <-deadline:
			t.Fatal("no progress message on an idle stream")
		}
	}
}

func TestWatchBehindHorizonGetsFullCopy(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{FSM: fsm.Config{ChangeRetention: 20, PruneEvery: 8}})
	edge := c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	for i := 0; i < 60; i++ {
		mkUser(t, c, 0, fmt.Sprintf("h%d", i))
	}
	f := c.Nodes[0].Server.Node().FSM()
	if h, _ := f.Horizon(); h < 5 {
		t.Fatalf("horizon %d: nothing was compacted", h)
	}
	w := startWatch(t, c.Nodes[0], edge, 2, true)
	if m := w.next(t); m.GetResync() == nil {
		t.Fatalf("resume behind the horizon: first message %v, want resync", m)
	}
	users := 0
	for {
		m := w.next(t)
		if m.GetSnapshotDone() != nil {
			break
		}
		if m.GetEvent().GetUserPut() != nil {
			users++
		}
	}
	all, _, _ := f.ListUsers("", 1000)
	if users != len(all) {
		t.Fatalf("full copy had %d users, state has %d", users, len(all))
	}
	// And the live stream continues.
	mkUser(t, c, 0, "after-resync")
	for {
		m := w.next(t)
		if u := m.GetEvent().GetUserPut(); u != nil && u.GetId() == "after-resync" {
			return
		}
	}
}

// A watcher that resumes from a revision beyond this cluster's log (it
// followed the cluster before a restore from an older backup, whose
// revisions go on from the backup's) gets a full copy at once, then every
// later change: it is neither held until this history reaches its
// revision nor given only what comes after that. On a 3-node cluster,
// through a follower too (it asks the leader how far the log goes).
func TestWatchFromBeyondTheLogGetsFullCopy(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	edge := c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	c.WaitConverged()
	for _, via := range []int{c.Leader(), c.Follower()} {
		n := c.Nodes[via].Server.Node()
		from := n.FSM().AppliedIndex() + 1000
		w := startWatch(t, c.Nodes[via], edge, from, true)
		if m := w.next(t); m.GetResync() == nil || m.GetRevision() >= from {
			t.Fatalf("node %d, watch from %d: first message %v, want a resync below it", via, from, m)
		}
		for m := w.next(t); m.GetSnapshotDone() == nil; m = w.next(t) {
		}
		id := fmt.Sprintf("after-copy-%d", via)
		mkUser(t, c, via, id)
		for {
			if u := w.next(t).GetEvent().GetUserPut(); u != nil && u.GetId() == id {
				break
			}
		}
		w.stop()
	}
}

// A watcher that resumes from a revision of another history (it followed
// the cluster before a restore from a backup) gets a full copy, even from
// a revision this cluster has reached, and the copy names the cluster's
// history; one of this history resumes without. A history id longer than
// any the cluster draws is refused.
func TestWatchFromAnotherHistoryGetsFullCopy(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{Watch: api.WatchConfig{ProgressInterval: 50 * time.Millisecond}})
	edge := c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	from := c.Nodes[0].Server.Node().FSM().AppliedIndex()

	w := startWatchReq(t, httpClient(t), c.Nodes[0], edge, &edgev1.WatchRequest{FromRevision: from, History: "before-the-restore"}, true)
	if m := w.next(t); m.GetResync() == nil {
		t.Fatalf("watch from another history: first message %v, want a resync", m)
	}
	m := w.next(t)
	for ; m.GetSnapshotDone() == nil; m = w.next(t) {
	}
	cur, err := c.Nodes[0].Server.Node().FSM().History()
	if err != nil || cur == "" {
		t.Fatalf("the cluster's history %q (%v), want the one its InitCluster drew", cur, err)
	}
	if h := m.GetSnapshotDone().GetHistory(); h != cur {
		t.Fatalf("the copy names history %q, want the cluster's %q", h, cur)
	}
	w.stop()

	// From this history: progress, no copy (next would skip progress).
	same := startWatchReq(t, httpClient(t), c.Nodes[0], edge, &edgev1.WatchRequest{FromRevision: from, History: cur}, true)
	select {
	case m := <-same.msgs:
		if m.GetProgress() == nil {
			t.Fatalf("watch from this history: first message %v, want progress", m)
		}
	case <-same.done:
		t.Fatalf("stream ended: %v", same.err)
	case <-time.After(20 * time.Second):
		t.Fatal("no watch message within 20s")
	}
	same.stop()

	long := startWatchReq(t, httpClient(t), c.Nodes[0], edge, &edgev1.WatchRequest{FromRevision: from, History: strings.Repeat("h", fsm.MaxHistoryLen+1)}, true)
	select {
	case <-long.done:
	case m := <-long.msgs:
		t.Fatalf("a history of %d bytes: got %v, want the watch refused", fsm.MaxHistoryLen+1, m)
	case <-time.After(20 * time.Second):
		t.Fatalf("a history of %d bytes: the watch neither refused nor sent anything in 20s", fsm.MaxHistoryLen+1)
	}
	if connect.CodeOf(long.err) != connect.CodeInvalidArgument {
		t.Fatalf("a history of %d bytes: %v, want invalid_argument", fsm.MaxHistoryLen+1, long.err)
	}
}

// A watcher that stops reading is cut off with an error it can resume
// from; resuming yields every later change, none skipped.
func TestSlowWatcherIsCutOffAndResumes(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{Watch: api.WatchConfig{SendTimeout: 300 * time.Millisecond, ProgressInterval: 100 * time.Millisecond}})
	edge := c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	node := c.Nodes[0].Server.Node()
	start := node.FSM().AppliedIndex()
	w := startWatchWith(t, clustertest.SmallWindowClient(t), c.Nodes[0], edge, start, false)
	metric := func(name string) float64 {
		mfs, err := c.Nodes[0].Server.Registry().Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() == name {
				m := mf.GetMetric()[0]
				return m.GetCounter().GetValue() + m.GetGauge().GetValue()
			}
		}
		return 0
	}
	// The server handler must be running before the data is made.
	clustertest.Eventually(t, 10*time.Second, func() error {
		if metric("relay_control_watch_streams") < 1 {
			return fmt.Errorf("watch stream not open on the server yet")
		}
		return nil
	})
	// ~2.4 MB of edge registrations the watcher does not read while they
	// are made: far more than its 64 KiB window.
	// Random, so that the stream's compression cannot shrink them.
	addrs := make([]string, 8)
	for i := range addrs {
		b := make([]byte, 120)
		_, _ = rand.Read(b)
		addrs[i] = hex.EncodeToString(b)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 150; i++ {
				_, err := node.Apply(ctx, &statev1.Command{Op: &statev1.Command_RegisterEdge{RegisterEdge: &statev1.RegisterEdge{Edge: &statev1.Edge{
					Id: fmt.Sprintf("e%d-%d", g, i), Addrs: addrs, LeaseExpiresAtMs: time.Now().Add(time.Hour).UnixMilli(),
				}}}})
				if err != nil {
					t.Error(err)
					return
				}
			}
		}(g)
	}
	wg.Wait()
	// The server gives up on the watcher once a message waits longer than
	// the send timeout; wait for that (its metric), then read what the
	// window held and see the stream end in an error.
	clustertest.Eventually(t, 20*time.Second, func() error {
		if metric("relay_control_watch_cutoffs_total") < 1 {
			return fmt.Errorf("no watch cut off yet")
		}
		return nil
	})
	var last uint64
	received := 0
	go func() {
		// Bound the read so that a server that never cuts off fails the
		// test instead of hanging it.
		select {
		case <-w.done:
		case <-time.After(30 * time.Second):
			w.cancel()
		}
	}()
	for w.stream.Receive() {
		m := w.stream.Msg()
		if m.GetRevision() < last {
			t.Fatalf("revision went back from %d to %d", last, m.GetRevision())
		}
		last = m.GetRevision()
		if m.GetEvent() != nil {
			received++
		}
	}
	close(w.done)
	if w.stream.Err() == nil || connect.CodeOf(w.stream.Err()) == connect.CodeCanceled {
		t.Fatalf("slow watcher: stream ended with %v, want an error from the server", w.stream.Err())
	}
	if received >= 1200 {
		t.Fatalf("watcher received all %d messages; the test did not stall it", received)
	}
	// Resume from the last revision received: the rest arrives. The
	// send timeout is short (300 ms), so on a loaded machine the resumed
	// watcher may be cut off too before it has read everything; it then
	// resumes again, as an edge does, and must still get every change
	// exactly once.
	var got []string
	from, until := last, feedEnd(t, node.FSM(), last)
	for resumes := 0; ; resumes++ {
		if resumes == 20 {
			t.Fatalf("resumed 20 times without reaching revision %d", until)
		}
		part, at, done := startWatch(t, c.Nodes[0], edge, from, true).collectUntilCut(t, until)
		got = append(got, part...)
		if done {
			break
		}
		t.Logf("the resumed watcher was cut off at revision %d; resuming again", at)
		if at > 0 {
			from = at
		}
	}
	equalSeq(t, got, expectedEvents(t, node.FSM(), last))
	if received+len(got) < 1200 {
		t.Fatalf("received %d + %d events, want all 1200", received, len(got))
	}
}

// A watch resumed on another node after a leadership change never sees
// revisions go backwards nor misses one, even when that node is behind
// the revision the watcher already saw: the stream waits until the node
// has caught up (within CatchUpWait: a minute here), then serves
// revisions from there on.
func TestWatchResumeAcrossLeaderChange(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{Watch: api.WatchConfig{ProgressInterval: 20 * time.Millisecond, CatchUpWait: time.Minute}})
	edge := c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l := c.Leader()
	var lagging, next int
	for i := range c.Nodes {
		if i == l {
			continue
		}
		if lagging == 0 {
			lagging = i
		} else {
			next = i
		}
	}
	w := startWatch(t, c.Nodes[l], edge, 0, true)
	for w.next(t).GetSnapshotDone() == nil {
	}
	// The lagging node is cut off before the watcher's changes are made,
	// so it never applies them until it heals.
	c.Isolate(lagging)
	for i := 0; i < 10; i++ {
		mkUser(t, c, l, fmt.Sprintf("a%d", i))
	}
	f := c.Nodes[l].Server.Node().FSM()
	seen := feedEnd(t, f, 0)
	w.collect(t, seen)
	w.stop()
	lf := c.Nodes[lagging].Server.Node().FSM()
	if lf.AppliedIndex() >= seen {
		t.Fatalf("the isolated node applied %d, the watcher saw %d: it does not lag", lf.AppliedIndex(), seen)
	}

	// Leadership moves to the third node; more changes follow.
	c.TransferLeadership(ctx, next)
	for i := 0; i < 10; i++ {
		mkUser(t, c, next, fmt.Sprintf("b%d", i))
	}

	// Resume on the lagging node: the stream opens but waits.
	metric := func(name string) float64 {
		mfs, err := c.Nodes[lagging].Server.Registry().Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() == name {
				return mf.GetMetric()[0].GetGauge().GetValue()
			}
		}
		return 0
	}
	w2 := startWatch(t, c.Nodes[lagging], edge, seen, true)
	clustertest.Eventually(t, 10*time.Second, func() error {
		if metric("relay_control_watch_streams") < 1 {
			select {
			case <-w2.done:
				t.Fatalf("the resumed watch ended: %v", w2.err)
			default:
			}
			return fmt.Errorf("watch stream not open on the lagging node yet")
		}
		return nil
	})
	// A node serving from its own (older) state would send a progress
	// within one ProgressInterval; give it fifty.
	select {
	case m := <-w2.msgs:
		t.Fatalf("lagging node (applied %d) sent %v to a watcher resuming from %d", lf.AppliedIndex(), m, seen)
	case <-w2.done:
		t.Fatalf("stream ended: %v", w2.err)
	case <-time.After(50 * 20 * time.Millisecond):
	}
	if lf.AppliedIndex() >= seen {
		t.Fatalf("isolated node caught up to %d while cut off", lf.AppliedIndex())
	}

	// Healed, it catches up and the stream continues from `seen`, never
	// lower, with every later change exactly once.
	c.Heal(lagging)
	nf := c.Nodes[next].Server.Node().FSM()
	if err := c.Nodes[next].Server.Node().Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	end := feedEnd(t, nf, seen)
	var got []string
	deadline := time.After(30 * time.Second)
	for done := false; !done; {
		select {
		case m := <-w2.msgs:
			if m.GetRevision() < seen {
				t.Fatalf("resumed from %d, got revision %d", seen, m.GetRevision())
			}
			if m.GetEvent() != nil {
				got = append(got, describe(m))
			}
			done = m.GetProgress() != nil && m.GetRevision() >= end
		case <-w2.done:
			t.Fatalf("stream ended: %v", w2.err)
		case <-deadline:
			t.Fatalf("no progress at %d within 30s; events %v", end, got)
		}
	}
	equalSeq(t, got, expectedEvents(t, nf, seen))
	if len(got) < 10 {
		t.Fatalf("%d events after resume, want the 10 users made after it at least", len(got))
	}
}

func TestReportActivity(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	edge := c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	node := c.Nodes[0].Server.Node()
	mkUser(t, c, 0, "act")
	if _, err := node.Apply(ctx, &statev1.Command{Op: &statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{
		Device: &statev1.Device{Id: "dev1", UserId: "act", Name: "phone", PublicKey: pubKey(t)}}}}); err != nil {
		t.Fatal(err)
	}
	cl := edgev1connect.NewActivityServiceClient(httpClient(t), url(c.Nodes[0]), connect.WithInterceptors(bearer(edge)))
	at := time.Now().Add(-time.Minute).UnixMilli()
	_, err := cl.ReportActivity(ctx, connect.NewRequest(&edgev1.ReportActivityRequest{Entries: []*edgev1.Activity{
		{UserId: "act", DeviceId: "dev1", SeenAtMs: at},
		{UserId: "act", DeviceId: "gone", SeenAtMs: at},
		{UserId: "nobody", DeviceId: "x", SeenAtMs: at},
	}}))
	if err != nil {
		t.Fatal(err)
	}
	d, err := node.FSM().GetDevice("act", "dev1")
	if err != nil || d.GetLastSeenMs() != at {
		t.Fatalf("last_seen %v (%v), want %d", d.GetLastSeenMs(), err, at)
	}
	u, _ := node.FSM().GetUser("act")
	if u.GetLastActivityMs() < at {
		t.Fatalf("last_activity %d < %d", u.GetLastActivityMs(), at)
	}
	// Older reports never lower the time.
	if _, err := cl.ReportActivity(ctx, connect.NewRequest(&edgev1.ReportActivityRequest{Entries: []*edgev1.Activity{{UserId: "act", DeviceId: "dev1", SeenAtMs: at - 1000}}})); err != nil {
		t.Fatal(err)
	}
	if d, _ := node.FSM().GetDevice("act", "dev1"); d.GetLastSeenMs() != at {
		t.Fatal("an older report lowered last_seen")
	}
	for field, e := range map[string]*edgev1.Activity{
		"entries[0].user_id":    {DeviceId: "d", SeenAtMs: 1},
		"entries[0].device_id":  {UserId: "act", DeviceId: "bad id", SeenAtMs: 1},
		"entries[0].seen_at_ms": {UserId: "act"},
	} {
		_, err := cl.ReportActivity(ctx, connect.NewRequest(&edgev1.ReportActivityRequest{Entries: []*edgev1.Activity{e}}))
		if connect.CodeOf(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), field) {
			t.Errorf("want InvalidArgument naming %s, got %v", field, err)
		}
	}
}

// progressHonest reads the stream until a progress confirms `until` and
// checks every progress message on the way: a progress at revision R comes
// only after every change of R (and before) was sent. It returns the
// events read.
func (w *watcher) progressHonest(t *testing.T, f *fsm.FSM, after, until uint64) []string {
	t.Helper()
	want := expectedEvents(t, f, after)
	var got []string
	deadline := time.After(30 * time.Second)
	for {
		select {
		case m := <-w.msgs:
			if m.GetEvent() != nil {
				got = append(got, describe(m))
				continue
			}
			if m.GetProgress() == nil {
				continue
			}
			for _, e := range want {
				var rev uint64
				fmt.Sscanf(e, "%d:", &rev)
				if rev <= m.GetRevision() && !slices.Contains(got, e) {
					t.Fatalf("progress at %d before change %s was sent (sent %v)", m.GetRevision(), e, got)
				}
			}
			if m.GetRevision() >= until {
				return got
			}
		case <-w.done:
			t.Fatalf("stream ended before %d: %v", until, w.err)
		case <-deadline:
			t.Fatalf("no progress at %d within 30s; events %v", until, got)
		}
	}
}

// A watch resumed on a quiet feed hears at once where it stands: a
// progress at the node's applied index, which entries that are no change
// for watchers (activity of unknown users here) moved past the watcher's
// revision, without waiting for the idle tick (an hour here). Without it
// an edge that resumed learned that it is current, and got past the
// revisions its handshakes and mailbox fences wait for, only at the tick.
func TestResumedWatchHearsAtOnceThatItIsCurrent(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{Watch: api.WatchConfig{ProgressInterval: time.Hour}})
	edge := c.TokenFor("edge-resumes", controlv1.Role_ROLE_EDGE)
	f := c.Nodes[0].Server.Node().FSM()
	mkUser(t, c, 0, "quiet")
	from := feedEnd(t, f, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for range 3 {
		if _, err := c.Nodes[0].Server.Node().Apply(ctx, &statev1.Command{Op: &statev1.Command_RecordActivity{RecordActivity: &statev1.RecordActivity{
			Entries: []*statev1.Activity{{UserId: "nobody", SeenAtMs: time.Now().UnixMilli()}}}}}); err != nil {
			t.Fatal(err)
		}
	}
	applied := f.AppliedIndex()
	if end := feedEnd(t, f, 0); applied <= from || end != from {
		t.Fatalf("applied %d, feed ends at %d: want entries applied after the feed's end at %d", applied, end, from)
	}
	w := startWatch(t, c.Nodes[0], edge, from, true)
	select {
	case m := <-w.msgs:
		if m.GetProgress() == nil || m.GetRevision() < applied {
			t.Fatalf("first message of the resumed watch: %v, want a progress at %d or later", m, applied)
		}
	case <-w.done:
		t.Fatalf("the resumed watch ended: %v", w.err)
	case <-time.After(20 * time.Second):
		t.Fatal("the resumed watch heard nothing for 20 s")
	}
	// Then the feed goes on as before.
	mkUser(t, c, 0, "later")
	if m := w.next(t); m.GetEvent().GetUserPut().GetId() != "later" {
		t.Fatalf("after the progress: %v, want the user put of \"later\"", m)
	}
}

// Regression: a page of the change feed (BatchLimit) that ends inside a
// revision must not skip the rest of that revision, and progress must
// not claim such a revision complete early. Deleting a user with three
// devices is one revision with four changes; pages hold two.
func TestWatchPagesSplitInsideARevision(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{Watch: api.WatchConfig{BatchLimit: 2, ProgressInterval: 50 * time.Millisecond}})
	edge := c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l := c.Leader()
	node := c.Nodes[l].Server.Node()
	for _, u := range []string{"victim1", "victim2", "victim3"} {
		mkUser(t, c, l, u)
		for d := 0; d < 3; d++ {
			if _, err := node.Apply(ctx, &statev1.Command{Op: &statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{
				Device: &statev1.Device{Id: fmt.Sprintf("%s-d%d", u, d), UserId: u, Name: "dev", PublicKey: pubKey(t)}}}}); err != nil {
				t.Fatal(err)
			}
		}
	}
	deleteUser := func(id string) uint64 {
		t.Helper()
		res, err := node.Apply(ctx, &statev1.Command{Op: &statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: id}}})
		if err != nil {
			t.Fatal(err)
		}
		return res.GetRevision()
	}
	fol := c.Nodes[c.Follower()]
	ff := fol.Server.Node().FSM()
	if err := fol.Server.Node().Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	start := ff.AppliedIndex()
	w := startWatch(t, fol, edge, start, true)
	rev1 := deleteUser("victim1")
	if err := fol.Server.Node().Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	if n := len(expectedEvents(t, ff, rev1-1)) - len(expectedEvents(t, ff, rev1)); n != 4 {
		t.Fatalf("revision %d holds %d changes, want 4 (3 devices and the user)", rev1, n)
	}
	got := w.progressHonest(t, ff, start, rev1)
	equalSeq(t, got, expectedEvents(t, ff, start))

	// Resume from the revision the progress confirmed, on another node,
	// after two more multi-change revisions were made while away.
	w.stop()
	rev2 := deleteUser("victim2")
	rev3 := deleteUser("victim3")
	if rev3 <= rev2 {
		t.Fatalf("revisions %d, %d", rev2, rev3)
	}
	if err := node.Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	w2 := startWatch(t, c.Nodes[l], edge, rev1, true)
	got2 := w2.progressHonest(t, node.FSM(), rev1, rev3)
	want2 := expectedEvents(t, node.FSM(), rev1)
	equalSeq(t, got2, want2)
	for _, r := range []uint64{rev2, rev3} {
		n := 0
		for _, e := range got2 {
			if strings.HasPrefix(e, fmt.Sprintf("%d:", r)) {
				n++
			}
		}
		if n != 4 {
			t.Fatalf("revision %d: %d events after resume, want 4 (%v)", r, n, got2)
		}
	}
}

// A Watch stream lasts no longer than what let it in: it ends,
// unauthenticated, when its access token expires, and when the edge's
// account is disabled while it runs, so a stolen edge credential stops
// reading the feed (the session keys among it) once revoked.
func TestWatchEndsWithItsCredentials(t *testing.T) {
	ended := func(t *testing.T, w *watcher) {
		t.Helper()
		select {
		case <-w.done:
		case <-time.After(30 * time.Second):
			t.Fatal("the stream is still open")
		}
		if connect.CodeOf(w.err) != connect.CodeUnauthenticated {
			t.Fatalf("the stream ended with %v, want unauthenticated", w.err)
		}
	}
	t.Run("token expires", func(t *testing.T) {
		c := clustertest.Start(t, 1, clustertest.Options{Auth: api.AuthConfig{AccessTTL: 2 * time.Second, Leeway: time.Millisecond}})
		w := startWatch(t, c.Nodes[0], c.TokenFor("edge-expiring", controlv1.Role_ROLE_EDGE), 0, true)
		if w.next(t).GetResync() == nil {
			t.Fatal("no full copy first")
		}
		ended(t, w)
		var ce *connect.Error
		if !errors.As(w.err, &ce) || ce.Meta().Get(api.StreamEndHeader) != api.StreamEndTokenExpired || !strings.Contains(w.err.Error(), "expired") {
			t.Fatalf("ended with %v (metadata %v), want the token's expiry named", w.err, ce.Meta())
		}
	})
	t.Run("account disabled", func(t *testing.T) {
		c := clustertest.Start(t, 1, clustertest.Options{Auth: api.AuthConfig{StreamRecheckEvery: 100 * time.Millisecond}})
		tok := c.TokenFor("edge-disabled", controlv1.Role_ROLE_EDGE)
		w := startWatch(t, c.Nodes[0], tok, 0, true)
		if w.next(t).GetResync() == nil {
			t.Fatal("no full copy first")
		}
		disableAccountOf(t, c, tok)
		ended(t, w)
		if ce := new(connect.Error); errors.As(w.err, &ce) && ce.Meta().Get(api.StreamEndHeader) != "" {
			t.Fatalf("a revoked account's stream ended as if its token expired: %v", ce.Meta())
		}
	})
}

// A full copy ends at the next message once the watcher's credentials
// are revoked, however fast the watcher reads: it does not go on to the
// session keys (secrets) after the users, devices and edges.
func TestAFullCopyEndsWithItsCredentials(t *testing.T) {
	rec := clustertest.NewLogRecorder()
	c := clustertest.Start(t, 1, clustertest.Options{Logger: slog.New(rec), Auth: api.AuthConfig{StreamRecheckEvery: 50 * time.Millisecond}})
	node := c.Nodes[0].Server.Node()
	// 160 edge registrations of 2 KB each (1 KB once compressed: random
	// hex): the copy lists them before the session keys, and they are far
	// more than the watcher's window of 8 KiB, so the server is still
	// sending them when the revocation comes.
	const edges = 160
	addrs := make([]string, fsm.MaxEdgeAddrs)
	for i := range addrs {
		b := make([]byte, 120)
		_, _ = rand.Read(b)
		addrs[i] = hex.EncodeToString(b)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range edges / 8 {
				if _, err := node.Apply(ctx, &statev1.Command{Op: &statev1.Command_RegisterEdge{RegisterEdge: &statev1.RegisterEdge{Edge: &statev1.Edge{
					Id: fmt.Sprintf("e%d-%d", g, i), Addrs: addrs, LeaseExpiresAtMs: time.Now().Add(time.Hour).UnixMilli(),
				}}}}); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}

	tok := c.TokenFor("edge-revoked", controlv1.Role_ROLE_EDGE)
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: &p, HTTP2: &http.HTTP2Config{MaxReceiveBufferPerStream: 8 << 10}}
	t.Cleanup(tr.CloseIdleConnections)
	w := startWatchWith(t, &http.Client{Transport: tr}, c.Nodes[0], tok, 0, false)
	go func() {
		// Bound the reads so that a stream that never ends fails the
		// test instead of hanging it.
		select {
		case <-w.done:
		case <-time.After(30 * time.Second):
			w.cancel()
		}
	}()
	defer close(w.done)
	if !w.stream.Receive() || w.stream.Msg().GetResync() == nil {
		t.Fatalf("first message %v (%v), want the full copy's start", w.stream.Msg(), w.stream.Err())
	}

	disableAccountOf(t, c, tok)
	// The stream's next look at its account (every 50 ms) finds it
	// disabled; only then does the watcher read on, as fast as it can.
	clustertest.Eventually(t, 10*time.Second, func() error {
		if len(rec.Find("watch stream ends at its next message: its credentials were revoked", nil)) == 0 {
			return errors.New("the revocation has not reached the stream yet")
		}
		return nil
	})
	events := 0
	for w.stream.Receive() {
		m := w.stream.Msg()
		if m.GetEvent().GetSessionKeys() != nil || m.GetSnapshotDone() != nil {
			t.Fatalf("after %d more events, the revoked watcher got %v", events, describe(m))
		}
		events++
	}
	if connect.CodeOf(w.stream.Err()) != connect.CodeUnauthenticated {
		t.Fatalf("the copy ended with %v after %d more events, want unauthenticated", w.stream.Err(), events)
	}
	// What the watcher's window held when the revocation came (about ten
	// edges), and the message under way: not the copy's rest.
	if events > 16 {
		t.Fatalf("the revoked watcher got %d more events of a copy of %d edges", events, edges)
	}
	t.Logf("%d events after the revocation", events)
}

// A node cut off from the cluster's majority stops vouching for its copy:
// its watch streams end (unavailable, naming the revision to resume
// from) once it has not heard from a leader for LeaderTimeout, instead of
// sending progress messages that tell its watchers nothing was written
// (while the majority goes on writing, a revocation among it), and it
// opens no full copy until it hears from one again.
func TestACutOffNodeEndsItsWatches(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{Watch: api.WatchConfig{ProgressInterval: 50 * time.Millisecond, LeaderTimeout: time.Second},
		FSM: fsm.Config{ChangeRetention: 20, PruneEvery: 8}})
	edge := c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	// Enough changes that the feed's start is compacted away.
	for i := range 40 {
		mkUser(t, c, c.Leader(), fmt.Sprintf("early-%d", i))
	}
	fi := c.Follower()
	f := c.Nodes[fi]
	written := c.Nodes[c.Leader()].Server.Node().FSM().AppliedIndex()
	clustertest.Eventually(t, 30*time.Second, func() error {
		ff := f.Server.Node().FSM()
		if h, _ := ff.Horizon(); h < 5 || ff.AppliedIndex() < written {
			return fmt.Errorf("horizon %d, applied %d of %d on the follower: want something compacted, everything applied", h, ff.AppliedIndex(), written)
		}
		return nil
	})
	w := startWatch(t, f, edge, 0, true)
	var copied uint64
	for copied == 0 {
		if m := w.next(t); m.GetSnapshotDone() != nil {
			copied = m.GetRevision()
		}
	}
	c.Isolate(fi)
	t.Cleanup(func() { c.Heal(fi) })
	mkUser(t, c, c.Leader(), "written-while-cut-off")
	select {
	case <-w.done:
		if connect.CodeOf(w.err) != connect.CodeUnavailable || !strings.Contains(w.err.Error(), "resume from revision") {
			t.Fatalf("the watch on the cut-off node ended with %v, want unavailable naming the revision to resume from", w.err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the watch on the cut-off node was still open 30 s after it lost the leader")
	}
	full := startWatch(t, f, edge, 0, true)
	select {
	case <-full.done:
		if connect.CodeOf(full.err) != connect.CodeUnavailable {
			t.Fatalf("a full copy from the cut-off node: %v, want unavailable", full.err)
		}
	case m := <-full.msgs:
		t.Fatalf("the cut-off node sent %v to a new watcher", m)
	case <-time.After(30 * time.Second):
		t.Fatal("a new watch on the cut-off node neither ended nor sent anything in 30 s")
	}
	// Nor does a watch resumed there hear anything: not that it is
	// current (the progress a resumed stream gets as soon as it caught
	// up), not a full copy when it is behind the compacted horizon, and
	// it is not held without a word when it is ahead of the node, which
	// may never catch up: each ends.
	ahead := c.Nodes[c.Leader()].Server.Node().FSM().AppliedIndex()
	for what, from := range map[string]uint64{"where it is": copied, "behind its horizon": 2, "ahead of it": ahead} {
		resumed := startWatch(t, f, edge, from, true)
		select {
		case <-resumed.done:
			if connect.CodeOf(resumed.err) != connect.CodeUnavailable || !strings.Contains(resumed.err.Error(), "not heard from a leader") {
				t.Errorf("a watch resumed on the cut-off node %s: %v, want unavailable: no leader", what, resumed.err)
			}
		case m := <-resumed.msgs:
			t.Errorf("the cut-off node sent %v to a watch resumed %s", m, what)
		case <-time.After(30 * time.Second):
			t.Errorf("a watch resumed on the cut-off node %s neither ended nor sent anything in 30 s", what)
		}
		resumed.stop()
	}
	// Healed, it serves again, the user written meanwhile included.
	c.Heal(fi)
	clustertest.Eventually(t, 30*time.Second, func() error {
		again := startWatch(t, f, edge, 0, true)
		defer again.stop()
		for {
			select {
			case m := <-again.msgs:
				if m.GetEvent().GetUserPut().GetId() == "written-while-cut-off" {
					return nil
				}
				if m.GetSnapshotDone() != nil {
					return errors.New("a full copy without the user written while the node was cut off")
				}
			case <-again.done:
				return fmt.Errorf("watch ended: %v", again.err)
			}
		}
	})
}

// A watch resumed on a node that lags behind the watcher's revision while
// it counts itself in contact with the leader (replaying its log, a slow
// disk: here a follower cut off with a LeaderTimeout of ten minutes) ends
// after CatchUpWait, unavailable and naming the revision to resume from
// on another node, instead of staying open without a message (HTTP/2
// pings still answered) for as long as the node lags. Resumed on a node
// that has the revision, it goes on.
func TestAWatchResumedOnALaggingNodeEnds(t *testing.T) {
	const catchUp = time.Second
	c := clustertest.Start(t, 3, clustertest.Options{Watch: api.WatchConfig{ProgressInterval: 50 * time.Millisecond, LeaderTimeout: 10 * time.Minute, CatchUpWait: catchUp}})
	edge := c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	l := c.Leader()
	lagging := c.Follower()
	c.Isolate(lagging)
	t.Cleanup(func() { c.Heal(lagging) })
	mkUser(t, c, l, "written-while-it-lags")
	f := c.Nodes[l].Server.Node().FSM()
	seen := f.AppliedIndex()
	if lf := c.Nodes[lagging].Server.Node().FSM(); lf.AppliedIndex() >= seen {
		t.Fatalf("the lagging node applied %d, the watcher has %d", lf.AppliedIndex(), seen)
	}
	start := time.Now()
	w := startWatch(t, c.Nodes[lagging], edge, seen, true)
	select {
	case <-w.done:
		if connect.CodeOf(w.err) != connect.CodeUnavailable || !strings.Contains(w.err.Error(), fmt.Sprintf("resume from revision %d on another node", seen)) {
			t.Fatalf("the watch resumed on the lagging node ended with %v, want unavailable naming revision %d", w.err, seen)
		}
		if took := time.Since(start); took < catchUp {
			t.Fatalf("the watch ended after %v, before CatchUpWait (%v)", took, catchUp)
		}
	case m := <-w.msgs:
		t.Fatalf("the lagging node sent %v to a watcher resuming from %d", m, seen)
	case <-time.After(catchUp + 15*time.Second):
		t.Fatalf("a watch resumed on the lagging node was still open and silent %v after CatchUpWait", 15*time.Second)
	}
	// Elsewhere the resume goes on from there.
	w2 := startWatch(t, c.Nodes[l], edge, seen, true)
	mkUser(t, c, l, "after")
	if m := w2.next(t); m.GetEvent().GetUserPut().GetId() != "after" {
		t.Fatalf("the watch resumed on the leader: %v, want the user put of \"after\"", m)
	}
}

// A node that stops ends the watch streams open through it at once
// (unavailable, saying so), so its watchers move to another node, and its
// shutdown does not wait for them to go away on their own.
func TestAStoppingNodeEndsItsWatches(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	w := startWatch(t, c.Nodes[0], c.TokenFor("edge-stopping", controlv1.Role_ROLE_EDGE), 0, true)
	for w.next(t).GetSnapshotDone() == nil {
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := c.Nodes[0].Server.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown with a watch open: %v", err)
	}
	select {
	case <-w.done:
		if connect.CodeOf(w.err) != connect.CodeUnavailable || !strings.Contains(w.err.Error(), "shutting down") {
			t.Fatalf("the watch ended with %v, want unavailable: the node is shutting down", w.err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the watch was still open 30 s after its node stopped")
	}
}

// disableAccountOf disables, through the admin, the account whose access
// token tok is.
func disableAccountOf(t *testing.T, c *clustertest.Cluster, tok string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	users := controlv1connect.NewUserServiceClient(httpClient(t), url(c.Nodes[0]), connect.WithInterceptors(bearer(tok)))
	me, err := users.GetMe(ctx, connect.NewRequest(&controlv1.GetMeRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	admin := controlv1connect.NewUserServiceClient(httpClient(t), url(c.Nodes[0]), connect.WithInterceptors(bearer(c.AdminToken())))
	disabled := controlv1.UserStatus_USER_STATUS_DISABLED
	if _, err := admin.UpdateUser(ctx, connect.NewRequest(&controlv1.UpdateUserRequest{Id: me.Msg.GetUser().GetId(), Status: &disabled})); err != nil {
		t.Fatal(err)
	}
}
