package api

import (
	"context"
	"errors"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/control/raftnode"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

// PeerServer serves the node-to-node PeerService.
type PeerServer struct {
	node *raftnode.Node
}

var _ controlv1connect.PeerServiceHandler = (*PeerServer)(nil)

// NewPeerServer returns the PeerService handler of node.
func NewPeerServer(node *raftnode.Node) *PeerServer { return &PeerServer{node: node} }

// notLeader tells a forwarding follower that nothing was proposed here.
func notLeader(err error) error {
	return connect.NewError(connect.CodeFailedPrecondition, err)
}

// Apply proposes a forwarded command; this node must lead.
func (s *PeerServer) Apply(ctx context.Context, req *connect.Request[controlv1.ApplyRequest]) (*connect.Response[controlv1.ApplyResponse], error) {
	if !s.node.IsLeader() {
		return nil, notLeader(raftnode.ErrNotLeader)
	}
	res, err := s.node.ApplyLocal(ctx, req.Msg.GetCommand())
	if err != nil {
		if errors.Is(err, raftnode.ErrNoLeader) {
			return nil, notLeader(err)
		}
		if errors.Is(err, raftnode.ErrClockSkew) {
			// Final, and nothing was proposed: the forwarding node's
			// clock is off (fromPeer makes it ErrClockSkew again).
			return nil, connect.NewError(connect.CodeInvalidArgument, err)
		}
		return nil, toConnect(err)
	}
	out, err := proto.Marshal(res)
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&controlv1.ApplyResponse{Result: out, Index: res.GetRevision()}), nil
}

// ReadIndex returns the leader's read index; this node must lead.
func (s *PeerServer) ReadIndex(ctx context.Context, _ *connect.Request[controlv1.ReadIndexRequest]) (*connect.Response[controlv1.ReadIndexResponse], error) {
	idx, err := s.node.ReadIndexLocal(ctx)
	if err != nil {
		if errors.Is(err, raftnode.ErrNotLeader) {
			return nil, notLeader(err)
		}
		return nil, toConnect(err)
	}
	return connect.NewResponse(&controlv1.ReadIndexResponse{Index: idx}), nil
}
