package api_test

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/auth"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/server"
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
	c.WaitFeature(fsm.FeatureChangePassword)
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
	changeFrom := func(node int, addr, current, next string) error {
		req := connect.NewRequest(&controlv1.ChangePasswordRequest{CurrentPassword: current, NewPassword: next})
		req.Header().Set(api.ForwardedForHeader, addr)
		req.Header().Set(api.ForwardedByHeader, "Bearer "+edge)
		_, err := clientsAs(t, c.Nodes[node], stolen.GetAccessToken()).auth.ChangePassword(ctx, req)
		return err
	}
	guess := func(node int, current string) error {
		return changeFrom(node, "203.0.113.66", current, "mallory's new password")
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
	// The owner, from an address of its own that never failed, gets its
	// attempt although the login's free failures are used, and a change
	// gives its attempt back as a login does: the next one from there
	// passes too.
	const owner = "198.51.100.7"
	if err := changeFrom(1, owner, "password-of-mallory", "mallory's second password"); err != nil {
		t.Errorf("the owner's change while its password is guessed at: %v", err)
	}
	if err := changeFrom(2, owner, "mallory's second password", "mallory's third password"); err != nil {
		t.Errorf("the owner's second change from the same address: %v", err)
	}
	// From the address it logged in from, too.
	if err := change(0, stolen, "mallory's third password", "mallory's new password"); err != nil {
		t.Errorf("the owner's change from where it logged in: %v", err)
	}
}

// A password change waits until every member runs a release that
// applies it alike (its record lists the feature): while n3 runs the
// release before, every node refuses the change with failed_precondition
// and no attempt spent; the cluster's status shows which member lacks
// the feature; once n3 runs this release the change goes through. A
// graceful stop withdraws the node's features at once, so rolling n3
// back closes the gate before the older binary starts.
func TestChangePasswordWaitsForEveryMember(t *testing.T) {
	var older atomic.Bool // n3 runs the release before
	older.Store(true)
	c := clustertest.Start(t, 3, clustertest.Options{
		Configure: func(cfg *server.Config) {
			if cfg.NodeID == "n3" && older.Load() {
				cfg.Features = []string{}
			}
		},
		// Three failures from the tests' one address would make every
		// later attempt wait an hour.
		Auth: api.AuthConfig{Throttle: api.Throttle{AddrFree: 3, LoginFree: 3, BaseDelay: time.Hour, MaxDelay: time.Hour}},
	})
	ctx := ctxT(t, 5*time.Minute)
	c.TokenFor("alice", controlv1.Role_ROLE_USER)
	s := c.Login("alice", "password-of-alice")
	change := func(node int, current, next string) error {
		_, err := clientsAs(t, c.Nodes[node], s.GetAccessToken()).auth.ChangePassword(ctx,
			connect.NewRequest(&controlv1.ChangePasswordRequest{CurrentPassword: current, NewPassword: next}))
		return err
	}
	refused := func(err error) bool {
		return connect.CodeOf(err) == connect.CodeFailedPrecondition && strings.Contains(err.Error(), "1 control node(s)")
	}
	for node := range c.Nodes {
		for range 2 { // six refusals in all: twice the free failures
			clustertest.Eventually(t, 10*time.Second, func() error {
				if err := change(node, "password-of-alice", "alice's new password"); !refused(err) {
					return fmt.Errorf("a change through %s while n3 runs the release before: %v, want failed_precondition counting one node", c.Nodes[node].ID, err)
				}
				return nil
			})
		}
	}
	c.Login("alice", "password-of-alice") // unchanged, and not throttled (Login fails the test otherwise)
	// The cluster's status shows who lacks it.
	features := func() map[string]string {
		st, err := client(t, c, c.Nodes[0]).Status(ctx, connect.NewRequest(&controlv1.StatusRequest{}))
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]string{}
		for _, m := range st.Msg.GetMembers() {
			out[m.GetId()] = strings.Join(m.GetFeatures(), ",")
		}
		return out
	}
	all := strings.Join(fsm.Features(), ",")
	if got := features(); got["n1"] != all || got["n3"] != "" {
		t.Fatalf("features in the cluster's status: %v", got)
	}

	c.Shutdown(2)
	older.Store(false)
	c.Restart(2)
	clustertest.Eventually(t, 30*time.Second, func() error { return change(0, "password-of-alice", "alice's new password") })
	c.Login("alice", "alice's new password")
	if got := features(); got["n3"] != all {
		t.Fatalf("features in the cluster's status after the upgrade: %v", got)
	}

	// Rolled back: from the moment n3's graceful stop returns, before any
	// binary starts on its data.
	c.Shutdown(2)
	if err := change(0, "alice's new password", "alice's third password"); !refused(err) {
		t.Fatalf("a change while n3 is stopped after a graceful stop: %v, want failed_precondition counting one node", err)
	}
	if got := features(); got["n3"] != "" {
		t.Fatalf("features in the cluster's status with n3 stopped: %v", got)
	}
	older.Store(true)
	c.Restart(2)
	c.WaitReady()
	if err := change(1, "alice's new password", "alice's third password"); !refused(err) {
		t.Fatalf("a change with n3 back on the release before: %v, want failed_precondition counting one node", err)
	}
	c.Login("alice", "alice's new password")
}

// Changes racing on the same current password through any node, half of
// them from one session (a form sent twice), the others each from its
// own: one goes through, the others are refused (the hash they checked is
// gone, their session ended with the change, or the password they present
// is no longer current), and every replica holds the same state after.
func TestConcurrentPasswordChanges(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{Auth: api.AuthConfig{Throttle: api.Throttle{
		AddrFree: 1000, LoginFree: 1000, BaseDelay: time.Second, MaxDelay: time.Second,
	}}})
	c.WaitFeature(fsm.FeatureChangePassword)
	ctx := ctxT(t, 5*time.Minute)
	c.TokenFor("alice", controlv1.Role_ROLE_USER)
	const racers = 8
	sessions := make([]*controlv1.Tokens, racers)
	shared := c.Login("alice", "password-of-alice")
	for i := range sessions {
		sessions[i] = shared
		if i >= racers/2 {
			sessions[i] = c.Login("alice", "password-of-alice")
		}
	}
	errs := make([]error, racers)
	var wg sync.WaitGroup
	for i := range racers {
		wg.Go(func() {
			_, errs[i] = clientsAs(t, c.Nodes[i%3], sessions[i].GetAccessToken()).auth.ChangePassword(ctx,
				connect.NewRequest(&controlv1.ChangePasswordRequest{CurrentPassword: "password-of-alice", NewPassword: fmt.Sprint("new password number ", i)}))
		})
	}
	wg.Wait()
	won := -1
	for i, err := range errs {
		switch {
		case err == nil:
			if won >= 0 {
				t.Fatalf("changes %d and %d both went through", won, i)
			}
			won = i
		case connect.CodeOf(err) == connect.CodeFailedPrecondition, connect.CodeOf(err) == connect.CodeInvalidArgument,
			connect.CodeOf(err) == connect.CodeUnauthenticated:
		default:
			t.Fatalf("change %d: %v", i, err)
		}
	}
	if won < 0 {
		t.Fatalf("no change went through: %v", errs)
	}
	codes := make([]string, racers)
	for i, err := range errs {
		codes[i] = "ok"
		if err != nil {
			codes[i] = connect.CodeOf(err).String()
		}
	}
	t.Logf("outcomes: %v", codes)
	c.WaitConverged()
	c.Login("alice", fmt.Sprint("new password number ", won))
}

// After the password-hashing parameters change, an account's next login
// stores its password hashed with the new ones: from then on its logins
// cost what an unknown login's check of the dummy hash costs (made with
// the current parameters), so timing no longer tells the accounts that
// exist from those that do not. The password and the account's sessions
// stay; the next login rehashes nothing.
func TestALoginRehashesAPasswordHashedWithOtherParameters(t *testing.T) {
	params := auth.TestParams
	c := clustertest.Start(t, 1, clustertest.Options{Configure: func(cfg *server.Config) { cfg.Auth.Password = params }})
	c.WaitFeatureUsable(fsm.FeaturePasswordRehash)
	ctx := ctxT(t, 2*time.Minute)
	c.TokenFor("alice", controlv1.Role_ROLE_USER)
	const pw = "password-of-alice"
	stored := func() string {
		t.Helper()
		u, err := c.Nodes[0].Server.Node().FSM().GetUserByLogin("alice")
		if err != nil {
			t.Fatal(err)
		}
		return u.GetPasswordHash()
	}
	before := c.Login("alice", pw)
	first := stored()
	if auth.NeedsRehash(first, params) {
		t.Fatal("a login rehashed a password hashed with the node's own parameters")
	}

	c.Shutdown(0)
	params = auth.Params{Memory: 2 * auth.TestParams.Memory, Time: 1, Threads: 1, SaltLen: 16, KeyLen: 32}
	c.Restart(0)
	if stored() != first {
		t.Fatal("the hash changed without a login")
	}
	c.Login("alice", pw)
	second := stored()
	if second == first || auth.NeedsRehash(second, params) {
		t.Fatalf("after a login under new parameters the hash is %q, want one made with %+v", second, params)
	}
	if ok, err := auth.VerifyPassword(second, pw); err != nil || !ok {
		t.Fatalf("the new hash does not take the password: %v %v", ok, err)
	}
	// The session opened before the rehash stands, and refreshes.
	me := clientsAs(t, c.Nodes[0], before.GetAccessToken())
	if _, err := me.users.GetMe(ctx, connect.NewRequest(&controlv1.GetMeRequest{})); err != nil {
		t.Fatalf("the rehash ended a session: %v", err)
	}
	anon := clientsAs(t, c.Nodes[0], "")
	if _, err := anon.auth.Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: before.GetRefreshToken()})); err != nil {
		t.Fatalf("the session's refresh token after the rehash: %v", err)
	}
	c.Login("alice", pw)
	if stored() != second {
		t.Error("a login under the hash's own parameters rehashed it again")
	}
	if _, err := anon.auth.Login(ctx, connect.NewRequest(&controlv1.LoginRequest{Login: "alice", Password: "not-alice's-password"})); connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Errorf("a wrong password after the rehash: %v, want unauthenticated", err)
	}
}
