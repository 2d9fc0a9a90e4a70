package api_test

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"runtime/metrics"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
	"github.com/edge-relay/relay/control/server"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// BenchmarkMailboxPut measures mailbox commits on a 3-node loopback
// cluster: 64 writers keep PutMailbox calls in flight on the leader, each
// carrying `batch` entries of 256-byte events spread over 256 devices, so
// Raft batches concurrent commands into shared log rounds. "apply"
// proposes through the node (raftnode.Apply), "api" calls MailboxService
// over HTTP/2 as an edge does. A call's latency runs from sending to the
// committed result (replicated to a quorum, fsynced, applied). b.N counts
// calls; entries/s counts stored entries.
func BenchmarkMailboxPut(b *testing.B) {
	const writers, devices, eventBytes = 64, 256, 256
	for _, path := range []string{"apply", "api"} {
		for _, batch := range []int{1, 32} {
			b.Run(fmt.Sprintf("%s/batch=%d", path, batch), func(b *testing.B) {
				c := clustertest.Start(b, 3, clustertest.Options{Configure: func(cfg *server.Config) {
					// Unbounded for the benchmark: quotas would refuse once
					// b.N grows.
					cfg.Mailbox = api.MailboxConfig{MaxEntriesPerDevice: fsm.MaxMailboxQuotaEntries, MaxBytesPerDevice: fsm.MaxMailboxQuotaBytes}
				}})
				li := c.Leader()
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
				defer cancel()
				for u := 0; u < devices/16; u++ {
					if _, err := c.CreateUser(ctx, li, fmt.Sprint("u", u)); err != nil {
						b.Fatal(err)
					}
					for d := 0; d < 16; d++ {
						if _, err := c.RegisterDevice(ctx, li, fmt.Sprint("u", u), fmt.Sprintf("d%d-%d", u, d)); err != nil {
							b.Fatal(err)
						}
					}
				}
				node := c.Nodes[li].Server.Node()
				var cl edgev1connect.MailboxServiceClient
				if path == "api" {
					token := c.TokenFor("bench-edge", controlv1.Role_ROLE_EDGE)
					d := api.NewDialer(nil)
					defer d.Close()
					cl = edgev1connect.NewMailboxServiceClient(d.HTTPClient(), d.URL(c.Nodes[li].Server.APIAddr()), connect.WithInterceptors(bearer(token)))
				}
				event := make([]byte, eventBytes)
				var seq atomic.Int64
				entries := func() []*edgev1.MailboxEntry {
					out := make([]*edgev1.MailboxEntry, batch)
					exp := time.Now().Add(time.Hour).UnixMilli()
					for i := range out {
						n := seq.Add(1)
						u, d := n%(devices/16), (n/(devices/16))%16
						out[i] = &edgev1.MailboxEntry{UserId: fmt.Sprint("u", u), DeviceId: fmt.Sprintf("d%d-%d", u, d),
							SenderDeviceId: "sender", EventId: fmt.Sprint("ev", n), Event: event, ExpiresAtMs: exp}
					}
					return out
				}
				call := func() error {
					in := entries()
					if cl != nil {
						resp, err := cl.PutMailbox(ctx, connect.NewRequest(&edgev1.PutMailboxRequest{Entries: in}))
						if err == nil && resp.Msg.GetResults()[batch-1].GetStatus() != edgev1.MailboxStatus_MAILBOX_STATUS_STORED {
							err = fmt.Errorf("not stored: %v", resp.Msg.GetResults()[batch-1])
						}
						return err
					}
					se := make([]*statev1.MailboxEntry, len(in))
					for i, e := range in {
						se[i] = &statev1.MailboxEntry{UserId: e.UserId, DeviceId: e.DeviceId, SenderDeviceId: e.SenderDeviceId,
							EventId: e.EventId, Event: e.Event, ExpiresAtMs: e.ExpiresAtMs}
					}
					res, err := node.Apply(ctx, &statev1.Command{Op: &statev1.Command_PutMailbox{PutMailbox: &statev1.PutMailbox{
						Entries: se, MaxEntriesPerDevice: fsm.MaxMailboxQuotaEntries, MaxBytesPerDevice: fsm.MaxMailboxQuotaBytes}}})
					if err == nil && res.GetMailboxResults()[batch-1].GetStatus() != statev1.MailboxStatus_MAILBOX_STATUS_STORED {
						err = fmt.Errorf("not stored: %v", res.GetMailboxResults()[batch-1])
					}
					return err
				}
				b.SetBytes(int64(batch * eventBytes))
				b.ResetTimer()
				lat, err := clustertest.Load(writers, b.N, call)
				elapsed := b.Elapsed()
				b.StopTimer()
				if err != nil {
					b.Fatal(err)
				}
				if len(lat) > 0 {
					b.ReportMetric(float64(len(lat)*batch)/elapsed.Seconds(), "entries/s")
					b.ReportMetric(float64(len(lat))/elapsed.Seconds(), "calls/s")
					b.ReportMetric(float64(clustertest.Percentile(lat, 50).Microseconds()), "p50-us")
					b.ReportMetric(float64(clustertest.Percentile(lat, 99).Microseconds()), "p99-us")
				}
			})
		}
	}
}

// BenchmarkFollowerCatchUp measures the heap a 3-node cluster (one
// process) holds while a follower that was down catches up on 64 calls
// of 8 MiB of mailbox entries (32 of 256 KiB each, what an edge's
// mailbox writer sends at most): "api" put them through MailboxService,
// which proposes at most api.MaxCommandEventBytes per command; "command"
// proposed each call as one command, as the API did before. Raft sends a
// lagging follower up to 64 log entries per AppendEntries. Reported: the
// catch-up's duration, the peak of runtime.MemStats.HeapInuse (sampled
// every 5 ms) over the heap in use before it, and the peak of the live
// heap (as of each GC: /gc/heap/live:bytes) over the live heap before
// it. Run with -benchtime 1x and RELAY_BENCH_CATCHUP=1: "command" holds some 5 GiB of heap at its peak
// and each run writes some 3 GiB to temporary directories, more than
// `make bench` on a small machine should.
func BenchmarkFollowerCatchUp(b *testing.B) {
	if os.Getenv("RELAY_BENCH_CATCHUP") != "1" {
		b.Skip("set RELAY_BENCH_CATCHUP=1: this benchmark holds some 5 GiB of heap and writes 3 GiB to temporary directories")
	}
	const calls, perCall, eventBytes = 64, 32, 256<<10 - 1<<10
	for _, path := range []string{"api", "command"} {
		b.Run(path, func(b *testing.B) {
			for range b.N {
				catchUp(b, path, calls, perCall, eventBytes, 1, 0)
			}
		})
	}
}

// BenchmarkFollowerApplyBacklog is BenchmarkFollowerCatchUp with 1,024
// commands of 1 MiB (4 events of 255 KiB, spread over two devices: a
// device holds at most 1 GiB), each one Raft entry as the API proposes
// them. It also reports the largest number of entries the follower had
// committed but not yet applied (its commit index minus its FSM's
// applied index, sampled every 5 ms): hashicorp/raft queues up to 128
// batches of MaxAppendEntries (64) entries for the FSM, each entry read
// back from the log store, so a follower whose FSM applies slower than
// its log stores could hold up to 8,192 such entries in memory, were it
// not for the node's bound on them (raftnode's MaxUnappliedBytes; the
// follower's log store waits beyond it: reported as store-wait-s). Run with
// RELAY_BENCH_CATCHUP=1 and -benchtime 1x: each run writes some 6 GiB to
// temporary directories.
func BenchmarkFollowerApplyBacklog(b *testing.B) {
	if os.Getenv("RELAY_BENCH_CATCHUP") != "1" {
		b.Skip("set RELAY_BENCH_CATCHUP=1: this benchmark writes some 6 GiB to temporary directories")
	}
	// As the node runs (raftnode.DefaultMaxUnappliedBytes, which this
	// backlog stays under), and with the state machine's queue bounded
	// below what it reaches here.
	for _, bound := range []uint64{raftnode.DefaultMaxUnappliedBytes, 16 << 20} {
		b.Run(fmt.Sprintf("bound=%dMiB", bound>>20), func(b *testing.B) {
			for range b.N {
				catchUp(b, "command", 1024, 4, 255<<10, 2, bound)
			}
		})
	}
}

func catchUp(b *testing.B, path string, calls, perCall, eventBytes, devices int, maxUnapplied uint64) {
	b.StopTimer()
	tuning := clustertest.FastRaft()
	tuning.MaxUnappliedBytes = maxUnapplied
	c := clustertest.Start(b, 3, clustertest.Options{Raft: tuning, Configure: func(cfg *server.Config) {
		cfg.Mailbox = api.MailboxConfig{MaxEntriesPerDevice: fsm.MaxMailboxQuotaEntries, MaxBytesPerDevice: fsm.MaxMailboxQuotaBytes}
	}})
	defer c.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	li := c.Leader()
	if _, err := c.CreateUser(ctx, li, "u"); err != nil {
		b.Fatal(err)
	}
	for d := range devices {
		if _, err := c.RegisterDevice(ctx, li, "u", fmt.Sprint("d", d)); err != nil {
			b.Fatal(err)
		}
	}
	f := c.Follower()
	c.Shutdown(f)
	li = c.Leader()
	node := c.Nodes[li].Server.Node()
	d := api.NewDialer(nil)
	defer d.Close()
	cl := edgev1connect.NewMailboxServiceClient(d.HTTPClient(), d.URL(c.Nodes[li].Server.APIAddr()),
		connect.WithInterceptors(bearer(c.TokenFor("bench-edge", controlv1.Role_ROLE_EDGE))))
	event := make([]byte, eventBytes)
	exp := time.Now().Add(time.Hour).UnixMilli()
	for i := range calls {
		in := make([]*edgev1.MailboxEntry, perCall)
		se := make([]*statev1.MailboxEntry, perCall)
		dev := fmt.Sprint("d", i%devices)
		for j := range in {
			in[j] = &edgev1.MailboxEntry{UserId: "u", DeviceId: dev, SenderDeviceId: "s", EventId: fmt.Sprint(i, "-", j), Event: event, ExpiresAtMs: exp}
			se[j] = &statev1.MailboxEntry{UserId: "u", DeviceId: dev, SenderDeviceId: "s", EventId: in[j].EventId, Event: event, ExpiresAtMs: exp}
		}
		var err error
		if path == "api" {
			_, err = cl.PutMailbox(ctx, connect.NewRequest(&edgev1.PutMailboxRequest{Entries: in}))
		} else {
			_, err = node.Apply(ctx, &statev1.Command{ProposedAtMs: time.Now().UnixMilli(), Op: &statev1.Command_PutMailbox{PutMailbox: &statev1.PutMailbox{
				Entries: se, MaxEntriesPerDevice: fsm.MaxMailboxQuotaEntries, MaxBytesPerDevice: fsm.MaxMailboxQuotaBytes}}})
		}
		if err != nil {
			b.Fatal(err)
		}
	}
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base := ms.HeapInuse
	peak := base
	// The live heap as of the last GC: what the heap in use holds beyond
	// it is garbage not yet collected.
	live := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	metrics.Read(live)
	baseLive := live[0].Value.Uint64()
	peakLive := baseLive
	// One sampler: the heap from before the restart, and once the
	// follower runs, the most entries it had committed and not applied.
	var follower atomic.Pointer[raftnode.Node]
	var backlog uint64
	stop, sampled := make(chan struct{}), make(chan struct{})
	var stopOnce sync.Once
	end := func() { stopOnce.Do(func() { close(stop); <-sampled }) }
	defer end() // also when the restart fails
	go func() {
		defer close(sampled)
		t := time.NewTicker(5 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
			}
			var m runtime.MemStats
			runtime.ReadMemStats(&m)
			peak = max(peak, m.HeapInuse)
			metrics.Read(live)
			peakLive = max(peakLive, live[0].Value.Uint64())
			if n := follower.Load(); n != nil {
				if st, err := n.Status(); err == nil && st.CommitIndex > st.AppliedIndex {
					backlog = max(backlog, st.CommitIndex-st.AppliedIndex)
				}
			}
		}
	}()
	want := node.FSM().AppliedIndex()
	b.StartTimer()
	start := time.Now()
	c.Restart(f)
	follower.Store(c.Nodes[f].Server.Node())
	err := follower.Load().FSM().WaitApplied(ctx, want)
	took := time.Since(start)
	b.StopTimer()
	end()
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(took.Seconds(), "catch-up-s")
	b.ReportMetric(float64(peak-base)/(1<<20), "peak-heap-MiB")
	b.ReportMetric(float64(peakLive-baseLive)/(1<<20), "peak-live-MiB")
	b.ReportMetric(float64(backlog), "max-backlog-entries")
	// How long the follower's log store waited for its state machine
	// (raftnode's bound on the state machine's queue).
	b.ReportMetric(clustertest.MetricValue(b, c.Nodes[f].Server.Registry(), "relay_control_raft_store_wait_seconds_total"), "store-wait-s")
}
