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
// once every member lists it (raftnode.Node.MembersWithout), and, for
// the features added after gated_apply, once gated apply is on
// (EnableGatedApply), its fields are also ignored at apply while a node
// record does not list it (ignoreFeature): the proposer's check reads its
// own replica, which may not have applied a member's withdrawal yet,
// while apply decides at the entry's place in the log, the same on every
// replica.
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
	// FeatureGatedApply: EnableGatedApply, and the gating at apply time
	// that it turns on (ignoreFeature) of the features after it.
	FeatureGatedApply = "gated_apply"
	// FeatureMailboxExpireBytes: ExpireMailboxes' max_bytes. The first
	// feature gated at apply too.
	FeatureMailboxExpireBytes = "mailbox_expire_bytes"
	// FeatureRefreshKeepRotated: RotateRefreshToken's
	// keep_rotated_until_ms.
	FeatureRefreshKeepRotated = "refresh_keep_rotated"
	// FeatureSessionCap: IssueRefreshToken's max_sessions (and the
	// per-user family index it writes, kept up by pruning and user
	// deletion while the feature is in use), RotateRefreshToken's
	// bound_rotations, RevokeTokenFamily's end, and both commands'
	// ended_kept_until_ms (and the ended records' pruning).
	FeatureSessionCap = "session_cap"
	// FeaturePasswordRehash: the RehashPassword command, written by a
	// login that found the account's hash made with other parameters
	// than the node's.
	FeaturePasswordRehash = "password_rehash"
)

// Bounds of a node's feature list.
const (
	MaxFeatures   = 64
	MaxFeatureLen = 64
)

// Features returns the features of this release, sorted.
func Features() []string {
	f := []string{FeatureChangePassword, FeatureWithdrawFeatures, FeatureRaftClusterCheck, FeatureMailboxReplaceExpired, FeatureClaimRecordGrace, FeatureLoginCeiling, FeatureOnlyUserAccount, FeatureMailboxPurge, FeatureRetireAllKeys, FeatureGatedApply, FeatureMailboxExpireBytes, FeatureRefreshKeepRotated, FeatureSessionCap, FeaturePasswordRehash}
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

// FeaturesGatedAtApply returns, sorted, the features of this release
// whose fields apply ignores while a node record does not list them,
// once gated apply is on.
func FeaturesGatedAtApply() []string {
	return slices.DeleteFunc(Features(), func(f string) bool { return !GatedAtApply(f) })
}

// GatedAtApply reports whether feature's fields are ignored at apply
// while a node record does not list it (ignoreFeature): every feature
// added after gated_apply. Not the features before it, which a release
// without gated apply may know: after a rollback to such a release, it
// would apply a field the others ignore (a node that stopped gracefully
// lists no features until it runs again, whatever release it comes back
// with). Those stay gated by their writers only.
func GatedAtApply(feature string) bool {
	switch feature {
	case FeatureChangePassword, FeatureWithdrawFeatures, FeatureRaftClusterCheck, FeatureMailboxReplaceExpired,
		FeatureClaimRecordGrace, FeatureLoginCeiling, FeatureOnlyUserAccount, FeatureMailboxPurge, FeatureRetireAllKeys,
		FeatureGatedApply:
		return false
	}
	return true
}

// ignoreFeature clears from cmd the fields that belong to feature, so
// that it applies as a release without the feature applies it (a field
// a release does not know decodes as unset). It reports whether cmd
// carried any of them. Every feature GatedAtApply reports must have a
// case here (TestEveryGatedFeatureHasItsFields).
func ignoreFeature(feature string, cmd *statev1.Command) bool {
	switch feature {
	case FeatureMailboxExpireBytes:
		if op := cmd.GetExpireMailboxes(); op != nil && op.MaxBytes != 0 {
			op.MaxBytes = 0
			return true
		}
	case FeatureRefreshKeepRotated:
		if op := cmd.GetRotateRefreshToken(); op != nil && op.KeepRotatedUntilMs != 0 {
			op.KeepRotatedUntilMs = 0
			return true
		}
	case FeaturePasswordRehash:
		// A release without the feature reads the command as one with no
		// operation (an unknown case of the oneof), which it refuses.
		if cmd.GetRehashPassword() != nil {
			cmd.Op = nil
			return true
		}
	case FeatureSessionCap:
		if op := cmd.GetIssueRefreshToken(); op != nil && (op.MaxSessions != 0 || op.EndedKeptUntilMs != 0) {
			op.MaxSessions, op.EndedKeptUntilMs = 0, 0
			return true
		}
		if op := cmd.GetRotateRefreshToken(); op != nil && op.BoundRotations {
			op.BoundRotations = false
			return true
		}
		if op := cmd.GetRevokeTokenFamily(); op != nil && (op.End || op.EndedKeptUntilMs != 0) {
			op.End, op.EndedKeptUntilMs = false, 0
			return true
		}
	}
	return false
}
