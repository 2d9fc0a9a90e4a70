package fsm

import (
	"bytes"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"

	statev1 "github.com/edge-relay/relay/proto/state/v1"
	"github.com/edge-relay/relay/storage/state"
)

// Limits of the auth and edge records.
const (
	SecretHashLen    = 32 // SHA-256
	SigningSeedLen   = 32 // Ed25519 seed
	MeshPublicKeyLen = 32 // Ed25519 public key of an edge's mesh identity
	SessionSecretLen = 32 // AEAD key
	MaxEdgeAddrs     = 8
	MaxActivityBatch = 10_000
)

func (t *txn) renameDevice(op *statev1.RenameDevice) (*statev1.Result, error) {
	if err := ValidateText("name", op.GetName(), MaxDeviceNameLen, true); err != nil {
		return nil, asInvalid(err)
	}
	d, err := t.ownedDevice(op.GetUserId(), op.GetDeviceId())
	if err != nil {
		return nil, err
	}
	if err := t.ownerOnlyUserAccount(op.GetOnlyUserAccount(), op.GetUserId()); err != nil {
		return nil, err
	}
	if d.Name == op.GetName() {
		return &statev1.Result{Object: &statev1.Result_Device{Device: d}}, nil
	}
	d.Name = op.GetName()
	if err := t.put(deviceKey(d.UserId, d.Id), d); err != nil {
		return nil, err
	}
	if err := t.emit(&statev1.Change{Kind: statev1.ChangeKind_CHANGE_KIND_DEVICE_PUT, Object: &statev1.Change_Device{Device: d}}); err != nil {
		return nil, err
	}
	return &statev1.Result{Object: &statev1.Result_Device{Device: d}}, nil
}

func validToken(tok *statev1.RefreshToken) error {
	if tok == nil {
		return invalid("token is missing")
	}
	if err := ValidateID("token.id", tok.GetId()); err != nil {
		return asInvalid(err)
	}
	if err := ValidateID("token.family_id", tok.GetFamilyId()); err != nil {
		return asInvalid(err)
	}
	if err := ValidateID("token.user_id", tok.GetUserId()); err != nil {
		return asInvalid(err)
	}
	if len(tok.GetSecretHash()) != SecretHashLen {
		return invalid("token.secret_hash is %d bytes, want %d", len(tok.GetSecretHash()), SecretHashLen)
	}
	if tok.GetExpiresAtMs() <= 0 {
		return invalid("token.expires_at_ms is not set")
	}
	return nil
}

func (t *txn) putToken(tok *statev1.RefreshToken) error {
	if err := t.put(tokenKey(tok.Id), tok); err != nil {
		return err
	}
	if err := t.b.Set(tokenExpiryKey(tok.ExpiresAtMs, tok.Id), nil); err != nil {
		return err
	}
	return t.b.Set(userTokenKey(tok.UserId, tok.FamilyId, tok.Id), nil)
}

func (t *txn) deleteToken(tok *statev1.RefreshToken) error {
	for _, k := range [][]byte{tokenKey(tok.Id), tokenExpiryKey(tok.ExpiresAtMs, tok.Id), userTokenKey(tok.UserId, tok.FamilyId, tok.Id)} {
		if err := t.b.Delete(k); err != nil {
			return err
		}
	}
	return nil
}

// activeUser loads a user that must exist and be active.
func (t *txn) activeUser(id string) (*statev1.User, error) {
	var u statev1.User
	found, err := t.get(userKey(id), &u)
	if err != nil {
		return nil, err
	}
	if !found {
		return nil, notFound("user %q not found", id)
	}
	if u.Status != statev1.UserStatus_USER_STATUS_ACTIVE {
		return nil, precondition("user %q is not active", id)
	}
	return &u, nil
}

func (t *txn) issueRefreshToken(op *statev1.IssueRefreshToken) (*statev1.Result, error) {
	tok := proto.Clone(op.GetToken()).(*statev1.RefreshToken)
	if err := validToken(tok); err != nil {
		return nil, err
	}
	if op.GetSucceeded() != nil {
		if err := ValidateLoginAttempt(op.GetSucceeded()); err != nil {
			return nil, err
		}
	}
	if op.GetMaxSessions() > MaxSessionCap {
		return nil, invalid("max_sessions is %d, at most %d allowed", op.GetMaxSessions(), MaxSessionCap)
	}
	if op.GetEndedKeptUntilMs() < 0 {
		return nil, invalid("ended_kept_until_ms is negative")
	}
	u, err := t.activeUser(tok.UserId)
	if err != nil {
		return nil, err
	}
	if h := op.GetPasswordHash(); h != "" && h != u.GetPasswordHash() {
		return nil, precondition("the password of user %q changed since the login checked it", tok.UserId)
	}
	var fam statev1.TokenFamily
	if found, err := t.get(familyKey(tok.FamilyId), &fam); err != nil {
		return nil, err
	} else if found {
		return nil, exists("token family %q already exists", tok.FamilyId)
	}
	if found, err := t.get(tokenKey(tok.Id), &statev1.RefreshToken{}); err != nil {
		return nil, err
	} else if found {
		return nil, exists("token %q already exists", tok.Id)
	}
	tok.Rotated = false
	if tok.CreatedAtMs == 0 {
		tok.CreatedAtMs = t.now
	}
	fam = statev1.TokenFamily{Id: tok.FamilyId, UserId: tok.UserId, CreatedAtMs: t.now}
	if limit := op.GetMaxSessions(); limit > 0 {
		if err := t.capSessions(tok.UserId, int(limit), op.GetEndedKeptUntilMs()); err != nil {
			return nil, err
		}
		if err := t.b.Set(userFamilyKey(fam.UserId, fam.CreatedAtMs, fam.Id), nil); err != nil {
			return nil, err
		}
	}
	if err := t.put(familyKey(fam.Id), &fam); err != nil {
		return nil, err
	}
	if err := t.putToken(tok); err != nil {
		return nil, err
	}
	if op.GetSucceeded() != nil {
		if err := t.loginSucceeded(op.GetSucceeded()); err != nil {
			return nil, err
		}
	}
	return &statev1.Result{Object: &statev1.Result_RefreshToken{RefreshToken: tok}}, nil
}

// MaxKeptRotated bounds how many rotated tokens of one family (login)
// are kept past their own expiry (RotateRefreshToken.keep_rotated_until_ms):
// a login refreshed every 15 minutes for 90 days rotates 8,640 times.
// With RotateRefreshToken.bound_rotations it also bounds the rotated
// tokens a family keeps at all: past that many rotations only the token
// rotated last of those rotated since is kept.
const MaxKeptRotated = 10_000

// Bounds of a session cap (IssueRefreshToken.max_sessions).
const (
	// MaxSessionCap is the largest cap a login may carry. A capped login
	// reads every index key of its account (as many as the largest cap
	// they were opened under: some 200 µs at 1,000, BenchmarkLogin).
	MaxSessionCap = 1_000
	// MaxEndedPerLogin bounds the sessions one login ends (each deletes
	// at most maxEndTokens tokens): at a steady cap a login ends one; a
	// lowered cap is reached over the account's next logins.
	MaxEndedPerLogin = 2
)

// capSessions ends the oldest sessions (token families) user uid opened
// under a cap, so that with the one being opened at most limit remain,
// at most MaxEndedPerLogin of them. It reads the index's keys and the
// oldest few families. An entry whose family is gone (pruned while the
// feature was shut, when nothing keeps the index up) is dropped when it
// comes up among the oldest, counting nothing from then on.
func (t *txn) capSessions(uid string, limit int, keepUntil int64) error {
	p := userFamiliesPrefix(uid)
	n := 0
	var oldest [][]byte
	err := t.b.Iterate(p, prefixEnd(p), func(k, _ []byte) (bool, error) {
		if len(k) <= len(p)+8 {
			return false, fmt.Errorf("malformed user family key %q", k)
		}
		if n++; len(oldest) < maxCapLooks {
			oldest = append(oldest, bytes.Clone(k))
		}
		return true, nil
	})
	if err != nil {
		return err
	}
	ended := 0
	for _, k := range oldest {
		if n < limit || ended == MaxEndedPerLogin {
			break
		}
		created, fid := int64(binary.BigEndian.Uint64(k[len(p):])), string(k[len(p)+8:])
		var fam statev1.TokenFamily
		found, err := t.get(familyKey(fid), &fam)
		if err != nil {
			return err
		}
		if found && fam.UserId == uid && fam.CreatedAtMs == created {
			if err := t.endFamily(&fam, keepUntil, "ended by a newer login past the account's session cap"); err != nil {
				return err
			}
			ended++
		}
		if err := t.b.Delete(k); err != nil {
			return err
		}
		n--
	}
	return nil
}

// maxCapLooks bounds the index entries a capped login looks at: the
// sessions it may end and the entries left without a family before them.
const maxCapLooks = 8 * MaxEndedPerLogin

// Bounds of ending a session (endFamily).
const (
	// MaxEndedKeepMs bounds how long an ended session's record is kept
	// for its access tokens (ended_kept_until_ms).
	MaxEndedKeepMs = 24 * 60 * 60 * 1000
	// maxEndTokens bounds the tokens ending one session deletes: a
	// session with bound rotations holds at most MaxKeptRotated + 2 (the
	// early rotated ones, the one rotated last, the live one); one opened
	// before the feature may hold more, which go at their own expiry.
	maxEndTokens = MaxKeptRotated + 2
)

// endFamily ends a session: it deletes the family's tokens (at most
// maxEndTokens of them) and its record, or keeps the record, revoked:
// until keepUntil (at most MaxEndedKeepMs from now; ended_until_ms,
// indexed under Y: for pruning), so that every node refuses the
// session's access tokens from its own state until they expire, and,
// when tokens are left, at least until pruning takes the last of them.
// A family ended before (a logout racing the cap) keeps one Y: entry, at
// the later of the two keeps.
func (t *txn) endFamily(fam *statev1.TokenFamily, keepUntil int64, reason string) error {
	p := familyTokensPrefix(fam.UserId, fam.Id)
	var ids []string
	left := false
	err := t.b.Iterate(p, prefixEnd(p), func(k, _ []byte) (bool, error) {
		if left = len(ids) == maxEndTokens; left {
			return false, nil
		}
		ids = append(ids, string(k[len(p):]))
		return true, nil
	})
	if err != nil {
		return err
	}
	for _, id := range ids {
		if err := t.deleteTokenRef(fam.UserId, fam.Id, id); err != nil {
			return err
		}
	}
	keepUntil = min(keepUntil, t.now+MaxEndedKeepMs)
	if fam.EndedUntilMs != 0 {
		if err := t.b.Delete(endedFamilyKey(fam.EndedUntilMs, fam.Id)); err != nil {
			return err
		}
		keepUntil = max(keepUntil, fam.EndedUntilMs)
	}
	if keepUntil <= t.now {
		keepUntil = 0
	}
	if !left && keepUntil == 0 {
		return t.b.Delete(familyKey(fam.Id))
	}
	if !fam.Revoked {
		fam.Revoked, fam.RevokedAtMs, fam.RevokeReason = true, t.now, reason
	}
	if fam.EndedUntilMs = keepUntil; keepUntil != 0 {
		if err := t.b.Set(endedFamilyKey(keepUntil, fam.Id), nil); err != nil {
			return err
		}
	}
	return t.put(familyKey(fam.Id), fam)
}

// deleteTokenRef deletes the token a user-token key names, or the key
// alone if the token is gone.
func (t *txn) deleteTokenRef(uid, fid, tid string) error {
	var tok statev1.RefreshToken
	found, err := t.get(tokenKey(tid), &tok)
	if err != nil {
		return err
	}
	if found {
		return t.deleteToken(&tok)
	}
	return t.b.Delete(userTokenKey(uid, fid, tid))
}

// rotateRefreshToken checks the presented token inside apply, so two
// racing refreshes with the same token cannot both succeed: the second
// sees it rotated and revokes the family.
func (t *txn) rotateRefreshToken(op *statev1.RotateRefreshToken) (*statev1.Result, error) {
	next := proto.Clone(op.GetNext()).(*statev1.RefreshToken)
	if err := validToken(next); err != nil {
		return nil, err
	}
	if op.GetKeepRotatedUntilMs() < 0 {
		return nil, invalid("keep_rotated_until_ms is negative")
	}
	var cur statev1.RefreshToken
	found, err := t.get(tokenKey(op.GetTokenId()), &cur)
	if err != nil {
		return nil, err
	}
	if !found || subtle.ConstantTimeCompare(cur.SecretHash, op.GetPresentedSecretHash()) != 1 {
		return nil, notFound("refresh token not recognised")
	}
	var fam statev1.TokenFamily
	if ok, err := t.get(familyKey(cur.FamilyId), &fam); err != nil {
		return nil, err
	} else if !ok || fam.Revoked {
		return nil, precondition("refresh token family was revoked")
	}
	if cur.ExpiresAtMs <= t.now {
		return nil, precondition("refresh token expired")
	}
	if cur.Rotated {
		// Reuse: someone holds a token that was already exchanged. Revoke
		// the family so neither holder can continue.
		fam.Revoked, fam.RevokedAtMs, fam.RevokeReason = true, t.now, "refresh token reuse"
		if err := t.put(familyKey(fam.Id), &fam); err != nil {
			return nil, err
		}
		return &statev1.Result{ReuseDetected: true}, nil
	}
	if next.FamilyId != cur.FamilyId || next.UserId != cur.UserId {
		return nil, invalid("next token must continue family %q of user %q", cur.FamilyId, cur.UserId)
	}
	if _, err := t.activeUser(cur.UserId); err != nil {
		return nil, err
	}
	if found, err := t.get(tokenKey(next.Id), &statev1.RefreshToken{}); err != nil {
		return nil, err
	} else if found {
		return nil, exists("token %q already exists", next.Id)
	}
	cur.Rotated = true
	pastBound := false
	if op.GetBoundRotations() {
		if fam.Rotations <= MaxKeptRotated {
			fam.Rotations++
		}
		if pastBound = fam.Rotations > MaxKeptRotated; pastBound {
			// Past the bound only the token rotated last is kept (until
			// its own expiry, or the next rotation): a login refreshed in
			// a loop holds a bounded number, and a token presented twice
			// in a row is still seen as reuse.
			if fam.LastRotatedId != "" {
				if err := t.deleteTokenRef(fam.UserId, fam.Id, fam.LastRotatedId); err != nil {
					return nil, err
				}
			}
			fam.LastRotatedId = cur.Id
		}
		if err := t.put(familyKey(fam.Id), &fam); err != nil {
			return nil, err
		}
	}
	if keep := op.GetKeepRotatedUntilMs(); !pastBound && keep > cur.ExpiresAtMs && fam.KeptRotated < MaxKeptRotated {
		// Kept, rotated, until the login's end: presenting it after its
		// own expiry is still reuse (a thief who used it first is cut
		// off when its owner comes back with it). Counted in the family:
		// past MaxKeptRotated, rotated tokens go at their own expiry (the
		// early ones stay kept: a thief's loop cannot push them out).
		fam.KeptRotated++
		if err := t.put(familyKey(fam.Id), &fam); err != nil {
			return nil, err
		}
		if err := t.b.Delete(tokenExpiryKey(cur.ExpiresAtMs, cur.Id)); err != nil {
			return nil, err
		}
		cur.ExpiresAtMs = keep
		if err := t.b.Set(tokenExpiryKey(cur.ExpiresAtMs, cur.Id), nil); err != nil {
			return nil, err
		}
	}
	if err := t.put(tokenKey(cur.Id), &cur); err != nil {
		return nil, err
	}
	next.Rotated = false
	if next.CreatedAtMs == 0 {
		next.CreatedAtMs = t.now
	}
	if err := t.putToken(next); err != nil {
		return nil, err
	}
	return &statev1.Result{Object: &statev1.Result_RefreshToken{RefreshToken: next}}, nil
}

func (t *txn) revokeTokenFamily(op *statev1.RevokeTokenFamily) (*statev1.Result, error) {
	if op.GetEndedKeptUntilMs() < 0 {
		return nil, invalid("ended_kept_until_ms is negative")
	}
	var fam statev1.TokenFamily
	found, err := t.get(familyKey(op.GetFamilyId()), &fam)
	if err != nil {
		return nil, err
	}
	if !found || fam.UserId != op.GetUserId() {
		return nil, notFound("token family %q not found", op.GetFamilyId())
	}
	if op.GetEnd() {
		// Ended rather than only revoked: its tokens go at once, so a
		// logged-out session takes no room under its account's session
		// cap.
		if err := t.endFamily(&fam, op.GetEndedKeptUntilMs(), op.GetReason()); err != nil {
			return nil, err
		}
		return &statev1.Result{}, t.b.Delete(userFamilyKey(fam.UserId, fam.CreatedAtMs, fam.Id))
	}
	if fam.Revoked {
		return &statev1.Result{}, nil
	}
	fam.Revoked, fam.RevokedAtMs, fam.RevokeReason = true, t.now, op.GetReason()
	if err := t.put(familyKey(fam.Id), &fam); err != nil {
		return nil, err
	}
	return &statev1.Result{}, nil
}

// revokeUserSessions revokes every token family (session) of a user that
// is not revoked yet, except keep.
func (t *txn) revokeUserSessions(uid, keep, reason string) error {
	p := userTokensPrefix(uid)
	var fams []string
	err := t.b.Iterate(p, prefixEnd(p), func(k, _ []byte) (bool, error) {
		fam, _, ok := bytes.Cut(k[len(p):], []byte{0})
		if !ok {
			return false, fmt.Errorf("malformed user token key %q", k)
		}
		if id := string(fam); id != keep && (len(fams) == 0 || fams[len(fams)-1] != id) {
			fams = append(fams, id) // keys are sorted: one family's are adjacent
		}
		return true, nil
	})
	if err != nil {
		return err
	}
	for _, id := range fams {
		var fam statev1.TokenFamily
		found, err := t.get(familyKey(id), &fam)
		if err != nil {
			return err
		}
		if !found || fam.Revoked {
			continue
		}
		fam.Revoked, fam.RevokedAtMs, fam.RevokeReason = true, t.now, reason
		if err := t.put(familyKey(fam.Id), &fam); err != nil {
			return err
		}
	}
	return nil
}

// deleteUserTokens removes every token and family of a user.
func (t *txn) deleteUserTokens(uid string) error {
	p := userTokensPrefix(uid)
	type ref struct{ fam, tok string }
	var refs []ref
	err := t.b.Iterate(p, prefixEnd(p), func(k, _ []byte) (bool, error) {
		parts := bytes.SplitN(k[len(p):], []byte{0}, 2)
		if len(parts) != 2 {
			return false, fmt.Errorf("malformed user token key %q", k)
		}
		refs = append(refs, ref{string(parts[0]), string(parts[1])})
		return true, nil
	})
	if err != nil {
		return err
	}
	for _, r := range refs {
		if err := t.deleteTokenRef(uid, r.fam, r.tok); err != nil {
			return err
		}
		if err := t.b.Delete(familyKey(r.fam)); err != nil {
			return err
		}
	}
	// The index is kept only while the feature is in use (a release
	// without it keeps nothing), so that every replica holds the same.
	if open, err := t.featureOpen(FeatureSessionCap); err != nil || !open {
		return err
	}
	fp := userFamiliesPrefix(uid)
	return t.b.DeleteRange(fp, prefixEnd(fp))
}

// pruneTokens drops refresh tokens that expired before now, and the
// families (sessions) left without a token: every access token of such a
// family has expired too (they live shorter than the refresh token they
// came with), so nothing refers to it any more.
func (t *txn) pruneTokens() error {
	if t.now <= 0 {
		return nil
	}
	end := tokenExpiryKey(t.now, "")
	ids, err := dueIDs(t.b, prefixTokenExpiry, end)
	if err != nil {
		return err
	}
	type family struct{ user, id string }
	var fams []family // in the order their tokens were pruned: deterministic
	seen := map[family]bool{}
	for _, id := range ids {
		var tok statev1.RefreshToken
		found, err := t.get(tokenKey(id), &tok)
		if err != nil {
			return err
		}
		if found {
			if err := t.deleteToken(&tok); err != nil {
				return err
			}
			if f := (family{tok.UserId, tok.FamilyId}); !seen[f] {
				seen[f] = true
				fams = append(fams, f)
			}
		}
	}
	if err := t.b.DeleteRange(prefixTokenExpiry, end); err != nil {
		return err
	}
	if err := t.pruneEndedFamilies(); err != nil {
		return err
	}
	for _, f := range fams {
		if left, err := t.familyHasTokens(f.user, f.id); err != nil {
			return err
		} else if !left {
			if err := t.deleteFamily(f.user, f.id); err != nil {
				return err
			}
		}
	}
	return nil
}

// familyHasTokens reports whether family fid of user uid holds a token.
func (t *txn) familyHasTokens(uid, fid string) (bool, error) {
	p := familyTokensPrefix(uid, fid)
	left := false
	err := t.b.Iterate(p, prefixEnd(p), func(_, _ []byte) (bool, error) {
		left = true
		return false, nil
	})
	return left, err
}

// pruneEndedFamilies deletes the records of ended families kept until
// now (endFamily) that hold no token any more (one with tokens left goes
// with the last of them), while the feature that writes them is in use
// (a release without it leaves them, so its replicas hold the same).
func (t *txn) pruneEndedFamilies() error {
	if open, err := t.featureOpen(FeatureSessionCap); err != nil || !open {
		return err
	}
	end := endedFamilyKey(t.now+1, "")
	ids, err := dueIDs(t.b, prefixEndedFamily, end)
	if err != nil || len(ids) == 0 {
		// (No range deletion for nothing: each one in the memtable costs
		// every later read until it is flushed.)
		return err
	}
	for _, id := range ids {
		var fam statev1.TokenFamily
		found, err := t.get(familyKey(id), &fam)
		if err != nil {
			return err
		}
		if !found {
			continue
		}
		if left, err := t.familyHasTokens(fam.UserId, id); err != nil {
			return err
		} else if !left {
			if err := t.b.Delete(familyKey(id)); err != nil {
				return err
			}
		}
	}
	return t.b.DeleteRange(prefixEndedFamily, end)
}

// deleteFamily deletes a family record of user uid that holds no token
// any more, and its index entry, while the feature that keeps the index
// is in use (as in deleteUserTokens); then an ended family kept for its
// access tokens stays until its keep (pruneEndedFamilies takes it).
func (t *txn) deleteFamily(uid, fid string) error {
	if open, err := t.featureOpen(FeatureSessionCap); err != nil {
		return err
	} else if open {
		var fam statev1.TokenFamily
		found, err := t.get(familyKey(fid), &fam)
		if err != nil {
			return err
		}
		if found && fam.EndedUntilMs > t.now {
			return nil
		}
		if found {
			if err := t.b.Delete(userFamilyKey(uid, fam.CreatedAtMs, fid)); err != nil {
				return err
			}
		}
	}
	return t.b.Delete(familyKey(fid))
}

func (t *txn) rotateSigningKey(op *statev1.RotateSigningKey) (*statev1.Result, error) {
	k := proto.Clone(op.GetKey()).(*statev1.SigningKey)
	if err := validSigningKey(k); err != nil {
		return nil, err
	}
	if op.GetRetainMs() < 0 {
		return nil, invalid("retain_ms is negative")
	}
	if found, err := t.get(signingKeyKey(k.Id), &statev1.SigningKey{}); err != nil {
		return nil, err
	} else if found {
		return nil, exists("signing key %q already exists", k.Id)
	}
	if err := t.retireCurrent(keyCurrentSigning, prefixSigningKey, func(v []byte) (proto.Message, error) {
		var old statev1.SigningKey
		if err := proto.Unmarshal(v, &old); err != nil {
			return nil, err
		}
		old.RetiredAtMs, old.VerifyUntilMs = t.now, t.now+op.GetRetainMs()
		return &old, nil
	}); err != nil {
		return nil, err
	}
	if err := t.dropExpired(prefixSigningKey, func(v []byte) (bool, error) {
		var old statev1.SigningKey
		if err := proto.Unmarshal(v, &old); err != nil {
			return false, err
		}
		return op.GetRetireAll() || old.VerifyUntilMs != 0 && old.VerifyUntilMs <= t.now, nil
	}); err != nil {
		return nil, err
	}
	k.RetiredAtMs, k.VerifyUntilMs = 0, 0
	if k.CreatedAtMs == 0 {
		k.CreatedAtMs = t.now
	}
	if err := t.put(signingKeyKey(k.Id), k); err != nil {
		return nil, err
	}
	if err := t.b.Set(keyCurrentSigning, []byte(k.Id)); err != nil {
		return nil, err
	}
	return &statev1.Result{}, nil
}

func (t *txn) rotateSessionKey(op *statev1.RotateSessionKey) (*statev1.Result, error) {
	k := proto.Clone(op.GetKey()).(*statev1.SessionKey)
	if err := validSessionKey(k); err != nil {
		return nil, err
	}
	if op.GetGraceMs() < 0 {
		return nil, invalid("grace_ms is negative")
	}
	if found, err := t.get(sessionKeyKey(k.Id), &statev1.SessionKey{}); err != nil {
		return nil, err
	} else if found {
		return nil, exists("session key %q already exists", k.Id)
	}
	if err := t.retireCurrent(keyCurrentSession, prefixSessionKey, func(v []byte) (proto.Message, error) {
		var old statev1.SessionKey
		if err := proto.Unmarshal(v, &old); err != nil {
			return nil, err
		}
		old.RetiredAtMs, old.ExpiresAtMs = t.now, t.now+op.GetGraceMs()
		return &old, nil
	}); err != nil {
		return nil, err
	}
	if err := t.dropExpired(prefixSessionKey, func(v []byte) (bool, error) {
		var old statev1.SessionKey
		if err := proto.Unmarshal(v, &old); err != nil {
			return false, err
		}
		return op.GetRetireAll() || old.ExpiresAtMs != 0 && old.ExpiresAtMs <= t.now, nil
	}); err != nil {
		return nil, err
	}
	k.RetiredAtMs, k.ExpiresAtMs = 0, 0
	if k.CreatedAtMs == 0 {
		k.CreatedAtMs = t.now
	}
	if err := t.put(sessionKeyKey(k.Id), k); err != nil {
		return nil, err
	}
	if err := t.b.Set(keyCurrentSession, []byte(k.Id)); err != nil {
		return nil, err
	}
	ring, err := sessionRing(t.b)
	if err != nil {
		return nil, err
	}
	if err := t.emit(&statev1.Change{Kind: statev1.ChangeKind_CHANGE_KIND_SESSION_KEYS, Object: &statev1.Change_SessionKeys{SessionKeys: ring}}); err != nil {
		return nil, err
	}
	return &statev1.Result{}, nil
}

// retireCurrent rewrites the current key (named under curKey) with
// retire applied.
func (t *txn) retireCurrent(curKey, prefix []byte, retire func([]byte) (proto.Message, error)) error {
	id, err := t.b.Get(curKey)
	if errors.Is(err, state.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	k := join(prefix, string(id))
	v, err := t.b.Get(k)
	if errors.Is(err, state.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	m, err := retire(v)
	if err != nil {
		return err
	}
	return t.put(k, m)
}

// dropExpired deletes the records under prefix for which expired says so.
func (t *txn) dropExpired(prefix []byte, expired func([]byte) (bool, error)) error {
	var drop [][]byte
	err := t.b.Iterate(prefix, prefixEnd(prefix), func(k, v []byte) (bool, error) {
		gone, err := expired(v)
		if err != nil {
			return false, err
		}
		if gone {
			drop = append(drop, bytes.Clone(k))
		}
		return true, nil
	})
	if err != nil {
		return err
	}
	for _, k := range drop {
		if err := t.b.Delete(k); err != nil {
			return err
		}
	}
	return nil
}

// sessionRing reads the session-key ring.
func sessionRing(r state.Reader) (*statev1.SessionKeyRing, error) {
	ring := &statev1.SessionKeyRing{}
	if id, err := r.Get(keyCurrentSession); err == nil {
		ring.CurrentId = string(id)
	} else if !errors.Is(err, state.ErrNotFound) {
		return nil, err
	}
	err := r.Iterate(prefixSessionKey, prefixEnd(prefixSessionKey), func(_, v []byte) (bool, error) {
		var k statev1.SessionKey
		if err := proto.Unmarshal(v, &k); err != nil {
			return false, err
		}
		ring.Keys = append(ring.Keys, &k)
		return true, nil
	})
	return ring, err
}

func (t *txn) recordActivity(op *statev1.RecordActivity) (*statev1.Result, error) {
	if len(op.GetEntries()) > MaxActivityBatch {
		return nil, invalid("entries holds %d reports, at most %d allowed", len(op.GetEntries()), MaxActivityBatch)
	}
	// Validate every entry before the first write.
	for i, a := range op.GetEntries() {
		if err := ValidateID(fmt.Sprintf("entries[%d].user_id", i), a.GetUserId()); err != nil {
			return nil, asInvalid(err)
		}
		if a.GetDeviceId() != "" {
			if err := ValidateID(fmt.Sprintf("entries[%d].device_id", i), a.GetDeviceId()); err != nil {
				return nil, asInvalid(err)
			}
		}
		if a.GetSeenAtMs() <= 0 {
			return nil, invalid("entries[%d].seen_at_ms must be positive", i)
		}
	}
	for _, a := range op.GetEntries() {
		// A reporter's clock may run ahead of the proposer's; a time after
		// the command was proposed is taken as "now", so one bad clock
		// cannot pin last_seen in the future (where later, true reports
		// could never raise it).
		seen := a.GetSeenAtMs()
		if t.now > 0 && seen > t.now {
			seen = t.now
		}
		var u statev1.User
		found, err := t.get(userKey(a.GetUserId()), &u)
		if err != nil {
			return nil, err
		}
		if !found {
			continue // deleted meanwhile: nothing to record
		}
		if a.GetDeviceId() != "" {
			var d statev1.Device
			found, err := t.get(deviceKey(a.GetUserId(), a.GetDeviceId()), &d)
			if err != nil {
				return nil, err
			}
			if !found {
				continue
			}
			if seen > d.LastSeenMs {
				d.LastSeenMs = seen
				if err := t.put(deviceKey(d.UserId, d.Id), &d); err != nil {
					return nil, err
				}
			}
		}
		if seen > u.LastActivityMs {
			u.LastActivityMs = seen
			if err := t.put(userKey(u.Id), &u); err != nil {
				return nil, err
			}
		}
	}
	return &statev1.Result{}, nil
}

func (t *txn) registerEdge(op *statev1.RegisterEdge) (*statev1.Result, error) {
	e := proto.Clone(op.GetEdge()).(*statev1.Edge)
	if e == nil {
		return nil, invalid("edge is missing")
	}
	if err := ValidateID("edge.id", e.GetId()); err != nil {
		return nil, asInvalid(err)
	}
	if len(e.GetAddrs()) > MaxEdgeAddrs || len(e.GetAddrs()) == 0 && e.GetMeshAddr() == "" {
		return nil, invalid("edge.addrs has %d entries, want 1 to %d (or 0 with edge.mesh_addr set)", len(e.GetAddrs()), MaxEdgeAddrs)
	}
	for i, a := range e.GetAddrs() {
		if err := ValidateText(fmt.Sprintf("edge.addrs[%d]", i), a, MaxAddrLen, true); err != nil {
			return nil, asInvalid(err)
		}
	}
	if err := ValidateText("edge.mesh_addr", e.GetMeshAddr(), MaxAddrLen, false); err != nil {
		return nil, asInvalid(err)
	}
	if e.GetLeaseExpiresAtMs() <= t.now {
		return nil, invalid("edge.lease_expires_at_ms is not in the future")
	}
	if n := len(e.GetMeshPublicKey()); n != 0 && n != MeshPublicKeyLen {
		return nil, invalid("edge.mesh_public_key is %d bytes, want %d", n, MeshPublicKeyLen)
	}
	var old statev1.Edge
	found, err := t.get(edgeKey(e.Id), &old)
	if err != nil {
		return nil, err
	}
	// An edge id belongs to the process that holds its lease: another key
	// under the same id, at another mesh address, while the lease is live
	// is a second process started with that id (a cloned host, a copied
	// config), which would otherwise take the id over on every renewal and
	// make the mesh flap between the two. At the same mesh address it is
	// the holder restarted after a crash (the new process bound the
	// address, so the old one no longer serves there): it takes over at
	// once. Records from before the key was kept carry none and bind
	// nothing.
	if found && old.LeaseExpiresAtMs > t.now && len(old.MeshPublicKey) != 0 &&
		!bytes.Equal(old.MeshPublicKey, e.MeshPublicKey) && old.MeshAddr != e.MeshAddr {
		return nil, exists("edge %q is held by another running edge (mesh address %s, another mesh key) until its lease ends at %s; "+
			"is a second edge running with the same id?", e.Id, old.MeshAddr, time.UnixMilli(old.LeaseExpiresAtMs).UTC().Format(time.RFC3339Nano))
	}
	if found {
		e.RegisteredAtMs = old.RegisteredAtMs
	} else {
		e.RegisteredAtMs = t.now
	}
	if err := t.put(edgeKey(e.Id), e); err != nil {
		return nil, err
	}
	// A renewal that changes nothing but the lease is not news to watchers.
	if !found || !slicesEqual(old.Addrs, e.Addrs) || old.MeshAddr != e.MeshAddr || !bytes.Equal(old.MeshPublicKey, e.MeshPublicKey) {
		if err := t.emit(&statev1.Change{Kind: statev1.ChangeKind_CHANGE_KIND_EDGE_PUT, Object: &statev1.Change_Edge{Edge: e}}); err != nil {
			return nil, err
		}
	}
	return &statev1.Result{Object: &statev1.Result_Edge{Edge: e}}, nil
}

func slicesEqual(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func (t *txn) removeEdge(e *statev1.Edge) error {
	if err := t.b.Delete(edgeKey(e.Id)); err != nil {
		return err
	}
	return t.emit(&statev1.Change{Kind: statev1.ChangeKind_CHANGE_KIND_EDGE_DELETED, Object: &statev1.Change_Edge{Edge: e}})
}

func (t *txn) expireEdges() (*statev1.Result, error) {
	var gone []*statev1.Edge
	err := t.b.Iterate(prefixEdge, prefixEnd(prefixEdge), func(_, v []byte) (bool, error) {
		var e statev1.Edge
		if err := proto.Unmarshal(v, &e); err != nil {
			return false, err
		}
		if e.LeaseExpiresAtMs <= t.now {
			gone = append(gone, &e)
		}
		return true, nil
	})
	if err != nil {
		return nil, err
	}
	for _, e := range gone {
		if err := t.removeEdge(e); err != nil {
			return nil, err
		}
	}
	return &statev1.Result{}, nil
}

func (t *txn) deregisterEdge(op *statev1.DeregisterEdge) (*statev1.Result, error) {
	var e statev1.Edge
	found, err := t.get(edgeKey(op.GetId()), &e)
	if err != nil {
		return nil, err
	}
	if !found {
		return nil, notFound("edge %q not found", op.GetId())
	}
	if len(op.GetMeshPublicKey()) != 0 && !bytes.Equal(op.GetMeshPublicKey(), e.MeshPublicKey) {
		return nil, notFound("edge %q is held by another mesh key", op.GetId())
	}
	if err := t.removeEdge(&e); err != nil {
		return nil, err
	}
	return &statev1.Result{}, nil
}

func (t *txn) initCluster(op *statev1.InitCluster) (*statev1.Result, error) {
	if _, err := t.b.Get(keyInitialized); err == nil {
		return &statev1.Result{}, nil
	} else if !errors.Is(err, state.ErrNotFound) {
		return nil, err
	}
	// Validate every part before writing any.
	admin := op.GetAdmin()
	if admin.GetRole() != "admin" {
		return nil, invalid("admin.role must be \"admin\"")
	}
	if n := len(op.GetHistory()); n > MaxHistoryLen {
		return nil, invalid("history is %d bytes, at most %d", n, MaxHistoryLen)
	}
	if op.GetClusterCa() != nil {
		if err := validClusterCA("cluster_ca", op.GetClusterCa()); err != nil {
			return nil, err
		}
	}
	if err := validSigningKey(op.GetSigningKey()); err != nil {
		return nil, err
	}
	if err := validSessionKey(op.GetSessionKey()); err != nil {
		return nil, err
	}
	for _, k := range [][]byte{signingKeyKey(op.GetSigningKey().GetId()), sessionKeyKey(op.GetSessionKey().GetId())} {
		if _, err := t.b.Get(k); err == nil {
			return nil, exists("key %q already exists", k)
		} else if !errors.Is(err, state.ErrNotFound) {
			return nil, err
		}
	}
	// createUser is the only step left that can reject; it does so before
	// writing anything, and the key rotations below cannot fail any more.
	var res *statev1.Result
	var err error
	if res, err = t.createUser(&statev1.CreateUser{User: admin}); err != nil {
		return nil, err
	}
	if _, err := t.rotateSigningKey(&statev1.RotateSigningKey{Key: op.GetSigningKey()}); err != nil {
		return nil, err
	}
	if _, err := t.rotateSessionKey(&statev1.RotateSessionKey{Key: op.GetSessionKey()}); err != nil {
		return nil, err
	}
	if op.GetClusterCa() != nil {
		if has, err := t.hasClusterCA(); err != nil {
			return nil, err
		} else if !has {
			if err := t.storeClusterCA(op.GetClusterCa()); err != nil {
				return nil, err
			}
		}
	}
	if h := op.GetHistory(); h != "" {
		if err := t.b.Set(keyHistory, []byte(h)); err != nil {
			return nil, err
		}
	}
	if err := t.b.Set(keyInitialized, nil); err != nil {
		return nil, err
	}
	res.Initialized = true
	return res, nil
}

func validSigningKey(k *statev1.SigningKey) error {
	if k == nil {
		return invalid("signing key is missing")
	}
	if err := ValidateID("key.id", k.GetId()); err != nil {
		return asInvalid(err)
	}
	if len(k.GetPrivateSeed()) != SigningSeedLen || len(k.GetPublicKey()) != PublicKeyLen {
		return invalid("key.private_seed and key.public_key must be %d bytes", SigningSeedLen)
	}
	return nil
}

func validSessionKey(k *statev1.SessionKey) error {
	if k == nil {
		return invalid("session key is missing")
	}
	if err := ValidateID("key.id", k.GetId()); err != nil {
		return asInvalid(err)
	}
	if len(k.GetSecret()) != SessionSecretLen {
		return invalid("key.secret is %d bytes, want %d", len(k.GetSecret()), SessionSecretLen)
	}
	return nil
}
