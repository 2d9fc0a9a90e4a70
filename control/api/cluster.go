// Package api serves the control plane's Connect services on a control
// node: ClusterService (membership, status, backup) and the node-to-node
// PeerService. Requests that need the leader are forwarded to it, so a
// client can talk to any member.
package api

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/auth"
	"github.com/edge-relay/relay/control/backup"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
	"github.com/edge-relay/relay/internal/buildinfo"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

// ClusterServer serves ClusterService on one node.
type ClusterServer struct {
	node   *raftnode.Node
	dialer *Dialer
	log    *slog.Logger
	// sendTimeout: a Backup client that takes no chunk for this long is
	// cut off.
	sendTimeout time.Duration
}

var _ controlv1connect.ClusterServiceHandler = (*ClusterServer)(nil)

// NewClusterServer returns the ClusterService handler of node; dialer
// reaches the leader for forwarded requests; log records stale backups;
// a Backup client that takes no chunk for sendTimeout is cut off (the
// watch feed's WatchConfig.SendTimeout, 10 s when 0).
func NewClusterServer(node *raftnode.Node, dialer *Dialer, log *slog.Logger, sendTimeout time.Duration) *ClusterServer {
	if sendTimeout <= 0 {
		sendTimeout = 10 * time.Second
	}
	return &ClusterServer{node: node, dialer: dialer, log: log, sendTimeout: sendTimeout}
}

// Status reports this node's view of the cluster.
func (s *ClusterServer) Status(_ context.Context, _ *connect.Request[controlv1.StatusRequest]) (*connect.Response[controlv1.StatusResponse], error) {
	st, err := s.node.Status()
	if err != nil {
		return nil, toConnect(err)
	}
	history, err := s.node.FSM().History()
	if err != nil {
		return nil, toConnect(err)
	}
	gated, err := s.node.FSM().GatedApply()
	if err != nil {
		return nil, toConnect(err)
	}
	out := &controlv1.StatusResponse{GatedApply: gated,
		NodeId: st.NodeID, State: st.State, LeaderId: st.LeaderID, LeaderApiAddr: st.LeaderAPIAddr,
		Term: st.Term, CommitIndex: st.CommitIndex, AppliedIndex: st.AppliedIndex,
		LastSnapshotIndex: st.LastSnapshotIndex, History: history, Version: buildinfo.Get().String(),
	}
	for _, m := range st.Members {
		suf := controlv1.Suffrage_SUFFRAGE_NONVOTER
		if m.Voter {
			suf = controlv1.Suffrage_SUFFRAGE_VOTER
		}
		out.Members = append(out.Members, &controlv1.Member{
			Id: m.ID, RaftAddr: m.RaftAddr, ApiAddr: m.APIAddr, Suffrage: suf, Leader: m.Leader, Features: m.Features,
		})
	}
	return connect.NewResponse(out), nil
}

// onLeader runs local when this node leads; otherwise it calls remote on
// the leader's ClusterService. While no leader is known it retries until
// ctx ends.
func onLeader[T any](ctx context.Context, s *ClusterServer, local func() (*T, error), remote func(controlv1connect.ClusterServiceClient) (*T, error)) (*T, error) {
	backoff := 20 * time.Millisecond
	for {
		if s.node.IsLeader() {
			v, err := local()
			if !errors.Is(err, raftnode.ErrNotLeader) {
				return v, err
			}
		} else if _, addr := s.node.Leader(); addr != "" {
			return remote(s.dialer.Cluster(addr))
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: %v", raftnode.ErrNoLeader, ctx.Err())
		case <-time.After(backoff):
		}
		if backoff < time.Second {
			backoff *= 2
		}
	}
}

// forward builds the request to the leader: the caller's credentials go
// along, so the leader authorizes the original caller; a caller known by
// its certificate is forwarded with this node's own credentials.
func forward[T any](d *Dialer, in *connect.Request[T], m *T) *connect.Request[T] {
	out := connect.NewRequest(m)
	if a := in.Header().Get("Authorization"); a != "" {
		out.Header().Set("Authorization", a)
	} else {
		d.authorize(out.Header())
	}
	return out
}

func withDeadline(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, 30*time.Second)
}

// AddVoter adds a node as a voter.
func (s *ClusterServer) AddVoter(ctx context.Context, req *connect.Request[controlv1.AddVoterRequest]) (*connect.Response[controlv1.AddVoterResponse], error) {
	m := req.Msg
	if err := fsm.ValidateID("id", m.GetId()); err != nil {
		return nil, invalidArg(err)
	}
	if err := fsm.ValidateText("raft_addr", m.GetRaftAddr(), fsm.MaxAddrLen, true); err != nil {
		return nil, invalidArg(err)
	}
	if err := fsm.ValidateText("api_addr", m.GetApiAddr(), fsm.MaxAddrLen, false); err != nil {
		return nil, invalidArg(err)
	}
	if err := s.mayAdd(ctx, m.GetId(), m.GetRaftAddr()); err != nil {
		return nil, err
	}
	ctx, cancel := withDeadline(ctx)
	defer cancel()
	out, err := onLeader(ctx, s,
		func() (*controlv1.AddVoterResponse, error) {
			idx, err := s.node.AddVoter(ctx, m.GetId(), m.GetRaftAddr(), m.GetApiAddr())
			return &controlv1.AddVoterResponse{Index: idx}, err
		},
		func(c controlv1connect.ClusterServiceClient) (*controlv1.AddVoterResponse, error) {
			r, err := c.AddVoter(ctx, forward(s.dialer, req, m))
			if err != nil {
				return nil, err
			}
			return r.Msg, nil
		})
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(out), nil
}

// mayAdd refuses a node caller's AddVoter that would move a member: a
// certificate from the cluster CA (which one certificate naming every
// node may serve, so its name need not be the joining node's id) may add
// a node the cluster does not have, or one it has at the same Raft
// address (a join whose answer was lost), but not give a member's id
// another address. hashicorp/raft takes that as the member's move: its
// place, its votes and the log sent to it would go to whoever asked (a
// removed node, any holder of such a certificate). A node moves itself
// (the certificate names it), a member (a follower forwarding a join
// speaks as itself) and an admin (--join-token) may add any node.
func (s *ClusterServer) mayAdd(ctx context.Context, id, raftAddr string) error {
	c, ok := auth.ClaimsFrom(ctx)
	if !ok || c.Role != RoleNode {
		return nil
	}
	caller, _ := strings.CutPrefix(c.Subject, "node:")
	if caller == id || s.node.HasMember(caller) {
		return nil
	}
	st, err := s.node.Status()
	if err != nil {
		return toConnect(err)
	}
	for _, m := range st.Members {
		if m.ID == id && m.RaftAddr != raftAddr {
			return connect.NewError(connect.CodePermissionDenied, fmt.Errorf("node %q may not move member %q to another address", caller, id))
		}
	}
	return nil
}

// RemoveServer removes a member.
func (s *ClusterServer) RemoveServer(ctx context.Context, req *connect.Request[controlv1.RemoveServerRequest]) (*connect.Response[controlv1.RemoveServerResponse], error) {
	m := req.Msg
	if err := fsm.ValidateID("id", m.GetId()); err != nil {
		return nil, invalidArg(err)
	}
	ctx, cancel := withDeadline(ctx)
	defer cancel()
	out, err := onLeader(ctx, s,
		func() (*controlv1.RemoveServerResponse, error) {
			idx, err := s.node.RemoveServer(ctx, m.GetId())
			return &controlv1.RemoveServerResponse{Index: idx}, err
		},
		func(c controlv1connect.ClusterServiceClient) (*controlv1.RemoveServerResponse, error) {
			r, err := c.RemoveServer(ctx, forward(s.dialer, req, m))
			if err != nil {
				return nil, err
			}
			return r.Msg, nil
		})
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(out), nil
}

// TransferLeadership hands leadership to another voter.
func (s *ClusterServer) TransferLeadership(ctx context.Context, req *connect.Request[controlv1.TransferLeadershipRequest]) (*connect.Response[controlv1.TransferLeadershipResponse], error) {
	m := req.Msg
	if m.GetId() != "" {
		if err := fsm.ValidateID("id", m.GetId()); err != nil {
			return nil, invalidArg(err)
		}
	}
	ctx, cancel := withDeadline(ctx)
	defer cancel()
	out, err := onLeader(ctx, s,
		func() (*controlv1.TransferLeadershipResponse, error) {
			if m.GetId() == s.node.ID() {
				return &controlv1.TransferLeadershipResponse{LeaderId: s.node.ID()}, nil
			}
			id, err := s.node.TransferLeadership(ctx, m.GetId())
			return &controlv1.TransferLeadershipResponse{LeaderId: id}, err
		},
		func(c controlv1connect.ClusterServiceClient) (*controlv1.TransferLeadershipResponse, error) {
			r, err := c.TransferLeadership(ctx, forward(s.dialer, req, m))
			if err != nil {
				return nil, err
			}
			return r.Msg, nil
		})
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(out), nil
}

// backupChunk is the size of one BackupResponse message; clients size
// their read limit by the same constant.
const backupChunk = backup.StreamChunkBytes

// Backup streams a consistent copy of the state. It first waits for a
// linearizable read barrier, so the copy holds every write acknowledged
// before the call.
func (s *ClusterServer) Backup(ctx context.Context, req *connect.Request[controlv1.BackupRequest], stream *connect.ServerStream[controlv1.BackupResponse]) error {
	// Stale only where no leader is known: with one, a node cut off from
	// it (or lagging) might still honour a token the cluster revoked
	// (accountValid serves from its own state), and the catch-up below
	// is what checks the caller against the cluster's state.
	if lid, _ := s.node.Leader(); !req.Msg.GetStale() || lid != "" {
		if err := s.node.Barrier(ctx); err != nil {
			return toConnect(err)
		}
	} else {
		c, _ := auth.ClaimsFrom(ctx)
		s.log.Warn("stale backup: the state this node applied, without a leader", "by", c.Login, "applied_index", s.node.FSM().AppliedIndex())
	}
	// Each chunk under a write deadline, as the watch feed's messages: a
	// client that stops reading (a stalled pipe behind relayctl) would
	// otherwise hold the handler, its place among the account's calls and
	// the state's snapshot (whose old versions compaction cannot drop)
	// for good, and a node's shutdown for its whole timeout.
	rc, _ := ctx.Value(responseControllerKey{}).(*http.ResponseController)
	w := &chunkWriter{send: func(b []byte) error {
		if rc != nil {
			_ = rc.SetWriteDeadline(time.Now().Add(s.sendTimeout))
		}
		err := stream.Send(&controlv1.BackupResponse{Data: b})
		if rc != nil && err == nil {
			_ = rc.SetWriteDeadline(time.Time{})
		}
		if err != nil && (errors.Is(err, os.ErrDeadlineExceeded) || connect.CodeOf(err) == connect.CodeDeadlineExceeded) {
			s.log.Warn("backup stream cut off: the client stopped reading", "timeout", s.sendTimeout)
			return connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("no backup chunk taken for %s", s.sendTimeout))
		}
		return err
	}}
	if _, err := s.node.FSM().WriteBackupContext(ctx, w); err != nil {
		return toConnect(err)
	}
	if err := w.flush(); err != nil {
		return toConnect(err)
	}
	return nil
}

// chunkWriter buffers writes into messages of backupChunk bytes.
type chunkWriter struct {
	buf  []byte
	send func([]byte) error
}

func (w *chunkWriter) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		room := backupChunk - len(w.buf)
		if room > len(p) {
			room = len(p)
		}
		w.buf = append(w.buf, p[:room]...)
		p = p[room:]
		if len(w.buf) == backupChunk {
			if err := w.flush(); err != nil {
				return 0, err
			}
		}
	}
	return n, nil
}

func (w *chunkWriter) flush() error {
	if len(w.buf) == 0 {
		return nil
	}
	err := w.send(w.buf)
	w.buf = make([]byte, 0, backupChunk)
	return err
}
