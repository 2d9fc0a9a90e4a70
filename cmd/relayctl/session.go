package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"connectrpc.com/connect"

	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

// savedTokens is what relayctl keeps per login between runs.
type savedTokens struct {
	AccessToken    string    `json:"access_token"`
	AccessExpires  time.Time `json:"access_expires"`
	RefreshToken   string    `json:"refresh_token"`
	RefreshExpires time.Time `json:"refresh_expires"`
	UserID         string    `json:"user_id"`
	// Role is the account's role as of the login or last refresh
	// ("admin", "user", ...; empty in caches of older releases).
	Role string `json:"role,omitempty"`
	// Members are the API base URLs of the cluster's other nodes as the
	// cluster last listed them (staff accounts only: users may not read
	// the member list); the tokens are used for those URLs too.
	// MemberIDs names the node behind each URL, the one logged in to
	// included, for messages.
	Members   []string          `json:"members,omitempty"`
	MemberIDs map[string]string `json:"member_ids,omitempty"`
}

// tokenStore is the token cache: one JSON file, mode 0600, in the user's
// config directory (RELAYCTL_CONFIG_DIR overrides), keyed by the server
// URL logged in to. Tokens go only to that URL and to the member URLs
// the cluster named when asked with them: a cluster has no id a client
// could check, and a URL merely claiming to be in the same cluster must
// not receive them.
type tokenStore struct {
	path string
}

func newTokenStore(getenv func(string) string) (*tokenStore, error) {
	dir := getenv("RELAYCTL_CONFIG_DIR")
	if dir == "" {
		base, err := os.UserConfigDir()
		if err != nil {
			return nil, fmt.Errorf("find config dir (set RELAYCTL_CONFIG_DIR): %w", err)
		}
		dir = filepath.Join(base, "relayctl")
	}
	return &tokenStore{path: filepath.Join(dir, "tokens.json")}, nil
}

func (s *tokenStore) load() (map[string]savedTokens, error) {
	b, err := os.ReadFile(s.path)
	if errors.Is(err, os.ErrNotExist) {
		return map[string]savedTokens{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read token cache: %w", err)
	}
	m := map[string]savedTokens{}
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("token cache %s is corrupt (delete it and log in again): %w", s.path, err)
	}
	return m, nil
}

// find returns the cached session for server: the one logged in to that
// URL, else one whose cluster lists it as a member.
func (s *tokenStore) find(server string) (*session, bool) {
	m, err := s.load()
	if err != nil {
		return nil, false
	}
	if t, ok := m[server]; ok {
		return &session{key: server, t: t}, true
	}
	for _, k := range sortedKeys(m) { // deterministic when several clusters list the URL
		if slices.Contains(m[k].Members, server) {
			return &session{key: k, t: m[k]}, true
		}
	}
	return nil, false
}

func sortedKeys(m map[string]savedTokens) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func (s *tokenStore) put(server string, t *savedTokens) error {
	m, err := s.load()
	if err != nil {
		m = map[string]savedTokens{}
	}
	if t == nil {
		delete(m, server)
	} else {
		m[server] = *t
	}
	if err := os.MkdirAll(filepath.Dir(s.path), 0o700); err != nil {
		return fmt.Errorf("create config dir: %w", err)
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	tmp := s.path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("write token cache: %w", err)
	}
	return os.Rename(tmp, s.path)
}

func fromTokens(t *controlv1.Tokens) *savedTokens {
	return &savedTokens{
		AccessToken: t.GetAccessToken(), AccessExpires: t.GetAccessTokenExpiresAt().AsTime(),
		RefreshToken: t.GetRefreshToken(), RefreshExpires: t.GetRefreshTokenExpiresAt().AsTime(),
		UserID: t.GetUserId(), Role: roleOf(t.GetRole()),
	}
}

// roleOf names a role as the cache keeps it; "" when unspecified.
func roleOf(r controlv1.Role) string {
	if r == controlv1.Role_ROLE_UNSPECIFIED {
		return ""
	}
	return roleName(r)
}

// session is the cached login this run uses.
type session struct {
	key string // the URL logged in to: its entry in the cache
	t   savedTokens
	// ended is why the session ended in this run (its refresh was
	// refused), for every later call of the run.
	ended error
}

// urls are the API URLs the session's tokens may go to.
func (s *session) urls() []string { return append([]string{s.key}, s.t.Members...) }

func (s *session) trusts(base string) bool { return s != nil && slices.Contains(s.urls(), base) }

// prepare resolves the session for the servers named, once per run: one
// logged in to (or listing as a member) one of them, else one whose
// cluster lists one of them now (it grew since the login). Then it asks
// the cluster for its member list, so that retries can go to every
// member.
func (a *app) prepare(ctx context.Context) {
	if a.prepared || a.envToken != "" || a.tokens == nil {
		return
	}
	a.prepared = true
	for _, s := range a.servers {
		if sess, ok := a.tokens.find(s); ok {
			a.sess = sess
			a.refreshMembers(ctx, a.sess, a.servers...)
			return
		}
	}
	// discover has just refreshed the session's members.
	a.sess = a.discover(ctx)
}

// discover looks for a cached session whose cluster now lists one of the
// servers among its members.
func (a *app) discover(ctx context.Context) *session {
	m, err := a.tokens.load()
	if err != nil {
		return nil
	}
	for _, k := range sortedKeys(m) {
		if t := m[k]; !t.accessFresh() && (t.RefreshToken == "" || time.Until(t.RefreshExpires) <= 0) {
			// Its next use presents an expired refresh token: done only
			// for the session a command names (a cluster that is gone
			// would make every run wait on it here).
			continue
		}
		sess := &session{key: k, t: m[k]}
		a.refreshMembers(ctx, sess, a.servers...)
		for _, s := range a.servers {
			if sess.trusts(s) {
				return sess
			}
		}
	}
	return nil
}

// refreshMembers asks the session's cluster (any member that answers)
// for its members and saves them. Only staff may read them; for anyone
// else, or when no member answers, the session stays as it is.
//
// A follower learns of a membership change after the leader does, so a
// member whose list names none of the servers in want (a node that has
// just joined) is not the last word: the others are asked too, and the
// first list that names one is kept (else the first answer).
func (a *app) refreshMembers(ctx context.Context, sess *session, want ...string) {
	tok, err := a.tokenOf(ctx, sess)
	if err != nil || tok == "" {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, min(a.timeout, 5*time.Second))
	defer cancel()
	var fallback []string             // the first answer's members, when it names none of want
	var fallbackIDs map[string]string // and their ids
	answered := false
	for _, base := range sess.urls() {
		req := connect.NewRequest(&controlv1.StatusRequest{})
		req.Header().Set("Authorization", "Bearer "+tok)
		resp, err := controlv1connect.NewClusterServiceClient(a.http, base).Status(ctx, req)
		if err != nil {
			if c := connect.CodeOf(err); c == connect.CodePermissionDenied || c == connect.CodeUnauthenticated {
				break
			}
			continue
		}
		members, ids := memberURLs(base, sess.key, resp.Msg.GetMembers())
		listed := len(want) == 0
		for _, w := range want {
			listed = listed || w == sess.key || ids[w] != ""
		}
		if listed {
			a.saveMembers(sess, members, ids)
			return
		}
		if !answered {
			answered, fallback, fallbackIDs = true, members, ids
		}
	}
	if answered {
		a.saveMembers(sess, fallback, fallbackIDs)
	}
}

// memberURLs turns a Status answer from base into the members' API URLs
// (with base's scheme; key, the session's own, left out) and each URL's
// node id.
func memberURLs(base, key string, ms []*controlv1.Member) ([]string, map[string]string) {
	scheme := base[:strings.Index(base, "://")+3]
	ids := map[string]string{}
	var members []string
	for _, m := range ms {
		if m.GetApiAddr() == "" {
			continue
		}
		u := scheme + m.GetApiAddr()
		ids[u] = m.GetId()
		if u != key {
			members = append(members, u)
		}
	}
	return members, ids
}

// saveMembers records a cluster's member list in the session, and in the
// token cache when it changed.
func (a *app) saveMembers(sess *session, members []string, ids map[string]string) {
	if !slices.Equal(members, sess.t.Members) || !maps.Equal(ids, sess.t.MemberIDs) {
		sess.t.Members, sess.t.MemberIDs = members, ids
		_ = a.tokens.put(sess.key, &sess.t)
	}
}

// accessToken returns a valid access token for this run (refreshing and
// saving it when it is about to expire), "" when not logged in.
// RELAYCTL_TOKEN, when set, is used as is.
func (a *app) accessToken(ctx context.Context) (string, error) {
	if a.envToken != "" {
		return a.envToken, nil
	}
	a.prepare(ctx)
	if a.sess == nil {
		return "", nil
	}
	return a.tokenOf(ctx, a.sess)
}

// accessMargin: an access token that expires sooner is refreshed first.
const accessMargin = 30 * time.Second

// accessFresh reports whether the access token is used as it is (it
// expires later than accessMargin from now).
func (t *savedTokens) accessFresh() bool { return time.Until(t.AccessExpires) > accessMargin }

// tokenOf returns a valid access token of a session, refreshing it
// through any of its members when it is about to expire.
func (a *app) tokenOf(ctx context.Context, sess *session) (string, error) {
	t := sess.t
	if t.accessFresh() {
		return t.AccessToken, nil
	}
	if sess.ended != nil {
		return "", sess.ended
	}
	if t.RefreshToken == "" {
		// Unauthenticated: not retried on another member, as no member
		// would take it.
		return "", connect.NewError(connect.CodeUnauthenticated, errors.New("your session has expired: run relayctl login"))
	}
	// Presented even past its expiry: the cluster keeps a rotated token
	// until its login ends, so if someone refreshed this one first (a
	// copy of the token cache), presenting it ends their session too and
	// says so; otherwise it is refused as expired, as it would be here.
	var resp *connect.Response[controlv1.RefreshResponse]
	// A refresh token is single-use: a refresh is repeated only when it
	// cannot have reached a node.
	err := a.callOn(ctx, sess.urls(), "refresh session", retryIfNotSent, func(ctx context.Context, base string) (err error) {
		resp, err = controlv1connect.NewAuthServiceClient(a.http, base).Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: t.RefreshToken}))
		return err
	})
	if err != nil {
		if connect.CodeOf(err) == connect.CodeUnauthenticated {
			_ = a.tokens.put(sess.key, nil)
			sess.ended = connect.NewError(connect.CodeUnauthenticated, fmt.Errorf("your session ended (%v): run relayctl login", err))
			return "", sess.ended
		}
		return "", err
	}
	nt := fromTokens(resp.Msg.GetTokens())
	nt.Members, nt.MemberIDs = t.Members, t.MemberIDs
	if err := a.tokens.put(sess.key, nt); err != nil {
		return "", err
	}
	sess.t = *nt
	return nt.AccessToken, nil
}

// bearer is a client interceptor that adds the access token to calls to
// base, when the session's tokens may go there.
type bearer struct {
	a    *app
	base string
}

func (b bearer) set(ctx context.Context, h http.Header) error {
	if b.a.envToken == "" {
		b.a.prepare(ctx)
		if !b.a.sess.trusts(b.base) {
			return nil
		}
	}
	tok, err := b.a.accessToken(ctx)
	if err != nil {
		return err
	}
	if tok != "" {
		h.Set("Authorization", "Bearer "+tok)
	}
	return nil
}

func (b bearer) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if err := b.set(ctx, req.Header()); err != nil {
			return nil, err
		}
		return next(ctx, req)
	}
}

func (b bearer) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		_ = b.set(ctx, conn.RequestHeader())
		return conn
	}
}

func (b bearer) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

// opts are the client options for calls to base: the access token.
func (a *app) opts(base string) connect.ClientOption {
	return connect.WithInterceptors(bearer{a: a, base: base})
}
