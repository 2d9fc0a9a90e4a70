package api

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/edge-relay/relay/control/auth"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// WatchConfig tunes the watch feed.
type WatchConfig struct {
	// ProgressInterval: an idle stream gets a Progress message this often.
	// Default 5s.
	ProgressInterval time.Duration
	// SendTimeout: a watcher that does not take a message for this long is
	// cut off (it resumes from its last revision). Default 10s.
	SendTimeout time.Duration
	// BatchLimit: changes read per query of the change feed. Default 512.
	BatchLimit int
	// LeaderTimeout: a node that has not heard from a leader for this long
	// (cut off from the cluster's majority: its state no longer follows the
	// writes) claims no progress. It ends its streams instead, and opens
	// no full copy, so the edges move to a node that can vouch for what it
	// sends. Default 5s (heartbeats come every tenth of Raft's heartbeat
	// timeout).
	LeaderTimeout time.Duration
	// CatchUpWait: a watch resumed from a revision this node has not
	// applied yet (it lags: replaying its log, installing a snapshot, a
	// slow disk) waits this long for it, counted from the request, then
	// ends with Unavailable so that the watcher resumes on another node
	// instead of hearing nothing for as long as this one lags. Below the
	// edges' stall timeout (8 s). Default 3s.
	CatchUpWait time.Duration
	// Logger; default slog.Default().
	Logger *slog.Logger
	// Metrics registers the feed's metrics; nil disables them.
	Metrics prometheus.Registerer
}

func (c *WatchConfig) applyDefaults() {
	if c.ProgressInterval <= 0 {
		c.ProgressInterval = 5 * time.Second
	}
	if c.SendTimeout <= 0 {
		c.SendTimeout = 10 * time.Second
	}
	if c.BatchLimit <= 0 {
		c.BatchLimit = 512
	}
	if c.LeaderTimeout <= 0 {
		c.LeaderTimeout = 5 * time.Second
	}
	if c.CatchUpWait <= 0 {
		c.CatchUpWait = 3 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// WatchServer serves WatchService: the revisioned change feed edges
// follow.
type WatchServer struct {
	node *raftnode.Node
	cfg  WatchConfig
	// stopped ends with Close: open streams end, and so do their waits.
	stopped context.Context
	stop    context.CancelFunc
	streams prometheus.Gauge
	cutoffs prometheus.Counter
	resyncs prometheus.Counter
}

var _ edgev1connect.WatchServiceHandler = (*WatchServer)(nil)

// NewWatchServer returns the WatchService handler.
func NewWatchServer(node *raftnode.Node, cfg WatchConfig) *WatchServer {
	cfg.applyDefaults()
	stopped, stop := context.WithCancel(context.Background())
	s := &WatchServer{node: node, cfg: cfg, stopped: stopped, stop: stop,
		streams: prometheus.NewGauge(prometheus.GaugeOpts{Name: "relay_control_watch_streams", Help: "Open watch streams."}),
		cutoffs: prometheus.NewCounter(prometheus.CounterOpts{Name: "relay_control_watch_cutoffs_total", Help: "Watch streams ended because the watcher stopped reading."}),
		resyncs: prometheus.NewCounter(prometheus.CounterOpts{Name: "relay_control_watch_resyncs_total", Help: "Full copies sent to watchers (new, or behind the compacted horizon)."}),
	}
	if cfg.Metrics != nil {
		cfg.Metrics.MustRegister(s.streams, s.cutoffs, s.resyncs)
	}
	return s
}

// Close ends every open stream (with Unavailable, so watchers resume on
// another node) and refuses new ones. A server shutting down calls it
// first: streams would otherwise hold the shutdown until its timeout.
func (s *WatchServer) Close() {
	if s.stopped.Err() == nil {
		s.cfg.Logger.Info("watch streams end: the node is stopping")
	}
	s.stop()
}

type responseControllerKey struct{}

// WithResponseController gives streaming handlers the response's
// http.ResponseController, through which the watch feed sets a write
// deadline per message. Wrap the API's HTTP handler with it.
func WithResponseController(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), responseControllerKey{}, rc)))
	})
}

// errTooSlow ends a stream whose reader stopped taking messages.
var errTooSlow = errors.New("watcher too slow")

// watchStream sends messages with a write deadline per message: when the
// client stops reading and HTTP/2 flow control holds a message for longer
// than the timeout, the write fails and the stream ends.
//
// Once the server closes (stopped), a message is not sent: the stream
// ends Unavailable, also in the middle of a full copy or of a run of full
// pages, which otherwise went on to their end (each message allowed the
// send timeout) while the node's shutdown waited for them.
//
// Nor once the stream's own context has ended with a cause (ended): the
// Authenticator ends it when the watcher's credentials lapse (its token
// expired, its account disabled, its session revoked), and connect's
// ServerStream.Send does not look at it. Without this check a full copy (the session-key ring,
// secrets included, comes after every user, device and edge) or a long
// catch-up went on to its end for a revoked watcher that kept reading;
// now it ends at the next message, with the cause, which the
// Authenticator answers Unauthenticated.
type watchStream struct {
	send    func(*edgev1.WatchResponse) error
	timeout time.Duration
	rc      *http.ResponseController // nil: no deadline possible
	stopped context.Context          // the server's; nil: never
	ctx     context.Context          // the stream's; nil: never ends
	last    uint64                   // revision of the last message taken by the transport
	copying bool                     // a full copy is under way (resync)
}

func (w *watchStream) Send(m *edgev1.WatchResponse) error {
	if w.stopped != nil && w.stopped.Err() != nil {
		if w.copying {
			return connect.NewError(connect.CodeUnavailable, errors.New("control node shutting down during a full copy; watch on another node"))
		}
		return shuttingDown(w.last)
	}
	if err := w.ended(); err != nil {
		return err
	}
	if w.rc != nil {
		_ = w.rc.SetWriteDeadline(time.Now().Add(w.timeout))
	}
	err := w.send(m)
	if w.rc != nil && err == nil {
		// An armed deadline would also fire on an idle stream.
		_ = w.rc.SetWriteDeadline(time.Time{})
	}
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) || connect.CodeOf(err) == connect.CodeDeadlineExceeded {
			return fmt.Errorf("%w: %v", errTooSlow, err)
		}
		return err
	}
	if m.GetRevision() > w.last {
		w.last = m.GetRevision()
	}
	return nil
}

// ended returns why the stream's context ended when something other than
// the request's own end ended it: the Authenticator, once the watcher's
// credentials lapsed, or a deadline the watcher set. It is nil while the
// context lasts, and also when the request itself ended (the watcher
// went away, or a write deadline reset the stream): the next write
// fails then, and says how (errTooSlow), where the context says only
// "canceled".
func (w *watchStream) ended() error {
	if w.ctx == nil || w.ctx.Err() == nil {
		return nil
	}
	if cause := context.Cause(w.ctx); !errors.Is(cause, context.Canceled) {
		return cause
	}
	return nil
}

// Watch streams changes after from_revision; see the service comment in
// proto/edge/v1/control.proto.
func (s *WatchServer) Watch(ctx context.Context, req *connect.Request[edgev1.WatchRequest], stream *connect.ServerStream[edgev1.WatchResponse]) error {
	if n := len(req.Msg.GetHistory()); n > fsm.MaxHistoryLen {
		return invalidArg(fmt.Errorf("history is %d bytes, at most %d", n, fsm.MaxHistoryLen))
	}
	rc, _ := ctx.Value(responseControllerKey{}).(*http.ResponseController)
	ws := &watchStream{send: stream.Send, timeout: s.cfg.SendTimeout, rc: rc, stopped: s.stopped, ctx: ctx}
	s.streams.Inc()
	defer s.streams.Dec()
	// A revoked watcher's stream ends at its next message, which one that
	// holds the message under way unread puts off by up to SendTimeout:
	// say when the revocation reached it.
	defer context.AfterFunc(ctx, func() {
		if cause := context.Cause(ctx); errors.Is(cause, errAccountGone) || errors.Is(cause, errSessionGone) {
			claims, _ := auth.ClaimsFrom(ctx)
			s.cfg.Logger.Info("watch stream ends at its next message: its credentials were revoked", "account", claims.Subject, "cause", cause)
		}
	})()
	err := s.watch(ctx, req.Msg.GetFromRevision(), req.Msg.GetHistory(), ws)
	if errors.Is(err, errTooSlow) {
		s.cutoffs.Inc()
		s.cfg.Logger.Warn("watch stream cut off: the watcher stopped reading", "last_revision", ws.last, "timeout", s.cfg.SendTimeout)
		// The stream is broken, so this rarely reaches the client; any
		// error tells it to resume from the last revision it applied.
		return connect.NewError(connect.CodeResourceExhausted,
			fmt.Errorf("no message taken for %s; resume from revision %d", s.cfg.SendTimeout, ws.last))
	}
	return err
}

func (s *WatchServer) watch(ctx context.Context, from uint64, history string, ws *watchStream) error {
	f := s.node.FSM()
	catchUp := time.Now().Add(s.cfg.CatchUpWait)
	if from > 0 {
		cur, err := f.History()
		if err != nil {
			return toConnect(err)
		}
		if history != cur {
			// The client followed the cluster before a restore from a
			// backup: revisions go on from the backup's, so its revision
			// names a point of another history, behind or ahead of this
			// one's. It gets a full copy.
			s.cfg.Logger.Warn("watch resumed from another history (the cluster was restored from a backup since); sending a full copy",
				"from_revision", from, "history", history, "cluster_history", cur)
			from = 0
		}
	}
	if from > f.AppliedIndex() && s.beyondLog(ctx, from, catchUp) {
		// The client followed another history: this cluster was restored
		// from a backup older than what it saw, and its revisions go on
		// from the backup's. Waiting would hold the client without a feed
		// until this history reached from, and then skip what it had up
		// to there: it gets a full copy instead.
		s.cfg.Logger.Warn("watch from a revision this cluster never reached; sending a full copy (was it restored from a backup?)",
			"from_revision", from, "applied_index", f.AppliedIndex())
		from = 0
	}
	// A watch resumed on a node that is behind must not go back in time:
	// wait until this replica has applied what the client already saw.
	if err := s.waitApplied(ctx, f, from, catchUp); err != nil {
		return err
	}
	last := from
	if from == 0 {
		if err := s.inContact(last); err != nil {
			return err
		}
		rev, err := s.resync(ws, f)
		if err != nil {
			return err
		}
		last = rev
	}
	progress := time.NewTicker(s.cfg.ProgressInterval)
	defer progress.Stop()
	// A resumed stream says as soon as it has caught up where the watcher
	// stands, instead of at the first tick: entries that are no change for
	// watchers (a new leader's no-op, activity, failed logins) may have
	// been applied since the watcher's revision, and the watcher would
	// otherwise learn that it is current only after ProgressInterval. A
	// full copy ends with its own revision (snapshot_done).
	caughtUp := from == 0
	// pos is where the next read of the feed starts. It is a (revision,
	// seq) position, not a revision: a page of BatchLimit changes may end
	// inside a revision, and the rest of that revision must follow.
	pos := fsm.ChangePos{Revision: last + 1}
	for {
		// A run of pages without a change for watchers sends nothing, so
		// watchStream.Send would not see the stream end.
		if err := ws.ended(); err != nil {
			return err
		}
		changed := f.Changed()
		changes, err := f.ChangesFrom(pos, s.cfg.BatchLimit)
		if errors.Is(err, fsm.ErrCompacted) {
			// A full copy, as for a new watcher: not from a node cut off
			// from the leader, whose copy may lack a revocation.
			if err := s.inContact(last); err != nil {
				return err
			}
			rev, err := s.resync(ws, f)
			if err != nil {
				return err
			}
			last = rev
			pos = fsm.ChangePos{Revision: last + 1}
			continue
		}
		if err != nil {
			return toConnect(err)
		}
		for _, c := range changes {
			if ev := eventOf(c); ev != nil {
				if err := ws.Send(&edgev1.WatchResponse{Revision: c.GetRevision(), Kind: &edgev1.WatchResponse_Event{Event: ev}}); err != nil {
					return err
				}
			}
			pos = fsm.After(c)
		}
		if len(changes) == s.cfg.BatchLimit {
			// The page may have ended inside a revision: read on before
			// claiming anything complete.
			continue
		}
		if pos.Seq > 0 {
			// A short page read everything up to the view's end, so the
			// revision of the last change read is complete: a progress
			// message tells the watcher it can resume from it without
			// missing the rest of it.
			last = pos.Revision
			pos = fsm.ChangePos{Revision: last + 1}
			if err := ws.Send(&edgev1.WatchResponse{Revision: last, Kind: &edgev1.WatchResponse_Progress{Progress: &edgev1.Progress{}}}); err != nil {
				return err
			}
			caughtUp = true
		}
		if !caughtUp {
			caughtUp = true
			// Not from a node cut off from the leader: the tick ends the
			// stream then, as it did before (a node that restarted and has
			// not heard from the leader yet gets its chance to).
			if s.leaderHeard() {
				var pending bool
				if last, pending, err = s.sendProgress(f, ws, last); err != nil {
					return err
				}
				if pending {
					continue
				}
				pos = fsm.ChangePos{Revision: last + 1}
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-s.stopped.Done():
			return shuttingDown(last)
		case <-changed:
		case <-progress.C:
			if err := s.inContact(last); err != nil {
				return err
			}
			var pending bool
			if last, pending, err = s.sendProgress(f, ws, last); err != nil {
				return err
			}
			if !pending {
				pos = fsm.ChangePos{Revision: last + 1}
			}
		}
	}
}

// sendProgress tells the watcher that every change up to the applied index
// has been sent, last being the revision of the last change sent. It
// claims only what has really been sent: it reads the applied index
// first, then makes sure no change after last exists; if one does
// (pending), it sends nothing and the caller goes round to send it.
// It returns the revision claimed, which is last or later.
func (s *WatchServer) sendProgress(f *fsm.FSM, ws *watchStream, last uint64) (claimed uint64, pending bool, err error) {
	applied := f.AppliedIndex()
	after, err := f.Changes(last, 1)
	if err != nil && !errors.Is(err, fsm.ErrCompacted) {
		return last, false, toConnect(err)
	}
	if err != nil || len(after) > 0 {
		return last, true, nil
	}
	// Entries with no change for watchers (noops, activity) up to applied.
	claimed = max(last, applied)
	if err := ws.Send(&edgev1.WatchResponse{Revision: claimed, Kind: &edgev1.WatchResponse_Progress{Progress: &edgev1.Progress{}}}); err != nil {
		return last, false, err
	}
	return claimed, false, nil
}

// leaderHeard reports whether this node leads, or heard from the leader
// within LeaderTimeout: whether it follows the cluster's writes.
func (s *WatchServer) leaderHeard() bool {
	return s.node.SinceLeaderContact() <= s.cfg.LeaderTimeout
}

// shuttingDown ends a stream at revision last when the server closes.
func shuttingDown(last uint64) error {
	return connect.NewError(connect.CodeUnavailable, fmt.Errorf("control node shutting down; resume from revision %d on another node", last))
}

// waitApplied waits until this replica has applied rev, the revision a
// resumed watcher already has, until the deadline. A replica may get
// there late or never: one cut off from the leader ends the wait as its
// streams do (inContact); one in contact that lags (replaying its log,
// installing a snapshot, a slow disk) ends it at the deadline; and so
// does the server closing. Each with Unavailable, naming rev to resume
// from elsewhere, instead of holding the watcher without a message,
// which no HTTP/2 ping would reveal, until its credentials expire.
func (s *WatchServer) waitApplied(ctx context.Context, f *fsm.FSM, rev uint64, deadline time.Time) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(s.stopped, cancel)()
	for {
		wait := min(s.cfg.LeaderTimeout/2, time.Until(deadline))
		wctx, wcancel := context.WithTimeout(ctx, wait)
		err := f.WaitApplied(wctx, rev)
		wcancel()
		switch {
		case err == nil:
			return nil
		case s.stopped.Err() != nil:
			return shuttingDown(rev)
		case ctx.Err() != nil:
			return toConnect(ctx.Err())
		}
		if err := s.inContact(rev); err != nil {
			return err
		}
		if !time.Now().Before(deadline) {
			applied := f.AppliedIndex()
			s.cfg.Logger.Warn("watch stream ended: this node lags behind the revision the watcher resumes from",
				"from_revision", rev, "applied_index", applied, "waited", s.cfg.CatchUpWait)
			return connect.NewError(connect.CodeUnavailable,
				fmt.Errorf("this control node has applied revision %d, not yet the watcher's %d, after %s; resume from revision %d on another node",
					applied, rev, s.cfg.CatchUpWait, rev))
		}
	}
}

// inContact is nil while this node follows the cluster's writes (it
// leads, or heard from the leader within LeaderTimeout), else the error
// that ends a stream at revision last: a node cut off from the majority
// would otherwise go on telling its watchers that their copy is current
// while writes (a revocation) go on elsewhere.
func (s *WatchServer) inContact(last uint64) error {
	if !s.leaderHeard() {
		s.cfg.Logger.Warn("watch stream ended: this node has not heard from a leader", "for", min(s.node.SinceLeaderContact(), 24*time.Hour), "last_revision", last)
		return connect.NewError(connect.CodeUnavailable,
			fmt.Errorf("this control node has not heard from a leader for %s; resume from revision %d on another node", s.cfg.LeaderTimeout, last))
	}
	return nil
}

// beyondLog reports whether rev is beyond this cluster's log: past the
// index the leader has committed (a linearizable read index). When the
// leader cannot be asked by deadline, it says no: the watch then waits,
// as for a replica that is behind (and within the same deadline).
func (s *WatchServer) beyondLog(ctx context.Context, rev uint64, deadline time.Time) bool {
	rctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	idx, err := s.node.ReadIndex(rctx)
	return err == nil && rev > idx
}

// resync sends a full copy of the watched state from one consistent view
// and returns the revision it reflects. It ends, before snapshot_done,
// with a mailbox_changed for every mailbox that holds entries (seq: the
// highest given out): a watcher that lost the live announcements of an
// interrupted feed learns from them which of its open sessions have
// entries to fetch. A session that already queued up to seq does nothing;
// one whose newest entries were acked meanwhile makes one fetch that
// finds nothing new. The copy grows by at most one message per device it
// already lists. Every record is a message, so the copy ends at the next
// one once the watcher's credentials lapse (watchStream.Send).
func (s *WatchServer) resync(ws *watchStream, f *fsm.FSM) (uint64, error) {
	v, err := f.View()
	if err != nil {
		return 0, toConnect(err)
	}
	defer v.Close()
	s.resyncs.Inc()
	ws.copying = true
	defer func() { ws.copying = false }()
	rev := v.AppliedIndex()
	// An error of the copy's reads is typed (Internal); one of sending
	// goes back as it is (errTooSlow, the watcher gone).
	var sendErr error
	send := func(ev *edgev1.WatchEvent) error {
		sendErr = ws.Send(&edgev1.WatchResponse{Revision: rev, Kind: &edgev1.WatchResponse_Event{Event: ev}})
		return sendErr
	}
	failed := func(err error) (uint64, error) {
		if sendErr != nil {
			return 0, sendErr
		}
		return 0, toConnect(err)
	}
	if err := ws.Send(&edgev1.WatchResponse{Revision: rev, Kind: &edgev1.WatchResponse_Resync{Resync: &edgev1.Resync{}}}); err != nil {
		return 0, err
	}
	if err := v.EachUser(func(u *statev1.User) error {
		return send(&edgev1.WatchEvent{Kind: &edgev1.WatchEvent_UserPut{UserPut: userState(u)}})
	}); err != nil {
		return failed(err)
	}
	if err := v.EachDevice(func(d *statev1.Device) error {
		return send(&edgev1.WatchEvent{Kind: &edgev1.WatchEvent_DevicePut{DevicePut: deviceState(d)}})
	}); err != nil {
		return failed(err)
	}
	if err := v.EachEdge(func(e *statev1.Edge) error {
		return send(&edgev1.WatchEvent{Kind: &edgev1.WatchEvent_EdgePut{EdgePut: edgeMember(e)}})
	}); err != nil {
		return failed(err)
	}
	ring, err := v.SessionKeyRing()
	if err != nil {
		return 0, toConnect(err)
	}
	if err := send(&edgev1.WatchEvent{Kind: &edgev1.WatchEvent_SessionKeys{SessionKeys: ringOf(ring)}}); err != nil {
		return 0, err
	}
	if err := v.EachStoredMailbox(func(uid string, mb *statev1.Mailbox) error {
		return send(mailboxChanged(uid, mb.GetDeviceId(), mb.GetLastSeq()))
	}); err != nil {
		return failed(err)
	}
	history, err := v.History()
	if err != nil {
		return 0, toConnect(err)
	}
	if err := ws.Send(&edgev1.WatchResponse{Revision: rev, Kind: &edgev1.WatchResponse_SnapshotDone{SnapshotDone: &edgev1.SnapshotDone{MailboxesAnnounced: true, History: history}}}); err != nil {
		return 0, err
	}
	return rev, nil
}

func userState(u *statev1.User) *edgev1.UserState {
	return &edgev1.UserState{Id: u.GetId(), Active: u.GetStatus() == statev1.UserStatus_USER_STATUS_ACTIVE}
}

func deviceState(d *statev1.Device) *edgev1.DeviceState {
	return &edgev1.DeviceState{Id: d.GetId(), UserId: d.GetUserId(), PublicKey: d.GetPublicKey(), Revoked: d.GetRevoked()}
}

func ringOf(r *statev1.SessionKeyRing) *edgev1.SessionKeyRing {
	out := &edgev1.SessionKeyRing{CurrentId: r.GetCurrentId()}
	for _, k := range r.GetKeys() {
		out.Keys = append(out.Keys, &edgev1.SessionKey{Id: k.GetId(), Secret: k.GetSecret(), ExpiresAtMs: k.GetExpiresAtMs()})
	}
	return out
}

func edgeMember(e *statev1.Edge) *edgev1.EdgeMember {
	return &edgev1.EdgeMember{Id: e.GetId(), Addrs: e.GetAddrs(), MeshAddr: e.GetMeshAddr(), MeshPublicKey: e.GetMeshPublicKey()}
}

func mailboxChanged(userID, deviceID string, seq uint64) *edgev1.WatchEvent {
	return &edgev1.WatchEvent{Kind: &edgev1.WatchEvent_MailboxChanged{MailboxChanged: &edgev1.MailboxChanged{
		DeviceId: deviceID, UserId: userID, Seq: seq,
	}}}
}

// eventOf maps a change to what edges see; nil for changes they do not
// watch (control node records).
func eventOf(c *statev1.Change) *edgev1.WatchEvent {
	switch c.GetKind() {
	case statev1.ChangeKind_CHANGE_KIND_USER_PUT:
		return &edgev1.WatchEvent{Kind: &edgev1.WatchEvent_UserPut{UserPut: userState(c.GetUser())}}
	case statev1.ChangeKind_CHANGE_KIND_USER_DELETED:
		return &edgev1.WatchEvent{Kind: &edgev1.WatchEvent_UserDeleted{UserDeleted: c.GetUser().GetId()}}
	case statev1.ChangeKind_CHANGE_KIND_DEVICE_PUT:
		return &edgev1.WatchEvent{Kind: &edgev1.WatchEvent_DevicePut{DevicePut: deviceState(c.GetDevice())}}
	case statev1.ChangeKind_CHANGE_KIND_DEVICE_DELETED:
		return &edgev1.WatchEvent{Kind: &edgev1.WatchEvent_DeviceDeleted{DeviceDeleted: deviceState(c.GetDevice())}}
	case statev1.ChangeKind_CHANGE_KIND_SESSION_KEYS:
		return &edgev1.WatchEvent{Kind: &edgev1.WatchEvent_SessionKeys{SessionKeys: ringOf(c.GetSessionKeys())}}
	case statev1.ChangeKind_CHANGE_KIND_EDGE_PUT:
		return &edgev1.WatchEvent{Kind: &edgev1.WatchEvent_EdgePut{EdgePut: edgeMember(c.GetEdge())}}
	case statev1.ChangeKind_CHANGE_KIND_EDGE_DELETED:
		return &edgev1.WatchEvent{Kind: &edgev1.WatchEvent_EdgeDeleted{EdgeDeleted: c.GetEdge().GetId()}}
	case statev1.ChangeKind_CHANGE_KIND_MAILBOX_CHANGED:
		mc := c.GetMailboxChanged()
		return mailboxChanged(mc.GetUserId(), mc.GetDeviceId(), mc.GetSeq())
	}
	return nil
}
