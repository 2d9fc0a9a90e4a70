package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/clustertest"
)

// A cluster that lost its quorum for good (two of three voters' disks)
// is saved from the survivor's data dir, once it is stopped: export-state
// writes a verified backup file of what it applied, and a new cluster
// restored from it has it. A running node's dir, or a dir that holds no
// node's data, is refused.
func TestExportStateSavesWhatAStoppedNodeApplied(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := c.CreateUser(ctx, c.Leader(), "kept"); err != nil {
		t.Fatal(err)
	}
	c.WaitConverged()
	survivor := c.Follower()
	dir := filepath.Join(c.Nodes[survivor].DataDir, "data")
	file := filepath.Join(t.TempDir(), "survivor.bin")
	export := func(dir string) (string, error) {
		var out, errs bytes.Buffer
		err := run(ctx, []string{"export-state", "--data-dir", dir, file}, &out, &errs, func(string) string { return "" })
		return out.String(), err
	}
	if _, err := export(dir); err == nil || !strings.Contains(err.Error(), "is the node stopped?") {
		t.Fatalf("export from a running node's dir: %v", err)
	}
	if _, err := export(t.TempDir()); err == nil || !strings.Contains(err.Error(), "holds no control node's data") {
		t.Fatalf("export from an empty dir: %v", err)
	}
	for i := range c.Nodes {
		c.Kill(i)
	}
	out, err := export(dir)
	if err != nil || !strings.Contains(out, "verified") {
		t.Fatalf("export from the stopped survivor: %q, %v", out, err)
	}
	if _, err := os.Stat(file); err != nil {
		t.Fatal(err)
	}
	saved := clustertest.Restored(t, file, clustertest.Options{})
	if _, err := saved.Nodes[0].Server.Node().FSM().GetUser("kept"); err != nil {
		t.Fatalf("the restored cluster lacks what the survivor had: %v", err)
	}
}
