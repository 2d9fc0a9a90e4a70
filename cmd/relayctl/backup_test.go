package main

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edge-relay/relay/control/backup"
)

// backup verify of an encrypted backup without a key says how relayctl
// takes one, not how relayd does; offline, no cluster.
func TestBackupVerifyNamesItsKeyFlag(t *testing.T) {
	sample, err := os.ReadFile(filepath.Join("..", "..", "control", "backup", "testdata", "sample-v1.bin.age"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	file := filepath.Join(dir, "b.bin.age")
	if err := os.WriteFile(file, sample, 0o600); err != nil {
		t.Fatal(err)
	}
	r := newCLI(t)
	_, err = r.run("127.0.0.1:1", "", "backup", "verify", file)
	if !errors.Is(err, backup.ErrKeyRequired) {
		t.Fatalf("backup verify without a key: %v, want ErrKeyRequired", err)
	}
	msg := err.Error()
	for _, want := range []string{file, "--key-file", "RELAYCTL_BACKUP_KEY_FILE"} {
		if !strings.Contains(msg, want) {
			t.Errorf("%q does not say %s", msg, want)
		}
	}
	if strings.Contains(msg, "--backup-key-file") {
		t.Errorf("%q names relayd's flag", msg)
	}
}
