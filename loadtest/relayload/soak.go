package main

import (
	"bufio"
	"context"
	"encoding/csv"
	"flag"
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/edge-relay/relay/edge/client"
)

// soakColumns are the edge's gauges a soak samples, in CSV order after
// the elapsed seconds.
var soakColumns = []string{"go_memstats_heap_inuse_bytes", "process_resident_memory_bytes", "go_goroutines", "relay_edge_sessions"}

// soak: a moderate, steady load for a long time, with sessions coming
// and going beside it, while the edge's heap, RSS, goroutines and
// sessions are sampled into a CSV file and plotted to a PNG at the end:
// what grows only with time shows as a slope.
func (d *driverConfig) soak(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("soak", flag.ContinueOnError)
	pairs := fs.Int("pairs", 20, "sender/receiver pairs that stay connected")
	rate := fs.Float64("rate", 500, "events per second in total")
	churn := fs.Float64("churn", 2, "sessions per second that connect, exchange an event and leave, besides the pairs")
	dur := fs.Duration("duration", time.Hour, "how long to run")
	sample := fs.Duration("sample", 10*time.Second, "how often to sample the edge's metrics")
	csvPath := fs.String("csv", "soak.csv", "where to write the samples")
	pngPath := fs.String("png", "soak.png", "where to plot them (empty: no plot)")
	size := fs.Int("size", 64, "payload bytes")
	if err := fs.Parse(args); err != nil {
		return err
	}
	r := newResult("soak", d.transport)
	r.Params["pairs"], r.Params["rate"], r.Params["churn"], r.Params["duration_s"] = float64(*pairs), *rate, *churn, dur.Seconds()
	churners := max(int(*churn*2), 2) // devices cycling, in pairs of a user
	devs, dl, err := d.prepare(ctx, *pairs+churners/2)
	if err != nil {
		return err
	}
	defer dl.close()
	ps, err := d.openPairs(ctx, dl, r, devs[:*pairs], false)
	if err != nil {
		return err
	}
	defer closePairs(ps)

	f, err := os.Create(*csvPath)
	if err != nil {
		return err
	}
	defer f.Close()
	w := csv.NewWriter(bufio.NewWriter(f))
	_ = w.Write(append([]string{"elapsed_s"}, soakColumns...))

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	start := time.Now()
	var wg sync.WaitGroup
	var samples [][]float64 // appended by the sampler, read after it stopped
	var sampled atomic.Int64
	sampleOnce := func(ctx context.Context) {
		m, err := d.edgeMetrics(ctx, soakColumns...)
		if err != nil {
			r.fail("metrics: " + cause(err))
			return
		}
		row := []float64{time.Since(start).Seconds()}
		rec := []string{strconv.FormatFloat(row[0], 'f', 1, 64)}
		for _, c := range soakColumns {
			row = append(row, m[c])
			rec = append(rec, strconv.FormatFloat(m[c], 'f', -1, 64))
		}
		samples = append(samples, row)
		sampled.Add(1)
		_ = w.Write(rec)
		w.Flush()
		r.peak(c2peak("go_memstats_heap_inuse_bytes"), m["go_memstats_heap_inuse_bytes"])
		r.peak(c2peak("go_goroutines"), m["go_goroutines"])
	}
	wg.Go(func() {
		t := time.NewTicker(*sample)
		defer t.Stop()
		sampleOnce(ctx)
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				sampleOnce(ctx)
			}
		}
	})
	// Churn: users whose two devices connect (resuming when they can),
	// exchange one acknowledged event and leave, over and over.
	p := newPacer(d.concurrency, d.slowDial)
	for u := range churners / 2 {
		wg.Go(func() {
			pair := devs[*pairs+u]
			tickets := [2][]byte{}
			every := time.Duration(float64(time.Second) * float64(churners/2) / *churn)
			tk := time.NewTicker(every)
			defer tk.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-tk.C:
				}
				d.churnOnce(ctx, dl, p, r, pair, &tickets)
			}
		})
	}
	stop := d.showProgress(func() string {
		c, errs, lat := r.snapshot()
		return fmt.Sprintf("sent=%.0f dropped=%.0f acked=%.0f churned=%.0f failures=%d ack_p99=%.2fms samples=%d", c["attempts"]-c["dropped"], c["dropped"], c["acked"], c["churned"], errs, lat["ack"]/1e3, sampled.Load())
	})
	d.drive(ctx, ps, *rate, *dur, *size, maxOutstanding, r)
	r.Seconds = time.Since(start).Seconds()
	cancel()
	wg.Wait()
	stop()
	last, cancelLast := context.WithTimeout(context.Background(), 10*time.Second)
	sampleOnce(last) // the last one, after the load stopped
	cancelLast()
	if *pngPath != "" && len(samples) > 1 {
		if err := plotSoak(*pngPath, fmt.Sprintf("relay edge soak: %d pairs, %.0f events/s, %.1f sessions/s churn", *pairs, *rate, *churn), samples); err != nil {
			return err
		}
	}
	if len(samples) > 1 {
		first, last := samples[0], samples[len(samples)-1]
		r.peak("heap_first_mib", first[1]/(1<<20))
		r.peak("heap_last_mib", last[1]/(1<<20))
		r.peak("goroutines_first", first[3])
		r.peak("goroutines_last", last[3])
	}
	return d.finish(r)
}

func c2peak(metric string) string {
	switch metric {
	case "go_memstats_heap_inuse_bytes":
		return "edge_heap_inuse_max_bytes"
	case "go_goroutines":
		return "edge_goroutines_max"
	}
	return metric
}

// churnOnce: one user's two devices come up, one event goes across,
// both leave (keeping their tickets for next time).
func (d *driverConfig) churnOnce(ctx context.Context, dl *dialer, p *pacer, r *result, pair []device, tickets *[2][]byte) {
	var cs [2]*client.Client
	for i := range 2 {
		c, err := dl.connect(ctx, p, r, "churn_handshake", pair[i], tickets[i])
		if err != nil {
			if ctx.Err() == nil {
				r.count("churn_failed", 1)
			}
			for _, c := range cs {
				if c != nil {
					_ = c.Close()
				}
			}
			return
		}
		cs[i] = c
	}
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err := cs[0].Send(sctx, client.Message{Targets: []string{pair[1].id}, Payload: []byte("churn")})
	cancel()
	if err != nil && ctx.Err() == nil {
		r.fail("churn send: " + cause(err))
	}
	for i, c := range cs {
		tickets[i] = c.ResumeTicket()
		_ = c.Close()
	}
	r.count("churned", 2)
}
