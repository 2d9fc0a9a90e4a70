package api

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/edge-relay/relay/control/auth"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// AuthServer serves AuthService: logins, token refresh with rotation and
// reuse detection, logout, and a caller's change of its own password.
type AuthServer struct {
	node  *raftnode.Node
	authn *Authenticator
	cfg   AuthConfig
	// dummy is a hash verified for unknown logins so that a wrong login
	// and a wrong password take the same time.
	dummy string
	log   *slog.Logger
}

var _ controlv1connect.AuthServiceHandler = (*AuthServer)(nil)

// NewAuthServer returns the AuthService handler; it logs to log.
func NewAuthServer(node *raftnode.Node, authn *Authenticator, log *slog.Logger) (*AuthServer, error) {
	cfg := authn.Config()
	dummy, err := auth.HashPassword("not a real password, only for timing", cfg.Password)
	if err != nil {
		return nil, fmt.Errorf("prepare auth server: %w", err)
	}
	return &AuthServer{node: node, authn: authn, cfg: cfg, dummy: dummy, log: log}, nil
}

var errBadCredentials = errors.New("invalid login or password")

func clientAddr(peer connect.Peer) string {
	host, _, err := net.SplitHostPort(peer.Addr)
	if err != nil {
		return peer.Addr
	}
	return host
}

// Login checks the credentials and issues tokens.
func (s *AuthServer) Login(ctx context.Context, req *connect.Request[controlv1.LoginRequest]) (*connect.Response[controlv1.LoginResponse], error) {
	m := req.Msg
	if err := fsm.ValidateText("login", m.GetLogin(), fsm.MaxLoginLen, true); err != nil {
		return nil, invalidArg(err)
	}
	if m.GetPassword() == "" || len(m.GetPassword()) > 1024 {
		return nil, invalidArg(errors.New("password is empty or longer than 1024 bytes"))
	}
	attempt, forwarded, err := s.admit(ctx, m.GetLogin(), req)
	if err != nil {
		return nil, err
	}
	u, ok, err := s.checkLogin(ctx, attempt, m, forwarded)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, connect.NewError(connect.CodeUnauthenticated, errBadCredentials)
	}
	if u.GetStatus() != statev1.UserStatus_USER_STATUS_ACTIVE {
		return nil, connect.NewError(connect.CodePermissionDenied, errors.New("this account is disabled"))
	}
	// Only once the password is known right: whoever does not know it
	// learns nothing of the account's bucket, not even that the login
	// exists. The attempt stays counted as a failure (no session opened).
	if err := s.mayIssue(u); err != nil {
		return nil, err
	}
	tokID, secret, refresh, err := auth.NewRefreshToken(rand.Reader)
	if err != nil {
		return nil, toConnect(err)
	}
	now := s.cfg.Now()
	expires := refreshExpiry(s.cfg, now, now)
	session := newID("f")
	_, err = s.node.Apply(ctx, &statev1.Command{ProposedAtMs: now.UnixMilli(), Op: &statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{
		Token:     &statev1.RefreshToken{Id: tokID, FamilyId: session, UserId: u.GetId(), SecretHash: auth.HashSecret(secret), ExpiresAtMs: expires.UnixMilli()},
		Succeeded: attempt, PasswordHash: u.GetPasswordHash(), MaxSessions: s.sessionCap(u), EndedKeptUntilMs: s.endedKept(now),
	}}})
	if errors.Is(err, fsm.ErrFailedPrecondition) {
		// The account changed since the password was checked (a new
		// password, or disabled): what was presented opens nothing.
		return nil, connect.NewError(connect.CodeUnauthenticated, errBadCredentials)
	}
	if err != nil {
		return nil, toConnect(err)
	}
	s.issued(u)
	s.rehash(ctx, u, m.GetPassword())
	tokens, err := s.tokens(u, session, refresh, expires)
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&controlv1.LoginResponse{Tokens: tokens}), nil
}

// rehash replaces the stored hash of u's password, just checked right,
// when it was made with other parameters than this node's
// (AuthConfig.Password): after a change of them, an account's login
// would otherwise take another time than an unknown login's check of the
// dummy (made with the current ones), telling the accounts that exist
// from those that do not, and a raised cost would never reach the hashes
// already stored. It costs that login one more hash, in a hashing slot,
// and one write, once. A failure fails nothing (the next login tries
// again); a password changed meanwhile wins (RehashPassword applies only
// over the hash that was checked). Not before every member can apply it
// (feature password_rehash).
func (s *AuthServer) rehash(ctx context.Context, u *statev1.User, password string) {
	if !auth.NeedsRehash(u.GetPasswordHash(), s.cfg.Password) || !s.node.EveryMemberHas(fsm.FeaturePasswordRehash) {
		return
	}
	h, err := s.authn.hashPassword(ctx, password)
	if err == nil {
		_, err = s.node.Apply(ctx, &statev1.Command{ProposedAtMs: s.cfg.Now().UnixMilli(), Op: &statev1.Command_RehashPassword{RehashPassword: &statev1.RehashPassword{
			UserId: u.GetId(), ExpectPasswordHash: u.GetPasswordHash(), PasswordHash: h,
		}}})
	}
	if err != nil && !errors.Is(err, fsm.ErrFailedPrecondition) {
		s.log.WarnContext(ctx, "could not store the password hash with the current parameters; the next login tries again", "user", u.GetId(), "err", err)
	}
}

// mayIssue refuses (resource_exhausted, with Retry-After) a login or
// refresh of an account that has completed too many on this node
// (AuthConfig.TokensPerMinute). Edges' accounts are not bounded: every
// edge of a deployment may share one, and they log in by themselves.
func (s *AuthServer) mayIssue(u *statev1.User) error {
	if !issueBounded(u) {
		return nil
	}
	if wait := s.authn.issues.wait(u.GetId(), s.cfg.Now()); wait > 0 {
		return retryIn(wait, "this account logs in or refreshes more often than %d times a minute on this node", s.cfg.TokensPerMinute)
	}
	return nil
}

// issued counts a completed login or refresh of u's.
func (s *AuthServer) issued(u *statev1.User) {
	if issueBounded(u) {
		s.authn.issues.take(u.GetId(), s.cfg.Now())
	}
}

// sessionCap is the IssueRefreshToken.max_sessions of a login of u's:
// AuthConfig.MaxSessions once every member has the feature, never for an
// edge's account (every edge may share it); 0, no cap, otherwise.
func (s *AuthServer) sessionCap(u *statev1.User) uint32 {
	if s.cfg.MaxSessions <= 0 || !issueBounded(u) || !s.node.EveryMemberHas(fsm.FeatureSessionCap) {
		return 0
	}
	return uint32(s.cfg.MaxSessions)
}

// endedKept is until when the record of a session ended now stays,
// revoked, once every member has the feature session_cap: as long as an
// access token issued now may be taken (its lifetime and the leeway), so
// that every node refuses the session's access tokens from its own state
// (a record it has never seen would cost a read barrier per call, and a
// node cut off from the leader would take them).
func (s *AuthServer) endedKept(now time.Time) int64 {
	if !s.node.EveryMemberHas(fsm.FeatureSessionCap) {
		return 0
	}
	return now.Add(s.cfg.AccessTTL + s.cfg.Leeway).UnixMilli()
}

// issueBounded reports whether u's logins and refreshes are bounded:
// every account's but an edge's.
func issueBounded(u *statev1.User) bool { return auth.Role(u.GetRole()) != auth.RoleEdge }

// checkLogin records the attempt and checks the login's password, in
// one hashing slot (see recordAttempt), and returns the account when the
// password is its own. An unknown login, or one without a password, is
// checked against a dummy hash, so it takes the time a wrong password
// does and ends the same way when no slot comes in time: the answers
// tell no login that exists from one that does not.
//
// A login an edge forwards (a page's, through its console proxy) never
// opens an edge account, and is neither checked nor counted: pages have
// no business with the edges' credentials, and failures counted against
// the login the edges share would let anyone on the Internet push it
// past its ceiling (LoginCeiling), after which the edges' own logins
// from addresses not yet trusted for it (a new pod, the ninth edge)
// wait up to MaxDelay. It answers as a wrong password does, without the
// hashing: it tells that the login is an edge account, which its name
// in a deployment's files says anyway.
func (s *AuthServer) checkLogin(ctx context.Context, attempt *statev1.LoginAttempt, m *controlv1.LoginRequest, forwarded bool) (*statev1.User, bool, error) {
	// The linearizable read first, outside the slot: it waits for a
	// leader when there is none, and a slot held through an election
	// would line every login up behind it. With a leader just heard
	// from, the attempt's write in the slot is one round trip; the
	// account is read after it, from state at least as fresh.
	f, err := s.node.Read(ctx, raftnode.Linearizable)
	if err != nil {
		return nil, false, toConnect(err)
	}
	if forwarded {
		if u, err := f.GetUserByLogin(m.GetLogin()); err == nil && auth.Role(u.GetRole()) == auth.RoleEdge {
			return nil, false, nil
		}
	}
	release, err := s.attemptInSlot(ctx, attempt)
	if err != nil {
		return nil, false, err
	}
	defer release()
	u, err := f.GetUserByLogin(m.GetLogin())
	if err != nil && !errors.Is(err, fsm.ErrNotFound) {
		return nil, false, toConnect(err)
	}
	ok, err := s.verify(u.GetPasswordHash(), m.GetPassword())
	return u, err == nil && ok, nil
}

// attemptInSlot takes one of the node's hashing slots and records the
// attempt (recordAttempt) in it. The caller checks the password and then
// calls release, once; on an error nothing is held.
func (s *AuthServer) attemptInSlot(ctx context.Context, attempt *statev1.LoginAttempt) (release func(), err error) {
	release, err = s.authn.hashSlot(ctx)
	if err != nil {
		return nil, toConnect(err)
	}
	if err := s.recordAttempt(ctx, attempt); err != nil {
		release()
		return nil, err
	}
	return release, nil
}

// verify checks password against hash, in a hashing slot the caller
// holds. An empty hash (no such account, or one without a password) is
// checked against the dummy hash, for the time a wrong password takes,
// and never matches.
func (s *AuthServer) verify(hash, password string) (bool, error) {
	if hash == "" {
		_, _ = auth.VerifyPassword(s.dummy, password)
		return false, nil
	}
	return auth.VerifyPassword(hash, password)
}

// admit is the first half of a login attempt: the checks that cost
// nothing but this node's memory. It refuses (ResourceExhausted, with
// Retry-After) while the login or the client's address must wait, and
// else returns the attempt to record (recordAttempt), and whether an
// edge forwarded it (a page's login through its console proxy).
func (s *AuthServer) admit(ctx context.Context, login string, req connect.AnyRequest) (attempt *statev1.LoginAttempt, forwarded bool, err error) {
	addr := clientAddr(req.Peer())
	if fwd, ok := s.authn.forwardedFor(ctx, req.Header()); ok {
		addr, forwarded = fwd, true
	}
	attempt = &statev1.LoginAttempt{Login: login, AddrHash: addrHash(addr),
		Policy: s.cfg.Throttle.policy(s.node.EveryMemberHas(fsm.FeatureLoginCeiling))}
	// This replica's counts first: a throttled attempt costs no write.
	if wait, err := s.node.FSM().LoginWait(attempt, s.cfg.Now().UnixMilli()); err != nil {
		return nil, false, toConnect(err)
	} else if wait > 0 {
		return nil, false, throttled(time.Duration(wait) * time.Millisecond)
	}
	return attempt, forwarded, nil
}

// recordAttempt counts a check of a password as a login attempt, in the
// log, where the cluster's counts decide: refused (ResourceExhausted,
// with Retry-After) when the login or the address must wait, else
// recorded as a failure until the check succeeds (and gives it back),
// so parallel guesses cannot all pass before the first failure is
// recorded. The caller holds a hashing slot: one that gives up waiting
// for a slot had nothing checked, and spends no attempt. It has just
// made a linearizable read, so a leader is known and the write is
// short.
func (s *AuthServer) recordAttempt(ctx context.Context, attempt *statev1.LoginAttempt) error {
	res, err := s.node.Apply(ctx, &statev1.Command{ProposedAtMs: s.cfg.Now().UnixMilli(), Op: &statev1.Command_LoginAttempt{LoginAttempt: attempt}})
	if err != nil {
		return toConnect(err)
	}
	if wait := res.GetRetryAfterMs(); wait > 0 {
		return throttled(time.Duration(wait) * time.Millisecond)
	}
	return nil
}

// throttled is the error of a login attempt that must wait.
func throttled(wait time.Duration) error {
	return retryIn(wait, "too many failed login attempts")
}

// retryIn is a resource_exhausted error whose message, and Retry-After,
// say to try again after wait (in whole seconds, rounded up).
func retryIn(wait time.Duration, format string, args ...any) error {
	secs := int((wait + time.Second - 1) / time.Second)
	err := connect.NewError(connect.CodeResourceExhausted, fmt.Errorf(format+"; retry in %ds", append(args, secs)...))
	err.Meta().Set("Retry-After", fmt.Sprint(secs))
	return err
}

func (s *AuthServer) tokens(u *statev1.User, session, refresh string, refreshExpires time.Time) (*controlv1.Tokens, error) {
	access, exp, err := s.authn.Issue(u, session)
	if err != nil {
		return nil, err
	}
	return &controlv1.Tokens{
		AccessToken: access, AccessTokenExpiresAt: timestamppb.New(exp),
		RefreshToken: refresh, RefreshTokenExpiresAt: timestamppb.New(refreshExpires),
		UserId: u.GetId(), Role: apiRole(u.GetRole()),
	}, nil
}

// Issue signs an access token for an account, in a session (the refresh
// token family it was issued with).
func (a *Authenticator) Issue(u *statev1.User, session string) (string, time.Time, error) {
	key, err := a.keys.Current()
	if err != nil {
		return "", time.Time{}, err
	}
	role, err := auth.ParseRole(u.GetRole())
	if err != nil {
		return "", time.Time{}, err
	}
	now := a.cfg.Now()
	exp := now.Add(a.cfg.AccessTTL)
	tok, err := auth.Sign(key, auth.Claims{
		Issuer: a.cfg.Issuer, Audience: a.cfg.Audience, Subject: u.GetId(), Login: u.GetLogin(),
		Role: role, IssuedAt: now, NotBefore: now, ExpiresAt: exp, ID: newID("at"), Session: session,
	})
	return tok, exp, err
}

// Refresh rotates a refresh token.
func (s *AuthServer) Refresh(ctx context.Context, req *connect.Request[controlv1.RefreshRequest]) (*connect.Response[controlv1.RefreshResponse], error) {
	id, secret, err := auth.ParseRefreshToken(req.Msg.GetRefreshToken())
	if err != nil {
		return nil, invalidArg(fmt.Errorf("refresh_token: %w", err))
	}
	cur, err := s.node.FSM().GetRefreshToken(id)
	if err != nil {
		if errors.Is(err, fsm.ErrNotFound) && s.authn.tokenCatchUp.refresh(ctx) {
			// Perhaps issued moments ago on another node: caught up
			// (at most once per KeyRefreshEvery for all such calls, which
			// anyone can make up).
			cur, err = s.node.FSM().GetRefreshToken(id)
		}
		if err != nil {
			return nil, connect.NewError(connect.CodeUnauthenticated, errors.New("refresh token not recognised; log in again"))
		}
	}
	nextID, nextSecret, next, err := auth.NewRefreshToken(rand.Reader)
	if err != nil {
		return nil, toConnect(err)
	}
	if subtle.ConstantTimeCompare(cur.GetSecretHash(), auth.HashSecret(secret)) != 1 {
		// (Apply checks it too; checked here first so that nothing
		// below tells anything of a token to whoever only knows its id.)
		return nil, connect.NewError(connect.CodeUnauthenticated, errors.New("refresh token not recognised; log in again"))
	}
	now := s.cfg.Now()
	// A login lasts LoginMaxAge at most, however often it is refreshed
	// (a thief who keeps refreshing a stolen token is cut off then too).
	// The family is written with the login's first token, so a replica
	// that knows the token knows it.
	fam, err := s.node.FSM().GetTokenFamily(cur.GetFamilyId())
	if errors.Is(err, fsm.ErrNotFound) {
		return nil, connect.NewError(connect.CodeUnauthenticated, errors.New("refresh token not recognised; log in again"))
	} else if err != nil {
		return nil, toConnect(err)
	}
	loggedIn := time.UnixMilli(fam.GetCreatedAtMs())
	if s.cfg.LoginMaxAge > 0 && !now.Before(loggedIn.Add(s.cfg.LoginMaxAge)) {
		return nil, connect.NewError(connect.CodeUnauthenticated, fmt.Errorf("this login is older than its longest life (%s); log in again", s.cfg.LoginMaxAge))
	}
	owner, err := s.node.FSM().GetUser(cur.GetUserId())
	if err != nil {
		return nil, connect.NewError(connect.CodeUnauthenticated, errors.New("account no longer exists"))
	}
	if err := s.mayIssue(owner); err != nil {
		return nil, err
	}
	expires := refreshExpiry(s.cfg, now, loggedIn)
	// The presented token, once rotated, is kept until the login ends, so
	// that presenting it even after its own expiry is seen as reuse: a
	// thief who used it first is cut off when its owner comes back with
	// it, however long after. A login without a longest life keeps it
	// until its own expiry only (else its rotated tokens would pile up
	// for ever).
	var keep int64
	if s.cfg.LoginMaxAge > 0 && s.node.EveryMemberHas(fsm.FeatureRefreshKeepRotated) {
		keep = loggedIn.Add(s.cfg.LoginMaxAge).UnixMilli()
	}
	res, err := s.node.Apply(ctx, &statev1.Command{ProposedAtMs: now.UnixMilli(), Op: &statev1.Command_RotateRefreshToken{RotateRefreshToken: &statev1.RotateRefreshToken{
		TokenId: id, PresentedSecretHash: auth.HashSecret(secret),
		Next:               &statev1.RefreshToken{Id: nextID, FamilyId: cur.GetFamilyId(), UserId: cur.GetUserId(), SecretHash: auth.HashSecret(nextSecret), ExpiresAtMs: expires.UnixMilli()},
		KeepRotatedUntilMs: keep, BoundRotations: s.node.EveryMemberHas(fsm.FeatureSessionCap),
	}}})
	if err != nil {
		if errors.Is(err, fsm.ErrNotFound) || errors.Is(err, fsm.ErrFailedPrecondition) {
			return nil, connect.NewError(connect.CodeUnauthenticated, fmt.Errorf("refresh token refused (%v); log in again", err))
		}
		return nil, toConnect(err)
	}
	if res.GetReuseDetected() {
		return nil, connect.NewError(connect.CodeUnauthenticated, errors.New("refresh token was already used: every token of this login is revoked; log in again"))
	}
	s.issued(owner)
	// The account as read before the rotation: a change of its role or
	// status since would have revoked the family, and the rotation with
	// it.
	tokens, err := s.tokens(owner, cur.GetFamilyId(), next, expires)
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&controlv1.RefreshResponse{Tokens: tokens}), nil
}

// refreshExpiry is when a refresh token issued at now, in a login made
// at loggedIn, expires: RefreshTTL from now, and never past the login's
// LoginMaxAge.
func refreshExpiry(cfg AuthConfig, now, loggedIn time.Time) time.Time {
	exp := now.Add(cfg.RefreshTTL)
	if limit := loggedIn.Add(cfg.LoginMaxAge); cfg.LoginMaxAge > 0 && limit.Before(exp) {
		return limit
	}
	return exp
}

// Logout revokes the refresh token's family. The caller's access token
// must belong to the same account.
func (s *AuthServer) Logout(ctx context.Context, req *connect.Request[controlv1.LogoutRequest]) (*connect.Response[controlv1.LogoutResponse], error) {
	claims, _ := auth.ClaimsFrom(ctx)
	id, _, err := auth.ParseRefreshToken(req.Msg.GetRefreshToken())
	if err != nil {
		return nil, invalidArg(fmt.Errorf("refresh_token: %w", err))
	}
	f, err := s.node.Read(ctx, raftnode.Linearizable)
	if err != nil {
		return nil, toConnect(err)
	}
	cur, err := f.GetRefreshToken(id)
	if err != nil || cur.GetUserId() != claims.Subject {
		return nil, connect.NewError(connect.CodeNotFound, errors.New("refresh token not found"))
	}
	now := s.cfg.Now()
	_, err = s.node.Apply(ctx, &statev1.Command{ProposedAtMs: now.UnixMilli(), Op: &statev1.Command_RevokeTokenFamily{RevokeTokenFamily: &statev1.RevokeTokenFamily{
		FamilyId: cur.GetFamilyId(), UserId: claims.Subject, Reason: "logout",
		// Its tokens deleted, its record kept only for its access
		// tokens: a logged-out session takes no room under the account's
		// session cap.
		End: s.node.EveryMemberHas(fsm.FeatureSessionCap), EndedKeptUntilMs: s.endedKept(now),
	}}})
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&controlv1.LogoutResponse{}), nil
}

// errWrongPassword answers a password change whose current password is
// not the account's.
var errWrongPassword = errors.New("current_password is not the account's password")

// ChangePassword sets the caller's own password once its current one is
// checked, as a login checks it (throttled alike), and ends the caller's
// other sessions.
func (s *AuthServer) ChangePassword(ctx context.Context, req *connect.Request[controlv1.ChangePasswordRequest]) (*connect.Response[controlv1.ChangePasswordResponse], error) {
	claims, _ := auth.ClaimsFrom(ctx)
	m := req.Msg
	// What the request alone shows wrong costs no attempt.
	if m.GetCurrentPassword() == "" || len(m.GetCurrentPassword()) > 1024 {
		return nil, invalidArg(errors.New("current_password is empty or longer than 1024 bytes"))
	}
	if err := auth.ValidatePassword(m.GetNewPassword()); err != nil {
		return nil, invalidArg(fmt.Errorf("new_password: %w", err))
	}
	if m.GetNewPassword() == m.GetCurrentPassword() {
		return nil, invalidArg(errors.New("new_password is the current password"))
	}
	f, err := s.node.Read(ctx, raftnode.Linearizable)
	if err != nil {
		return nil, toConnect(err)
	}
	// The change's command carries what a node of an older release would
	// not check (the hash it verified, the attempt it gives back): in a
	// rolling upgrade the replicas would come apart on it. Checked on
	// state as fresh as the read's.
	if err := s.passwordChangeGate(); err != nil {
		return nil, err
	}
	u, err := f.GetUser(claims.Subject)
	if err != nil {
		return nil, toConnect(err)
	}
	// Counted against the account's login: a stolen access token buys
	// no more guesses at the password than the login form gives.
	attempt, _, err := s.admit(ctx, u.GetLogin(), req)
	if err != nil {
		return nil, err
	}
	h, err := s.checkAndHash(ctx, attempt, u, m)
	if err != nil {
		return nil, err
	}
	// Again right before the write, so that the time from the last check
	// to the entry is a proposal's, not the hashing's: a member stopping
	// meanwhile waits that long (raftnode withdrawFeatures) for what was
	// checked before its withdrawal. The attempt stays spent.
	if err := s.passwordChangeGate(); err != nil {
		return nil, err
	}
	_, err = s.node.Apply(ctx, &statev1.Command{ProposedAtMs: s.cfg.Now().UnixMilli(), Op: &statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{
		Id: u.GetId(), Fields: []string{"password_hash"}, User: &statev1.User{PasswordHash: h},
		KeepSessionId: claims.Session, Succeeded: attempt, ExpectPasswordHash: u.GetPasswordHash(),
	}}})
	if errors.Is(err, fsm.ErrFailedPrecondition) {
		// The account changed between the check and the write: nothing
		// changed (and a retry would check a password that may be gone).
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("the account changed while the password was checked; nothing changed: %w", err))
	}
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&controlv1.ChangePasswordResponse{}), nil
}

// checkAndHash records the attempt, checks the current password of a
// password change and hashes the new one, all in one hashing slot (see
// recordAttempt), and returns the new hash.
func (s *AuthServer) checkAndHash(ctx context.Context, attempt *statev1.LoginAttempt, u *statev1.User, m *controlv1.ChangePasswordRequest) (string, error) {
	release, err := s.attemptInSlot(ctx, attempt)
	if err != nil {
		return "", err
	}
	defer release()
	ok, err := s.verify(u.GetPasswordHash(), m.GetCurrentPassword())
	if err != nil {
		return "", toConnect(err) // a stored hash this release cannot read
	}
	if !ok {
		return "", invalidArg(errWrongPassword)
	}
	if u.GetStatus() != statev1.UserStatus_USER_STATUS_ACTIVE {
		return "", connect.NewError(connect.CodePermissionDenied, errors.New("this account is disabled"))
	}
	h, err := auth.HashPassword(m.GetNewPassword(), s.cfg.Password)
	if err != nil {
		return "", toConnect(err)
	}
	return h, nil
}

// passwordChangeGate answers failed_precondition while a member's
// record does not list change_password (raftnode.Node.MembersWithout).
// The members are not named: the caller may be anyone with an account
// (relayctl cluster status names them to operators).
func (s *AuthServer) passwordChangeGate() error {
	missing, err := s.node.MembersWithout(fsm.FeatureChangePassword)
	if err != nil {
		return toConnect(err)
	}
	if len(missing) > 0 {
		return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf(
			"%d control node(s) do not run a release that changes passwords (an upgrade or a restart under way): try again once it is done", len(missing)))
	}
	return nil
}

// newID returns a random id with a prefix, e.g. "u_3q2...".
func newID(prefix string) string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return prefix + "_" + base64.RawURLEncoding.EncodeToString(b[:])
}

// JWKSHandler serves the public signing keys at /.well-known/jwks.json.
func JWKSHandler(keys Keys) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		b, err := auth.JWKS(keys.Verify())
		if err != nil {
			http.Error(w, "keys unavailable", http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "application/jwk-set+json")
		w.Header().Set("Cache-Control", "max-age=60")
		_, _ = w.Write(b)
	})
}
