package api

import (
	"context"
	"errors"
	"fmt"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// ActivityServer serves ActivityService: edges' batched last-seen reports.
type ActivityServer struct {
	node *raftnode.Node
}

var _ edgev1connect.ActivityServiceHandler = (*ActivityServer)(nil)

// NewActivityServer returns the ActivityService handler.
func NewActivityServer(node *raftnode.Node) *ActivityServer { return &ActivityServer{node: node} }

// ReportActivity records a batch in one Raft entry.
func (s *ActivityServer) ReportActivity(ctx context.Context, req *connect.Request[edgev1.ReportActivityRequest]) (*connect.Response[edgev1.ReportActivityResponse], error) {
	in := req.Msg.GetEntries()
	if len(in) > fsm.MaxActivityBatch {
		return nil, invalidArg(fmt.Errorf("entries: %d reports, at most %d per call", len(in), fsm.MaxActivityBatch))
	}
	if len(in) == 0 {
		return connect.NewResponse(&edgev1.ReportActivityResponse{}), nil
	}
	out := make([]*statev1.Activity, 0, len(in))
	for i, a := range in {
		if err := fsm.ValidateID(fmt.Sprintf("entries[%d].user_id", i), a.GetUserId()); err != nil {
			return nil, invalidArg(err)
		}
		if a.GetDeviceId() != "" {
			if err := fsm.ValidateID(fmt.Sprintf("entries[%d].device_id", i), a.GetDeviceId()); err != nil {
				return nil, invalidArg(err)
			}
		}
		if a.GetSeenAtMs() <= 0 {
			return nil, invalidArg(fmt.Errorf("entries[%d].seen_at_ms must be positive", i))
		}
		out = append(out, &statev1.Activity{UserId: a.GetUserId(), DeviceId: a.GetDeviceId(), SeenAtMs: a.GetSeenAtMs()})
	}
	_, err := s.node.Apply(ctx, &statev1.Command{Op: &statev1.Command_RecordActivity{RecordActivity: &statev1.RecordActivity{Entries: out}}})
	if err != nil && !errors.Is(err, fsm.ErrNotFound) {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&edgev1.ReportActivityResponse{}), nil
}
