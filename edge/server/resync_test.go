package server_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/internal/relaytest"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
)

// watchCutter is a client interceptor that cuts an edge's watch feed on
// demand, leaving its other calls to the control plane (mailboxes,
// registration) alone: Cut ends the open streams and holds new ones until
// Heal.
type watchCutter struct {
	mu      sync.Mutex           // guards the fields below
	healed  chan struct{}        // nil, or closed by Heal
	held    chan struct{}        // signalled when a new stream is held
	cancels []context.CancelFunc // of the streams opened
}

func newWatchCutter() *watchCutter { return &watchCutter{held: make(chan struct{}, 1)} }

func (w *watchCutter) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc { return next }

func (w *watchCutter) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

func (w *watchCutter) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		if spec.Procedure != edgev1connect.WatchServiceWatchProcedure {
			return next(ctx, spec)
		}
		for {
			w.mu.Lock()
			healed := w.healed
			if healed == nil || ctx.Err() != nil {
				// Registered under the lock, so a Cut cannot miss it.
				sctx, cancel := context.WithCancel(ctx)
				w.cancels = append(w.cancels, cancel)
				w.mu.Unlock()
				return next(sctx, spec)
			}
			w.mu.Unlock()
			select {
			case w.held <- struct{}{}:
			default:
			}
			select {
			case <-healed:
			case <-ctx.Done():
			}
		}
	}
}

// Cut ends the open watch streams and holds new ones, then waits until
// the edge has given up its stream and tries a new one.
func (w *watchCutter) Cut(t *testing.T) {
	t.Helper()
	w.mu.Lock()
	w.healed = make(chan struct{})
	for _, cancel := range w.cancels {
		cancel()
	}
	w.cancels = nil
	w.mu.Unlock()
	select {
	case <-w.held:
	case <-time.After(20 * time.Second):
		t.Fatal("the edge did not try a new watch stream within 20s")
	}
}

// Heal lets held and new streams through.
func (w *watchCutter) Heal() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.healed != nil {
		close(w.healed)
		w.healed = nil
	}
}

// An entry stored for a device while its edge's watch feed is cut, and
// announced only in changes the feed has compacted by the time it
// resumes, reaches the device's open session: the full copy the edge
// gets instead announces every mailbox with entries. The device does not
// reconnect.
func TestEntryStoredDuringAFeedGapReachesTheOpenSession(t *testing.T) {
	cut := newWatchCutter()
	t.Cleanup(cut.Heal)
	r := relaytest.Start(t, relaytest.Options{
		Cluster: clustertest.Options{FSM: fsm.Config{ChangeRetention: 20, PruneEvery: 8}},
		Edge: func(_ int, cfg *server.Config) {
			cfg.Control.Options = append(cfg.Control.Options, connect.WithInterceptors(cut))
		},
	})
	u := r.User("gap")
	a, b := r.Device(u, "a"), r.Device(u, "b")
	cb := r.Dial(0, b, client.QUIC)
	session := cb.SessionID()
	node := r.Cluster.Nodes[0]
	f := node.Server.Node().FSM()

	cut.Cut(t)
	// Stored as another edge would store an event from a for b, then
	// enough changes that a resume from before it needs a full copy.
	putMailbox(t, node.Server.APIAddr(), r.Cluster.TokenFor("edge-other", controlv1.Role_ROLE_EDGE), a, b, "gap-1", "stored during the gap")
	seen := r.Edges[0].Directory().Revision()
	for i := 0; ; i++ {
		if h, err := f.Horizon(); err != nil {
			t.Fatal(err)
		} else if h > seen+1 { // the edge resumes from seen+1
			break
		}
		if i == 1000 { // the feed keeps 20 changes, pruned every 8
			t.Fatalf("the feed's horizon is still at or below %d after %d changes", seen+1, i)
		}
		r.User(fmt.Sprintf("filler%d", i))
	}

	resyncs := node.Metric(t, "relay_control_watch_resyncs_total")
	cut.Heal()
	rctx, rcancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer rcancel()
	got, err := cb.Receive(rctx)
	if err != nil {
		t.Fatalf("b received nothing: %v", err)
	}
	if got.ID != "gap-1" || got.Sender != a.ID || string(got.Payload) != "stored during the gap" {
		t.Fatalf("b received %+v", got)
	}
	if n := node.Metric(t, "relay_control_watch_resyncs_total") - resyncs; n != 1 {
		t.Fatalf("the feed resumed with %v full copies, want 1", n)
	}
	if cb.SessionID() != session {
		t.Fatalf("b reconnected (session %s, then %s)", session, cb.SessionID())
	}
}
