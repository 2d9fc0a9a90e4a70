package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"

	"connectrpc.com/connect"
	"golang.org/x/term"

	controlv1 "github.com/edge-relay/relay/proto/control/v1"
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

func (a *app) login(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("relayctl login", flag.ContinueOnError)
	fs.SetOutput(a.stderr)
	name := fs.String("login", "", "login name (default: prompt)")
	fromStdin := fs.Bool("password-stdin", false, "read the password from standard input")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *name == "" && fs.NArg() == 1 {
		*name = fs.Arg(0)
	}
	if *name == "" {
		return errors.New("usage: relayctl login [--password-stdin] LOGIN")
	}
	pw, err := a.readSecret("password for "+*name+": ", *fromStdin)
	if err != nil {
		return err
	}
	cctx, cancel := a.ctx(ctx)
	defer cancel()
	resp, err := a.authClient().Login(cctx, connect.NewRequest(&controlv1.LoginRequest{Login: *name, Password: pw}))
	if err != nil {
		return fmt.Errorf("login: %w", err)
	}
	if err := a.tokens.put(a.base(), fromTokens(resp.Msg.GetTokens())); err != nil {
		return err
	}
	fmt.Fprintf(a.stdout, "logged in to %s as %s (%s)\n", a.base(), *name, roleName(resp.Msg.GetTokens().GetRole()))
	return nil
}

func (a *app) logout(ctx context.Context) error {
	t, ok := a.tokens.get(a.base())
	if !ok {
		fmt.Fprintln(a.stdout, "not logged in")
		return nil
	}
	cctx, cancel := a.ctx(ctx)
	defer cancel()
	req := connect.NewRequest(&controlv1.LogoutRequest{RefreshToken: t.RefreshToken})
	_, err := a.authedAuthClient().Logout(cctx, req)
	_ = a.tokens.put(a.base(), nil)
	if err != nil && connect.CodeOf(err) != connect.CodeUnauthenticated {
		return fmt.Errorf("logout: %w (local tokens removed)", err)
	}
	fmt.Fprintln(a.stdout, "logged out")
	return nil
}

func roleName(r controlv1.Role) string {
	return strings.ToLower(strings.TrimPrefix(r.String(), "ROLE_"))
}
