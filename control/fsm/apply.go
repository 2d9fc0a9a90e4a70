package fsm

import (
	"errors"
	"fmt"
	"unicode"
	"unicode/utf8"

	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/control/auth"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
	"github.com/edge-relay/relay/storage/state"
)

// Field limits enforced inside apply (the API checks them first with
// friendlier messages; apply is the authority).
const (
	MaxIDLen          = 64
	MaxLoginLen       = 64
	MaxDisplayNameLen = 256
	MaxDeviceNameLen  = 128
	MaxAddrLen        = 256
	PublicKeyLen      = 32
)

var marshalOpts = proto.MarshalOptions{Deterministic: true}

// txn is the context of one command's apply: the shared batch, the
// revision (Raft index) and the proposer's clock.
type txn struct {
	b     *state.Batch
	rev   uint64
	now   int64
	seq   uint32
	gates *gates // invalidated by writes to node records
}

func (t *txn) put(key []byte, m proto.Message) error {
	v, err := marshalOpts.Marshal(m)
	if err != nil {
		return fmt.Errorf("marshal %T: %w", m, err)
	}
	return t.b.Set(key, v)
}

// get decodes the record under key into m; found is false when absent.
func (t *txn) get(key []byte, m proto.Message) (found bool, err error) {
	v, err := t.b.Get(key)
	if errors.Is(err, state.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if err := proto.Unmarshal(v, m); err != nil {
		return false, fmt.Errorf("decode %T at %q: %w", m, key, err)
	}
	return true, nil
}

func (t *txn) emit(c *statev1.Change) error {
	c.Revision = t.rev
	c.Seq = t.seq
	t.seq++
	return t.put(changeKey(t.rev, c.Seq), c)
}

// dispatch validates and applies one command. A rejection is returned as
// *applyError after nothing was written; any other error is a storage
// failure.
func (f *FSM) dispatch(t *txn, cmd *statev1.Command) (*statev1.Result, error) {
	switch op := cmd.GetOp().(type) {
	case *statev1.Command_CreateUser:
		return t.createUser(op.CreateUser)
	case *statev1.Command_UpdateUser:
		return t.updateUser(op.UpdateUser)
	case *statev1.Command_DeleteUser:
		return t.deleteUser(op.DeleteUser)
	case *statev1.Command_RegisterDevice:
		return t.registerDevice(op.RegisterDevice)
	case *statev1.Command_RevokeDevice:
		return t.revokeDevice(op.RevokeDevice)
	case *statev1.Command_DeleteDevice:
		return t.deleteDevice(op.DeleteDevice)
	case *statev1.Command_PutNode:
		return t.putNode(op.PutNode)
	case *statev1.Command_RemoveNode:
		return t.removeNode(op.RemoveNode)
	case *statev1.Command_Noop:
		return &statev1.Result{}, nil
	case *statev1.Command_RenameDevice:
		return t.renameDevice(op.RenameDevice)
	case *statev1.Command_IssueRefreshToken:
		return t.issueRefreshToken(op.IssueRefreshToken)
	case *statev1.Command_RotateRefreshToken:
		return t.rotateRefreshToken(op.RotateRefreshToken)
	case *statev1.Command_RevokeTokenFamily:
		return t.revokeTokenFamily(op.RevokeTokenFamily)
	case *statev1.Command_RotateSigningKey:
		return t.rotateSigningKey(op.RotateSigningKey)
	case *statev1.Command_RotateSessionKey:
		return t.rotateSessionKey(op.RotateSessionKey)
	case *statev1.Command_RecordActivity:
		return t.recordActivity(op.RecordActivity)
	case *statev1.Command_RegisterEdge:
		return t.registerEdge(op.RegisterEdge)
	case *statev1.Command_ExpireEdges:
		return t.expireEdges()
	case *statev1.Command_DeregisterEdge:
		return t.deregisterEdge(op.DeregisterEdge)
	case *statev1.Command_InitCluster:
		return t.initCluster(op.InitCluster)
	case *statev1.Command_PutMailbox:
		return t.putMailbox(op.PutMailbox)
	case *statev1.Command_AckMailbox:
		return t.ackMailbox(op.AckMailbox)
	case *statev1.Command_ExpireMailboxes:
		return t.expireMailboxes(op.ExpireMailboxes)
	case *statev1.Command_SetClusterCa:
		return t.setClusterCA(op.SetClusterCa)
	case *statev1.Command_ClaimEvents:
		return t.claimEvents(op.ClaimEvents)
	case *statev1.Command_LoginAttempt:
		return t.loginAttempt(op.LoginAttempt)
	case *statev1.Command_EnableGatedApply:
		return t.enableGatedApply()
	case *statev1.Command_RehashPassword:
		return t.rehashPassword(op.RehashPassword)
	case nil:
		return nil, invalid("command has no operation")
	default:
		return nil, invalid("unknown operation %T", op)
	}
}

// ValidateID checks an id of a user, device or node.
func ValidateID(field, id string) error {
	if id == "" {
		return fmt.Errorf("%s is empty", field)
	}
	if len(id) > MaxIDLen {
		return fmt.Errorf("%s is %d bytes, at most %d allowed", field, len(id), MaxIDLen)
	}
	for _, r := range id {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return fmt.Errorf("%s has character %q; allowed are letters, digits, '-', '_' and '.'", field, r)
		}
	}
	return nil
}

// ValidateText checks a human-readable field: valid UTF-8, no control
// characters, at most max bytes, and (if required) not empty.
func ValidateText(field, s string, max int, required bool) error {
	if s == "" {
		if required {
			return fmt.Errorf("%s is empty", field)
		}
		return nil
	}
	if len(s) > max {
		return fmt.Errorf("%s is %d bytes, at most %d allowed", field, len(s), max)
	}
	if !utf8.ValidString(s) {
		return fmt.Errorf("%s is not valid UTF-8", field)
	}
	for _, r := range s {
		if unicode.IsControl(r) {
			return fmt.Errorf("%s contains a control character", field)
		}
	}
	return nil
}

func asInvalid(err error) error {
	if err == nil {
		return nil
	}
	return invalid("%s", err.Error())
}

// validRole checks an account's stored role: one of control/auth's role
// names ("" is a user), never "node", which only control nodes hold.
func validRole(field, r string) error {
	role, err := auth.ParseRole(r)
	if err != nil {
		return invalid("%s: %v", field, err)
	}
	if role == auth.RoleNode {
		return invalid("%s: %q is reserved for control nodes", field, r)
	}
	return nil
}

// onlyUserAccount refuses a change that applies only to a user account
// (only: the command's only_user_account) once the account u is a staff
// or edge account: the caller's role check was made on a read before the
// proposal, and a promotion may have been committed since.
func onlyUserAccount(only bool, u *statev1.User) error {
	if !only {
		return nil
	}
	if r, err := auth.ParseRole(u.GetRole()); err != nil || r != auth.RoleUser {
		return precondition("user %q is a staff or edge account now: only an admin may change it", u.GetId())
	}
	return nil
}

// ownerOnlyUserAccount is onlyUserAccount for a change to a device of the
// account id.
func (t *txn) ownerOnlyUserAccount(only bool, id string) error {
	if !only {
		return nil
	}
	var u statev1.User
	if found, err := t.get(userKey(id), &u); err != nil {
		return err
	} else if !found {
		return notFound("user %q not found", id)
	}
	return onlyUserAccount(only, &u)
}

// validPasswordHash checks a stored password hash: empty (an account that
// cannot log in with a password) or a well-formed argon2id PHC string.
func validPasswordHash(field, h string) error {
	if h == "" {
		return nil
	}
	if err := auth.CheckHash(h); err != nil {
		return invalid("%s: %v", field, err)
	}
	return nil
}

func validStatus(s statev1.UserStatus) bool {
	return s == statev1.UserStatus_USER_STATUS_ACTIVE || s == statev1.UserStatus_USER_STATUS_DISABLED
}

func (t *txn) createUser(op *statev1.CreateUser) (*statev1.Result, error) {
	u := proto.Clone(op.GetUser()).(*statev1.User)
	if u == nil {
		return nil, invalid("user is missing")
	}
	if err := ValidateID("user.id", u.GetId()); err != nil {
		return nil, asInvalid(err)
	}
	if err := ValidateText("user.login", u.GetLogin(), MaxLoginLen, true); err != nil {
		return nil, asInvalid(err)
	}
	if err := ValidateText("user.display_name", u.GetDisplayName(), MaxDisplayNameLen, false); err != nil {
		return nil, asInvalid(err)
	}
	if u.Status == statev1.UserStatus_USER_STATUS_UNSPECIFIED {
		u.Status = statev1.UserStatus_USER_STATUS_ACTIVE
	}
	if !validStatus(u.Status) {
		return nil, invalid("user.status %d is not a known status", u.Status)
	}
	if err := validRole("user.role", u.GetRole()); err != nil {
		return nil, err
	}
	if err := validPasswordHash("user.password_hash", u.GetPasswordHash()); err != nil {
		return nil, err
	}
	if u.CreatedAtMs == 0 {
		u.CreatedAtMs = t.now
	}
	var existing statev1.User
	if found, err := t.get(userKey(u.Id), &existing); err != nil {
		return nil, err
	} else if found {
		return nil, exists("user %q already exists", u.Id)
	}
	if _, err := t.b.Get(loginKey(u.Login)); err == nil {
		return nil, exists("login %q is taken", u.Login)
	} else if !errors.Is(err, state.ErrNotFound) {
		return nil, err
	}
	if err := t.put(userKey(u.Id), u); err != nil {
		return nil, err
	}
	if err := t.b.Set(loginKey(u.Login), []byte(u.Id)); err != nil {
		return nil, err
	}
	if err := t.emit(&statev1.Change{Kind: statev1.ChangeKind_CHANGE_KIND_USER_PUT, Object: &statev1.Change_User{User: u}}); err != nil {
		return nil, err
	}
	return &statev1.Result{Object: &statev1.Result_User{User: u}}, nil
}

func (t *txn) updateUser(op *statev1.UpdateUser) (*statev1.Result, error) {
	var u statev1.User
	if found, err := t.get(userKey(op.GetId()), &u); err != nil {
		return nil, err
	} else if !found {
		return nil, notFound("user %q not found", op.GetId())
	}
	in := op.GetUser()
	if in == nil {
		in = &statev1.User{}
	}
	if err := onlyUserAccount(op.GetOnlyUserAccount(), &u); err != nil {
		return nil, err
	}
	oldLogin, oldRole, oldStatus := u.Login, u.Role, u.Status
	if op.GetKeepSessionId() != "" {
		if err := ValidateID("keep_session_id", op.GetKeepSessionId()); err != nil {
			return nil, asInvalid(err)
		}
	}
	revoke := false
	if len(op.GetFields()) == 0 {
		return nil, invalid("fields is empty: name at least one field to update")
	}
	if op.GetSucceeded() != nil {
		if err := t.selfServicePasswordChange(op, &u); err != nil {
			return nil, err
		}
	}
	// A change made with the current password holds only while that is
	// still the account's password.
	if h := op.GetExpectPasswordHash(); h != "" && h != u.GetPasswordHash() {
		return nil, precondition("the password of user %q changed since the change checked it", u.Id)
	}
	for _, f := range op.GetFields() {
		switch f {
		case "display_name":
			if err := ValidateText("user.display_name", in.GetDisplayName(), MaxDisplayNameLen, false); err != nil {
				return nil, asInvalid(err)
			}
			u.DisplayName = in.GetDisplayName()
		case "status":
			if !validStatus(in.GetStatus()) {
				return nil, invalid("user.status %d is not a known status", in.GetStatus())
			}
			u.Status = in.GetStatus()
		case "password_hash":
			if err := validPasswordHash("user.password_hash", in.GetPasswordHash()); err != nil {
				return nil, err
			}
			u.PasswordHash = in.GetPasswordHash()
			revoke = true
		case "role":
			if err := validRole("user.role", in.GetRole()); err != nil {
				return nil, err
			}
			u.Role = in.GetRole()
		case "login":
			if err := ValidateText("user.login", in.GetLogin(), MaxLoginLen, true); err != nil {
				return nil, asInvalid(err)
			}
			u.Login = in.GetLogin()
		default:
			return nil, invalid("field %q cannot be updated", f)
		}
	}
	if u.Login != oldLogin {
		if _, err := t.b.Get(loginKey(u.Login)); err == nil {
			return nil, exists("login %q is taken", u.Login)
		} else if !errors.Is(err, state.ErrNotFound) {
			return nil, err
		}
		if err := t.b.Delete(loginKey(oldLogin)); err != nil {
			return nil, err
		}
		if err := t.b.Set(loginKey(u.Login), []byte(u.Id)); err != nil {
			return nil, err
		}
	}
	if err := t.put(userKey(u.Id), &u); err != nil {
		return nil, err
	}
	// Access tokens outlive neither the password they were got with nor
	// the role and status they were issued for.
	if u.Role != oldRole || u.Status != oldStatus && u.Status != statev1.UserStatus_USER_STATUS_ACTIVE {
		revoke = true
	}
	if revoke {
		if err := t.revokeUserSessions(u.Id, op.GetKeepSessionId(), "account changed (password, role or status)"); err != nil {
			return nil, err
		}
	}
	if op.GetSucceeded() != nil {
		if err := t.loginSucceeded(op.GetSucceeded()); err != nil {
			return nil, err
		}
	}
	if err := t.emit(&statev1.Change{Kind: statev1.ChangeKind_CHANGE_KIND_USER_PUT, Object: &statev1.Change_User{User: &u}}); err != nil {
		return nil, err
	}
	return &statev1.Result{Object: &statev1.Result_User{User: &u}}, nil
}

// rehashPassword applies RehashPassword: the same password under a new
// hash, while the account still has the hash a login checked it
// against. No session ends: the password did not change.
func (t *txn) rehashPassword(op *statev1.RehashPassword) (*statev1.Result, error) {
	if err := ValidateID("user_id", op.GetUserId()); err != nil {
		return nil, asInvalid(err)
	}
	if op.GetExpectPasswordHash() == "" || op.GetPasswordHash() == "" {
		return nil, invalid("a rehash names the hash the login checked and the new one")
	}
	if err := validPasswordHash("password_hash", op.GetPasswordHash()); err != nil {
		return nil, err
	}
	var u statev1.User
	if found, err := t.get(userKey(op.GetUserId()), &u); err != nil {
		return nil, err
	} else if !found {
		return nil, notFound("user %q not found", op.GetUserId())
	}
	if u.GetPasswordHash() != op.GetExpectPasswordHash() {
		return nil, precondition("the password of user %q changed since the login checked it", u.GetId())
	}
	u.PasswordHash = op.GetPasswordHash()
	if err := t.put(userKey(u.Id), &u); err != nil {
		return nil, err
	}
	if err := t.emit(&statev1.Change{Kind: statev1.ChangeKind_CHANGE_KIND_USER_PUT, Object: &statev1.Change_User{User: &u}}); err != nil {
		return nil, err
	}
	return &statev1.Result{Object: &statev1.Result_User{User: &u}}, nil
}

// selfServicePasswordChange checks an UpdateUser that an account's
// holder made with its current password (succeeded set): a new password
// alone, checked against a known hash, for an account still active and
// from a session still open, so that nothing that ended the caller's
// standing between the check and this entry (the account disabled, the
// session revoked) is overtaken by the change.
func (t *txn) selfServicePasswordChange(op *statev1.UpdateUser, u *statev1.User) error {
	if err := ValidateLoginAttempt(op.GetSucceeded()); err != nil {
		return err
	}
	if len(op.GetFields()) != 1 || op.GetFields()[0] != "password_hash" || op.GetExpectPasswordHash() == "" {
		return invalid("a change made with the current password sets password_hash alone and names the hash it checked")
	}
	if u.GetStatus() != statev1.UserStatus_USER_STATUS_ACTIVE {
		return precondition("user %q is not active", u.GetId())
	}
	if id := op.GetKeepSessionId(); id != "" {
		var fam statev1.TokenFamily
		found, err := t.get(familyKey(id), &fam)
		if err != nil {
			return err
		}
		if !found || fam.GetRevoked() || fam.GetUserId() != u.GetId() {
			return precondition("session %q of user %q has ended", id, u.GetId())
		}
	}
	return nil
}

func (t *txn) deleteUser(op *statev1.DeleteUser) (*statev1.Result, error) {
	var u statev1.User
	if found, err := t.get(userKey(op.GetId()), &u); err != nil {
		return nil, err
	} else if !found {
		return nil, notFound("user %q not found", op.GetId())
	}
	if err := onlyUserAccount(op.GetOnlyUserAccount(), &u); err != nil {
		return nil, err
	}
	budget, err := newPurgeBudget(op.GetPurgeLimit())
	if err != nil {
		return nil, err
	}
	// Devices go in the same entry, before the user, so a watcher never
	// sees a device whose user is gone.
	var devices []*statev1.Device
	p := userDevicesPrefix(u.Id)
	err = t.b.Iterate(p, prefixEnd(p), func(_, v []byte) (bool, error) {
		var d statev1.Device
		if err := proto.Unmarshal(v, &d); err != nil {
			return false, err
		}
		devices = append(devices, &d)
		return true, nil
	})
	if err != nil {
		return nil, err
	}
	for _, d := range devices {
		if err := t.removeDevice(d, budget); err != nil {
			return nil, err
		}
	}
	if err := t.deleteUserTokens(u.Id); err != nil {
		return nil, err
	}
	if err := t.b.Delete(loginKey(u.Login)); err != nil {
		return nil, err
	}
	if err := t.b.Delete(userKey(u.Id)); err != nil {
		return nil, err
	}
	if err := t.emit(&statev1.Change{Kind: statev1.ChangeKind_CHANGE_KIND_USER_DELETED, Object: &statev1.Change_User{User: &u}}); err != nil {
		return nil, err
	}
	return &statev1.Result{Object: &statev1.Result_User{User: &u}}, nil
}

// removeDevice deletes a device with its mailbox, in the same entry as
// far as budget allows (deleteMailbox); while the rest is emptied, the
// device's id stays taken (an empty owner record), so that no device
// registered under it meanwhile can fetch what was meant for this one.
func (t *txn) removeDevice(d *statev1.Device, budget *purgeBudget) error {
	if err := t.b.Delete(deviceKey(d.UserId, d.Id)); err != nil {
		return err
	}
	gone, err := t.deleteMailbox(d.Id, budget)
	if err != nil {
		return err
	}
	if gone {
		err = t.b.Delete(deviceOwnerKey(d.Id))
	} else {
		err = t.b.Set(deviceOwnerKey(d.Id), nil)
	}
	if err != nil {
		return err
	}
	return t.emit(&statev1.Change{Kind: statev1.ChangeKind_CHANGE_KIND_DEVICE_DELETED, Object: &statev1.Change_Device{Device: d}})
}

func (t *txn) registerDevice(op *statev1.RegisterDevice) (*statev1.Result, error) {
	d := proto.Clone(op.GetDevice()).(*statev1.Device)
	if d == nil {
		return nil, invalid("device is missing")
	}
	if err := ValidateID("device.id", d.GetId()); err != nil {
		return nil, asInvalid(err)
	}
	if err := ValidateID("device.user_id", d.GetUserId()); err != nil {
		return nil, asInvalid(err)
	}
	if err := ValidateText("device.name", d.GetName(), MaxDeviceNameLen, true); err != nil {
		return nil, asInvalid(err)
	}
	if len(d.GetPublicKey()) != PublicKeyLen {
		return nil, invalid("device.public_key is %d bytes, an Ed25519 public key is %d", len(d.GetPublicKey()), PublicKeyLen)
	}
	var u statev1.User
	if found, err := t.get(userKey(d.UserId), &u); err != nil {
		return nil, err
	} else if !found {
		return nil, notFound("user %q not found", d.UserId)
	}
	if u.Status != statev1.UserStatus_USER_STATUS_ACTIVE {
		return nil, precondition("user %q is not active", d.UserId)
	}
	if err := onlyUserAccount(op.GetOnlyUserAccount(), &u); err != nil {
		return nil, err
	}
	if owner, err := t.b.Get(deviceOwnerKey(d.Id)); err == nil && len(owner) == 0 {
		return nil, precondition("device %q was deleted and its mailbox is still being emptied: register it again in a few seconds", d.Id)
	} else if err == nil {
		return nil, exists("device %q already exists", d.Id)
	} else if !errors.Is(err, state.ErrNotFound) {
		return nil, err
	}
	if limit := op.GetMaxDevicesPerUser(); limit > 0 {
		p := userDevicesPrefix(d.UserId)
		n := uint32(0)
		if err := t.b.Iterate(p, prefixEnd(p), func(_, _ []byte) (bool, error) {
			n++
			return n < limit, nil
		}); err != nil {
			return nil, err
		}
		if n >= limit {
			return nil, precondition("user %q has %d devices, the most allowed: delete one first", d.UserId, limit)
		}
	}
	d.Revoked, d.RevokedAtMs = false, 0
	if d.CreatedAtMs == 0 {
		d.CreatedAtMs = t.now
	}
	if err := t.put(deviceKey(d.UserId, d.Id), d); err != nil {
		return nil, err
	}
	if err := t.b.Set(deviceOwnerKey(d.Id), []byte(d.UserId)); err != nil {
		return nil, err
	}
	if err := t.emit(&statev1.Change{Kind: statev1.ChangeKind_CHANGE_KIND_DEVICE_PUT, Object: &statev1.Change_Device{Device: d}}); err != nil {
		return nil, err
	}
	return &statev1.Result{Object: &statev1.Result_Device{Device: d}}, nil
}

// ownedDevice loads a device that must belong to userID; a device of
// another user is reported exactly like a missing one.
func (t *txn) ownedDevice(userID, deviceID string) (*statev1.Device, error) {
	var d statev1.Device
	found, err := t.get(deviceKey(userID, deviceID), &d)
	if err != nil {
		return nil, err
	}
	if !found {
		return nil, notFound("device %q not found", deviceID)
	}
	return &d, nil
}

func (t *txn) revokeDevice(op *statev1.RevokeDevice) (*statev1.Result, error) {
	d, err := t.ownedDevice(op.GetUserId(), op.GetDeviceId())
	if err != nil {
		return nil, err
	}
	if err := t.ownerOnlyUserAccount(op.GetOnlyUserAccount(), op.GetUserId()); err != nil {
		return nil, err
	}
	budget, err := newPurgeBudget(op.GetPurgeLimit())
	if err != nil {
		return nil, err
	}
	if d.Revoked {
		return &statev1.Result{Object: &statev1.Result_Device{Device: d}}, nil
	}
	d.Revoked, d.RevokedAtMs = true, t.now
	if err := t.put(deviceKey(d.UserId, d.Id), d); err != nil {
		return nil, err
	}
	// Revocation is final: nothing in the mailbox can be delivered any
	// more. What the budget leaves is emptied later (deleteMailbox), and
	// cannot be fetched meanwhile (FetchMailbox).
	if _, err := t.deleteMailbox(d.Id, budget); err != nil {
		return nil, err
	}
	if err := t.emit(&statev1.Change{Kind: statev1.ChangeKind_CHANGE_KIND_DEVICE_PUT, Object: &statev1.Change_Device{Device: d}}); err != nil {
		return nil, err
	}
	return &statev1.Result{Object: &statev1.Result_Device{Device: d}}, nil
}

func (t *txn) deleteDevice(op *statev1.DeleteDevice) (*statev1.Result, error) {
	d, err := t.ownedDevice(op.GetUserId(), op.GetDeviceId())
	if err != nil {
		return nil, err
	}
	if err := t.ownerOnlyUserAccount(op.GetOnlyUserAccount(), op.GetUserId()); err != nil {
		return nil, err
	}
	budget, err := newPurgeBudget(op.GetPurgeLimit())
	if err != nil {
		return nil, err
	}
	if err := t.removeDevice(d, budget); err != nil {
		return nil, err
	}
	return &statev1.Result{Object: &statev1.Result_Device{Device: d}}, nil
}

func (t *txn) putNode(op *statev1.PutNode) (*statev1.Result, error) {
	n := op.GetNode()
	if n == nil {
		return nil, invalid("node is missing")
	}
	if err := ValidateID("node.id", n.GetId()); err != nil {
		return nil, asInvalid(err)
	}
	if op.GetWithdrawFeatures() {
		return t.withdrawNodeFeatures(n.GetId())
	}
	if err := ValidateText("node.raft_addr", n.GetRaftAddr(), MaxAddrLen, true); err != nil {
		return nil, asInvalid(err)
	}
	// Once gated apply is on, a record may lack its API address: the one
	// AddVoter writes for a node before it is a member (the node records
	// its address itself once it runs).
	on, err := t.gatedApplyOn()
	if err != nil {
		return nil, err
	}
	if err := ValidateText("node.api_addr", n.GetApiAddr(), MaxAddrLen, !on); err != nil {
		return nil, asInvalid(err)
	}
	if err := validFeatures(n.GetFeatures()); err != nil {
		return nil, err
	}
	var old statev1.Node
	found, err := t.get(nodeKey(n.Id), &old)
	if err != nil {
		return nil, err
	}
	if found && proto.Equal(&old, n) {
		return &statev1.Result{}, nil
	}
	return t.storeNode(n)
}

// storeNode writes a node's record and its change.
func (t *txn) storeNode(n *statev1.Node) (*statev1.Result, error) {
	t.gates.invalidate()
	if err := t.put(nodeKey(n.GetId()), n); err != nil {
		return nil, err
	}
	if err := t.emit(&statev1.Change{Kind: statev1.ChangeKind_CHANGE_KIND_NODE_PUT, Object: &statev1.Change_Node{Node: n}}); err != nil {
		return nil, err
	}
	return &statev1.Result{}, nil
}

// withdrawNodeFeatures empties the features of node id's record, if it
// has a record with any (PutNode.withdraw_features).
func (t *txn) withdrawNodeFeatures(id string) (*statev1.Result, error) {
	var rec statev1.Node
	found, err := t.get(nodeKey(id), &rec)
	if err != nil {
		return nil, err
	}
	if !found || len(rec.GetFeatures()) == 0 {
		return &statev1.Result{}, nil
	}
	rec.Features, rec.FeaturesWithdrawn = nil, true
	return t.storeNode(&rec)
}

func (t *txn) removeNode(op *statev1.RemoveNode) (*statev1.Result, error) {
	var n statev1.Node
	found, err := t.get(nodeKey(op.GetId()), &n)
	if err != nil {
		return nil, err
	}
	if !found {
		return &statev1.Result{}, nil
	}
	t.gates.invalidate()
	if err := t.b.Delete(nodeKey(n.Id)); err != nil {
		return nil, err
	}
	if err := t.emit(&statev1.Change{Kind: statev1.ChangeKind_CHANGE_KIND_NODE_DELETED, Object: &statev1.Change_Node{Node: &n}}); err != nil {
		return nil, err
	}
	return &statev1.Result{}, nil
}
