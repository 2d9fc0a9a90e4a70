package backup

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/storage/state"
)

// Info describes a backup that verified.
type Info struct {
	// Encrypted is true for an age-encrypted backup.
	Encrypted bool
	// Records is the number of state records it holds.
	Records uint64
	// AppliedIndex is the Raft index of the state it holds (a restored
	// cluster continues from it).
	AppliedIndex uint64
	// PlainSHA256 is the SHA-256 of the plaintext export.
	PlainSHA256 [32]byte
	// Size is the size of the file in bytes.
	Size int64
}

// Verify reads a whole backup from r: it decrypts it when it is
// encrypted (authenticating every chunk), decodes every record, and
// checks the export's record order, count and CRC-32C, and each record as
// a restore does (fsm.CheckRecord). It accepts what Open accepts (with a
// key, a plaintext backup only if opts allow it). It returns an error
// wrapping ErrKeyRequired, ErrWrongKey, ErrTampered, ErrNotBackup,
// ErrPlaintext, state.ErrCorrupt or fsm.ErrNewerFormat when the content is
// at fault.
func Verify(r io.Reader, k *Key, opts ...ReadOption) (Info, error) {
	cr := &countingReader{r: r}
	plain, enc, err := Open(cr, k, opts...)
	if err != nil {
		return Info{Encrypted: enc}, err
	}
	info := Info{Encrypted: enc}
	sum := sha256.New()
	dec := state.NewDecoder(io.TeeReader(plain, sum))
	for {
		key, value, err := dec.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return info, fmt.Errorf("verify backup: %w", err)
		}
		// What a restore checks before it imports (a state format of a
		// newer release among it): a backup verified here restores.
		if err := fsm.CheckRecord(key, value); err != nil {
			return info, fmt.Errorf("verify backup: %w", err)
		}
		if idx, _, ok := fsm.AppliedFromRecord(key, value); ok {
			info.AppliedIndex = idx
		}
	}
	// The decoder stops at the checksum; an age stream has its final
	// chunk's authentication still to check, which reading to the end
	// does (and a plaintext export must end there too, which the decoder
	// checked).
	if _, err := io.Copy(sum, plain); err != nil {
		return info, fmt.Errorf("verify backup: %w", err)
	}
	info.Records = dec.Count()
	sum.Sum(info.PlainSHA256[:0])
	info.Size = cr.n
	if info.AppliedIndex == 0 {
		return info, fmt.Errorf("verify backup: %w: no applied index (not a control-plane state)", state.ErrCorrupt)
	}
	return info, nil
}

// VerifyFile verifies the backup file at path (see Verify).
func VerifyFile(path string, k *Key, opts ...ReadOption) (Info, error) {
	return verifyFile(context.Background(), path, k, opts...)
}

// verifyFile is VerifyFile, stopped (with ctx's error) once ctx ends.
func verifyFile(ctx context.Context, path string, k *Key, opts ...ReadOption) (Info, error) {
	f, err := os.Open(path)
	if err != nil {
		return Info{}, fmt.Errorf("verify backup: %w", err)
	}
	defer f.Close()
	info, err := Verify(ctxReader{ctx, f}, k, opts...)
	if err != nil {
		return info, fileError(path, err)
	}
	return info, nil
}

// NamedEncrypted reports whether a backup file's name says it is
// encrypted (it ends in .age, as the scheduled backups' and age's own
// files do), so that one whose content is not can be reported as such.
func NamedEncrypted(path string) bool { return strings.HasSuffix(path, ".age") }

// MisnamedPlaintext says what a plaintext backup whose name ends in .age
// is (NamedEncrypted): its name promises encryption its content lacks.
const MisnamedPlaintext = "NOT encrypted although its name ends in .age: replaced after it was written, or misnamed"

// fileError names path in an error of the backup file's content, and
// adds MisnamedPlaintext where it applies.
func fileError(path string, err error) error {
	if errors.Is(err, ErrPlaintext) && NamedEncrypted(path) {
		return fmt.Errorf("%s: %w; %s", path, err, MisnamedPlaintext)
	}
	return fmt.Errorf("%s: %w", path, err)
}

// ctxReader fails its reads once ctx ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// OpenFile opens a backup file for restoring: the returned reader yields
// the plaintext export (decrypted with k when the file is encrypted). It
// accepts what Open accepts: with a key, a plaintext file only if opts
// allow it.
func OpenFile(path string, k *Key, opts ...ReadOption) (io.ReadCloser, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open backup: %w", err)
	}
	plain, _, err := Open(f, k, opts...)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open backup %w", fileError(path, err))
	}
	return struct {
		io.Reader
		io.Closer
	}{plain, f}, nil
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}
