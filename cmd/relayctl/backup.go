package main

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	"github.com/edge-relay/relay/control/backup"
	"github.com/edge-relay/relay/internal/gzipbound"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

func (a *app) backupCommand() *cobra.Command {
	var keyFile string
	var stale bool
	cmd := &cobra.Command{
		Use:   "backup FILE",
		Short: "Write a consistent backup of the state to FILE, verified before it is renamed into place",
		Long: `Write a consistent backup of the state to FILE, verified before it is renamed
into place. The backup holds password hashes, token signing keys and session
keys: with --key-file (an age identity, see "relayctl backup keygen") it is
encrypted to that key.

With --stale the member answering (give it with --server) backs up what it
has applied without catching up with the leader first: the way to save a
cluster that lost its quorum for good from a surviving member, to restore a
new cluster from (relayd control --restore); it may lack the last writes
the cluster acknowledged.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			key, err := a.backupKey(keyFile)
			if err != nil {
				return err
			}
			return a.backup(cmd.Context(), args[0], key, stale)
		},
	}
	cmd.Flags().StringVar(&keyFile, "key-file", "", "age identity file to encrypt the backup to [RELAYCTL_BACKUP_KEY_FILE]; or the key itself in RELAY_BACKUP_KEY")
	cmd.Flags().BoolVar(&stale, "stale", false, "back up what the answering member has applied, without the leader (a cluster that lost its quorum for good); may lack the last acknowledged writes")
	cmd.AddCommand(a.backupVerifyCommand(), a.backupKeygenCommand())
	return cmd
}

// backupKey reads --key-file, or RELAYCTL_BACKUP_KEY_FILE, or the key
// itself from RELAY_BACKUP_KEY (as relayd reads it); nil when none is set.
func (a *app) backupKey(file string) (*backup.Key, error) {
	if file == "" {
		file = a.getenv("RELAYCTL_BACKUP_KEY_FILE")
	}
	if file != "" {
		return backup.LoadKey(file)
	}
	if v := a.getenv("RELAY_BACKUP_KEY"); v != "" {
		k, err := backup.ParseKey(v)
		if err != nil {
			return nil, fmt.Errorf("RELAY_BACKUP_KEY: %w", err)
		}
		return k, nil
	}
	return nil, nil
}

// withKeyHint adds to a missing key's error how relayctl takes one, and
// to a refused plaintext backup's how relayctl accepts it (the backup
// package names no binary's flags: relayd's differ).
func withKeyHint(err error) error {
	switch {
	case errors.Is(err, backup.ErrKeyRequired):
		return fmt.Errorf("%w: give it with --key-file (or RELAYCTL_BACKUP_KEY_FILE, or the key itself in RELAY_BACKUP_KEY)", err)
	case errors.Is(err, backup.ErrPlaintext):
		return fmt.Errorf("%w; to check a plaintext backup you wrote yourself without a key, add --allow-plaintext", err)
	}
	return err
}

func (a *app) backupVerifyCommand() *cobra.Command {
	var keyFile string
	var allowPlaintext bool
	cmd := &cobra.Command{
		Use:   "verify FILE|DIR",
		Short: "Check a backup file (or every backup in a directory) offline: decrypt, decode every record, check the checksums",
		Long: `Check a backup file offline, without a cluster: an encrypted backup is
decrypted with --key-file (every chunk authenticated), every record is decoded
and the export's order, record count and CRC-32C are checked. It exits non-zero
with the reason when the file is truncated, modified, encrypted to another key,
or not a backup; a backup that verifies restores with "relayd control --restore".

With a key, a plaintext (unencrypted) backup fails unless --allow-plaintext is
given: nothing authenticates one, so where backups are encrypted, one that is
not may have been put in place of one (relayd control refuses to restore it
too, without --restore-allow-plaintext). A backup named .age that is not
encrypted is reported as such.

Given a directory (a control node's --backup-dir), it checks every scheduled
backup in it, oldest first, and fails if any does not verify.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			key, err := a.backupKey(keyFile)
			if err != nil {
				return err
			}
			files := []string{args[0]}
			if fi, err := os.Stat(args[0]); err == nil && fi.IsDir() {
				list, err := backup.List(args[0])
				if err != nil {
					return err
				}
				if len(list) == 0 {
					return fmt.Errorf("no backups in %s", args[0])
				}
				files = files[:0]
				for _, f := range list {
					files = append(files, f.Path)
				}
			}
			var results []map[string]any
			var failed error
			for _, f := range files {
				info, err := backup.VerifyFile(f, key, backup.AllowPlaintext(allowPlaintext))
				if err != nil {
					err = withKeyHint(err)
					if len(files) == 1 {
						return err
					}
					fmt.Fprintf(a.stderr, "%v\n", err)
					failed = fmt.Errorf("some backups in %s do not verify", args[0])
					continue
				}
				// A file whose name says it is encrypted and whose content
				// is not was replaced, or misnamed: said plainly, even
				// when plaintext is allowed.
				misnamed := ""
				if !info.Encrypted && backup.NamedEncrypted(f) {
					misnamed = backup.MisnamedPlaintext
				}
				if a.output == "json" {
					v := map[string]any{"file": f, "encrypted": info.Encrypted, "records": info.Records,
						"applied_index": info.AppliedIndex, "bytes": info.Size, "sha256": hex.EncodeToString(info.PlainSHA256[:])}
					if misnamed != "" {
						v["warning"] = misnamed
					}
					results = append(results, v)
					continue
				}
				enc := "not encrypted"
				switch {
				case info.Encrypted:
					enc = "encrypted to " + key.Recipient()
				case misnamed != "":
					enc = misnamed
				}
				fmt.Fprintf(a.stdout, "%s verified: %d records, applied index %d, %d bytes, %s\n", f, info.Records, info.AppliedIndex, info.Size, enc)
			}
			if a.output == "json" {
				var err error
				if len(files) == 1 && len(results) == 1 {
					err = printValue(a.stdout, results[0])
				} else {
					err = printValue(a.stdout, results)
				}
				if err != nil {
					return err
				}
			}
			return failed
		},
	}
	cmd.Flags().StringVar(&keyFile, "key-file", "", "age identity file the backup is encrypted to [RELAYCTL_BACKUP_KEY_FILE]; or the key itself in RELAY_BACKUP_KEY")
	cmd.Flags().BoolVar(&allowPlaintext, "allow-plaintext", false, "with a key: check a plaintext backup too, instead of failing (nothing authenticates one: only a file you wrote without a key)")
	return cmd
}

func (a *app) backupKeygenCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "keygen FILE",
		Short: "Write a new backup encryption key (an age identity) to FILE, mode 0600, and print its public half",
		Long: `Write a new backup encryption key (an X25519 age identity, the format of
age-keygen) to FILE with mode 0600; FILE must not exist. Give it to relayd
control as --backup-key-file, keep a copy apart from the backups (without it
they cannot be restored), and never store it next to them.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			key, secret, err := backup.GenerateKey()
			if err != nil {
				return err
			}
			f, err := os.OpenFile(args[0], os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
			if err != nil {
				return fmt.Errorf("keygen: %w", err)
			}
			_, err = fmt.Fprintf(f, "# relay backup key, created %s\n# public key: %s\n%s\n", time.Now().UTC().Format(time.RFC3339), key.Recipient(), secret)
			if err == nil {
				err = f.Sync()
			}
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				_ = os.Remove(args[0])
				return fmt.Errorf("keygen: %w", err)
			}
			if a.output == "json" {
				return printValue(a.stdout, map[string]any{"file": args[0], "recipient": key.Recipient()})
			}
			fmt.Fprintf(a.stdout, "wrote %s; public key: %s\n", args[0], key.Recipient())
			return nil
		},
	}
}

// backup streams a backup into a temporary file next to dst, verifies it
// end to end (format, record order, checksum), and only then renames it
// into place, so dst is either a complete backup or untouched. A stream
// that fails is started again, from scratch, on the next member.
func (a *app) backup(ctx context.Context, dst string, key *backup.Key, stale bool) error {
	// A backup takes as long as it takes: --timeout bounds each attempt
	// to start it only. Each attempt writes a file of its own, so a
	// retried stream never appends to a cut one.
	var info backup.Info
	a.prepare(ctx)
	eps := a.endpoints()
	if stale && len(eps) > 1 {
		// What this member applied, not another's: survivors differ.
		eps = eps[:1]
	}
	var from string
	err := a.callOn(ctx, eps, "backup", retryAlways, func(actx context.Context, base string) error {
		from = base
		sctx, cancel := context.WithCancel(ctx)
		defer cancel()
		var err error
		info, err = backup.WriteFile(sctx, dst, key, func(w io.Writer) error {
			stream, err := a.backupClient(base).Backup(sctx, connect.NewRequest(&controlv1.BackupRequest{Stale: stale}))
			if err != nil {
				return err
			}
			defer stream.Close()
			for stream.Receive() {
				if _, err := w.Write(stream.Msg().GetData()); err != nil {
					return fmt.Errorf("write: %w", err)
				}
			}
			return oversizedBackupMessage(stream.Err())
		})
		return err
	})
	if err != nil {
		return err
	}
	if a.output == "json" {
		return printValue(a.stdout, map[string]any{"file": dst, "bytes": info.Size, "records": info.Records,
			"applied_index": info.AppliedIndex, "encrypted": info.Encrypted})
	}
	enc := ""
	if info.Encrypted {
		enc = ", encrypted"
	}
	if stale {
		enc += fmt.Sprintf(", stale: applied index %d of %s", info.AppliedIndex, a.nodeName(from))
	}
	fmt.Fprintf(a.stdout, "wrote %s: %d bytes, %d records%s, verified\n", dst, info.Size, info.Records, enc)
	return nil
}

// maxBackupMessageBytes bounds one message of the Backup stream, as sent
// and once decompressed. The control plane sends messages of
// backup.StreamChunkBytes (256 KiB) of data; four times that leaves room
// for a release that sends larger ones, and keeps what a compromised
// node, or anyone in the middle of a plain http:// connection, can make
// relayctl allocate per message at 1 MiB instead of Connect's 4 GiB.
const maxBackupMessageBytes = 4 * backup.StreamChunkBytes

// backupClient is the ClusterService client of the Backup stream, whose
// messages it bounds by maxBackupMessageBytes; gzipbound stops inflating
// a compressed one at that size (Connect's own decompressor inflates all
// of it to tell its size).
func (a *app) backupClient(base string) controlv1connect.ClusterServiceClient {
	return controlv1connect.NewClusterServiceClient(a.http, base, a.opts(base),
		connect.WithReadMaxBytes(maxBackupMessageBytes),
		connect.WithAcceptCompression("gzip", gzipbound.Decompressor(maxBackupMessageBytes), gzipbound.Compressor))
}

// oversizedBackupMessage says what a Backup stream refused by its read
// limit means: Connect reports it as resource_exhausted made here (not
// sent by the server, which uses that code when the client stopped
// reading), with the sizes only.
func oversizedBackupMessage(err error) error {
	if err == nil || connect.CodeOf(err) != connect.CodeResourceExhausted || connect.IsWireError(err) {
		return err
	}
	return fmt.Errorf("the server sent a backup message larger than relayctl accepts (at most %d bytes; the control plane sends messages of %d): refused, nothing written: %w",
		maxBackupMessageBytes, backup.StreamChunkBytes, err)
}
