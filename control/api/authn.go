package api

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/auth"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
	"github.com/edge-relay/relay/internal/connbound"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// DefaultLoginMaxAge is AuthConfig.LoginMaxAge's default.
const DefaultLoginMaxAge = 90 * 24 * time.Hour

// DefaultMaxSessions is AuthConfig.MaxSessions's default: far more
// logins than one person keeps open (a browser, a phone, relayctl on a
// few machines), few enough that an account's records stay small.
const DefaultMaxSessions = 100

// AuthConfig configures token issuing and checking.
type AuthConfig struct {
	// Issuer and Audience go into every access token and are required on
	// every token presented. Defaults "relay" and "relay-api".
	Issuer, Audience string
	// AccessTTL is an access token's lifetime. Default 15 minutes.
	AccessTTL time.Duration
	// RefreshTTL is a refresh token's lifetime. Default 30 days.
	RefreshTTL time.Duration
	// LoginMaxAge is the longest a login (a refresh token family, a
	// session) lasts however often it is refreshed: no refresh token of
	// it expires later, and a refresh after it is refused (log in
	// again). It bounds what a stolen refresh token gives a thief who
	// keeps refreshing it. Default 90 days; negative: no limit.
	LoginMaxAge time.Duration
	// TokensPerMinute bounds the logins and refreshes one account that
	// is not an edge's completes on this node (a bucket of that many,
	// refilled evenly over a minute; failed ones do not count): each
	// leaves records in the replicated state for weeks. Past it they are
	// refused resource_exhausted with Retry-After. Default
	// DefaultTokensPerMinute; negative: no limit.
	TokensPerMinute int
	// MaxSessions is the most sessions (logins not yet ended) an account
	// that is not an edge's holds: a login past it ends the account's
	// oldest ones (a logout ends its own), so that an account's sessions
	// hold a bounded part of the replicated state. Default
	// DefaultMaxSessions; negative: no cap; above fsm.MaxSessionCap taken
	// as fsm.MaxSessionCap.
	MaxSessions int
	// Leeway tolerates clock differences between nodes. Default 30s.
	Leeway time.Duration
	// Password hashing parameters. Default auth.DefaultParams.
	Password auth.Params
	// Throttle is the cluster-wide login throttling policy
	// (docs/api.md); zero fields take the defaults.
	Throttle Throttle
	// ActivityEvery throttles last_activity writes per user. Default 1m.
	ActivityEvery time.Duration
	// KeyRefreshEvery: a token signed by a key this replica does not know
	// makes it refresh its key set (a read barrier through the leader) at
	// most once in this interval. Default 1s.
	KeyRefreshEvery time.Duration
	// KeyRefreshTimeout bounds one such refresh. Default 1s.
	KeyRefreshTimeout time.Duration
	// StreamRecheckEvery is how often a streaming call's account and
	// session are looked at again while it lasts. Default 5s.
	StreamRecheckEvery time.Duration
	// Now is the clock; default time.Now.
	Now func() time.Time
}

func (c *AuthConfig) applyDefaults() {
	if c.Issuer == "" {
		c.Issuer = "relay"
	}
	if c.Audience == "" {
		c.Audience = "relay-api"
	}
	if c.AccessTTL <= 0 {
		c.AccessTTL = 15 * time.Minute
	}
	if c.RefreshTTL <= 0 {
		c.RefreshTTL = 30 * 24 * time.Hour
	}
	if c.LoginMaxAge == 0 {
		c.LoginMaxAge = DefaultLoginMaxAge
	}
	if c.Leeway <= 0 {
		c.Leeway = 30 * time.Second
	}
	if c.TokensPerMinute == 0 {
		c.TokensPerMinute = DefaultTokensPerMinute
	}
	if c.MaxSessions == 0 {
		c.MaxSessions = DefaultMaxSessions
	}
	c.MaxSessions = min(c.MaxSessions, fsm.MaxSessionCap)
	if c.Password == (auth.Params{}) {
		c.Password = auth.DefaultParams
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	c.Throttle.applyDefaults()
	if c.ActivityEvery <= 0 {
		c.ActivityEvery = time.Minute
	}
	if c.KeyRefreshEvery <= 0 {
		c.KeyRefreshEvery = time.Second
	}
	if c.KeyRefreshTimeout <= 0 {
		c.KeyRefreshTimeout = time.Second
	}
	if c.StreamRecheckEvery <= 0 {
		c.StreamRecheckEvery = 5 * time.Second
	}
}

// Keys gives access to the cluster's signing keys as the local replica
// holds them.
type Keys struct {
	node *raftnode.Node
}

// Verify returns the keys that may verify tokens now.
func (k Keys) Verify() []auth.VerifyKey {
	list, _, err := k.node.FSM().SigningKeys()
	if err != nil {
		return nil
	}
	out := make([]auth.VerifyKey, 0, len(list))
	for _, s := range list {
		vk := auth.VerifyKey{ID: s.GetId(), Public: ed25519.PublicKey(s.GetPublicKey())}
		if s.GetVerifyUntilMs() != 0 {
			vk.NotAfter = time.UnixMilli(s.GetVerifyUntilMs())
		}
		out = append(out, vk)
	}
	return out
}

// Current returns the key that signs new tokens.
func (k Keys) Current() (auth.SigningKey, error) {
	list, cur, err := k.node.FSM().SigningKeys()
	if err != nil {
		return auth.SigningKey{}, err
	}
	for _, s := range list {
		if s.GetId() == cur {
			return auth.SigningKey{ID: s.GetId(), Private: ed25519.NewKeyFromSeed(s.GetPrivateSeed()), CreatedAt: time.UnixMilli(s.GetCreatedAtMs())}, nil
		}
	}
	return auth.SigningKey{}, errors.New("the cluster has no signing key yet (not initialized)")
}

// Authenticator is the Connect interceptor that establishes who calls:
// a bearer access token, or (for node-to-node calls) a client certificate
// verified against the cluster CA. It enforces the RBAC table, checks that
// the account still exists and is active, and records API activity.
type Authenticator struct {
	node     *raftnode.Node
	cfg      AuthConfig
	keys     Keys
	verifier *auth.Verifier
	policy   auth.Policy
	activity *activityThrottle
	nodeTok  nodeToken
	// keyRefresh bounds the refreshes of the key set that tokens signed
	// by unknown keys cause.
	keyRefresh *catchUp
	// tokenCatchUp bounds the same for refresh tokens of ids this
	// replica does not know.
	tokenCatchUp *catchUp
	// streams are the streaming calls open, with their credential checks.
	streams streamSet
	// hashSlots bounds the password hashes (logins' checks, new
	// passwords) computed at once on this node: each holds the hash's
	// memory (64 MiB with the default parameters) and a core, so more at
	// once only queue for CPU and add memory.
	hashSlots chan struct{}
	// issues bounds each account's logins and refreshes on this node.
	issues *issueLimit
}

// hashSlot waits for one of the node's hashing slots, or returns ctx's
// error. The caller hashes in it and then calls release, once.
func (a *Authenticator) hashSlot(ctx context.Context) (release func(), err error) {
	select {
	case a.hashSlots <- struct{}{}:
		return func() { <-a.hashSlots }, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("waiting to hash a password: %w", ctx.Err())
	}
}

// withHashSlot runs f, a password hash, once one of the node's hashing
// slots is free, or returns ctx's error without running it.
func (a *Authenticator) withHashSlot(ctx context.Context, f func()) error {
	release, err := a.hashSlot(ctx)
	if err != nil {
		return err
	}
	defer release()
	f()
	return nil
}

// hashPassword hashes a new password with the configured parameters, in
// one of the node's hashing slots.
func (a *Authenticator) hashPassword(ctx context.Context, password string) (string, error) {
	var h string
	var herr error
	if err := a.withHashSlot(ctx, func() { h, herr = auth.HashPassword(password, a.cfg.Password) }); err != nil {
		return "", err
	}
	return h, herr
}

// NewAuthenticator returns the interceptor for node.
func NewAuthenticator(node *raftnode.Node, cfg AuthConfig) *Authenticator {
	cfg.applyDefaults()
	keys := Keys{node: node}
	return &Authenticator{
		node: node, cfg: cfg, keys: keys, policy: Policy(),
		verifier: auth.NewVerifier(cfg.Issuer, cfg.Audience, keys.Verify, cfg.Now, cfg.Leeway),
		activity: newActivityThrottle(cfg.ActivityEvery),
		keyRefresh: &catchUp{every: cfg.KeyRefreshEvery, timeout: cfg.KeyRefreshTimeout,
			barrier: node.Barrier, now: cfg.Now},
		tokenCatchUp: &catchUp{every: cfg.KeyRefreshEvery, timeout: cfg.KeyRefreshTimeout,
			barrier: node.Barrier, now: cfg.Now},
		hashSlots: make(chan struct{}, max(1, runtime.GOMAXPROCS(0))),
		issues:    newIssueLimit(cfg.TokensPerMinute),
	}
}

// Keys returns the key accessor.
func (a *Authenticator) Keys() Keys { return a.keys }

// Config returns the effective configuration.
func (a *Authenticator) Config() AuthConfig { return a.cfg }

type certKey struct{}

// WithClientCert marks requests that presented a client certificate
// verified against the cluster CA, for the interceptor to see. Wrap the
// API's HTTP handler with it.
func WithClientCert(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 {
			cn := r.TLS.VerifiedChains[0][0].Subject.CommonName
			r = r.WithContext(context.WithValue(r.Context(), certKey{}, cn))
		}
		next.ServeHTTP(w, r)
	})
}

// Headers an edge sets on the control-plane calls it passes on for
// browser pages (edge/controlconn.Proxy): the page's address, vouched
// for by the edge's own access token. Login throttles by that address
// rather than by the edge's, so one abusive page behind an edge does not
// lock out every other page behind it.
const (
	ForwardedForHeader = "Relay-Forwarded-For"
	ForwardedByHeader  = "Relay-Forwarded-By"
)

// forwardedFor returns the client address an edge vouches for in h, if
// the call carries one with a valid edge token. Anyone else's claim is
// ignored.
func (a *Authenticator) forwardedFor(ctx context.Context, h http.Header) (string, bool) {
	by, ok := strings.CutPrefix(h.Get(ForwardedByHeader), "Bearer ")
	if !ok {
		return "", false
	}
	addr, err := netip.ParseAddr(h.Get(ForwardedForHeader))
	if err != nil {
		return "", false
	}
	c, err := a.verifyToken(ctx, by)
	if err != nil || c.Role != auth.RoleEdge || a.accountValid(ctx, c) != nil {
		return "", false
	}
	return addr.Unmap().String(), true
}

// verifyToken checks an access token against the local key set. A key
// rotated in moments ago may not have reached this replica yet, so a
// token signed by a key it does not know gets at most one bounded refresh
// of the key set (catchUp) before it is refused.
func (a *Authenticator) verifyToken(ctx context.Context, tok string) (auth.Claims, error) {
	c, err := a.verifier.Verify(tok)
	if errors.Is(err, auth.ErrUnknownKey) && a.keyRefresh.refresh(ctx) {
		c, err = a.verifier.Verify(tok)
	}
	if err == nil {
		err = a.issuedHere(c)
	}
	return c, err
}

// minLifetimeBound is the least maxTokenLifetime allows beyond
// --access-token-ttl: nodes configured with different lifetimes (during a
// change of it) take each other's tokens.
const minLifetimeBound = 24 * time.Hour

// issuedHere checks that a verified token has the shape of those the
// cluster issues: an account's carries its session and lives
// --access-token-ttl, a node's names the node (node:<id>) and lives no
// longer. A token of another shape was minted with the signing keys
// (which a removed node keeps): one with no session, or an expiry years
// away, would stand whatever sessions end; one naming no node, or a node
// with an account's role, would pass for a node without the membership
// check or for an account without its account check.
func (a *Authenticator) issuedHere(c auth.Claims) error {
	longest := max(a.cfg.AccessTTL, minLifetimeBound) + a.cfg.Leeway
	if c.IssuedAt.IsZero() || c.ExpiresAt.Sub(c.IssuedAt) > longest {
		return fmt.Errorf("it lives longer than %v, longer than any this cluster issues", longest)
	}
	node := strings.HasPrefix(c.Subject, "node:")
	switch {
	case c.Role == RoleNode && !node:
		return errors.New("a node's token that names no node")
	case c.Role != RoleNode && node:
		return errors.New("an account's token that names a node")
	case c.Role != RoleNode && c.Session == "":
		return errors.New("an account's token without a session; log in again")
	}
	return nil
}

// catchUp catches the local replica up with the leader (a read barrier,
// which costs the leader a heartbeat round) for what this replica may
// not have applied yet: a token signed by a key it does not know, a
// refresh token of an id it does not know. Anyone can make either, so
// the catch-ups are bounded: one at a time (callers that arrive
// meanwhile share it), at most one per interval, each within a timeout;
// outside them such a token is refused from the local state at once.
type catchUp struct {
	every, timeout time.Duration
	barrier        func(context.Context) error
	now            func() time.Time

	mu      sync.Mutex    // guards the fields below
	last    time.Time     // when the last refresh started
	running chan struct{} // closed when the refresh in flight ends; nil when none
}

// refresh brings the local key set up to date if it may now; it reports
// whether a refresh ran (or was shared), so that checking again is worth
// it.
func (k *catchUp) refresh(ctx context.Context) bool {
	k.mu.Lock()
	if ch := k.running; ch != nil {
		k.mu.Unlock()
		select {
		case <-ch:
			return true
		case <-ctx.Done():
			return false
		}
	}
	now := k.now()
	if !k.last.IsZero() && now.Sub(k.last) < k.every {
		k.mu.Unlock()
		return false
	}
	ch := make(chan struct{})
	k.running, k.last = ch, now
	k.mu.Unlock()
	defer func() {
		k.mu.Lock()
		k.running = nil
		k.mu.Unlock()
		close(ch)
	}()
	rctx, cancel := context.WithTimeout(ctx, k.timeout)
	defer cancel()
	return k.barrier(rctx) == nil
}

// Why a verified token is refused: the account or the session behind it.
var (
	errAccountGone = errors.New("the account behind this token no longer exists, is disabled, or changed role; log in again")
	errSessionGone = errors.New("the session of this token was revoked or has ended (logout, refresh token reuse, a change of password, role or status, or newer logins of the account past its session cap); log in again")
)

// accountValid reports whether the account behind a token still exists,
// is active and has the token's role, and whether the token's session
// (its refresh-token family) is still open: a token outlives neither its
// account, nor the account's access, nor its session. This replica may
// not have applied the account's or session's creation yet, so it catches
// up once before saying no; a revocation it has applied is final.
func (a *Authenticator) accountValid(ctx context.Context, c auth.Claims) error {
	f := a.node.FSM()
	userOK := func() bool {
		u, err := f.GetUser(c.Subject)
		return err == nil && u.GetStatus() == statev1.UserStatus_USER_STATUS_ACTIVE &&
			(u.GetRole() == string(c.Role) || u.GetRole() == "" && c.Role == auth.RoleUser)
	}
	// Every account token carries its session (verifyToken refuses one
	// without).
	sessionOK := func() (ok, final bool) {
		if c.Session == "" {
			return false, true
		}
		fam, err := f.GetTokenFamily(c.Session)
		if err != nil {
			return false, !errors.Is(err, fsm.ErrNotFound)
		}
		return !fam.GetRevoked() && fam.GetUserId() == c.Subject, true
	}
	sOK, sFinal := sessionOK()
	if sOK && userOK() {
		return nil
	}
	if !sOK && sFinal {
		return errSessionGone
	}
	// Catch up, within a bound: a node cut off from the leader must not
	// hold calls forever.
	bctx, cancel := context.WithTimeout(ctx, catchUpTimeout)
	caughtUp := a.node.Barrier(bctx) == nil
	cancel()
	if !userOK() {
		return errAccountGone
	}
	if ok, final := sessionOK(); !ok && (final || caughtUp) {
		return errSessionGone
	}
	// A node that cannot reach the leader cannot tell a session opened
	// since it lost touch from one that never was: it serves its own
	// state, as for every read, and refuses what it knows is revoked.
	return nil
}

// catchUpTimeout bounds the catching up of a replica that does not know
// a token's account or session yet.
const catchUpTimeout = 2 * time.Second

func (a *Authenticator) authenticate(ctx context.Context, procedure string, h http.Header) (context.Context, error) {
	if a.policy.Public[procedure] {
		return ctx, nil
	}
	// Guard verified the credentials and checked them against the
	// procedure before the body was read; without it (handlers mounted
	// on their own) that is done here.
	claims, ok := ctx.Value(preauthKey{}).(*auth.Claims)
	if !ok {
		c, err := a.preauthenticate(ctx, h)
		if err != nil && h.Get("Authorization") != "" {
			return nil, err
		}
		if err := a.authorize(ctx, procedure, c); err != nil {
			return nil, err
		}
		claims = c
	}
	if !isNode(claims) {
		a.activity.touch(claims.Subject, a.cfg.Now())
	}
	a.vouch(ctx, *claims, h)
	return auth.WithClaims(ctx, *claims), nil
}

// isNode reports whether claims are a control node's (its token, or its
// certificate of the cluster's CA).
func isNode(c *auth.Claims) bool {
	return c.Role == RoleNode || strings.HasPrefix(c.Subject, "node:")
}

// authorize checks that claims (nil: none were presented) may call
// procedure now: their role's access rule, a node's membership, and that
// an account and its session still stand.
func (a *Authenticator) authorize(ctx context.Context, procedure string, claims *auth.Claims) *connect.Error {
	if err := a.policy.Check(procedure, claims); err != nil {
		switch {
		case errors.Is(err, auth.ErrUnauthenticated):
			return connect.NewError(connect.CodeUnauthenticated, errors.New("this call needs an access token (Authorization: Bearer ...); log in first"))
		case errors.Is(err, auth.ErrPermissionDenied):
			return connect.NewError(connect.CodePermissionDenied, fmt.Errorf("role %q may not call %s", claims.Role, procedure))
		default:
			return connect.NewError(connect.CodeInternal, fmt.Errorf("no access rule for %s: %w", procedure, err))
		}
	}
	if id, ok := strings.CutPrefix(claims.Subject, "node:"); ok && a.policy.MembersOnly[procedure] && !a.node.HasMember(id) {
		// It holds the cluster's keys (a token it minted) or certificate,
		// but the cluster removed it.
		return connect.NewError(connect.CodePermissionDenied, fmt.Errorf("node %q is not a member of this cluster and may not call %s", id, procedure))
	}
	if !isNode(claims) {
		if err := a.accountValid(ctx, *claims); err != nil {
			return connect.NewError(connect.CodeUnauthenticated, err)
		}
	}
	return nil
}

// vouch tells the API port's bound on connections (connbound) who called
// on this one, once the call passed every check: an edge's or a node's
// connection, and one an edge passes its browser pages' calls on (its
// token in Relay-Forwarded-By), is trusted, out of reach of anyone
// else's floods; anyone else's is bounded per account. The first call
// that passed decides, but for a trusted caller's coming later.
func (a *Authenticator) vouch(ctx context.Context, claims auth.Claims, h http.Header) {
	c, ok := connbound.FromContext(ctx)
	if !ok {
		return
	}
	st := c.State()
	if st == connbound.Trusted || st == connbound.Closed {
		return
	}
	if claims.Role == auth.RoleEdge || claims.Role == RoleNode || strings.HasPrefix(claims.Subject, "node:") {
		c.Trust()
		return
	}
	if st != connbound.Pending {
		return
	}
	if h.Get(ForwardedByHeader) != "" {
		if _, ok := a.forwardedFor(ctx, h); ok {
			c.Trust()
			return
		}
	}
	c.Vouch(claims.Subject)
}

// WrapUnary checks unary calls, and keeps the cluster's inside out of
// the failures it answers a caller who is not the cluster's own
// (shield).
func (a *Authenticator) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if req.Spec().IsClient {
			return next(ctx, req)
		}
		actx, err := a.authenticate(ctx, req.Spec().Procedure, req.Header())
		if err != nil {
			return nil, shield(ctx, req.Header(), err)
		}
		if actx, err = withIdempotencyKey(actx, req.Spec().Procedure, req.Header(), req.Any()); err != nil {
			return nil, shield(ctx, req.Header(), err)
		}
		resp, err := next(actx, req)
		return resp, shield(actx, req.Header(), err)
	}
}

// WrapStreamingClient passes client streams through.
func (a *Authenticator) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

// WrapStreamingHandler checks streaming calls, and keeps checking while
// a stream lasts: it ends, unauthenticated, when the account or session
// behind it is gone, as a unary call made then would be refused, and
// when its access token expires unless the policy lets it outlive its
// token (a Backup). (A Watch stream
// carries the session keys: revoking an edge's account must stop it,
// not only its next call.) Its failures are shielded as a unary call's.
func (a *Authenticator) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	serve := a.serveStream(next)
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		actx, err := a.authenticate(ctx, conn.Spec().Procedure, conn.RequestHeader())
		if err != nil {
			return shield(ctx, conn.RequestHeader(), err)
		}
		return shield(actx, conn.RequestHeader(), serve(actx, conn))
	}
}

// serveStream serves an authenticated stream, ending it when its
// credentials lapse: it cancels the context it passes on, with the
// reason. connect's ServerStream.Send does not look at that context, so
// a handler that sends on and on must (the Watch's sends do): it then
// ends at its next message, and is answered Unauthenticated here.
func (a *Authenticator) serveStream(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		claims, ok := auth.ClaimsFrom(ctx)
		if !ok || isNode(&claims) {
			return next(ctx, conn)
		}
		ctx, end := context.WithCancelCause(ctx)
		defer end(nil) // ends recheck
		expires := !a.policy.OutliveToken[conn.Spec().Procedure]
		if !a.streams.start(ctx, end, func() { a.recheck(ctx, end, claims, expires) }) {
			return connect.NewError(connect.CodeUnavailable, errNodeStopping)
		}
		err := next(ctx, conn)
		if errors.Is(context.Cause(ctx), errNodeStopping) {
			return connect.NewError(connect.CodeUnavailable, errNodeStopping)
		}
		if cause := context.Cause(ctx); errors.Is(cause, errTokenExpired) || errors.Is(cause, errAccountGone) || errors.Is(cause, errSessionGone) {
			ce := connect.NewError(connect.CodeUnauthenticated, cause)
			if errors.Is(cause, errTokenExpired) {
				ce.Meta().Set(StreamEndHeader, StreamEndTokenExpired)
			}
			return ce
		}
		return err
	}
}

// StreamEndHeader, set to StreamEndTokenExpired in the error metadata of
// a stream ended because its access token expired, tells a watcher to
// call again at once with a fresh token (edge/directory does): the
// expiry is routine, not a failure to back off from.
const (
	StreamEndHeader       = "Relay-Stream-End"
	StreamEndTokenExpired = "token-expired"
)

// streamSet is the streams open through the authenticator, each with
// the goroutine that rechecks its credentials.
type streamSet struct {
	mu      sync.Mutex // guards stopped and ends; wg.Add under it
	stopped bool
	ends    map[context.Context]context.CancelCauseFunc
	wg      sync.WaitGroup
}

// start runs recheck for the stream whose context is ctx (end ends it)
// until ctx ends, or reports false once stop began.
func (s *streamSet) start(ctx context.Context, end context.CancelCauseFunc, recheck func()) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return false
	}
	if s.ends == nil {
		s.ends = map[context.Context]context.CancelCauseFunc{}
	}
	s.ends[ctx] = end
	s.wg.Go(func() {
		recheck()
		s.mu.Lock()
		delete(s.ends, ctx)
		s.mu.Unlock()
	})
	return true
}

// errNodeStopping ends the streams of a node that stops.
var errNodeStopping = errors.New("this control node is shutting down; call another")

// StopStreams ends every stream open through the authenticator and
// waits for their credential checks to end, so that none reads the state
// after the node closed it. New streams are refused from here on. The
// control node calls it once its API no longer takes requests.
func (a *Authenticator) StopStreams() {
	s := &a.streams
	s.mu.Lock()
	s.stopped = true
	for _, end := range s.ends {
		end(errNodeStopping)
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// errTokenExpired ends a stream whose access token expired.
var errTokenExpired = errors.New("the access token of this stream expired; call again with a fresh one")

// recheck ends a stream (end, with the reason) when claims' token
// expires (if expires), or when a look at the account and session every
// StreamRecheckEvery finds them gone, until ctx ends.
func (a *Authenticator) recheck(ctx context.Context, end context.CancelCauseFunc, claims auth.Claims, expires bool) {
	var expiry <-chan time.Time
	if expires {
		t := time.NewTimer(claims.ExpiresAt.Add(a.cfg.Leeway).Sub(a.cfg.Now()))
		defer t.Stop()
		expiry = t.C
	}
	tick := time.NewTicker(a.cfg.StreamRecheckEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-expiry:
			end(errTokenExpired)
			return
		case <-tick.C:
			if ctx.Err() != nil {
				return // the stream ended as the tick came
			}
			if err := a.accountValid(ctx, claims); err != nil && ctx.Err() == nil {
				end(err)
				return
			}
		}
	}
}

// RunActivity writes throttled API activity (users' last_activity) in
// batches until ctx ends. The control node runs it for its whole life.
func (a *Authenticator) RunActivity(ctx context.Context) {
	t := time.NewTicker(a.cfg.ActivityEvery / 4)
	defer t.Stop()
	apply := func(ctx context.Context, entries []*statev1.Activity) error {
		actx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		_, err := a.node.Apply(actx, &statev1.Command{Op: &statev1.Command_RecordActivity{
			RecordActivity: &statev1.RecordActivity{Entries: entries}}})
		if errors.Is(err, fsm.ErrNotFound) {
			return nil // a user deleted meanwhile: nothing to keep
		}
		return err
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		a.activity.flush(ctx, a.cfg.Now(), apply)
	}
}

// activityThrottle remembers, per user, the last activity time not yet
// written and when it was last written, so that reads cause at most one
// write per user per interval.
type activityThrottle struct {
	every   time.Duration
	batch   int        // users per RecordActivity command
	mu      sync.Mutex // guards the maps below
	written map[string]time.Time
	pending map[string]time.Time
}

func newActivityThrottle(every time.Duration) *activityThrottle {
	return &activityThrottle{every: every, batch: fsm.MaxActivityBatch, written: map[string]time.Time{}, pending: map[string]time.Time{}}
}

func (t *activityThrottle) touch(uid string, now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if last, ok := t.written[uid]; ok && now.Sub(last) < t.every {
		return
	}
	t.pending[uid] = now
}

// flush writes what drain returns through apply, at most
// fsm.MaxActivityBatch users per command (a larger one is refused
// whole). The users of a batch that failed are pending again, unless
// they came back meanwhile: activity is advisory, but a failed write
// must not silence a user until their next call.
func (t *activityThrottle) flush(ctx context.Context, now time.Time, apply func(context.Context, []*statev1.Activity) error) {
	batch := t.drain(now)
	entries := make([]*statev1.Activity, 0, len(batch))
	for uid, at := range batch {
		entries = append(entries, &statev1.Activity{UserId: uid, SeenAtMs: at.UnixMilli()})
	}
	for len(entries) > 0 && ctx.Err() == nil {
		n := min(len(entries), t.batch)
		if err := apply(ctx, entries[:n]); err != nil {
			t.mu.Lock()
			for _, e := range entries { // this batch and those not tried
				if _, ok := t.pending[e.GetUserId()]; !ok {
					t.pending[e.GetUserId()] = batch[e.GetUserId()]
				}
			}
			t.mu.Unlock()
			return
		}
		entries = entries[n:]
	}
}

func (t *activityThrottle) drain(now time.Time) map[string]time.Time {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := t.pending
	t.pending = map[string]time.Time{}
	for uid, at := range out {
		t.written[uid] = at
	}
	// Forget users whose window has passed, so the map stays bounded by
	// the users active in one interval.
	for uid, at := range t.written {
		if now.Sub(at) > 2*t.every {
			delete(t.written, uid)
		}
	}
	return out
}

// nodeTokenTTL is the lifetime of the tokens nodes mint for each other.
const nodeTokenTTL = 5 * time.Minute

type nodeToken struct {
	mu  sync.Mutex // guards tok, kid and exp
	tok string
	kid string // the signing key's id
	exp time.Time
}

// NodeToken returns a short-lived token that identifies this node to the
// others (role node), minted with the cluster's current signing key and
// cached until shortly before it expires or the current key changes: a
// key rotated out is honoured only for AccessTTL + Leeway, so a token of
// it must not outlive that (nor, with it, every forwarded call).
func (a *Authenticator) NodeToken() (string, error) {
	// The current key's id only: building the key (its private half from
	// the seed) is for minting, not for every forwarded call.
	_, cur, err := a.node.FSM().SigningKeys()
	if err != nil {
		return "", err
	}
	a.nodeTok.mu.Lock()
	defer a.nodeTok.mu.Unlock()
	now := a.cfg.Now()
	if a.nodeTok.tok != "" && a.nodeTok.kid == cur && now.Add(a.nodeTokenTTL()/5).Before(a.nodeTok.exp) {
		return a.nodeTok.tok, nil
	}
	key, err := a.keys.Current()
	if err != nil {
		return "", err
	}
	exp := now.Add(a.nodeTokenTTL())
	tok, err := auth.Sign(key, auth.Claims{
		Issuer: a.cfg.Issuer, Audience: a.cfg.Audience, Subject: "node:" + a.node.ID(),
		Role: RoleNode, IssuedAt: now, NotBefore: now, ExpiresAt: exp, ID: newID("nt"),
	})
	if err != nil {
		return "", err
	}
	a.nodeTok.tok, a.nodeTok.kid, a.nodeTok.exp = tok, key.ID, exp
	return tok, nil
}

// nodeTokenTTL is nodeTokenTTL, or AccessTTL when shorter: a node token
// lives no longer than the grace of the key that signed it.
func (a *Authenticator) nodeTokenTTL() time.Duration { return min(nodeTokenTTL, a.cfg.AccessTTL) }
