package fsm

import (
	"fmt"
	"slices"

	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// Features a release of the state machine can apply, recorded with each
// control node (Node.features). During a rolling upgrade nodes of two
// releases apply the same log: a command that carries what an older
// release ignores (a field it does not know) would leave the replicas
// with different state. A feature that writes such commands is used only
// once every member lists it (raftnode.Node.MembersWithout), and, once
// gated apply is on (EnableGatedApply), its fields are also ignored at
// apply while a node record does not list it (ignoreFeature): the
// proposer's check reads its own replica, which may not have applied a
// member's withdrawal yet, while apply decides at the entry's place in
// the log, the same on every replica.
const (
	// FeatureChangePassword: UpdateUser's succeeded and
	// expect_password_hash, written by AuthService.ChangePassword.
	FeatureChangePassword = "change_password"
	// FeatureWithdrawFeatures: PutNode's withdraw_features, written by a
	// node as it stops gracefully.
	FeatureWithdrawFeatures = "withdraw_features"
	// FeatureRaftClusterCheck: the node's Raft connections start with
	// the cluster check (raftnode's hello), and it reads the check.
	// Once every member lists it, a connection without the check is
	// refused. Not a state machine feature, but recorded and gated the
	// same way.
	FeatureRaftClusterCheck = "raft_cluster_check"
	// FeatureMailboxReplaceExpired: PutMailbox's replace_expired.
	FeatureMailboxReplaceExpired = "mailbox_replace_expired"
	// FeatureClaimRecordGrace: ClaimEvents' record_grace_ms.
	FeatureClaimRecordGrace = "claim_record_grace"
	// FeatureLoginCeiling: LoginAttempt's policy.login_ceiling.
	FeatureLoginCeiling = "login_ceiling"
	// FeatureOnlyUserAccount: only_user_account of UpdateUser,
	// DeleteUser and the device commands.
	FeatureOnlyUserAccount = "only_user_account"
	// FeatureMailboxPurge: purge_limit of DeleteUser, DeleteDevice,
	// RevokeDevice and ExpireMailboxes.
	FeatureMailboxPurge = "mailbox_purge"
	// FeatureRetireAllKeys: retire_all of RotateSigningKey and
	// RotateSessionKey.
	FeatureRetireAllKeys = "retire_all_keys"
	// FeatureGatedApply: EnableGatedApply, and the gating of the other
	// features at apply time that it turns on (ignoreFeature).
	FeatureGatedApply = "gated_apply"
)

// Bounds of a node's feature list.
const (
	MaxFeatures   = 64
	MaxFeatureLen = 64
)

// Features returns the features of this release, sorted.
func Features() []string {
	f := []string{FeatureChangePassword, FeatureWithdrawFeatures, FeatureRaftClusterCheck, FeatureMailboxReplaceExpired, FeatureClaimRecordGrace, FeatureLoginCeiling, FeatureOnlyUserAccount, FeatureMailboxPurge, FeatureRetireAllKeys, FeatureGatedApply}
	slices.Sort(f)
	return f
}

// validFeatures checks a node's feature list.
func validFeatures(fs []string) error {
	if len(fs) > MaxFeatures {
		return invalid("node.features holds %d entries, at most %d allowed", len(fs), MaxFeatures)
	}
	for i, f := range fs {
		if err := ValidateText("node.features", f, MaxFeatureLen, true); err != nil {
			return asInvalid(fmt.Errorf("[%d]: %w", i, err))
		}
	}
	return nil
}

// gatedAtApply reports whether feature's fields are ignored at apply
// while a node record does not list it (ignoreFeature). Not gated there:
// withdraw_features (a node that withdrew lists none, and the next
// member's withdrawal must still apply as one; proposers check
// membersUnableToWithdraw), raft_cluster_check (no command fields) and
// gated_apply itself (EnableGatedApply checks the records).
func gatedAtApply(feature string) bool {
	switch feature {
	case FeatureWithdrawFeatures, FeatureRaftClusterCheck, FeatureGatedApply:
		return false
	}
	return true
}

// ignoreFeature clears from cmd the fields that belong to feature, so
// that it applies as a release without the feature applies it (a field
// a release does not know decodes as unset). It reports whether cmd
// carried any of them. Every feature gatedAtApply reports must have a
// case here (TestEveryGatedFeatureHasItsFields).
func ignoreFeature(feature string, cmd *statev1.Command) bool {
	switch feature {
	case FeatureChangePassword:
		if op := cmd.GetUpdateUser(); op != nil && (op.Succeeded != nil || op.ExpectPasswordHash != "") {
			op.Succeeded, op.ExpectPasswordHash = nil, ""
			return true
		}
	case FeatureOnlyUserAccount:
		switch {
		case cmd.GetUpdateUser() != nil:
			return clearBool(&cmd.GetUpdateUser().OnlyUserAccount)
		case cmd.GetDeleteUser() != nil:
			return clearBool(&cmd.GetDeleteUser().OnlyUserAccount)
		case cmd.GetRegisterDevice() != nil:
			return clearBool(&cmd.GetRegisterDevice().OnlyUserAccount)
		case cmd.GetRevokeDevice() != nil:
			return clearBool(&cmd.GetRevokeDevice().OnlyUserAccount)
		case cmd.GetDeleteDevice() != nil:
			return clearBool(&cmd.GetDeleteDevice().OnlyUserAccount)
		case cmd.GetRenameDevice() != nil:
			return clearBool(&cmd.GetRenameDevice().OnlyUserAccount)
		}
	case FeatureMailboxPurge:
		switch {
		case cmd.GetDeleteUser() != nil:
			return clearUint32(&cmd.GetDeleteUser().PurgeLimit)
		case cmd.GetRevokeDevice() != nil:
			return clearUint32(&cmd.GetRevokeDevice().PurgeLimit)
		case cmd.GetDeleteDevice() != nil:
			return clearUint32(&cmd.GetDeleteDevice().PurgeLimit)
		case cmd.GetExpireMailboxes() != nil:
			return clearUint32(&cmd.GetExpireMailboxes().PurgeLimit)
		}
	case FeatureMailboxReplaceExpired:
		if op := cmd.GetPutMailbox(); op != nil {
			return clearBool(&op.ReplaceExpired)
		}
	case FeatureClaimRecordGrace:
		if op := cmd.GetClaimEvents(); op != nil && op.RecordGraceMs != 0 {
			op.RecordGraceMs = 0
			return true
		}
	case FeatureLoginCeiling:
		if p := cmd.GetLoginAttempt().GetPolicy(); p != nil {
			return clearUint32(&p.LoginCeiling)
		}
	case FeatureRetireAllKeys:
		switch {
		case cmd.GetRotateSigningKey() != nil:
			return clearBool(&cmd.GetRotateSigningKey().RetireAll)
		case cmd.GetRotateSessionKey() != nil:
			return clearBool(&cmd.GetRotateSessionKey().RetireAll)
		}
	}
	return false
}

func clearBool(b *bool) bool {
	was := *b
	*b = false
	return was
}

func clearUint32(v *uint32) bool {
	was := *v != 0
	*v = 0
	return was
}
