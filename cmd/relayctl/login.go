package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

// readSecret reads a password: from stdin when --password-stdin was
// given, else from the terminal without echo.
func (a *app) readSecret(prompt string, fromStdin bool) (string, error) {
	if fromStdin {
		line, err := bufio.NewReader(a.stdin).ReadString('\n')
		if err != nil && line == "" {
			return "", errors.New("no password on standard input")
		}
		return strings.TrimRight(line, "\r\n"), nil
	}
	fd := int(os.Stdin.Fd())
	if !term.IsTerminal(fd) {
		return "", errors.New("standard input is not a terminal: pass --password-stdin and pipe the password")
	}
	fmt.Fprint(a.stderr, prompt)
	b, err := term.ReadPassword(fd)
	fmt.Fprintln(a.stderr)
	if err != nil {
		return "", fmt.Errorf("read password: %w", err)
	}
	return string(b), nil
}

// stdinIsTerminal reports whether standard input is an interactive
// terminal (prompts make sense only there).
func (a *app) stdinIsTerminal() bool {
	f, ok := a.stdin.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// readLine reads one line from r a byte at a time, so that nothing after
// it (the password typed next) is consumed.
func readLine(r io.Reader) (string, error) {
	var b []byte
	var c [1]byte
	for {
		n, err := r.Read(c[:])
		if n == 1 {
			if c[0] == '\n' {
				return strings.TrimRight(string(b), "\r"), nil
			}
			b = append(b, c[0])
		}
		if err != nil {
			if len(b) > 0 && errors.Is(err, io.EOF) {
				return strings.TrimRight(string(b), "\r"), nil
			}
			return "", err
		}
	}
}

func (a *app) loginCommand() *cobra.Command {
	var name string
	var fromStdin bool
	cmd := &cobra.Command{
		Use:   "login [LOGIN]",
		Short: "Log in; the tokens are cached, refreshed, and used for the cluster's other members too",
		Long: `Log in with a password (asked on the terminal, or read from standard input with
--password-stdin). The tokens are kept in the token cache (RELAYCTL_CONFIG_DIR,
mode 0600), refreshed when they expire, and used for every member of the cluster
(staff accounts: the member list is asked of the cluster on every run).`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if name == "" && len(args) == 1 {
				name = args[0]
			}
			return a.login(cmd.Context(), name, fromStdin)
		},
	}
	cmd.Flags().StringVar(&name, "login", "", "login name (default: the argument, else a prompt on a terminal)")
	cmd.Flags().BoolVar(&fromStdin, "password-stdin", false, "read the password from standard input")
	return cmd
}

func (a *app) login(ctx context.Context, name string, fromStdin bool) error {
	if name == "" {
		switch {
		case fromStdin:
			return errors.New("login name missing: with --password-stdin give it as an argument (relayctl login --password-stdin LOGIN)")
		case !a.stdinIsTerminal():
			return errors.New("login name missing and standard input is not a terminal: give it as an argument (relayctl login LOGIN)")
		}
		fmt.Fprint(a.stderr, "login: ")
		line, err := readLine(a.stdin)
		if err != nil {
			return fmt.Errorf("read login name: %w", err)
		}
		if name = strings.TrimSpace(line); name == "" {
			return errors.New("login name is empty")
		}
	}
	pw, err := a.readSecret("password for "+name+": ", fromStdin)
	if err != nil {
		return err
	}
	var (
		resp *connect.Response[controlv1.LoginResponse]
		at   string
	)
	// A login the node may have taken is not repeated (it would open a
	// second session); one that reached no node is, on the next server.
	err = a.callOn(ctx, a.servers, "login", retryIfNotSent, func(ctx context.Context, base string) (err error) {
		resp, err = controlv1connect.NewAuthServiceClient(a.http, base).Login(ctx, connect.NewRequest(&controlv1.LoginRequest{Login: name, Password: pw}))
		at = base
		return err
	})
	if err != nil {
		if connect.CodeOf(err) == connect.CodeUnauthenticated {
			// Not oneLine's "run relayctl login": that is what failed.
			return withHint(err, "check the login name and the password")
		}
		return err
	}
	toks := resp.Msg.GetTokens()
	cached, _ := a.tokens.load() // the session logged in to at, if any
	old, replaces := cached[at]
	a.sess = &session{key: at, t: *fromTokens(toks)}
	a.prepared = true
	a.refreshMembers(ctx, a.sess)
	if err := a.tokens.put(at, &a.sess.t); err != nil {
		return err
	}
	// Once the new tokens are saved: ended first, an interrupted login
	// would leave neither.
	if replaces && old.RefreshToken != "" {
		a.endReplaced(ctx, at, old.RefreshToken, toks.GetAccessToken())
	}
	role := roleName(toks.GetRole())
	also := a.sess.t.Members
	if also == nil {
		also = []string{}
	}
	return a.report(map[string]any{
		"server": at, "login": name, "userId": toks.GetUserId(), "role": role,
		"accessTokenExpiresAt": a.sess.t.AccessExpires, "alsoFor": also,
	}, "logged in to %s as %s (%s)", at, name, role)
}

// endReplaced logs out the session a new login replaces in the token
// cache, with the new login's access token (the server ends it only if
// it is the same account's). Not kept, it would live on unused until
// its login's end; and should a copy of the cache have been refreshed
// elsewhere, that copy's session ends with it. Best effort: any error is
// ignored.
func (a *app) endReplaced(ctx context.Context, base, refresh, access string) {
	ctx, cancel := context.WithTimeout(ctx, min(a.timeout, 5*time.Second))
	defer cancel()
	req := connect.NewRequest(&controlv1.LogoutRequest{RefreshToken: refresh})
	req.Header().Set("Authorization", "Bearer "+access)
	_, _ = controlv1connect.NewAuthServiceClient(a.http, base).Logout(ctx, req)
}

func (a *app) logoutCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "logout",
		Short: "End the session (its access tokens stop working on every member)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			a.prepare(ctx)
			if a.sess == nil {
				return a.report(map[string]any{"loggedOut": false, "reason": "not logged in"}, "not logged in")
			}
			refresh := a.sess.t.RefreshToken
			err := a.call(ctx, "logout", retryAlways, func(ctx context.Context, base string) error {
				_, err := controlv1connect.NewAuthServiceClient(a.http, base, a.opts(base)).Logout(ctx, keyed(a, &controlv1.LogoutRequest{RefreshToken: refresh}))
				return err
			})
			_ = a.tokens.put(a.sess.key, nil)
			if err != nil && connect.CodeOf(err) != connect.CodeUnauthenticated {
				return fmt.Errorf("%w (local tokens removed)", err)
			}
			return a.report(map[string]any{"loggedOut": true}, "logged out")
		},
	}
}

func (a *app) tokenCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "token",
		Short: "Print a valid access token (e.g. for relayd --join-token)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			tok, err := a.accessToken(cmd.Context())
			if err != nil {
				return err
			}
			if tok == "" {
				return errors.New("not logged in: run relayctl login")
			}
			return a.report(map[string]any{"accessToken": tok}, "%s", tok)
		},
	}
}

func roleName(r controlv1.Role) string {
	return strings.ToLower(strings.TrimPrefix(r.String(), "ROLE_"))
}
