package relaytest

import (
	"fmt"
	"strings"
	"time"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/edge/session"
	"github.com/edge-relay/relay/internal/stacks"
)

// sessionFrames are functions that appear only in the stacks of an
// edge's goroutines for device connections (the clients a test runs in
// the same process share the libraries below them, so those cannot
// tell): the session core, the listener's per-connection goroutines and
// HTTP/3's server side. Whatever else a connection leaks shows in the
// goleak check at the end of the test binary.
var sessionFrames = []string{
	"github.com/edge-relay/relay/edge/session.",
	"github.com/edge-relay/relay/edge/transport.(*Listener).Serve.func",
	"github.com/edge-relay/relay/edge/transport.(*Listener).serve",
	"github.com/quic-go/quic-go/http3.(*Server)",
	"github.com/quic-go/quic-go/http3.(*RawServerConn)",
}

// SessionGoroutines counts this process's goroutines that belong to an
// edge's device connections (see sessionFrames), and returns their
// stacks.
func SessionGoroutines() (int, string) {
	count := 0
	var out strings.Builder
	for _, g := range stacks.All() {
		for _, f := range sessionFrames {
			if strings.Contains(g, f) {
				count++
				out.WriteString(g)
				out.WriteString("\n\n")
				break
			}
		}
	}
	return count, out.String()
}

// WaitSessionGoroutines waits until at most want connection goroutines
// are left (see SessionGoroutines).
func WaitSessionGoroutines(t clustertest.TB, want int, within time.Duration) {
	t.Helper()
	clustertest.Eventually(t, within, func() error {
		if n, stacks := SessionGoroutines(); n > want {
			return fmt.Errorf("%d connection goroutines, want at most %d:\n%s", n, want, stacks)
		}
		return nil
	})
}

// WaitEdge waits until cond holds for the sizes of edge e's session
// tables.
func WaitEdge(t clustertest.TB, e *server.Server, within time.Duration, cond func(session.Stats) error) {
	t.Helper()
	clustertest.Eventually(t, within, func() error { return cond(e.Hub().Stats()) })
}
