package raftnode

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/control/fsm"

	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// Member is one server of the Raft configuration.
type Member struct {
	ID       string
	RaftAddr string
	APIAddr  string // empty until recorded
	Voter    bool
	Leader   bool
	Features []string // as the node recorded them (MembersWithout)
}

// Status is this node's view of the cluster.
type Status struct {
	NodeID            string
	State             string
	LeaderID          string
	LeaderAPIAddr     string
	Term              uint64
	CommitIndex       uint64
	AppliedIndex      uint64
	LastSnapshotIndex uint64
	Members           []Member
}

// Status reports the node's view of the cluster.
func (n *Node) Status() (Status, error) {
	stats := n.raft.Stats()
	u := func(k string) uint64 { v, _ := strconv.ParseUint(stats[k], 10, 64); return v }
	lid, laddr := n.Leader()
	st := Status{
		NodeID:            n.cfg.NodeID,
		State:             n.raft.State().String(),
		LeaderID:          lid,
		LeaderAPIAddr:     laddr,
		Term:              u("term"),
		CommitIndex:       n.commitIndex(),
		AppliedIndex:      n.fsm.AppliedIndex(),
		LastSnapshotIndex: u("last_snapshot_index"),
	}
	cf := n.raft.GetConfiguration()
	if err := cf.Error(); err != nil {
		return st, fmt.Errorf("read raft configuration: %w", err)
	}
	for _, s := range cf.Configuration().Servers {
		m := Member{ID: string(s.ID), RaftAddr: string(s.Address), Voter: s.Suffrage == raft.Voter, Leader: string(s.ID) == lid}
		if rec, err := n.fsm.GetNode(string(s.ID)); err == nil {
			m.APIAddr, m.Features = rec.GetApiAddr(), rec.GetFeatures()
		}
		st.Members = append(st.Members, m)
	}
	return st, nil
}

// commitIndex is the highest log index this node knows committed.
// hashicorp/raft learns the commit index only from its leader (a
// follower's first AppendEntries, a leader's first commit in its term)
// and reports 0 until then; but the entries the durable state applied
// before a restart were committed, so those count too.
func (n *Node) commitIndex() uint64 { return max(n.raft.CommitIndex(), n.fsm.AppliedIndex()) }

func (n *Node) requireLeader() error {
	if n.shutdown.Load() {
		return ErrShutdown
	}
	if !n.IsLeader() {
		return ErrNotLeader
	}
	return nil
}

func timeoutOf(ctx context.Context, def time.Duration) time.Duration {
	if dl, ok := ctx.Deadline(); ok {
		if d := time.Until(dl); d > 0 {
			return d
		}
		return time.Millisecond
	}
	return def
}

func mapRaftErr(op string, err error) error {
	switch {
	case errors.Is(err, raft.ErrNotLeader):
		return fmt.Errorf("%s: %w", op, ErrNotLeader)
	case errors.Is(err, raft.ErrRaftShutdown):
		return fmt.Errorf("%s: %w", op, ErrShutdown)
	case errors.Is(err, raft.ErrLeadershipLost), errors.Is(err, raft.ErrEnqueueTimeout):
		return fmt.Errorf("%s: %w: %v", op, ErrUnknownOutcome, err)
	case errors.Is(err, raft.ErrLeadershipTransferInProgress):
		// A configuration change during a hand-over (every graceful stop
		// makes one): nothing was done, and the next leader takes it.
		return fmt.Errorf("%s: %w: %v", op, ErrNotLeader, err)
	}
	return fmt.Errorf("%s: %w", op, err)
}

// AddVoter adds (or promotes) a voter; this node must be the leader. The
// new node's API address is recorded in the same step so that it can be
// forwarded to as soon as it leads.
func (n *Node) AddVoter(ctx context.Context, id, raftAddr, apiAddr string) (uint64, error) {
	if err := n.requireLeader(); err != nil {
		return 0, err
	}
	// The first node drew the cluster's history before Raft started, and
	// its InitCluster records it for everyone. Were a voter added before
	// that, and the first node lost the lead meanwhile, the new leader
	// would draw another id, and the two sides would refuse each other
	// for good (the cluster check, hello.go).
	if ok, err := n.fsm.Initialized(); err != nil {
		return 0, fmt.Errorf("add voter %s: %w", id, err)
	} else if !ok {
		return 0, fmt.Errorf("add voter %s: %w", id, ErrNotInitialized)
	}
	n.membership.Lock()
	defer n.membership.Unlock()
	// A voter counts in every majority from the configuration entry on:
	// added where another node, or nothing, answers, it would stall
	// writes until removed (in a cluster of one, for good: the leader
	// steps down and no node can win an election). Asked again for a
	// member at the same address (a join whose answer was lost), nothing
	// changes, and nothing is probed.
	servers, err := n.servers()
	if err != nil {
		return 0, err
	}
	if !slices.ContainsFunc(servers, func(s raft.Server) bool {
		return string(s.ID) == id && string(s.Address) == raftAddr && s.Suffrage == raft.Voter
	}) && id != n.cfg.NodeID {
		noState, err := n.layer.probe(id, raftAddr, min(timeoutOf(ctx, n.cfg.ApplyTimeout), probeTimeout))
		if err != nil {
			return 0, fmt.Errorf("add voter %s: %w", id, err)
		}
		// A member moved to another address keeps its vote: the node
		// there must hold the cluster's state. One that does not lost
		// its data (a new host, a wiped disk), and taken back as the
		// same voter it could elect a node lacking acknowledged writes,
		// as on the --join path (which refuses it until it is removed).
		if i := slices.IndexFunc(servers, func(s raft.Server) bool { return string(s.ID) == id && string(s.Address) != raftAddr }); i >= 0 && noState {
			return 0, fmt.Errorf("add voter %s: %w: it is a member at %s, and the node answering at %s holds none of this cluster's state; "+
				"remove it first (relayctl cluster remove %s), then add it", id, ErrVoterMoveWithoutState, servers[i].Address, raftAddr, id)
		}
	}
	// Once gated apply is on (fsm.EnableGatedApply), apply ignores the
	// fields of a feature some node record does not list: a node must
	// have a record before it applies its first entry as a member, or a
	// node of a release without a feature would not count. So it gets
	// one (addresses, no features) before the configuration change, if
	// it has none; it records its features itself once it runs. (Such a
	// record may lack the API address, which only a release with gated
	// apply takes: an older node that replays the entry refuses it and
	// lacks its own record until it writes it, which changes nothing it
	// applies, since it does not gate.)
	created := false
	on, err := n.fsm.GatedApply()
	if err != nil {
		return 0, fmt.Errorf("add voter %s: %w", id, err)
	}
	rec, err := n.fsm.GetNode(id)
	if err != nil && !errors.Is(err, fsm.ErrNotFound) {
		return 0, fmt.Errorf("add voter %s: %w", id, err)
	}
	if on && rec == nil {
		if _, err := n.Apply(ctx, &statev1.Command{Op: &statev1.Command_PutNode{PutNode: &statev1.PutNode{
			Node: &statev1.Node{Id: id, RaftAddr: raftAddr, ApiAddr: apiAddr}}}}); err != nil {
			return 0, fmt.Errorf("add voter %s: record it: %w", id, err)
		}
		created = true
	}
	f := n.raft.AddVoter(raft.ServerID(id), raft.ServerAddress(raftAddr), 0, timeoutOf(ctx, n.cfg.ApplyTimeout))
	if err := f.Error(); err != nil {
		if created && !n.HasMember(id) {
			// A record of no member keeps the features it does not list
			// from being used (until the leader's reconcileNodes): forget
			// it, also when ctx ended (an enqueue timeout ends with it).
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), probeTimeout)
			if rerr := n.forgetNode(cctx, id); rerr != nil {
				n.log.Warn("forget the record of a voter not added", "id", id, "err", rerr)
			}
			cancel()
		}
		return 0, mapRaftErr("add voter "+id, err)
	}
	// The record is left as it is when it has these addresses: it may
	// hold what only the node writes once it runs (its features), which
	// tells the cluster check it ran (newMember). Rewritten without them,
	// a node that lost its data and was asked for again would be taken
	// back as new.
	if rec, err := n.fsm.GetNode(id); apiAddr != "" && (err != nil || rec.GetRaftAddr() != raftAddr || rec.GetApiAddr() != apiAddr) {
		if _, err := n.Apply(ctx, &statev1.Command{Op: &statev1.Command_PutNode{PutNode: &statev1.PutNode{
			Node: &statev1.Node{Id: id, RaftAddr: raftAddr, ApiAddr: apiAddr}}}}); err != nil {
			return f.Index(), fmt.Errorf("record addresses of %s: %w", id, err)
		}
	}
	n.log.Info("added voter", "id", id, "raft_addr", raftAddr, "api_addr", apiAddr)
	return f.Index(), nil
}

// probeTimeout bounds AddVoter's probe of the new voter's address.
const probeTimeout = 5 * time.Second

// RemoveServer removes a member; this node must be the leader. Removing
// the leader itself makes it step down once the change commits.
func (n *Node) RemoveServer(ctx context.Context, id string) (uint64, error) {
	if err := n.requireLeader(); err != nil {
		return 0, err
	}
	n.membership.Lock()
	defer n.membership.Unlock()
	// hashicorp/raft takes an id it does not know as done: a mistyped id
	// would be reported removed while the node meant stays a voter, and
	// the operator would go on to stop it and wipe its data.
	servers, err := n.servers()
	if err != nil {
		return 0, err
	}
	if !slices.ContainsFunc(servers, func(s raft.Server) bool { return string(s.ID) == id }) {
		return 0, fmt.Errorf("remove server %q: %w (relayctl cluster status lists the members)", id, ErrNotMember)
	}
	f := n.raft.RemoveServer(raft.ServerID(id), 0, timeoutOf(ctx, n.cfg.ApplyTimeout))
	if err := f.Error(); err != nil {
		return 0, mapRaftErr("remove server "+id, err)
	}
	n.log.Info("removed server", "id", id)
	if id != n.cfg.NodeID {
		if _, err := n.Apply(ctx, &statev1.Command{Op: &statev1.Command_RemoveNode{RemoveNode: &statev1.RemoveNode{Id: id}}}); err != nil {
			n.log.Warn("forget removed node's addresses", "id", id, "err", err)
		}
	}
	return f.Index(), nil
}

// TransferLeadership hands leadership to the voter with the given id, or
// to the most up-to-date one when id is empty; this node must be the
// leader. It returns the new leader's id.
func (n *Node) TransferLeadership(ctx context.Context, id string) (string, error) {
	if err := n.requireLeader(); err != nil {
		return "", err
	}
	var f raft.Future
	if id == "" {
		f = n.raft.LeadershipTransfer()
	} else {
		var addr raft.ServerAddress
		servers, err := n.servers()
		if err != nil {
			return "", err
		}
		for _, s := range servers {
			if string(s.ID) == id && s.Suffrage == raft.Voter {
				addr = s.Address
			}
		}
		if addr == "" {
			return "", fmt.Errorf("transfer leadership to %q: %w (not a voter)", id, ErrNotMember)
		}
		f = n.raft.LeadershipTransferToServer(raft.ServerID(id), addr)
	}
	if err := f.Error(); err != nil {
		if errors.Is(err, raft.ErrLeadershipTransferInProgress) {
			// Another hand-over (a graceful stop's) is under way. Not
			// taken as "not the leader", which the API retries on the next
			// leader: that would hand leadership on a second time.
			return "", fmt.Errorf("transfer leadership: %w: another transfer is under way; retry once it is done", ErrNoLeader)
		}
		return "", mapRaftErr("transfer leadership", err)
	}
	// Wait until this node has seen the new leader.
	for {
		if lid, _ := n.Leader(); lid != "" && lid != n.cfg.NodeID {
			n.log.Info("transferred leadership", "to", lid)
			return lid, nil
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("transfer leadership: wait for new leader: %w", ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// Snapshot asks Raft to take a snapshot now and compact its log.
func (n *Node) Snapshot() error {
	if err := n.raft.Snapshot().Error(); err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	return nil
}

// Shutdown stops the node: StepDown first (a leader with other voters
// hands leadership over, the node withdraws its features; bounded by
// ctx), then Raft stops and the stores close. It is safe to call more
// than once.
func (n *Node) Shutdown(ctx context.Context) error {
	return n.stop(ctx, true)
}

// Kill stops the node abruptly, as a crash would: no leadership transfer,
// nothing sent to peers. The stores are closed so the same data dir can be
// opened again. Meant for fault tests.
func (n *Node) Kill() error {
	return n.stop(context.Background(), false)
}

// StepDown does what a graceful stop asks of the cluster, while the node
// still runs: a leader with other voters hands leadership over (bounded
// by ctx and 5 s), and the node withdraws its features once
// (withdrawFeatures). A server calls it before it closes its API, so
// that writes forwarded to this node keep being answered during the
// hand-over; Shutdown calls it again, which hands leadership over again
// if the node was elected meanwhile.
func (n *Node) StepDown(ctx context.Context) {
	if n.raft == nil || n.shutdown.Load() {
		return
	}
	if n.IsLeader() && n.otherVoters() > 0 {
		tctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if lid, err := n.TransferLeadership(tctx, ""); err != nil {
			n.log.Warn("leadership transfer before shutdown failed", "err", err)
		} else {
			n.log.Info("handed leadership over before shutdown", "to", lid)
		}
		cancel()
	}
	n.withdrawOnce.Do(func() { n.withdrawFeatures(ctx) })
}

func (n *Node) stop(ctx context.Context, graceful bool) error {
	n.closeOnce.Do(func() {
		if n.gate != nil {
			// Raft's main loop may wait in it, and the steps below need
			// that loop.
			n.gate.stop()
		}
		if graceful {
			n.StepDown(ctx)
		}
		n.drainApplies(ctx)
		if n.cancel != nil {
			n.cancel()
		}
		var errs []error
		if n.raft != nil {
			if err := n.raft.Shutdown().Error(); err != nil {
				errs = append(errs, fmt.Errorf("raft shutdown: %w", err))
			}
		}
		close(n.raftDown) // applies Raft will not answer now end (await)
		n.wg.Wait()
		n.trans.CloseStreams()
		if err := n.trans.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close transport: %w", err))
		}
		n.trans = nil
		if err := n.closeStores(); err != nil {
			errs = append(errs, err)
		}
		n.closeErr = errors.Join(errs...)
		n.log.Info("control node stopped")
	})
	return n.closeErr
}

// drainApplies refuses new applies and waits, bounded by ctx and the
// apply timeout, for those in flight: while Raft runs, each gets an
// answer (committed, or leadership lost); after Raft stops, one still
// queued would never get any.
func (n *Node) drainApplies(ctx context.Context) {
	n.applyMu.Lock()
	n.shutdown.Store(true)
	n.applyMu.Unlock()
	done := make(chan struct{})
	// After a timed-out drain this waiter lives on until the last apply
	// returns; an apply Raft never answers (hashicorp/raft#498) keeps it,
	// like its caller, waiting. Only a drain that timed out can leave it.
	go func() {
		n.applies.Wait()
		close(done)
	}()
	t := time.NewTimer(n.cfg.ApplyTimeout)
	defer t.Stop()
	select {
	case <-done:
	case <-ctx.Done():
		n.log.Warn("stopping with Raft applies still in flight", "err", ctx.Err())
	case <-t.C:
		n.log.Warn("stopping with Raft applies still in flight", "waited", n.cfg.ApplyTimeout)
	}
}

// withdrawFeatures empties the features in this node's record as it
// stops gracefully. The binary started on its data next may be of an
// older release (a rollback): until that one records its own features,
// the record would promise what it may not apply, and a gated command
// (MembersWithout) committed meanwhile would be applied unchecked there.
//
// Registration ends first, or it would write them back. After the
// withdrawal commits the node waits withdrawSettle and then applies what
// the leader has committed (a read barrier): a gated write whose check
// came just before the withdrawal was visible commits within that time,
// and is applied here, by this release, before the node stops. A
// registration forwarded before the stop that commits after the
// withdrawal is caught there too and withdrawn again.
//
// Best effort and bounded by ctx: skipped in a cluster of one voter,
// without a known leader (the last node of a cluster being stopped),
// and while a member runs a release that does not know the command
// (its gates are closed anyway). A crash leaves the record as it was.
func (n *Node) withdrawFeatures(ctx context.Context) {
	if n.regCancel != nil {
		n.regCancel()
		select {
		case <-n.regDone:
		case <-ctx.Done():
			return
		}
	}
	if len(n.cfg.Features) == 0 || n.otherVoters() == 0 || !n.leaderKnown() || !n.isMember() {
		return
	}
	if older, err := n.membersUnableToWithdraw(); err != nil || len(older) > 0 {
		n.log.Info("features not withdrawn before shutdown: not every member knows how", "members_without", older, "err", err)
		return
	}
	wctx, cancel := context.WithTimeout(ctx, withdrawTimeout)
	defer cancel()
	for attempt := range 2 {
		// A request id of its own each time (a second one under the
		// first's id would only get the first's outcome back), and one
		// attempt each, not Apply's retries: with no quorum left there
		// is nothing to wait for.
		data, err := proto.Marshal(&statev1.Command{RequestId: newRequestID(), ProposedAtMs: time.Now().UnixMilli(),
			Op: &statev1.Command_PutNode{PutNode: &statev1.PutNode{Node: &statev1.Node{Id: n.cfg.NodeID}, WithdrawFeatures: true}}})
		if err != nil {
			n.log.Warn("withdraw features before shutdown", "err", err)
			return
		}
		res, err := n.applyOnce(wctx, data)
		if err == nil {
			err = fsm.ResultError(res)
		}
		if err == nil {
			t := time.NewTimer(withdrawSettle)
			select {
			case <-t.C:
				err = n.Barrier(wctx)
			case <-wctx.Done():
				t.Stop()
				err = wctx.Err()
			}
		}
		if errors.Is(err, ErrRemoved) {
			// Removed a moment ago, before it noticed: the cluster counts
			// no features of a node it no longer has.
			n.log.Info("features not withdrawn before shutdown: this node is no longer a member")
			return
		}
		if err != nil {
			n.log.Warn("could not withdraw this node's features before shutdown: until it records them again, "+
				"the cluster counts on them", "features", n.cfg.Features, "err", err)
			return
		}
		if n.afterWithdraw != nil {
			n.afterWithdraw(attempt)
		}
		if rec, err := n.fsm.GetNode(n.cfg.NodeID); err != nil || len(rec.GetFeatures()) == 0 {
			n.log.Info("withdrew this node's features before shutdown")
			return
		}
	}
	n.log.Warn("this node's features were recorded again after their withdrawal before shutdown", "features", n.cfg.Features)
}

// membersUnableToWithdraw returns the members whose release would not
// apply PutNode.withdraw_features as such: those that neither list the
// feature nor withdrew their features themselves (a member stopped
// gracefully before this one still knows the command).
func (n *Node) membersUnableToWithdraw() ([]string, error) {
	servers, err := n.servers()
	if err != nil {
		return nil, err
	}
	missing, err := n.onlyMembersWithout(servers, fsm.FeatureWithdrawFeatures)
	if err != nil {
		return nil, err
	}
	return slices.DeleteFunc(missing, func(id string) bool {
		rec, err := n.fsm.GetNode(id)
		return err == nil && rec.GetFeaturesWithdrawn()
	}), nil
}

// withdrawTimeout bounds withdrawFeatures, withdrawSettle is its wait for
// gated writes checked before the withdrawal was visible.
const (
	withdrawTimeout = 3 * time.Second
	withdrawSettle  = 250 * time.Millisecond
)

// servers returns the members of the Raft configuration.
func (n *Node) servers() ([]raft.Server, error) {
	cf := n.raft.GetConfiguration()
	if err := cf.Error(); err != nil {
		return nil, mapRaftErr("read configuration", err)
	}
	return cf.Configuration().Servers, nil
}

func (n *Node) otherVoters() int {
	servers, _ := n.servers()
	c := 0
	for _, s := range servers {
		if s.Suffrage == raft.Voter && string(s.ID) != n.cfg.NodeID {
			c++
		}
	}
	return c
}

func (n *Node) closeStores() error {
	var errs []error
	if n.trans != nil {
		n.trans.CloseStreams()
		_ = n.trans.Close()
		n.trans = nil
	}
	if n.logs != nil {
		if err := n.logs.Close(); err != nil {
			errs = append(errs, err)
		}
		n.logs = nil
	}
	if n.state != nil {
		if err := n.state.Close(); err != nil {
			errs = append(errs, err)
		}
		n.state = nil
	}
	return errors.Join(errs...)
}

// HasMember reports whether the node id is in the latest configuration
// this node knows.
func (n *Node) HasMember(id string) bool {
	servers, _ := n.servers()
	return slices.ContainsFunc(servers, func(s raft.Server) bool { return string(s.ID) == id })
}

// IsMemberOrHasState reports whether this node already belongs to a
// cluster (it has Raft state or appears in a configuration), in which case
// joining again is unnecessary.
func (n *Node) IsMemberOrHasState() bool {
	if n.isMember() {
		return true
	}
	last, err := n.raftLastIndex()
	return err == nil && last > 0
}

func (n *Node) raftLastIndex() (uint64, error) {
	return n.raft.LastIndex(), nil
}

// ReadMode chooses the consistency of a read.
type ReadMode int

const (
	// Linearizable reads reflect every write acknowledged before the read
	// started, on any node (the default everywhere in the API).
	Linearizable ReadMode = iota
	// Stale reads answer from this node's state as it is, without
	// contacting the leader: they keep working without a quorum but may
	// miss recent writes (never return uncommitted ones).
	Stale
)

// String names the mode as the API and logs spell it.
func (m ReadMode) String() string {
	if m == Stale {
		return "stale"
	}
	return "linearizable"
}

// Read prepares a read in the given mode and returns the state machine to
// read from: for Linearizable it first waits for a read barrier.
func (n *Node) Read(ctx context.Context, mode ReadMode) (*fsm.FSM, error) {
	if n.shutdown.Load() {
		return nil, ErrShutdown
	}
	if mode == Linearizable {
		if err := n.Barrier(ctx); err != nil {
			return nil, err
		}
	}
	return n.fsm, nil
}

// MembersWithout returns, sorted, the members (voters or not: each
// applies the log) whose record in this node's state does not list
// feature (fsm.Features): nodes of an older release, ones that have not
// recorded themselves yet, and ones that stopped gracefully and have not
// recorded themselves since (withdrawFeatures); and the nodes that have a
// record without it but are not members (one AddVoter is adding, one
// that left and is not forgotten yet), since apply counts every record.
// A feature that writes commands an older release would apply
// differently waits until it is empty, so that every replica applies
// those commands alike.
func (n *Node) MembersWithout(feature string) ([]string, error) {
	servers, err := n.servers()
	if err != nil {
		return nil, err
	}
	return n.membersWithout(servers, feature)
}

// EveryMemberHas reports whether every member's record, and every other
// record, lists feature (MembersWithout is empty): whether a command
// that carries the feature's fields may be written. For a feature gated
// at apply (fsm.GatedAtApply) gated apply must be on too, so that apply
// checks the records as well, not only this replica's possibly older
// copy. False when the members cannot be read.
func (n *Node) EveryMemberHas(feature string) bool {
	missing, err := n.MembersWithout(feature)
	if err != nil || len(missing) > 0 {
		return false
	}
	if fsm.GatedAtApply(feature) {
		on, err := n.fsm.GatedApply()
		return err == nil && on
	}
	return true
}

// membersWithout is MembersWithout over a configuration already read.
func (n *Node) membersWithout(servers []raft.Server, feature string) ([]string, error) {
	out, err := n.onlyMembersWithout(servers, feature)
	if err != nil {
		return nil, err
	}
	// Apply counts every record (gated apply), members or not: a record
	// of a node that is not a member (yet, or any more) counts here too,
	// so that what a proposer writes is what apply takes.
	recs, err := n.fsm.Nodes()
	if err != nil {
		return nil, err
	}
	for _, r := range recs {
		if !slices.Contains(r.GetFeatures(), feature) && !slices.Contains(out, r.GetId()) {
			out = append(out, r.GetId())
		}
	}
	slices.Sort(out)
	return out, nil
}

// onlyMembersWithout is membersWithout without the records of nodes that
// are not members: for what concerns the members alone (the cluster
// check, the withdrawal of features), which a record left by an add in
// progress must not hold back.
func (n *Node) onlyMembersWithout(servers []raft.Server, feature string) ([]string, error) {
	var out []string
	for _, s := range servers {
		rec, err := n.fsm.GetNode(string(s.ID))
		if err != nil && !errors.Is(err, fsm.ErrNotFound) {
			return nil, err
		}
		if rec == nil || !slices.Contains(rec.GetFeatures(), feature) {
			out = append(out, string(s.ID))
		}
	}
	slices.Sort(out)
	return out, nil
}
