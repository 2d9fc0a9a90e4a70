package raftnode

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/internal/oldest"
)

// The cluster check: the first bytes on every Raft connection.
//
// hashicorp/raft's plain network transport carries no cluster identity:
// a node keeps dialing a member's address, and whatever listens there
// gets its AppendEntries and votes. When that address is taken over by a
// node of another cluster (a host reused, a port a restarted process got
// back, a cluster rebuilt from a backup beside the old one still
// running), the two clusters would mix their logs and terms. Mutual TLS
// with a cluster's own CA prevents it; a cluster without TLS relies on
// this check.
//
// The dialing node sends a hello naming its cluster (the state's history
// id, fsm.ReadHistory) and itself; the accepting node answers with its
// own. Each side refuses the connection when both histories are known
// and differ. A node with no history yet (a new node waiting to receive
// the state from its leader) accepts any, unless it joins (below). A
// bootstrapping node draws its history before Raft starts, so it never
// has none.
//
// Compatibility: the hello's first byte is one no Raft RPC starts with.
// A node of an older release reads it as an unknown RPC and closes the
// connection unanswered; the dialer then dials again without a hello.
// A connection that starts without a hello (from an older release) is
// accepted as long as some member of the configuration does not record
// fsm.FeatureRaftClusterCheck, and refused once every member does.
//
// Wire format, the same both ways (each length one byte, its string
// after it, at most 64 bytes each):
//
//	0xF0 'R' 'L' 'Y'  version (1)  status  len history  len node-id
//
// status is 0 from the dialer, or helloNewMember (below); in the answer
// 0 accepts, and helloOtherCluster and helloNotJoined refuse.
//
// A node started with neither --join nor --bootstrap, to be added by
// `relayctl cluster join`, has no history until its state arrives, and
// cannot tell being added from having been a voter that lost its data
// (a wiped disk, the same unit restarting it): taken back as the same
// voter with an empty log, it could elect a node that lacks entries
// committed with its vote. So it accepts only a dialer that vouches for
// it as a new member (helloNewMember): one whose state holds no record
// the node wrote itself (Node.features, features_withdrawn), which a node
// writes once it runs as a member. Others are refused (lost_data), and the
// node logs what to do: remove it, and add it again.
//
// A node that joins through the API (Config.Joining) with no state yet
// has no history either, and would take any cluster's traffic: one whose
// leader still dials the address it took over could get in before the
// cluster it joins. It therefore refuses every connection
// (helloNotJoined) until it has asked a member for the cluster's history
// (Node.ExpectHistory), and then speaks for that one.
const (
	helloMarker  = 0xF0 // hashicorp/raft's RPC types are 0 to 4
	helloVersion = 1
	helloHeader  = 6 // marker, "RLY", version, status

	helloAccepted     = 0
	helloOtherCluster = 1
	helloNotJoined    = 2
	// helloUnsupported answers a hello of a version this release does
	// not speak; the answer's own version byte says which it does, so
	// that a later release can fall back to it.
	helloUnsupported = 3
	// helloNewMember, from a dialer: its state records the node it dials
	// as a member that never ran (see above). Releases before it ignore
	// a dialer's status.
	helloNewMember = 4

	// maxHello is the longest hello: the header, two length bytes and
	// the two bounded strings.
	maxHello = helloHeader + 2 + fsm.MaxHistoryLen + fsm.MaxIDLen
)

// ErrOtherCluster is returned for a Raft connection to or from a node
// whose state belongs to another cluster (see ClusterMismatchError).
var ErrOtherCluster = errors.New("raft peer belongs to another cluster")

// errBadHello is a connection that starts like a hello but is not one
// this release reads.
var errBadHello = errors.New("malformed raft hello")

// errHelloVersion is a hello of another version than this release's.
var errHelloVersion = fmt.Errorf("%w: unsupported version", errBadHello)

// errNotJoined is a connection to a new node that has not yet learnt
// which cluster it joins.
var errNotJoined = errors.New("the node takes no raft traffic until its join names its cluster")

// errLostData is a connection to a node without state, started to be
// added as a member, from a member whose state says it ran before.
var errLostData = errors.New("this node's data dir holds no Raft state, and the cluster dials it as a member that ran before: " +
	"it lost its data, and taken back as the same voter it could elect a node that lacks committed entries; " +
	"remove it (relayctl cluster remove ID) and add it again (relayctl cluster join, or start it with --join)")

// errBusy is a connection closed in its hello to make room for a newer
// one: maxGreeting were in their hello at once.
var errBusy = errors.New("too many raft connections in the cluster check at once; the oldest was closed")

// errNoHello is a connection without a hello where every member sends one.
var errNoHello = errors.New("raft connection without the cluster check, and every member of this cluster sends it " +
	"(a node of an older release outside the cluster?)")

// ClusterMismatchError describes a refused peer: its address, node id
// and history, and this node's.
type ClusterMismatchError struct {
	Addr         string // the peer's address, as dialed or as seen
	PeerID       string // the node id the peer named
	PeerHistory  string
	LocalHistory string
}

func (e *ClusterMismatchError) Error() string {
	return fmt.Sprintf("raft peer %s at %s belongs to another cluster (its history %s, this node's %s): "+
		"the address is now another cluster's node, or one of the two was rebuilt from a backup",
		e.PeerID, e.Addr, e.PeerHistory, e.LocalHistory)
}

// Unwrap makes errors.Is(err, ErrOtherCluster) hold.
func (e *ClusterMismatchError) Unwrap() error { return ErrOtherCluster }

// hello is one side's message.
type hello struct {
	status  byte
	history string
	nodeID  string
}

// mismatch reports whether two known histories differ.
func mismatch(ours, theirs string) bool { return ours != "" && theirs != "" && ours != theirs }

// appendHello encodes h. Strings longer than the bounds are cut (they
// never are: the node id and history are validated where they are set).
func appendHello(b []byte, h hello) []byte {
	hist, id := h.history, h.nodeID
	if len(hist) > fsm.MaxHistoryLen {
		hist = hist[:fsm.MaxHistoryLen]
	}
	if len(id) > fsm.MaxIDLen {
		id = id[:fsm.MaxIDLen]
	}
	b = append(b, helloMarker, 'R', 'L', 'Y', helloVersion, h.status, byte(len(hist)))
	b = append(b, hist...)
	b = append(b, byte(len(id)))
	return append(b, id...)
}

// readHello reads one hello from r, whose first byte (the marker) the
// caller may already have read: first then holds it. It reads no more
// than the hello and allocates nothing sized by what the peer declares
// beyond the bounds.
//
// It returns io.EOF only when the peer closed before sending a byte; a
// hello cut short is io.ErrUnexpectedEOF.
func readHello(r io.Reader, first []byte) (hello, error) {
	h, err := readHelloParts(r, first)
	if errors.Is(err, io.EOF) && len(first) > 0 {
		err = io.ErrUnexpectedEOF
	}
	return h, err
}

func readHelloParts(r io.Reader, first []byte) (hello, error) {
	var buf [maxHello]byte
	n := copy(buf[:], first)
	if _, err := io.ReadFull(r, buf[n:helloHeader]); err != nil {
		return hello{}, err
	}
	if buf[0] != helloMarker || buf[1] != 'R' || buf[2] != 'L' || buf[3] != 'Y' {
		return hello{}, fmt.Errorf("%w: starts % x", errBadHello, buf[:4])
	}
	if buf[4] != helloVersion {
		return hello{}, fmt.Errorf("%w %d, this release speaks %d", errHelloVersion, buf[4], helloVersion)
	}
	h := hello{status: buf[5]}
	var err error
	if h.history, err = readField(r, "history", fsm.MaxHistoryLen); err != nil {
		return hello{}, err
	}
	if h.nodeID, err = readField(r, "node id", fsm.MaxIDLen); err != nil {
		return hello{}, err
	}
	return h, nil
}

// readField reads a length byte and that many bytes, at most limit.
func readField(r io.Reader, name string, limit int) (string, error) {
	var l [1]byte
	if _, err := io.ReadFull(r, l[:]); err != nil {
		return "", noEOF(err)
	}
	if int(l[0]) > limit {
		return "", fmt.Errorf("%w: %s of %d bytes, at most %d", errBadHello, name, l[0], limit)
	}
	var buf [255]byte
	if _, err := io.ReadFull(r, buf[:l[0]]); err != nil {
		return "", noEOF(err)
	}
	return string(buf[:l[0]]), nil
}

// noEOF turns the end of the stream within a hello into
// io.ErrUnexpectedEOF.
func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// errUnanswered is a peer that closed the connection without answering
// the hello: a node of an older release.
var errUnanswered = errors.New("raft peer closed the connection without answering the cluster check")

// helloRefused prefixes every error an accepted connection's hello ends
// it with, so that raft's own log line for it ("failed to decode incoming
// command") can be told apart: the check logs these itself.
const helloRefused = "raft cluster check: "

// clusterCheck is a node's side of the hello: who it is, and what it
// accepts.
type clusterCheck struct {
	nodeID  string
	history func() string // the node's history id now; "" while it has none
	timeout time.Duration // for the hello exchange, each way
	log     *slog.Logger
	refused func(reason string) // counts a refusal (metrics); may be nil

	// legacy reports whether a connection without a hello is accepted;
	// nil (before Raft runs) accepts.
	legacy atomic.Pointer[func() bool]
	// awaitJoin: a new node that joins through the API refuses every
	// connection until its join names the cluster (expected).
	awaitJoin bool
	// expected is what the node's join learnt of its cluster
	// (Node.ExpectHistory); nil until then.
	expected atomic.Pointer[expectation]
	// newMember reports whether this node's state records the member at
	// a Raft address as one that never ran (helloNewMember); nil: never.
	newMember func(addr string) bool
	// stateless reports whether the node holds no Raft state now (no
	// term, log or snapshot): a node started to be added that has not
	// been yet. nil: never. Not "no history": every member of a cluster
	// made by a release before histories has none, and runs.
	stateless func() bool

	mu           sync.Mutex           // guards the fields below
	warned       map[string]time.Time // reason and host -> last warning
	windowStart  time.Time
	windowWarned map[string]int // reason -> warnings since windowStart
}

// expectation is what a joining node learnt of the cluster it joins.
type expectation struct {
	history     string // spoken for while the state has none
	everyChecks bool   // every member records FeatureRaftClusterCheck
}

// warnEvery bounds the warnings about one kind of refusal from one
// host (a foreign node retries every few seconds), and maxWarnings
// those of one kind from all hosts, in each warnEvery: a flood of one
// kind (busy, bad_hello) does not hide the others.
const (
	warnEvery   = time.Minute
	maxWarnings = 20
)

// ours returns the history this node speaks for: its state's, or while
// that has none the one its join expects. waiting reports a joining
// node that has no expectation yet, which takes no traffic.
func (c *clusterCheck) ours() (history string, waiting bool) {
	if h := c.history(); h != "" {
		return h, false
	}
	if e := c.expected.Load(); e != nil {
		return e.history, false
	}
	return "", c.awaitJoin
}

func (c *clusterCheck) legacyAllowed() bool {
	f := c.legacy.Load()
	return f == nil || (*f)()
}

// refuse counts a refusal and logs it: at most once per warnEvery for
// the same reason and peer host (an accepted connection's port changes
// with each), and at most maxWarnings times per warnEvery for each
// reason, so that whoever reaches the Raft port cannot flood the log. not_joined is
// logged at info: a member that rejoins with an empty data dir is
// dialed by its leader before its join has named the cluster.
func (c *clusterCheck) refuse(reason, addr string, err error) {
	if c.refused != nil {
		c.refused(reason)
	}
	host := addr
	if h, _, err := net.SplitHostPort(addr); err == nil {
		host = h
	}
	key := reason + " " + host
	now := time.Now()
	c.mu.Lock()
	if c.windowWarned == nil || now.Sub(c.windowStart) >= warnEvery {
		c.windowStart, c.windowWarned = now, map[string]int{} // keys: the few reasons
	}
	last, seen := c.warned[key]
	quiet := (seen && now.Sub(last) < warnEvery) || c.windowWarned[reason] >= maxWarnings
	if !quiet {
		if c.warned == nil || len(c.warned) >= 1024 {
			c.warned = map[string]time.Time{} // bounded: forgetting only repeats a warning
		}
		c.warned[key] = now
		c.windowWarned[reason]++
	}
	c.mu.Unlock()
	if quiet {
		return
	}
	level := slog.LevelWarn
	if reason == "not_joined" {
		level = slog.LevelInfo
	}
	c.log.Log(context.Background(), level, "refused a raft connection", "peer", addr, "reason", reason, "err", err)
}

// greet sends the dialer's hello on c and reads the answer, within
// timeout. It closes c unless the peer accepted.
func (c *clusterCheck) greet(conn net.Conn, addr string, timeout time.Duration) (err error) {
	defer func() {
		if err != nil {
			_ = conn.Close()
		}
	}()
	h, err := c.exchange(conn, addr, timeout)
	if err != nil {
		return err
	}
	if h.status == helloNotJoined {
		return fmt.Errorf("raft peer %s at %s: %w", h.nodeID, addr, errNotJoined)
	}
	if h.status == helloUnsupported {
		return fmt.Errorf("%w: raft peer %s at %s speaks another version", errHelloVersion, h.nodeID, addr)
	}
	if h.status != helloAccepted {
		return fmt.Errorf("%w: answer status %d", errBadHello, h.status)
	}
	return conn.SetDeadline(time.Time{})
}

// exchange sends the dialer's hello on conn and reads the answer, with
// timeout as conn's deadline: errUnanswered when the peer closed without
// a byte (an older release), a *ClusterMismatchError when it speaks for
// another cluster.
func (c *clusterCheck) exchange(conn net.Conn, addr string, timeout time.Duration) (hello, error) {
	ours, _ := c.ours()
	if err := conn.SetDeadline(time.Now().Add(timeout)); err != nil {
		return hello{}, err
	}
	var status byte
	if c.newMember != nil && c.newMember(addr) {
		status = helloNewMember
	}
	if _, err := conn.Write(appendHello(nil, hello{status: status, history: ours, nodeID: c.nodeID})); err != nil {
		return hello{}, fmt.Errorf("send raft hello: %w", err)
	}
	h, err := readHello(conn, nil)
	switch {
	case errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET):
		// Closed before a single byte came back: an older release,
		// whose transport reads the hello as an unknown RPC.
		return hello{}, errUnanswered
	case err != nil:
		return hello{}, fmt.Errorf("read raft hello answer: %w", err)
	}
	if h.status == helloOtherCluster || mismatch(ours, h.history) {
		err := &ClusterMismatchError{Addr: addr, PeerID: h.nodeID, PeerHistory: h.history, LocalHistory: ours}
		c.refuse("other_cluster", addr, err)
		return hello{}, err
	}
	return h, nil
}

// helloConn is an accepted connection whose first Read (or Write) reads
// the peer's hello and answers it.
type helloConn struct {
	net.Conn
	check   *clusterCheck
	once    sync.Once
	err     error  // why the connection was refused; set once
	pending []byte // a first byte that was no hello, still to be read

	greeting *oldest.List[netip.Addr, *helloConn]  // the layer's connections in their hello
	entry    *oldest.Entry[netip.Addr, *helloConn] // this one's place on it
}

// leave takes the connection off its layer's list of those in their
// hello: when its hello ends either way, or when it is closed before.
func (c *helloConn) leave() { c.greeting.Remove(c.entry) }

// Close closes the connection; one closed before its hello ends leaves
// the greeting list.
func (c *helloConn) Close() error {
	c.leave()
	return c.Conn.Close()
}

func (c *helloConn) Read(p []byte) (int, error) {
	c.once.Do(c.handshake)
	if c.err != nil {
		return 0, c.err
	}
	if len(c.pending) > 0 {
		n := copy(p, c.pending)
		c.pending = c.pending[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

func (c *helloConn) Write(p []byte) (int, error) {
	c.once.Do(c.handshake)
	if c.err != nil {
		return 0, c.err
	}
	return c.Conn.Write(p)
}

func (c *helloConn) handshake() {
	defer c.leave()
	addr := c.Conn.RemoteAddr().String()
	// fail ends the connection: counted and logged as a refusal when
	// reason is set, after answering status (unless noAnswer: the peer
	// sent no hello to answer) so that the dialer can say why.
	const noAnswer = helloAccepted
	fail := func(reason string, err error, status byte) {
		if reason != "" {
			c.check.refuse(reason, addr, err)
		} else {
			c.check.log.Debug("raft connection ended during the cluster check", "peer", addr, "err", err)
		}
		if status != noAnswer {
			ours, _ := c.check.ours()
			_, _ = c.Conn.Write(appendHello(nil, hello{status: status, history: ours, nodeID: c.check.nodeID}))
		}
		if status == helloUnsupported {
			_ = c.Conn.SetReadDeadline(time.Now().Add(time.Second))
			_, _ = io.CopyN(io.Discard, c.Conn, 4<<10)
		}
		c.err = fmt.Errorf("%s%w", helloRefused, err)
		_ = c.Conn.Close()
	}
	if err := c.Conn.SetDeadline(time.Now().Add(c.check.timeout)); err != nil {
		fail("", err, noAnswer)
		return
	}
	var first [1]byte
	if _, err := io.ReadFull(c.Conn, first[:]); err != nil {
		fail("", err, noAnswer)
		return
	}
	ours, waiting := c.check.ours()
	if first[0] != helloMarker {
		if waiting {
			fail("not_joined", errNotJoined, noAnswer)
			return
		}
		if !c.check.legacyAllowed() {
			fail("no_hello", errNoHello, noAnswer)
			return
		}
		c.pending = []byte{first[0]}
	} else {
		h, err := readHello(c.Conn, first[:])
		if errors.Is(err, errHelloVersion) {
			// Say which version this node speaks; the rest of that
			// hello is not read, so wait (briefly) for the dialer to
			// hang up before closing, or the close would reset the
			// connection and lose the answer.
			fail("bad_hello", err, helloUnsupported)
			return
		} else if errors.Is(err, errBadHello) {
			fail("bad_hello", err, noAnswer)
			return
		} else if err != nil {
			fail("", err, noAnswer)
			return
		}
		if waiting {
			fail("not_joined", errNotJoined, helloNotJoined)
			return
		}
		if ours == "" && !c.check.awaitJoin && h.status != helloNewMember && c.check.stateless != nil && c.check.stateless() {
			// Started to be added (neither --join nor --bootstrap), no
			// state, and the dialer's cluster says this node ran before.
			fail("lost_data", errLostData, helloNotJoined)
			return
		}
		if mismatch(ours, h.history) {
			fail("other_cluster", &ClusterMismatchError{Addr: addr, PeerID: h.nodeID, PeerHistory: h.history, LocalHistory: ours}, helloOtherCluster)
			return
		}
		if _, err := c.Conn.Write(appendHello(nil, hello{status: helloAccepted, history: ours, nodeID: c.check.nodeID})); err != nil {
			fail("", err, noAnswer)
			return
		}
	}
	if err := c.Conn.SetDeadline(time.Time{}); err != nil {
		fail("", err, noAnswer)
	}
}
