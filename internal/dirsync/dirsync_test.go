package dirsync_test

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/edge-relay/relay/internal/dirsync"
)

// A directory syncs; a missing one is an error that says which.
func TestSync(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "f"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := dirsync.Sync(dir); err != nil {
		t.Fatalf("sync %s: %v", dir, err)
	}
	missing := filepath.Join(dir, "missing")
	if err := dirsync.Sync(missing); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("sync of a missing directory: %v, want not-exist", err)
	}
}
