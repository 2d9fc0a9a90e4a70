package auth

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"

	"golang.org/x/crypto/argon2"
)

// Params are argon2id parameters.
type Params struct {
	Memory  uint32 // KiB
	Time    uint32
	Threads uint8
	SaltLen uint32
	KeyLen  uint32
}

// DefaultParams follow RFC 9106's second recommended option scaled to a
// server that hashes on login only: 64 MiB, 2 passes, 2 lanes.
var DefaultParams = Params{Memory: 64 * 1024, Time: 2, Threads: 2, SaltLen: 16, KeyLen: 32}

// TestParams are cheap parameters for tests; never use them in
// production.
var TestParams = Params{Memory: 64, Time: 1, Threads: 1, SaltLen: 16, KeyLen: 32}

// ErrMalformedHash is returned for a stored hash that is not a valid
// argon2id PHC string.
var ErrMalformedHash = errors.New("malformed password hash")

// ErrWeakPassword is returned by ValidatePassword.
var ErrWeakPassword = errors.New("password does not meet the policy")

// ValidatePassword enforces the password policy: 12 to 256 bytes of
// valid UTF-8.
func ValidatePassword(pw string) error {
	if len(pw) < 12 || len(pw) > 256 {
		return fmt.Errorf("%w: must be 12 to 256 bytes long, is %d", ErrWeakPassword, len(pw))
	}
	if !utf8.ValidString(pw) {
		return fmt.Errorf("%w: not valid UTF-8", ErrWeakPassword)
	}
	return nil
}

// HashPassword returns the argon2id PHC string of password.
func HashPassword(password string, p Params) (string, error) {
	salt := make([]byte, p.SaltLen)
	if _, err := rand.Read(salt); err != nil {
		return "", fmt.Errorf("password salt: %w", err)
	}
	key := argon2.IDKey([]byte(password), salt, p.Time, p.Memory, p.Threads, p.KeyLen)
	enc := base64.RawStdEncoding
	return fmt.Sprintf("$argon2id$v=%d$m=%d,t=%d,p=%d$%s$%s", argon2.Version, p.Memory, p.Time, p.Threads,
		enc.EncodeToString(salt), enc.EncodeToString(key)), nil
}

type phc struct {
	p    Params
	salt []byte
	key  []byte
}

// Bounds on stored parameters, so a corrupted or hostile hash cannot make
// a login allocate gigabytes.
const (
	maxMemory  = 1 << 20 // 1 GiB in KiB
	maxTime    = 16
	maxThreads = 64
	maxLen     = 1024
)

func parsePHC(s string) (phc, error) {
	parts := strings.Split(s, "$")
	if len(parts) != 6 || parts[0] != "" || parts[1] != "argon2id" {
		return phc{}, fmt.Errorf("%w: not an argon2id PHC string", ErrMalformedHash)
	}
	var v int
	if _, err := fmt.Sscanf(parts[2], "v=%d", &v); err != nil || fmt.Sprintf("v=%d", v) != parts[2] || v != argon2.Version {
		return phc{}, fmt.Errorf("%w: version %q", ErrMalformedHash, parts[2])
	}
	var m, t uint32
	var th uint8
	if _, err := fmt.Sscanf(parts[3], "m=%d,t=%d,p=%d", &m, &t, &th); err != nil || fmt.Sprintf("m=%d,t=%d,p=%d", m, t, th) != parts[3] {
		return phc{}, fmt.Errorf("%w: parameters %q", ErrMalformedHash, parts[3])
	}
	if m == 0 || m > maxMemory || t == 0 || t > maxTime || th == 0 || th > maxThreads || m < 8*uint32(th) {
		return phc{}, fmt.Errorf("%w: parameters out of range", ErrMalformedHash)
	}
	enc := base64.RawStdEncoding.Strict()
	salt, err := enc.DecodeString(parts[4])
	if err != nil || len(salt) < 8 || len(salt) > maxLen {
		return phc{}, fmt.Errorf("%w: salt", ErrMalformedHash)
	}
	key, err := enc.DecodeString(parts[5])
	if err != nil || len(key) < 16 || len(key) > maxLen {
		return phc{}, fmt.Errorf("%w: hash", ErrMalformedHash)
	}
	return phc{p: Params{Memory: m, Time: t, Threads: th, SaltLen: uint32(len(salt)), KeyLen: uint32(len(key))}, salt: salt, key: key}, nil
}

// CheckHash reports whether hash is a well-formed argon2id PHC string with
// parameters in bounds (what VerifyPassword accepts). The state machine
// checks every stored hash with it, so a garbage hash is refused when it
// is written, not found at the next login.
func CheckHash(hash string) error {
	_, err := parsePHC(hash)
	return err
}

// VerifyPassword reports whether password matches the PHC string, in
// constant time with respect to the password.
func VerifyPassword(hash, password string) (bool, error) {
	h, err := parsePHC(hash)
	if err != nil {
		return false, err
	}
	key := argon2.IDKey([]byte(password), h.salt, h.p.Time, h.p.Memory, h.p.Threads, h.p.KeyLen)
	return subtle.ConstantTimeCompare(key, h.key) == 1, nil
}

// NeedsRehash reports whether a stored hash was made with parameters other
// than p (or is unreadable), so it should be replaced at the next login.
func NeedsRehash(hash string, p Params) bool {
	h, err := parsePHC(hash)
	if err != nil {
		return true
	}
	return h.p.Memory != p.Memory || h.p.Time != p.Time || h.p.Threads != p.Threads || h.p.KeyLen != p.KeyLen
}
