package server_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
	"github.com/edge-relay/relay/storage/state"
)

func readyz(t *testing.T, n *clustertest.Node) (int, string) {
	t.Helper()
	return get(t, "http://"+n.Server.AdminAddr()+"/readyz")
}

// Shutdown (what SIGTERM runs) with a request in flight: /readyz answers
// 503 at once, the request (a backup stream the client reads slowly,
// longer than the quiet time after which the API's idle connections are
// closed) still completes whole, and only then does Shutdown return.
func TestShutdownFinishesRequestInFlight(t *testing.T) {
	rec := clustertest.NewLogRecorder()
	c := clustertest.Start(t, 3, clustertest.Options{Logger: slog.New(rec)})
	ctx := ctxT(t, 2*time.Minute)
	// Most of a megabyte of state that does not compress, far more than the
	// reading client's 64 KiB window.
	fillState(t, ctx, c.Nodes[c.Leader()].Server.Node(), 150)
	s := c.Nodes[c.Follower()]
	if code, body := readyz(t, s); code != http.StatusOK {
		t.Fatalf("/readyz before shutdown: %d %s", code, body)
	}
	stream := slowBackup(ctx, t, c, s)
	var buf bytes.Buffer
	buf.Write(stream.Msg().GetData())

	// The handler is running (it sent a chunk) and cannot finish until
	// the client reads on.
	done := make(chan error, 1)
	go func() { done <- s.Server.Shutdown(ctx) }()
	clustertest.Eventually(t, 10*time.Second, func() error {
		if code, body := readyz(t, s); code != http.StatusServiceUnavailable || !strings.Contains(body, "shutting down") {
			return fmt.Errorf("/readyz during shutdown: %d %s", code, body)
		}
		return nil
	})
	// The node waits for the request past the time it gives an idle API
	// (after which it closes the connections left), and says so.
	clustertest.Eventually(t, 10*time.Second, func() error {
		if len(rec.Find("shutdown waits for the API's requests in flight", func(r clustertest.Record) bool {
			return r.Attrs["test_node"].String() == s.ID && r.Attrs["requests"].Int64() == 1
		})) == 0 {
			return errors.New("no log of the request the shutdown waits for")
		}
		return nil
	})
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned (%v) while a backup was still being sent", err)
	default:
	}

	for stream.Receive() {
		buf.Write(stream.Msg().GetData())
	}
	if err := stream.Err(); err != nil {
		t.Fatalf("the backup in flight was cut by the shutdown: %v", err)
	}
	dec := state.NewDecoder(bytes.NewReader(buf.Bytes()))
	for {
		if _, _, err := dec.Next(); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("backup received during shutdown does not verify: %v", err)
		}
	}
	if dec.Count() < 150 || buf.Len() < 512<<10 {
		t.Fatalf("backup of %d records, %d bytes", dec.Count(), buf.Len())
	}
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}

// A node restarted behind the cluster answers /readyz 503 until it has
// applied what the leader had committed; the first 200 comes only after.
func TestReadyzWaitsUntilCaughtUp(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	x, l := c.StopBehind(ctxT(t, 2*time.Minute), 100, "r")
	st, err := c.Nodes[l].Server.Node().Status()
	if err != nil {
		t.Fatal(err)
	}
	committed := st.CommitIndex

	// Restarted while cut off from the others, it cannot catch up: it
	// stays unready (observed over many election timeouts).
	c.Isolate(x)
	c.Restart(x)
	n := c.Nodes[x]
	for end := time.Now().Add(time.Second); time.Now().Before(end); {
		if code, body := readyz(t, n); code != http.StatusServiceUnavailable {
			t.Fatalf("/readyz of a node behind the cluster: %d %s", code, body)
		}
	}
	if a := n.Server.Node().FSM().AppliedIndex(); a >= committed {
		t.Fatalf("isolated node applied %d, the leader had committed %d", a, committed)
	}

	// Healed, it catches up; the first 200 comes with the log applied.
	c.Heal(x)
	clustertest.Eventually(t, 30*time.Second, func() error {
		code, _ := readyz(t, n)
		if code != http.StatusOK {
			return fmt.Errorf("/readyz %d", code)
		}
		if a := n.Server.Node().FSM().AppliedIndex(); a < committed {
			t.Fatalf("/readyz 200 at applied index %d, the leader had committed %d before the restart", a, committed)
		}
		return nil
	})
}

// A new cluster draws its history id in InitCluster, so every node holds
// the same one, and it is not the empty one of clusters initialized
// before ids were drawn.
func TestANewClusterHasAHistory(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	var first string
	clustertest.Eventually(t, 30*time.Second, func() error {
		first, _ = c.Nodes[0].Server.Node().FSM().History()
		if first == "" {
			return errors.New("node 0 has no history yet")
		}
		for i, n := range c.Nodes {
			if h, err := n.Server.Node().FSM().History(); err != nil || h != first {
				return fmt.Errorf("node %d: history %q (%v), want %q", i, h, err, first)
			}
		}
		return nil
	})
	other := clustertest.Start(t, 1, clustertest.Options{})
	clustertest.Eventually(t, 30*time.Second, func() error {
		if h, _ := other.Nodes[0].Server.Node().FSM().History(); h == first || h == "" {
			return fmt.Errorf("another new cluster's history %q, want its own", h)
		}
		return nil
	})
}

// A backup client that stops reading (a stalled pipe behind relayctl)
// is cut off once it takes no chunk for the send timeout, as a watcher
// is: before, its handler held the state's snapshot, a place among the
// account's calls and the node's shutdown for as long as the client
// kept its connection. Here the timeout is 1 s; the node then stops
// without waiting for the backup.
func TestABackupClientThatStopsReadingIsCutOff(t *testing.T) {
	rec := clustertest.NewLogRecorder()
	c := clustertest.Start(t, 1, clustertest.Options{Logger: slog.New(rec), Watch: api.WatchConfig{SendTimeout: time.Second}})
	ctx := ctxT(t, 2*time.Minute)
	fillState(t, ctx, c.Nodes[0].Server.Node(), 150)
	slowBackup(ctx, t, c, c.Nodes[0]) // its first chunk taken, nothing more
	clustertest.Eventually(t, 30*time.Second, func() error {
		if len(rec.Find("backup stream cut off: the client stopped reading", nil)) == 0 {
			return errors.New("the backup stream was not cut off")
		}
		return nil
	})
	sctx, cancel := context.WithTimeout(ctx, 45*time.Second)
	defer cancel()
	if err := c.Nodes[0].Server.Shutdown(sctx); err != nil {
		t.Fatalf("shutdown after the cut-off: %v", err)
	}
}

// slowBackup starts a backup from node n of c as the admin, with a client
// whose flow-control windows are 64 KiB, and returns its stream once the
// first chunk came (in Msg); the stream closes when the test ends.
func slowBackup(ctx context.Context, t *testing.T, c *clustertest.Cluster, n *clustertest.Node) *connect.ServerStreamForClient[controlv1.BackupResponse] {
	t.Helper()
	cl := controlv1connect.NewClusterServiceClient(clustertest.SmallWindowClient(t), "http://"+n.Server.APIAddr())
	req := connect.NewRequest(&controlv1.BackupRequest{})
	req.Header().Set("Authorization", "Bearer "+c.AdminToken())
	stream, err := cl.Backup(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = stream.Close() })
	if !stream.Receive() {
		t.Fatalf("no first backup chunk: %v", stream.Err())
	}
	return stream
}

// A node that shuts down while it sends a full copy ends the copy with
// Unavailable instead of sending it to its end (each message may take
// the send timeout, and the shutdown waited for all of them): the
// watcher reads the copy's first message, stops reading, and once the
// shutdown waits for its stream reads on: the stream ends without the
// copy's SnapshotDone.
func TestAFullCopyEndsWhenTheNodeStops(t *testing.T) {
	rec := clustertest.NewLogRecorder()
	c := clustertest.Start(t, 1, clustertest.Options{Logger: slog.New(rec)})
	ctx := ctxT(t, 2*time.Minute)
	// Most of a megabyte of edges in the copy, far more than the
	// watcher's 64 KiB window.
	fillState(t, ctx, c.Nodes[0].Server.Node(), 150)
	s := c.Nodes[0]
	cl := edgev1connect.NewWatchServiceClient(clustertest.SmallWindowClient(t), "http://"+s.Server.APIAddr())
	req := connect.NewRequest(&edgev1.WatchRequest{})
	req.Header().Set("Authorization", "Bearer "+c.TokenFor("edge-watch", controlv1.Role_ROLE_EDGE))
	stream, err := cl.Watch(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	if !stream.Receive() || stream.Msg().GetResync() == nil {
		t.Fatalf("the copy's first message: %v %v", stream.Msg(), stream.Err())
	}
	done := make(chan error, 1)
	go func() { done <- s.Server.Shutdown(ctx) }()
	clustertest.Eventually(t, 30*time.Second, func() error {
		if len(rec.Find("watch streams end: the node is stopping", nil)) == 0 {
			return errors.New("the watch server is not closed yet")
		}
		return nil
	})
	for stream.Receive() {
		if stream.Msg().GetSnapshotDone() != nil {
			t.Fatal("the copy was sent to its end after the node began to stop")
		}
	}
	if code := connect.CodeOf(stream.Err()); code != connect.CodeUnavailable {
		t.Fatalf("the stream ended with %v, want unavailable", stream.Err())
	}
	if err := <-done; err != nil {
		t.Fatalf("shutdown: %v", err)
	}
}
