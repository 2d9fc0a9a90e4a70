package raftnode

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/internal/certpool"
	"github.com/edge-relay/relay/internal/testcerts"
)

// testPeer is a Raft transport with (or, for an older release, without)
// the cluster check, answering every vote request it receives.
type testPeer struct {
	id      string
	trans   *raftTransport
	layer   *streamLayer
	check   *clusterCheck
	history atomic.Pointer[string]
	votes   atomic.Int64 // vote requests that reached Raft's side

	mu      sync.Mutex // guards refused
	refused map[string]int
}

// newTestPeer starts a peer on a free port of 127.0.0.1 whose state has
// the given history ("" none); checked false stands for an older release.
func newTestPeer(t *testing.T, id, history string, checked bool) *testPeer {
	t.Helper()
	return newTestPeerWithin(t, id, history, checked, 10*time.Second, nil, nil)
}

// newTestPeerWithin is newTestPeer with the hello's timeout, and with
// mutual TLS when server and client are set.
func newTestPeerWithin(t *testing.T, id, history string, checked bool, timeout time.Duration, server, client *tls.Config) *testPeer {
	t.Helper()
	p := &testPeer{id: id, refused: map[string]int{}}
	p.history.Store(&history)
	if checked {
		p.check = &clusterCheck{
			nodeID: id, history: func() string { return *p.history.Load() }, timeout: timeout,
			// A peer without a history stands for a node with no state.
			stateless: func() bool { return *p.history.Load() == "" },
			log:       slog.New(slog.DiscardHandler),
			refused: func(reason string) {
				p.mu.Lock()
				p.refused[reason]++
				p.mu.Unlock()
			},
		}
	}
	layer, err := newStreamLayer("127.0.0.1:0", nil, server, client, nil, p.check)
	if err != nil {
		t.Fatal(err)
	}
	p.layer = layer
	p.trans = newRaftTransport(raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream: layer, MaxPool: 1, Timeout: 10 * time.Second,
		Logger: newHCLogger(slog.New(slog.DiscardHandler), "raft-net"),
	}))
	done := make(chan struct{})
	served := make(chan struct{})
	go func() {
		defer close(served)
		for {
			select {
			case rpc := <-p.trans.Consumer():
				p.votes.Add(1)
				rpc.Respond(&raft.RequestVoteResponse{Term: 1, Granted: true}, nil)
			case <-done:
				return
			}
		}
	}()
	t.Cleanup(func() {
		_ = p.trans.Close()
		close(done)
		<-served
	})
	return p
}

// vote sends p's vote request to q.
func (p *testPeer) vote(q *testPeer) error {
	var resp raft.RequestVoteResponse
	return p.trans.RequestVote(raft.ServerID(q.id), q.trans.LocalAddr(), &raft.RequestVoteRequest{
		RPCHeader: raft.RPCHeader{ID: []byte(p.id), Addr: []byte(p.trans.LocalAddr())}, Term: 1,
	}, &resp)
}

func (p *testPeer) refusals(reason string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.refused[reason]
}

func (p *testPeer) setLegacy(ok bool) {
	f := func() bool { return ok }
	p.check.legacy.Store(&f)
}

// Nodes of one cluster, and new nodes that have no state yet, talk;
// nodes whose states belong to two clusters do not, and the dialer's
// error names the node it reached and both histories.
func TestClusterCheckRefusesAnotherClustersNode(t *testing.T) {
	a1 := newTestPeer(t, "n1", "history-a", true)
	a2 := newTestPeer(t, "n2", "history-a", true)
	b2 := newTestPeer(t, "n2", "history-b", true)
	fresh := newTestPeer(t, "n4", "", true)

	if err := a1.vote(a2); err != nil {
		t.Fatalf("same cluster: %v", err)
	}
	// A node with no state, started to be added, takes a member's
	// traffic only when the member vouches for it as new: otherwise it
	// may be a voter that lost its data.
	if err := a1.vote(fresh); !errors.Is(err, errNotJoined) || fresh.refusals("lost_data") != 1 {
		t.Fatalf("to a node with no state yet, not vouched for: %v (lost_data refusals %d)", err, fresh.refusals("lost_data"))
	}
	a1.check.newMember = func(string) bool { return true }
	if err := a1.vote(fresh); err != nil {
		t.Fatalf("to a node with no state yet, vouched for as new: %v", err)
	}
	if err := fresh.vote(b2); err != nil {
		t.Fatalf("from a node with no state yet: %v", err)
	}
	before := b2.votes.Load()
	err := a1.vote(b2)
	var mm *ClusterMismatchError
	if !errors.Is(err, ErrOtherCluster) || !errors.As(err, &mm) {
		t.Fatalf("to another cluster's node: %v, want ErrOtherCluster", err)
	}
	if mm.PeerID != "n2" || mm.PeerHistory != "history-b" || mm.LocalHistory != "history-a" || mm.Addr != string(b2.trans.LocalAddr()) {
		t.Fatalf("mismatch %+v", mm)
	}
	if !strings.Contains(err.Error(), "another cluster") {
		t.Fatalf("error %q does not say why", err)
	}
	if got := b2.votes.Load(); got != before {
		t.Fatalf("the refused request reached the other cluster's raft (%d votes, had %d)", got, before)
	}
	if a1.refusals("other_cluster") != 1 || b2.refusals("other_cluster") != 1 {
		t.Fatalf("refusals counted: dialer %d, acceptor %d; want 1 each", a1.refusals("other_cluster"), b2.refusals("other_cluster"))
	}
	// And the other way.
	if err := b2.vote(a2); !errors.Is(err, ErrOtherCluster) {
		t.Fatalf("from another cluster's node: %v, want ErrOtherCluster", err)
	}
	// A node learns its history from its leader: from then on it is
	// checked against it.
	h := "history-a"
	fresh.history.Store(&h)
	fresh.trans.CloseStreams() // pooled connections were checked without one
	b2.trans.CloseStreams()
	if err := b2.vote(fresh); !errors.Is(err, ErrOtherCluster) {
		t.Fatalf("to a node that has learnt its history: %v, want ErrOtherCluster", err)
	}
}

// During a rolling upgrade: a node of this release reaches one of an
// older release (which reads the hello as an unknown RPC and hangs up)
// by dialing again without it, and accepts the older node's connections
// until every member has the check; then it refuses them.
func TestClusterCheckSpeaksToOlderReleases(t *testing.T) {
	upgraded := newTestPeer(t, "n1", "history-a", true)
	older := newTestPeer(t, "n2", "history-a", false)

	if err := upgraded.vote(older); err != nil {
		t.Fatalf("to an older release: %v", err)
	}
	if older.votes.Load() != 1 {
		t.Fatalf("the older node's raft got %d requests, want 1", older.votes.Load())
	}
	if err := older.vote(upgraded); err != nil {
		t.Fatalf("from an older release, before raft runs: %v", err)
	}
	upgraded.setLegacy(true)
	older.trans.CloseStreams()
	if err := older.vote(upgraded); err != nil {
		t.Fatalf("from an older release while a member lacks the check: %v", err)
	}
	upgraded.setLegacy(false)
	older.trans.CloseStreams()
	before := upgraded.votes.Load()
	if err := older.vote(upgraded); err == nil {
		t.Fatal("a connection without the check was accepted where every member has it")
	}
	if upgraded.refusals("no_hello") != 1 || upgraded.votes.Load() != before {
		t.Fatalf("no_hello refusals %d (want 1), votes %d (had %d)", upgraded.refusals("no_hello"), upgraded.votes.Load(), before)
	}
}

// Over mutual TLS (a CA shared by two clusters) the check runs inside the
// TLS connection: another cluster's node is refused, and an older
// release's, which closes the TLS connection on the hello, is dialed
// again without it.
func TestClusterCheckOverTLS(t *testing.T) {
	ca, err := testcerts.NewCA(t.TempDir(), "shared")
	if err != nil {
		t.Fatal(err)
	}
	pair, err := ca.IssuePair("node")
	if err != nil {
		t.Fatal(err)
	}
	pool, err := certpool.FromFile(ca.CertFile)
	if err != nil {
		t.Fatal(err)
	}
	server := &tls.Config{Certificates: []tls.Certificate{pair}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS13}
	client := &tls.Config{Certificates: []tls.Certificate{pair}, RootCAs: pool, MinVersion: tls.VersionTLS13}
	peer := func(id, history string, checked bool) *testPeer {
		return newTestPeerWithin(t, id, history, checked, 10*time.Second, server, client)
	}
	a1, a2, b2, older := peer("n1", "history-a", true), peer("n2", "history-a", true), peer("n2", "history-b", true), peer("n3", "history-a", false)
	if err := a1.vote(a2); err != nil {
		t.Fatalf("same cluster over TLS: %v", err)
	}
	if err := a1.vote(b2); !errors.Is(err, ErrOtherCluster) {
		t.Fatalf("another cluster over TLS: %v, want ErrOtherCluster", err)
	}
	if err := a1.vote(older); err != nil || older.votes.Load() != 1 {
		t.Fatalf("an older release over TLS: %v (its raft got %d requests)", err, older.votes.Load())
	}
}

// A connection that sends nothing holds up neither the accept loop nor
// a goroutine beyond the hello's deadline; a malformed hello is refused.
func TestClusterCheckBoundsWhatAPeerSends(t *testing.T) {
	p := newTestPeerWithin(t, "n1", "history-a", true, time.Second, nil, nil)
	q := newTestPeer(t, "n2", "history-a", true)

	silent, err := net.Dial("tcp", string(p.trans.LocalAddr()))
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	if err := q.vote(p); err != nil {
		t.Fatalf("a peer beside a silent connection: %v", err)
	}
	_ = silent.SetReadDeadline(time.Now().Add(20 * time.Second))
	if got, err := io.ReadAll(silent); err != nil || len(got) != 0 {
		t.Fatalf("the silent connection was not closed by the acceptor: read %q, %v", got, err)
	}

	for name, send := range map[string][]byte{
		"magic":   {helloMarker, 'X', 'L', 'Y', helloVersion, 0, 0, 0},
		"history": {helloMarker, 'R', 'L', 'Y', helloVersion, 0, fsm.MaxHistoryLen + 1},
		"node id": append(appendHello(nil, hello{history: "h"})[:8], fsm.MaxIDLen+1),
	} {
		c, err := net.Dial("tcp", string(p.trans.LocalAddr()))
		if err != nil {
			t.Fatal(err)
		}
		before := p.refusals("bad_hello")
		if _, err := c.Write(send); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
		got, err := io.ReadAll(c)
		_ = c.Close()
		if errors.Is(err, syscall.ECONNRESET) {
			err = nil // closed with the rest of what was sent unread
		}
		if err != nil || len(got) != 0 {
			t.Fatalf("%s: read %q, %v; want the connection closed unanswered", name, got, err)
		}
		if p.refusals("bad_hello") != before+1 {
			t.Fatalf("%s: not counted as a bad hello", name)
		}
	}
}

// What a dialer makes of answers other than a proper one.
func TestClusterCheckReadsTheAnswerWithCare(t *testing.T) {
	p := newTestPeer(t, "n1", "history-a", true)
	for _, tc := range []struct {
		name   string
		answer []byte
		hangUp bool // after the answer
		want   error
	}{
		{"wrong history, accepted", appendHello(nil, hello{history: "history-b", nodeID: "x"}), false, ErrOtherCluster},
		{"unknown status", appendHello(nil, hello{status: 7, history: "history-a"}), false, errBadHello},
		{"garbage", []byte("HTTP/1.1 400 Bad Request\r\n"), false, errBadHello},
		{"cut short", appendHello(nil, hello{history: "history-a"})[:7], true, io.ErrUnexpectedEOF},
		{"silence", nil, false, errTimeout},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			served := make(chan struct{})
			go func() {
				defer close(served)
				c, err := ln.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				_, _ = io.ReadFull(c, make([]byte, len(appendHello(nil, hello{history: "history-a", nodeID: "n1"}))))
				_, _ = c.Write(tc.answer)
				if !tc.hangUp {
					_, _ = io.Copy(io.Discard, c) // until the dialer hangs up
				}
			}()
			_, err = p.layer.Dial(raft.ServerAddress(ln.Addr().String()), 300*time.Millisecond)
			<-served
			if tc.want == errTimeout {
				var ne net.Error
				if !errors.As(err, &ne) || !ne.Timeout() {
					t.Fatalf("got %v, want a timeout", err)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
}

var errTimeout = errors.New("timeout")

// A hello of another version is answered with the version this node
// speaks, so that a later release can fall back to it. (The acceptor
// then drains what the dialer sent, for a moment, so that its close does
// not reset the connection before the answer is read; on loopback the
// answer is usually read first anyway, so this test cannot tell.)
func TestClusterCheckAnswersAnotherVersion(t *testing.T) {
	p := newTestPeer(t, "n1", "history-a", true)
	c, err := net.Dial("tcp", string(p.trans.LocalAddr()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	future := appendHello(nil, hello{history: "history-a", nodeID: "n9"})
	future[4] = helloVersion + 1
	future = append(future, make([]byte, 100)...) // what a later version might add
	if _, err := c.Write(future); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
	h, err := readHello(c, nil)
	if err != nil || h.status != helloUnsupported || h.nodeID != "n1" {
		t.Fatalf("answer %+v, %v; want helloUnsupported from n1", h, err)
	}
	if p.refusals("bad_hello") != 1 {
		t.Fatalf("bad_hello refusals %d, want 1", p.refusals("bad_hello"))
	}
}

// Refusals are all counted, but logged at most once a minute per reason
// and host (a foreign node retries from a new port each time), and at
// most maxWarnings times a minute in all; not_joined at info.
func TestClusterCheckWarnsSparingly(t *testing.T) {
	var buf bytes.Buffer // refuse logs on the caller's goroutine
	lines := func() []string { return strings.Split(strings.TrimSpace(buf.String()), "\n") }
	counted := 0
	c := &clusterCheck{log: slog.New(slog.NewTextHandler(&buf, nil)), refused: func(string) { counted++ }}
	err := errors.New("boom")
	c.refuse("other_cluster", "10.0.0.1:40001", err)
	c.refuse("other_cluster", "10.0.0.1:40002", err) // same host, new port
	c.refuse("bad_hello", "10.0.0.1:40003", err)
	c.refuse("not_joined", "10.0.0.2:40004", err)
	if got := lines(); len(got) != 3 || !strings.Contains(got[2], "level=INFO") || !strings.Contains(got[0], "level=WARN") {
		t.Fatalf("logged %q; want three lines, not_joined at info", got)
	}
	for i := range 2 * maxWarnings {
		c.refuse("bad_hello", fmt.Sprintf("10.1.0.%d:1", i), err)
	}
	// bad_hello's one line before and the flood's come to maxWarnings;
	// other_cluster's and not_joined's stay.
	if got := len(lines()); got != maxWarnings+2 {
		t.Fatalf("%d lines logged, want %d", got, maxWarnings+2)
	}
	// A flood of one kind does not silence another.
	c.refuse("other_cluster", "10.2.0.1:1", err)
	if got := lines(); len(got) != maxWarnings+3 || !strings.Contains(got[len(got)-1], "other_cluster") {
		t.Fatalf("after a bad_hello flood, another cluster's node was not warned about: %d lines", len(got))
	}
	if counted != 5+2*maxWarnings {
		t.Fatalf("%d refusals counted, want every one (%d)", counted, 5+2*maxWarnings)
	}
}

// Whoever reaches the Raft port can open connections and say nothing;
// only so many may wait in their hello at once. Beyond that the oldest
// is closed to make room, so silent connections cannot keep a member's
// new connection out: its hello takes a round trip. A connection leaves
// the list when its hello ends, so members' pooled connections never
// hold a place.
func TestClusterCheckBoundsConnectionsInTheHello(t *testing.T) {
	const limit = 4
	// A long hello timeout: a connection closed within the test's
	// deadlines was closed by the bound, not by the timeout.
	p := newTestPeerWithin(t, "n1", "history-a", true, 10*time.Minute, nil, nil)
	p.layer.greeting.SetLimit(limit)
	q := newTestPeer(t, "n2", "history-a", true)

	if err := q.vote(p); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the member's connection to leave the hello", func() bool { return p.layer.greeting.Len() == 0 })

	var silent []net.Conn
	dialSilent := func() net.Conn {
		c, err := net.Dial("tcp", string(p.trans.LocalAddr()))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		silent = append(silent, c)
		return c
	}
	for i := range limit {
		dialSilent()
		waitFor(t, "a silent connection to be accepted", func() bool { return p.layer.greeting.Len() == i+1 })
	}
	closedByTheEdge := func(c net.Conn, what string) {
		t.Helper()
		_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
		if got, err := io.ReadAll(c); (err != nil && !errors.Is(err, syscall.ECONNRESET)) || len(got) != 0 {
			t.Fatalf("%s: read %q, %v; want it closed", what, got, err)
		}
	}

	// One more: the oldest makes room.
	dialSilent()
	closedByTheEdge(silent[0], "the oldest silent connection, once the hello is full")
	waitFor(t, "the busy refusal to be counted", func() bool { return p.refusals("busy") == 1 })
	if n := p.layer.greeting.Len(); n != limit {
		t.Fatalf("%d connections in their hello, want %d", n, limit)
	}
	// The member's pooled connection still carries its votes, and a new
	// member's connection gets through a hello full of silent ones.
	if err := q.vote(p); err != nil {
		t.Fatalf("a member's vote while the hello is full: %v", err)
	}
	r := newTestPeer(t, "n3", "history-a", true)
	if err := r.vote(p); err != nil {
		t.Fatalf("a new member while the hello is full: %v", err)
	}
	closedByTheEdge(silent[1], "the next oldest, for the new member")

	for _, c := range silent {
		_ = c.Close()
	}
	waitFor(t, "the closed connections to leave the hello", func() bool { return p.layer.greeting.Len() == 0 })
}

// waitFor polls cond every 10ms for up to 30 s, and fails the test
// naming what it waited for. (clustertest.Eventually imports this
// package, so its internal tests cannot use it.)
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited 30s for %s", what)
		}
		<-tick.C
	}
}
