package api

import (
	"context"
	"errors"
	"fmt"

	"connectrpc.com/connect"
	"filippo.io/edwards25519"

	"github.com/edge-relay/relay/control/auth"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// DeviceServer serves DeviceService.
type DeviceServer struct {
	node *raftnode.Node
	cfg  DeviceConfig
}

var _ controlv1connect.DeviceServiceHandler = (*DeviceServer)(nil)

// DeviceConfig tunes the DeviceService.
type DeviceConfig struct {
	// MaxDevicesPerUser bounds each account's devices, revoked ones
	// included [DefaultMaxDevicesPerUser]: registering one more is
	// refused with failed_precondition. Checked inside the Raft apply.
	MaxDevicesPerUser uint32
}

// DefaultMaxDevicesPerUser is DeviceConfig.MaxDevicesPerUser's default.
const DefaultMaxDevicesPerUser = 100

// NewDeviceServer returns the DeviceService handler.
func NewDeviceServer(node *raftnode.Node, cfg DeviceConfig) *DeviceServer {
	if cfg.MaxDevicesPerUser == 0 {
		cfg.MaxDevicesPerUser = DefaultMaxDevicesPerUser
	}
	return &DeviceServer{node: node, cfg: cfg}
}

// owner resolves the account a device request acts on: the caller's own
// when userID is empty; another account only for staff.
func owner(ctx context.Context, userID string) (string, error) {
	caller, _ := auth.ClaimsFrom(ctx)
	if userID == "" || userID == caller.Subject {
		return caller.Subject, nil
	}
	if err := fsm.ValidateID("user_id", userID); err != nil {
		return "", invalidArg(err)
	}
	if !caller.Role.IsStaff() {
		return "", connect.NewError(connect.CodePermissionDenied, errors.New("user_id: a user acts only on its own devices"))
	}
	return userID, nil
}

// changeOwner resolves the account a device change acts on, as owner
// does; another account's devices only where the caller may manage that
// account (manageable: an operator changes no staff or edge account's
// devices, which would let it add its own key to an admin's).
// onlyUser: the change's command must apply only while the account is a
// user account (see manageable).
func (s *DeviceServer) changeOwner(ctx context.Context, userID string) (uid string, onlyUser bool, err error) {
	uid, err = owner(ctx, userID)
	if err != nil {
		return "", false, err
	}
	if caller, _ := auth.ClaimsFrom(ctx); uid != caller.Subject {
		if onlyUser, err = manageable(ctx, s.node, caller, uid, "change the devices of"); err != nil {
			return "", false, err
		}
	}
	return uid, onlyUser, nil
}

// RegisterDevice adds a device.
func (s *DeviceServer) RegisterDevice(ctx context.Context, req *connect.Request[controlv1.RegisterDeviceRequest]) (*connect.Response[controlv1.RegisterDeviceResponse], error) {
	m := req.Msg
	uid, only, err := s.changeOwner(ctx, m.GetUserId())
	if err != nil {
		return nil, err
	}
	if err := fsm.ValidateText("name", m.GetName(), fsm.MaxDeviceNameLen, true); err != nil {
		return nil, invalidArg(err)
	}
	if len(m.GetPublicKey()) != fsm.PublicKeyLen {
		return nil, invalidArg(fmt.Errorf("public_key is %d bytes; an Ed25519 public key is %d", len(m.GetPublicKey()), fsm.PublicKeyLen))
	}
	if err := usableKey(m.GetPublicKey()); err != nil {
		return nil, invalidArg(err)
	}
	res, err := s.node.Apply(ctx, &statev1.Command{Op: &statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{
		Id: newID("d"), UserId: uid, Name: m.GetName(), PublicKey: m.GetPublicKey(),
	}, MaxDevicesPerUser: s.cfg.MaxDevicesPerUser, OnlyUserAccount: only}}})
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&controlv1.RegisterDeviceResponse{Device: deviceToAPI(res.GetDevice()), Revision: res.GetRevision()}), nil
}

// ListDevices lists an account's devices.
func (s *DeviceServer) ListDevices(ctx context.Context, req *connect.Request[controlv1.ListDevicesRequest]) (*connect.Response[controlv1.ListDevicesResponse], error) {
	uid, err := owner(ctx, req.Msg.GetUserId())
	if err != nil {
		return nil, err
	}
	mode, err := readMode(req.Msg.GetConsistency())
	if err != nil {
		return nil, err
	}
	f, err := s.node.Read(ctx, mode)
	if err != nil {
		return nil, toConnect(err)
	}
	list, err := f.ListDevices(uid)
	if err != nil {
		return nil, toConnect(err)
	}
	out := &controlv1.ListDevicesResponse{}
	for _, d := range list {
		out.Devices = append(out.Devices, deviceToAPI(d))
	}
	return connect.NewResponse(out), nil
}

func (s *DeviceServer) deviceTarget(ctx context.Context, userID, deviceID string) (uid string, onlyUser bool, err error) {
	uid, onlyUser, err = s.changeOwner(ctx, userID)
	if err != nil {
		return "", false, err
	}
	if err := fsm.ValidateID("device_id", deviceID); err != nil {
		return "", false, invalidArg(err)
	}
	return uid, onlyUser, nil
}

// RenameDevice renames a device.
func (s *DeviceServer) RenameDevice(ctx context.Context, req *connect.Request[controlv1.RenameDeviceRequest]) (*connect.Response[controlv1.RenameDeviceResponse], error) {
	uid, only, err := s.deviceTarget(ctx, req.Msg.GetUserId(), req.Msg.GetDeviceId())
	if err != nil {
		return nil, err
	}
	if err := fsm.ValidateText("name", req.Msg.GetName(), fsm.MaxDeviceNameLen, true); err != nil {
		return nil, invalidArg(err)
	}
	res, err := s.node.Apply(ctx, &statev1.Command{Op: &statev1.Command_RenameDevice{RenameDevice: &statev1.RenameDevice{
		UserId: uid, DeviceId: req.Msg.GetDeviceId(), Name: req.Msg.GetName(), OnlyUserAccount: only,
	}}})
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&controlv1.RenameDeviceResponse{Device: deviceToAPI(res.GetDevice())}), nil
}

// RevokeDevice revokes a device.
func (s *DeviceServer) RevokeDevice(ctx context.Context, req *connect.Request[controlv1.RevokeDeviceRequest]) (*connect.Response[controlv1.RevokeDeviceResponse], error) {
	uid, only, err := s.deviceTarget(ctx, req.Msg.GetUserId(), req.Msg.GetDeviceId())
	if err != nil {
		return nil, err
	}
	res, err := s.node.Apply(ctx, &statev1.Command{Op: &statev1.Command_RevokeDevice{RevokeDevice: &statev1.RevokeDevice{
		UserId: uid, DeviceId: req.Msg.GetDeviceId(), OnlyUserAccount: only, PurgeLimit: PurgeLimit(s.node),
	}}})
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&controlv1.RevokeDeviceResponse{Device: deviceToAPI(res.GetDevice())}), nil
}

// DeleteDevice deletes a device.
func (s *DeviceServer) DeleteDevice(ctx context.Context, req *connect.Request[controlv1.DeleteDeviceRequest]) (*connect.Response[controlv1.DeleteDeviceResponse], error) {
	uid, only, err := s.deviceTarget(ctx, req.Msg.GetUserId(), req.Msg.GetDeviceId())
	if err != nil {
		return nil, err
	}
	if _, err := s.node.Apply(ctx, &statev1.Command{Op: &statev1.Command_DeleteDevice{DeleteDevice: &statev1.DeleteDevice{
		UserId: uid, DeviceId: req.Msg.GetDeviceId(), OnlyUserAccount: only, PurgeLimit: PurgeLimit(s.node),
	}}}); err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&controlv1.DeleteDeviceResponse{}), nil
}

// usableKey refuses a device key no device can use safely: one that is
// not a point of the curve (no signature verifies for it), and one of
// small order, for which signatures that verify can be made without any
// private key (crypto/ed25519 accepts them, as RFC 8032 allows): with
// such a key registered, anyone who knows the device's id could sign in
// as it. No key made by a key generator is either. Checked here, before
// the command, not in the state machine: an apply rule would differ
// between releases during an upgrade.
func usableKey(pub []byte) error {
	p, err := new(edwards25519.Point).SetBytes(pub)
	if err != nil {
		return errors.New("public_key is not an Ed25519 public key (not a point of the curve)")
	}
	if new(edwards25519.Point).MultByCofactor(p).Equal(edwards25519.NewIdentityPoint()) == 1 {
		return errors.New("public_key is a point of small order, for which anyone can make signatures: generate a new key")
	}
	return nil
}
