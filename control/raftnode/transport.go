package raftnode

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/hashicorp/raft"

	"github.com/edge-relay/relay/internal/oldest"
)

// streamLayer carries Raft's RPCs over TCP, optionally TLS. With TLS both
// sides present a certificate and verify the peer's against the cluster's
// CA, so only members can speak Raft.
//
// hashicorp/raft's NetworkTransport.Close stops the listener but leaves
// accepted connections (and their goroutines) open until the peer hangs
// up; the layer tracks them so that Close really stops everything.
type streamLayer struct {
	ln        net.Listener
	advertise net.Addr
	client    *tls.Config   // nil: plain TCP
	faults    *Faults       // nil outside fault tests
	check     *clusterCheck // nil: no hello sent or read (a node of an older release, in tests)

	// greeting lists the accepted connections still in their hello (with
	// TLS, their handshake too), oldest first, at most maxGreeting (tests
	// lower it).
	greeting *oldest.List[netip.Addr, *helloConn]

	mu     sync.Mutex // guards the fields below
	conns  map[*trackedConn]struct{}
	closed bool
}

var _ raft.StreamLayer = (*streamLayer)(nil)

func newStreamLayer(bind string, advertise net.Addr, server, client *tls.Config, faults *Faults, check *clusterCheck) (*streamLayer, error) {
	ln, err := net.Listen("tcp", bind)
	if err != nil {
		return nil, fmt.Errorf("listen for raft on %s: %w", bind, err)
	}
	if server != nil {
		ln = tls.NewListener(ln, server)
	}
	if advertise == nil {
		// A ":0" bind advertises the port the kernel chose.
		advertise = ln.Addr()
	}
	l := &streamLayer{ln: ln, advertise: advertise, client: client, faults: faults, check: check, conns: map[*trackedConn]struct{}{}}
	l.greeting = oldest.New[netip.Addr, *helloConn](maxGreeting, 0)
	faults.attach(l)
	return l, nil
}

// maxGreeting bounds the accepted connections still in their hello
// (with TLS, still in their handshake): whoever reaches the Raft port can
// open them, and each holds one of Raft's goroutines until the hello's
// deadline. A cluster's own traffic needs a few: members keep their
// connections pooled and open. Beyond the bound the oldest is closed,
// counted as busy: a member's hello takes a round trip, so a flood of
// silent connections cannot keep a member's new one out (refusing the
// newest instead would let 256 silent connections, renewed every hello
// timeout, refuse every vote and snapshot), and holds at most this many
// goroutines.
const maxGreeting = 256

func (s *streamLayer) Accept() (net.Conn, error) {
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return nil, err
		}
		if s.faults.isolated() {
			// A cut link: the peer sees its connection drop.
			_ = c.Close()
			continue
		}
		tc, err := s.track(c)
		if err != nil || s.check == nil {
			return tc, err
		}
		// The hello is read on the first Read, on Raft's goroutine for
		// this connection: a peer that sends nothing holds up only that
		// goroutine (until the hello's deadline), never the accept loop.
		hc := &helloConn{Conn: tc, check: s.check, greeting: s.greeting}
		var old *oldest.Entry[netip.Addr, *helloConn]
		hc.entry, old = s.greeting.Add(hc, netip.Addr{})
		if old != nil {
			s.check.refuse("busy", old.Value.RemoteAddr().String(), errBusy)
			_ = old.Value.Conn.Close() // its hello's read fails, on its own goroutine
		}
		return hc, nil
	}
}

// track registers a connection so that Close (and a fault test's Isolate)
// can close it.
func (s *streamLayer) track(c net.Conn) (net.Conn, error) {
	tc := &trackedConn{Conn: c, layer: s}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		_ = c.Close()
		return nil, net.ErrClosed
	}
	s.conns[tc] = struct{}{}
	return tc, nil
}

// cut closes every open connection, accepted and dialed.
func (s *streamLayer) cut() {
	s.mu.Lock()
	conns := s.conns
	s.conns = map[*trackedConn]struct{}{}
	s.mu.Unlock()
	for c := range conns {
		_ = c.Conn.Close()
	}
}

// Close stops the listener and closes every connection.
func (s *streamLayer) Close() error {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	err := s.ln.Close()
	s.cut()
	return err
}

func (s *streamLayer) Addr() net.Addr { return s.advertise }

// Dial connects to a peer and, unless the layer runs without the cluster
// check, greets it (see hello.go). A peer that closes the connection
// without answering runs an older release: it is dialed again and spoken
// to without a hello.
func (s *streamLayer) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	c, err := s.dial(address, timeout)
	if err != nil || s.check == nil {
		return c, err
	}
	switch err := s.check.greet(c, string(address), timeout); {
	case err == nil:
		return c, nil
	case errors.Is(err, errUnanswered):
		s.check.log.Debug("raft peer closed the connection without answering the cluster check; "+
			"speaking to it as to an older release", "peer", address)
		return s.dial(address, timeout)
	default:
		return nil, fmt.Errorf("dial raft peer %s: %w", address, err)
	}
}

// probe checks, before node id is added as a voter at address, that
// the node answering there is that one: it dials and greets it, and
// closes the connection. ErrPeerUnreachable when nothing answers within
// timeout; ErrWrongPeer when another node answers (a mistyped address, a
// loopback one that leads back here, a port of another cluster). A node
// of a release without the cluster check answers nothing to the greeting
// and passes as reachable. Added at an address where it does not answer,
// a voter counts in every majority from then on: in a cluster of one,
// the leader steps down and no node can be elected again.
//
// It reports noState when the node said it holds none of this cluster's
// state: it refused the greeting as one not joined (a node started to be
// added, with no Raft state), or it has no history where this node has
// one. A node of a release without the check, or a check that is off,
// says nothing of it (false).
func (s *streamLayer) probe(id, address string, timeout time.Duration) (noState bool, err error) {
	c, err := s.dial(raft.ServerAddress(address), timeout)
	if err != nil {
		return false, fmt.Errorf("%w (%s): %v", ErrPeerUnreachable, address, err)
	}
	defer c.Close()
	if s.check == nil {
		return false, nil
	}
	h, err := s.check.exchange(c, address, timeout)
	var mismatch *ClusterMismatchError
	switch {
	case errors.Is(err, errUnanswered):
		return false, nil
	case errors.As(err, &mismatch):
		return false, fmt.Errorf("%w: %v", ErrWrongPeer, err)
	case err != nil:
		return false, fmt.Errorf("%w (%s): %v", ErrPeerUnreachable, address, err)
	case h.nodeID != id:
		return false, fmt.Errorf("%w: %s answers as node %q, not %q", ErrWrongPeer, address, h.nodeID, id)
	}
	ours, _ := s.check.ours()
	return h.status == helloNotJoined || (h.history == "" && ours != ""), nil
}

func (s *streamLayer) dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	if s.faults.isolated() {
		return nil, fmt.Errorf("dial raft peer %s: %w", address, errIsolated)
	}
	d := &net.Dialer{Timeout: timeout}
	var (
		c   net.Conn
		err error
	)
	if s.client != nil {
		c, err = tls.DialWithDialer(d, "tcp", string(address), s.client)
	} else {
		c, err = d.Dial("tcp", string(address))
	}
	if err != nil {
		return nil, fmt.Errorf("dial raft peer %s: %w", address, err)
	}
	return s.track(c)
}

type trackedConn struct {
	net.Conn
	layer *streamLayer
	once  sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.layer.mu.Lock()
		delete(c.layer.conns, c)
		c.layer.mu.Unlock()
	})
	return c.Conn.Close()
}

// raftTransport is the transport a node hands to Raft: hashicorp/raft's
// NetworkTransport with two of its behaviours changed.
//
// Pipelined replication is off. hashicorp/raft's pipeline (v1.7.2, as in
// v1.8.0) can deadlock: when a follower refuses an append, the pipeline's
// decoder is left with nobody reading its results and the next send parks
// for ever, so that follower gets no more entries (its heartbeats keep
// coming, so it never calls an election) and the leader's Shutdown hangs
// (seen in CI: a node's stop never returned). Without the pipeline each follower has one
// AppendEntries in flight, carrying up to MaxAppendEntries entries.
//
// Heartbeats pass through a gate that Close shuts and drains. Raft handles
// a heartbeat on the transport's connection goroutine, not on its own,
// so Raft's Shutdown does not wait for one in flight; such a heartbeat
// can raise the term and write it to the log store after the node has
// closed that store, and Raft panics on the failed write
// (hashicorp/raft#717; seen in CI as "failed to save current term:
// raftlog: store is closed"). Close therefore waits for the heartbeats in
// flight, and refuses later ones, before the node closes its stores.
type raftTransport struct {
	*raft.NetworkTransport

	mu        sync.Mutex // guards closed and additions to heartbeats
	closed    bool
	heartbeat sync.WaitGroup // heartbeats being handled
}

func newRaftTransport(t *raft.NetworkTransport) *raftTransport {
	return &raftTransport{NetworkTransport: t}
}

// AppendEntriesPipeline refuses: raft then replicates with plain
// AppendEntries calls (and logs nothing for this error).
func (*raftTransport) AppendEntriesPipeline(raft.ServerID, raft.ServerAddress) (raft.AppendPipeline, error) {
	return nil, raft.ErrPipelineReplicationNotSupported
}

// SetHeartbeatHandler installs Raft's heartbeat handler behind the gate.
func (t *raftTransport) SetHeartbeatHandler(handle func(raft.RPC)) {
	if handle == nil {
		t.NetworkTransport.SetHeartbeatHandler(nil)
		return
	}
	t.NetworkTransport.SetHeartbeatHandler(t.gated(handle))
}

// gated wraps handle so that it runs only before Close, which waits for
// it; after Close a heartbeat is answered with ErrTransportShutdown.
func (t *raftTransport) gated(handle func(raft.RPC)) func(raft.RPC) {
	return func(rpc raft.RPC) {
		t.mu.Lock()
		if t.closed {
			t.mu.Unlock()
			rpc.Respond(nil, raft.ErrTransportShutdown)
			return
		}
		t.heartbeat.Add(1)
		t.mu.Unlock()
		defer t.heartbeat.Done()
		handle(rpc)
	}
}

// Close refuses new heartbeats, waits for those being handled, then
// closes the transport. Raft calls it itself at the end of Shutdown (the
// transport implements raft.WithClose), so the wait is over when
// Shutdown's future returns; later calls only close again, which
// NetworkTransport allows. The wait is short: Raft's heartbeat handler
// checks for shutdown first, and otherwise only takes locks, writes the
// term and notifies observers, none of which waits on Raft's stopped
// goroutines. (A blocking raft.Observer would break that; the node
// registers none.)
func (t *raftTransport) Close() error {
	t.mu.Lock()
	t.closed = true
	t.mu.Unlock()
	t.heartbeat.Wait()
	return t.NetworkTransport.Close()
}
