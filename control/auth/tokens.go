package auth

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"
)

// Token errors. Verify wraps exactly one of them.
var (
	ErrMalformedToken = errors.New("malformed token")
	ErrUnsupportedAlg = errors.New("unsupported token algorithm")
	ErrUnknownKey     = errors.New("token signed by an unknown key")
	ErrBadSignature   = errors.New("bad token signature")
	ErrExpired        = errors.New("token expired")
	ErrNotYetValid    = errors.New("token not yet valid")
	ErrWrongIssuer    = errors.New("token from another issuer")
	ErrWrongAudience  = errors.New("token for another audience")
	ErrBadClaims      = errors.New("token claims invalid")
)

// MaxTokenLen bounds a token; longer input is refused before decoding.
const MaxTokenLen = 8 << 10

// SigningKey signs access tokens.
type SigningKey struct {
	ID        string
	Private   ed25519.PrivateKey
	CreatedAt time.Time
}

// VerifyKey verifies access tokens; NotAfter (if set) ends its validity.
type VerifyKey struct {
	ID       string
	Public   ed25519.PublicKey
	NotAfter time.Time
}

// Claims are the claims of an access token.
type Claims struct {
	Issuer    string
	Subject   string
	Audience  string
	Role      Role
	IssuedAt  time.Time
	NotBefore time.Time
	ExpiresAt time.Time
	ID        string
	Login     string
	// Session is the session (refresh-token family) the token was issued
	// in: revoking the session revokes the token. Empty in tokens that
	// belong to no session (those control nodes mint for each other).
	Session string
}

type header struct {
	Alg  string          `json:"alg"`
	Typ  string          `json:"typ,omitempty"`
	Kid  string          `json:"kid,omitempty"`
	Crit json.RawMessage `json:"crit,omitempty"`
}

type wireClaims struct {
	Iss   string `json:"iss"`
	Sub   string `json:"sub"`
	Aud   string `json:"aud"`
	Role  string `json:"role"`
	Iat   int64  `json:"iat"`
	Nbf   int64  `json:"nbf"`
	Exp   int64  `json:"exp"`
	Jti   string `json:"jti,omitempty"`
	Login string `json:"login,omitempty"`
	Sid   string `json:"sid,omitempty"`
}

var b64 = base64.RawURLEncoding.Strict()

// GenerateSigningKey makes a new Ed25519 signing key with a random id.
func GenerateSigningKey(r io.Reader, now time.Time) (SigningKey, error) {
	_, priv, err := ed25519.GenerateKey(r)
	if err != nil {
		return SigningKey{}, err
	}
	id := make([]byte, 12)
	if _, err := io.ReadFull(r, id); err != nil {
		return SigningKey{}, err
	}
	return SigningKey{ID: b64.EncodeToString(id), Private: priv, CreatedAt: now}, nil
}

// Sign returns a compact JWS (EdDSA) of the claims.
func Sign(key SigningKey, c Claims) (string, error) {
	if len(key.Private) != ed25519.PrivateKeySize || key.ID == "" {
		return "", errors.New("sign token: invalid signing key")
	}
	h, err := json.Marshal(header{Alg: "EdDSA", Typ: "JWT", Kid: key.ID})
	if err != nil {
		return "", err
	}
	p, err := json.Marshal(wireClaims{
		Iss: c.Issuer, Sub: c.Subject, Aud: c.Audience, Role: string(c.Role),
		Iat: c.IssuedAt.Unix(), Nbf: c.NotBefore.Unix(), Exp: c.ExpiresAt.Unix(), Jti: c.ID, Login: c.Login, Sid: c.Session,
	})
	if err != nil {
		return "", err
	}
	signing := b64.EncodeToString(h) + "." + b64.EncodeToString(p)
	sig := ed25519.Sign(key.Private, []byte(signing))
	return signing + "." + b64.EncodeToString(sig), nil
}

// Verifier checks access tokens.
type Verifier struct {
	issuer, audience string
	keys             func() []VerifyKey
	now              func() time.Time
	leeway           time.Duration
}

// NewVerifier returns a verifier accepting tokens of issuer for audience,
// signed by one of keys(), judged at now() with leeway for clock skew.
func NewVerifier(issuer, audience string, keys func() []VerifyKey, now func() time.Time, leeway time.Duration) *Verifier {
	if now == nil {
		now = time.Now
	}
	return &Verifier{issuer: issuer, audience: audience, keys: keys, now: now, leeway: leeway}
}

// decodeJSON decodes strictly: no unknown trailing data.
func decodeJSON(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("trailing data")
	}
	return nil
}

// Verify checks a token's signature first and its claims second, and
// returns the claims.
func (v *Verifier) Verify(token string) (Claims, error) {
	if len(token) > MaxTokenLen {
		return Claims{}, fmt.Errorf("%w: longer than %d bytes", ErrMalformedToken, MaxTokenLen)
	}
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return Claims{}, fmt.Errorf("%w: want 3 dot-separated parts, have %d", ErrMalformedToken, len(parts))
	}
	hb, err := b64.DecodeString(parts[0])
	if err != nil {
		return Claims{}, fmt.Errorf("%w: header encoding", ErrMalformedToken)
	}
	var h header
	if err := decodeJSON(hb, &h); err != nil {
		return Claims{}, fmt.Errorf("%w: header: %v", ErrMalformedToken, err)
	}
	if h.Alg != "EdDSA" {
		return Claims{}, fmt.Errorf("%w %q (only EdDSA)", ErrUnsupportedAlg, h.Alg)
	}
	if len(h.Crit) > 0 {
		return Claims{}, fmt.Errorf("%w: critical header extensions are not supported", ErrUnsupportedAlg)
	}
	var key *VerifyKey
	now := v.now()
	for _, k := range v.keys() {
		if k.ID == h.Kid && h.Kid != "" {
			k := k
			key = &k
			break
		}
	}
	if key == nil || (!key.NotAfter.IsZero() && now.After(key.NotAfter)) || len(key.Public) != ed25519.PublicKeySize {
		return Claims{}, fmt.Errorf("%w %q", ErrUnknownKey, h.Kid)
	}
	sig, err := b64.DecodeString(parts[2])
	if err != nil {
		return Claims{}, fmt.Errorf("%w: signature encoding", ErrMalformedToken)
	}
	if !ed25519.Verify(key.Public, []byte(parts[0]+"."+parts[1]), sig) {
		return Claims{}, ErrBadSignature
	}
	pb, err := b64.DecodeString(parts[1])
	if err != nil {
		return Claims{}, fmt.Errorf("%w: payload encoding", ErrMalformedToken)
	}
	var wc wireClaims
	if err := decodeJSON(pb, &wc); err != nil {
		return Claims{}, fmt.Errorf("%w: payload: %v", ErrMalformedToken, err)
	}
	if wc.Iss != v.issuer {
		return Claims{}, fmt.Errorf("%w %q", ErrWrongIssuer, wc.Iss)
	}
	if wc.Aud != v.audience {
		return Claims{}, fmt.Errorf("%w %q", ErrWrongAudience, wc.Aud)
	}
	if wc.Exp == 0 || !now.Before(time.Unix(wc.Exp, 0).Add(v.leeway)) {
		return Claims{}, ErrExpired
	}
	if time.Unix(wc.Nbf, 0).After(now.Add(v.leeway)) || time.Unix(wc.Iat, 0).After(now.Add(v.leeway)) {
		return Claims{}, ErrNotYetValid
	}
	if wc.Sub == "" {
		return Claims{}, fmt.Errorf("%w: no subject", ErrBadClaims)
	}
	role, err := ParseRole(wc.Role)
	if err != nil || wc.Role == "" {
		return Claims{}, fmt.Errorf("%w: role %q", ErrBadClaims, wc.Role)
	}
	return Claims{
		Issuer: wc.Iss, Subject: wc.Sub, Audience: wc.Aud, Role: role,
		IssuedAt: time.Unix(wc.Iat, 0), NotBefore: time.Unix(wc.Nbf, 0), ExpiresAt: time.Unix(wc.Exp, 0),
		ID: wc.Jti, Login: wc.Login, Session: wc.Sid,
	}, nil
}

// JWKS returns the JSON Web Key Set (RFC 7517, OKP keys of RFC 8037) of
// the verification keys, sorted by key id.
func JWKS(keys []VerifyKey) ([]byte, error) {
	type jwk struct {
		Kty string `json:"kty"`
		Crv string `json:"crv"`
		X   string `json:"x"`
		Kid string `json:"kid"`
		Alg string `json:"alg"`
		Use string `json:"use"`
	}
	out := struct {
		Keys []jwk `json:"keys"`
	}{Keys: []jwk{}}
	for _, k := range keys {
		out.Keys = append(out.Keys, jwk{Kty: "OKP", Crv: "Ed25519", X: b64.EncodeToString(k.Public), Kid: k.ID, Alg: "EdDSA", Use: "sig"})
	}
	sort.Slice(out.Keys, func(i, j int) bool { return out.Keys[i].Kid < out.Keys[j].Kid })
	return json.Marshal(out)
}

// NewRefreshToken makes an opaque refresh token "rt_<id>.<secret>"; only
// a hash of the secret is ever stored.
func NewRefreshToken(r io.Reader) (tokenID, secret, token string, err error) {
	id := make([]byte, 16)
	sec := make([]byte, 32)
	if _, err := io.ReadFull(r, id); err != nil {
		return "", "", "", err
	}
	if _, err := io.ReadFull(r, sec); err != nil {
		return "", "", "", err
	}
	tokenID, secret = b64.EncodeToString(id), b64.EncodeToString(sec)
	return tokenID, secret, "rt_" + tokenID + "." + secret, nil
}

// ParseRefreshToken splits a refresh token into its id and secret.
func ParseRefreshToken(token string) (tokenID, secret string, err error) {
	rest, ok := strings.CutPrefix(token, "rt_")
	if !ok || len(token) > 128 {
		return "", "", fmt.Errorf("%w: not a refresh token", ErrMalformedToken)
	}
	id, sec, ok := strings.Cut(rest, ".")
	if !ok {
		return "", "", fmt.Errorf("%w: not a refresh token", ErrMalformedToken)
	}
	if b, err := b64.DecodeString(id); err != nil || len(b) != 16 {
		return "", "", fmt.Errorf("%w: bad refresh token id", ErrMalformedToken)
	}
	if b, err := b64.DecodeString(sec); err != nil || len(b) != 32 {
		return "", "", fmt.Errorf("%w: bad refresh token secret", ErrMalformedToken)
	}
	return id, sec, nil
}

// HashSecret returns the SHA-256 of a refresh token's secret.
func HashSecret(secret string) []byte {
	h := sha256.Sum256([]byte(secret))
	return h[:]
}

// SecretMatches compares a presented secret with a stored hash in
// constant time.
func SecretMatches(hash []byte, secret string) bool {
	return subtle.ConstantTimeCompare(hash, HashSecret(secret)) == 1
}
