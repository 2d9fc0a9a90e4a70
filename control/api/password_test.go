package api_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
)

// An account changes its own password with its current one, on a
// three-node cluster: bad requests are refused naming the field and
// change nothing; the change ends the account's other sessions on every
// node and keeps the caller's; the old password opens nothing after it.
// Wrong current passwords are throttled as failed logins of the account,
// so a stolen access token buys no more guesses than the login form.
func TestChangeOwnPassword(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{Auth: api.AuthConfig{Throttle: api.Throttle{
		AddrFree: 1000, LoginFree: 3, BaseDelay: time.Hour, MaxDelay: time.Hour,
	}}})
	ctx := ctxT(t, 5*time.Minute)
	c.TokenFor("alice", controlv1.Role_ROLE_USER)
	const old, next = "password-of-alice", "alice's new password"
	caller, other := c.Login("alice", old), c.Login("alice", old)
	change := func(node int, tok *controlv1.Tokens, current, to string) error {
		_, err := clientsAs(t, c.Nodes[node], tok.GetAccessToken()).auth.ChangePassword(ctx,
			connect.NewRequest(&controlv1.ChangePasswordRequest{CurrentPassword: current, NewPassword: to}))
		return err
	}
	for _, tc := range []struct {
		name, current, to, field string
	}{
		{"wrong current password", "not alice's password", next, "current_password"},
		{"no current password", "", next, "current_password"},
		{"short new password", old, "short", "new_password"},
		{"the same password", old, old, "new_password"},
	} {
		err := change(0, caller, tc.current, tc.to)
		if connect.CodeOf(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("%s: %v, want invalid_argument naming %s", tc.name, err, tc.field)
		}
	}
	c.Login("alice", old) // still the password (Login fails the test otherwise)

	if err := change(1, caller, old, next); err != nil {
		t.Fatalf("change: %v", err)
	}
	me := func(node int, tok *controlv1.Tokens) error {
		_, err := clientsAs(t, c.Nodes[node], tok.GetAccessToken()).users.GetMe(ctx, connect.NewRequest(&controlv1.GetMeRequest{}))
		return err
	}
	for node := range c.Nodes {
		clustertest.Eventually(t, 10*time.Second, func() error {
			if err := me(node, other); connect.CodeOf(err) != connect.CodeUnauthenticated {
				return fmt.Errorf("the other session's token on %s: %v, want unauthenticated", c.Nodes[node].ID, err)
			}
			return nil
		})
		if err := me(node, caller); err != nil {
			t.Errorf("the caller's session on %s after its change: %v", c.Nodes[node].ID, err)
		}
	}
	refresh := func(tok *controlv1.Tokens) error {
		_, err := clientsAs(t, c.Nodes[2], "").auth.Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: tok.GetRefreshToken()}))
		return err
	}
	if err := refresh(other); connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Errorf("the other session's refresh token: %v, want unauthenticated", err)
	}
	if err := refresh(caller); err != nil {
		t.Errorf("the caller's refresh token: %v", err)
	}
	login := func(password string) error {
		_, err := clientsAs(t, c.Nodes[0], "").auth.Login(ctx, connect.NewRequest(&controlv1.LoginRequest{Login: "alice", Password: password}))
		return err
	}
	if err := login(old); connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Errorf("login with the old password: %v, want unauthenticated", err)
	}
	if err := login(next); err != nil {
		t.Errorf("login with the new password: %v", err)
	}

	// Guessing the current password with a stolen token, from an address
	// the account never logged in from (an edge's forwarded address, as
	// the console's calls come).
	edge := c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	c.TokenFor("mallory", controlv1.Role_ROLE_USER)
	stolen := c.Login("mallory", "password-of-mallory")
	guess := func(node int, current string) error {
		req := connect.NewRequest(&controlv1.ChangePasswordRequest{CurrentPassword: current, NewPassword: "mallory's new password"})
		req.Header().Set(api.ForwardedForHeader, "203.0.113.66")
		req.Header().Set(api.ForwardedByHeader, "Bearer "+edge)
		_, err := clientsAs(t, c.Nodes[node], stolen.GetAccessToken()).auth.ChangePassword(ctx, req)
		return err
	}
	checked := 0
	for i := range 10 {
		err := guess(i%3, fmt.Sprint("guess-", i))
		switch connect.CodeOf(err) {
		case connect.CodeInvalidArgument:
			checked++
		case connect.CodeResourceExhausted:
			var ce *connect.Error
			if !errors.As(err, &ce) || ce.Meta().Get("Retry-After") == "" {
				t.Fatalf("throttled without Retry-After: %v", err)
			}
		default:
			t.Fatalf("guess %d: %v", i, err)
		}
	}
	if checked != 3 {
		t.Errorf("%d of 10 guesses were checked, want the login's 3 free failures", checked)
	}
	if err := guess(0, "password-of-mallory"); connect.CodeOf(err) != connect.CodeResourceExhausted {
		t.Errorf("the right password from the guessing address: %v, want resource_exhausted", err)
	}
	// The owner, from the address it logged in from, is not held back.
	if err := change(0, stolen, "password-of-mallory", "mallory's new password"); err != nil {
		t.Errorf("the owner's change while its password is guessed at: %v", err)
	}
}
