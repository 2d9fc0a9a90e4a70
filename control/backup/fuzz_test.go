package backup_test

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/edge-relay/relay/control/backup"
	"github.com/edge-relay/relay/storage/state"
)

// The backup formats as released: testdata holds a plaintext and an
// encrypted backup written by the first version of this package (the
// state of a cluster at applied index 99 with 20 users), which every
// later version must still read.
func TestReleasedSamples(t *testing.T) {
	key := mustKey(t, testKey)
	want := exportOf(t, newState(99, 20))
	for name, key := range map[string]*backup.Key{"sample-v1.bin": nil, "sample-v1.bin.age": key} {
		p := filepath.Join("testdata", name)
		info, err := backup.VerifyFile(p, key)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if info.AppliedIndex != 99 || info.Records != 21 || info.PlainSHA256 != sha256.Sum256(want) {
			t.Fatalf("%s: %+v", name, info)
		}
	}
}

// FuzzVerify feeds arbitrary bytes to the one parser of backup files
// (format detection, age decryption, the state export decoder). It must
// never panic, and what it accepts must be a whole backup: the size it
// reports is the input's, and reading the plaintext again gives the same
// digest.
func FuzzVerify(f *testing.F) {
	plain := exportOf(f, newState(5, 3))
	f.Add(plain)
	f.Add(plain[:len(plain)-1])
	f.Add([]byte("age-encryption.org/v1\n-> X25519 abc\n--- def\n"))
	if b, err := os.ReadFile(filepath.Join("testdata", "sample-v1.bin.age")); err == nil {
		f.Add(b)
	}
	key, err := backup.ParseKey(testKey)
	if err != nil {
		f.Fatal(err)
	}
	// Plaintext allowed, so that both formats' parsers are fuzzed with
	// the key given.
	allow := backup.AllowPlaintext(true)
	f.Fuzz(func(t *testing.T, data []byte) {
		info, err := backup.Verify(bytes.NewReader(data), key, allow)
		if err != nil {
			if !errors.Is(err, state.ErrCorrupt) && !errors.Is(err, backup.ErrTampered) && !errors.Is(err, backup.ErrWrongKey) &&
				!errors.Is(err, backup.ErrNotBackup) {
				t.Fatalf("error of no known kind for bad content: %v", err)
			}
			return
		}
		if info.Size != int64(len(data)) {
			t.Fatalf("accepted %d bytes, read %d", len(data), info.Size)
		}
		plain, _, err := backup.Open(bytes.NewReader(data), key, allow)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(plain)
		if err != nil || sha256.Sum256(b) != info.PlainSHA256 {
			t.Fatalf("second read differs (err %v)", err)
		}
	})
}
