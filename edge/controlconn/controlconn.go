// Package controlconn is the edge's link to the control plane: HTTP
// clients for the control nodes' API URLs (failing over between them),
// and the edge's credential, logged in once and refreshed before it
// expires. The edge talks to the control plane only through the
// generated Connect clients this package hands out.
package controlconn

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/time/rate"

	"github.com/edge-relay/relay/internal/gzipbound"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
)

// Config configures a Conn.
type Config struct {
	// URLs of control nodes' APIs (http:// for cleartext HTTP/2, or
	// https://); at least one.
	URLs []string
	// TLS for https URLs (RootCAs to trust the cluster's certificates);
	// nil uses the system roots.
	TLS *tls.Config
	// Login and Password are the edge's credential: an account with the
	// edge role.
	Login, Password string
	// Options apply to every Connect client (tracing, for one).
	Options []connect.ClientOption
	// Logger for what the edge's callers do not see (a console call that
	// could not be passed on); nil discards it.
	Logger *slog.Logger
	// DialTimeout bounds each TCP connection attempt [500ms]. An attempt
	// that gets no answer (the control plane cut off by a partition) is
	// given up and made again, which, right after the network heals,
	// connects sooner than the kernel's SYN retransmission would.
	DialTimeout time.Duration
	// PingAfter is how long a connection may stay silent before the edge
	// checks it with an HTTP/2 ping, and PingTimeout how long the answer
	// may take before the connection counts as dead and every stream on
	// it (the watch feed) fails [2s, 1s]. Without it, a stream over a
	// connection that a partition cut hangs until TCP gives up, minutes
	// later, and resumes only as TCP's backed-off retransmissions allow.
	PingAfter, PingTimeout time.Duration
	// Start is the index of the URL the Conn uses first (modulo their
	// number): edges that list the same control nodes start at different
	// ones instead of all at the first.
	Start int
	// Now is the edge's clock [time.Now]; tests set one that is off the
	// control plane's.
	Now func() time.Time
}

// MaxResponseBytes bounds one message a control node sends the edge, as
// sent and once decompressed. The largest the control plane sends is a
// mailbox page: at most 256 entries and 1 MiB of events
// (fsm.MaxMailboxPageBytes) with their ids; anything larger is refused
// (resource_exhausted) before it is all in memory, whatever the node
// that sent it.
const MaxResponseBytes = 8 << 20

// Conn is safe for concurrent use.
type Conn struct {
	cfg   Config
	http  *http.Client
	peers map[string]*peer // by URL; built once, read-only
	// proxyFailLog lets through one "console API call not passed on"
	// line every 10 s: anyone on the internet can make those calls.
	proxyFailLog rate.Sometimes

	mu      sync.Mutex // guards the fields below
	next    int        // index of the URL to use
	access  string
	expires time.Time
	refresh string
	// abandoned is a refresh token given up after a refresh failed in a
	// way that may have rotated it: its session is ended with the next
	// log-in's access token (endAbandoned), or by Logout.
	abandoned string
	// watchURL is where the last watch stream went, watchAuth the
	// Authorization it carried.
	watchURL, watchAuth string

	// tokenFailed is when the last attempt to get a token failed, and
	// tokenErr why; a success clears them.
	tokenFailed time.Time
	tokenErr    error
	// attempt is the log-in or refresh under way, if any: callers wait
	// for it, or for their own ctx, and share its outcome.
	attempt *tokenAttempt
	closed  bool

	// ctx ends an attempt under way when the Conn closes; attempts
	// counts those running.
	ctx      context.Context
	cancel   context.CancelFunc
	attempts sync.WaitGroup
}

// tokenAttempt is one log-in or refresh; done is closed once tok and err
// are set.
type tokenAttempt struct {
	done chan struct{}
	tok  string
	err  error
}

// New checks the configuration and builds the HTTP client; it does not
// connect yet.
func New(cfg Config) (*Conn, error) {
	if len(cfg.URLs) == 0 || cfg.Login == "" || cfg.Password == "" {
		return nil, errors.New("controlconn: URLs, Login and Password are required")
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = 500 * time.Millisecond
	}
	if cfg.PingAfter <= 0 {
		cfg.PingAfter = 2 * time.Second
	}
	if cfg.PingTimeout <= 0 {
		cfg.PingTimeout = time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	dialer := &net.Dialer{Timeout: cfg.DialTimeout, KeepAlive: 15 * time.Second}
	tr := &http.Transport{ForceAttemptHTTP2: true, MaxIdleConnsPerHost: 4, IdleConnTimeout: 90 * time.Second,
		DialContext: dialer.DialContext, TLSHandshakeTimeout: 10 * time.Second,
		HTTP2: &http.HTTP2Config{SendPingTimeout: cfg.PingAfter, PingTimeout: cfg.PingTimeout}}
	// HTTP/2 everywhere, so the health pings above apply: over TLS by
	// ALPN, on http:// URLs with prior knowledge (net/http speaks that
	// only when HTTP/1 is off; with both, http:// goes over HTTP/1 and a
	// cut connection goes unnoticed). HTTP/1 stays on only when every URL
	// is https:// (one transport serves all URLs, so a mix of http:// and
	// https:// needs control nodes that speak HTTP/2 over TLS, as relayd
	// does).
	var p http.Protocols
	p.SetHTTP2(true)
	plain := false
	for i, u := range cfg.URLs {
		u = strings.TrimRight(u, "/")
		cfg.URLs[i] = u
		switch {
		case strings.HasPrefix(u, "http://"):
			plain = true
		case strings.HasPrefix(u, "https://"):
		default:
			return nil, fmt.Errorf("controlconn: %q is not an http:// or https:// URL", u)
		}
	}
	p.SetUnencryptedHTTP2(plain)
	p.SetHTTP1(!plain) // every URL is https:// (there is at least one)
	tr.Protocols = &p
	if cfg.TLS != nil {
		tr.TLSClientConfig = cfg.TLS.Clone()
	}
	c := &Conn{cfg: cfg, http: &http.Client{Transport: tr}, peers: map[string]*peer{},
		proxyFailLog: rate.Sometimes{Interval: 10 * time.Second}}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.next = ((cfg.Start % len(cfg.URLs)) + len(cfg.URLs)) % len(cfg.URLs)
	opts := append(slices.Clip(cfg.Options),
		connect.WithReadMaxBytes(MaxResponseBytes),
		connect.WithAcceptCompression("gzip", gzipbound.Decompressor(MaxResponseBytes), gzipbound.Compressor))
	for _, u := range cfg.URLs {
		c.peers[u] = &peer{
			auth:     controlv1connect.NewAuthServiceClient(c.http, u, opts...),
			edges:    edgev1connect.NewEdgeServiceClient(c.http, u, opts...),
			mailbox:  edgev1connect.NewMailboxServiceClient(c.http, u, opts...),
			activity: edgev1connect.NewActivityServiceClient(c.http, u, opts...),
			watch:    edgev1connect.NewWatchServiceClient(c.http, u, opts...),
		}
	}
	return c, nil
}

// peer holds the Connect clients of one control node, built once.
type peer struct {
	auth     controlv1connect.AuthServiceClient
	edges    edgev1connect.EdgeServiceClient
	mailbox  edgev1connect.MailboxServiceClient
	activity edgev1connect.ActivityServiceClient
	watch    edgev1connect.WatchServiceClient
}

// Logout ends the edge's session on the control plane: its refresh
// token and its access tokens stop working on every control node. An
// edge that stops without it leaves its login live until the refresh
// token expires (30 days by default), one more with each restart. It
// waits for a log-in or refresh under way (so as to end the session that
// one leaves), also ends a session given up that no log-in has ended yet
// (see Conn.abandoned), moves to the next control node only while one is
// unavailable, and leaves the Conn unable to log in again: call it last,
// before Close. With no session to end
// (none opened, or it was refused) it returns nil at once; one whose
// access token has lapsed (the edge made no call for its lifetime) is
// left to expire.
func (c *Conn) Logout(ctx context.Context) error {
	c.mu.Lock()
	c.closed = true
	a := c.attempt
	c.mu.Unlock()
	if a != nil {
		select {
		case <-a.done:
		case <-ctx.Done():
			return fmt.Errorf("log out of the control plane: %w", ctx.Err())
		}
	}
	c.mu.Lock()
	access, expires, refresh, abandoned := c.access, c.expires, c.refresh, c.abandoned
	c.access, c.refresh, c.abandoned = "", "", ""
	c.mu.Unlock()
	if refresh == "" && abandoned == "" {
		return nil
	}
	if access == "" || !c.cfg.Now().Before(expires) {
		c.cfg.Logger.Info("no access token left to log out with; the edge's session ends when its refresh token expires")
		return nil
	}
	var errs []error
	if refresh != "" {
		// Refused, the access token's session has ended already (and
		// with it refresh's): nothing is left to end.
		if err := c.endSession(ctx, access, refresh); err != nil && connect.CodeOf(err) != connect.CodeUnauthenticated {
			errs = append(errs, err)
		}
	}
	if abandoned != "" {
		if err := c.endSession(ctx, access, abandoned); err != nil {
			errs = append(errs, fmt.Errorf("the session given up: %w", err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("log out of the control plane: %w", err)
	}
	return nil
}

// logoutAttemptTimeout bounds one control node's answer to a logout (a
// linearizable read and a Raft write).
const logoutAttemptTimeout = 2 * time.Second

// endSession ends the session refresh belongs to, with access, an access
// token of the edge's account: through the current control node, then
// the others while a node is unavailable or does not answer within
// logoutAttemptTimeout. A session the control plane does not know (ended
// already) counts as ended.
func (c *Conn) endSession(ctx context.Context, access, refresh string) error {
	var err error
	for range len(c.cfg.URLs) {
		u := c.url()
		req := connect.NewRequest(&controlv1.LogoutRequest{RefreshToken: refresh})
		req.Header().Set("Authorization", "Bearer "+access)
		// A node that does not answer (paused, cut off) does not hold
		// the whole of ctx: the next one is tried.
		actx, cancel := context.WithTimeout(ctx, logoutAttemptTimeout)
		_, err = c.peers[u].auth.Logout(actx, req)
		cancel()
		switch {
		case connect.CodeOf(err) == connect.CodeNotFound:
			return nil
		case err == nil || !nodeFailed(err) || ctx.Err() != nil:
			return err
		}
		c.moveOn(u)
	}
	return err
}

// Close ends a log-in or refresh under way, waits for it, and releases
// idle connections.
func (c *Conn) Close() {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.cancel()
	c.attempts.Wait()
	c.http.CloseIdleConnections()
}

// url returns the URL to use now; failover moves to the next.
func (c *Conn) url() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cfg.URLs[c.next%len(c.cfg.URLs)]
}

// failover moves to the next URL after a call to u failed in a way that
// another node may not.
func (c *Conn) failover(u string, err error) {
	if nodeFailed(err) {
		c.moveOn(u)
	}
}

// nodeFailed reports whether a call failed in a way that another control
// node may not.
func nodeFailed(err error) bool {
	if err == nil {
		return false
	}
	switch connect.CodeOf(err) {
	case connect.CodeUnavailable, connect.CodeUnknown, connect.CodeDeadlineExceeded, connect.CodeInternal:
		return true
	}
	return false
}

// tokenTimeout bounds one attempt to log in or refresh the token, which
// shares it between the control nodes it asks (newToken).
const tokenTimeout = 10 * time.Second

// validToken returns the access token while it has more than a minute
// left.
func (c *Conn) validToken() (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.access, c.validLocked()
}

// validLocked is validToken's test; c.mu is held.
func (c *Conn) validLocked() bool {
	return c.access != "" && c.expires.Sub(c.cfg.Now()) > time.Minute
}

// localExpiry is when an access token received at received expires by
// the edge's clock: received plus its lifetime (its exp less its iat,
// both the control node's clock), so that an edge whose clock is off the
// control plane's still uses a token for its lifetime. (Against the
// control node's absolute expiry, an edge a quarter of an hour ahead
// took every token for expired on arrival and asked for a new one, a
// Raft write, at every call.) A token whose claims cannot be read (it
// is opaque to the edge) keeps the control node's expiry.
func localExpiry(access string, serverExpiry, received time.Time) time.Time {
	parts := strings.Split(access, ".")
	if len(parts) != 3 {
		return serverExpiry
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return serverExpiry
	}
	var claims struct {
		IssuedAt  int64 `json:"iat"`
		ExpiresAt int64 `json:"exp"`
	}
	if json.Unmarshal(payload, &claims) != nil || claims.ExpiresAt <= claims.IssuedAt || claims.IssuedAt <= 0 {
		return serverExpiry
	}
	return received.Add(time.Duration(claims.ExpiresAt-claims.IssuedAt) * time.Second)
}

// Token returns a valid access token of the edge's account, logging in
// or refreshing as needed. One attempt at a time talks to the control
// plane for it, on a goroutine of the Conn's, so that no caller's
// context can cut a refresh short after the control plane rotated the
// token (the edge would then present the old one again, which the
// control plane takes for a stolen token's reuse and revokes the
// edge's login); callers wait for that attempt's outcome or for their
// own ctx. Nothing else waits on it: c.mu is not held across the calls.
func (c *Conn) Token(ctx context.Context) (string, error) {
	if tok, ok := c.validToken(); ok {
		return tok, nil
	}
	a := c.startAttempt()
	select {
	case <-a.done:
		return a.tok, a.err
	case <-ctx.Done():
		return "", fmt.Errorf("log in to the control plane: %w", ctx.Err())
	}
}

// startAttempt returns the attempt under way, or starts one.
func (c *Conn) startAttempt() *tokenAttempt {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.attempt != nil {
		return c.attempt
	}
	a := &tokenAttempt{done: make(chan struct{})}
	switch {
	case c.closed:
		a.err = errors.New("log in to the control plane: the connection is closed")
		close(a.done)
		return a
	case c.validLocked():
		a.tok = c.access // an attempt ended since the caller looked
		close(a.done)
		return a
	}
	c.attempt = a
	c.attempts.Add(1)
	go func() {
		defer c.attempts.Done()
		ctx, cancel := context.WithTimeout(c.ctx, tokenTimeout)
		defer cancel()
		a.tok, a.err = c.newToken(ctx)
		if a.err == nil {
			// Before its callers go on, so that a Logout waiting for
			// this attempt finds the session given up either ended or
			// back in c.abandoned.
			c.endAbandoned(ctx, a.tok)
		}
		c.mu.Lock()
		c.attempt = nil
		switch {
		case a.err == nil:
			c.tokenFailed, c.tokenErr = time.Time{}, nil
		case c.ctx.Err() == nil:
			// The control plane refused, or did not answer within
			// tokenTimeout; not the Conn closing.
			c.tokenFailed, c.tokenErr = time.Now(), a.err
		}
		c.mu.Unlock()
		close(a.done)
	}()
	return a
}

// endAbandoned ends the session of a refresh token given up, if any (see
// Conn.abandoned), with access, the new log-in's access token. When no
// control node answers, the token is kept for the next log-in or
// refresh, or the Logout, to try again; when the control plane refuses,
// that session is left to expire with its refresh token.
func (c *Conn) endAbandoned(ctx context.Context, access string) {
	c.mu.Lock()
	abandoned := c.abandoned
	c.abandoned = ""
	c.mu.Unlock()
	if abandoned == "" {
		return
	}
	err := c.endSession(ctx, access, abandoned)
	switch {
	case err == nil:
	case nodeFailed(err) || ctx.Err() != nil:
		c.mu.Lock()
		if c.abandoned == "" {
			c.abandoned = abandoned
		}
		c.mu.Unlock()
	default:
		c.cfg.Logger.Info("could not end the session of a refresh token given up; it ends when that token expires", "err", err)
	}
}

// newToken logs in or refreshes, trying each URL once; one runs at a
// time (startAttempt). Each URL gets its share of what is left of ctx
// (nodeShare): a node that takes the connection and never answers (a
// process stopped behind TLS, a Login handler that hangs) costs the
// attempt that share, not all of it, so the nodes after it are still
// asked, and the next attempt starts past it. A node is moved on from
// only once it was asked and failed within its share: nodes the attempt
// had no time left for, or a call the Conn's closing cut short, say
// nothing about the node.
func (c *Conn) newToken(ctx context.Context) (string, error) {
	c.mu.Lock()
	refresh := c.refresh
	c.mu.Unlock()
	var lastErr error
	for left := len(c.cfg.URLs); left > 0; left-- {
		if ctx.Err() != nil {
			break
		}
		u := c.url()
		nctx, cancel := nodeShare(ctx, left)
		tokens, elsewhere, err := c.tokensFrom(nctx, u, &refresh)
		cancel()
		switch {
		case err == nil:
			c.mu.Lock()
			c.access, c.refresh = tokens.GetAccessToken(), tokens.GetRefreshToken()
			c.expires = localExpiry(c.access, tokens.GetAccessTokenExpiresAt().AsTime(), c.cfg.Now())
			c.mu.Unlock()
			return tokens.GetAccessToken(), nil
		case !elsewhere:
			return "", err
		}
		lastErr = err
		if c.ctx.Err() != nil {
			break // the Conn is closing: the node was cut short, not failed
		}
		c.moveOn(u)
	}
	if lastErr == nil {
		lastErr = ctx.Err()
	}
	return "", fmt.Errorf("log in to the control plane: %w", lastErr)
}

// nodeShare bounds one control node's part of a token attempt: what is
// left of ctx split evenly between the left nodes still to ask. A log-in
// costs a node tens of milliseconds (its password hash), so even five
// nodes' shares of tokenTimeout leave each plenty; and a node that
// answers at once leaves its share to the nodes after it.
func nodeShare(ctx context.Context, left int) (context.Context, context.CancelFunc) {
	deadline, ok := ctx.Deadline()
	if !ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, time.Until(deadline)/time.Duration(left))
}

// tokensFrom refreshes *refresh (when set) or logs in at the control
// node u. A refresh token that fails is never presented again (it is
// cleared, and *refresh with it); unless it was refused, a log-in at the
// next node replaces it, else a log-in here. elsewhere reports whether
// another node may answer err differently: not when the edge's
// credential was refused, nor for an account of another role.
func (c *Conn) tokensFrom(ctx context.Context, u string, refresh *string) (tokens *controlv1.Tokens, elsewhere bool, err error) {
	auth := c.peers[u].auth
	if *refresh != "" {
		resp, err := auth.Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: *refresh}))
		if err == nil {
			tokens = resp.Msg.GetTokens()
		} else {
			// Refused, or perhaps rotated with the answer lost (a
			// timeout, a connection cut, a node that stopped after
			// proposing it): presenting the token again could be
			// taken for a stolen token's reuse and revoke the login.
			// It is never presented again; a log-in replaces it.
			// Unless it was refused, the session it belongs to is
			// ended once a new log-in succeeds (endAbandoned).
			refused := connect.CodeOf(err) == connect.CodeUnauthenticated
			c.mu.Lock()
			c.refresh = ""
			if !refused {
				c.abandoned = *refresh
			}
			c.mu.Unlock()
			*refresh = ""
			if !refused {
				return nil, true, err
			}
		}
	}
	if tokens == nil {
		resp, err := auth.Login(ctx, connect.NewRequest(&controlv1.LoginRequest{Login: c.cfg.Login, Password: c.cfg.Password}))
		if err != nil {
			if connect.CodeOf(err) == connect.CodeUnauthenticated || connect.CodeOf(err) == connect.CodePermissionDenied {
				return nil, false, fmt.Errorf("edge credential refused: %w", err)
			}
			return nil, true, err
		}
		tokens = resp.Msg.GetTokens()
	}
	if tokens.GetRole() != controlv1.Role_ROLE_EDGE {
		return nil, false, fmt.Errorf("account %q has role %s, not edge", c.cfg.Login, tokens.GetRole())
	}
	return tokens, false, nil
}

// proxyTokenBackoff is how long after a failed attempt to get a token
// the proxy answers callers at once instead of trying again: browser
// pages, many and anyone's, do not turn into a log-in attempt each.
const proxyTokenBackoff = time.Second

// proxyToken returns the token with which the proxy vouches for a
// caller: the edge's valid token, or a new one unless an attempt failed
// less than proxyTokenBackoff ago.
func (c *Conn) proxyToken(ctx context.Context) (string, error) {
	if tok, ok := c.validToken(); ok {
		return tok, nil
	}
	c.mu.Lock()
	failed, err := c.tokenFailed, c.tokenErr
	c.mu.Unlock()
	if err != nil && time.Since(failed) < proxyTokenBackoff {
		return "", err
	}
	return c.Token(ctx)
}

// moveOn moves to the next URL after u failed, unless another caller
// already did.
func (c *Conn) moveOn(u string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cfg.URLs[c.next%len(c.cfg.URLs)] == u {
		c.next++
	}
}

func (c *Conn) authorize(ctx context.Context, h http.Header) error {
	tok, err := c.Token(ctx)
	if err != nil {
		return err
	}
	h.Set("Authorization", "Bearer "+tok)
	return nil
}

// Watch is a WatchServiceClient that authenticates as the edge and fails
// over to the next control node when one is unavailable.
func (c *Conn) Watch() edgev1connect.WatchServiceClient { return watchClient{c} }

type watchClient struct{ c *Conn }

func (w watchClient) Watch(ctx context.Context, req *connect.Request[edgev1.WatchRequest]) (*connect.ServerStreamForClient[edgev1.WatchResponse], error) {
	if err := w.c.authorize(ctx, req.Header()); err != nil {
		return nil, err
	}
	u := w.c.url()
	w.c.mu.Lock()
	w.c.watchURL, w.c.watchAuth = u, req.Header().Get("Authorization")
	w.c.mu.Unlock()
	s, err := w.c.peers[u].watch.Watch(ctx, req)
	if err != nil {
		w.c.refused(req.Header().Get("Authorization"), err)
		w.c.failover(u, err)
	}
	return s, err
}

// StreamFailed tells the client how the last stream ended: a stream's
// error arrives with its messages, after Watch returned, so the caller
// reports it for the next Watch to go to another node when this one is
// unavailable.
func (w watchClient) StreamFailed(err error) {
	w.c.mu.Lock()
	u, auth := w.c.watchURL, w.c.watchAuth
	w.c.mu.Unlock()
	w.c.refused(auth, err)
	if u != "" {
		w.c.failover(u, err)
	}
}

// ReportActivity reports when devices were last seen.
func (c *Conn) ReportActivity(ctx context.Context, entries []*edgev1.Activity) error {
	_, err := call(ctx, c, &edgev1.ReportActivityRequest{Entries: entries}, func(p *peer, r *connect.Request[edgev1.ReportActivityRequest]) (*connect.Response[edgev1.ReportActivityResponse], error) {
		return p.activity.ReportActivity(ctx, r)
	})
	return err
}

// call runs one unary call with the edge's token against the current URL,
// failing over to the next URL for the next call when this one is down.
func call[Req, Resp any](ctx context.Context, c *Conn, msg *Req, do func(p *peer, req *connect.Request[Req]) (*connect.Response[Resp], error)) (*Resp, error) {
	req := connect.NewRequest(msg)
	if err := c.authorize(ctx, req.Header()); err != nil {
		return nil, err
	}
	u := c.url()
	resp, err := do(c.peers[u], req)
	if err != nil {
		c.refused(req.Header().Get("Authorization"), err)
		c.failover(u, err)
		return nil, err
	}
	return resp.Msg, nil
}

// refused forgets the access token an Authorization header carried when
// the control plane refused it (its session was revoked, or it expired
// on a stream): the next call refreshes or logs in again rather than
// present it until its expiry is near.
func (c *Conn) refused(authorization string, err error) {
	if connect.CodeOf(err) != connect.CodeUnauthenticated {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.access != "" && authorization == "Bearer "+c.access {
		c.access = ""
	}
}

// RegisterEdge registers the edge or renews its lease.
func (c *Conn) RegisterEdge(ctx context.Context, m *edgev1.RegisterEdgeRequest) (*edgev1.RegisterEdgeResponse, error) {
	return call(ctx, c, m, func(p *peer, r *connect.Request[edgev1.RegisterEdgeRequest]) (*connect.Response[edgev1.RegisterEdgeResponse], error) {
		return p.edges.RegisterEdge(ctx, r)
	})
}

// DeregisterEdge removes the edge from the member list if it still holds
// the id with meshKey (nil: whoever holds it).
func (c *Conn) DeregisterEdge(ctx context.Context, edgeID string, meshKey []byte) error {
	_, err := call(ctx, c, &edgev1.DeregisterEdgeRequest{EdgeId: edgeID, MeshPublicKey: meshKey}, func(p *peer, r *connect.Request[edgev1.DeregisterEdgeRequest]) (*connect.Response[edgev1.DeregisterEdgeResponse], error) {
		return p.edges.DeregisterEdge(ctx, r)
	})
	return err
}

// PutMailbox stores entries in mailboxes.
func (c *Conn) PutMailbox(ctx context.Context, entries []*edgev1.MailboxEntry) (*edgev1.PutMailboxResponse, error) {
	return call(ctx, c, &edgev1.PutMailboxRequest{Entries: entries}, func(p *peer, r *connect.Request[edgev1.PutMailboxRequest]) (*connect.Response[edgev1.PutMailboxResponse], error) {
		return p.mailbox.PutMailbox(ctx, r)
	})
}

// FetchMailbox reads a device's entries after a seq: at most limit, and
// at most maxBytes of events (at least one entry; 0: the control
// plane's page size).
func (c *Conn) FetchMailbox(ctx context.Context, deviceID string, after uint64, limit, maxBytes uint32) (*edgev1.FetchMailboxResponse, error) {
	return call(ctx, c, &edgev1.FetchMailboxRequest{DeviceId: deviceID, AfterSeq: after, Limit: limit, MaxBytes: maxBytes}, func(p *peer, r *connect.Request[edgev1.FetchMailboxRequest]) (*connect.Response[edgev1.FetchMailboxResponse], error) {
		return p.mailbox.FetchMailbox(ctx, r)
	})
}

// AckMailbox deletes delivered entries, by their seqs in history (the
// control plane refuses them in another: failed_precondition).
func (c *Conn) AckMailbox(ctx context.Context, deviceID, history string, seqs []uint64) error {
	_, err := call(ctx, c, &edgev1.AckMailboxRequest{DeviceId: deviceID, Seqs: seqs, History: history}, func(p *peer, r *connect.Request[edgev1.AckMailboxRequest]) (*connect.Response[edgev1.AckMailboxResponse], error) {
		return p.mailbox.AckMailbox(ctx, r)
	})
	return err
}

// ClaimEvents decides which devices take "any one" events.
func (c *Conn) ClaimEvents(ctx context.Context, claims []*edgev1.EventClaim) (*edgev1.ClaimEventsResponse, error) {
	return call(ctx, c, &edgev1.ClaimEventsRequest{Claims: claims}, func(p *peer, r *connect.Request[edgev1.ClaimEventsRequest]) (*connect.Response[edgev1.ClaimEventsResponse], error) {
		return p.mailbox.ClaimEvents(ctx, r)
	})
}

// Proxied reports whether the edge passes procedure (a path such as
// "/control.v1.AuthService/Login") on for browser pages (the device
// console): a user signs in, sees and manages its own devices, changes
// its password. The control plane authenticates and authorizes each call
// as usual; the list keeps staff and node procedures off the edges.
func Proxied(procedure string) bool {
	switch procedure {
	case "/control.v1.AuthService/Login", "/control.v1.AuthService/Refresh", "/control.v1.AuthService/Logout",
		"/control.v1.AuthService/ChangePassword",
		"/control.v1.UserService/GetMe",
		"/control.v1.DeviceService/RegisterDevice", "/control.v1.DeviceService/ListDevices",
		"/control.v1.DeviceService/RenameDevice", "/control.v1.DeviceService/RevokeDevice",
		"/control.v1.DeviceService/DeleteDevice":
		return true
	}
	return false
}

// maxProxiedBody bounds a proxied request's body.
const maxProxiedBody = 64 << 10

// proxyBodyTimeout bounds the reading of a proxied request's body.
const proxyBodyTimeout = 30 * time.Second

// The headers with which the edge vouches for a proxied caller's address
// (control/api.ForwardedForHeader and ForwardedByHeader; the edge does
// not link the control plane's packages).
const (
	forwardedForHeader = "Relay-Forwarded-For"
	forwardedByHeader  = "Relay-Forwarded-By"
)

// Proxy passes POSTs under prefix for the Proxied procedures to the
// control plane (the current URL) with the caller's own credentials.
// The edge adds only the caller's address, vouched for by its own token
// (control/api.ForwardedForHeader and ForwardedByHeader), so that login
// throttling counts each browser rather than the edge.
func (c *Conn) Proxy(prefix string) http.Handler {
	rp := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			u, err := url.Parse(c.url())
			if err != nil {
				u = &url.URL{Scheme: "http", Host: "invalid."} // answered by ErrorHandler
			}
			r.SetURL(u)
			r.Out.URL.Path = strings.TrimPrefix(r.In.URL.Path, prefix)
			r.Out.URL.RawPath = ""
			r.SetXForwarded()
			// Only this edge may vouch for an address. Set here, on the
			// outgoing request, after the proxy removed the hop-by-hop
			// headers: set on the incoming one, a caller's
			// "Connection: Relay-Forwarded-For" had them removed, and its
			// failed logins counted against the edge's own address.
			r.Out.Header.Del(forwardedForHeader)
			r.Out.Header.Del(forwardedByHeader)
			if v, ok := r.In.Context().Value(vouchKey{}).(vouch); ok {
				r.Out.Header.Set(forwardedForHeader, v.addr)
				r.Out.Header.Set(forwardedByHeader, "Bearer "+v.token)
			}
		},
		Transport: c.http.Transport,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			// The cause names the control plane's addresses: logged, not
			// told to the internet. r is the request to the control plane;
			// its address is logged on its own, as the transport's error
			// does not always name it ("client conn could not be
			// established" when a shared HTTP/2 dial failed).
			c.proxyFailLog.Do(func() {
				c.cfg.Logger.Warn("console API call not passed on: control plane unreachable (one line every 10 s at most)",
					"path", r.URL.Path, "control_plane", r.URL.Host, "err", err)
			})
			writeJSONError(w, http.StatusServiceUnavailable, "unavailable", "control plane unreachable; try again")
		},
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || !Proxied(strings.TrimPrefix(r.URL.Path, prefix)) {
			writeJSONError(w, http.StatusNotFound, "not_found", "not a procedure this edge passes on")
			return
		}
		host, _, err := net.SplitHostPort(r.RemoteAddr)
		if err != nil {
			writeJSONError(w, http.StatusBadRequest, "invalid_argument", "no caller address")
			return
		}
		// Without the edge's token the call would reach the control plane
		// unvouched, and every page behind this edge would share the
		// edge's address in login throttling and the unauthenticated
		// bounds: one page's failed logins would lock out all of them.
		tok, err := c.proxyToken(r.Context())
		if err != nil {
			if r.Context().Err() != nil {
				return // the caller went away
			}
			c.proxyFailLog.Do(func() {
				c.cfg.Logger.Warn("console API call not passed on: this edge has no token of its own to vouch for the caller (one line every 10 s at most)",
					"path", r.URL.Path, "control_plane", strings.TrimPrefix(strings.TrimPrefix(c.url(), "http://"), "https://"), "err", err)
			})
			w.Header().Set("Retry-After", "1")
			writeJSONError(w, http.StatusServiceUnavailable, "unavailable", "this edge cannot reach the control plane; try again")
			return
		}
		r = r.WithContext(context.WithValue(r.Context(), vouchKey{}, vouch{addr: host, token: tok}))
		r.Body = http.MaxBytesReader(w, r.Body, maxProxiedBody)
		// A body dripped in slowly must not hold the connection, and a
		// stream to the control plane, for long.
		_ = http.NewResponseController(w).SetReadDeadline(time.Now().Add(proxyBodyTimeout))
		rp.ServeHTTP(w, r)
	})
}

// vouch is the address the edge vouches for on a proxied call, with the
// token that vouches; it travels in the request's context (vouchKey) to
// the proxy's Rewrite.
type vouch struct{ addr, token string }

type vouchKey struct{}

// writeJSONError answers in the Connect protocol's JSON error shape.
func writeJSONError(w http.ResponseWriter, status int, code, msg string) {
	b, _ := json.Marshal(map[string]string{"code": code, "message": msg})
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}
