package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
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

func (a *app) login(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("relayctl login", flag.ContinueOnError)
	fs.SetOutput(a.stderr)
	name := fs.String("login", "", "login name (default: the argument, else a prompt on a terminal)")
	fromStdin := fs.Bool("password-stdin", false, "read the password from standard input")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *name == "" && fs.NArg() == 1 {
		*name = fs.Arg(0)
	}
	if fs.NArg() > 1 {
		return errors.New("usage: relayctl login [--password-stdin] [LOGIN]")
	}
	if *name == "" {
		switch {
		case *fromStdin:
			return errors.New("login name missing: with --password-stdin give it as an argument (relayctl login --password-stdin LOGIN)")
		case !a.stdinIsTerminal():
			return errors.New("login name missing and standard input is not a terminal: give it as an argument (relayctl login LOGIN)")
		}
		fmt.Fprint(a.stderr, "login: ")
		line, err := readLine(a.stdin)
		if err != nil {
			return fmt.Errorf("read login name: %w", err)
		}
		if *name = strings.TrimSpace(line); *name == "" {
			return errors.New("login name is empty")
		}
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
	toks := resp.Msg.GetTokens()
	saved := fromTokens(toks)
	saved.Members = a.memberURLs(cctx, toks.GetAccessToken())
	if err := a.tokens.put(a.base(), saved); err != nil {
		return err
	}
	role := roleName(toks.GetRole())
	return a.report(map[string]any{
		"server": a.base(), "login": *name, "userId": toks.GetUserId(), "role": role,
		"accessTokenExpiresAt": saved.AccessExpires, "alsoFor": saved.Members,
	}, "logged in to %s as %s (%s)", a.base(), *name, role)
}

func (a *app) logout(ctx context.Context) error {
	key, t, ok := a.tokens.find(a.base())
	if !ok {
		return a.report(map[string]any{"loggedOut": false, "reason": "not logged in"}, "not logged in")
	}
	cctx, cancel := a.ctx(ctx)
	defer cancel()
	req := connect.NewRequest(&controlv1.LogoutRequest{RefreshToken: t.RefreshToken})
	_, err := a.authedAuthClient().Logout(cctx, req)
	_ = a.tokens.put(key, nil)
	if err != nil && connect.CodeOf(err) != connect.CodeUnauthenticated {
		return fmt.Errorf("logout: %w (local tokens removed)", err)
	}
	return a.report(map[string]any{"loggedOut": true}, "logged out")
}

func roleName(r controlv1.Role) string {
	return strings.ToLower(strings.TrimPrefix(r.String(), "ROLE_"))
}
