package main_test

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/backup"
)

// Scheduled encrypted backups with the binaries: relayctl makes a key,
// relayd control --backup-* writes verified age files on schedule and
// exports the metrics, relayctl backup verify checks one offline (and
// fails without its key), and relayd --restore with the key seeds a new
// cluster from it.
func TestBinariesScheduledEncryptedBackups(t *testing.T) {
	base := t.TempDir()
	ctlConfig, ctlToken = t.TempDir(), ""
	key := filepath.Join(base, "backup.key")
	out, err := relayctlIn(t, "", "127.0.0.1:1", "backup", "keygen", key)
	if err != nil || !strings.Contains(out, "age1") {
		t.Fatalf("keygen: %v %s", err, out)
	}
	dir := filepath.Join(base, "backups")
	n := newNodes(t, base, 1)[0]
	n.start(t, "--bootstrap", "--backup-dir", dir, "--backup-every", "1s", "--backup-keep", "2", "--backup-key-file", key)
	// A token of the first admin, taken before the backup: the restored
	// cluster accepts it, because the backup carried the signing keys.
	eventually(t, 30*time.Second, func() error {
		out, err := relayctlIn(t, adminPassword+"\n", n.api, "login", "--password-stdin", "admin")
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	ctlToken = strings.TrimSpace(relayctl(t, n.api, "token"))
	t.Cleanup(func() { ctlToken = "" })
	rec := n.p.waitLog(t, "wrote a verified backup", 60*time.Second)
	if f, _ := rec["file"].(string); !strings.HasPrefix(f, dir) || !strings.HasSuffix(f, ".bin.age") || rec["encrypted"] != true {
		t.Fatalf("backup log record %v", rec)
	}
	// A backup taken after the login, copied before the schedule
	// prunes it.
	loggedIn := time.Now()
	var file string
	var raw []byte
	eventually(t, 60*time.Second, func() error {
		files, err := backup.List(dir)
		if err != nil || len(files) == 0 || !files[len(files)-1].Time.After(loggedIn) {
			return fmt.Errorf("no backup after the login yet (%v)", err)
		}
		file = files[len(files)-1].Path
		raw, err = os.ReadFile(file)
		return err
	})
	file = filepath.Join(base, filepath.Base(file))
	if err := os.WriteFile(file, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, func() error {
		resp, err := http.Get("http://" + n.admin + "/metrics")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		for _, want := range []string{"relay_backup_last_success_timestamp_seconds 1.", "relay_backups_total ", "relay_backup_failures_total 0", "relay_backup_interval_seconds 1"} {
			if !strings.Contains(string(b), want) {
				return fmt.Errorf("metrics lack %q", want)
			}
		}
		return nil
	})
	if out := relayctl(t, n.api, "backup", "verify", "--key-file", key, file); !strings.Contains(out, "verified") {
		t.Fatalf("verify: %s", out)
	}
	if out, err := relayctlIn(t, "", n.api, "backup", "verify", file); err == nil || !strings.Contains(out, "encrypted") {
		t.Fatalf("verify without the key: %v %s", err, out)
	}
	n.stop(t)

	// Without the key, --restore says what is missing; with it, it works.
	r := &node{id: "r1", dir: filepath.Join(base, "r1"), raft: freePort(t), api: freePort(t), admin: freePort(t)}
	rout, err := restoreOutput(r, file)
	if err == nil || !strings.Contains(rout, "backup is encrypted") || !strings.Contains(rout, "--backup-key-file") {
		t.Fatalf("restore without the key: err=%v\n%s", err, rout)
	}
	_ = os.RemoveAll(r.dir)
	r.start(t, "--restore", file, "--backup-key-file", key)
	eventually(t, 30*time.Second, func() error {
		s := clusterStatus(t, r.api)
		if s.LeaderID != "r1" || len(s.Members) != 1 {
			return fmt.Errorf("restored cluster: %+v", s)
		}
		return nil
	})
	r.stop(t)
}
