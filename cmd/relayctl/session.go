package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"connectrpc.com/connect"

	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

// savedTokens is what relayctl keeps per server between runs.
type savedTokens struct {
	AccessToken    string    `json:"access_token"`
	AccessExpires  time.Time `json:"access_expires"`
	RefreshToken   string    `json:"refresh_token"`
	RefreshExpires time.Time `json:"refresh_expires"`
	UserID         string    `json:"user_id"`
}

// tokenStore is the token cache: one JSON file, mode 0600, in the user's
// config directory (RELAYCTL_CONFIG_DIR overrides), keyed by server URL.
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

func (s *tokenStore) get(server string) (savedTokens, bool) {
	m, err := s.load()
	if err != nil {
		return savedTokens{}, false
	}
	t, ok := m[server]
	return t, ok
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
	t, ok := a.tokens.get(a.base())
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
			_ = a.tokens.put(a.base(), nil)
			return "", fmt.Errorf("your session ended (%v): run relayctl login", err)
		}
		return "", fmt.Errorf("refresh session: %w", err)
	}
	nt := fromTokens(resp.Msg.GetTokens())
	if err := a.tokens.put(a.base(), nt); err != nil {
		return "", err
	}
	return nt.AccessToken, nil
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
