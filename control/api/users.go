package api

import (
	"context"
	"errors"
	"fmt"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/auth"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// UserServer serves UserService.
type UserServer struct {
	node  *raftnode.Node
	authn *Authenticator
}

var _ controlv1connect.UserServiceHandler = (*UserServer)(nil)

// NewUserServer returns the UserService handler.
func NewUserServer(node *raftnode.Node, authn *Authenticator) *UserServer {
	return &UserServer{node: node, authn: authn}
}

func readMode(c controlv1.ReadConsistency) (raftnode.ReadMode, error) {
	switch c {
	case controlv1.ReadConsistency_READ_CONSISTENCY_UNSPECIFIED, controlv1.ReadConsistency_READ_CONSISTENCY_LINEARIZABLE:
		return raftnode.Linearizable, nil
	case controlv1.ReadConsistency_READ_CONSISTENCY_STALE:
		return raftnode.Stale, nil
	}
	return 0, invalidArg(fmt.Errorf("consistency: unknown value %d", c))
}

// mayGrant reports whether the caller may give an account this role:
// only an admin creates staff or edge accounts.
func mayGrant(caller auth.Claims, r auth.Role) error {
	if r != auth.RoleUser && caller.Role != auth.RoleAdmin {
		return connect.NewError(connect.CodePermissionDenied, fmt.Errorf("only an admin may grant role %q", r))
	}
	return nil
}

// CreateUser adds an account.
func (s *UserServer) CreateUser(ctx context.Context, req *connect.Request[controlv1.CreateUserRequest]) (*connect.Response[controlv1.CreateUserResponse], error) {
	m := req.Msg
	caller, _ := auth.ClaimsFrom(ctx)
	if err := fsm.ValidateText("login", m.GetLogin(), fsm.MaxLoginLen, true); err != nil {
		return nil, invalidArg(err)
	}
	if err := fsm.ValidateText("display_name", m.GetDisplayName(), fsm.MaxDisplayNameLen, false); err != nil {
		return nil, invalidArg(err)
	}
	role, ok := storedRole(m.GetRole())
	if !ok {
		return nil, invalidArg(fmt.Errorf("role: unknown value %d", m.GetRole()))
	}
	if err := mayGrant(caller, role); err != nil {
		return nil, err
	}
	var hash string
	if m.GetPassword() != "" {
		if err := auth.ValidatePassword(m.GetPassword()); err != nil {
			return nil, invalidArg(fmt.Errorf("password: %w", err))
		}
		h, err := s.authn.hashPassword(ctx, m.GetPassword())
		if err != nil {
			return nil, toConnect(err)
		}
		hash = h
	}
	res, err := s.node.Apply(ctx, &statev1.Command{Op: &statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{
		Id: newID("u"), Login: m.GetLogin(), DisplayName: m.GetDisplayName(), PasswordHash: hash, Role: string(role),
		Status: statev1.UserStatus_USER_STATUS_ACTIVE,
	}}}})
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&controlv1.CreateUserResponse{User: userToAPI(res.GetUser())}), nil
}

// GetUser returns one account.
func (s *UserServer) GetUser(ctx context.Context, req *connect.Request[controlv1.GetUserRequest]) (*connect.Response[controlv1.GetUserResponse], error) {
	if err := fsm.ValidateID("id", req.Msg.GetId()); err != nil {
		return nil, invalidArg(err)
	}
	mode, err := readMode(req.Msg.GetConsistency())
	if err != nil {
		return nil, err
	}
	f, err := s.node.Read(ctx, mode)
	if err != nil {
		return nil, toConnect(err)
	}
	u, err := f.GetUser(req.Msg.GetId())
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&controlv1.GetUserResponse{User: userToAPI(u)}), nil
}

// ListUsers returns one page of accounts.
func (s *UserServer) ListUsers(ctx context.Context, req *connect.Request[controlv1.ListUsersRequest]) (*connect.Response[controlv1.ListUsersResponse], error) {
	size := int(req.Msg.GetPageSize())
	if size == 0 {
		size = 100
	}
	if size < 0 || size > 1000 {
		return nil, invalidArg(errors.New("page_size must be between 1 and 1000"))
	}
	after := req.Msg.GetPageToken()
	if after != "" {
		if err := fsm.ValidateID("page_token", after); err != nil {
			return nil, invalidArg(err)
		}
	}
	mode, err := readMode(req.Msg.GetConsistency())
	if err != nil {
		return nil, err
	}
	f, err := s.node.Read(ctx, mode)
	if err != nil {
		return nil, toConnect(err)
	}
	users, more, err := f.ListUsers(after, size)
	if err != nil {
		return nil, toConnect(err)
	}
	out := &controlv1.ListUsersResponse{}
	for _, u := range users {
		out.Users = append(out.Users, userToAPI(u))
	}
	if more && len(users) > 0 {
		out.NextPageToken = users[len(users)-1].GetId()
	}
	return connect.NewResponse(out), nil
}

// UpdateUser changes the set fields of an account.
func (s *UserServer) UpdateUser(ctx context.Context, req *connect.Request[controlv1.UpdateUserRequest]) (*connect.Response[controlv1.UpdateUserResponse], error) {
	m := req.Msg
	caller, _ := auth.ClaimsFrom(ctx)
	if err := fsm.ValidateID("id", m.GetId()); err != nil {
		return nil, invalidArg(err)
	}
	up := &statev1.UpdateUser{Id: m.GetId(), User: &statev1.User{}}
	if m.DisplayName != nil {
		if err := fsm.ValidateText("display_name", m.GetDisplayName(), fsm.MaxDisplayNameLen, false); err != nil {
			return nil, invalidArg(err)
		}
		up.Fields = append(up.Fields, "display_name")
		up.User.DisplayName = m.GetDisplayName()
	}
	if m.Login != nil {
		if err := fsm.ValidateText("login", m.GetLogin(), fsm.MaxLoginLen, true); err != nil {
			return nil, invalidArg(err)
		}
		up.Fields = append(up.Fields, "login")
		up.User.Login = m.GetLogin()
	}
	if m.Status != nil {
		st := statev1.UserStatus(m.GetStatus())
		if st != statev1.UserStatus_USER_STATUS_ACTIVE && st != statev1.UserStatus_USER_STATUS_DISABLED {
			return nil, invalidArg(fmt.Errorf("status: unknown value %d", m.GetStatus()))
		}
		up.Fields = append(up.Fields, "status")
		up.User.Status = st
	}
	if m.Role != nil {
		role, ok := storedRole(m.GetRole())
		if !ok || m.GetRole() == controlv1.Role_ROLE_UNSPECIFIED {
			return nil, invalidArg(fmt.Errorf("role: unknown value %d", m.GetRole()))
		}
		if err := mayGrant(caller, role); err != nil {
			return nil, err
		}
		up.Fields = append(up.Fields, "role")
		up.User.Role = string(role)
	}
	if m.Password != nil {
		if err := auth.ValidatePassword(m.GetPassword()); err != nil {
			return nil, invalidArg(fmt.Errorf("password: %w", err))
		}
		h, err := s.authn.hashPassword(ctx, m.GetPassword())
		if err != nil {
			return nil, toConnect(err)
		}
		up.Fields = append(up.Fields, "password_hash")
		up.User.PasswordHash = h
	}
	if len(up.Fields) == 0 {
		return nil, invalidArg(errors.New("set at least one of display_name, login, status, role, password"))
	}
	only, err := manageable(ctx, s.node, caller, m.GetId(), "change")
	if err != nil {
		return nil, err
	}
	up.OnlyUserAccount = only
	if caller.Subject == m.GetId() && m.Role == nil && m.Status == nil {
		// Changing one's own password ends one's other sessions, not
		// this one. A change of one's own role or status ends them all,
		// as it would another's: this session's tokens were issued for
		// what changed (and a disabled account enabled again gets none
		// of its sessions back).
		up.KeepSessionId = caller.Session
	}
	res, err := s.node.Apply(ctx, &statev1.Command{Op: &statev1.Command_UpdateUser{UpdateUser: up}})
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&controlv1.UpdateUserResponse{User: userToAPI(res.GetUser())}), nil
}

// DeleteUser removes an account with everything it owns.
func (s *UserServer) DeleteUser(ctx context.Context, req *connect.Request[controlv1.DeleteUserRequest]) (*connect.Response[controlv1.DeleteUserResponse], error) {
	caller, _ := auth.ClaimsFrom(ctx)
	if err := fsm.ValidateID("id", req.Msg.GetId()); err != nil {
		return nil, invalidArg(err)
	}
	if req.Msg.GetId() == caller.Subject {
		return nil, connect.NewError(connect.CodeFailedPrecondition, errors.New("an account cannot delete itself"))
	}
	only, err := manageable(ctx, s.node, caller, req.Msg.GetId(), "delete")
	if err != nil {
		return nil, err
	}
	if _, err := s.node.Apply(ctx, &statev1.Command{Op: &statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: req.Msg.GetId(), OnlyUserAccount: only, PurgeLimit: PurgeLimit(s.node)}}}); err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&controlv1.DeleteUserResponse{}), nil
}

// manageable refuses (permission_denied) a caller other than an admin
// who would verb the account id, or its devices, when that account is a
// staff or edge account: operators manage user accounts. The account is
// read linearizably, so a follower that has not applied its latest role,
// or its creation, cannot let an operator past (not_found when it does
// not exist). A promotion committed between this read and the caller's
// write is not seen here (only an admin can make one): onlyUser says to
// have the write check again (the command's only_user_account), true for
// a caller other than an admin acting on another account once every
// member applies that check.
func manageable(ctx context.Context, node *raftnode.Node, caller auth.Claims, id, verb string) (onlyUser bool, err error) {
	if caller.Role == auth.RoleAdmin {
		return false, nil
	}
	f, err := node.Read(ctx, raftnode.Linearizable)
	if err != nil {
		return false, toConnect(err)
	}
	cur, err := f.GetUser(id)
	if err != nil {
		return false, toConnect(err)
	}
	if r, _ := auth.ParseRole(cur.GetRole()); r != auth.RoleUser {
		return false, connect.NewError(connect.CodePermissionDenied, fmt.Errorf("only an admin may %s a staff or edge account", verb))
	}
	return id != caller.Subject && node.EveryMemberHas(fsm.FeatureOnlyUserAccount), nil
}

// GetMe returns the caller's account.
func (s *UserServer) GetMe(ctx context.Context, _ *connect.Request[controlv1.GetMeRequest]) (*connect.Response[controlv1.GetMeResponse], error) {
	caller, _ := auth.ClaimsFrom(ctx)
	u, err := s.node.FSM().GetUser(caller.Subject)
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&controlv1.GetMeResponse{User: userToAPI(u)}), nil
}
