package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/edge-relay/relay/control/server"
	"github.com/edge-relay/relay/internal/flagenv"
)

func runDev(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	fs := flag.NewFlagSet("relayd dev", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		dataDir, apiAddr, raftAddr, adminAddr string
		common                                commonFlags
	)
	fs.StringVar(&dataDir, "data-dir", "./data", "where the single node keeps its state")
	fs.StringVar(&apiAddr, "api-addr", "127.0.0.1:7400", "control API address")
	fs.StringVar(&raftAddr, "raft-addr", "127.0.0.1:7401", "Raft address")
	fs.StringVar(&adminAddr, "admin-addr", "127.0.0.1:7402", "metrics and health address")
	common.register(fs)
	fs.Usage = flagenv.Usage(fs, envPrefix, "relayd dev [flags]")
	if err := flagenv.Parse(fs, envPrefix, args, getenv); err != nil {
		return err
	}
	log, err := common.logger(stderr)
	if err != nil {
		return err
	}
	password, pwNote, err := devAdminPassword(dataDir, getenv("RELAY_ADMIN_PASSWORD"))
	if err != nil {
		return err
	}
	tel, stop, err := common.startTracing(ctx, "relay-dev", "dev")
	if err != nil {
		return err
	}
	defer stop()
	cfg := server.Config{
		NodeID: "dev", DataDir: filepath.Join(dataDir, "control"),
		RaftAddr: raftAddr, APIAddr: apiAddr, AdminAddr: adminAddr,
		Bootstrap: true, Logger: log, AdminPassword: password,
		TracerProvider: tel.TracerProvider(),
	}
	s, err := server.Start(ctx, cfg)
	if err != nil {
		return err
	}
	// Wait for the single node to elect itself before telling the user
	// the deployment is usable.
	tick := time.NewTicker(20 * time.Millisecond)
	for !s.Node().Ready() {
		select {
		case <-ctx.Done():
			tick.Stop()
			return s.Shutdown(context.Background())
		case <-tick.C:
		}
	}
	tick.Stop()
	fmt.Fprintf(stdout, devBanner, s.APIURL(), s.AdminAddr(), s.AdminAddr(), dataDir, pwNote, dataDir)
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return s.Shutdown(sctx)
}

const devBanner = `
relayd dev is running: a single-node control plane.

  control API   %s   (Connect / gRPC / JSON)
  metrics       http://%s/metrics
  health        http://%s/readyz
  data          %s   (delete it to start from scratch)
  admin login   admin, password %s

Try it from another terminal:

  bin/relayctl login --password-stdin admin < %s/admin-password
  bin/relayctl cluster status
  bin/relayctl user create --login alice --no-password
  bin/relayctl device register --user <alice's id> --name phone --generate-key phone.key
  bin/relayctl device register --user <alice's id> --name laptop --generate-key laptop.key
  bin/relayctl device list --user <alice's id>
  bin/relayctl backup /tmp/relay-backup.bin

Stop with Ctrl-C.
`

// devAdminPassword returns the admin password of the dev deployment: the
// one in RELAY_ADMIN_PASSWORD, else the one saved in DATA/admin-password
// by an earlier run, else a new random one saved there (mode 0600) so the
// next run can tell it again.
func devAdminPassword(dataDir, fromEnv string) (password, note string, err error) {
	path := filepath.Join(dataDir, "admin-password")
	if fromEnv != "" {
		if err := os.MkdirAll(dataDir, 0o700); err != nil {
			return "", "", err
		}
		if err := os.WriteFile(path, []byte(fromEnv+"\n"), 0o600); err != nil {
			return "", "", err
		}
		return fromEnv, "from RELAY_ADMIN_PASSWORD", nil
	}
	if b, err := os.ReadFile(path); err == nil {
		pw := strings.TrimSpace(string(b))
		return pw, "in " + path, nil
	}
	var raw [15]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return "", "", err
	}
	pw := base64.RawURLEncoding.EncodeToString(raw[:])
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return "", "", fmt.Errorf("create %s: %w", dataDir, err)
	}
	if err := os.WriteFile(path, []byte(pw+"\n"), 0o600); err != nil {
		return "", "", fmt.Errorf("save admin password: %w", err)
	}
	return pw, pw + " (saved in " + path + ")", nil
}
