package api

import (
	"context"
	"fmt"
	"testing"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
)

// Errors of the state and of Raft reach callers as the Connect codes the
// API reference gives them, wrapped or not. A code decides what a client
// does next: an edge or relayctl takes an unavailable call to another
// node and gives up on the others.
func TestErrorsMapToTheirCodes(t *testing.T) {
	for _, tc := range []struct {
		err  error
		code connect.Code
	}{
		{fsm.ErrInvalidArgument, connect.CodeInvalidArgument},
		{fsm.ErrNotFound, connect.CodeNotFound},
		{raftnode.ErrNotMember, connect.CodeNotFound},
		{fsm.ErrAlreadyExists, connect.CodeAlreadyExists},
		{fsm.ErrFailedPrecondition, connect.CodeFailedPrecondition},
		{fsm.ErrCompacted, connect.CodeOutOfRange},
		{raftnode.ErrNoLeader, connect.CodeUnavailable},
		{raftnode.ErrNotLeader, connect.CodeUnavailable},
		{raftnode.ErrUnknownOutcome, connect.CodeUnavailable},
		{raftnode.ErrRemoved, connect.CodeUnavailable},
		{raftnode.ErrWrongPeer, connect.CodeFailedPrecondition},
		{raftnode.ErrVoterMoveWithoutState, connect.CodeFailedPrecondition},
		{context.DeadlineExceeded, connect.CodeDeadlineExceeded},
		{context.Canceled, connect.CodeCanceled},
		{fmt.Errorf("something else"), connect.CodeInternal},
	} {
		for _, err := range []error{tc.err, fmt.Errorf("apply: %w", tc.err)} {
			if got := connect.CodeOf(toConnect(err)); got != tc.code {
				t.Errorf("%v: %v, want %v", err, got, tc.code)
			}
		}
	}
	if toConnect(nil) != nil {
		t.Error("nil became an error")
	}
	ce := connect.NewError(connect.CodePermissionDenied, fmt.Errorf("x"))
	if got := toConnect(ce); got != ce {
		t.Errorf("a Connect error was wrapped again: %v", got)
	}
}

// A peer's refusal of this node's own call reaches the caller as the
// code for "try another node", never as one the caller would take for
// its own: a leader that refuses the forwarding node's token
// (unauthenticated) would otherwise have an edge drop its valid token and
// stay on that node. The codes that carry a meaning of their own keep it.
func TestAPeersRefusalIsNotTheCallersOwn(t *testing.T) {
	for _, tc := range []struct {
		code connect.Code
		op   string
		want connect.Code
	}{
		{connect.CodeUnauthenticated, "forward apply", connect.CodeUnavailable},
		{connect.CodeUnauthenticated, "read index", connect.CodeUnavailable},
		{connect.CodeResourceExhausted, "forward apply", connect.CodeUnavailable},
		{connect.CodeUnimplemented, "read index", connect.CodeUnavailable},
		{connect.CodeUnavailable, "read index", connect.CodeUnavailable},
		{connect.CodePermissionDenied, "forward apply", connect.CodeUnavailable},
		{connect.CodeCanceled, "forward apply", connect.CodeCanceled},
	} {
		err := fromPeer(tc.op, "10.0.0.1:7400", connect.NewError(tc.code, fmt.Errorf("refused")))
		if got := connect.CodeOf(toConnect(err)); got != tc.want {
			t.Errorf("%s answered %v: the caller gets %v, want %v", tc.op, tc.code, got, tc.want)
		}
	}
}
