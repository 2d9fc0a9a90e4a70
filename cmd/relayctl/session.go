package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
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
	// Members are the API base URLs of the cluster's nodes as the server
	// logged in to listed them (staff accounts only: users may not read
	// the member list). The tokens are used for those URLs too.
	Members []string `json:"members,omitempty"`
}

// tokenStore is the token cache: one JSON file, mode 0600, in the user's
// config directory (RELAYCTL_CONFIG_DIR overrides), keyed by the server
// URL logged in to. Tokens go only to that URL and to the member URLs
// that server named: a cluster has no id a client could check, and a
// URL merely claiming to be in the same cluster must not receive them.
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
// URL, else one whose cluster lists it as a member. key is the entry to
// update or delete.
func (s *tokenStore) find(server string) (key string, t savedTokens, ok bool) {
	m, err := s.load()
	if err != nil {
		return "", savedTokens{}, false
	}
	if t, ok := m[server]; ok {
		return server, t, true
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys) // deterministic when several clusters list the URL
	for _, k := range keys {
		if slices.Contains(m[k].Members, server) {
			return k, m[k], true
		}
	}
	return "", savedTokens{}, false
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
		UserID: t.GetUserId(),
	}
}

func (a *app) authClient() controlv1connect.AuthServiceClient {
	return controlv1connect.NewAuthServiceClient(a.http, a.base())
}

func (a *app) base() string { return strings.TrimRight(a.server, "/") }

// accessToken returns a valid access token for the server, refreshing
// (and saving) it when it is about to expire. RELAYCTL_TOKEN, when set,
// is used as is.
func (a *app) accessToken(ctx context.Context) (string, error) {
	if a.envToken != "" {
		return a.envToken, nil
	}
	key, t, ok := a.tokens.find(a.base())
	if !ok {
		return "", nil
	}
	if time.Until(t.AccessExpires) > 30*time.Second {
		return t.AccessToken, nil
	}
	if t.RefreshToken == "" || time.Until(t.RefreshExpires) <= 0 {
		return "", errors.New("your session has expired: run relayctl login")
	}
	resp, err := a.authClient().Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: t.RefreshToken}))
	if err != nil {
		if connect.CodeOf(err) == connect.CodeUnauthenticated {
			_ = a.tokens.put(key, nil)
			return "", fmt.Errorf("your session ended (%v): run relayctl login", err)
		}
		return "", fmt.Errorf("refresh session: %w", err)
	}
	nt := fromTokens(resp.Msg.GetTokens())
	nt.Members = t.Members
	if err := a.tokens.put(key, nt); err != nil {
		return "", err
	}
	return nt.AccessToken, nil
}

// memberURLs asks the server, with a fresh access token, for the API
// URLs of the cluster's members. Only staff may read them; for anyone
// else (or on any error) the session stays tied to the one URL.
func (a *app) memberURLs(ctx context.Context, accessToken string) []string {
	req := connect.NewRequest(&controlv1.StatusRequest{})
	req.Header().Set("Authorization", "Bearer "+accessToken)
	resp, err := controlv1connect.NewClusterServiceClient(a.http, a.base()).Status(ctx, req)
	if err != nil {
		return nil
	}
	scheme := a.base()[:strings.Index(a.base(), "://")+3]
	var out []string
	for _, m := range resp.Msg.GetMembers() {
		if addr := m.GetApiAddr(); addr != "" && scheme+addr != a.base() {
			out = append(out, scheme+addr)
		}
	}
	return out
}

// bearer is a client interceptor that adds the access token.
type bearer struct{ a *app }

func (b bearer) set(ctx context.Context, h http.Header) error {
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

func (a *app) opts() connect.ClientOption { return connect.WithInterceptors(bearer{a}) }

func (a *app) authedAuthClient() controlv1connect.AuthServiceClient {
	return controlv1connect.NewAuthServiceClient(a.http, a.base(), a.opts())
}
