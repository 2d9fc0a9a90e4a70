package fsm

import (
	"fmt"
	"slices"
)

// Features a release of the state machine can apply, recorded with each
// control node (Node.features). During a rolling upgrade nodes of two
// releases apply the same log: a command that carries what an older
// release ignores (a field it does not know) would leave the replicas
// with different state. A feature that writes such commands is used only
// once every member lists it (raftnode.Node.MembersWithout).
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
)

// Bounds of a node's feature list.
const (
	MaxFeatures   = 64
	MaxFeatureLen = 64
)

// Features returns the features of this release, sorted.
func Features() []string {
	f := []string{FeatureChangePassword, FeatureWithdrawFeatures, FeatureRaftClusterCheck, FeatureMailboxReplaceExpired, FeatureClaimRecordGrace, FeatureLoginCeiling, FeatureOnlyUserAccount, FeatureMailboxPurge, FeatureRetireAllKeys}
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
