package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"path/filepath"
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
	cfg := server.Config{
		NodeID: "dev", DataDir: filepath.Join(dataDir, "control"),
		RaftAddr: raftAddr, APIAddr: apiAddr, AdminAddr: adminAddr,
		Bootstrap: true, Logger: log,
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
	fmt.Fprintf(stdout, devBanner, s.APIURL(), s.AdminAddr(), s.AdminAddr(), dataDir, s.APIURL(), s.APIURL())
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

Try it from another terminal:

  bin/relayctl --server %s cluster status
  bin/relayctl --server %s backup /tmp/relay-backup.bin

Stop with Ctrl-C.
`
