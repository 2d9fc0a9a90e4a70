package api_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
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
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

type clients struct {
	auth    controlv1connect.AuthServiceClient
	users   controlv1connect.UserServiceClient
	devices controlv1connect.DeviceServiceClient
	keys    controlv1connect.KeyServiceClient
}

func clientsAs(t *testing.T, n *clustertest.Node, token string) clients {
	hc, u, o := httpClient(t), url(n), connect.WithInterceptors(bearer(token))
	return clients{
		auth:    controlv1connect.NewAuthServiceClient(hc, u, o),
		users:   controlv1connect.NewUserServiceClient(hc, u, o),
		devices: controlv1connect.NewDeviceServiceClient(hc, u, o),
		keys:    controlv1connect.NewKeyServiceClient(hc, u, o),
	}
}

func pubKey(t *testing.T) []byte {
	pk, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return pk
}

func TestRefreshRotationAndReuse(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	first := c.Login("admin", clustertest.AdminPassword)
	anon := clientsAs(t, c.Nodes[c.Follower()], "")

	r1, err := anon.auth.Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: first.GetRefreshToken()}))
	if err != nil {
		t.Fatal(err)
	}
	second := r1.Msg.GetTokens()
	if second.GetRefreshToken() == first.GetRefreshToken() || second.GetAccessToken() == "" {
		t.Fatal("refresh did not rotate the token")
	}
	// The new access token works.
	me, err := clientsAs(t, c.Nodes[0], second.GetAccessToken()).users.GetMe(ctx, connect.NewRequest(&controlv1.GetMeRequest{}))
	if err != nil || me.Msg.GetUser().GetLogin() != "admin" {
		t.Fatalf("GetMe with refreshed token: %v %v", me, err)
	}
	// Presenting the used token again is reuse: refused, and the family
	// dies, so the legitimate successor stops working too.
	_, err = anon.auth.Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: first.GetRefreshToken()}))
	if connect.CodeOf(err) != connect.CodeUnauthenticated || !strings.Contains(err.Error(), "already used") {
		t.Fatalf("reuse: %v", err)
	}
	_, err = anon.auth.Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: second.GetRefreshToken()}))
	if connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("successor after reuse: %v, want Unauthenticated", err)
	}
	// Another login is a separate family, unaffected; logout ends it.
	third := c.Login("admin", clustertest.AdminPassword)
	cl := clientsAs(t, c.Nodes[1], third.GetAccessToken())
	if _, err := cl.auth.Logout(ctx, connect.NewRequest(&controlv1.LogoutRequest{RefreshToken: third.GetRefreshToken()})); err != nil {
		t.Fatal(err)
	}
	_, err = anon.auth.Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: third.GetRefreshToken()}))
	if connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("refresh after logout: %v", err)
	}
	// Malformed tokens and wrong passwords.
	_, err = anon.auth.Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: "garbage"}))
	if connect.CodeOf(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), "refresh_token") {
		t.Fatalf("malformed refresh token: %v", err)
	}
	_, err = anon.auth.Login(ctx, connect.NewRequest(&controlv1.LoginRequest{Login: "admin", Password: "wrong-password"}))
	if connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("wrong password: %v", err)
	}
	_, err = anon.auth.Login(ctx, connect.NewRequest(&controlv1.LoginRequest{Login: "nobody", Password: "wrong-password"}))
	if connect.CodeOf(err) != connect.CodeUnauthenticated || !strings.Contains(err.Error(), "invalid login or password") {
		t.Fatalf("unknown login: %v", err)
	}
}

// A login lasts LoginMaxAge at most, however often it is refreshed:
// every refresh token it gets expires by then, and a refresh after it
// is refused, so a thief who keeps refreshing a stolen token (its owner
// gone, never to present the rotated one) is cut off too. A new login
// starts a new life.
func TestALoginLastsItsMaxAgeHoweverOftenRefreshed(t *testing.T) {
	// The API's clock is moved past the login's life only for calls that
	// are refused before they write anything (a command stamped that far
	// from the leader's clock would be refused for it).
	var ahead atomic.Int64
	now := func() time.Time { return time.Now().Add(time.Duration(ahead.Load())) }
	const maxAge = time.Hour
	c := clustertest.Start(t, 1, clustertest.Options{Auth: api.AuthConfig{LoginMaxAge: maxAge, Now: now}})
	ctx := ctxT(t, time.Minute)
	anon := clientsAs(t, c.Nodes[0], "")
	login := func() *controlv1.Tokens {
		t.Helper()
		r, err := anon.auth.Login(ctx, connect.NewRequest(&controlv1.LoginRequest{Login: "admin", Password: clustertest.AdminPassword}))
		if err != nil {
			t.Fatal(err)
		}
		return r.Msg.GetTokens()
	}
	tok := login()
	loggedIn := time.Now()
	// 30 days from now (RefreshTTL), were it not for the login's max age.
	if exp := tok.GetRefreshTokenExpiresAt().AsTime(); exp.After(loggedIn.Add(maxAge)) {
		t.Fatalf("the login's refresh token expires at %v, past its max age (%v)", exp, loggedIn.Add(maxAge))
	}
	for range 2 {
		r, err := anon.auth.Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: tok.GetRefreshToken()}))
		if err != nil {
			t.Fatalf("refresh within the login's life: %v", err)
		}
		tok = r.Msg.GetTokens()
		if exp := tok.GetRefreshTokenExpiresAt().AsTime(); exp.After(loggedIn.Add(maxAge)) {
			t.Fatalf("a refreshed token expires at %v, past the login's max age (%v)", exp, loggedIn.Add(maxAge))
		}
	}
	ahead.Store(int64(maxAge + time.Minute))
	_, err := anon.auth.Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: tok.GetRefreshToken()}))
	if connect.CodeOf(err) != connect.CodeUnauthenticated || !strings.Contains(err.Error(), "older than its longest life") {
		t.Fatalf("a refresh past the login's max age: %v, want unauthenticated, saying why", err)
	}
	// Knowing a token's id is not knowing the token: the answer to a
	// wrong secret tells nothing of the login's age.
	id, _, _ := strings.Cut(tok.GetRefreshToken(), ".")
	_, err = anon.auth.Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: id + ".AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}))
	if connect.CodeOf(err) != connect.CodeUnauthenticated || !strings.Contains(err.Error(), "not recognised") {
		t.Fatalf("a wrong secret for a known id: %v", err)
	}
	ahead.Store(0)
	if again := login(); again.GetRefreshToken() == "" {
		t.Fatal("a new login got no refresh token")
	}
}

// A thief who refreshed a stolen token first is cut off when the
// token's owner comes back with it, even after the token's own expiry:
// the rotated token is kept until the login ends, so presenting it then
// is still reuse, and the thief's successor dies with the family.
func TestReuseIsSeenPastTheTokensExpiry(t *testing.T) {
	const ttl = 3 * time.Second
	c := clustertest.Start(t, 1, clustertest.Options{Auth: api.AuthConfig{RefreshTTL: ttl, LoginMaxAge: time.Hour}})
	c.WaitFeatureUsable(fsm.FeatureRefreshKeepRotated)
	ctx := ctxT(t, time.Minute)
	anon := clientsAs(t, c.Nodes[0], "")
	stolen := c.Login("admin", clustertest.AdminPassword)
	r, err := anon.auth.Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: stolen.GetRefreshToken()}))
	if err != nil {
		t.Fatalf("the thief's refresh: %v", err)
	}
	thief := r.Msg.GetTokens()
	exp := stolen.GetRefreshTokenExpiresAt().AsTime()
	clustertest.Eventually(t, time.Minute, func() error {
		if now := time.Now(); !now.After(exp) {
			return fmt.Errorf("the stolen token expires at %v, now %v", exp, now)
		}
		return nil
	})
	_, err = anon.auth.Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: stolen.GetRefreshToken()}))
	if connect.CodeOf(err) != connect.CodeUnauthenticated || !strings.Contains(err.Error(), "already used") {
		t.Fatalf("the owner's refresh after the token's expiry: %v, want reuse detected", err)
	}
	id, _, err := auth.ParseRefreshToken(stolen.GetRefreshToken())
	if err != nil {
		t.Fatal(err)
	}
	kept, err := c.Nodes[0].Server.Node().FSM().GetRefreshToken(id)
	if err != nil {
		t.Fatalf("the kept token: %v", err)
	}
	if fam, err := c.Nodes[0].Server.Node().FSM().GetTokenFamily(kept.GetFamilyId()); err != nil || !fam.GetRevoked() || fam.GetRevokeReason() != "refresh token reuse" {
		t.Fatalf("the login after the reuse: %v, %v; want revoked for reuse", fam, err)
	}
	if _, err := clientsAs(t, c.Nodes[0], thief.GetAccessToken()).users.GetMe(ctx, connect.NewRequest(&controlv1.GetMeRequest{})); connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("the thief's access token after the reuse: %v, want unauthenticated", err)
	}
}

// A change of one's own role or status ends every session of the
// account, the caller's own included (its refresh token would otherwise
// outlive the role or status it was issued for, and a disabled account
// enabled again would get it back); one's own password change keeps the
// caller's session and ends the others.
func TestOwnRoleOrStatusChangeEndsOwnSession(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	ctx := ctxT(t, time.Minute)
	anon := clientsAs(t, c.Nodes[0], "")
	admin := clientsAs(t, c.Nodes[0], c.AdminToken())
	viewer, disabled := controlv1.Role_ROLE_VIEWER, controlv1.UserStatus_USER_STATUS_DISABLED
	newPassword := "another-password-of-ada"
	for _, tc := range []struct {
		name     string
		change   *controlv1.UpdateUserRequest
		keepsOwn bool
	}{
		{"role", &controlv1.UpdateUserRequest{Role: &viewer}, false},
		{"status", &controlv1.UpdateUserRequest{Status: &disabled}, false},
		{"password", &controlv1.UpdateUserRequest{Password: &newPassword}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			login := "ada-" + tc.name
			created, err := admin.users.CreateUser(ctx, connect.NewRequest(&controlv1.CreateUserRequest{Login: login, Password: "password-of-" + login, Role: controlv1.Role_ROLE_ADMIN}))
			if err != nil {
				t.Fatal(err)
			}
			own, other := c.Login(login, "password-of-"+login), c.Login(login, "password-of-"+login)
			tc.change.Id = created.Msg.GetUser().GetId()
			if _, err := clientsAs(t, c.Nodes[0], own.GetAccessToken()).users.UpdateUser(ctx, connect.NewRequest(tc.change)); err != nil {
				t.Fatalf("%s changes its own %s: %v", login, tc.name, err)
			}
			refresh := func(tok *controlv1.Tokens) error {
				_, err := anon.auth.Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: tok.GetRefreshToken()}))
				return err
			}
			if err := refresh(other); connect.CodeOf(err) != connect.CodeUnauthenticated {
				t.Fatalf("the other session after its own %s change: %v, want ended", tc.name, err)
			}
			err = refresh(own)
			if tc.keepsOwn && err != nil {
				t.Fatalf("the caller's session after its own %s change: %v, want kept", tc.name, err)
			}
			if !tc.keepsOwn && (connect.CodeOf(err) != connect.CodeUnauthenticated || !strings.Contains(err.Error(), "revoked")) {
				t.Fatalf("the caller's session after its own %s change: %v, want ended", tc.name, err)
			}
		})
	}
}

// An account's completed logins and refreshes are bounded per node
// (TokensPerMinute): past the bucket both are refused resource_exhausted
// with Retry-After, before anything is written; failed ones cost the
// account nothing (nobody else can use up its bucket); another account,
// and an edge's, are not held back.
func TestAnAccountsLoginsAndRefreshesAreBounded(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{Auth: api.AuthConfig{TokensPerMinute: 2,
		Throttle: api.Throttle{AddrFree: 1000, LoginFree: 1000}}})
	ctx := ctxT(t, time.Minute)
	anon := clientsAs(t, c.Nodes[0], "")
	admin := clientsAs(t, c.Nodes[0], c.AdminToken()) // one of the admin's two
	for _, login := range []string{"alice", "bob"} {
		if _, err := admin.users.CreateUser(ctx, connect.NewRequest(&controlv1.CreateUserRequest{Login: login, Password: "password-of-" + login, Role: controlv1.Role_ROLE_USER})); err != nil {
			t.Fatal(err)
		}
	}
	login := func(name, password string) (*controlv1.Tokens, error) {
		r, err := anon.auth.Login(ctx, connect.NewRequest(&controlv1.LoginRequest{Login: name, Password: password}))
		if err != nil {
			return nil, err
		}
		return r.Msg.GetTokens(), nil
	}
	// Wrong passwords first: they take nothing from alice's bucket.
	for range 5 {
		if _, err := login("alice", "not-the-password"); connect.CodeOf(err) != connect.CodeUnauthenticated {
			t.Fatalf("a wrong password: %v", err)
		}
	}
	first, err := login("alice", "password-of-alice")
	if err != nil {
		t.Fatalf("alice's first login: %v", err)
	}
	if _, err := anon.auth.Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: first.GetRefreshToken()})); err != nil {
		t.Fatalf("alice's refresh: %v", err)
	}
	// Two completed: a third login, and a refresh, wait.
	sessions, err := c.Nodes[0].Server.Node().FSM().UserTokenCount(first.GetUserId())
	if err != nil {
		t.Fatal(err)
	}
	_, err = login("alice", "password-of-alice")
	var ce *connect.Error
	if connect.CodeOf(err) != connect.CodeResourceExhausted || !errors.As(err, &ce) || ce.Meta().Get("Retry-After") == "" {
		t.Fatalf("alice's third login in a minute: %v, want resource_exhausted with Retry-After", err)
	}
	// Without the password nobody learns of the bound (nor that the
	// login exists): a wrong one is answered as ever.
	if _, err := login("alice", "not-the-password"); connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("a wrong password while alice waits: %v, want unauthenticated", err)
	}
	if _, err := login("bob", "password-of-bob"); err != nil {
		t.Fatalf("bob's login while alice waits: %v", err)
	}
	if _, err := anon.auth.Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: first.GetRefreshToken()})); connect.CodeOf(err) != connect.CodeResourceExhausted {
		t.Fatalf("alice's refresh past the bound: %v, want resource_exhausted (before the token is looked at for reuse)", err)
	}
	if after, err := c.Nodes[0].Server.Node().FSM().UserTokenCount(first.GetUserId()); err != nil || after != sessions {
		t.Fatalf("alice's refresh tokens: %d (%v) after the refused calls, %d before", after, err, sessions)
	}
	// An edge's account is not bounded.
	c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	for i := range 4 {
		if _, err := login("edge-1", "password-of-edge-1"); err != nil {
			t.Fatalf("the edge's login %d: %v", i+2, err)
		}
	}
}

// An account holds at most MaxSessions sessions, counted across the
// cluster (the count is in the replicated state): a login past it ends
// the oldest, whose access and refresh tokens stop working on every
// member; a logged-out session loses its tokens and takes no room; edges'
// accounts are not capped; a refresh counts in its login's rotations.
func TestAnAccountsSessionsAreCapped(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{Auth: api.AuthConfig{MaxSessions: 2}})
	c.WaitFeatureUsable(fsm.FeatureSessionCap)
	ctx := ctxT(t, time.Minute)
	admin := clientsAs(t, c.Nodes[0], c.AdminToken())
	if _, err := admin.users.CreateUser(ctx, connect.NewRequest(&controlv1.CreateUserRequest{Login: "carol", Password: "password-of-carol", Role: controlv1.Role_ROLE_USER})); err != nil {
		t.Fatal(err)
	}
	login := func(node int, name string) *controlv1.Tokens {
		t.Helper()
		r, err := clientsAs(t, c.Nodes[node], "").auth.Login(ctx, connect.NewRequest(&controlv1.LoginRequest{Login: name, Password: "password-of-" + name}))
		if err != nil {
			t.Fatalf("%s's login on node %d: %v", name, node, err)
		}
		return r.Msg.GetTokens()
	}
	refresh := func(node int, tok *controlv1.Tokens) (*controlv1.Tokens, error) {
		r, err := clientsAs(t, c.Nodes[node], "").auth.Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: tok.GetRefreshToken()}))
		if err != nil {
			return nil, err
		}
		return r.Msg.GetTokens(), nil
	}
	// works reports whether a session's access token is taken by every
	// member (each catches up with the log before it says no).
	works := func(tok *controlv1.Tokens) error {
		for i := range c.Nodes {
			if _, err := clientsAs(t, c.Nodes[i], tok.GetAccessToken()).users.GetMe(ctx, connect.NewRequest(&controlv1.GetMeRequest{})); err != nil {
				return fmt.Errorf("node %d: %w", i, err)
			}
		}
		return nil
	}
	// ended waits for every member to refuse a session's access token (a
	// follower refuses once it has applied the login that ended it).
	ended := func(what string, tok *controlv1.Tokens) {
		t.Helper()
		clustertest.Eventually(t, 30*time.Second, func() error {
			for i := range c.Nodes {
				_, err := clientsAs(t, c.Nodes[i], tok.GetAccessToken()).users.GetMe(ctx, connect.NewRequest(&controlv1.GetMeRequest{}))
				if connect.CodeOf(err) != connect.CodeUnauthenticated || !strings.Contains(err.Error(), "session cap") {
					return fmt.Errorf("%s's access token on node %d: %v, want its session ended", what, i, err)
				}
			}
			return nil
		})
		if _, err := refresh(1, tok); connect.CodeOf(err) != connect.CodeUnauthenticated {
			t.Fatalf("%s's refresh token: %v, want refused", what, err)
		}
	}
	s1 := login(0, "carol")
	id1, _, err := auth.ParseRefreshToken(s1.GetRefreshToken())
	if err != nil {
		t.Fatal(err)
	}
	tok1, err := c.Nodes[c.Leader()].Server.Node().FSM().GetRefreshToken(id1)
	if err != nil {
		t.Fatal(err)
	}
	s2 := login(1, "carol")
	if err := works(s1); err != nil {
		t.Fatalf("the first of two sessions: %v", err)
	}
	s3 := login(2, "carol")
	ended("the oldest session", s1)
	// Its tokens are gone; its record stays, revoked, for its access
	// tokens (so a node refuses them from its own state).
	if fam, err := c.Nodes[c.Leader()].Server.Node().FSM().GetTokenFamily(tok1.GetFamilyId()); err != nil || !fam.GetRevoked() || !strings.Contains(fam.GetRevokeReason(), "session cap") {
		t.Fatalf("the oldest session's family: %v, %v; want it kept, revoked for the session cap", fam, err)
	}
	if _, err := c.Nodes[c.Leader()].Server.Node().FSM().GetRefreshToken(id1); !errors.Is(err, fsm.ErrNotFound) {
		t.Fatalf("the oldest session's refresh token: %v; want it deleted", err)
	}
	s2, err = refresh(0, s2)
	if err != nil {
		t.Fatalf("the second session's refresh: %v", err)
	}
	for _, s := range []*controlv1.Tokens{s2, s3} {
		if err := works(s); err != nil {
			t.Fatalf("a session within the cap: %v", err)
		}
	}
	id, _, err := auth.ParseRefreshToken(s2.GetRefreshToken())
	if err != nil {
		t.Fatal(err)
	}
	leader := c.Nodes[c.Leader()].Server.Node().FSM() // applied every write it answered
	tok, err := leader.GetRefreshToken(id)
	if err != nil {
		t.Fatal(err)
	}
	if fam, err := leader.GetTokenFamily(tok.GetFamilyId()); err != nil || fam.GetRotations() != 1 {
		t.Fatalf("the refreshed login's family: %v, %v; want one rotation counted", fam, err)
	}
	// s3 logged out: it is gone, and the next login ends nothing.
	id3, _, err := auth.ParseRefreshToken(s3.GetRefreshToken())
	if err != nil {
		t.Fatal(err)
	}
	tok3, err := leader.GetRefreshToken(id3)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := clientsAs(t, c.Nodes[2], s3.GetAccessToken()).auth.Logout(ctx, connect.NewRequest(&controlv1.LogoutRequest{RefreshToken: s3.GetRefreshToken()})); err != nil {
		t.Fatal(err)
	}
	if fam, err := leader.GetTokenFamily(tok3.GetFamilyId()); err != nil || !fam.GetRevoked() {
		t.Fatalf("a logged-out session's family: %v, %v; want it kept revoked (for its access tokens)", fam, err)
	}
	if _, err := leader.GetRefreshToken(id3); !errors.Is(err, fsm.ErrNotFound) {
		t.Fatalf("a logged-out session's refresh token: %v; want it deleted", err)
	}
	s4 := login(0, "carol")
	// Every member that takes s4 has applied its login, s2 works on all.
	for _, s := range []*controlv1.Tokens{s4, s2} {
		if err := works(s); err != nil {
			t.Fatalf("a session within the cap, s3 logged out: %v", err)
		}
	}
	ended("the logged-out session", s3)
	// An edge's account is not capped (every edge may share it).
	c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	first := login(0, "edge-1")
	for range 3 {
		login(1, "edge-1")
	}
	if _, err := refresh(2, first); err != nil {
		t.Fatalf("the edge's first session after three more logins: %v", err)
	}
}

// A login refused for its account's bound was checked (its password
// was right), so it stays counted as a failure of its address: a loop of
// them throttles the address that runs it, whatever login it tries next.
func TestALoginRefusedForTheBoundCountsAsAFailure(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{Auth: api.AuthConfig{TokensPerMinute: 1,
		Throttle: api.Throttle{AddrFree: 2, LoginFree: 1000, BaseDelay: time.Hour, MaxDelay: time.Hour}}})
	ctx := ctxT(t, time.Minute)
	admin := clientsAs(t, c.Nodes[0], c.AdminToken())
	for _, name := range []string{"carol", "dave"} {
		if _, err := admin.users.CreateUser(ctx, connect.NewRequest(&controlv1.CreateUserRequest{Login: name, Password: "password-of-" + name, Role: controlv1.Role_ROLE_USER})); err != nil {
			t.Fatal(err)
		}
	}
	anon := clientsAs(t, c.Nodes[0], "")
	login := func(name, password string) error {
		_, err := anon.auth.Login(ctx, connect.NewRequest(&controlv1.LoginRequest{Login: name, Password: password}))
		return err
	}
	if err := login("carol", "password-of-carol"); err != nil {
		t.Fatalf("carol's login: %v", err)
	}
	for i := range 2 {
		if err := login("carol", "password-of-carol"); connect.CodeOf(err) != connect.CodeResourceExhausted || !strings.Contains(err.Error(), "times a minute") {
			t.Fatalf("carol's login %d past her bound: %v", i+2, err)
		}
	}
	// Two failures of this address: dave's login from it (his bucket
	// full) waits.
	if err := login("dave", "password-of-dave"); connect.CodeOf(err) != connect.CodeResourceExhausted || !strings.Contains(err.Error(), "failed login attempts") {
		t.Fatalf("a login from the address after two refused for the bound: %v, want throttled for failed attempts", err)
	}
}

// Login throttling as issue 11 found it wanting: 50 wrong passwords
// from one address, sent round-robin to the three nodes of a cluster,
// get the login's 3 free failures checked (not 3 per node), the rest
// throttled; the owner still logs in, from an address it used before and
// from one that is not guessing, while the guesser, even with the right
// password, waits. Parallel guesses cannot all pass before the first
// failure is counted. Addresses are vouched for by an edge's token, as
// an edge does for browser pages.
func TestLoginThrottleIsClusterWideAndSparesTheOwner(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{Auth: api.AuthConfig{Throttle: api.Throttle{
		AddrFree: 5, LoginFree: 3, BaseDelay: time.Hour, MaxDelay: time.Hour,
	}}})
	ctx := ctxT(t, 5*time.Minute)
	edge := c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	c.TokenFor("alice", controlv1.Role_ROLE_USER) // password "password-of-alice"
	login := func(node int, from, login, password string) error {
		req := connect.NewRequest(&controlv1.LoginRequest{Login: login, Password: password})
		req.Header().Set(api.ForwardedForHeader, from)
		req.Header().Set(api.ForwardedByHeader, "Bearer "+edge)
		_, err := clientsAs(t, c.Nodes[node], "").auth.Login(ctx, req)
		return err
	}
	const home, guesser, cafe = "198.51.100.1", "203.0.113.66", "192.0.2.7"
	if err := login(0, home, "alice", "password-of-alice"); err != nil {
		t.Fatal(err)
	}
	checked := 0
	for i := range 50 {
		err := login(i%3, guesser, "alice", fmt.Sprint("guess-", i))
		switch connect.CodeOf(err) {
		case connect.CodeUnauthenticated:
			checked++
		case connect.CodeResourceExhausted:
			var ce *connect.Error
			if !errors.As(err, &ce) || ce.Meta().Get("Retry-After") == "" || ce.Meta().Get("Retry-After") == "0" {
				t.Fatalf("throttled without Retry-After: %v", err)
			}
		default:
			t.Fatalf("guess %d: %v", i, err)
		}
	}
	if checked != 3 {
		t.Errorf("%d of 50 guesses through three nodes were checked, want the login's 3 free failures", checked)
	}
	for _, from := range []string{home, cafe} {
		if err := login(1, from, "alice", "password-of-alice"); err != nil {
			t.Errorf("the owner from %s while alice is guessed at: %v", from, err)
		}
	}
	if err := login(2, guesser, "alice", "password-of-alice"); connect.CodeOf(err) != connect.CodeResourceExhausted {
		t.Errorf("the guessing address with the right password: %v, want resource_exhausted", err)
	}

	// Twenty guesses at once from a fresh address at another login: the
	// log orders them, and only the free ones are checked.
	c.TokenFor("bob", controlv1.Role_ROLE_USER)
	var mu sync.Mutex // guards parallel
	parallel := 0
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := login(i%3, "203.0.113.99", "bob", fmt.Sprint("guess-", i)); connect.CodeOf(err) == connect.CodeUnauthenticated {
				mu.Lock()
				parallel++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if parallel > 3 {
		t.Errorf("%d of 20 parallel guesses were checked, want at most 3", parallel)
	}
}

func TestUsersAndDevicesThroughTheAPI(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	admin := clientsAs(t, c.Nodes[0], c.AdminToken())

	mk := func(login string) *controlv1.User {
		r, err := admin.users.CreateUser(ctx, connect.NewRequest(&controlv1.CreateUserRequest{Login: login, DisplayName: login, Password: "password-" + login}))
		if err != nil {
			t.Fatal(err)
		}
		return r.Msg.GetUser()
	}
	alice, bob := mk("alice"), mk("bob")
	aliceCl := clientsAs(t, c.Nodes[1], c.Login("alice", "password-alice").GetAccessToken())
	bobCl := clientsAs(t, c.Nodes[2], c.Login("bob", "password-bob").GetAccessToken())

	reg, err := aliceCl.devices.RegisterDevice(ctx, connect.NewRequest(&controlv1.RegisterDeviceRequest{Name: "phone", PublicKey: pubKey(t)}))
	if err != nil {
		t.Fatal(err)
	}
	phone := reg.Msg.GetDevice()
	if phone.GetUserId() != alice.GetId() {
		t.Fatalf("device registered to %s, want alice", phone.GetUserId())
	}
	list, err := aliceCl.devices.ListDevices(ctx, connect.NewRequest(&controlv1.ListDevicesRequest{}))
	if err != nil || len(list.Msg.GetDevices()) != 1 {
		t.Fatalf("alice's devices: %v %v", list, err)
	}
	// Bob cannot see, rename, revoke or delete alice's device: NotFound,
	// exactly like a device that does not exist.
	for name, call := range map[string]func(id string) error{
		"rename": func(id string) error {
			_, err := bobCl.devices.RenameDevice(ctx, connect.NewRequest(&controlv1.RenameDeviceRequest{DeviceId: id, Name: "x"}))
			return err
		},
		"revoke": func(id string) error {
			_, err := bobCl.devices.RevokeDevice(ctx, connect.NewRequest(&controlv1.RevokeDeviceRequest{DeviceId: id}))
			return err
		},
		"delete": func(id string) error {
			_, err := bobCl.devices.DeleteDevice(ctx, connect.NewRequest(&controlv1.DeleteDeviceRequest{DeviceId: id}))
			return err
		},
	} {
		errOther, errMissing := call(phone.GetId()), call("d_does-not-exist")
		if connect.CodeOf(errOther) != connect.CodeNotFound || connect.CodeOf(errMissing) != connect.CodeNotFound {
			t.Fatalf("%s another user's device: %v; a missing one: %v; want NotFound for both", name, errOther, errMissing)
		}
		if strings.ReplaceAll(errOther.Error(), phone.GetId(), "ID") != strings.ReplaceAll(errMissing.Error(), "d_does-not-exist", "ID") {
			t.Fatalf("%s: messages differ, revealing existence: %q vs %q", name, errOther, errMissing)
		}
	}
	if _, err := bobCl.devices.ListDevices(ctx, connect.NewRequest(&controlv1.ListDevicesRequest{UserId: alice.GetId()})); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Fatalf("bob lists alice's devices: %v", err)
	}
	// Nor add his key to her account: a device of hers that he holds the
	// key of would receive her events.
	if _, err := bobCl.devices.RegisterDevice(ctx, connect.NewRequest(&controlv1.RegisterDeviceRequest{UserId: alice.GetId(), Name: "bob's", PublicKey: pubKey(t)})); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Fatalf("bob registers a device to alice: %v, want permission_denied", err)
	}
	if list, err := aliceCl.devices.ListDevices(ctx, connect.NewRequest(&controlv1.ListDevicesRequest{})); err != nil || len(list.Msg.GetDevices()) != 1 {
		t.Fatalf("alice's devices after bob's attempt: %v %v, want her phone alone", list, err)
	}
	if _, err := bobCl.users.GetUser(ctx, connect.NewRequest(&controlv1.GetUserRequest{Id: alice.GetId()})); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Fatalf("bob reads alice: %v", err)
	}
	// Alice renames and revokes her own device.
	ren, err := aliceCl.devices.RenameDevice(ctx, connect.NewRequest(&controlv1.RenameDeviceRequest{DeviceId: phone.GetId(), Name: "old phone"}))
	if err != nil || ren.Msg.GetDevice().GetName() != "old phone" {
		t.Fatalf("rename: %v %v", ren, err)
	}
	rev, err := aliceCl.devices.RevokeDevice(ctx, connect.NewRequest(&controlv1.RevokeDeviceRequest{DeviceId: phone.GetId()}))
	if err != nil || !rev.Msg.GetDevice().GetRevoked() {
		t.Fatalf("revoke: %v %v", rev, err)
	}
	// Staff see everyone; pagination walks all users.
	seen := map[string]bool{}
	token := ""
	for {
		page, err := admin.users.ListUsers(ctx, connect.NewRequest(&controlv1.ListUsersRequest{PageSize: 1, PageToken: token}))
		if err != nil {
			t.Fatal(err)
		}
		for _, u := range page.Msg.GetUsers() {
			seen[u.GetLogin()] = true
		}
		if token = page.Msg.GetNextPageToken(); token == "" {
			break
		}
	}
	if !seen["admin"] || !seen["alice"] || !seen["bob"] || len(seen) != 3 {
		t.Fatalf("paged users %v", seen)
	}
	// Disabling bob cuts his token off at once.
	st := controlv1.UserStatus_USER_STATUS_DISABLED
	if _, err := admin.users.UpdateUser(ctx, connect.NewRequest(&controlv1.UpdateUserRequest{Id: bob.GetId(), Status: &st})); err != nil {
		t.Fatal(err)
	}
	clustertest.Eventually(t, 10*time.Second, func() error {
		_, err := bobCl.users.GetMe(ctx, connect.NewRequest(&controlv1.GetMeRequest{}))
		if connect.CodeOf(err) != connect.CodeUnauthenticated {
			return fmt.Errorf("disabled bob's token: %v", err)
		}
		return nil
	})
	// Deleting alice removes her devices.
	if _, err := admin.users.DeleteUser(ctx, connect.NewRequest(&controlv1.DeleteUserRequest{Id: alice.GetId()})); err != nil {
		t.Fatal(err)
	}
	node := c.Nodes[0].Server.Node()
	if err := node.Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	if d, _ := node.FSM().ListDevices(alice.GetId()); len(d) != 0 {
		t.Fatalf("devices of deleted user remain: %v", d)
	}
}

func TestMalformedRequestsNameTheField(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	admin := clientsAs(t, c.Nodes[0], c.AdminToken())
	long := strings.Repeat("x", 300)
	bad := controlv1.Role(99)
	cases := []struct {
		field string
		call  func() error
	}{
		{"login", func() error {
			_, err := admin.users.CreateUser(ctx, connect.NewRequest(&controlv1.CreateUserRequest{}))
			return err
		}},
		{"login", func() error {
			_, err := admin.users.CreateUser(ctx, connect.NewRequest(&controlv1.CreateUserRequest{Login: long}))
			return err
		}},
		{"display_name", func() error {
			_, err := admin.users.CreateUser(ctx, connect.NewRequest(&controlv1.CreateUserRequest{Login: "ok", DisplayName: long}))
			return err
		}},
		{"password", func() error {
			_, err := admin.users.CreateUser(ctx, connect.NewRequest(&controlv1.CreateUserRequest{Login: "ok", Password: "short"}))
			return err
		}},
		{"role", func() error {
			_, err := admin.users.CreateUser(ctx, connect.NewRequest(&controlv1.CreateUserRequest{Login: "ok", Role: bad}))
			return err
		}},
		{"public_key", func() error {
			_, err := admin.devices.RegisterDevice(ctx, connect.NewRequest(&controlv1.RegisterDeviceRequest{Name: "x", PublicKey: []byte{1, 2, 3}}))
			return err
		}},
		{"name", func() error {
			_, err := admin.devices.RegisterDevice(ctx, connect.NewRequest(&controlv1.RegisterDeviceRequest{PublicKey: pubKey(t)}))
			return err
		}},
		{"page_size", func() error {
			_, err := admin.users.ListUsers(ctx, connect.NewRequest(&controlv1.ListUsersRequest{PageSize: 5000}))
			return err
		}},
		{"consistency", func() error {
			_, err := admin.users.ListUsers(ctx, connect.NewRequest(&controlv1.ListUsersRequest{Consistency: 7}))
			return err
		}},
		{"id", func() error {
			_, err := admin.users.GetUser(ctx, connect.NewRequest(&controlv1.GetUserRequest{Id: "bad id"}))
			return err
		}},
		{"status", func() error {
			st := controlv1.UserStatus(42)
			_, err := admin.users.UpdateUser(ctx, connect.NewRequest(&controlv1.UpdateUserRequest{Id: "admin", Status: &st}))
			return err
		}},
		{"device_id", func() error {
			_, err := admin.devices.RevokeDevice(ctx, connect.NewRequest(&controlv1.RevokeDeviceRequest{}))
			return err
		}},
	}
	for _, tc := range cases {
		err := tc.call()
		if connect.CodeOf(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("want InvalidArgument naming %q, got %v", tc.field, err)
		}
	}
}

// Deleting a user while its devices are being registered and activity
// for them streams in leaves no device, token or activity of that user on
// any replica.
func TestDeleteUserDuringRegistrationsAndActivity(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	admin := clientsAs(t, c.Nodes[0], c.AdminToken())
	u, err := admin.users.CreateUser(ctx, connect.NewRequest(&controlv1.CreateUserRequest{Login: "victim", Password: "password-victim"}))
	if err != nil {
		t.Fatal(err)
	}
	uid := u.Msg.GetUser().GetId()
	victimTok := c.Login("victim", "password-victim")
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var registered sync.Map
	for i := range 3 {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			cl := clientsAs(t, c.Nodes[i], victimTok.GetAccessToken())
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				r, err := cl.devices.RegisterDevice(ctx, connect.NewRequest(&controlv1.RegisterDeviceRequest{Name: fmt.Sprintf("d%d-%d", i, n), PublicKey: pubKey(t)}))
				if err == nil {
					registered.Store(r.Msg.GetDevice().GetId(), true)
				}
			}
		}(i)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		node := c.Nodes[1].Server.Node()
		for {
			select {
			case <-stop:
				return
			default:
			}
			var entries []*statev1.Activity
			registered.Range(func(k, _ any) bool {
				entries = append(entries, &statev1.Activity{UserId: uid, DeviceId: k.(string), SeenAtMs: time.Now().UnixMilli()})
				return len(entries) < 50
			})
			entries = append(entries, &statev1.Activity{UserId: uid, SeenAtMs: time.Now().UnixMilli()})
			_, _ = node.Apply(ctx, &statev1.Command{Op: &statev1.Command_RecordActivity{RecordActivity: &statev1.RecordActivity{Entries: entries}}})
		}
	}()
	clustertest.Eventually(t, 20*time.Second, func() error {
		n := 0
		registered.Range(func(_, _ any) bool { n++; return true })
		if n < 10 {
			return fmt.Errorf("%d devices registered", n)
		}
		return nil
	})
	if _, err := admin.users.DeleteUser(ctx, connect.NewRequest(&controlv1.DeleteUserRequest{Id: uid})); err != nil {
		t.Fatal(err)
	}
	// Let the writers run on against the deleted user for a while: wait
	// until each of them has seen a refusal.
	clustertest.Eventually(t, 20*time.Second, func() error {
		cl := clientsAs(t, c.Nodes[2], victimTok.GetAccessToken())
		_, err := cl.devices.RegisterDevice(ctx, connect.NewRequest(&controlv1.RegisterDeviceRequest{Name: "late", PublicKey: pubKey(t)}))
		if connect.CodeOf(err) != connect.CodeUnauthenticated {
			return fmt.Errorf("registration after delete: %v", err)
		}
		return nil
	})
	close(stop)
	wg.Wait()
	c.WaitConverged()
	for _, n := range c.Nodes {
		f := n.Server.Node().FSM()
		if _, err := f.GetUser(uid); !errors.Is(err, fsm.ErrNotFound) {
			t.Fatalf("%s: user still there: %v", n.ID, err)
		}
		if d, _ := f.ListDevices(uid); len(d) != 0 {
			t.Fatalf("%s: %d devices of the deleted user remain", n.ID, len(d))
		}
		count := 0
		registered.Range(func(k, _ any) bool {
			if _, err := f.DeviceOwner(k.(string)); !errors.Is(err, fsm.ErrNotFound) {
				count++
			}
			return true
		})
		if count != 0 {
			t.Fatalf("%s: %d device owner records remain", n.ID, count)
		}
		if tn, err := f.UserTokenCount(uid); err != nil || tn != 0 {
			t.Fatalf("%s: %d tokens of the deleted user remain (%v)", n.ID, tn, err)
		}
	}
	// And the refresh token is dead.
	_, err = clientsAs(t, c.Nodes[0], "").auth.Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: victimTok.GetRefreshToken()}))
	if connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("refresh of deleted user's token: %v", err)
	}
}

// Guessing one login from ever new addresses, one guess each (an IPv6
// /48 holds 65,536 /64s), stops at the login's ceiling once every member
// applies it: past LoginCeiling failures a clean address waits too,
// while the owner still logs in from home. While a member runs the
// release before (its record lacks the feature), attempts carry no
// ceiling, as that release would decide them, and every clean address
// gets its guess.
func TestGuessingALoginFromNewAddressesStopsAtItsCeiling(t *testing.T) {
	for _, older := range []bool{false, true} {
		t.Run(fmt.Sprint("a member of the release before: ", older), func(t *testing.T) {
			c := clustertest.Start(t, 1, clustertest.Options{
				Configure: func(cfg *server.Config) {
					if older {
						cfg.Features = slices.DeleteFunc(fsm.Features(), func(f string) bool { return f == fsm.FeatureLoginCeiling })
					}
				},
				Auth: api.AuthConfig{Throttle: api.Throttle{AddrFree: 5, LoginFree: 2, LoginCeiling: 4, BaseDelay: time.Hour, MaxDelay: time.Hour}},
			})
			ctx := ctxT(t, 5*time.Minute)
			if !older {
				// Recorded shortly after the node starts: a guess before
				// that carries no ceiling.
				c.WaitFeature(fsm.FeatureLoginCeiling)
			}
			edge := c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
			c.TokenFor("alice", controlv1.Role_ROLE_USER) // password "password-of-alice"
			login := func(from, password string) error {
				req := connect.NewRequest(&controlv1.LoginRequest{Login: "alice", Password: password})
				req.Header().Set(api.ForwardedForHeader, from)
				req.Header().Set(api.ForwardedByHeader, "Bearer "+edge)
				_, err := clientsAs(t, c.Nodes[0], "").auth.Login(ctx, req)
				return err
			}
			const home = "198.51.100.1"
			if err := login(home, "password-of-alice"); err != nil {
				t.Fatal(err)
			}
			checked := 0
			for i := range 10 {
				switch err := login(fmt.Sprintf("2001:db8:0:%x::1", i), fmt.Sprint("guess-", i)); connect.CodeOf(err) {
				case connect.CodeUnauthenticated:
					checked++
				case connect.CodeResourceExhausted:
				default:
					t.Fatalf("guess %d: %v", i, err)
				}
			}
			want := 4
			if older {
				want = 10
			}
			if checked != want {
				t.Errorf("%d of 10 guesses from new addresses were checked, want %d", checked, want)
			}
			if err := login(home, "password-of-alice"); err != nil {
				t.Errorf("the owner from home: %v", err)
			}
		})
	}
}

// Pages cannot lock the edges out: a login an edge forwards (a page's,
// through its console proxy) at an edge account is answered as a wrong
// password, even with the right one, and counts nothing, so guesses at
// the login the edges share from ever new addresses do not push it past
// its ceiling: an edge that logs in from an address not yet trusted for
// it (a new pod) still gets in. The edge's own login is direct.
func TestPagesCannotLockTheEdgesOut(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{
		Auth: api.AuthConfig{Throttle: api.Throttle{AddrFree: 5, LoginFree: 2, LoginCeiling: 4, BaseDelay: time.Hour, MaxDelay: time.Hour}},
	})
	ctx := ctxT(t, 5*time.Minute)
	proxy := c.TokenFor("edge-proxy", controlv1.Role_ROLE_EDGE)
	c.TokenFor("edges", controlv1.Role_ROLE_EDGE) // password "password-of-edges", from 127.0.0.1
	page := func(from, login, password string) error {
		req := connect.NewRequest(&controlv1.LoginRequest{Login: login, Password: password})
		req.Header().Set(api.ForwardedForHeader, from)
		req.Header().Set(api.ForwardedByHeader, "Bearer "+proxy)
		_, err := clientsAs(t, c.Nodes[0], "").auth.Login(ctx, req)
		return err
	}
	for i := range 10 {
		password := fmt.Sprint("guess-", i)
		if i == 9 {
			password = "password-of-edges"
		}
		err := page(fmt.Sprintf("2001:db8:0:%x::1", i), "edges", password)
		if connect.CodeOf(err) != connect.CodeUnauthenticated || !strings.Contains(err.Error(), "invalid login or password") {
			t.Fatalf("a page's login %d at the edges' account: %v, want unauthenticated as for a wrong password", i, err)
		}
	}
	// A new edge, from an address no edge logged in from.
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}, Timeout: 10 * time.Second}
	var protos http.Protocols
	protos.SetUnencryptedHTTP2(true)
	tr := &http.Transport{DialContext: d.DialContext, Protocols: &protos}
	t.Cleanup(tr.CloseIdleConnections)
	newPod := controlv1connect.NewAuthServiceClient(&http.Client{Transport: tr}, url(c.Nodes[0]))
	if _, err := newPod.Login(ctx, connect.NewRequest(&controlv1.LoginRequest{Login: "edges", Password: "password-of-edges"})); err != nil {
		t.Fatalf("an edge from a new address after pages guessed at the edges' login: %v", err)
	}
	// A user's login through the same proxy still opens the account (its
	// failures are counted as before:
	// TestGuessingALoginFromNewAddressesStopsAtItsCeiling).
	c.TokenFor("alice", controlv1.Role_ROLE_USER)
	if err := page("198.51.100.1", "alice", "password-of-alice"); err != nil {
		t.Fatalf("a page's login at a user's account: %v", err)
	}
}
