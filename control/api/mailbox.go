package api

import (
	"context"
	"fmt"
	"iter"
	"net/http"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// MaxFetch is FetchMailbox's default and largest page.
const MaxFetch = 256

// MailboxConfig tunes MailboxService.
type MailboxConfig struct {
	// MaxEntriesPerDevice and MaxBytesPerDevice are each device's quotas
	// (entries, and summed event bytes). Defaults fsm.DefaultMailboxMaxEntries
	// (1000) and fsm.DefaultMailboxMaxBytes (4 MiB). They travel in every
	// PutMailbox command, so the proposing node's values apply.
	MaxEntriesPerDevice uint64
	MaxBytesPerDevice   uint64
	// ClaimRecordGrace is how long a claim's record outlives its event
	// [DefaultClaimRecordGrace; at most a day]: far longer than an edge
	// retries a claim batch (30 s) or a leader change takes, so that a
	// claim that comes late finds who took the event.
	ClaimRecordGrace time.Duration
	// Fetches bounds the FetchMailbox calls the node reads and answers at
	// once (see FetchLimits; default 64, 16 per edge).
	Fetches FetchLimits
	// Now is the clock; default time.Now.
	Now func() time.Time
	// Metrics registers the service's metrics; nil disables them.
	Metrics prometheus.Registerer
}

func (c *MailboxConfig) applyDefaults() {
	if c.MaxEntriesPerDevice == 0 {
		c.MaxEntriesPerDevice = fsm.DefaultMailboxMaxEntries
	}
	if c.MaxBytesPerDevice == 0 {
		c.MaxBytesPerDevice = fsm.DefaultMailboxMaxBytes
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.ClaimRecordGrace <= 0 {
		c.ClaimRecordGrace = DefaultClaimRecordGrace
	}
	c.ClaimRecordGrace = min(c.ClaimRecordGrace, time.Duration(fsm.MaxClaimRecordGraceMs)*time.Millisecond)
}

// MailboxServer serves MailboxService: events waiting for devices that
// are on no edge.
type MailboxServer struct {
	node    *raftnode.Node
	cfg     MailboxConfig
	entries *prometheus.CounterVec
	claims  *prometheus.CounterVec
	fetches *fetchLimiter
}

var _ edgev1connect.MailboxServiceHandler = (*MailboxServer)(nil)

// DefaultClaimRecordGrace is MailboxConfig.ClaimRecordGrace's default.
const DefaultClaimRecordGrace = 10 * time.Minute

// PurgeLimit is the purge_limit of a command that deletes or revokes
// devices: their mailboxes are emptied fsm.DefaultPurgeLimit entries at
// a time once every member applies that (feature mailbox_purge), all in
// the command's entry until then.
func PurgeLimit(node *raftnode.Node) uint32 {
	if node.EveryMemberHas(fsm.FeatureMailboxPurge) {
		return fsm.DefaultPurgeLimit
	}
	return 0
}

// NewMailboxServer returns the MailboxService handler.
func NewMailboxServer(node *raftnode.Node, cfg MailboxConfig) *MailboxServer {
	cfg.applyDefaults()
	s := &MailboxServer{node: node, cfg: cfg, fetches: newFetchLimiter(cfg.Fetches),
		entries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_control_mailbox_put_entries_total",
			Help: "Mailbox entries proposed through this node, by outcome (stored, full, target_gone, expired, taken).",
		}, []string{"status"}),
		claims: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_control_event_claims_total",
			Help: "Claims of \"any one\" events proposed through this node, by outcome (won, lost).",
		}, []string{"outcome"}),
	}
	for _, l := range statusLabel { // every outcome exists from the start, for rate()
		s.entries.WithLabelValues(l)
	}
	s.claims.WithLabelValues("won")
	s.claims.WithLabelValues("lost")
	if cfg.Metrics != nil {
		cfg.Metrics.MustRegister(s.entries, s.claims)
		s.fetches.register(cfg.Metrics)
	}
	return s
}

// Handler returns MailboxService's path and HTTP handler (as
// edgev1connect.NewMailboxServiceHandler), which keeps a FetchMailbox
// call's place (MailboxConfig.Fetches) until its answer is written.
func (s *MailboxServer) Handler(opts ...connect.HandlerOption) (string, http.Handler) {
	path, h := edgev1connect.NewMailboxServiceHandler(s, opts...)
	return path, s.fetches.wrap(h)
}

var statusToAPI = map[statev1.MailboxStatus]edgev1.MailboxStatus{
	statev1.MailboxStatus_MAILBOX_STATUS_STORED:      edgev1.MailboxStatus_MAILBOX_STATUS_STORED,
	statev1.MailboxStatus_MAILBOX_STATUS_FULL:        edgev1.MailboxStatus_MAILBOX_STATUS_FULL,
	statev1.MailboxStatus_MAILBOX_STATUS_TARGET_GONE: edgev1.MailboxStatus_MAILBOX_STATUS_TARGET_GONE,
	statev1.MailboxStatus_MAILBOX_STATUS_EXPIRED:     edgev1.MailboxStatus_MAILBOX_STATUS_EXPIRED,
	statev1.MailboxStatus_MAILBOX_STATUS_TAKEN:       edgev1.MailboxStatus_MAILBOX_STATUS_TAKEN,
}

var statusLabel = map[edgev1.MailboxStatus]string{
	edgev1.MailboxStatus_MAILBOX_STATUS_STORED:      "stored",
	edgev1.MailboxStatus_MAILBOX_STATUS_FULL:        "full",
	edgev1.MailboxStatus_MAILBOX_STATUS_TARGET_GONE: "target_gone",
	edgev1.MailboxStatus_MAILBOX_STATUS_EXPIRED:     "expired",
	edgev1.MailboxStatus_MAILBOX_STATUS_TAKEN:       "taken",
}

// MaxCommandEventBytes bounds the event bytes of one PutMailbox command
// the API proposes (a command holds at least one entry): a call of more,
// up to fsm.MaxMailboxBatchBytes, goes as several commands, one after the
// other. Raft sends a lagging follower up to 64 entries in one
// AppendEntries, which both ends hold in memory several times over (read
// from the log, decoded, batched into two stores): of 8 MiB commands, as
// edges sent before their batches were bound to this, a follower catching
// up took gigabytes at once (docs/benchmarks.md, "A follower catching up
// on large mailbox writes").
const MaxCommandEventBytes = 1 << 20

// mailboxCommands yields entries in consecutive runs of at most
// MaxCommandEventBytes of events, each of at least one entry.
func mailboxCommands(entries []*statev1.MailboxEntry) iter.Seq[[]*statev1.MailboxEntry] {
	return func(yield func([]*statev1.MailboxEntry) bool) {
		start, size := 0, 0
		for i, e := range entries {
			if n := len(e.GetEvent()); i > start && size+n > MaxCommandEventBytes {
				if !yield(entries[start:i:i]) {
					return
				}
				start, size = i, 0
			}
			size += len(e.GetEvent())
		}
		if start < len(entries) {
			yield(entries[start:])
		}
	}
}

// PutMailbox stores a batch (in one Raft entry, or in several for one of
// more than MaxCommandEventBytes, in order, as consecutive calls would:
// other commands may apply between them, an ack of what the first stored
// among them) and answers each entry's outcome.
func (s *MailboxServer) PutMailbox(ctx context.Context, req *connect.Request[edgev1.PutMailboxRequest]) (*connect.Response[edgev1.PutMailboxResponse], error) {
	in := req.Msg.GetEntries()
	if len(in) == 0 || len(in) > fsm.MaxMailboxBatch {
		return nil, invalidArg(fmt.Errorf("entries holds %d entries, want 1 to %d per call", len(in), fsm.MaxMailboxBatch))
	}
	now := s.cfg.Now().UnixMilli()
	out := make([]*statev1.MailboxEntry, len(in))
	total := 0
	for i, e := range in {
		se := &statev1.MailboxEntry{
			DeviceId: e.GetDeviceId(), UserId: e.GetUserId(), Event: e.GetEvent(),
			EventId: e.GetEventId(), SenderDeviceId: e.GetSenderDeviceId(), ExpiresAtMs: e.GetExpiresAtMs(),
			AnyOne: e.GetAnyOne(), Traceparent: e.GetTraceparent(),
		}
		if err := fsm.ValidateMailboxEntry(fmt.Sprintf("entries[%d]", i), se, now); err != nil {
			return nil, invalidArg(err)
		}
		total += len(se.Event)
		out[i] = se
	}
	if total > fsm.MaxMailboxBatchBytes {
		return nil, invalidArg(fmt.Errorf("entries hold %d event bytes, at most %d per call", total, fsm.MaxMailboxBatchBytes))
	}
	replace := s.node.EveryMemberHas(fsm.FeatureMailboxReplaceExpired)
	var results []*statev1.MailboxResult
	var rev uint64
	for chunk := range mailboxCommands(out) {
		// Each command at the time it is proposed: a later one stamped
		// with the call's start would be decided (expiry, a stale copy
		// replaced) by an older clock, and the leader refuses stamps a
		// minute off.
		stamp := max(now, s.cfg.Now().UnixMilli())
		res, err := s.node.Apply(ctx, &statev1.Command{ProposedAtMs: stamp, Op: &statev1.Command_PutMailbox{PutMailbox: &statev1.PutMailbox{
			Entries: chunk, MaxEntriesPerDevice: s.cfg.MaxEntriesPerDevice, MaxBytesPerDevice: s.cfg.MaxBytesPerDevice,
			ReplaceExpired: replace,
		}}})
		if err != nil {
			// What earlier commands stored stays; the caller's retry of
			// the whole call is answered STORED with the same seqs for
			// what is still stored (what was acked meanwhile is stored
			// again: delivery is at least once).
			return nil, toConnect(err)
		}
		if len(res.GetMailboxResults()) != len(chunk) {
			return nil, toConnect(fmt.Errorf("put mailbox: %d results for %d entries", len(res.GetMailboxResults()), len(chunk)))
		}
		results = append(results, res.GetMailboxResults()...)
		rev = res.GetRevision()
	}
	resp := &edgev1.PutMailboxResponse{Revision: rev, Results: make([]*edgev1.PutMailboxResult, len(in))}
	for i, r := range results {
		st := statusToAPI[r.GetStatus()]
		resp.Results[i] = &edgev1.PutMailboxResult{Status: st, Seq: r.GetSeq()}
		if l, ok := statusLabel[st]; ok {
			s.entries.WithLabelValues(l).Inc()
		}
	}
	return connect.NewResponse(resp), nil
}

// FetchMailbox returns a device's unexpired entries after after_seq,
// oldest first, from a linearizable read.
func (s *MailboxServer) FetchMailbox(ctx context.Context, req *connect.Request[edgev1.FetchMailboxRequest]) (*connect.Response[edgev1.FetchMailboxResponse], error) {
	m := req.Msg
	if err := fsm.ValidateID("device_id", m.GetDeviceId()); err != nil {
		return nil, invalidArg(err)
	}
	limit := int(m.GetLimit())
	if limit <= 0 || limit > MaxFetch {
		limit = MaxFetch
	}
	f, err := s.node.Read(ctx, raftnode.Linearizable)
	if err != nil {
		return nil, toConnect(err)
	}
	// The page is read and held from here: the call takes a place first.
	done, err := s.fetches.acquire(ctx)
	if err != nil {
		return nil, err
	}
	defer done()
	// Read before the entries: everything applied by then is visible to
	// the read that follows, so the response covers this revision.
	rev := f.AppliedIndex()
	list, more, err := f.FetchMailbox(m.GetDeviceId(), m.GetAfterSeq(), limit, int(m.GetMaxBytes()), s.cfg.Now().UnixMilli())
	if err != nil {
		return nil, toConnect(err)
	}
	resp := &edgev1.FetchMailboxResponse{More: more, Revision: rev, Entries: make([]*edgev1.MailboxEntry, len(list))}
	for i, e := range list {
		resp.Entries[i] = &edgev1.MailboxEntry{
			Seq: e.GetSeq(), DeviceId: e.GetDeviceId(), UserId: e.GetUserId(), Event: e.GetEvent(),
			EventId: e.GetEventId(), SenderDeviceId: e.GetSenderDeviceId(), ExpiresAtMs: e.GetExpiresAtMs(),
			AnyOne: e.GetAnyOne(), Traceparent: e.GetTraceparent(),
		}
	}
	return connect.NewResponse(resp), nil
}

// AckMailbox deletes a device's entries in one Raft entry.
func (s *MailboxServer) AckMailbox(ctx context.Context, req *connect.Request[edgev1.AckMailboxRequest]) (*connect.Response[edgev1.AckMailboxResponse], error) {
	m := req.Msg
	if err := fsm.ValidateID("device_id", m.GetDeviceId()); err != nil {
		return nil, invalidArg(err)
	}
	if len(m.GetSeqs()) > fsm.MaxMailboxAck {
		return nil, invalidArg(fmt.Errorf("seqs holds %d seqs, at most %d per call", len(m.GetSeqs()), fsm.MaxMailboxAck))
	}
	if len(m.GetSeqs()) == 0 {
		return connect.NewResponse(&edgev1.AckMailboxResponse{}), nil
	}
	if h := m.GetHistory(); h != "" {
		// A restore replaces a node's whole state, so the history read
		// here is the one the command applies in.
		cur, err := s.node.FSM().History()
		if err != nil {
			return nil, toConnect(err)
		}
		if h != cur {
			return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("the seqs are of history %q, the control plane's is %q (restored from a backup since): they name other entries here", h, cur))
		}
	}
	if _, err := s.node.Apply(ctx, &statev1.Command{Op: &statev1.Command_AckMailbox{AckMailbox: &statev1.AckMailbox{
		DeviceId: m.GetDeviceId(), Seqs: m.GetSeqs(),
	}}}); err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&edgev1.AckMailboxResponse{}), nil
}

// ClaimEvents decides "any one" events in one Raft entry: each claim wins
// or loses against the state as the earlier claims left it, and a winning
// first claim deletes the event's entries from the other devices'
// mailboxes in the same entry.
func (s *MailboxServer) ClaimEvents(ctx context.Context, req *connect.Request[edgev1.ClaimEventsRequest]) (*connect.Response[edgev1.ClaimEventsResponse], error) {
	in := req.Msg.GetClaims()
	if len(in) == 0 || len(in) > fsm.MaxClaimBatch {
		return nil, invalidArg(fmt.Errorf("claims holds %d claims, want 1 to %d per call", len(in), fsm.MaxClaimBatch))
	}
	now := s.cfg.Now().UnixMilli()
	out := make([]*statev1.EventClaim, len(in))
	for i, c := range in {
		sc := &statev1.EventClaim{
			SenderDeviceId: c.GetSenderDeviceId(), EventId: c.GetEventId(),
			DeviceId: c.GetDeviceId(), UserId: c.GetUserId(), ExpiresAtMs: c.GetExpiresAtMs(),
		}
		if err := fsm.ValidateEventClaim(fmt.Sprintf("claims[%d]", i), sc, now); err != nil {
			return nil, invalidArg(err)
		}
		out[i] = sc
	}
	claims := &statev1.ClaimEvents{Claims: out}
	if s.node.EveryMemberHas(fsm.FeatureClaimRecordGrace) {
		claims.RecordGraceMs = s.cfg.ClaimRecordGrace.Milliseconds()
	}
	res, err := s.node.Apply(ctx, &statev1.Command{ProposedAtMs: now, Op: &statev1.Command_ClaimEvents{ClaimEvents: claims}})
	if err != nil {
		return nil, toConnect(err)
	}
	if len(res.GetClaimsWon()) != len(in) {
		return nil, toConnect(fmt.Errorf("claim events: %d outcomes for %d claims", len(res.GetClaimsWon()), len(in)))
	}
	for _, won := range res.GetClaimsWon() {
		if won {
			s.claims.WithLabelValues("won").Inc()
		} else {
			s.claims.WithLabelValues("lost").Inc()
		}
	}
	return connect.NewResponse(&edgev1.ClaimEventsResponse{Revision: res.GetRevision(), Won: res.GetClaimsWon()}), nil
}
