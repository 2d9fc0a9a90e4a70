package main

import (
	"context"
	"errors"
	"flag"
	"fmt"

	"connectrpc.com/connect"

	controlv1 "github.com/edge-relay/relay/proto/control/v1"
)

func (a *app) cluster(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return errors.New("cluster: missing subcommand: status, join, remove or transfer-leader")
	}
	switch args[0] {
	case "status":
		return a.clusterStatus(ctx)
	case "join":
		return a.clusterJoin(ctx, args[1:])
	case "remove":
		if len(args) != 2 {
			return errors.New("usage: relayctl cluster remove ID")
		}
		cctx, cancel := a.ctx(ctx)
		defer cancel()
		resp, err := a.clusterClient().RemoveServer(cctx, connect.NewRequest(&controlv1.RemoveServerRequest{Id: args[1]}))
		if err != nil {
			return fmt.Errorf("remove %s: %w", args[1], err)
		}
		if a.output == "json" {
			return a.printJSON(resp.Msg)
		}
		fmt.Fprintf(a.stdout, "removed %s (configuration index %d)\n", args[1], resp.Msg.GetIndex())
		return nil
	case "transfer-leader":
		var id string
		if len(args) > 2 {
			return errors.New("usage: relayctl cluster transfer-leader [ID]")
		}
		if len(args) == 2 {
			id = args[1]
		}
		cctx, cancel := a.ctx(ctx)
		defer cancel()
		resp, err := a.clusterClient().TransferLeadership(cctx, connect.NewRequest(&controlv1.TransferLeadershipRequest{Id: id}))
		if err != nil {
			return fmt.Errorf("transfer leadership: %w", err)
		}
		if a.output == "json" {
			return a.printJSON(resp.Msg)
		}
		fmt.Fprintf(a.stdout, "leader is now %s\n", resp.Msg.GetLeaderId())
		return nil
	}
	return fmt.Errorf("cluster: unknown subcommand %q: want status, join, remove or transfer-leader", args[0])
}

func (a *app) clusterStatus(ctx context.Context) error {
	cctx, cancel := a.ctx(ctx)
	defer cancel()
	resp, err := a.clusterClient().Status(cctx, connect.NewRequest(&controlv1.StatusRequest{}))
	if err != nil {
		return fmt.Errorf("cluster status: %w", err)
	}
	st := resp.Msg
	if a.output == "json" {
		return a.printJSON(st)
	}
	leader := st.GetLeaderId()
	if leader == "" {
		leader = "(none)"
	}
	fmt.Fprintf(a.stdout, "node %s is %s, term %d, leader %s\ncommit index %d, applied index %d, last snapshot %d\n\n",
		st.GetNodeId(), st.GetState(), st.GetTerm(), leader, st.GetCommitIndex(), st.GetAppliedIndex(), st.GetLastSnapshotIndex())
	w := a.table()
	fmt.Fprintln(w, "ID\tROLE\tRAFT ADDRESS\tAPI ADDRESS\tLEADER")
	for _, m := range st.GetMembers() {
		role := "voter"
		if m.GetSuffrage() == controlv1.Suffrage_SUFFRAGE_NONVOTER {
			role = "nonvoter"
		}
		l := ""
		if m.GetLeader() {
			l = "*"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", m.GetId(), role, m.GetRaftAddr(), m.GetApiAddr(), l)
	}
	return w.Flush()
}

func (a *app) clusterJoin(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("relayctl cluster join", flag.ContinueOnError)
	fs.SetOutput(a.stderr)
	req := &controlv1.AddVoterRequest{}
	fs.StringVar(&req.Id, "id", "", "node id to add")
	fs.StringVar(&req.RaftAddr, "raft-addr", "", "the node's Raft address")
	fs.StringVar(&req.ApiAddr, "api-addr", "", "the node's API address")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if req.Id == "" || req.RaftAddr == "" {
		return errors.New("usage: relayctl cluster join --id ID --raft-addr HOST:PORT [--api-addr HOST:PORT]")
	}
	cctx, cancel := a.ctx(ctx)
	defer cancel()
	resp, err := a.clusterClient().AddVoter(cctx, connect.NewRequest(req))
	if err != nil {
		return fmt.Errorf("join %s: %w", req.Id, err)
	}
	if a.output == "json" {
		return a.printJSON(resp.Msg)
	}
	fmt.Fprintf(a.stdout, "added %s as a voter (configuration index %d)\n", req.Id, resp.Msg.GetIndex())
	return nil
}
