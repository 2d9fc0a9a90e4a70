package api_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/server"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
)

// Operators manage user accounts and their devices, not staff or edge
// accounts: they may not change or delete an admin, operator or edge
// account, nor register, rename, revoke or delete its devices (an
// operator's key on an admin's account would get the admin's events).
// Admins may do all of it.
func TestOperatorsManageOnlyUserAccounts(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	ctx := ctxT(t, time.Minute)
	admin := clientsAs(t, c.Nodes[0], c.AdminToken())
	op := clientsAs(t, c.Nodes[0], c.TokenFor("op", controlv1.Role_ROLE_OPERATOR))
	create := func(login string, role controlv1.Role) (user, device string) {
		t.Helper()
		u, err := admin.users.CreateUser(ctx, connect.NewRequest(&controlv1.CreateUserRequest{Login: login, Password: "password-of-" + login, Role: role}))
		if err != nil {
			t.Fatal(err)
		}
		d, err := admin.devices.RegisterDevice(ctx, connect.NewRequest(&controlv1.RegisterDeviceRequest{UserId: u.Msg.GetUser().GetId(), Name: "dev", PublicKey: pubKey(t)}))
		if err != nil {
			t.Fatal(err)
		}
		return u.Msg.GetUser().GetId(), d.Msg.GetDevice().GetId()
	}
	name := "renamed"
	attempts := func(cl clients, user, device string) map[string]error {
		pw := "a-new-password-1"
		out := map[string]error{}
		_, out["register device"] = cl.devices.RegisterDevice(ctx, connect.NewRequest(&controlv1.RegisterDeviceRequest{UserId: user, Name: "op-key", PublicKey: pubKey(t)}))
		_, out["rename device"] = cl.devices.RenameDevice(ctx, connect.NewRequest(&controlv1.RenameDeviceRequest{UserId: user, DeviceId: device, Name: name}))
		_, out["revoke device"] = cl.devices.RevokeDevice(ctx, connect.NewRequest(&controlv1.RevokeDeviceRequest{UserId: user, DeviceId: device}))
		_, out["delete device"] = cl.devices.DeleteDevice(ctx, connect.NewRequest(&controlv1.DeleteDeviceRequest{UserId: user, DeviceId: device}))
		_, out["change password"] = cl.users.UpdateUser(ctx, connect.NewRequest(&controlv1.UpdateUserRequest{Id: user, Password: &pw}))
		_, out["delete"] = cl.users.DeleteUser(ctx, connect.NewRequest(&controlv1.DeleteUserRequest{Id: user}))
		return out
	}
	for _, role := range []controlv1.Role{controlv1.Role_ROLE_ADMIN, controlv1.Role_ROLE_OPERATOR, controlv1.Role_ROLE_EDGE} {
		user, device := create("staff-"+role.String(), role)
		for what, err := range attempts(op, user, device) {
			if connect.CodeOf(err) != connect.CodePermissionDenied {
				t.Errorf("operator may %s of a %v account: %v, want permission_denied", what, role, err)
			}
		}
		for what, err := range attempts(admin, user, device) {
			if err != nil {
				t.Errorf("admin may %s of a %v account: %v", what, role, err)
			}
		}
	}
	user, device := create("someone", controlv1.Role_ROLE_USER)
	for what, err := range attempts(op, user, device) {
		if err != nil {
			t.Errorf("operator may %s of a user account: %v", what, err)
		}
	}
	// An account that does not exist is not found, not let through.
	pw := "a-new-password-1"
	if _, err := op.users.UpdateUser(ctx, connect.NewRequest(&controlv1.UpdateUserRequest{Id: "u_nobody", Password: &pw})); connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("operator changing a missing account: %v, want not_found", err)
	}
}

// The rule holds on a follower that has not applied the account yet: an
// operator who asks it to change a new admin's password is refused, and
// the write never happens, instead of being checked against the
// follower's stale copy (where the admin does not exist) and forwarded.
func TestOperatorRuleHoldsOnALaggingFollower(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	opTok := c.TokenFor("op", controlv1.Role_ROLE_OPERATOR)
	c.WaitConverged()
	admin := clientsAs(t, c.Nodes[c.Leader()], c.AdminToken())
	fi := c.Follower()
	c.Isolate(fi) // Raft traffic only: its API, and its forwarding, still work
	ctx := ctxT(t, time.Minute)
	boss, err := admin.users.CreateUser(ctx, connect.NewRequest(&controlv1.CreateUserRequest{Login: "boss", Password: "password-of-boss", Role: controlv1.Role_ROLE_ADMIN}))
	if err != nil {
		t.Fatal(err)
	}
	id := boss.Msg.GetUser().GetId()
	op := clientsAs(t, c.Nodes[fi], opTok)
	pw := "operator-chose-this"
	// The follower cannot catch up while isolated: the request cannot be
	// checked, so it must not succeed.
	short, cancel := context.WithTimeout(ctx, 2*time.Second)
	_, err = op.users.UpdateUser(short, connect.NewRequest(&controlv1.UpdateUserRequest{Id: id, Password: &pw}))
	cancel()
	if err == nil {
		t.Fatal("an operator changed a new admin's password through a follower that did not know the admin")
	}
	c.Heal(fi)
	c.WaitConverged()
	if _, err := op.users.UpdateUser(ctx, connect.NewRequest(&controlv1.UpdateUserRequest{Id: id, Password: &pw})); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Fatalf("after the follower caught up: %v, want permission_denied", err)
	}
	if tok := c.Login("boss", "password-of-boss"); tok.GetAccessToken() == "" {
		t.Fatal("the admin's own password no longer works")
	}
}

// An account registers at most --max-devices-per-user devices through
// the API; one more is failed_precondition, and deleting one makes room.
func TestDevicesPerUserLimitThroughTheAPI(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{Configure: func(cfg *server.Config) { cfg.Devices.MaxDevicesPerUser = 2 }})
	ctx := ctxT(t, time.Minute)
	me := clientsAs(t, c.Nodes[0], c.TokenFor("many", controlv1.Role_ROLE_USER))
	var first string
	for i := range 3 {
		d, err := me.devices.RegisterDevice(ctx, connect.NewRequest(&controlv1.RegisterDeviceRequest{Name: fmt.Sprint("d", i), PublicKey: pubKey(t)}))
		switch {
		case i < 2 && err != nil:
			t.Fatalf("device %d: %v", i, err)
		case i == 0:
			first = d.Msg.GetDevice().GetId()
		case i == 2 && connect.CodeOf(err) != connect.CodeFailedPrecondition:
			t.Fatalf("a third device with 2 allowed: %v, want failed_precondition", err)
		}
	}
	if _, err := me.devices.DeleteDevice(ctx, connect.NewRequest(&controlv1.DeleteDeviceRequest{DeviceId: first})); err != nil {
		t.Fatal(err)
	}
	if _, err := me.devices.RegisterDevice(ctx, connect.NewRequest(&controlv1.RegisterDeviceRequest{Name: "again", PublicKey: pubKey(t)})); err != nil {
		t.Fatalf("after deleting one: %v", err)
	}
}
