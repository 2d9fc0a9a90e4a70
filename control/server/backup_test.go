package server_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/backup"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/raftnode"
	"github.com/edge-relay/relay/control/server"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// fillState writes edges edge records of about 2 KiB of random hex each
// through node (the leader), so a state export is about edges*2 KiB and
// does not compress.
func fillState(t *testing.T, ctx context.Context, node *raftnode.Node, edges int) {
	t.Helper()
	for i := 0; i < edges; i++ {
		addrs := make([]string, 8)
		for j := range addrs {
			b := make([]byte, 120)
			_, _ = rand.Read(b)
			addrs[j] = hex.EncodeToString(b)
		}
		if _, err := node.Apply(ctx, &statev1.Command{Op: &statev1.Command_RegisterEdge{RegisterEdge: &statev1.RegisterEdge{Edge: &statev1.Edge{
			Id: fmt.Sprintf("e%d", i), Addrs: addrs, LeaseExpiresAtMs: time.Now().Add(time.Hour).UnixMilli(),
		}}}}); err != nil {
			t.Fatal(err)
		}
	}
}

// slowDisk stands for a disk that is slow while a backup ends: its first
// write, a full buffer of the export, returns only once the backup's
// context has ended, as a write in progress when the schedule is closed
// or the timeout passes would. It counts the writes after that one.
type slowDisk struct {
	w       io.Writer
	ctx     context.Context // the backup's
	started chan struct{}   // closed at the first write
	after   int             // writes after the first
}

func (d *slowDisk) Write(p []byte) (int, error) {
	if d.started != nil {
		close(d.started)
		d.started = nil
		<-d.ctx.Done()
	} else {
		d.after++
	}
	return d.w.Write(p)
}

// A scheduled backup of a large state ends as soon as its context does
// (the schedule's Close, which Shutdown runs, or its Timeout), not once
// the whole state is written: the node's own backup source stops at the
// next record of the export, and the partial file is removed.
func TestABackupInProgressEndsWithItsContext(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	ctx := ctxT(t, 2*time.Minute)
	// About 300 KiB: more than the export's 256 KiB buffer, so the
	// slow disk's first write comes while records are left.
	fillState(t, ctx, c.Nodes[0].Server.Node(), 150)
	src := server.BackupSource(c.Nodes[0].Server)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))

	for _, how := range []string{"close", "timeout"} {
		t.Run(how, func(t *testing.T) {
			dir := t.TempDir()
			disk := &slowDisk{started: make(chan struct{})}
			started := disk.started
			cfg := backup.Config{Dir: dir, Every: time.Hour, Logger: quiet,
				Leading: func() bool { return how == "close" },
				Source: func(ctx context.Context, w io.Writer) error {
					disk.w, disk.ctx = w, ctx
					return src(ctx, disk)
				}}
			if how == "timeout" {
				cfg.Timeout = 3 * time.Second
			}
			s, err := backup.Start(cfg)
			if err != nil {
				t.Fatal(err)
			}
			switch how {
			case "close":
				// The schedule starts a backup at once (this node
				// leads, no backup yet); Close while it is written.
				select {
				case <-started:
				case <-ctx.Done():
					t.Fatal("the schedule did not start a backup")
				}
				closed := make(chan struct{})
				go func() { _ = s.Close(); close(closed) }()
				select {
				case <-closed:
				case <-time.After(30 * time.Second):
					t.Fatal("Close still waits for the export 30s on")
				}
			case "timeout":
				defer s.Close()
				if _, err := s.Backup(ctx); !errors.Is(err, context.DeadlineExceeded) {
					t.Fatalf("backup past its timeout: %v", err)
				}
			}
			select {
			case <-started:
			default:
				t.Fatal("the backup ended before its export began")
			}
			if disk.after != 0 {
				t.Fatalf("the export went on writing after its context ended (%d more writes)", disk.after)
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				t.Fatalf("the ended backup left %v", ents)
			}
		})
	}
}

// Where backups are encrypted, a plaintext one put in place of one (here:
// a whole state export under a scheduled backup's .age name, as whoever
// can write the backup storage could craft, with their own admin hash and
// keys) is refused by --restore before anything is imported: its CRC-32C
// authenticates nothing. The data dir stays empty, and the operator who
// made such a file on purpose restores it with RestoreAllowPlaintext.
func TestARestoreWithAKeyRefusesAPlaintextBackup(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := c.CreateUser(ctx, 0, "planted"); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), backup.FileName(time.Now(), true))
	f, err := os.Create(file)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Nodes[0].Server.Node().FSM().WriteBackup(f); err != nil || f.Close() != nil {
		t.Fatalf("write backup: %v", err)
	}
	key, _, err := backup.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	cfg := server.Config{NodeID: "r1", DataDir: dir, RaftAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0", AdminAddr: "127.0.0.1:0",
		RestoreFrom: file, BackupKey: key}
	if _, err := server.Start(ctx, cfg); !errors.Is(err, backup.ErrPlaintext) || !strings.Contains(err.Error(), "NOT encrypted") {
		t.Fatalf("restore of a plaintext backup named .age with a key: %v, want ErrPlaintext saying it is not encrypted", err)
	}
	if has, err := raftnode.HasRaftState(dir); err != nil || has {
		t.Fatalf("the refused restore left raft state: %v, %v", has, err)
	}
	rec := clustertest.NewLogRecorder()
	cfg.RestoreAllowPlaintext, cfg.Logger = true, slog.New(rec)
	srv, err := server.Start(ctx, cfg)
	if err != nil {
		t.Fatalf("restore with RestoreAllowPlaintext: %v", err)
	}
	defer func() { _ = srv.Shutdown(ctx) }()
	if _, err := srv.Node().FSM().GetUser("planted"); err != nil {
		t.Fatalf("the allowed restore lacks the backup's user: %v", err)
	}
	if len(rec.Find("", func(r clustertest.Record) bool {
		return r.Level == slog.LevelWarn && strings.Contains(r.Message, "restoring a plaintext backup")
	})) != 1 {
		t.Fatal("the allowed plaintext restore logged no warning")
	}
}
