package raftnode_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
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
				var mu sync.Mutex
				lat := make([]time.Duration, 0, b.N)
				work := make(chan struct{}, b.N)
				for i := 0; i < b.N; i++ {
					work <- struct{}{}
				}
				close(work)
				b.SetBytes(int64(size))
				b.ResetTimer()
				var wg sync.WaitGroup
				for w := 0; w < mode.writers; w++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						mine := make([]time.Duration, 0, b.N/mode.writers+1)
						for range work {
							cmd := paddedNoop(size)
							cmd.RequestId = ""
							start := time.Now()
							if _, err := node.Apply(ctx, cmd); err != nil {
								b.Error(err)
								return
							}
							mine = append(mine, time.Since(start))
						}
						mu.Lock()
						lat = append(lat, mine...)
						mu.Unlock()
					}()
				}
				wg.Wait()
				elapsed := b.Elapsed()
				b.StopTimer()
				slices.Sort(lat)
				if len(lat) > 0 {
					b.ReportMetric(float64(len(lat))/elapsed.Seconds(), "writes/s")
					b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-us")
					b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-us")
				}
			})
		}
	}
}
