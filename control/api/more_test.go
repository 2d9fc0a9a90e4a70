package api_test

import (
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/auth"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/server"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// The JWKS endpoint publishes keys that verify the tokens the API issues.
func TestJWKSVerifiesIssuedTokens(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	tok := c.AdminToken()
	resp, err := http.Get(url(c.Nodes[0]) + "/.well-known/jwks.json")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var set struct {
		Keys []struct{ Kid, X string } `json:"keys"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&set); err != nil || len(set.Keys) == 0 {
		t.Fatalf("jwks: %v %v", set, err)
	}
	var keys []auth.VerifyKey
	for _, k := range set.Keys {
		x, _ := base64.RawURLEncoding.DecodeString(k.X)
		keys = append(keys, auth.VerifyKey{ID: k.Kid, Public: ed25519.PublicKey(x)})
	}
	v := auth.NewVerifier("relay", "relay-api", func() []auth.VerifyKey { return keys }, time.Now, time.Minute)
	claims, err := v.Verify(tok)
	if err != nil || claims.Subject != "admin" || claims.Role != auth.RoleAdmin {
		t.Fatalf("verify with published keys: %+v %v", claims, err)
	}
	// After a rotation the new key is published and the old one kept.
	admin := clientsAs(t, c.Nodes[0], tok)
	r, err := admin.keys.RotateSigningKey(context.Background(), connect.NewRequest(&controlv1.RotateSigningKeyRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	list, err := admin.keys.ListKeys(context.Background(), connect.NewRequest(&controlv1.ListKeysRequest{}))
	if err != nil || len(list.Msg.GetSigningKeys()) != 2 || len(list.Msg.GetSessionKeys()) != 1 {
		t.Fatalf("keys after rotation: %v %v", list, err)
	}
	for _, k := range list.Msg.GetSigningKeys() {
		if k.GetCurrent() != (k.GetId() == r.Msg.GetKeyId()) {
			t.Fatalf("current flag wrong: %v", k)
		}
	}
	// The old token still verifies; a new one is signed with the new key.
	if _, err := admin.users.GetMe(context.Background(), connect.NewRequest(&controlv1.GetMeRequest{})); err != nil {
		t.Fatalf("token of the previous key: %v", err)
	}
}

func TestAccountManagementRules(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{Auth: api.AuthConfig{ActivityEvery: 50 * time.Millisecond}})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	admin := clientsAs(t, c.Nodes[0], c.AdminToken())
	op := clientsAs(t, c.Nodes[0], c.TokenFor("op", controlv1.Role_ROLE_OPERATOR))
	u, err := op.users.CreateUser(ctx, connect.NewRequest(&controlv1.CreateUserRequest{Login: "carol", Password: "password-carol"}))
	if err != nil {
		t.Fatal(err)
	}
	id := u.Msg.GetUser().GetId()
	if _, err := op.users.CreateUser(ctx, connect.NewRequest(&controlv1.CreateUserRequest{Login: "boss", Role: controlv1.Role_ROLE_ADMIN})); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Fatalf("operator creating an admin: %v", err)
	}
	role := controlv1.Role_ROLE_ADMIN
	if _, err := op.users.UpdateUser(ctx, connect.NewRequest(&controlv1.UpdateUserRequest{Id: id, Role: &role})); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Fatalf("operator granting admin: %v", err)
	}
	name := "Carol C."
	if _, err := op.users.UpdateUser(ctx, connect.NewRequest(&controlv1.UpdateUserRequest{Id: "admin", DisplayName: &name})); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Fatalf("operator changing the admin: %v", err)
	}
	if _, err := op.users.DeleteUser(ctx, connect.NewRequest(&controlv1.DeleteUserRequest{Id: "admin"})); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Fatalf("operator deleting the admin: %v", err)
	}
	if _, err := admin.users.DeleteUser(ctx, connect.NewRequest(&controlv1.DeleteUserRequest{Id: "admin"})); connect.CodeOf(err) != connect.CodeFailedPrecondition {
		t.Fatalf("admin deleting itself: %v", err)
	}
	if _, err := admin.users.UpdateUser(ctx, connect.NewRequest(&controlv1.UpdateUserRequest{Id: id})); connect.CodeOf(err) != connect.CodeInvalidArgument {
		t.Fatalf("update without fields: %v", err)
	}
	pw, login := "new-carol-password", "carol2"
	up, err := op.users.UpdateUser(ctx, connect.NewRequest(&controlv1.UpdateUserRequest{Id: id, DisplayName: &name, Password: &pw, Login: &login}))
	if err != nil || up.Msg.GetUser().GetDisplayName() != name || up.Msg.GetUser().GetLogin() != "carol2" {
		t.Fatalf("update: %v %v", up, err)
	}
	carol := clientsAs(t, c.Nodes[0], c.Login("carol2", pw).GetAccessToken())
	got, err := op.users.GetUser(ctx, connect.NewRequest(&controlv1.GetUserRequest{Id: id, Consistency: controlv1.ReadConsistency_READ_CONSISTENCY_STALE}))
	if err != nil || got.Msg.GetUser().GetLogin() != "carol2" {
		t.Fatal(got, err)
	}
	if _, err := op.users.GetUser(ctx, connect.NewRequest(&controlv1.GetUserRequest{Id: "u_missing"})); connect.CodeOf(err) != connect.CodeNotFound {
		t.Fatalf("missing user: %v", err)
	}
	// API calls record the caller's activity, throttled.
	if _, err := carol.users.GetMe(ctx, connect.NewRequest(&controlv1.GetMeRequest{})); err != nil {
		t.Fatal(err)
	}
	clustertest.Eventually(t, 10*time.Second, func() error {
		u, err := c.Nodes[0].Server.Node().FSM().GetUser(id)
		if err != nil || u.GetLastActivityMs() == 0 {
			return fmt.Errorf("last activity not recorded: %v %v", u, err)
		}
		return nil
	})
	// A role change cuts the old token off.
	viewer := controlv1.Role_ROLE_VIEWER
	if _, err := admin.users.UpdateUser(ctx, connect.NewRequest(&controlv1.UpdateUserRequest{Id: id, Role: &viewer})); err != nil {
		t.Fatal(err)
	}
	if _, err := carol.users.GetMe(ctx, connect.NewRequest(&controlv1.GetMeRequest{})); connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("token after a role change: %v", err)
	}
}

// Device changes reach watchers; node records never do.
func TestWatchDeviceEvents(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	edge := c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	node := c.Nodes[0].Server.Node()
	start := node.FSM().AppliedIndex()
	w := startWatch(t, c.Nodes[0], edge, start, true)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	mkUser(t, c, 0, "wd")
	for _, cmd := range []*statev1.Command{
		{Op: &statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: "dv", UserId: "wd", Name: "x", PublicKey: pubKey(t)}}}},
		{Op: &statev1.Command_RevokeDevice{RevokeDevice: &statev1.RevokeDevice{UserId: "wd", DeviceId: "dv"}}},
		{Op: &statev1.Command_RegisterEdge{RegisterEdge: &statev1.RegisterEdge{Edge: &statev1.Edge{Id: "e1", Addrs: []string{"a:1"}, LeaseExpiresAtMs: time.Now().Add(time.Hour).UnixMilli()}}}},
		{Op: &statev1.Command_DeregisterEdge{DeregisterEdge: &statev1.DeregisterEdge{Id: "e1"}}},
		{Op: &statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: "wd"}}},
	} {
		if _, err := node.Apply(ctx, cmd); err != nil {
			t.Fatal(err)
		}
	}
	var kinds []string
	for len(kinds) < 7 {
		m := w.next(t)
		ev := m.GetEvent()
		switch {
		case ev.GetUserPut() != nil:
			kinds = append(kinds, "user_put")
		case ev.GetDevicePut() != nil:
			kinds = append(kinds, fmt.Sprintf("device_put(revoked=%v)", ev.GetDevicePut().GetRevoked()))
		case ev.GetEdgePut() != nil:
			kinds = append(kinds, "edge_put")
		case ev.GetEdgeDeleted() != "":
			kinds = append(kinds, "edge_deleted")
		case ev.GetDeviceDeleted() != nil:
			kinds = append(kinds, "device_deleted")
		case ev.GetUserDeleted() != "":
			kinds = append(kinds, "user_deleted")
		}
	}
	want := "user_put device_put(revoked=false) device_put(revoked=true) edge_put edge_deleted device_deleted user_deleted"
	if strings.Join(kinds, " ") != want {
		t.Fatalf("events %v\nwant %s", kinds, want)
	}
}

// A node's token follows the signing key: minted again once the key
// rotates (a key rotated out is honoured only for AccessTTL + Leeway, so
// a cached token of it would fail every forwarded call after that), and
// never living longer than an access token.
func TestNodeTokensFollowTheSigningKey(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	a := api.NewAuthenticator(c.Nodes[0].Server.Node(), api.AuthConfig{Password: auth.TestParams, AccessTTL: time.Minute})
	part := func(tok string, i int, v any) {
		t.Helper()
		b, err := base64.RawURLEncoding.DecodeString(strings.Split(tok, ".")[i])
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(b, v); err != nil {
			t.Fatal(err)
		}
	}
	mint := func() (tok, kid string, life time.Duration) {
		t.Helper()
		tok, err := a.NodeToken()
		if err != nil {
			t.Fatal(err)
		}
		var h struct{ Kid string }
		var p struct{ Iat, Exp int64 }
		part(tok, 0, &h)
		part(tok, 1, &p)
		return tok, h.Kid, time.Duration(p.Exp-p.Iat) * time.Second
	}
	first, kid, life := mint()
	if life > time.Minute {
		t.Fatalf("a node token lives %s, longer than an access token (1m)", life)
	}
	if again, _, _ := mint(); again != first {
		t.Fatal("the node token was not reused while its key is current")
	}
	r, err := clientsAs(t, c.Nodes[0], c.AdminToken()).keys.RotateSigningKey(context.Background(), connect.NewRequest(&controlv1.RotateSigningKeyRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	if _, now, _ := mint(); now != r.Msg.GetKeyId() || now == kid {
		t.Fatalf("after the rotation to %s the node token is signed with %s (before: %s)", r.Msg.GetKeyId(), now, kid)
	}
}

// NodeToken runs for every call a node forwards to another: its cached
// token must cost little to hand out.
func BenchmarkNodeToken(b *testing.B) {
	c := clustertest.Start(b, 1, clustertest.Options{})
	a := api.NewAuthenticator(c.Nodes[0].Server.Node(), api.AuthConfig{Password: auth.TestParams})
	if _, err := a.NodeToken(); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := a.NodeToken(); err != nil {
			b.Fatal(err)
		}
	}
}

// A login or a password change whose caller gives up while it waits for
// a hashing slot (all of them busy with other checks) is answered with
// the caller's deadline, not as a wrong password (which the per-code
// metrics would count as an authentication failure), and alike for a
// login that exists and one that does not, so the answer tells neither
// apart. Nothing was checked, so it spends no attempt: the address's
// first failures would otherwise make its next attempts wait an hour.
// With a slot, the password decides again; the dummy hash an unknown
// login is checked against opens nothing, whatever the password.
func TestNoHashingSlotNoVerdictNoAttempt(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	c.WaitFeature(fsm.FeatureChangePassword)
	node := c.Nodes[0].Server.Node()
	a := api.NewAuthenticator(node, api.AuthConfig{Password: auth.TestParams,
		Throttle: api.Throttle{AddrFree: 2, LoginFree: 1, BaseDelay: time.Hour, MaxDelay: time.Hour}})
	srv, err := api.NewAuthServer(node, a, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	admin, err := node.FSM().GetUserByLogin("admin")
	if err != nil {
		t.Fatal(err)
	}
	login := func(ctx context.Context, login, password string) error {
		_, err := srv.Login(ctx, connect.NewRequest(&controlv1.LoginRequest{Login: login, Password: password}))
		return err
	}
	changePassword := func(ctx context.Context) error {
		ctx = auth.WithClaims(ctx, auth.Claims{Subject: admin.GetId(), Login: "admin", Role: auth.RoleAdmin, Session: "f_test"})
		_, err := srv.ChangePassword(ctx, connect.NewRequest(&controlv1.ChangePasswordRequest{
			CurrentPassword: clustertest.AdminPassword, NewPassword: "a new password of the admin"}))
		return err
	}
	release := api.HoldHashSlots(a)
	for what, call := range map[string]func(context.Context) error{
		"login as admin":       func(ctx context.Context) error { return login(ctx, "admin", clustertest.AdminPassword) },
		"login as nobody":      func(ctx context.Context) error { return login(ctx, "no-such-login", clustertest.AdminPassword) },
		"admin's new password": changePassword,
	} {
		// Generous: the reads before the wait use the same context and
		// must not be what ends it.
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		err := call(ctx)
		cancel()
		if connect.CodeOf(err) != connect.CodeDeadlineExceeded || !strings.Contains(err.Error(), "hash") {
			t.Errorf("%s with every hashing slot taken: %v, want deadline exceeded while waiting to hash", what, err)
		}
	}
	release()
	// A failure of the address's two free ones, then the right password:
	// one failure more, from any of the calls above, and it waits an hour.
	if err := login(ctxT(t, 20*time.Second), "no-such-login", "not a real password, only for timing"); connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Errorf("an unknown login with the dummy hash's password: %v, want unauthenticated", err)
	}
	if err := login(ctxT(t, 20*time.Second), "admin", clustertest.AdminPassword); err != nil {
		t.Fatalf("the right password once a slot is free: %v (want no attempt counted while none was)", err)
	}
}

// After a leak, a rotation with retire_now stops the replaced keys at
// once: an access token of the old signing key is refused from then on
// (a plain rotation keeps it verifying for the tokens' lifetime, above),
// and the old session key leaves the ring the edges follow.
func TestARotationWithRetireNowStopsTheOldKeyAtOnce(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	ctx := ctxT(t, 30*time.Second)
	old := c.TokenFor("op-now", controlv1.Role_ROLE_ADMIN)
	oldCl := clientsAs(t, c.Nodes[0], old)
	if _, err := oldCl.users.GetMe(ctx, connect.NewRequest(&controlv1.GetMeRequest{})); err != nil {
		t.Fatalf("the token before any rotation: %v", err)
	}
	if _, err := oldCl.keys.RotateSigningKey(ctx, connect.NewRequest(&controlv1.RotateSigningKeyRequest{RetireNow: true})); err != nil {
		t.Fatal(err)
	}
	if _, err := oldCl.users.GetMe(ctx, connect.NewRequest(&controlv1.GetMeRequest{})); connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("a token of the key retired now: %v, want unauthenticated", err)
	}
	admin := clientsAs(t, c.Nodes[0], c.AdminToken())
	before, err := admin.keys.ListKeys(ctx, connect.NewRequest(&controlv1.ListKeysRequest{}))
	if err != nil || len(before.Msg.GetSessionKeys()) != 1 {
		t.Fatalf("session keys: %v %v", before, err)
	}
	r, err := admin.keys.RotateSessionKey(ctx, connect.NewRequest(&controlv1.RotateSessionKeyRequest{RetireNow: true}))
	if err != nil {
		t.Fatal(err)
	}
	after, err := admin.keys.ListKeys(ctx, connect.NewRequest(&controlv1.ListKeysRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range after.Msg.GetSessionKeys() {
		if k.GetId() != r.Msg.GetKeyId() && (k.GetExpiresAt() == nil || k.GetExpiresAt().AsTime().After(time.Now())) {
			t.Fatalf("the replaced session key %s is still in use: %v", k.GetId(), k)
		}
	}

	// Keys retired by earlier rotations, still in their grace, stop too.
	sessionKeys := func() []string {
		t.Helper()
		l, err := admin.keys.ListKeys(ctx, connect.NewRequest(&controlv1.ListKeysRequest{}))
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, k := range l.Msg.GetSessionKeys() {
			ids = append(ids, k.GetId())
		}
		return ids
	}
	c.WaitFeature(fsm.FeatureRetireAllKeys)
	if _, err := admin.keys.RotateSessionKey(ctx, connect.NewRequest(&controlv1.RotateSessionKeyRequest{})); err != nil {
		t.Fatal(err)
	}
	if ids := sessionKeys(); len(ids) != 2 {
		t.Fatalf("after a plain rotation: %v, want the new key and the one in its grace", ids)
	}
	r, err = admin.keys.RotateSessionKey(ctx, connect.NewRequest(&controlv1.RotateSessionKeyRequest{RetireNow: true}))
	if err != nil || !r.Msg.GetOlderRetired() {
		t.Fatalf("retire now: %v %v", r, err)
	}
	if ids := sessionKeys(); len(ids) != 1 || ids[0] != r.Msg.GetKeyId() {
		t.Fatalf("after retire now: %v, want %s alone", ids, r.Msg.GetKeyId())
	}
	sr, err := admin.keys.RotateSigningKey(ctx, connect.NewRequest(&controlv1.RotateSigningKeyRequest{RetireNow: true}))
	if err != nil || !sr.Msg.GetOlderRetired() {
		t.Fatalf("retire now (signing): %v %v", sr, err)
	}
	// Every access token signed before is refused now, the admin's too:
	// it logs in again.
	if _, err := admin.keys.ListKeys(ctx, connect.NewRequest(&controlv1.ListKeysRequest{})); connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("a token of a key retired by an earlier rotation: %v, want unauthenticated", err)
	}
	admin = clientsAs(t, c.Nodes[0], c.AdminToken())
	if l, err := admin.keys.ListKeys(ctx, connect.NewRequest(&controlv1.ListKeysRequest{})); err != nil || len(l.Msg.GetSigningKeys()) != 1 {
		t.Fatalf("signing keys after retire now: %v %v", l, err)
	}

	// A cluster with a member whose release cannot apply that (a node of
	// an older release): only the replaced key stops, and the answer
	// says so.
	c = clustertest.Start(t, 1, clustertest.Options{Configure: func(cfg *server.Config) {
		cfg.Features = slices.DeleteFunc(fsm.Features(), func(f string) bool { return f == fsm.FeatureRetireAllKeys })
	}})
	admin = clientsAs(t, c.Nodes[0], c.AdminToken())
	if _, err := admin.keys.RotateSessionKey(ctx, connect.NewRequest(&controlv1.RotateSessionKeyRequest{})); err != nil {
		t.Fatal(err)
	}
	r, err = admin.keys.RotateSessionKey(ctx, connect.NewRequest(&controlv1.RotateSessionKeyRequest{RetireNow: true}))
	if err != nil || r.Msg.GetOlderRetired() {
		t.Fatalf("retire now with a member that cannot: %v %v", r, err)
	}
	if ids := sessionKeys(); len(ids) != 2 {
		t.Fatalf("with a member that cannot retire older keys: %v, want the new key and the one retired earlier", ids)
	}
}
