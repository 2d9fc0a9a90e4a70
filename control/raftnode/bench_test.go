package raftnode_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/control/clustertest"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// paddedNoop returns a Noop command whose encoding is size bytes.
func paddedNoop(size int) *statev1.Command {
	cmd := &statev1.Command{RequestId: "0123456789abcdef0123456789abcdef", ProposedAtMs: time.Now().UnixMilli(),
		Op: &statev1.Command_Noop{Noop: &statev1.Noop{}}}
	pad := size - proto.Size(cmd) - 3
	if pad < 0 {
		pad = 0
	}
	cmd.GetNoop().Padding = make([]byte, pad)
	return cmd
}

// BenchmarkCommit measures committed writes per second and commit latency
// (propose on the leader -> result back, so replicated to a quorum, fsynced
// and applied) on a 3-node loopback cluster. "serial" has one write in
// flight and Raft's apply batching off; "batched" has 64 concurrent
// writers with BatchApplyCh on, so many commands share one log round.
func BenchmarkCommit(b *testing.B) {
	for _, mode := range []struct {
		name    string
		writers int
		batch   bool
	}{{"serial", 1, false}, {"batched", 64, true}} {
		for _, size := range []int{64, 1024} {
			b.Run(fmt.Sprintf("%s/%dB", mode.name, size), func(b *testing.B) {
				raft := clustertest.FastRaft()
				raft.NoBatchApply = !mode.batch
				c := clustertest.Start(b, 3, clustertest.Options{Raft: raft})
				node := c.Nodes[c.Leader()].Server.Node()
				ctx := context.Background()
				b.SetBytes(int64(size))
				b.ResetTimer()
				lat, err := clustertest.Load(mode.writers, b.N, func() error {
					cmd := paddedNoop(size)
					cmd.RequestId = ""
					_, err := node.Apply(ctx, cmd)
					return err
				})
				elapsed := b.Elapsed()
				b.StopTimer()
				if err != nil {
					b.Fatal(err)
				}
				if len(lat) > 0 {
					b.ReportMetric(float64(len(lat))/elapsed.Seconds(), "writes/s")
					b.ReportMetric(float64(clustertest.Percentile(lat, 50).Microseconds()), "p50-us")
					b.ReportMetric(float64(clustertest.Percentile(lat, 99).Microseconds()), "p99-us")
				}
			})
		}
	}
}
