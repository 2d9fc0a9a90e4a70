package api

import (
	"context"
	"errors"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
)

// toConnect maps an internal error to a Connect error. It is the one place
// where sentinels become codes.
func toConnect(err error) error {
	if err == nil {
		return nil
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		return err
	}
	code := connect.CodeInternal
	switch {
	case errors.Is(err, fsm.ErrInvalidArgument):
		code = connect.CodeInvalidArgument
	case errors.Is(err, fsm.ErrNotFound), errors.Is(err, raftnode.ErrNotMember):
		code = connect.CodeNotFound
	case errors.Is(err, fsm.ErrAlreadyExists):
		code = connect.CodeAlreadyExists
	case errors.Is(err, fsm.ErrFailedPrecondition), errors.Is(err, raftnode.ErrWrongPeer), errors.Is(err, raftnode.ErrVoterMoveWithoutState):
		code = connect.CodeFailedPrecondition
	case errors.Is(err, fsm.ErrCompacted):
		code = connect.CodeOutOfRange
	case errors.Is(err, raftnode.ErrNoLeader), errors.Is(err, raftnode.ErrNotLeader),
		errors.Is(err, raftnode.ErrShutdown), errors.Is(err, raftnode.ErrUnknownOutcome), errors.Is(err, raftnode.ErrNotInitialized),
		errors.Is(err, raftnode.ErrPeerUnreachable),
		errors.Is(err, errNoCA),
		// A node removed from the cluster, which still runs: another node
		// can serve the call (an edge or relayctl moves on).
		errors.Is(err, raftnode.ErrRemoved),
		// This node's clock is off: another node can take the call.
		errors.Is(err, raftnode.ErrClockSkew):
		code = connect.CodeUnavailable
	case errors.Is(err, context.DeadlineExceeded):
		code = connect.CodeDeadlineExceeded
	case errors.Is(err, context.Canceled):
		code = connect.CodeCanceled
	}
	return connect.NewError(code, err)
}

// invalidArg is an InvalidArgument error naming the field.
func invalidArg(err error) error {
	return connect.NewError(connect.CodeInvalidArgument, err)
}
