package api_test

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/clustertest"
	edgeserver "github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/internal/relaytest"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

// Every way a session ends reaches the access tokens issued in it, on
// every node of a three-node cluster and through an edge's /api/ (which
// passes calls on to the control plane: the control plane's refusal is
// the edge's). A node refuses as soon as it has applied the revocation;
// the test logs how long that took after the revoking call returned.
// Another session of the same account is untouched by a logout.
func TestRevocationReachesAccessTokensEverywhere(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{
		ControlNodes: 3,
		Edge:         func(_ int, cfg *edgeserver.Config) { cfg.AdminAddr = "127.0.0.1:0" },
	})
	c := r.Cluster
	ctx := ctxT(t, 5*time.Minute)
	hc := httpClient(t)
	plain := &http.Client{Timeout: 30 * time.Second}
	admin := c.AdminToken()
	c.TokenFor("alice", controlv1.Role_ROLE_USER)
	const password = "password-of-alice"
	aliceID := userID(t, c, "alice")

	// getMe calls GetMe with token through node i (0..2) or, for i = 3,
	// through the edge; it returns the HTTP status and the error.
	getMe := func(i int, token string) (int, connectError) {
		h := map[string]string{"Authorization": "Bearer " + token}
		if i == len(c.Nodes) {
			return postJSON(t, plain, r.Edges[0].AdminURL()+"/api/control.v1.UserService/GetMe", strings.NewReader("{}"), h)
		}
		return postJSON(t, hc, url(c.Nodes[i])+"/control.v1.UserService/GetMe", strings.NewReader("{}"), h)
	}
	where := func(i int) string {
		if i == len(c.Nodes) {
			return "the edge"
		}
		return c.Nodes[i].ID
	}
	works := func(token string) {
		t.Helper()
		for i := 0; i <= len(c.Nodes); i++ {
			clustertest.Eventually(t, 10*time.Second, func() error {
				if status, ce := getMe(i, token); status != http.StatusOK {
					return fmt.Errorf("GetMe through %s: %d %+v", where(i), status, ce)
				}
				return nil
			})
		}
	}
	refused := func(what, token string, since time.Time) {
		t.Helper()
		for i := 0; i <= len(c.Nodes); i++ {
			clustertest.Eventually(t, 10*time.Second, func() error {
				status, ce := getMe(i, token)
				if status != http.StatusUnauthorized || ce.Code != "unauthenticated" || !strings.Contains(ce.Message, "revoked") {
					return fmt.Errorf("%s: GetMe through %s: %d %+v; want unauthenticated, session revoked", what, where(i), status, ce)
				}
				return nil
			})
			t.Logf("%s: refused through %s %v after the revoking call returned", what, where(i), time.Since(since).Round(time.Millisecond))
		}
	}
	auth := func(i int, token string) controlv1connect.AuthServiceClient {
		return controlv1connect.NewAuthServiceClient(hc, url(c.Nodes[i]), connect.WithInterceptors(bearer(token)))
	}
	users := controlv1connect.NewUserServiceClient(hc, url(c.Nodes[1]), connect.WithInterceptors(bearer(admin)))

	t.Run("logout", func(t *testing.T) {
		s, other := c.Login("alice", password), c.Login("alice", password)
		works(s.GetAccessToken())
		start := time.Now()
		if _, err := auth(2, s.GetAccessToken()).Logout(ctx, connect.NewRequest(&controlv1.LogoutRequest{RefreshToken: s.GetRefreshToken()})); err != nil {
			t.Fatal(err)
		}
		refused("logout", s.GetAccessToken(), start)
		works(other.GetAccessToken())
	})
	t.Run("refresh token reuse", func(t *testing.T) {
		s := c.Login("alice", password)
		next, err := auth(0, "").Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: s.GetRefreshToken()}))
		if err != nil {
			t.Fatal(err)
		}
		works(next.Msg.GetTokens().GetAccessToken())
		start := time.Now()
		if _, err := auth(1, "").Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: s.GetRefreshToken()})); connect.CodeOf(err) != connect.CodeUnauthenticated {
			t.Fatalf("reused refresh token: %v", err)
		}
		refused("reuse (first access token)", s.GetAccessToken(), start)
		refused("reuse (access token of the successor)", next.Msg.GetTokens().GetAccessToken(), start)
	})
	// Account changes through the admin; changing back reopens nothing.
	pw := password // the same password: still a new one
	disabled, active := controlv1.UserStatus_USER_STATUS_DISABLED, controlv1.UserStatus_USER_STATUS_ACTIVE
	viewer, user := controlv1.Role_ROLE_VIEWER, controlv1.Role_ROLE_USER
	for _, tc := range []struct {
		name    string
		changes []*controlv1.UpdateUserRequest
	}{
		{"password change", []*controlv1.UpdateUserRequest{{Password: &pw}}},
		{"disable, enable", []*controlv1.UpdateUserRequest{{Status: &disabled}, {Status: &active}}},
		{"role change and back", []*controlv1.UpdateUserRequest{{Role: &viewer}, {Role: &user}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := c.Login("alice", password)
			works(s.GetAccessToken())
			start := time.Now()
			for _, req := range tc.changes {
				req.Id = aliceID
				if _, err := users.UpdateUser(ctx, connect.NewRequest(req)); err != nil {
					t.Fatal(err)
				}
			}
			refused(tc.name, s.GetAccessToken(), start)
		})
	}
}

// userID returns the id of the account with login, through the admin.
func userID(t *testing.T, c *clustertest.Cluster, login string) string {
	t.Helper()
	cl := controlv1connect.NewUserServiceClient(httpClient(t), url(c.Nodes[0]), connect.WithInterceptors(bearer(c.AdminToken())))
	resp, err := cl.ListUsers(context.Background(), connect.NewRequest(&controlv1.ListUsersRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range resp.Msg.GetUsers() {
		if u.GetLogin() == login {
			return u.GetId()
		}
	}
	t.Fatalf("no account %q", login)
	return ""
}
