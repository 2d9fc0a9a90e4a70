package main

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

func (a *app) clusterClient(base string) controlv1connect.ClusterServiceClient {
	return controlv1connect.NewClusterServiceClient(a.http, base, a.opts(base))
}

func (a *app) clusterCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "cluster", Short: "Show and change the control plane's membership"}
	cmd.AddCommand(&cobra.Command{
		Use: "status", Short: "Show members, leader and indexes (as the member that answers sees them)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return a.clusterStatus(cmd.Context()) },
	})

	join := &controlv1.AddVoterRequest{}
	j := &cobra.Command{
		Use: "join --id ID --raft-addr HOST:PORT [--api-addr HOST:PORT]", Short: "Add a node as a voter", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if join.Id == "" || join.RaftAddr == "" {
				return errors.New("--id and --raft-addr are required")
			}
			var resp *connect.Response[controlv1.AddVoterResponse]
			// Adding the same voter again changes nothing: safe to retry.
			err := a.call(cmd.Context(), "join "+join.Id, retryAlways, func(ctx context.Context, base string) (err error) {
				resp, err = a.clusterClient(base).AddVoter(ctx, connect.NewRequest(join))
				return err
			})
			if err != nil {
				return err
			}
			return a.print(resp.Msg, func() error {
				_, err := fmt.Fprintf(a.stdout, "added %s as a voter (configuration index %d)\n", join.Id, resp.Msg.GetIndex())
				return err
			})
		},
	}
	j.Flags().StringVar(&join.Id, "id", "", "node id to add")
	j.Flags().StringVar(&join.RaftAddr, "raft-addr", "", "the node's Raft address")
	j.Flags().StringVar(&join.ApiAddr, "api-addr", "", "the node's API address")
	cmd.AddCommand(j)

	cmd.AddCommand(&cobra.Command{
		Use: "remove ID", Short: "Remove a node from the cluster", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var resp *connect.Response[controlv1.RemoveServerResponse]
			err := a.call(cmd.Context(), "remove "+args[0], retryIfNotSent, func(ctx context.Context, base string) (err error) {
				resp, err = a.clusterClient(base).RemoveServer(ctx, connect.NewRequest(&controlv1.RemoveServerRequest{Id: args[0]}))
				return err
			})
			if err != nil {
				return err
			}
			return a.print(resp.Msg, func() error {
				_, err := fmt.Fprintf(a.stdout, "removed %s (configuration index %d)\n", args[0], resp.Msg.GetIndex())
				return err
			})
		},
	}, &cobra.Command{
		Use: "transfer-leader [ID]", Short: "Hand leadership to ID (or the best voter)", Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			id := ""
			if len(args) == 1 {
				id = args[0]
			}
			var resp *connect.Response[controlv1.TransferLeadershipResponse]
			err := a.call(cmd.Context(), "transfer leadership", retryIfNotSent, func(ctx context.Context, base string) (err error) {
				resp, err = a.clusterClient(base).TransferLeadership(ctx, connect.NewRequest(&controlv1.TransferLeadershipRequest{Id: id}))
				return err
			})
			if err != nil {
				return err
			}
			return a.print(resp.Msg, func() error {
				_, err := fmt.Fprintf(a.stdout, "leader is now %s\n", resp.Msg.GetLeaderId())
				return err
			})
		},
	})
	return cmd
}

// status asks a member for the cluster's status (what for names the call
// in errors).
func (a *app) status(ctx context.Context, what string) (*controlv1.StatusResponse, error) {
	var resp *connect.Response[controlv1.StatusResponse]
	err := a.call(ctx, what, retryAlways, func(ctx context.Context, base string) (err error) {
		resp, err = a.clusterClient(base).Status(ctx, connect.NewRequest(&controlv1.StatusRequest{}))
		return err
	})
	if err != nil {
		return nil, err
	}
	return resp.Msg, nil
}

// releaseOf is a status's release, or what to print when the node's
// release predates the field.
func releaseOf(st *controlv1.StatusResponse) string {
	if v := st.GetVersion(); v != "" {
		return v
	}
	return "(a release that does not say)"
}

func (a *app) clusterStatus(ctx context.Context) error {
	st, err := a.status(ctx, "cluster status")
	if err != nil {
		return err
	}
	return a.print(st, func() error {
		leader := st.GetLeaderId()
		if leader == "" {
			leader = "(none)"
		}
		history := st.GetHistory()
		if history == "" {
			history = "(none yet)"
		}
		gated := "off (until every member records gated_apply)"
		if st.GetGatedApply() {
			gated = "on"
		}
		fmt.Fprintf(a.stdout, "node %s is %s, term %d, leader %s\ncommit index %d, applied index %d, last snapshot %d\ncluster history %s\nrelease %s\ngated apply %s\n\n",
			st.GetNodeId(), st.GetState(), st.GetTerm(), leader, st.GetCommitIndex(), st.GetAppliedIndex(), st.GetLastSnapshotIndex(), history, releaseOf(st), gated)
		w := a.table()
		fmt.Fprintln(w, "ID\tROLE\tRAFT ADDRESS\tAPI ADDRESS\tLEADER\tFEATURES")
		for _, m := range st.GetMembers() {
			role := "voter"
			if m.GetSuffrage() == controlv1.Suffrage_SUFFRAGE_NONVOTER {
				role = "nonvoter"
			}
			l := ""
			if m.GetLeader() {
				l = "*"
			}
			features := strings.Join(m.GetFeatures(), ",")
			if features == "" {
				features = "-"
			}
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", m.GetId(), role, m.GetRaftAddr(), m.GetApiAddr(), l, features)
		}
		return w.Flush()
	})
}
