package clustertest

import (
	"bytes"
	"fmt"
	"strings"
	"sync"
	"time"
)

// tailLines is how many log lines a cluster keeps for a failed test.
const tailLines = 400

// logTail keeps the last lines a cluster's nodes logged, so that a test
// that fails in CI (where logs are off) still shows what led to it.
type logTail struct {
	mu    sync.Mutex // guards lines and next
	lines []string
	next  int
	full  bool
}

func newLogTail() *logTail { return &logTail{lines: make([]string, tailLines)} }

// Write keeps p as one line; slog's text handler writes a record per call.
func (l *logTail) Write(p []byte) (int, error) {
	line := string(bytes.TrimRight(p, "\n"))
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines[l.next] = line
	l.next = (l.next + 1) % len(l.lines)
	if l.next == 0 {
		l.full = true
	}
	return len(p), nil
}

// String returns the kept lines, oldest first.
func (l *logTail) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	if l.full {
		out = append(out, l.lines[l.next:]...)
	}
	out = append(out, l.lines[:l.next]...)
	return strings.Join(out, "\n")
}

// failureReporter is what the failure dump needs beyond TB: *testing.T
// and *testing.B have it.
type failureReporter interface {
	Failed() bool
	Logf(format string, args ...any)
}

// dumpOnFailure registers a cleanup that, if the test failed, logs the
// nodes' last log lines. Registered before the nodes, it runs after they
// stopped, so their shutdown is in it too.
func (c *Cluster) dumpOnFailure() {
	fr, ok := c.t.(failureReporter)
	if !ok || c.tail == nil {
		return
	}
	c.t.Cleanup(func() {
		if fr.Failed() {
			fr.Logf("last %d log lines of the cluster's nodes (RELAY_TEST_LOG=1 shows all):\n%s", tailLines, c.tail)
		}
	})
}

// Describe reports each running node's view of the cluster (its Raft
// state, the leader it knows and that leader's API address as it
// resolves it, term, indexes, members): what a failed wait needs to say.
func (c *Cluster) Describe() string {
	var b strings.Builder
	for _, n := range c.Nodes {
		if n.Server == nil {
			fmt.Fprintf(&b, "\n  %s: stopped", n.ID)
			continue
		}
		node := n.Server.Node()
		st, err := node.Status()
		fmt.Fprintf(&b, "\n  %s: %s term=%d leader=%q leader_api=%q commit=%d applied=%d ready=%v last_contact=%v",
			n.ID, st.State, st.Term, st.LeaderID, st.LeaderAPIAddr, st.CommitIndex, st.AppliedIndex,
			node.Ready(), node.SinceLeaderContact().Round(time.Millisecond))
		if err != nil {
			fmt.Fprintf(&b, " status_err=%v", err)
		}
		for _, m := range st.Members {
			fmt.Fprintf(&b, " [%s voter=%v api=%q]", m.ID, m.Voter, m.APIAddr)
		}
	}
	return b.String()
}

// eventually is Eventually with the cluster's state in the failure.
func (c *Cluster) eventually(within time.Duration, cond func() error) {
	c.t.Helper()
	eventually(c.t, within, cond, func() string { return "the nodes:" + c.Describe() })
}
