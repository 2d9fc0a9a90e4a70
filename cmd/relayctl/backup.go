package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/storage/state"
)

func (a *app) backupCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "backup FILE",
		Short: "Write a consistent backup of the state to FILE, verified before it is renamed into place",
		Args:  cobra.ExactArgs(1),
		RunE:  func(cmd *cobra.Command, args []string) error { return a.backup(cmd.Context(), args[0]) },
	}
}

// backup streams a backup into a temporary file next to dst, verifies it
// end to end (format, record order, checksum), and only then renames it
// into place, so dst is either a complete backup or untouched. A stream
// that fails is started again, from scratch, on the next member.
func (a *app) backup(ctx context.Context, dst string) error {
	tmp, err := os.CreateTemp(filepath.Dir(dst), ".relay-backup-*")
	if err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()

	var size int64
	// A backup takes as long as it takes: --timeout bounds each attempt
	// to start it only.
	err = a.call(ctx, "backup", retryAlways, func(actx context.Context, base string) error {
		if _, err := tmp.Seek(0, io.SeekStart); err != nil {
			return err
		}
		if err := tmp.Truncate(0); err != nil {
			return err
		}
		size = 0
		sctx, cancel := context.WithCancel(ctx)
		defer cancel()
		stream, err := a.clusterClient(base).Backup(sctx, connect.NewRequest(&controlv1.BackupRequest{}))
		if err != nil {
			return err
		}
		defer stream.Close()
		for stream.Receive() {
			n, err := tmp.Write(stream.Msg().GetData())
			if err != nil {
				return fmt.Errorf("write %s: %w", tmp.Name(), err)
			}
			size += int64(n)
		}
		return stream.Err()
	})
	if err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	if _, err := tmp.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	dec := state.NewDecoder(tmp)
	for {
		_, _, err := dec.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("backup: received file does not verify: %w", err)
		}
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	if a.output == "json" {
		return printValue(a.stdout, map[string]any{"file": dst, "bytes": size, "records": dec.Count()})
	}
	fmt.Fprintf(a.stdout, "wrote %s: %d bytes, %d records, verified\n", dst, size, dec.Count())
	return nil
}
