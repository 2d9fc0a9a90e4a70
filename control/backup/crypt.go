package backup

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"filippo.io/age"
)

// Errors a caller branches on. Every error of Open, Verify and the
// restore path that is caused by the file's content wraps one of them (or
// state.ErrCorrupt for a plaintext export that does not check out).
var (
	// ErrKeyRequired: the backup is encrypted and no key was given. It
	// names no way of giving one: relayd and relayctl take the key by
	// different flags, and each says its own where it reports the error.
	ErrKeyRequired = errors.New("backup is encrypted and no key was given")
	// ErrWrongKey: the backup is encrypted to a different key.
	ErrWrongKey = errors.New("backup is encrypted to a different key")
	// ErrTampered: the encrypted backup fails authentication (modified or
	// truncated after it was written).
	ErrTampered = errors.New("encrypted backup fails authentication: modified or truncated")
	// ErrNotBackup: the file is neither a state export nor an age file.
	ErrNotBackup = errors.New("not a relay backup")
	// ErrPlaintext: a key was given and the backup is not encrypted. A
	// plaintext export is protected by nothing but a CRC-32C anyone can
	// recompute, so whoever can write where the backups are kept could
	// have made it, with their own admin password hash and signing and CA
	// keys: where backups are encrypted, one that is not is refused unless
	// the caller allows it (AllowPlaintext). Like ErrKeyRequired it names
	// no binary's flag.
	ErrPlaintext = errors.New("backup is not encrypted, though a key was given: refused, as nothing authenticates a plaintext backup " +
		"(anyone who can write where backups are kept can make one)")
)

// ReadOption changes which backups Open, Verify, VerifyFile and OpenFile
// accept.
type ReadOption func(*readOptions)

type readOptions struct {
	allowPlaintext bool
}

// AllowPlaintext(true) makes a reader given a key accept a plaintext
// backup too, instead of refusing it with ErrPlaintext: for an operator
// who wrote that file without a key and knows it is the one (relayd's
// --restore-allow-plaintext). Without a key a plaintext backup is
// accepted anyway: it is the only kind that can be read then.
func AllowPlaintext(allow bool) ReadOption {
	return func(o *readOptions) { o.allowPlaintext = allow }
}

func applyReadOptions(opts []ReadOption) readOptions {
	var o readOptions
	for _, opt := range opts {
		opt(&o)
	}
	return o
}

// The two formats a backup file has: a plaintext state export
// (storage/state, magic "RLYSTAT1"), or that export encrypted with age
// (https://age-encryption.org/v1: a text header naming the recipient
// stanzas and a MAC, then the payload in 64 KiB ChaCha20-Poly1305
// chunks, the last one marked, so truncation is detected).
const (
	plainMagic = "RLYSTAT1"
	ageMagic   = "age-encryption.org/v1\n"
)

// Key is the key backups are encrypted with: an age identity. The same
// key decrypts them, so it must be kept apart from the backups (a secret
// manager, another machine), or an attacker with the backups has both.
type Key struct {
	identity  age.Identity
	recipient recipient
}

// recipient is what both age key types' public halves provide.
type recipient interface {
	age.Recipient
	String() string
}

// GenerateKey returns a new X25519 age identity.
func GenerateKey() (*Key, string, error) {
	id, err := age.GenerateX25519Identity()
	if err != nil {
		return nil, "", fmt.Errorf("generate backup key: %w", err)
	}
	return &Key{identity: id, recipient: id.Recipient()}, id.String(), nil
}

// ParseKey reads a key in age's identity file format: one
// AGE-SECRET-KEY-1... (X25519) or AGE-SECRET-KEY-PQ-1... (hybrid
// post-quantum) line; blank lines and lines starting with # are ignored.
// age-keygen and `relayctl backup keygen` write such files.
func ParseKey(text string) (*Key, error) {
	ids, err := age.ParseIdentities(strings.NewReader(text))
	if err != nil {
		return nil, fmt.Errorf("parse backup key: %w", err)
	}
	if len(ids) != 1 {
		return nil, fmt.Errorf("parse backup key: %d identities, want exactly one", len(ids))
	}
	switch id := ids[0].(type) {
	case *age.X25519Identity:
		return &Key{identity: id, recipient: id.Recipient()}, nil
	case *age.HybridIdentity:
		return &Key{identity: id, recipient: id.Recipient()}, nil
	}
	return nil, fmt.Errorf("parse backup key: unsupported identity type %T", ids[0])
}

// LoadKey reads a key file (see ParseKey). It refuses a file that users
// outside its owner and group may read (root:relay 0640 is fine).
func LoadKey(path string) (*Key, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("backup key: %w", err)
	}
	if fi.Mode().Perm()&0o007 != 0 {
		return nil, fmt.Errorf("backup key %s: mode %v lets every user read it; chmod o-rwx it", path, fi.Mode().Perm())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("backup key: %w", err)
	}
	k, err := ParseKey(string(b))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}

// Recipient is the key's public half (age1...), which names it in logs
// and lets a backup be checked against the right key without showing the
// secret.
func (k *Key) Recipient() string { return k.recipient.String() }

// Seal returns a writer that encrypts everything written to it to w. Its
// Close writes the final chunk; it does not close w. With a nil key it
// passes the bytes through unchanged.
func Seal(w io.Writer, k *Key) (io.WriteCloser, error) {
	if k == nil {
		return nopCloser{w}, nil
	}
	wc, err := age.Encrypt(w, k.recipient)
	if err != nil {
		return nil, fmt.Errorf("encrypt backup: %w", err)
	}
	return wc, nil
}

type nopCloser struct{ io.Writer }

func (nopCloser) Close() error { return nil }

// Open returns a reader of the plaintext state export held in r, which
// is either a plaintext export or an age-encrypted one; encrypted tells
// which. An encrypted one needs k. A plaintext export is returned as it
// is (its own checksum is checked by the decoder that reads it) when no
// key is given, or when opts allow it (AllowPlaintext); with a key it is
// refused with ErrPlaintext otherwise. Read errors of the returned reader
// caused by the content wrap ErrTampered.
func Open(r io.Reader, k *Key, opts ...ReadOption) (plain io.Reader, encrypted bool, err error) {
	o := applyReadOptions(opts)
	br := bufio.NewReader(r)
	head, err := br.Peek(len(ageMagic))
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, false, fmt.Errorf("read backup header: %w", err)
	}
	switch {
	case bytes.HasPrefix(head, []byte(plainMagic)):
		if k != nil && !o.allowPlaintext {
			return nil, false, ErrPlaintext
		}
		return br, false, nil
	case bytes.Equal(head, []byte(ageMagic)):
	default:
		return nil, false, fmt.Errorf("%w: the file starts with neither %q nor %q", ErrNotBackup, plainMagic, strings.TrimSpace(ageMagic))
	}
	if k == nil {
		return nil, true, ErrKeyRequired
	}
	src := &sourceReader{r: br}
	dec, err := age.Decrypt(src, k.identity)
	if err != nil {
		if src.err != nil {
			return nil, true, fmt.Errorf("read backup: %w", src.err)
		}
		var nomatch *age.NoIdentityMatchError
		if errors.As(err, &nomatch) {
			return nil, true, fmt.Errorf("%w (this key is %s): %v", ErrWrongKey, k.Recipient(), err)
		}
		return nil, true, fmt.Errorf("%w: header: %v", ErrTampered, err)
	}
	return &authReader{r: dec, src: src}, true, nil
}

// sourceReader remembers an error of the underlying reader, so a failing
// disk is told apart from a failing authentication.
type sourceReader struct {
	r   io.Reader
	err error
}

func (s *sourceReader) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	if err != nil && !errors.Is(err, io.EOF) {
		s.err = err
	}
	return n, err
}

// authReader maps age's payload errors to ErrTampered.
type authReader struct {
	r   io.Reader
	src *sourceReader
}

func (a *authReader) Read(p []byte) (int, error) {
	n, err := a.r.Read(p)
	if err == nil || errors.Is(err, io.EOF) {
		return n, err
	}
	if a.src.err != nil {
		return n, fmt.Errorf("read backup: %w", a.src.err)
	}
	return n, fmt.Errorf("%w: %v", ErrTampered, err)
}
