package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"strings"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/timestamppb"

	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

func (a *app) userClient() controlv1connect.UserServiceClient {
	return controlv1connect.NewUserServiceClient(a.http, a.base(), a.opts())
}

func parseRole(s string) (controlv1.Role, error) {
	v, ok := controlv1.Role_value["ROLE_"+strings.ToUpper(s)]
	if !ok || v == 0 {
		return 0, fmt.Errorf("--role %q: want admin, operator, viewer, user or edge", s)
	}
	return controlv1.Role(v), nil
}

func parseStatus(s string) (controlv1.UserStatus, error) {
	v, ok := controlv1.UserStatus_value["USER_STATUS_"+strings.ToUpper(s)]
	if !ok || v == 0 {
		return 0, fmt.Errorf("--status %q: want active or disabled", s)
	}
	return controlv1.UserStatus(v), nil
}

func when(t *timestamppb.Timestamp) string {
	if t == nil {
		return "-"
	}
	return t.AsTime().Local().Format(time.DateTime)
}

func (a *app) printUsers(users ...*controlv1.User) error {
	w := a.table()
	fmt.Fprintln(w, "ID\tLOGIN\tNAME\tROLE\tSTATUS\tCREATED\tLAST ACTIVITY")
	for _, u := range users {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", u.GetId(), u.GetLogin(), u.GetDisplayName(), roleName(u.GetRole()),
			strings.ToLower(strings.TrimPrefix(u.GetStatus().String(), "USER_STATUS_")), when(u.GetCreatedAt()), when(u.GetLastActivity()))
	}
	return w.Flush()
}

func (a *app) user(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return errors.New("user: missing subcommand: create, get, list, update, delete or me")
	}
	cctx, cancel := a.ctx(ctx)
	defer cancel()
	switch args[0] {
	case "create":
		fs := flag.NewFlagSet("relayctl user create", flag.ContinueOnError)
		fs.SetOutput(a.stderr)
		req := &controlv1.CreateUserRequest{}
		fs.StringVar(&req.Login, "login", "", "login name (required)")
		fs.StringVar(&req.DisplayName, "display-name", "", "display name")
		role := fs.String("role", "user", "admin, operator, viewer, user or edge")
		pwStdin := fs.Bool("password-stdin", false, "read the password from standard input")
		noPw := fs.Bool("no-password", false, "create the account without password login")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		if req.Login == "" {
			return errors.New("usage: relayctl user create --login NAME [--display-name N] [--role R] [--password-stdin | --no-password]")
		}
		r, err := parseRole(*role)
		if err != nil {
			return err
		}
		req.Role = r
		if !*noPw {
			if req.Password, err = a.readSecret("password for "+req.Login+": ", *pwStdin); err != nil {
				return err
			}
		}
		resp, err := a.userClient().CreateUser(cctx, connect.NewRequest(req))
		if err != nil {
			return fmt.Errorf("create user: %w", err)
		}
		if a.output == "json" {
			return a.printJSON(resp.Msg.GetUser())
		}
		return a.printUsers(resp.Msg.GetUser())
	case "get":
		if len(args) != 2 {
			return errors.New("usage: relayctl user get ID")
		}
		resp, err := a.userClient().GetUser(cctx, connect.NewRequest(&controlv1.GetUserRequest{Id: args[1]}))
		if err != nil {
			return fmt.Errorf("get user: %w", err)
		}
		if a.output == "json" {
			return a.printJSON(resp.Msg.GetUser())
		}
		return a.printUsers(resp.Msg.GetUser())
	case "me":
		resp, err := a.userClient().GetMe(cctx, connect.NewRequest(&controlv1.GetMeRequest{}))
		if err != nil {
			return fmt.Errorf("get me: %w", err)
		}
		if a.output == "json" {
			return a.printJSON(resp.Msg.GetUser())
		}
		return a.printUsers(resp.Msg.GetUser())
	case "list":
		fs := flag.NewFlagSet("relayctl user list", flag.ContinueOnError)
		fs.SetOutput(a.stderr)
		size := fs.Int("page-size", 100, "accounts per request")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		all := &controlv1.ListUsersResponse{}
		token := ""
		for {
			resp, err := a.userClient().ListUsers(cctx, connect.NewRequest(&controlv1.ListUsersRequest{PageSize: int32(*size), PageToken: token}))
			if err != nil {
				return fmt.Errorf("list users: %w", err)
			}
			all.Users = append(all.Users, resp.Msg.GetUsers()...)
			if token = resp.Msg.GetNextPageToken(); token == "" {
				break
			}
		}
		if a.output == "json" {
			return a.printJSON(all)
		}
		return a.printUsers(all.GetUsers()...)
	case "update":
		fs := flag.NewFlagSet("relayctl user update", flag.ContinueOnError)
		fs.SetOutput(a.stderr)
		display := fs.String("display-name", "", "new display name")
		login := fs.String("login", "", "new login name")
		status := fs.String("status", "", "active or disabled")
		role := fs.String("role", "", "admin, operator, viewer, user or edge")
		pwStdin := fs.Bool("password-stdin", false, "set a new password read from standard input")
		if len(args) < 2 {
			return errors.New("usage: relayctl user update ID [--display-name N] [--login L] [--status S] [--role R] [--password-stdin]")
		}
		if err := fs.Parse(args[2:]); err != nil {
			return err
		}
		req := &controlv1.UpdateUserRequest{Id: args[1]}
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		if set["display-name"] {
			req.DisplayName = display
		}
		if set["login"] {
			req.Login = login
		}
		if set["status"] {
			st, err := parseStatus(*status)
			if err != nil {
				return err
			}
			req.Status = &st
		}
		if set["role"] {
			r, err := parseRole(*role)
			if err != nil {
				return err
			}
			req.Role = &r
		}
		if *pwStdin {
			pw, err := a.readSecret("", true)
			if err != nil {
				return err
			}
			req.Password = &pw
		}
		resp, err := a.userClient().UpdateUser(cctx, connect.NewRequest(req))
		if err != nil {
			return fmt.Errorf("update user: %w", err)
		}
		if a.output == "json" {
			return a.printJSON(resp.Msg.GetUser())
		}
		return a.printUsers(resp.Msg.GetUser())
	case "delete":
		if len(args) != 2 {
			return errors.New("usage: relayctl user delete ID")
		}
		if _, err := a.userClient().DeleteUser(cctx, connect.NewRequest(&controlv1.DeleteUserRequest{Id: args[1]})); err != nil {
			return fmt.Errorf("delete user: %w", err)
		}
		return a.report(map[string]any{"id": args[1], "deleted": true}, "deleted user %s with its devices and tokens", args[1])
	}
	return fmt.Errorf("user: unknown subcommand %q: want create, get, list, update, delete or me", args[0])
}
