package api

import (
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/edge-relay/relay/control/auth"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

func ts(ms int64) *timestamppb.Timestamp {
	if ms == 0 {
		return nil
	}
	return timestamppb.New(time.UnixMilli(ms))
}

var roleToAPI = map[auth.Role]controlv1.Role{
	auth.RoleAdmin:    controlv1.Role_ROLE_ADMIN,
	auth.RoleOperator: controlv1.Role_ROLE_OPERATOR,
	auth.RoleViewer:   controlv1.Role_ROLE_VIEWER,
	auth.RoleUser:     controlv1.Role_ROLE_USER,
	auth.RoleEdge:     controlv1.Role_ROLE_EDGE,
}

// apiRole maps a stored role name to the API enum.
func apiRole(r string) controlv1.Role {
	role, err := auth.ParseRole(r)
	if err != nil {
		return controlv1.Role_ROLE_UNSPECIFIED
	}
	return roleToAPI[role]
}

// storedRole maps the API enum to the stored role name; UNSPECIFIED
// means "user".
func storedRole(r controlv1.Role) (auth.Role, bool) {
	if r == controlv1.Role_ROLE_UNSPECIFIED {
		return auth.RoleUser, true
	}
	for k, v := range roleToAPI {
		if v == r {
			return k, true
		}
	}
	return "", false
}

func userToAPI(u *statev1.User) *controlv1.User {
	return &controlv1.User{
		Id: u.GetId(), Login: u.GetLogin(), DisplayName: u.GetDisplayName(),
		Role: apiRole(u.GetRole()), Status: controlv1.UserStatus(u.GetStatus()),
		CreatedAt: ts(u.GetCreatedAtMs()), LastActivity: ts(u.GetLastActivityMs()),
	}
}

func deviceToAPI(d *statev1.Device) *controlv1.Device {
	return &controlv1.Device{
		Id: d.GetId(), UserId: d.GetUserId(), Name: d.GetName(), PublicKey: d.GetPublicKey(),
		CreatedAt: ts(d.GetCreatedAtMs()), LastSeen: ts(d.GetLastSeenMs()),
		Revoked: d.GetRevoked(), RevokedAt: ts(d.GetRevokedAtMs()),
	}
}
