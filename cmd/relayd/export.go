package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"

	"github.com/edge-relay/relay/control/backup"
	"github.com/edge-relay/relay/control/raftnode"
	"github.com/edge-relay/relay/internal/flagenv"
	"github.com/edge-relay/relay/storage/state"
)

// runExportState writes a backup file of what a stopped control node
// applied, read from its data dir: the way to save a cluster that lost
// its quorum for good, where no leader answers a backup and nobody can
// log in. The file restores a new cluster (relayd control --restore).
func runExportState(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	fs := flag.NewFlagSet("relayd export-state", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dataDir := fs.String("data-dir", "", "the stopped control node's data dir")
	keyFile := fs.String("backup-key-file", "", "age identity file to encrypt the file to (or the key itself in RELAY_BACKUP_KEY)")
	fs.Usage = flagenv.Usage(fs, envPrefix, "relayd export-state --data-dir DIR [flags] FILE")
	if err := flagenv.Parse(fs, envPrefix, args, getenv); err != nil {
		return err
	}
	if *dataDir == "" || fs.NArg() != 1 {
		fs.Usage()
		return errors.New("export-state needs --data-dir and one FILE")
	}
	key, err := loadBackupKey(*keyFile, getenv)
	if err != nil {
		return err
	}
	// Without Raft data there is no node's state here (a mistyped path
	// would otherwise open, and export, a new empty store).
	if has, err := raftnode.HasRaftData(*dataDir); err != nil {
		return fmt.Errorf("--data-dir: %w", err)
	} else if !has {
		return fmt.Errorf("--data-dir %s holds no control node's data (no raft/ in it)", *dataDir)
	}
	// Opening takes the store's lock: a node still running there is
	// refused, as its state moves under the export.
	st, err := state.Open(state.Config{Dir: filepath.Join(*dataDir, "state"), ReadOnly: true, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return fmt.Errorf("%w (is the node stopped?)", err)
	}
	defer st.Close()
	info, err := backup.WriteFile(ctx, fs.Arg(0), key, func(w io.Writer) error {
		snap := st.Snapshot()
		defer snap.Close()
		_, err := state.ExportContext(ctx, w, snap)
		return err
	})
	if err != nil {
		return err
	}
	enc := ""
	if info.Encrypted {
		enc = ", encrypted"
	}
	fmt.Fprintf(stdout, "wrote %s: %d bytes, %d records, applied index %d%s, verified\n", fs.Arg(0), info.Size, info.Records, info.AppliedIndex, enc)
	return nil
}
