package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"connectrpc.com/connect"

	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/storage/state"
)

// backup streams a backup into a temporary file next to FILE, verifies it
// end to end (format, record order, checksum), and only then renames it
// into place, so FILE is either a complete backup or untouched.
func (a *app) backup(ctx context.Context, args []string) error {
	if len(args) != 1 {
		return errors.New("usage: relayctl backup FILE")
	}
	dst := args[0]
	tmp, err := os.CreateTemp(filepath.Dir(dst), ".relay-backup-*")
	if err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()

	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := a.clusterClient().Backup(cctx, connect.NewRequest(&controlv1.BackupRequest{}))
	if err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	var size int64
	for stream.Receive() {
		n, err := tmp.Write(stream.Msg().GetData())
		if err != nil {
			return fmt.Errorf("backup: write %s: %w", tmp.Name(), err)
		}
		size += int64(n)
	}
	if err := stream.Err(); err != nil {
		return fmt.Errorf("backup: %w", err)
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
