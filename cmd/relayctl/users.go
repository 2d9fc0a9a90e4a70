package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/timestamppb"

	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

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

func (a *app) users(base string) controlv1connect.UserServiceClient {
	return controlv1connect.NewUserServiceClient(a.http, base, a.opts(base))
}

// userCall makes one UserService call on whichever member answers and
// prints the account it returns.
func (a *app) userCall(ctx context.Context, what string, mode retryMode, fn func(context.Context, controlv1connect.UserServiceClient) (*controlv1.User, error)) error {
	var u *controlv1.User
	err := a.call(ctx, what, mode, func(ctx context.Context, base string) (err error) {
		u, err = fn(ctx, a.users(base))
		return err
	})
	if err != nil {
		return err
	}
	return a.print(u, func() error { return a.printUsers(u) })
}

func (a *app) userCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "user", Short: "Manage accounts"}
	var create controlv1.CreateUserRequest
	var createRole string
	var pwStdin, noPw bool
	c := &cobra.Command{
		Use:   "create --login LOGIN [--display-name N] [--role R] [--password-stdin | --no-password]",
		Short: "Create an account",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if create.Login == "" {
				return errors.New("--login is required")
			}
			r, err := parseRole(createRole)
			if err != nil {
				return err
			}
			create.Role = r
			if !noPw {
				if create.Password, err = a.readSecret("password for "+create.Login+": ", pwStdin); err != nil {
					return err
				}
			}
			return a.userCall(cmd.Context(), "create user", retryAlways, func(ctx context.Context, cl controlv1connect.UserServiceClient) (*controlv1.User, error) {
				resp, err := cl.CreateUser(ctx, keyed(a, &create))
				if err != nil {
					return nil, err
				}
				return resp.Msg.GetUser(), nil
			})
		},
	}
	c.Flags().StringVar(&create.Login, "login", "", "login name (required)")
	c.Flags().StringVar(&create.DisplayName, "display-name", "", "display name")
	c.Flags().StringVar(&createRole, "role", "user", "admin, operator, viewer, user or edge")
	c.Flags().BoolVar(&pwStdin, "password-stdin", false, "read the password from standard input")
	c.Flags().BoolVar(&noPw, "no-password", false, "create the account without password login")
	c.MarkFlagsMutuallyExclusive("password-stdin", "no-password")
	_ = c.RegisterFlagCompletionFunc("role", roleCompletion)
	cmd.AddCommand(c)

	cmd.AddCommand(&cobra.Command{
		Use: "get ID", Short: "Show an account", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.userCall(cmd.Context(), "get user", retryAlways, func(ctx context.Context, cl controlv1connect.UserServiceClient) (*controlv1.User, error) {
				resp, err := cl.GetUser(ctx, connect.NewRequest(&controlv1.GetUserRequest{Id: args[0]}))
				if err != nil {
					return nil, err
				}
				return resp.Msg.GetUser(), nil
			})
		},
	}, &cobra.Command{
		Use: "me", Short: "Show your own account", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.userCall(cmd.Context(), "get me", retryAlways, func(ctx context.Context, cl controlv1connect.UserServiceClient) (*controlv1.User, error) {
				resp, err := cl.GetMe(ctx, connect.NewRequest(&controlv1.GetMeRequest{}))
				if err != nil {
					return nil, err
				}
				return resp.Msg.GetUser(), nil
			})
		},
	})

	cmd.AddCommand(a.passwdCommand())

	var pageSize int32
	list := &cobra.Command{
		Use: "list", Short: "List accounts", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			all := &controlv1.ListUsersResponse{}
			token := ""
			for {
				var resp *connect.Response[controlv1.ListUsersResponse]
				err := a.call(cmd.Context(), "list users", retryAlways, func(ctx context.Context, base string) (err error) {
					resp, err = a.users(base).ListUsers(ctx, connect.NewRequest(&controlv1.ListUsersRequest{PageSize: pageSize, PageToken: token}))
					return err
				})
				if err != nil {
					return err
				}
				all.Users = append(all.Users, resp.Msg.GetUsers()...)
				if token = resp.Msg.GetNextPageToken(); token == "" {
					break
				}
			}
			return a.print(all, func() error { return a.printUsers(all.GetUsers()...) })
		},
	}
	list.Flags().Int32Var(&pageSize, "page-size", 100, "accounts per request")
	cmd.AddCommand(list)

	var display, login, status, role string
	var newPw bool
	update := &cobra.Command{
		Use:   "update ID [--display-name N] [--login L] [--status active|disabled] [--role R] [--password-stdin]",
		Short: "Change an account (a new password, role or status ends its sessions)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := &controlv1.UpdateUserRequest{Id: args[0]}
			f := cmd.Flags()
			if f.Changed("display-name") {
				req.DisplayName = &display
			}
			if f.Changed("login") {
				req.Login = &login
			}
			if f.Changed("status") {
				st, err := parseStatus(status)
				if err != nil {
					return err
				}
				req.Status = &st
			}
			if f.Changed("role") {
				r, err := parseRole(role)
				if err != nil {
					return err
				}
				req.Role = &r
			}
			if newPw {
				pw, err := a.readSecret("", true)
				if err != nil {
					return err
				}
				req.Password = &pw
			}
			return a.userCall(cmd.Context(), "update user", retryAlways, func(ctx context.Context, cl controlv1connect.UserServiceClient) (*controlv1.User, error) {
				resp, err := cl.UpdateUser(ctx, keyed(a, req))
				if err != nil {
					return nil, err
				}
				return resp.Msg.GetUser(), nil
			})
		},
	}
	update.Flags().StringVar(&display, "display-name", "", "new display name")
	update.Flags().StringVar(&login, "login", "", "new login name")
	update.Flags().StringVar(&status, "status", "", "active or disabled")
	update.Flags().StringVar(&role, "role", "", "admin, operator, viewer, user or edge")
	update.Flags().BoolVar(&newPw, "password-stdin", false, "set a new password read from standard input")
	_ = update.RegisterFlagCompletionFunc("role", roleCompletion)
	_ = update.RegisterFlagCompletionFunc("status", cobra.FixedCompletions([]string{"active", "disabled"}, cobra.ShellCompDirectiveNoFileComp))
	cmd.AddCommand(update)

	cmd.AddCommand(&cobra.Command{
		Use: "delete ID", Short: "Delete an account with its devices and tokens", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			err := a.call(cmd.Context(), "delete user", retryAlways, func(ctx context.Context, base string) error {
				_, err := a.users(base).DeleteUser(ctx, keyed(a, &controlv1.DeleteUserRequest{Id: args[0]}))
				return err
			})
			if err != nil {
				return err
			}
			return a.report(map[string]any{"id": args[0], "deleted": true}, "deleted user %s with its devices and tokens", args[0])
		},
	})
	return cmd
}

var roleCompletion = cobra.FixedCompletions([]string{"admin", "operator", "viewer", "user", "edge"}, cobra.ShellCompDirectiveNoFileComp)

// passwdCommand changes the logged-in account's own password.
func (a *app) passwdCommand() *cobra.Command {
	var fromStdin bool
	cmd := &cobra.Command{
		Use:   "passwd [--password-stdin]",
		Short: "Change your own password (your other sessions end)",
		Long: `Change the password of the account you are logged in as, given its current one.
It asks on the terminal for the current password and twice for the new one;
with --password-stdin it reads two lines from standard input: the current
password, then the new one. relayctl's own session goes on; the account's other
sessions (other logins, console pages) end on every member. A wrong current
password counts as a failed login of the account.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			req := &controlv1.ChangePasswordRequest{}
			var err error
			if fromStdin {
				// Byte by byte: the new password is on the next line.
				if req.CurrentPassword, err = readLine(a.stdin); err != nil {
					return errors.New("no current password on standard input (two lines: the current password, then the new one)")
				}
				if req.NewPassword, err = readLine(a.stdin); err != nil {
					return errors.New("no new password on standard input (two lines: the current password, then the new one)")
				}
			} else {
				if req.CurrentPassword, err = a.readSecret("current password: ", false); err != nil {
					return err
				}
				if req.NewPassword, err = a.readSecret("new password: ", false); err != nil {
					return err
				}
				again, err := a.readSecret("new password again: ", false)
				if err != nil {
					return err
				}
				if again != req.NewPassword {
					return errors.New("the two new passwords differ; nothing changed")
				}
			}
			// Not repeated once a member may have taken it: a retry after
			// a change that went through would present a password that is
			// no longer current.
			err = a.call(cmd.Context(), "change password", retryIfNotSent, func(ctx context.Context, base string) error {
				_, err := controlv1connect.NewAuthServiceClient(a.http, base, a.opts(base)).ChangePassword(ctx, connect.NewRequest(req))
				return err
			})
			if err != nil {
				// A connection never made (every member refused it) sent
				// nothing; any other failure of these kinds came after a
				// member may have taken the request.
				sent := !retryable(err, retryIfNotSent)
				switch connect.CodeOf(err) {
				case connect.CodeUnavailable, connect.CodeDeadlineExceeded, connect.CodeCanceled, connect.CodeUnknown:
					if sent {
						return fmt.Errorf("%w (the change may have taken effect: try the new password before running this again)", err)
					}
				}
				return err
			}
			return a.report(map[string]any{"changed": true}, "password changed; the account's other sessions have ended")
		},
	}
	cmd.Flags().BoolVar(&fromStdin, "password-stdin", false, "read the current and the new password from standard input, one per line")
	return cmd
}
