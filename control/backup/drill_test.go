package backup_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/backup"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/server"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// The restore drill: a 3-node cluster writes encrypted backups on
// schedule; the newest one, taken after the last write, seeds a fresh
// cluster (one node restores, two join it with an access token the old
// cluster signed), and the new cluster's full state is the old one's:
// every record of users, logins, devices, roles, refresh tokens, signing
// and session keys, the cluster CA and mailboxes, byte for byte. Only the
// new cluster's own node records, and the change-feed entries and request
// ids of the commands that recorded them, are new.
func TestRestoreDrill(t *testing.T) {
	key := mustKey(t, testKey)
	withBackups := func(cfg *server.Config) {
		cfg.BackupDir = filepath.Join(filepath.Dir(cfg.DataDir), "backups")
		cfg.BackupEvery = 300 * time.Millisecond
		cfg.BackupKeep = 3
		cfg.BackupKey = key
	}
	// Activity (last seen) is written in the background; an hour apart,
	// it stays out of the way of comparing the live state with the backup.
	c := clustertest.Start(t, 3, clustertest.Options{Configure: withBackups, Auth: api.AuthConfig{ActivityEvery: time.Hour}})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// State of every kind: users with roles and passwords (and the
	// refresh tokens of their logins), devices, mailbox entries.
	opToken := c.TokenFor("operator1", controlv1.Role_ROLE_OPERATOR)
	adminToken := c.AdminToken()
	for i := range 12 {
		if _, err := c.CreateUser(ctx, i%3, fmt.Sprint("user", i)); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 4 {
		if _, err := c.RegisterDevice(ctx, i%3, "user1", fmt.Sprint("dev", i)); err != nil {
			t.Fatal(err)
		}
	}
	var mail []*statev1.MailboxEntry
	for i := range 6 {
		mail = append(mail, &statev1.MailboxEntry{UserId: "user1", DeviceId: fmt.Sprint("dev", i%4), SenderDeviceId: "dev0",
			EventId: fmt.Sprint("ev", i), Event: []byte("payload"), ExpiresAtMs: time.Now().Add(time.Hour).UnixMilli()})
	}
	if _, err := c.Nodes[2].Server.Node().Apply(ctx, &statev1.Command{Op: &statev1.Command_PutMailbox{PutMailbox: &statev1.PutMailbox{Entries: mail}}}); err != nil {
		t.Fatal(err)
	}
	lastWrite := time.Now()

	// Wait for a scheduled backup that started after the last write.
	var newest backup.File
	var raw []byte
	clustertest.Eventually(t, time.Minute, func() error {
		for _, n := range c.Nodes {
			files, err := backup.List(filepath.Join(n.DataDir, "backups"))
			if err != nil {
				continue
			}
			for _, f := range files {
				if f.Time.After(newest.Time) {
					newest = f
				}
			}
		}
		if !newest.Time.After(lastWrite) {
			return fmt.Errorf("newest backup %v is not after the last write %v", newest.Time, lastWrite)
		}
		// Keep it before the schedule prunes it, as an operator copies
		// backups off the machine.
		var err error
		raw, err = os.ReadFile(newest.Path)
		return err
	})
	if !newest.Encrypted {
		t.Fatalf("scheduled backup %s is not encrypted", newest.Path)
	}
	newest.Path = filepath.Join(t.TempDir(), filepath.Base(newest.Path))
	if err := os.WriteFile(newest.Path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	// The metric follows the file (it is set just after the rename).
	clustertest.Eventually(t, 10*time.Second, func() error {
		var last float64
		for _, n := range c.Running() {
			last = max(last, n.Metric(t, "relay_backup_last_success_timestamp_seconds"))
		}
		if last < float64(newest.Time.UnixMilli())/1e3 {
			return fmt.Errorf("newest last-success metric %v is before the newest backup %v", last, newest.Time)
		}
		return nil
	})
	l := c.Leader()
	info, err := backup.VerifyFile(newest.Path, key)
	if err != nil {
		t.Fatal(err)
	}
	want := dump(t, newest.Path, key)
	// The backup is the old cluster's whole state as it stood.
	var live bytes.Buffer
	if _, err := c.Nodes[l].Server.Node().FSM().WriteBackup(&live); err != nil {
		t.Fatal(err)
	}
	if got := clustertest.Records(t, live.Bytes()); !maps.Equal(got, want) {
		t.Fatalf("the backup (index %d) differs from the live state", info.AppliedIndex)
	}
	for prefix, min := range map[string]int{"u:": 14, "l:": 14, "d:": 4, "t:": 2, "s:": 1, "k:": 1, "b:": 6, "B:": 4, "m:ca": 1, "m:initialized": 1} {
		if n := countPrefix(want, prefix); n < min {
			t.Fatalf("backup holds %d records %q, want at least %d", n, prefix, min)
		}
	}
	c.Stop()

	// Disaster: the old cluster is gone. A fresh one from the backup.
	r := clustertest.Empty(t, clustertest.Options{Configure: func(cfg *server.Config) { cfg.BackupKey = key }})
	first := r.StartNode(func(cfg *server.Config) { cfg.RestoreFrom = newest.Path })
	r.WaitReady()
	for range 2 {
		r.StartNode(func(cfg *server.Config) {
			cfg.Join = []string{first.Server.APIAddr()}
			cfg.JoinToken = adminToken // signed by the old cluster's key, which the backup carried
		})
	}
	r.WaitReady()
	if got := len(r.VoterIDs(0)); got != 3 {
		t.Fatalf("restored cluster has %d voters", got)
	}
	r.WaitConverged()
	for _, n := range r.Running() {
		var b bytes.Buffer
		if _, err := n.Server.Node().FSM().WriteBackup(&b); err != nil {
			t.Fatal(err)
		}
		got := clustertest.Records(t, b.Bytes())
		// The restore draws a new history id.
		if got["m:history"] == "" || got["m:history"] == want["m:history"] {
			t.Fatalf("%s: history %q after restore, the backup's %q", n.ID, got["m:history"], want["m:history"])
		}
		for k, v := range want {
			if k == "m:applied" || k == "m:history" || strings.HasPrefix(k, "n:") {
				continue
			}
			if gv, ok := got[k]; !ok || gv != v {
				t.Fatalf("%s: record %q of the backup is missing or changed", n.ID, k)
			}
		}
		for k := range got {
			if _, ok := want[k]; ok || k == "m:applied" || k == "m:history" || strings.HasPrefix(k, "n:") {
				continue
			}
			if !newRevision(k, info.AppliedIndex) {
				t.Fatalf("%s: record %q is neither the backup's nor a node record of the new cluster", n.ID, k)
			}
		}
	}
	// And it serves: the operator's old token and the first admin's
	// password still work.
	if opToken == "" || r.Login("operator1", "password-of-operator1").GetAccessToken() == "" {
		t.Fatal("the operator cannot log in to the restored cluster")
	}
}

// newRevision reports whether k is a change-feed record or a request id
// of a revision after rev (the commands the new cluster applied itself).
func newRevision(k string, rev uint64) bool {
	switch {
	case strings.HasPrefix(k, "c:"), strings.HasPrefix(k, "Q:"):
		return len(k) >= 10 && binary.BigEndian.Uint64([]byte(k[2:10])) > rev
	case strings.HasPrefix(k, "q:"):
		return true // its Q: twin is checked for its revision
	}
	return false
}

func dump(t *testing.T, path string, key *backup.Key) map[string]string {
	t.Helper()
	rc, err := backup.OpenFile(path, key)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	return clustertest.Records(t, b)
}

func countPrefix(m map[string]string, p string) int {
	n := 0
	for k := range m {
		if strings.HasPrefix(k, p) {
			n++
		}
	}
	return n
}
