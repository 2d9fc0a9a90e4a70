package api

import (
	"github.com/edge-relay/relay/control/auth"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
)

// RoleNode is the principal of a control node calling another one (a
// verified certificate from the cluster CA, or a token the node minted
// with the cluster's signing key). It is never assigned to an account.
const RoleNode = auth.RoleNode

var (
	staff      = []auth.Role{auth.RoleAdmin, auth.RoleOperator, auth.RoleViewer}
	managers   = []auth.Role{auth.RoleAdmin, auth.RoleOperator}
	admins     = []auth.Role{auth.RoleAdmin}
	everyone   = []auth.Role{auth.RoleAdmin, auth.RoleOperator, auth.RoleViewer, auth.RoleUser, auth.RoleEdge}
	deviceUse  = []auth.Role{auth.RoleAdmin, auth.RoleOperator, auth.RoleUser}
	deviceRead = []auth.Role{auth.RoleAdmin, auth.RoleOperator, auth.RoleViewer, auth.RoleUser}
	edges      = []auth.Role{auth.RoleEdge}
	people     = []auth.Role{auth.RoleAdmin, auth.RoleOperator, auth.RoleViewer, auth.RoleUser}
	nodes      = []auth.Role{RoleNode}
)

// Policy is the one table of who may call what. Every procedure the
// control API serves has an entry; TestRBACMatrix fails for one that has
// not. Handlers add the finer rules a table cannot express (a user acts
// only on its own account; only an admin grants staff roles).
func Policy() auth.Policy {
	return auth.Policy{
		Public: map[string]bool{
			controlv1connect.AuthServiceLoginProcedure:   true,
			controlv1connect.AuthServiceRefreshProcedure: true,
		},
		Roles: map[string][]auth.Role{
			controlv1connect.AuthServiceLogoutProcedure: everyone,
			// An edge's password is in the edges' configuration, which an
			// admin changes with it (UpdateUser).
			controlv1connect.AuthServiceChangePasswordProcedure: people,

			controlv1connect.UserServiceCreateUserProcedure: managers,
			controlv1connect.UserServiceGetUserProcedure:    staff,
			controlv1connect.UserServiceListUsersProcedure:  staff,
			controlv1connect.UserServiceUpdateUserProcedure: managers,
			controlv1connect.UserServiceDeleteUserProcedure: managers,
			controlv1connect.UserServiceGetMeProcedure:      everyone,

			controlv1connect.DeviceServiceRegisterDeviceProcedure: deviceUse,
			controlv1connect.DeviceServiceListDevicesProcedure:    deviceRead,
			controlv1connect.DeviceServiceRenameDeviceProcedure:   deviceUse,
			controlv1connect.DeviceServiceRevokeDeviceProcedure:   deviceUse,
			controlv1connect.DeviceServiceDeleteDeviceProcedure:   deviceUse,

			controlv1connect.KeyServiceRotateSigningKeyProcedure: admins,
			controlv1connect.KeyServiceRotateSessionKeyProcedure: admins,
			controlv1connect.KeyServiceListKeysProcedure:         staff,

			controlv1connect.ClusterServiceStatusProcedure:             append(append([]auth.Role{}, staff...), RoleNode),
			controlv1connect.ClusterServiceAddVoterProcedure:           []auth.Role{auth.RoleAdmin, RoleNode},
			controlv1connect.ClusterServiceRemoveServerProcedure:       admins,
			controlv1connect.ClusterServiceTransferLeadershipProcedure: []auth.Role{auth.RoleAdmin, auth.RoleOperator, RoleNode},
			// A backup holds the state's secrets (signing keys, the
			// cluster CA's key, session keys): whoever takes one can mint
			// any token, so only an admin may.
			controlv1connect.ClusterServiceBackupProcedure: admins,

			controlv1connect.PeerServiceApplyProcedure:     nodes,
			controlv1connect.PeerServiceReadIndexProcedure: nodes,

			edgev1connect.WatchServiceWatchProcedure:             edges,
			edgev1connect.ActivityServiceReportActivityProcedure: edges,
			edgev1connect.EdgeServiceRegisterEdgeProcedure:       edges,
			edgev1connect.EdgeServiceDeregisterEdgeProcedure:     edges,
			edgev1connect.MailboxServicePutMailboxProcedure:      edges,
			edgev1connect.MailboxServiceFetchMailboxProcedure:    edges,
			edgev1connect.MailboxServiceAckMailboxProcedure:      edges,
			edgev1connect.MailboxServiceClaimEventsProcedure:     edges,
		},
		OutliveToken: map[string]bool{
			// A backup takes as long as the state is large, and relayctl
			// may start one with a token about to expire.
			controlv1connect.ClusterServiceBackupProcedure: true,
		},
		// A joining node calls AddVoter before it is a member, and a
		// removed one Status to learn that it was removed.
		MembersOnly: map[string]bool{
			controlv1connect.PeerServiceApplyProcedure:                 true,
			controlv1connect.PeerServiceReadIndexProcedure:             true,
			controlv1connect.ClusterServiceTransferLeadershipProcedure: true,
		},
	}
}
