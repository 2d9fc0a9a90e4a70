package certpool_test

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/edge-relay/relay/internal/certpool"
	"github.com/edge-relay/relay/internal/testcerts"
)

// A CA file gives its certificates; a missing file and one without a PEM
// certificate give typed errors that name the file.
func TestFromFile(t *testing.T) {
	dir := t.TempDir()
	ca, err := testcerts.NewCA(dir, "ca")
	if err != nil {
		t.Fatal(err)
	}
	pool, err := certpool.FromFile(ca.CertFile)
	if err != nil || pool == nil || pool.Equal(nil) {
		t.Fatalf("FromFile(%s): %v, %v", ca.CertFile, pool, err)
	}
	if _, err := certpool.FromFile(filepath.Join(dir, "missing.pem")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a missing file: %v, want fs.ErrNotExist", err)
	}
	junk := filepath.Join(dir, "junk.pem")
	if err := os.WriteFile(junk, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := certpool.FromFile(junk); !errors.Is(err, certpool.ErrNoCertificates) {
		t.Fatalf("a file without certificates: %v, want ErrNoCertificates", err)
	}
}
