package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/edge-relay/relay/edge/client"
)

// rtt: device A sends a durable event to B; it is delivered when A's
// Send returns (B's receipt relayed back as A's Ack): a round trip
// through the edge, one event at a time.
func (d *driverConfig) rtt(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("rtt", flag.ContinueOnError)
	count := fs.Int("count", 10000, "round trips to time")
	size := fs.Int("size", 64, "payload bytes")
	if err := fs.Parse(args); err != nil {
		return err
	}
	devs, err := d.provision(ctx, 1, 2)
	if err != nil {
		return err
	}
	dl, err := d.newDialer(ctx)
	if err != nil {
		return err
	}
	defer dl.close()
	a, err := dl.dial(ctx, devs[0][0])
	if err != nil {
		return err
	}
	defer a.Close()
	b, err := dl.dial(ctx, devs[0][1])
	if err != nil {
		return err
	}
	defer b.Close()
	go func() {
		for range b.Events() {
		}
	}()
	payload := make([]byte, *size)
	target := []string{devs[0][1].id}
	for range 500 { // warm up
		if err := a.Send(ctx, client.Message{Targets: target, Payload: payload}); err != nil {
			return fmt.Errorf("warm-up: %w", err)
		}
	}
	samples := make([]time.Duration, 0, *count)
	start := time.Now()
	for range *count {
		t := time.Now()
		if err := a.Send(ctx, client.Message{Targets: target, Payload: payload}); err != nil {
			return err
		}
		samples = append(samples, time.Since(t))
	}
	el := time.Since(start)
	slices.Sort(samples)
	return d.report("rtt", [][2]any{
		{"transport", d.transport}, {"payload_bytes", *size}, {"round_trips", *count},
		{"p50_us", us(percentile(samples, 0.5))}, {"p90_us", us(percentile(samples, 0.9))},
		{"p99_us", us(percentile(samples, 0.99))}, {"max_us", us(samples[len(samples)-1])},
		{"round_trips_per_s", float64(*count) / el.Seconds()},
	})
}

// rate: pairs of devices (each pair one user), durable events sent at a
// fixed total rate, open loop: latency is measured from the scheduled
// send time, so a slow edge shows up as latency, not as a lower rate.
func (d *driverConfig) rate(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("rate", flag.ContinueOnError)
	pairs := fs.Int("pairs", 50, "sender/receiver pairs")
	rate := fs.Float64("rate", 2000, "events per second in total")
	dur := fs.Duration("duration", 20*time.Second, "how long to send")
	size := fs.Int("size", 64, "payload bytes")
	if err := fs.Parse(args); err != nil {
		return err
	}
	devs, err := d.provision(ctx, *pairs, 2)
	if err != nil {
		return err
	}
	dl, err := d.newDialer(ctx)
	if err != nil {
		return err
	}
	defer dl.close()
	type pair struct{ tx, rx *client.Client }
	ps := make([]pair, *pairs)
	err = parallel(ctx, *pairs, d.concurrency, func(ctx context.Context, i int) error {
		tx, err := dl.dial(ctx, devs[i][0])
		if err != nil {
			return err
		}
		rx, err := dl.dial(ctx, devs[i][1])
		if err != nil {
			_ = tx.Close()
			return err
		}
		ps[i] = pair{tx, rx}
		return nil
	})
	defer func() {
		for _, p := range ps {
			if p.tx != nil {
				_ = p.tx.Close()
				_ = p.rx.Close()
			}
		}
	}()
	if err != nil {
		return err
	}
	var received atomic.Int64
	var wg sync.WaitGroup
	rctx, stopReceivers := context.WithCancel(ctx)
	for _, p := range ps {
		wg.Go(func() {
			for {
				if _, err := p.rx.Receive(rctx); err != nil {
					return
				}
				received.Add(1)
			}
		})
	}
	payload := make([]byte, *size)
	interval := time.Duration(float64(time.Second) / *rate)
	var (
		mu      sync.Mutex
		samples []time.Duration
		errs    = map[string]int{}
	)
	start := time.Now()
	var sends sync.WaitGroup
	n := int(dur.Seconds() * *rate)
	for i := range n {
		at := start.Add(time.Duration(i) * interval)
		if w := time.Until(at); w > 0 {
			t := time.NewTimer(w)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
			}
		}
		if ctx.Err() != nil {
			break
		}
		p := ps[i%len(ps)]
		target := []string{devs[i%len(ps)][1].id}
		sends.Go(func() {
			err := p.tx.Send(ctx, client.Message{Targets: target, Payload: payload})
			lat := time.Since(at)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				var ce *client.Error
				key := err.Error()
				if errors.As(err, &ce) {
					key = ce.Code.String()
				}
				errs[key]++
				return
			}
			samples = append(samples, lat)
		})
	}
	sends.Wait()
	el := time.Since(start)
	stopReceivers()
	wg.Wait()
	slices.Sort(samples)
	return d.report("rate", [][2]any{
		{"transport", d.transport}, {"pairs", *pairs}, {"target_rate", *rate}, {"payload_bytes", *size},
		{"sent", n}, {"acked", len(samples)}, {"received", received.Load()}, {"errors", errs},
		{"acked_per_s", float64(len(samples)) / el.Seconds()},
		{"ack_p50_us", us(percentile(samples, 0.5))}, {"ack_p99_us", us(percentile(samples, 0.99))},
		{"ack_max_us", us(percentile(samples, 1))},
	})
}

// sessions: open many idle sessions and read the edge's memory before
// and after from its own metrics.
func (d *driverConfig) sessions(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("sessions", flag.ContinueOnError)
	count := fs.Int("sessions", 1000, "sessions to open (two devices per user)")
	hold := fs.Duration("hold", 5*time.Second, "how long the sessions stay idle before memory is read")
	if err := fs.Parse(args); err != nil {
		return err
	}
	users := (*count + 1) / 2
	devs, err := d.provision(ctx, users, 2)
	if err != nil {
		return err
	}
	dl, err := d.newDialer(ctx)
	if err != nil {
		return err
	}
	defer dl.close()
	mem := []string{"go_memstats_heap_inuse_bytes", "process_resident_memory_bytes", "go_goroutines", "relay_edge_sessions"}
	before, err := d.settledMetrics(ctx, mem)
	if err != nil {
		return err
	}
	clients := make([]*client.Client, users*2)
	start := time.Now()
	err = parallel(ctx, users*2, d.concurrency, func(ctx context.Context, i int) error {
		c, err := dl.dial(ctx, devs[i/2][i%2])
		if err != nil {
			return fmt.Errorf("session %d: %w", i, err)
		}
		clients[i] = c
		return nil
	})
	defer func() {
		for _, c := range clients {
			if c != nil {
				_ = c.Close()
			}
		}
	}()
	if err != nil {
		return err
	}
	openTime := time.Since(start)
	select {
	case <-time.After(*hold):
	case <-ctx.Done():
		return ctx.Err()
	}
	after, err := d.settledMetrics(ctx, mem)
	if err != nil {
		return err
	}
	n := after["relay_edge_sessions"] - before["relay_edge_sessions"]
	if n <= 0 {
		return fmt.Errorf("the edge reports %v new sessions", n)
	}
	per := func(k string) float64 { return (after[k] - before[k]) / n }
	return d.report("sessions", [][2]any{
		{"transport", d.transport}, {"sessions", n}, {"open_seconds", openTime.Seconds()},
		{"sessions_opened_per_s", n / openTime.Seconds()},
		{"edge_heap_per_session_bytes", per("go_memstats_heap_inuse_bytes")},
		{"edge_rss_per_session_bytes", per("process_resident_memory_bytes")},
		{"edge_goroutines_per_session", per("go_goroutines")},
		{"edge_heap_inuse_bytes", after["go_memstats_heap_inuse_bytes"]},
		{"driver_goroutines", runtime.NumGoroutine()},
	})
}

// settledMetrics has the edge collect its garbage (the admin port's
// heap profile with gc=1) and then reads its metrics.
func (d *driverConfig) settledMetrics(ctx context.Context, names []string) (map[string]float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, d.edgeAdmin+"/debug/pprof/heap?gc=1", nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("have the edge collect garbage: %w", err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	return d.edgeMetrics(ctx, names...)
}
