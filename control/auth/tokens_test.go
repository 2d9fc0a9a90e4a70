package auth

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var t0 = time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)

func testKey(t testing.TB, id string) SigningKey {
	seed := make([]byte, ed25519.SeedSize)
	copy(seed, id)
	return SigningKey{ID: id, Private: ed25519.NewKeyFromSeed(seed), CreatedAt: t0}
}

func vkey(k SigningKey) VerifyKey {
	return VerifyKey{ID: k.ID, Public: k.Private.Public().(ed25519.PublicKey)}
}

func goodClaims() Claims {
	return Claims{Issuer: "relay", Audience: "relay-api", Subject: "u_1", Role: RoleUser,
		IssuedAt: t0, NotBefore: t0, ExpiresAt: t0.Add(15 * time.Minute), ID: "at_1", Login: "alice"}
}

func verifier(keys ...SigningKey) *Verifier {
	return verifierAt(t0.Add(time.Minute), keys...)
}

func verifierAt(now time.Time, keys ...SigningKey) *Verifier {
	return NewVerifier("relay", "relay-api", func() []VerifyKey {
		var out []VerifyKey
		for _, k := range keys {
			out = append(out, vkey(k))
		}
		return out
	}, func() time.Time { return now }, 30*time.Second)
}

func mustSign(t testing.TB, k SigningKey, c Claims) string {
	tok, err := Sign(k, c)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// craft builds a token from raw header and payload JSON, signed by k
// (or with the given signature when sig != nil).
func craft(k SigningKey, hdr, payload string, sig []byte) string {
	s := b64.EncodeToString([]byte(hdr)) + "." + b64.EncodeToString([]byte(payload))
	if sig == nil {
		sig = ed25519.Sign(k.Private, []byte(s))
	}
	return s + "." + b64.EncodeToString(sig)
}

func payload(mod func(*wireClaims)) string {
	c := goodClaims()
	w := wireClaims{Iss: c.Issuer, Sub: c.Subject, Aud: c.Audience, Role: string(c.Role),
		Iat: c.IssuedAt.Unix(), Nbf: c.NotBefore.Unix(), Exp: c.ExpiresAt.Unix(), Jti: c.ID}
	if mod != nil {
		mod(&w)
	}
	b, _ := json.Marshal(w)
	return string(b)
}

func TestSignVerifyRoundTrip(t *testing.T) {
	k := testKey(t, "k1")
	c := goodClaims()
	got, err := verifier(k).Verify(mustSign(t, k, c))
	if err != nil {
		t.Fatal(err)
	}
	if got.Subject != c.Subject || got.Role != c.Role || got.Login != "alice" || !got.ExpiresAt.Equal(c.ExpiresAt) || got.ID != "at_1" {
		t.Fatalf("claims %+v", got)
	}
}

// One case per way a token must be refused, each with its own error.
func TestTokenRejectionTable(t *testing.T) {
	k := testKey(t, "k1")
	other := testKey(t, "k2")
	good := mustSign(t, k, goodClaims())
	parts := strings.Split(good, ".")
	hdr := `{"alg":"EdDSA","typ":"JWT","kid":"k1"}`
	flip := func(s string) string {
		b, _ := b64.DecodeString(s)
		b[len(b)/2] ^= 1
		return b64.EncodeToString(b)
	}
	cases := []struct {
		name  string
		token string
		v     *Verifier
		want  error
	}{
		{"expired", mustSign(t, k, func() Claims { c := goodClaims(); c.ExpiresAt = t0; return c }()), verifierAt(t0.Add(time.Hour), k), ErrExpired},
		{"not yet valid", mustSign(t, k, func() Claims { c := goodClaims(); c.NotBefore = t0.Add(10 * time.Minute); return c }()), verifier(k), ErrNotYetValid},
		{"issued in the future", mustSign(t, k, func() Claims { c := goodClaims(); c.IssuedAt = t0.Add(10 * time.Minute); return c }()), verifier(k), ErrNotYetValid},
		{"wrong issuer", mustSign(t, k, func() Claims { c := goodClaims(); c.Issuer = "evil"; return c }()), verifier(k), ErrWrongIssuer},
		{"wrong audience", mustSign(t, k, func() Claims { c := goodClaims(); c.Audience = "other"; return c }()), verifier(k), ErrWrongAudience},
		{"unknown kid", mustSign(t, other, goodClaims()), verifier(k), ErrUnknownKey},
		{"missing kid", craft(k, `{"alg":"EdDSA","typ":"JWT"}`, payload(nil), nil), verifier(k), ErrUnknownKey},
		{"tampered payload", parts[0] + "." + b64.EncodeToString([]byte(payload(func(w *wireClaims) { w.Role = "admin" }))) + "." + parts[2], verifier(k), ErrBadSignature},
		{"tampered header", b64.EncodeToString([]byte(`{"alg":"EdDSA","kid":"k1","typ":"JWT"}`)) + "." + parts[1] + "." + parts[2], verifier(k), ErrBadSignature},
		{"tampered signature", parts[0] + "." + parts[1] + "." + flip(parts[2]), verifier(k), ErrBadSignature},
		{"signed by another key under our kid", craft(other, hdr, payload(nil), nil), verifier(k), ErrBadSignature},
		{"alg none", craft(k, `{"alg":"none","kid":"k1"}`, payload(nil), []byte{}), verifier(k), ErrUnsupportedAlg},
		{"alg none without signature", b64.EncodeToString([]byte(`{"alg":"none"}`)) + "." + b64.EncodeToString([]byte(payload(nil))) + ".", verifier(k), ErrUnsupportedAlg},
		{"alg HS256", craft(k, `{"alg":"HS256","kid":"k1"}`, payload(nil), nil), verifier(k), ErrUnsupportedAlg},
		{"alg RS256", craft(k, `{"alg":"RS256","kid":"k1"}`, payload(nil), nil), verifier(k), ErrUnsupportedAlg},
		{"missing alg", craft(k, `{"kid":"k1"}`, payload(nil), nil), verifier(k), ErrUnsupportedAlg},
		{"crit header", craft(k, `{"alg":"EdDSA","kid":"k1","crit":["exp"]}`, payload(nil), nil), verifier(k), ErrUnsupportedAlg},
		{"padding in base64", parts[0] + "=." + parts[1] + "." + parts[2], verifier(k), ErrMalformedToken},
		{"standard base64 alphabet", strings.NewReplacer("-", "+", "_", "/").Replace(good) + "+", verifier(k), ErrMalformedToken},
		{"two parts", parts[0] + "." + parts[1], verifier(k), ErrMalformedToken},
		{"four parts", good + ".x", verifier(k), ErrMalformedToken},
		{"empty", "", verifier(k), ErrMalformedToken},
		{"oversized", strings.Repeat("a", MaxTokenLen+1), verifier(k), ErrMalformedToken},
		{"header not JSON", b64.EncodeToString([]byte("{")) + "." + parts[1] + "." + parts[2], verifier(k), ErrMalformedToken},
		{"trailing data after header JSON", craft(k, hdr+`{}`, payload(nil), nil), verifier(k), ErrMalformedToken},
		{"payload not JSON", craft(k, hdr, "[1,2", nil), verifier(k), ErrMalformedToken},
		{"missing exp", craft(k, hdr, payload(func(w *wireClaims) { w.Exp = 0 }), nil), verifier(k), ErrExpired},
		{"missing sub", craft(k, hdr, payload(func(w *wireClaims) { w.Sub = "" }), nil), verifier(k), ErrBadClaims},
		{"unknown role", craft(k, hdr, payload(func(w *wireClaims) { w.Role = "root" }), nil), verifier(k), ErrBadClaims},
		{"missing role", craft(k, hdr, payload(func(w *wireClaims) { w.Role = "" }), nil), verifier(k), ErrBadClaims},
		{"key past its verify window", good, NewVerifier("relay", "relay-api", func() []VerifyKey {
			vk := vkey(k)
			vk.NotAfter = t0
			return []VerifyKey{vk}
		}, func() time.Time { return t0.Add(time.Minute) }, 0), ErrUnknownKey},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.v.Verify(tc.token)
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
	// Leeway: a token expired 10s ago still passes with 30s leeway.
	c := goodClaims()
	c.ExpiresAt = t0
	if _, err := verifierAt(t0.Add(10*time.Second), k).Verify(mustSign(t, k, c)); err != nil {
		t.Fatalf("within leeway: %v", err)
	}
}

func TestKeyRotation(t *testing.T) {
	oldK, newK := testKey(t, "old"), testKey(t, "new")
	tok := mustSign(t, oldK, goodClaims())
	if _, err := verifier(oldK, newK).Verify(tok); err != nil {
		t.Fatalf("old key still in the set: %v", err)
	}
	if _, err := verifier(newK).Verify(tok); !errors.Is(err, ErrUnknownKey) {
		t.Fatalf("old key removed: %v", err)
	}
	if _, err := Sign(SigningKey{ID: "x"}, goodClaims()); err == nil {
		t.Fatal("signed with an empty key")
	}
}

// RFC 8037 appendix A: the Ed25519 key with its x coordinate.
func TestJWKS(t *testing.T) {
	seed, _ := base64.RawURLEncoding.DecodeString("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
	pub := ed25519.NewKeyFromSeed(seed).Public().(ed25519.PublicKey)
	b, err := JWKS([]VerifyKey{{ID: "b", Public: pub}, {ID: "a", Public: pub}})
	if err != nil {
		t.Fatal(err)
	}
	var set struct {
		Keys []map[string]string `json:"keys"`
	}
	if err := json.Unmarshal(b, &set); err != nil {
		t.Fatal(err)
	}
	if len(set.Keys) != 2 || set.Keys[0]["kid"] != "a" {
		t.Fatalf("keys not sorted: %s", b)
	}
	k := set.Keys[0]
	if k["kty"] != "OKP" || k["crv"] != "Ed25519" || k["alg"] != "EdDSA" || k["use"] != "sig" ||
		k["x"] != "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo" {
		t.Fatalf("jwk %v", k)
	}
	empty, _ := JWKS(nil)
	if string(empty) != `{"keys":[]}` {
		t.Fatalf("empty set %s", empty)
	}
}

func TestGenerateSigningKey(t *testing.T) {
	k, err := GenerateSigningKey(rand.Reader, t0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := verifier(k).Verify(mustSign(t, k, goodClaims())); err != nil {
		t.Fatal(err)
	}
	if k.ID == "" || strings.ContainsAny(k.ID, "+/=") {
		t.Fatalf("kid %q", k.ID)
	}
}

func TestRefreshTokens(t *testing.T) {
	id, secret, tok, err := NewRefreshToken(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	gid, gsec, err := ParseRefreshToken(tok)
	if err != nil || gid != id || gsec != secret {
		t.Fatalf("parse: %v %v %v", gid, gsec, err)
	}
	h := HashSecret(secret)
	if !SecretMatches(h, secret) || SecretMatches(h, secret+"x") {
		t.Fatal("secret match")
	}
	for _, bad := range []string{"", "rt_", "rt_abc", "xx_" + id + "." + secret, "rt_" + id + secret, "rt_" + id + "." + secret + "=",
		"rt_" + id[:5] + "." + secret, "rt_" + id + "." + secret[:10], strings.Repeat("a", 200)} {
		if _, _, err := ParseRefreshToken(bad); !errors.Is(err, ErrMalformedToken) {
			t.Errorf("ParseRefreshToken(%q) = %v", bad, err)
		}
	}
}

func FuzzVerify(f *testing.F) {
	k := testKey(f, "k1")
	f.Add(mustSign(f, k, goodClaims()))
	f.Add(craft(k, `{"alg":"none","kid":"k1"}`, payload(nil), []byte{}))
	f.Add(craft(k, `{"alg":"EdDSA","kid":"k1"}`, payload(func(w *wireClaims) { w.Role = "admin" }), nil))
	f.Add("a.b.c")
	f.Add("")
	v := verifier(k)
	f.Fuzz(func(t *testing.T, tok string) {
		c, err := v.Verify(tok)
		if err != nil {
			return
		}
		// Accepted tokens verify the same way again.
		c2, err := v.Verify(tok)
		if err != nil || c2 != c {
			t.Fatalf("re-verify differs: %v %+v %+v", err, c, c2)
		}
	})
}
