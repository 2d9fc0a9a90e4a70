package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/backup"
	"github.com/edge-relay/relay/internal/gzipbound"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
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

// chunkedBackupServer serves ClusterService.Backup with the messages it
// is given, as a compromised control node could.
type chunkedBackupServer struct {
	controlv1connect.UnimplementedClusterServiceHandler
	messages [][]byte
}

func (f *chunkedBackupServer) Backup(_ context.Context, _ *connect.Request[controlv1.BackupRequest], stream *connect.ServerStream[controlv1.BackupResponse]) error {
	for _, m := range f.messages {
		if err := stream.Send(&controlv1.BackupResponse{Data: m}); err != nil {
			return err
		}
	}
	return nil
}

// relayctl backup takes a Backup stream's messages up to
// maxBackupMessageBytes, and refuses a larger one (as sent, or once
// inflated) with an error saying so, instead of allocating whatever size
// the server names; nothing is written then.
func TestBackupRefusesAnOversizedMessage(t *testing.T) {
	sample, err := os.ReadFile(filepath.Join("..", "..", "control", "backup", "testdata", "sample-v1.bin"))
	if err != nil {
		t.Fatal(err)
	}
	for _, gzipped := range []bool{false, true} {
		f := &chunkedBackupServer{}
		opts := []connect.HandlerOption{connect.WithCompressMinBytes(1)}
		if !gzipped {
			opts = append(opts, connect.WithCompression("gzip", nil, nil))
		}
		mux := http.NewServeMux()
		mux.Handle(controlv1connect.NewClusterServiceHandler(f, opts...))
		srv := h2cServer(t, mux)
		addr := strings.TrimPrefix(srv.URL, "http://")
		dir := t.TempDir()
		r := newCLI(t)

		// A whole backup in one message: written and verified.
		f.messages = [][]byte{sample}
		if out, err := r.run(addr, "", "backup", filepath.Join(dir, "ok.bin")); err != nil || !strings.Contains(out, "verified") {
			t.Fatalf("gzip %v: a backup in one message: %q, %v", gzipped, out, err)
		}

		// A message of 2 MiB: refused.
		f.messages = [][]byte{sample[:8], make([]byte, 2<<20)}
		file := filepath.Join(dir, "big.bin")
		_, err = r.run(addr, "", "backup", file)
		if connect.CodeOf(err) != connect.CodeResourceExhausted || !strings.Contains(err.Error(), "larger than relayctl accepts") {
			t.Fatalf("gzip %v: a message of 2 MiB: %v, want resource_exhausted saying the message was too large", gzipped, err)
		}
		if gzipped && !errors.Is(err, gzipbound.ErrTooLarge) {
			t.Fatalf("a gzipped message of 2 MiB was inflated whole to be refused: %v", err)
		}
		if ents, _ := os.ReadDir(dir); len(ents) != 1 {
			t.Fatalf("gzip %v: the refused backup left files: %v", gzipped, ents)
		}
	}
}

// backup verify with a key fails on a plaintext backup (nothing
// authenticates one; where backups are encrypted it may have been put in
// place of one) and names relayctl's way to allow it, which checks it;
// a plaintext file named .age is reported as not encrypted, plainly,
// whether it fails or verifies. Offline, no cluster.
func TestBackupVerifyWithAKeyRefusesPlaintext(t *testing.T) {
	sample, err := os.ReadFile(filepath.Join("..", "..", "control", "backup", "testdata", "sample-v1.bin"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	plain, misnamed := filepath.Join(dir, "b.bin"), filepath.Join(dir, "b.bin.age")
	for _, p := range []string{plain, misnamed} {
		if err := os.WriteFile(p, sample, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	r := newCLI(t)
	keyFile := filepath.Join(dir, "backup.key")
	r.must("127.0.0.1:1", "", "backup", "keygen", keyFile)

	for _, file := range []string{plain, misnamed} {
		_, err := r.run("127.0.0.1:1", "", "backup", "verify", "--key-file", keyFile, file)
		if !errors.Is(err, backup.ErrPlaintext) {
			t.Fatalf("verify %s with a key: %v, want ErrPlaintext", file, err)
		}
		msg := err.Error()
		if !strings.Contains(msg, "--allow-plaintext") || strings.Contains(msg, "--restore-allow-plaintext") {
			t.Errorf("%q does not name relayctl's --allow-plaintext (or names relayd's flag)", msg)
		}
		if says := strings.Contains(msg, "NOT encrypted"); says != (file == misnamed) {
			t.Errorf("%q: want it to say NOT encrypted exactly for the file named .age", msg)
		}
		out := r.must("127.0.0.1:1", "", "backup", "verify", "--key-file", keyFile, "--allow-plaintext", file)
		if !strings.Contains(out, "verified") || strings.Contains(out, "NOT encrypted") != (file == misnamed) {
			t.Errorf("verify --allow-plaintext %s: %q", file, out)
		}
	}
	// Without a key a plaintext backup is what there is to read: it
	// verifies, and one named .age still says it is not encrypted.
	if out := r.must("127.0.0.1:1", "", "backup", "verify", misnamed); !strings.Contains(out, "verified") || !strings.Contains(out, "NOT encrypted") {
		t.Errorf("verify of a plaintext .age file without a key: %q", out)
	}
	if v := r.json("127.0.0.1:1", "", "backup", "verify", misnamed); v["encrypted"] != false || !strings.Contains(fmt.Sprint(v["warning"]), "NOT encrypted") {
		t.Errorf("verify -o json of a plaintext .age file: %v", v)
	}
}
