// Package raftnode runs one member of the control plane's Raft group: it
// wires hashicorp/raft to the Pebble log store (storage/raftlog), the state
// machine (control/fsm) and a TCP or TLS transport, and gives the API layer
// what it needs: writes that reach the leader from any node, linearizable
// and stale reads, membership changes, backups and a clean shutdown.
//
// See DESIGN.md in this directory for the read and write paths.
package raftnode

import (
	"cmp"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/internal/dirsync"
	"github.com/edge-relay/relay/internal/jitter"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
	"github.com/edge-relay/relay/storage/raftlog"
	"github.com/edge-relay/relay/storage/state"
)

// Errors a caller branches on.
var (
	// ErrNotLeader: the operation needs the leader and this node is not it.
	ErrNotLeader = errors.New("not the leader")
	// ErrNoLeader: no leader is known right now (election in progress or
	// no quorum). Retrying later may succeed.
	ErrNoLeader = errors.New("no leader known")
	// ErrUnknownOutcome: a write may or may not have been committed (the
	// leader changed or the request timed out mid-flight). Retrying the
	// same command with the same request id is safe.
	ErrUnknownOutcome = errors.New("outcome unknown")
	// ErrShutdown: the node is shutting down.
	ErrShutdown = errors.New("node is shutting down")
	// ErrPeerUnreachable: a voter to be added does not answer at its Raft
	// address (nothing listens there, or a firewall is in the way).
	// Nothing was changed; retrying once it answers may succeed.
	ErrPeerUnreachable = errors.New("nothing answers at the Raft address")
	// ErrWrongPeer: what answers at the Raft address of a voter to be
	// added is another node, or another cluster's. Nothing was changed.
	ErrWrongPeer = errors.New("the Raft address answers as another node")
	// ErrVoterMoveWithoutState: AddVoter was asked to move a voter to
	// another Raft address where its node answers without this cluster's
	// state (its data lost: taken back as the same voter, it would vote
	// with an empty log). Nothing was changed: remove the voter first,
	// then add it.
	ErrVoterMoveWithoutState = errors.New("the voter's node answers at its new address without the cluster's state")
	// ErrNotMember is returned for a membership change or a leadership
	// transfer that names a server the configuration does not hold.
	ErrNotMember = errors.New("not a member of the cluster")
	// ErrRemoved: the leader refused this node's forwarded write or read
	// index because the node is not in the cluster's configuration any
	// more (it was removed). Retrying does not help.
	ErrRemoved = errors.New("this node is no longer a member of the cluster")
	// ErrClockSkew: the leader refused a command whose time (its
	// proposer's clock: proposed_at_ms) is more than MaxProposalSkew from
	// its own. Apply decides expiry by that time (refresh tokens, login
	// records, mailboxes): one node with its clock far ahead would expire
	// on every replica what is still valid, one far behind would keep
	// honouring what expired. Nothing was proposed; the proposing node's
	// clock needs fixing (NTP), and another node can take the call.
	ErrClockSkew = errors.New("the proposing node's clock is too far from the leader's")
	// ErrStateAhead: the data dir's state store has applied entries but
	// there is no Raft data beside it (it was removed without the state
	// store). Raft would start a log the state store takes as applied
	// already, and the node would diverge from its peers, so it does not
	// start.
	ErrStateAhead = errors.New("state store is ahead of the raft data")
	// ErrRaftDataLost: the data dir holds Raft snapshots (or a log) but
	// no term: its raft/ dir, the log and the stable store with the term
	// and vote, was lost. Started so, the node would be a voter with no
	// memory of the votes it cast or of the entries it acknowledged, and
	// could elect a candidate that lacks committed entries, so it does
	// not start.
	ErrRaftDataLost = errors.New("the raft log and term are lost")
	// ErrNotInitialized: a voter may join only once the cluster is
	// initialized (its first leader does so as it takes office), so that
	// every member speaks for the history the first node drew. Retrying
	// shortly succeeds.
	ErrNotInitialized = errors.New("the cluster is not initialized yet")
)

// Tuning holds Raft timing and log compaction settings. Zero values take
// hashicorp/raft's defaults, except where noted.
type Tuning struct {
	HeartbeatTimeout   time.Duration
	ElectionTimeout    time.Duration
	LeaderLeaseTimeout time.Duration
	CommitTimeout      time.Duration
	// SnapshotInterval is how often Raft checks whether to snapshot.
	SnapshotInterval time.Duration
	// SnapshotThreshold is how many new entries trigger a snapshot.
	SnapshotThreshold uint64
	// TrailingLogs is how many entries stay in the log after a snapshot.
	TrailingLogs uint64
	// MaxAppendEntries caps entries per AppendEntries RPC (and per batch
	// handed to the FSM).
	MaxAppendEntries int
	// MaxUnappliedBytes bounds the bytes of committed entries Raft has
	// handed a follower's state machine and it has not applied yet:
	// beyond it, the follower stores no more Raft entries until the state
	// machine catches up (applyGate) [DefaultMaxUnappliedBytes].
	MaxUnappliedBytes uint64
	// NoBatchApply turns off raft's BatchApplyCh: each Apply then goes
	// through the leader loop on its own. Only benchmarks want this.
	NoBatchApply bool
	// ForwardTimeout bounds one attempt to forward a write or a read
	// index request to the leader, within the caller's deadline: a leader
	// that stopped answering (a paused process) costs one attempt, after
	// which the node retries with whoever leads by then. Default 5s.
	ForwardTimeout time.Duration
	// LeaderWait bounds how long a write or a linearizable read waits,
	// within the caller's deadline, while the node knows no leader: a
	// node cut off from the majority then answers Unavailable (which
	// clients retry elsewhere) instead of holding the call until the
	// caller gives up. An election takes a few heartbeat timeouts, well
	// below it. A linearizable read also gives up when this node applies
	// nothing for this long while it waits for the read index it got (a
	// follower cut off right after). Default 5s.
	LeaderWait time.Duration
	// RemovedAfter is how long a node that holds Raft data and knows no
	// leader must find itself outside its cluster (outsideCluster: a
	// member that knows a leader, and has committed all this node's log,
	// lists the cluster without it) before it reports that it was removed
	// (Removed, an error in its log). Default 30s.
	RemovedAfter time.Duration
}

// PeerClient is what a node needs from another control node: the
// PeerService of the leader. The API layer provides it (a Connect client).
type PeerClient interface {
	// Apply proposes an encoded command on the node at apiAddr.
	Apply(ctx context.Context, apiAddr string, cmd []byte) (result []byte, err error)
	// ReadIndex asks the node at apiAddr for its read index.
	ReadIndex(ctx context.Context, apiAddr string) (uint64, error)
	// Members asks the node at apiAddr who leads, how far it committed,
	// and which members its configuration lists.
	Members(ctx context.Context, apiAddr string) (PeerView, error)
}

// PeerView is another node's view of the cluster (PeerClient.Members).
type PeerView struct {
	LeaderID    string // empty: it knows no leader
	CommitIndex uint64
	Members     []string
}

// Config configures a Node.
type Config struct {
	// NodeID is this member's stable id. Required.
	NodeID string
	// DataDir holds the Raft log, snapshots and the state store. Required.
	DataDir string
	// RaftBind is the TCP address Raft listens on. Required.
	RaftBind string
	// RaftAdvertise is the address other members dial; default: the bound
	// address (RaftBind with its port resolved).
	RaftAdvertise string
	// APIAdvertise is the address of this node's Connect API, recorded in
	// the replicated state so followers can forward to the leader.
	// Required.
	APIAdvertise string
	// Features are recorded with the node's addresses: what it can apply
	// (MembersWithout). Nil: this release's, fsm.Features(); tests set
	// another list to stand for a node of an older release. Without
	// fsm.FeatureRaftClusterCheck the node's Raft transport also speaks
	// as an older release's did: no hello sent, none read.
	Features []string
	// Joining says that the node, when its data dir holds no Raft state,
	// joins a cluster through a member's API (the server's --join). Its
	// Raft transport then refuses every connection until ExpectHistory
	// names the cluster it joins, so that no other cluster's leader
	// (one still dialing an address this node took over) gets in first.
	Joining bool
	// Bootstrap starts a new single-voter cluster when the data dir is
	// empty. Ignored when the node has state already.
	Bootstrap bool
	// RestoreFrom is a backup file to seed a new cluster from (implies
	// Bootstrap; the data dir must be empty).
	RestoreFrom string
	// OpenBackup opens RestoreFrom and returns its plaintext state export
	// (control/backup.OpenFile decrypts an encrypted backup); default
	// os.Open. It is called once, to import the export; the first Raft
	// snapshot is written from the imported state.
	OpenBackup func(path string) (io.ReadCloser, error)
	// TLSServer / TLSClient enable TLS for Raft; both or neither.
	TLSServer, TLSClient *tls.Config
	// Peers reaches other nodes' PeerService. Required for followers to
	// forward writes and reads.
	Peers PeerClient
	// Logger; default slog.Default().
	Logger *slog.Logger
	// SlowThreshold: applies and reads slower than this are logged.
	// Default 100ms.
	SlowThreshold time.Duration
	// ApplyTimeout bounds a write when the context has no deadline.
	// Default 10s.
	ApplyTimeout time.Duration

	// Metrics registers the node's metrics; nil disables them.
	Metrics prometheus.Registerer
	// FSM tunes the state machine (retention windows).
	FSM fsm.Config
	// Raft tunes Raft.
	Raft Tuning
	// OnLeader, if set, runs on this node for as long as it leads, each
	// time it becomes leader, once the leader can serve reads. Its context
	// ends when leadership is lost or the node stops; it must return then.
	// Work only the leader should do (expiring leases, rotating keys,
	// initializing a new cluster) goes here.
	OnLeader func(ctx context.Context)
	// Tracer traces writes and read barriers; default: no tracing.
	Tracer trace.Tracer
	// Faults, if set, lets a test cut this node's Raft traffic, fail its
	// writes or fail its restore (see Faults). Nil in production.
	Faults *Faults
}

func (c *Config) applyDefaults() error {
	if err := fsm.ValidateID("node id", c.NodeID); err != nil {
		return fmt.Errorf("raftnode: %w", err)
	}
	if c.DataDir == "" {
		return errors.New("raftnode: Config.DataDir is required")
	}
	if c.RaftBind == "" {
		return errors.New("raftnode: Config.RaftBind is required")
	}
	if c.RaftAdvertise == "" && EveryInterface(c.RaftBind) {
		// The bind is advertised, and every interface is no address
		// another node can dial: [::]:port leads back to the dialer.
		return fmt.Errorf("raftnode: Config.RaftBind %q is every interface: set RaftAdvertise", c.RaftBind)
	}
	if c.Features == nil {
		c.Features = fsm.Features()
	}
	if c.APIAdvertise == "" {
		return errors.New("raftnode: Config.APIAdvertise is required")
	}
	if (c.TLSServer == nil) != (c.TLSClient == nil) {
		return errors.New("raftnode: TLSServer and TLSClient go together")
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.SlowThreshold <= 0 {
		c.SlowThreshold = 100 * time.Millisecond
	}
	if c.ApplyTimeout <= 0 {
		c.ApplyTimeout = 10 * time.Second
	}
	if c.Raft.ForwardTimeout <= 0 {
		c.Raft.ForwardTimeout = 5 * time.Second
	}
	if c.Raft.LeaderWait <= 0 {
		c.Raft.LeaderWait = 5 * time.Second
	}
	if c.Raft.RemovedAfter <= 0 {
		c.Raft.RemovedAfter = 30 * time.Second
	}
	if c.Raft.MaxUnappliedBytes == 0 {
		c.Raft.MaxUnappliedBytes = DefaultMaxUnappliedBytes
	}
	if c.RestoreFrom != "" {
		c.Bootstrap = true
	}
	if c.Tracer == nil {
		c.Tracer = noop.NewTracerProvider().Tracer("")
	}
	return nil
}

// leadership is this node's current leader term, if it leads.
type leadership struct {
	term  uint64
	ready chan struct{}   // closed once an entry of this term committed
	ended <-chan struct{} // closed once this term's leadership is over
}

// Node is one running control-plane member.
type Node struct {
	cfg   Config
	log   *slog.Logger
	raft  *raft.Raft
	fsm   *fsm.FSM
	logs  *raftlog.Store
	gate  *applyGate // in front of logs for Raft
	state *state.Store
	trans *raftTransport
	layer *streamLayer  // trans's connections (AddVoter's probe dials through it)
	check *clusterCheck // nil: the transport runs without the cluster check (Config.Features)
	snaps *raft.FileSnapshotStore
	m     *metrics

	notifyCh chan bool // Raft's leadership notifications

	lead     atomic.Pointer[leadership] // nil when not leader
	ready    atomic.Bool                // caught up with the leader at start
	removed  atomic.Bool                // outside its cluster (catchUp, outsideCluster)
	shutdown atomic.Bool

	// Raft never answers an apply future still queued in its (buffered)
	// apply channel when it shuts down (hashicorp/raft#498), so its
	// caller would wait forever. stop therefore lets the applies in
	// flight finish, while Raft still runs, before shutting Raft down.
	// stop sets shutdown under applyMu, so no apply is added after it.
	applyMu sync.Mutex     // orders setting shutdown with additions to applies
	applies sync.WaitGroup // ApplyLocal calls waiting on Raft
	// raftDown is closed once Raft has shut down: an apply still waiting
	// then (a drain that ran out of time) gets ErrShutdown instead of
	// waiting forever, and with it the node's own goroutines that stop
	// waits for.
	raftDown chan struct{}

	ctx    context.Context // cancelled by Shutdown; owns the goroutines below
	cancel context.CancelFunc
	wg     sync.WaitGroup

	// registerSelf runs under its own context, so that a graceful stop
	// can end it before withdrawing the node's features.
	regCancel context.CancelFunc
	regDone   chan struct{}

	// membership orders the leader's changes of members with their
	// records (AddVoter, RemoveServer, reconcileNodes): a record written
	// for a voter about to be added must not be taken for one that left.
	membership sync.Mutex

	withdrawOnce sync.Once
	// afterWithdraw, when set (by tests only, before the stop), runs
	// after each withdrawal attempt has committed and settled, before the
	// node checks its record: a test can land a late registration there.
	afterWithdraw func(attempt int)
	closeOnce     sync.Once
	closeErr      error
}

// HasRaftData reports whether dataDir holds a node's Raft store (its log
// store's directory), without opening it. Whether the store holds a
// cluster's state is HasRaftState's question.
func HasRaftData(dataDir string) (bool, error) {
	_, err := os.Stat(filepath.Join(dataDir, "raft"))
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, os.ErrNotExist):
		return false, nil
	}
	return false, fmt.Errorf("read data dir: %w", err)
}

// HasRaftState reports whether dataDir holds a node's Raft state: a
// term, log entries or a snapshot (raft.HasExistingState), what a node
// that bootstrapped, joined or was restored has. The Raft store a start
// creates before its join is accepted holds none: a node stopped while
// it waited (its join refused until an operator removes its old self, or
// the process restarted) decides again at its next start whether it
// founds a cluster or joins one. It opens the stores, so no node may run
// on dataDir.
func HasRaftState(dataDir string) (bool, error) {
	if has, err := HasRaftData(dataDir); err != nil || !has {
		return false, err
	}
	quiet := slog.New(slog.DiscardHandler)
	logs, err := raftlog.Open(raftlog.Config{Dir: filepath.Join(dataDir, "raft"), Logger: quiet})
	if err != nil {
		return false, err
	}
	defer logs.Close()
	snaps, err := raft.NewFileSnapshotStoreWithLogger(dataDir, 2, newHCLogger(quiet, "snapshots"))
	if err != nil {
		return false, fmt.Errorf("open snapshot store in %s: %w", dataDir, err)
	}
	has, err := raft.HasExistingState(logs, logs, snaps)
	if err != nil {
		return false, fmt.Errorf("inspect raft state in %s: %w", dataDir, err)
	}
	return has, nil
}

// Open starts the node. It returns once Raft runs; the node may not have
// a leader yet (see Ready).
func Open(ctx context.Context, cfg Config) (_ *Node, err error) {
	if err := cfg.applyDefaults(); err != nil {
		return nil, err
	}
	log := cfg.Logger.With("node", cfg.NodeID)
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("create data dir %s: %w", cfg.DataDir, err)
	}
	n := &Node{cfg: cfg, log: log, notifyCh: make(chan bool, 16), raftDown: make(chan struct{})}
	defer func() {
		if err != nil {
			n.closeStores()
		}
	}()

	n.logs, err = raftlog.Open(raftlog.Config{Dir: filepath.Join(cfg.DataDir, "raft"), Logger: log})
	if err != nil {
		return nil, err
	}
	n.state, err = state.Open(state.Config{Dir: filepath.Join(cfg.DataDir, "state"), Logger: log})
	if err != nil {
		return nil, err
	}
	n.m = newMetrics(cfg.Metrics, n)
	n.snaps, err = raft.NewFileSnapshotStoreWithLogger(cfg.DataDir, 2, newHCLogger(log, "snapshots"))
	if err != nil {
		return nil, fmt.Errorf("open snapshot store in %s: %w", cfg.DataDir, err)
	}

	hasState, err := raft.HasExistingState(n.logs, n.logs, n.snaps)
	if err != nil {
		return nil, fmt.Errorf("inspect raft state: %w", err)
	}
	// The new cluster's identity from the first moment, for the cluster
	// check (hello.go), is in the state before the transport listens:
	// until then the check reads no history and accepts anyone, and
	// another cluster's leader dialing this address (a reused host or
	// port) would have replicated its own state here the moment Raft
	// started. InitCluster, proposed once this node leads, records the
	// same id for every member (the server takes it from the state).
	var restoredIndex uint64
	restoring := false // the state holds a backup without its Raft snapshot yet
	if cfg.RestoreFrom != "" {
		if hasState {
			return nil, fmt.Errorf("restore from %s: data dir %s already holds a cluster's state; restore needs an empty one "+
				"(if this node was restored before, start it without --restore / RELAY_RESTORE: emptying the directory loses what was written since)", cfg.RestoreFrom, cfg.DataDir)
		}
		// The backup holds its source cluster's history, which the
		// check would take for this node's while it is there, letting
		// that cluster's leader in (restoring where one of its members
		// was is the usual case): import it and draw the new history
		// before anyone can connect.
		if restoredIndex, err = n.importBackup(cfg.RestoreFrom); err != nil {
			return nil, err
		}
		restoring = true
		defer func() {
			if err != nil && restoring {
				err = n.dropImport(err)
			}
		}()
	} else if cfg.Bootstrap && !hasState {
		if err := fsm.SetHistory(n.state, fsm.NewHistoryID()); err != nil {
			return nil, fmt.Errorf("bootstrap cluster: %w", err)
		}
	}
	n.trans, err = n.newTransport(cfg.Joining && !cfg.Bootstrap && !hasState)
	if err != nil {
		return nil, err
	}
	local := raft.ServerAddress(n.trans.LocalAddr())
	if restoring {
		if err := n.snapshotBackup(cfg.RestoreFrom, restoredIndex, local); err != nil {
			return nil, err
		}
		restoring, hasState = false, true
	}
	fcfg := cfg.FSM
	fcfg.Store, fcfg.Logger = n.state, log
	fcfg.OnSnapshot = n.m.observeSnapshot
	fcfg.OnApply = n.m.observeApply
	if observe := cfg.FSM.OnApply; observe != nil {
		fcfg.OnApply = func(took time.Duration, entries int) {
			n.m.observeApply(took, entries)
			observe(took, entries)
		}
	}
	fcfg.OnRestore = n.m.observeRestore
	fcfg.OnFeatureIgnored = n.m.observeIgnored
	if n.fsm, err = fsm.New(fcfg); err != nil {
		return nil, err
	}
	if err := n.checkStateBehindRaft(hasState); err != nil {
		return nil, err
	}
	if !hasState && !cfg.Bootstrap {
		// Nothing applied (checkStateBehindRaft saw to that), but a
		// bootstrap that failed before Raft started may have left its
		// history: a node that joins now speaks for its new cluster's.
		if err := fsm.ClearHistory(n.state); err != nil {
			return nil, err
		}
	}
	if err := n.catchUpWithSnapshot(); err != nil {
		return nil, err
	}
	if err := n.dropLogsBehindSnapshot(); err != nil {
		return nil, err
	}

	rc := n.raftConfig()
	n.gate = newApplyGate(cfg.Raft.MaxUnappliedBytes, log)
	n.raft, err = raft.NewRaft(rc, n.fsm, gatedLogs{Store: n.logs, gate: n.gate}, n.logs, n.snaps, n.trans)
	if err != nil {
		return nil, fmt.Errorf("start raft: %w", err)
	}
	n.gate.start(n.raft, n.fsm)
	n.ctx, n.cancel = context.WithCancel(context.Background())
	if n.check != nil {
		legacy := n.acceptsNoHello
		n.check.legacy.Store(&legacy)
	}

	if cfg.Bootstrap && !hasState {
		f := n.raft.BootstrapCluster(raft.Configuration{Servers: []raft.Server{{
			ID: raft.ServerID(cfg.NodeID), Address: local, Suffrage: raft.Voter,
		}}})
		if err := f.Error(); err != nil && !errors.Is(err, raft.ErrCantBootstrap) {
			_ = n.Shutdown(ctx)
			return nil, fmt.Errorf("bootstrap cluster: %w", err)
		}
		log.Info("bootstrapped a new cluster", "raft_addr", local)
	} else if cfg.Bootstrap && cfg.RestoreFrom == "" {
		log.Info("data dir holds state; --bootstrap ignored")
	}

	n.wg.Add(3)
	regCtx, regCancel := context.WithCancel(n.ctx)
	n.regCancel, n.regDone = regCancel, make(chan struct{})
	go n.watchLeadership(n.notifyCh)
	go n.registerSelf(regCtx)
	go n.catchUp()
	log.Info("control node started", "raft_addr", local, "api_addr", cfg.APIAdvertise,
		"applied_index", n.fsm.AppliedIndex())
	return n, nil
}

// acceptsNoHello reports whether a Raft connection without the cluster
// check is accepted: while some member of the configuration does not
// record fsm.FeatureRaftClusterCheck (a rolling upgrade from a release
// without it), while the node knows no configuration yet (a new node
// waiting for its leader, which may run the older release; unless its
// join found every member with the check, ExpectHistory), or when the
// members cannot be read.
func (n *Node) acceptsNoHello() bool {
	servers, err := n.servers()
	if err != nil {
		return true
	}
	if len(servers) == 0 {
		// A joining node knows its cluster's members from its join.
		e := n.check.expected.Load()
		return e == nil || !e.everyChecks
	}
	missing, err := n.onlyMembersWithout(servers, fsm.FeatureRaftClusterCheck)
	return err != nil || len(missing) > 0
}

// raftNetTimeout bounds a Raft RPC's I/O, and each way of the cluster
// check's hello.
const raftNetTimeout = 10 * time.Second

// ExpectHistory names the history (fsm.ReadHistory) of the cluster the
// node joins, as a member reported it (ClusterService.Status), before it
// asks to be added: until the node has state of its own, its Raft
// transport takes traffic only from nodes of that cluster (and from
// nodes whose history is unknown). An empty history (a member of an
// older release, or one with no state) accepts any. It ends the refusal
// that Config.Joining starts with. everyMemberChecks says that every
// member the cluster lists records fsm.FeatureRaftClusterCheck: then,
// until its configuration arrives, the node also refuses connections
// without the check (only a node of an older release, which the cluster
// does not have, sends those). A history longer than any a cluster draws
// is refused.
func (n *Node) ExpectHistory(history string, everyMemberChecks bool) error {
	if len(history) > fsm.MaxHistoryLen {
		return fmt.Errorf("expect history: %d bytes, at most %d", len(history), fsm.MaxHistoryLen)
	}
	if n.check != nil {
		n.check.expected.Store(&expectation{history: history, everyChecks: everyMemberChecks})
	}
	return nil
}

// newTransport starts the Raft transport; awaitJoin makes it refuse
// every connection until ExpectHistory (Config.Joining).
func (n *Node) newTransport(awaitJoin bool) (*raftTransport, error) {
	var adv net.Addr
	if n.cfg.RaftAdvertise != "" {
		a, err := parseAdvertise(n.cfg.RaftAdvertise)
		if err != nil {
			return nil, err
		}
		adv = a
	}
	var check *clusterCheck
	if slices.Contains(n.cfg.Features, fsm.FeatureRaftClusterCheck) {
		st := n.state
		check = &clusterCheck{
			nodeID: n.cfg.NodeID,
			history: func() string {
				h, err := fsm.ReadHistory(st)
				if err != nil {
					return "" // unknown: accept, as a node with no state does
				}
				return h
			},
			timeout: raftNetTimeout, log: n.log, refused: n.m.observeRefused, awaitJoin: awaitJoin,
			newMember: n.newMember,
			stateless: func() bool {
				has, err := raft.HasExistingState(n.logs, n.logs, n.snaps)
				return err == nil && !has
			},
		}
	}
	n.check = check
	layer, err := newStreamLayer(n.cfg.RaftBind, adv, n.cfg.TLSServer, n.cfg.TLSClient, n.cfg.Faults, check)
	if err != nil {
		return nil, err
	}
	n.layer = layer
	return newRaftTransport(raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream: layer, MaxPool: 3, Timeout: raftNetTimeout, Logger: newHCLogger(n.log, "raft-net"),
	})), nil
}

// advertiseAddr is a Raft address as the operator wrote it. A DNS name
// stays a name in the cluster's configuration and is resolved at each
// dial: a member whose IP changes (a rescheduled Kubernetes pod under its
// headless Service) stays reachable, where an address resolved once at
// start would point at the old IP for ever.
type advertiseAddr string

func (a advertiseAddr) Network() string { return "tcp" }
func (a advertiseAddr) String() string  { return string(a) }

// parseAdvertise checks an advertised address: host:port with a host
// others can dial (a name or a specific IP) and a numeric port.
// EveryInterface reports whether addr (host:port) binds every interface:
// no host, or an unspecified IP. Such a bind is no address to advertise.
func EveryInterface(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false // Listen says what is wrong
	}
	if host == "" {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsUnspecified()
}

func parseAdvertise(s string) (net.Addr, error) {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return nil, fmt.Errorf("raft advertise address %q: %w", s, err)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return nil, fmt.Errorf("raft advertise address %q: port must be 1 to 65535", s)
	}
	if host == "" {
		return nil, fmt.Errorf("raft advertise address %q: no host", s)
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		return nil, fmt.Errorf("raft advertise address %q: %s is not an address others can dial", s, host)
	}
	return advertiseAddr(s), nil
}

func (n *Node) raftConfig() *raft.Config {
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(n.cfg.NodeID)
	rc.Logger = newHCLogger(n.log, "raft")
	// Buffered and always drained (see watchLeadership): LeaderCh can drop
	// transitions and an undrained NotifyCh blocks Raft.
	rc.NotifyCh = n.notifyCh
	// The FSM is on disk and skips entries it already applied, so
	// re-restoring the newest snapshot on every start is wasted work.
	rc.NoSnapshotRestoreOnStart = true
	rc.BatchApplyCh = !n.cfg.Raft.NoBatchApply
	rc.NoLegacyTelemetry = true
	t := n.cfg.Raft
	if t.HeartbeatTimeout > 0 {
		rc.HeartbeatTimeout = t.HeartbeatTimeout
	}
	if t.ElectionTimeout > 0 {
		rc.ElectionTimeout = t.ElectionTimeout
	}
	if t.LeaderLeaseTimeout > 0 {
		rc.LeaderLeaseTimeout = t.LeaderLeaseTimeout
	}
	if t.CommitTimeout > 0 {
		rc.CommitTimeout = t.CommitTimeout
	}
	if t.SnapshotInterval > 0 {
		rc.SnapshotInterval = t.SnapshotInterval
	}
	if t.SnapshotThreshold > 0 {
		rc.SnapshotThreshold = t.SnapshotThreshold
	}
	if t.TrailingLogs > 0 {
		rc.TrailingLogs = t.TrailingLogs
	}
	if t.MaxAppendEntries > 0 {
		rc.MaxAppendEntries = t.MaxAppendEntries
	}
	return rc
}

// keyCurrentTerm is the stable store's key for Raft's current term
// (hashicorp/raft's own name for it).
const keyCurrentTerm = "CurrentTerm"

// checkStateBehindRaft refuses a state store that has applied entries
// while the data dir holds no Raft data at all (log, snapshots, term):
// the FSM skips entries at or below its applied index, so a log started
// anew (after --bootstrap on a data dir whose raft files were removed,
// say) would go unapplied here and be applied on every other member.
// It also refuses Raft data without a term (checkTerm). With Raft data
// that merely ends before the applied index (a log whose tail was
// lost), the entries come again from the same cluster, the same ones:
// the node starts, and says so.
func (n *Node) checkStateBehindRaft(hasState bool) error {
	if hasState {
		if err := n.checkTerm(); err != nil {
			return err
		}
	}
	applied := n.fsm.AppliedIndex()
	if applied == 0 {
		return nil
	}
	if hasState {
		last, err := n.logs.LastIndex()
		if err != nil {
			return fmt.Errorf("read last log index: %w", err)
		}
		metas, err := n.snaps.List()
		if err != nil {
			return fmt.Errorf("list snapshots: %w", err)
		}
		end := last
		if len(metas) > 0 {
			end = max(end, metas[0].Index)
		}
		if applied > end {
			n.log.Warn("the state store has applied entries beyond the raft log and snapshots; they will be received again from the cluster",
				"applied_index", applied, "raft_end", end)
		}
		return nil
	}
	return fmt.Errorf("data dir %s: the state store has applied index %d, but there is no raft log, snapshot or term beside it; remove %s as well to start this node afresh (it then joins, or is bootstrapped or restored, like a new one): %w",
		n.cfg.DataDir, applied, filepath.Join(n.cfg.DataDir, "state"), ErrStateAhead)
}

// checkTerm refuses Raft data (snapshots, a log) that has no term beside
// it: the raft/ dir, which holds the log and the stable store (term,
// vote), was lost while snapshots/ survived. Every node that ran Raft has
// a term: bootstrapping writes one before its first entry, a node that
// joins stores its leader's at the first message, before any entry or
// snapshot arrives, and a restore writes one with its snapshot. Started
// without it, the node would begin at term 0 with no vote and a log that
// ends at its snapshot: it could vote twice in a term, or for a
// candidate lacking entries it had acknowledged, and a committed write
// could be lost.
func (n *Node) checkTerm() error {
	if _, err := n.logs.GetUint64([]byte(keyCurrentTerm)); err == nil {
		return nil
	} else if !errors.Is(err, raftlog.ErrKeyNotFound) {
		return fmt.Errorf("read raft term: %w", err)
	}
	return fmt.Errorf("data dir %s: there is raft data (snapshots) but no raft term in %s: that directory, with the log and this node's votes, was lost or replaced; "+
		"started so, this node could vote against what it had acknowledged, and the cluster could lose committed writes. "+
		"Remove it from its cluster (relayctl cluster remove %s, on a member), empty %s and start it with --join; "+
		"if it was the cluster's only node, restore a new cluster from a backup (--restore); "+
		"if this node was being restored with --restore and that was cut short, empty %s and restore again: %w",
		n.cfg.DataDir, filepath.Join(n.cfg.DataDir, "raft"), n.cfg.NodeID, n.cfg.DataDir, n.cfg.DataDir, ErrRaftDataLost)
}

// catchUpWithSnapshot restores the FSM from the newest Raft snapshot when
// the state store is older than it (a state dir lost or replaced while the
// Raft log was compacted past it). With NoSnapshotRestoreOnStart Raft
// would otherwise resume after the snapshot and leave a gap.
func (n *Node) catchUpWithSnapshot() error {
	metas, err := n.snaps.List()
	if err != nil {
		return fmt.Errorf("list snapshots: %w", err)
	}
	if len(metas) == 0 || metas[0].Index <= n.fsm.AppliedIndex() {
		return nil
	}
	n.log.Warn("state store is behind the newest snapshot; restoring it",
		"applied_index", n.fsm.AppliedIndex(), "snapshot_index", metas[0].Index)
	_, rc, err := n.snaps.Open(metas[0].ID)
	if err != nil {
		return fmt.Errorf("open snapshot %s: %w", metas[0].ID, err)
	}
	return n.fsm.Restore(rc)
}

// importBackup seeds an empty data dir's state store from a backup file
// and gives it a history of its own, and returns the backup's applied
// index; snapshotBackup then gives Raft the snapshot that goes with it.
// It runs before the transport listens (Open) and before the FSM is
// created. A restore that fails after the import leaves the state store
// empty again (dropImport), so nothing of it stays behind without the
// Raft data that goes with it.
func (n *Node) importBackup(path string) (index uint64, err error) {
	open := n.cfg.OpenBackup
	if open == nil {
		open = func(path string) (io.ReadCloser, error) { return os.Open(path) }
	}
	f, err := open(path)
	if err != nil {
		return 0, fmt.Errorf("restore: %w", err)
	}
	defer f.Close()
	count, err := n.state.ImportChecked(f, fsm.CheckRecord)
	if err != nil {
		return 0, fmt.Errorf("restore from %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			err = n.dropImport(err)
		}
	}()
	index, _, err = fsm.ReadApplied(n.state)
	if err != nil {
		return 0, fmt.Errorf("restore from %s: %w", path, err)
	}
	if index == 0 {
		return 0, fmt.Errorf("restore from %s: backup holds no applied index", path)
	}
	// A history of its own: revisions go on from the backup's, so edges
	// that followed the cluster before (further along, or along another
	// line) cannot resume by revision and get a full copy instead.
	if err := fsm.SetHistory(n.state, fsm.NewHistoryID()); err != nil {
		return 0, fmt.Errorf("restore from %s: %w", path, err)
	}
	n.log.Info("imported state from backup", "file", path, "records", count, "index", index)
	return index, nil
}

// snapshotBackup gives Raft a snapshot at the imported backup's index
// whose configuration holds only this node, at local, so the new cluster
// continues the old one's revisions and members that join later receive
// the restored state by snapshot install; and the term that goes with it.
func (n *Node) snapshotBackup(path string, index uint64, local raft.ServerAddress) error {
	const term = 1
	conf := raft.Configuration{Servers: []raft.Server{{ID: raft.ServerID(n.cfg.NodeID), Address: local, Suffrage: raft.Voter}}}
	sink, err := n.snaps.Create(raft.SnapshotVersionMax, index, term, conf, index, n.trans)
	if err != nil {
		return fmt.Errorf("create restore snapshot: %w", err)
	}
	snap := n.state.Snapshot()
	defer snap.Close()
	if _, err := state.Export(sink, snap); err != nil {
		_ = sink.Cancel()
		return fmt.Errorf("write restore snapshot: %w", err)
	}
	// From here on the snapshot may be in place (Close can fail after it
	// renamed it there), and a snapshot alone makes the data dir one that
	// holds Raft state: a later --restore would be refused, and a start
	// without it too (a snapshot without a term). So a failure takes it
	// away again, and the data dir is as empty as before the restore.
	if err := sink.Close(); err != nil {
		return n.dropRestoreSnapshot(sink.ID(), fmt.Errorf("write restore snapshot: %w", err))
	}
	if err := n.cfg.Faults.failRestoreTerm(); err != nil {
		return n.dropRestoreSnapshot(sink.ID(), fmt.Errorf("restore: set term: %w", err))
	}
	if err := n.logs.SetUint64([]byte(keyCurrentTerm), term); err != nil {
		return n.dropRestoreSnapshot(sink.ID(), fmt.Errorf("restore: set term: %w", err))
	}
	n.log.Info("restored state from backup", "file", path, "index", index)
	return nil
}

// snapshotsDir is where hashicorp/raft's FileSnapshotStore keeps its
// snapshots under the directory it is given (the data dir), one directory
// per snapshot named by its ID; it has no call that deletes one.
const snapshotsDir = "snapshots"

// dropRestoreSnapshot removes the restore's snapshot id after the restore
// failed past writing it, and returns err, with what went wrong if it
// could not. The snapshot store lists only finished snapshots, so the
// temporary directory of one whose Close failed before its rename counts
// for nothing, and goes too.
func (n *Node) dropRestoreSnapshot(id string, err error) error {
	dir := filepath.Join(n.cfg.DataDir, snapshotsDir)
	final := filepath.Join(dir, id)
	rerr := errors.Join(os.RemoveAll(final), os.RemoveAll(final+".tmp"))
	if rerr == nil {
		rerr = dirsync.Sync(dir)
	}
	if rerr != nil {
		return fmt.Errorf("%w (and the restore's snapshot stays in %s: remove it, or empty the data dir, before restoring again: %w)", err, final, rerr)
	}
	return err
}

// dropImport empties the state store after a restore failed past its
// import, and returns err, with what went wrong if it could not.
func (n *Node) dropImport(err error) error {
	if cerr := n.state.Clear(); cerr != nil {
		return fmt.Errorf("%w (and the imported state stays in %s: %w)", err, filepath.Join(n.cfg.DataDir, "state"), cerr)
	}
	return err
}

// newRequestID returns a random id for a command's idempotency check.
func newRequestID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// FSM returns the node's state machine, for reads.
func (n *Node) FSM() *fsm.FSM { return n.fsm }

// ID returns the node id.
func (n *Node) ID() string { return n.cfg.NodeID }

// RaftAddr returns the address other members reach this node's Raft at.
func (n *Node) RaftAddr() string { return string(n.trans.LocalAddr()) }

// IsLeader reports whether this node is the leader now.
func (n *Node) IsLeader() bool { return n.raft.State() == raft.Leader }

// Term returns the Raft term this node is in: every election raises it.
func (n *Node) Term() uint64 { return n.raft.CurrentTerm() }

// dropLogsBehindSnapshot deletes a log that ends before the newest
// snapshot. Raft does so itself right after installing a snapshot from
// the leader (the log store is monotonic: removeOldLogs), but a crash
// between the snapshot file being durable and that deletion leaves the
// old log, and the gap after it makes the store refuse the entries the
// leader sends next (they must follow its last index): the leader would
// walk back one refused append at a time until it sent the snapshot
// again. Every entry of such a log is covered by the snapshot.
func (n *Node) dropLogsBehindSnapshot() error {
	metas, err := n.snaps.List()
	if err != nil || len(metas) == 0 {
		return err
	}
	first, err := n.logs.FirstIndex()
	if err != nil {
		return err
	}
	last, err := n.logs.LastIndex()
	if err != nil {
		return err
	}
	if last == 0 || last >= metas[0].Index {
		return nil
	}
	n.log.Warn("dropping a raft log that ends before the newest snapshot (a snapshot install was interrupted)",
		"first", first, "last", last, "snapshot_index", metas[0].Index)
	if err := n.logs.DeleteRange(first, last); err != nil {
		return fmt.Errorf("drop raft log entries %d-%d behind snapshot %d: %w", first, last, metas[0].Index, err)
	}
	return nil
}

// SinceLeaderContact is how long ago this node last heard from a leader:
// 0 while it is the leader (which steps down once it stops hearing from
// a quorum), and a long time when it never has. A follower that stays
// out of contact for more than a few heartbeats is cut off from the
// cluster: its state no longer follows the writes.
func (n *Node) SinceLeaderContact() time.Duration {
	if n.raft.State() == raft.Leader {
		return 0
	}
	last := n.raft.LastContact()
	if last.IsZero() {
		return math.MaxInt64
	}
	return time.Since(last)
}

// leaderKnown reports whether this node knows a leader now.
func (n *Node) leaderKnown() bool {
	_, id := n.raft.LeaderWithID()
	return id != ""
}

// slowLevel is the level of a slow-operation line: a warning, but for an
// operation that began with no leader known (a node starting, an
// election), whose time is mostly the wait for one: elections are logged
// and alerted on by themselves.
func slowLevel(leaderKnown bool) slog.Level {
	if leaderKnown {
		return slog.LevelWarn
	}
	return slog.LevelInfo
}

// Leader returns the current leader's id and API address as far as this
// node knows; empty strings when no leader is known.
func (n *Node) Leader() (id, apiAddr string) {
	_, lid := n.raft.LeaderWithID()
	if lid == "" {
		return "", ""
	}
	if string(lid) == n.cfg.NodeID {
		return n.cfg.NodeID, n.cfg.APIAdvertise
	}
	rec, err := n.fsm.GetNode(string(lid))
	if err != nil {
		return string(lid), ""
	}
	return string(lid), rec.GetApiAddr()
}

type requestIDKey struct{}

type clientRequest struct {
	id     string
	digest []byte
}

// WithRequestID makes the write Apply proposes under ctx use id as its
// request id, with digest identifying the request it stands for: a client
// that retries a call whose outcome it does not know gets the first
// outcome, and one that reuses the id for another request an error. The
// API sets it for calls that make exactly one write.
func WithRequestID(ctx context.Context, id string, digest []byte) context.Context {
	return context.WithValue(ctx, requestIDKey{}, clientRequest{id: id, digest: digest})
}

// Apply commits cmd through Raft and returns its result. On a follower it
// forwards the command to the leader. A command without a request id gets
// the one ctx carries (WithRequestID) or a new one, and a write whose
// outcome is unknown is retried with the same id until ctx ends, so Apply
// takes effect at most once and, if it returns nil, exactly once. A
// result with a non-OK code is returned as an error wrapping the fsm
// sentinel (fsm.ErrNotFound, ...), together with the result.
func (n *Node) Apply(ctx context.Context, cmd *statev1.Command) (*statev1.Result, error) {
	if cmd.RequestId == "" {
		if r, ok := ctx.Value(requestIDKey{}).(clientRequest); ok {
			cmd.RequestId, cmd.RequestDigest = r.id, r.digest
		} else {
			cmd.RequestId = newRequestID()
		}
	}
	if cmd.ProposedAtMs == 0 {
		cmd.ProposedAtMs = time.Now().UnixMilli()
	}
	data, err := proto.Marshal(cmd)
	if err != nil {
		return nil, fmt.Errorf("encode command: %w", err)
	}
	if _, has := ctx.Deadline(); !has {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, n.cfg.ApplyTimeout)
		defer cancel()
	}
	ctx, span := n.cfg.Tracer.Start(ctx, "raft.apply", trace.WithAttributes(attribute.String("relay.op", opName(cmd))))
	defer span.End()
	start, leaderKnown := time.Now(), n.leaderKnown()
	res, err := retry(ctx, n.cfg.Raft.LeaderWait, func() (*statev1.Result, error) { return n.applyOnce(ctx, data) })
	took := time.Since(start)
	span.SetAttributes(attribute.Int64("relay.revision", int64(res.GetRevision())), attribute.Bool("relay.leader", n.IsLeader()))
	if err != nil {
		span.SetStatus(codes.Error, err.Error())
	}
	if took > n.cfg.SlowThreshold {
		n.log.Log(ctx, slowLevel(leaderKnown), "slow raft apply", "op", opName(cmd), "duration", took,
			"revision", res.GetRevision(), "leader_known", leaderKnown, "trace_id", span.SpanContext().TraceID().String(), "err", err)
	}
	if err != nil {
		return nil, err
	}
	return res, fsm.ResultError(res)
}

// retry runs op until it succeeds, fails with a final error, or ctx ends.
// ErrNoLeader and ErrUnknownOutcome are retried (safe thanks to the
// request id); everything else is final. After leaderWait without a
// known leader it gives up with ErrNoLeader. Whatever it returns wraps
// ErrUnknownOutcome when any attempt's outcome was unknown, so an error
// without it means no attempt took effect.
func retry[T any](ctx context.Context, leaderWait time.Duration, op func() (T, error)) (T, error) {
	backoff := 10 * time.Millisecond
	var noLeaderSince time.Time
	unknown := false
	fail := func(err error) error {
		if unknown && !errors.Is(err, ErrUnknownOutcome) {
			return fmt.Errorf("%w (%w: an earlier attempt may have taken effect)", err, ErrUnknownOutcome)
		}
		return err
	}
	for {
		v, err := op()
		if err == nil {
			return v, nil
		}
		if errors.Is(err, ErrUnknownOutcome) {
			unknown = true
		}
		if !(errors.Is(err, ErrNoLeader) || errors.Is(err, ErrUnknownOutcome)) {
			return v, fail(err)
		}
		if !errors.Is(err, ErrNoLeader) {
			noLeaderSince = time.Time{}
		} else if noLeaderSince.IsZero() {
			noLeaderSince = time.Now()
		} else if time.Since(noLeaderSince) >= leaderWait {
			return v, fail(fmt.Errorf("%w (no leader for %v)", err, leaderWait))
		}
		// Spread: every write of the node that failed with its leader
		// retries, and would otherwise reach the new one together.
		t := time.NewTimer(jitter.Spread(backoff))
		select {
		case <-ctx.Done():
			t.Stop()
			return v, fail(fmt.Errorf("%w (gave up: %v)", err, ctx.Err()))
		case <-t.C:
		}
		if backoff < 500*time.Millisecond {
			backoff *= 2
		}
	}
}

func (n *Node) applyOnce(ctx context.Context, data []byte) (*statev1.Result, error) {
	if n.shutdown.Load() {
		return nil, ErrShutdown
	}
	if n.IsLeader() {
		return n.ApplyLocal(ctx, data)
	}
	_, addr := n.Leader()
	if addr == "" {
		return nil, ErrNoLeader
	}
	if n.cfg.Peers == nil {
		return nil, fmt.Errorf("%w: no peer client configured to forward to the leader", ErrNotLeader)
	}
	actx, cancel := context.WithTimeout(ctx, n.cfg.Raft.ForwardTimeout)
	defer cancel()
	out, err := n.cfg.Peers.Apply(actx, addr, data)
	if err != nil {
		return nil, err
	}
	var res statev1.Result
	if err := proto.Unmarshal(out, &res); err != nil {
		return nil, fmt.Errorf("decode forwarded result: %w", err)
	}
	return &res, nil
}

// MaxProposalSkew is how far a command's time may be from the leader's
// clock (ErrClockSkew).
const MaxProposalSkew = time.Minute

// checkProposalTime refuses a command (encoded) whose proposed_at_ms is
// more than MaxProposalSkew from now. It reads that one field, without
// decoding the command.
func checkProposalTime(data []byte, now time.Time) error {
	var v uint64 // the last proposed_at_ms, as decoding takes it
	for len(data) > 0 {
		num, typ, n := protowire.ConsumeTag(data)
		if n < 0 {
			return nil // malformed: apply refuses it
		}
		data = data[n:]
		m := protowire.ConsumeFieldValue(num, typ, data)
		if m < 0 {
			return nil
		}
		if num == 2 && typ == protowire.VarintType { // proposed_at_ms
			v, _ = protowire.ConsumeVarint(data)
		}
		data = data[m:]
	}
	if v == 0 {
		// No time, as a new leader's noop: nothing expires by it (apply
		// takes 0 for "long ago", before any expiry).
		return nil
	}
	at := time.UnixMilli(int64(v))
	if d := at.Sub(now); d > MaxProposalSkew || d < -MaxProposalSkew {
		return fmt.Errorf("%w: its command is stamped %s, %v from the leader's clock (at most %v)", ErrClockSkew, at.UTC().Format(time.RFC3339), d.Round(time.Second), MaxProposalSkew)
	}
	return nil
}

// ApplyLocal proposes an encoded command on this node, which must be the
// leader. The API's PeerService calls it for forwarded writes. A command
// stamped more than MaxProposalSkew from this node's clock is refused
// (ErrClockSkew).
func (n *Node) ApplyLocal(ctx context.Context, data []byte) (*statev1.Result, error) {
	if err := n.cfg.Faults.waitUnpaused(ctx); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUnknownOutcome, err)
	}
	if err := n.cfg.Faults.failWrite(data); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUnknownOutcome, err)
	}
	n.applyMu.Lock()
	if n.shutdown.Load() {
		n.applyMu.Unlock()
		return nil, ErrShutdown
	}
	n.applies.Add(1)
	n.applyMu.Unlock()
	defer n.applies.Done()
	timeout := n.cfg.ApplyTimeout
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
		if timeout <= 0 {
			return nil, fmt.Errorf("%w: %v", ErrUnknownOutcome, context.DeadlineExceeded)
		}
	}
	start := time.Now()
	if err := checkProposalTime(data, start); err != nil {
		n.log.Warn("refused a command stamped too far from this leader's clock", "err", err)
		return nil, err
	}
	f := n.raft.Apply(data, timeout)
	if err := n.await(f); err != nil {
		switch {
		case errors.Is(err, raft.ErrNotLeader):
			// Not appended here: nothing was written; the caller may retry
			// against the new leader.
			return nil, fmt.Errorf("%w: %v", ErrNoLeader, err)
		case errors.Is(err, raft.ErrRaftShutdown):
			// Raft stopped with the entry handed to it: it may be in
			// followers' logs and commit under the next leader.
			return nil, fmt.Errorf("%w (%w)", ErrShutdown, ErrUnknownOutcome)
		case errors.Is(err, raft.ErrLeadershipLost), errors.Is(err, raft.ErrEnqueueTimeout),
			errors.Is(err, raft.ErrLeadershipTransferInProgress):
			return nil, fmt.Errorf("%w: %v", ErrUnknownOutcome, err)
		default:
			return nil, fmt.Errorf("raft apply: %w", err)
		}
	}
	n.m.observeCommit(time.Since(start))
	res, ok := f.Response().(*statev1.Result)
	if !ok || res == nil {
		return nil, fmt.Errorf("raft apply: unexpected response %T", f.Response())
	}
	return res, nil
}

// await waits for f's answer, or for Raft to have shut down: Raft never
// answers a future still queued in its apply channel when it stops
// (hashicorp/raft#498), which a drain that ran out of time leaves behind.
// It answers raft.ErrRaftShutdown then (an unknown outcome: the entry
// may have reached followers). The waiter it leaves lives on until the
// process ends, as the future does.
func (n *Node) await(f raft.ApplyFuture) error {
	done := make(chan error, 1)
	go func() { done <- f.Error() }()
	select {
	case err := <-done:
		return err
	case <-n.raftDown:
		select {
		case err := <-done:
			return err
		default:
			return raft.ErrRaftShutdown
		}
	}
}

func opName(cmd *statev1.Command) string {
	if cmd.GetOp() == nil {
		return "none"
	}
	return string(cmd.ProtoReflect().WhichOneof(cmd.ProtoReflect().Descriptor().Oneofs().ByName("op")).Name())
}

// ReadIndexLocal returns an index that a linearizable read must wait for,
// computed on the leader: the commit index, confirmed by a heartbeat round
// that this node still leads. It waits until the leader has committed an
// entry of its own term first: before that, its commit index may trail
// what an earlier leader acknowledged.
func (n *Node) ReadIndexLocal(ctx context.Context) (uint64, error) {
	if err := n.cfg.Faults.waitUnpaused(ctx); err != nil {
		return 0, err
	}
	ls := n.lead.Load()
	if ls == nil {
		return 0, ErrNotLeader
	}
	select {
	case <-ls.ready:
	case <-ls.ended:
		// Its first entry never committed (the leader was cut off): the
		// caller's retry finds the next leader within LeaderWait,
		// rather than this read waiting for its own deadline.
		return 0, fmt.Errorf("%w: leadership ended before its first commit", ErrNoLeader)
	case <-ctx.Done():
		return 0, fmt.Errorf("wait for leader's first commit: %w", ctx.Err())
	}
	idx := n.raft.CommitIndex()
	if err := n.raft.VerifyLeader().Error(); err != nil {
		return 0, fmt.Errorf("%w: %v", ErrNoLeader, err)
	}
	// Leadership lost and won again between the commit index and the
	// heartbeat round (a later term, which the notifications have not
	// reached yet) would confirm an index that an interim leader may
	// have passed: the term must be the one whose entry committed.
	if cur := n.lead.Load(); cur != ls || n.raft.CurrentTerm() != ls.term {
		return 0, fmt.Errorf("%w: leadership changed during read", ErrNoLeader)
	}
	return idx, nil
}

// ReadIndex returns the index a linearizable read must wait for, asking
// the leader when this node is a follower.
func (n *Node) ReadIndex(ctx context.Context) (uint64, error) {
	return retry(ctx, n.cfg.Raft.LeaderWait, func() (uint64, error) {
		if n.shutdown.Load() {
			return 0, ErrShutdown
		}
		if n.IsLeader() {
			idx, err := n.ReadIndexLocal(ctx)
			if errors.Is(err, ErrNotLeader) {
				return 0, ErrNoLeader
			}
			return idx, err
		}
		_, addr := n.Leader()
		if addr == "" {
			return 0, ErrNoLeader
		}
		if n.cfg.Peers == nil {
			return 0, fmt.Errorf("%w: no peer client configured", ErrNotLeader)
		}
		actx, cancel := context.WithTimeout(ctx, n.cfg.Raft.ForwardTimeout)
		defer cancel()
		return n.cfg.Peers.ReadIndex(actx, addr)
	})
}

// Barrier makes a linearizable read possible on this node: when it
// returns nil, the local state reflects every write acknowledged to any
// client before Barrier was called.
func (n *Node) Barrier(ctx context.Context) error {
	ctx, span := n.cfg.Tracer.Start(ctx, "raft.read_barrier")
	defer span.End()
	start, leaderKnown := time.Now(), n.leaderKnown()
	idx, err := n.ReadIndex(ctx)
	if err == nil {
		err = n.waitApplied(ctx, idx)
	}
	took := time.Since(start)
	n.m.observeRead(took)
	if took > n.cfg.SlowThreshold {
		n.log.Log(ctx, slowLevel(leaderKnown), "slow linearizable read barrier", "op", "read_index", "duration", took,
			"revision", idx, "leader_known", leaderKnown, "err", err)
	}
	if err != nil {
		return fmt.Errorf("linearizable read: %w", err)
	}
	return nil
}

// waitApplied waits until this node applied idx, a read index: within
// ctx, and for as long as it applies anything. One that applies nothing
// for LeaderWait (a follower cut off from Raft right after it got the
// index never applies it) gives up, so that its caller, whose own
// deadline may be far or none, does better on another node; one that is
// only slow (catching up, a burst of writes) goes on.
func (n *Node) waitApplied(ctx context.Context, idx uint64) error {
	for {
		from := n.fsm.AppliedIndex()
		wctx, cancel := context.WithTimeout(ctx, n.cfg.Raft.LeaderWait)
		err := n.fsm.WaitApplied(wctx, idx)
		cancel()
		if err == nil || ctx.Err() != nil {
			return err
		}
		if n.fsm.AppliedIndex() == from {
			return fmt.Errorf("%w: this node applied nothing for %s while a read waited for index %d", ErrNoLeader, n.cfg.Raft.LeaderWait, idx)
		}
	}
}

// watchLeadership drains NotifyCh. On gaining leadership it commits a
// no-op command so reads can be served in the new term, records this
// node's API address, and drops records of nodes that left.
func (n *Node) watchLeadership(ch <-chan bool) {
	defer n.wg.Done()
	var termCancel context.CancelFunc = func() {}
	defer func() { termCancel() }()
	for {
		select {
		case <-n.ctx.Done():
			return
		case isLeader := <-ch:
			termCancel()
			if !isLeader {
				n.lead.Store(nil)
				n.log.Info("lost leadership")
				continue
			}
			tctx, cancel := context.WithCancel(n.ctx)
			termCancel = cancel
			ls := &leadership{term: n.raft.CurrentTerm(), ready: make(chan struct{}), ended: tctx.Done()}
			n.lead.Store(ls)
			n.log.Info("became leader", "term", ls.term)
			n.wg.Add(1)
			go n.onElected(tctx, ls)
		}
	}
}

func (n *Node) currentTerm() uint64 {
	var t uint64
	_, _ = fmt.Sscan(n.raft.Stats()["term"], &t)
	return t
}

func (n *Node) onElected(ctx context.Context, ls *leadership) {
	defer n.wg.Done()
	noop, _ := proto.Marshal(&statev1.Command{Op: &statev1.Command_Noop{Noop: &statev1.Noop{}}})
	for {
		if _, err := n.ApplyLocal(ctx, noop); err == nil {
			close(ls.ready)
			break
		} else if errors.Is(err, ErrShutdown) || errors.Is(err, ErrNoLeader) || ctx.Err() != nil {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
	seen := n.fsm.MembersVersion()
	err := n.reconcileNodes(ctx)
	n.wg.Add(1)
	go n.tendMembers(ctx, seen, err == nil)
	if n.cfg.OnLeader != nil {
		n.cfg.OnLeader(ctx)
	}
}

// reconcileNodes makes the recorded node addresses match the Raft
// configuration: this node's own record is current and members that left
// are forgotten (after a restore, the backup's nodes are all gone).
func (n *Node) reconcileNodes(ctx context.Context) error {
	n.membership.Lock()
	defer n.membership.Unlock()
	cf := n.raft.GetConfiguration()
	if err := cf.Error(); err != nil {
		return err
	}
	members := map[string]bool{}
	for _, s := range cf.Configuration().Servers {
		members[string(s.ID)] = true
	}
	recs, err := n.fsm.Nodes()
	if err != nil {
		n.log.Warn("read node records", "err", err)
		return err
	}
	var first error
	for _, r := range recs {
		if !members[r.GetId()] {
			if err := n.forgetNode(ctx, r.GetId()); err != nil {
				n.log.Warn("forget departed node", "id", r.GetId(), "err", err)
				first = cmp.Or(first, err)
			}
		}
	}
	return first
}

// forgetNode removes node id's record through this node's own Raft, as
// its leader: never forwarded, so that a leader deposed meanwhile does
// not delete a record its successor wrote (AddVoter's, before the
// configuration entry reached it).
func (n *Node) forgetNode(ctx context.Context, id string) error {
	data, err := proto.Marshal(&statev1.Command{ProposedAtMs: time.Now().UnixMilli(),
		Op: &statev1.Command_RemoveNode{RemoveNode: &statev1.RemoveNode{Id: id}}})
	if err != nil {
		return err
	}
	res, err := n.ApplyLocal(ctx, data)
	if err == nil {
		err = fsm.ResultError(res)
	}
	return err
}

// tendMembers runs while this node leads. Whenever a node record or the
// configuration changes (FSM.MembersVersion) it forgets the records of
// nodes that are not members (reconcileNodes: one a failed add or a
// removal left would hold back every feature it does not list, for
// writers and, with gated apply, for apply), and, until gated apply is
// on, writes EnableGatedApply once every member, and every record,
// lists the feature gated_apply, so that from then on apply ignores the
// fields of a feature some record does not list (fsm.GatedAtApply), at
// the same entry on every replica.
func (n *Node) tendMembers(ctx context.Context, seen uint64, reconciled bool) {
	defer n.wg.Done()
	reconcile, look, gated := !reconciled, true, false
	blocked := false // after a failure, until retry fires or something changes
	var retry <-chan time.Time
	for {
		changed := n.fsm.Changed()
		if v := n.fsm.MembersVersion(); v != seen {
			seen, reconcile, look, blocked = v, true, true, false
		}
		if !blocked {
			failed := false
			if reconcile {
				if err := n.reconcileNodes(ctx); err != nil {
					failed = true
				} else {
					reconcile = false
				}
			}
			if look && !gated {
				var err error
				if gated, err = n.trySwitchOnGatedApply(ctx); err != nil {
					failed = true
					if ctx.Err() == nil {
						n.log.Debug("switch on gated apply", "err", err)
					}
				} else {
					look = false
				}
			}
			if failed && ctx.Err() == nil {
				// No quorum, a lost lead: try again in a while.
				blocked, retry = true, time.After(time.Second)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-retry:
			blocked, retry = false, nil
		}
	}
}

// trySwitchOnGatedApply writes EnableGatedApply if every member lists
// the feature; done once the switch is on.
func (n *Node) trySwitchOnGatedApply(ctx context.Context) (done bool, err error) {
	if on, err := n.fsm.GatedApply(); err != nil || on {
		return on, err
	}
	// Under membership: a voter AddVoter is adding either is in the
	// configuration read here or gets its record before it joins.
	n.membership.Lock()
	defer n.membership.Unlock()
	if missing, err := n.MembersWithout(fsm.FeatureGatedApply); err != nil || len(missing) > 0 {
		return false, err
	}
	if _, err := n.Apply(ctx, &statev1.Command{Op: &statev1.Command_EnableGatedApply{EnableGatedApply: &statev1.EnableGatedApply{}}}); err != nil {
		if errors.Is(err, fsm.ErrFailedPrecondition) {
			// A record changed meanwhile: that moved MembersVersion,
			// which brings the next look.
			return false, nil
		}
		return false, err
	}
	n.log.Info("gated apply is on: a command field of a feature that a node record does not list is ignored at apply from now on")
	return true, nil
}

// newMember reports whether the state records the member at Raft address
// addr as one that never ran: no record (AddVoter writes one after the
// configuration change), or one without anything only the node itself
// writes (its features, registerSelf, once it is a member; their
// withdrawal). The cluster check vouches for such a node when it dials
// it (helloNewMember); one that ran and comes back without state lost
// its data.
func (n *Node) newMember(addr string) bool {
	recs, err := n.fsm.Nodes()
	if err != nil {
		return false
	}
	for _, r := range recs {
		if r.GetRaftAddr() == addr {
			return len(r.GetFeatures()) == 0 && !r.GetFeaturesWithdrawn()
		}
	}
	return true
}

// registerSelf records this node's addresses in the replicated state
// whenever they are missing or out of date, through whoever leads.
func (n *Node) registerSelf(ctx context.Context) {
	defer n.wg.Done()
	defer close(n.regDone)
	want := &statev1.Node{Id: n.cfg.NodeID, RaftAddr: n.RaftAddr(), ApiAddr: n.cfg.APIAdvertise, Features: n.cfg.Features}
	backoff := 50 * time.Millisecond
	for {
		rec, err := n.fsm.GetNode(n.cfg.NodeID)
		if err == nil && proto.Equal(rec, want) {
			// Re-check when the state changes (a restore may drop it).
			select {
			case <-ctx.Done():
				return
			case <-n.fsm.Changed():
				continue
			}
		}
		if n.isMember() {
			actx, cancel := context.WithTimeout(ctx, 5*time.Second)
			var res *statev1.Result
			res, err = n.Apply(actx, &statev1.Command{Op: &statev1.Command_PutNode{PutNode: &statev1.PutNode{Node: want}}})
			cancel()
			if err == nil {
				backoff = 50 * time.Millisecond
				// A write forwarded to the leader returns once it is
				// committed, which may be before this node has applied the
				// log up to it (a restarted node catching up): until then
				// its own record reads as before, and must not be taken
				// for a write still to make. (Bounded: a restore may take
				// the revision away.)
				wctx, cancel := context.WithTimeout(ctx, time.Minute)
				err = n.fsm.WaitApplied(wctx, res.GetRevision())
				cancel()
				if err == nil || ctx.Err() != nil {
					continue
				}
			}
			n.log.Debug("record node addresses", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-n.fsm.Changed():
		case <-time.After(backoff):
		}
		if backoff < 2*time.Second {
			backoff *= 2
		}
	}
}

func (n *Node) isMember() bool { return n.HasMember(n.cfg.NodeID) }

// catchUp marks the node ready once it has applied everything the leader
// had committed when the node started.
//
// A node that never gets there because it was removed from the cluster
// (and started again on its data dir) would only log, every few seconds,
// that it knows no leader; once it has found itself outside its cluster
// (outsideCluster) for RemovedAfter it says what happened and what to
// do, once, and Removed reports it.
func (n *Node) catchUp() {
	defer n.wg.Done()
	var outside time.Time // since when the node has been found outside its cluster
	for n.ctx.Err() == nil {
		ctx, cancel := context.WithTimeout(n.ctx, 5*time.Second)
		err := n.Barrier(ctx)
		cancel()
		if err == nil {
			n.removed.Store(false)
			n.ready.Store(true)
			n.log.Info("caught up with the leader", "applied_index", n.fsm.AppliedIndex())
			return
		}
		switch ids, m := n.outsideCluster(); {
		case m == membershipUnknown:
		case m == memberOf:
			outside = time.Time{}
			n.removed.Store(false)
		case outside.IsZero():
			outside = time.Now()
		case time.Since(outside) >= n.cfg.Raft.RemovedAfter && !n.removed.Swap(true):
			n.log.Error("this node is not a member of the cluster its data dir belongs to: it was removed (relayctl cluster remove) "+
				"and is not ready until it is added again; to bring it back, stop it, empty its data dir and start it with --join (RELAY_JOIN) "+
				"to a member, or, if it should be gone, stop it", "node_id", n.cfg.NodeID, "data_dir", n.cfg.DataDir, "members", ids)
		}
		select {
		case <-n.ctx.Done():
			return
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// membership is what a node not ready knows of its place in the
// cluster (outsideCluster).
type membership int

const (
	membershipUnknown membership = iota // no member that could tell answered
	memberOf                            // it is a member
	outsideOf                           // it is not: it was removed
)

// outsideCluster tells whether this node, which holds Raft data, is a
// member of the cluster that data belongs to, and the members that
// cluster has. While it knows a leader it is (a node being added hears
// from the leader before its log names it). While it knows none, it asks
// the members its state records: the first that knows a leader and has
// committed at least this node's whole log (so it holds every
// configuration this node saw) decides. A node removed while it was down
// or cut off never receives its removal, and its log still names it: no
// member sends it anything since, and this is how it finds out. No
// answer of that kind leaves it unknown.
func (n *Node) outsideCluster() (members []string, m membership) {
	last := n.raft.LastIndex()
	if last == 0 || n.leaderKnown() {
		return nil, memberOf
	}
	if n.cfg.Peers == nil {
		return nil, membershipUnknown
	}
	recs, err := n.fsm.Nodes()
	if err != nil {
		return nil, membershipUnknown
	}
	for _, r := range recs {
		if n.ctx.Err() != nil {
			break
		}
		if r.GetId() == n.cfg.NodeID || r.GetApiAddr() == "" {
			continue
		}
		ctx, cancel := context.WithTimeout(n.ctx, 2*time.Second)
		st, err := n.cfg.Peers.Members(ctx, r.GetApiAddr())
		cancel()
		if err != nil || st.LeaderID == "" || st.CommitIndex < last {
			continue
		}
		if slices.Contains(st.Members, n.cfg.NodeID) {
			return st.Members, memberOf
		}
		return st.Members, outsideOf
	}
	return nil, membershipUnknown
}

// Removed reports whether the node found itself outside the cluster its
// data dir belongs to (see catchUp): it was removed, and will not be
// ready.
func (n *Node) Removed() bool { return n.removed.Load() }

// Ready reports whether the node sees a leader and has caught up with the
// log it had at start (what /readyz answers).
func (n *Node) Ready() bool {
	if !n.ready.Load() || n.shutdown.Load() {
		return false
	}
	id, _ := n.Leader()
	return id != ""
}
