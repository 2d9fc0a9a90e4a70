package main

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
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
	r := newResult("rtt", d.transport)
	r.Params["count"], r.Params["payload_bytes"] = float64(*count), float64(*size)
	pr, closePair, err := d.onePair(ctx, r)
	if err != nil {
		return err
	}
	defer closePair()
	a, b := pr.tx, pr.rx
	go func() {
		for range b.Events() {
		}
	}()
	payload := make([]byte, *size)
	target := []string{pr.rxD.id}
	for range 500 { // warm up
		if err := a.Send(ctx, client.Message{Targets: target, Payload: payload}); err != nil {
			return fmt.Errorf("warm-up: %w", err)
		}
	}
	var done atomic.Int64
	stop := d.showProgress(func() string { return fmt.Sprintf("rtt %d/%d", done.Load(), *count) })
	start := time.Now()
	for range *count {
		t := time.Now()
		if err := a.Send(ctx, client.Message{Targets: target, Payload: payload}); err != nil {
			stop()
			return err
		}
		r.observe("rtt", time.Since(t))
		done.Add(1)
	}
	stop()
	r.Seconds = time.Since(start).Seconds()
	r.count("round_trips", float64(*count))
	return d.finish(r)
}

// pair is a sender and a receiver of one user.
type pair struct {
	tx, rx   *client.Client
	txD, rxD device
}

// onePair provisions one user with two devices and connects them;
// closePair closes both and the dialer.
func (d *driverConfig) onePair(ctx context.Context, r *result) (p pair, closePair func(), err error) {
	devs, dl, err := d.prepare(ctx, 1)
	if err != nil {
		return pair{}, nil, err
	}
	ps, err := d.openPairs(ctx, dl, r, devs, false)
	if err != nil {
		dl.close()
		return pair{}, nil, err
	}
	return ps[0], func() { closePairs(ps); dl.close() }, nil
}

// openPairs connects every pair (paced, retried).
// openPairs connects each pair's sender through dl and its receiver
// through rxDl (nil: dl too; offline: not at all).
func (d *driverConfig) openPairs(ctx context.Context, dl *dialer, r *result, devs [][]device, offline bool, rxDl ...*dialer) ([]pair, error) {
	rdl := dl
	if len(rxDl) > 0 && rxDl[0] != nil {
		rdl = rxDl[0]
	}
	p := newPacer(d.concurrency, d.slowDial)
	ps := make([]pair, len(devs))
	err := parallel(ctx, len(devs), d.concurrency, func(ctx context.Context, i int) error {
		tx, err := dl.connect(ctx, p, r, "handshake", devs[i][0], nil)
		if err != nil {
			return err
		}
		ps[i] = pair{tx: tx, txD: devs[i][0], rxD: devs[i][1]}
		if offline {
			return nil
		}
		rx, err := rdl.connect(ctx, p, r, "handshake", devs[i][1], nil)
		if err != nil {
			_ = tx.Close()
			return err
		}
		ps[i].rx = rx
		return nil
	})
	if err != nil {
		closePairs(ps)
		return nil, err
	}
	return ps, nil
}

func closePairs(ps []pair) {
	for _, p := range ps {
		if p.tx != nil {
			_ = p.tx.Close()
		}
		if p.rx != nil {
			_ = p.rx.Close()
		}
	}
}

// maxOutstanding is how many durable events one pair's sender may have
// waiting for their acks at most (its client's MaxPending): --inflight
// and --max-outstanding may not ask for more.
const maxOutstanding = 1024

// outstandingFlag adds --max-outstanding to an open-loop scenario's flags.
func outstandingFlag(fs *flag.FlagSet) *int {
	return fs.Int("max-outstanding", maxOutstanding, "open loop: the most events one pair may have waiting for their acks; a pair at it skips its turn, counted as dropped")
}

// checkOutstanding validates --max-outstanding.
func checkOutstanding(n int) error {
	if n < 1 || n > maxOutstanding {
		return fmt.Errorf("--max-outstanding %d: from 1 to %d", n, maxOutstanding)
	}
	return nil
}

// drive sends durable events open loop at rate for dur, round robin
// over the pairs: event i is due at start + i/rate and its latency runs
// from then, so a late driver shows as latency, not as a lower rate
// (no coordinated omission). Each pair's sends run on workers that are
// kept for the run (a goroutine per event would cost the driver more
// than the edge), as many as the pair ever had outstanding; a pair that
// already has limit events waiting for their acks skips its turn and
// counts it as "dropped" (like k6's dropped iterations): an edge or a
// driver that falls behind shows as drops instead of sends piling up in
// memory.
func (d *driverConfig) drive(ctx context.Context, ps []pair, rate float64, dur time.Duration, size, limit int, r *result) {
	stopReceivers := receiveAll(ctx, ps, r)
	payload := make([]byte, size)
	r.count("dropped", 0) // a threshold on drops finds it at zero too
	type pool struct {
		due         chan time.Time // buffered to limit: never full while outstanding < limit
		outstanding atomic.Int64   // events handed over and not yet acked or failed
		workers     int64          // at least outstanding: no due event waits for a worker
	}
	pools := make([]pool, len(ps))
	for k := range pools {
		pools[k].due = make(chan time.Time, limit)
	}
	var workers sync.WaitGroup
	interval := time.Duration(float64(time.Second) / rate)
	start := time.Now()
	n := int(dur.Seconds() * rate)
	pace := newSchedule()
	defer pace.stop()
	for i := range n {
		at := start.Add(time.Duration(i) * interval)
		pace.waitUntil(ctx, at)
		if ctx.Err() != nil {
			break
		}
		k := i % len(ps)
		pl := &pools[k]
		r.count("attempts", 1)
		o := pl.outstanding.Add(1)
		if o > int64(limit) {
			pl.outstanding.Add(-1)
			r.count("dropped", 1)
			continue
		}
		pl.due <- at // room: at most limit are outstanding
		if o > pl.workers {
			pl.workers++
			p, due, out := ps[k], pl.due, &pl.outstanding
			workers.Go(func() {
				target := []string{p.rxD.id}
				for at := range due {
					err := p.tx.Send(ctx, client.Message{Targets: target, Payload: payload})
					out.Add(-1)
					if err != nil {
						r.count("failed", 1)
						r.fail(cause(err))
						continue
					}
					r.observe("ack", time.Since(at))
					r.count("acked", 1)
				}
			})
		}
	}
	for k := range pools {
		close(pools[k].due)
	}
	workers.Wait()
	stopReceivers()
}

// saturate sends durable events closed loop for dur: each pair keeps
// inflight events outstanding and sends the next as soon as one is
// acknowledged, so the rate is whatever the edge (or this process)
// sustains; latency runs from each send.
func (d *driverConfig) saturate(ctx context.Context, ps []pair, inflight int, dur time.Duration, size int, r *result) {
	stopReceivers := receiveAll(ctx, ps, r)
	payload := make([]byte, size)
	sctx, stop := context.WithTimeout(ctx, dur)
	defer stop()
	var senders sync.WaitGroup
	for _, p := range ps {
		target := []string{p.rxD.id}
		for range inflight {
			senders.Go(func() {
				for sctx.Err() == nil {
					at := time.Now()
					r.count("attempts", 1)
					// Sends already under way finish on ctx, not sctx,
					// so the end of the run counts no false failures.
					if err := p.tx.Send(ctx, client.Message{Targets: target, Payload: payload}); err != nil {
						// This sender stops: a refused or broken send
						// retried at once would only spin.
						r.count("failed", 1)
						r.fail(cause(err))
						return
					}
					r.observe("ack", time.Since(at))
					r.count("acked", 1)
				}
			})
		}
	}
	senders.Wait()
	stopReceivers()
}

// driveEphemeral sends ephemeral events over the pairs for dur: closed
// loop when inflight > 0 (each pair keeps that many events on their way
// to its receiver, a slot freed when the receiver gets one; the senders
// then use the session stream; the edge may still send one to the
// receiver as a datagram, and a slot whose event was lost is given up
// after 250 ms, counted as slots_given_up), else open loop at a
// fixed total rate (as datagrams where they fit; the edge drops what a
// slow receiver cannot take). The payload carries its send time, so the
// receiver observes each event's one-way "delivery" latency.
func (d *driverConfig) driveEphemeral(ctx context.Context, ps []pair, inflight int, rate float64, dur time.Duration, size int, r *result) (sending time.Duration) {
	start := time.Now()
	size = max(size, 8)
	rctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	slots := make([]chan struct{}, len(ps))
	for i, p := range ps {
		if inflight > 0 {
			slots[i] = make(chan struct{}, inflight)
		}
		wg.Go(func() {
			for {
				m, err := p.rx.Receive(rctx)
				if err != nil {
					return
				}
				if len(m.Payload) >= 8 {
					sent := time.Duration(binary.LittleEndian.Uint64(m.Payload))
					r.observe("delivery", time.Since(start)-sent)
				}
				r.count("received", 1)
				if slots[i] != nil {
					select {
					case <-slots[i]:
					default:
					}
				}
			}
		})
	}
	send := func(p pair, payload []byte) bool {
		binary.LittleEndian.PutUint64(payload, uint64(time.Since(start)))
		r.count("attempts", 1)
		if err := p.tx.SendEphemeral(client.Message{Targets: []string{p.rxD.id}, Payload: payload}); err != nil {
			r.count("failed", 1)
			r.fail(cause(err))
			return false
		}
		return true
	}
	sctx, stop := context.WithTimeout(ctx, dur)
	defer stop()
	if inflight > 0 {
		var senders sync.WaitGroup
		for i, p := range ps {
			senders.Go(func() {
				payload := make([]byte, size)
				// The edge sends an event alone in its batch as a
				// datagram, which may be lost: a slot not freed in time
				// is given up. One timer per sender, reset per wait.
				giveUp := time.NewTimer(time.Hour)
				defer giveUp.Stop()
				for {
					select {
					case slots[i] <- struct{}{}:
					default:
						giveUp.Reset(250 * time.Millisecond)
						select {
						case slots[i] <- struct{}{}:
						case <-giveUp.C:
							r.count("slots_given_up", 1)
						case <-sctx.Done():
							return
						}
						giveUp.Stop()
					}
					if !send(p, payload) {
						return
					}
				}
			})
		}
		senders.Wait()
	} else {
		payload := make([]byte, size)
		interval := time.Duration(float64(time.Second) / rate)
		for i := 0; sctx.Err() == nil; i++ {
			if w := time.Until(start.Add(time.Duration(i) * interval)); w > 0 {
				t := time.NewTimer(w)
				select {
				case <-t.C:
				case <-sctx.Done():
					t.Stop()
					continue
				}
			}
			send(ps[i%len(ps)], payload)
		}
	}
	sending = time.Since(start)
	// What is still on its way arrives within moments on a live edge:
	// wait until everything sent arrived or, in the open loop, where a
	// datagram may be lost, until the receivers are quiet for 50 ms; at
	// most receiveDrain.
	deadline := time.Now().Add(receiveDrain)
	for last := -1.0; time.Now().Before(deadline) && ctx.Err() == nil; {
		got := r.get("received")
		if got >= r.get("attempts")-r.get("failed") || (inflight == 0 && got == last) {
			break
		}
		last = got
		t := time.NewTimer(50 * time.Millisecond)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
		}
	}
	cancel()
	wg.Wait()
	return sending
}

// receiveAll counts what every pair's receiver gets as "received" until
// the returned stop is called. An ack can reach a sender before the
// receiver here counted its event (the receiving client acknowledges
// what it put in its buffer, before Receive returns it), so stop first
// waits, up to receiveDrain, until the online receivers have had every
// acked event, then ends the receivers and waits for them.
func receiveAll(ctx context.Context, ps []pair, r *result) (stop func()) {
	var wg sync.WaitGroup
	rctx, cancel := context.WithCancel(ctx)
	// While stop waits, each receipt wakes it (not before: the run's
	// receipts pay nothing for it).
	var draining atomic.Bool
	got := make(chan struct{}, 1)
	online := false
	for _, p := range ps {
		if p.rx == nil {
			continue // an offline receiver
		}
		online = true
		wg.Go(func() {
			for {
				if _, err := p.rx.Receive(rctx); err != nil {
					return
				}
				r.count("received", 1)
				if draining.Load() {
					select {
					case got <- struct{}{}:
					default:
					}
				}
			}
		})
	}
	return func() {
		defer func() { cancel(); wg.Wait() }()
		if !online {
			return
		}
		draining.Store(true)
		deadline := time.NewTimer(receiveDrain)
		defer deadline.Stop()
		for {
			if r.get("received") >= r.get("acked") {
				return
			}
			select {
			case <-got:
			case <-deadline.C:
				return
			case <-ctx.Done():
				return
			}
		}
	}
}

// receiveDrain bounds how long the end of a durable run waits for
// acked events still on their way to their receivers.
const receiveDrain = 2 * time.Second

func (d *driverConfig) rateProgress(r *result) func() string {
	return func() string {
		c, errs, lat := r.snapshot()
		return fmt.Sprintf("sent=%.0f dropped=%.0f acked=%.0f received=%.0f failures=%d ack_p99=%.2fms", c["attempts"]-c["dropped"], c["dropped"], c["acked"], c["received"], errs, lat["ack"]/1e3)
	}
}

// rate: pairs of devices (each pair one user), durable events sent at a
// fixed total rate: acked/s and the ack latency.
func (d *driverConfig) rate(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("rate", flag.ContinueOnError)
	pairs := fs.Int("pairs", 50, "sender/receiver pairs")
	rate := fs.Float64("rate", 2000, "events per second in total")
	dur := fs.Duration("duration", 20*time.Second, "how long to send")
	size := fs.Int("size", 64, "payload bytes")
	outstanding := outstandingFlag(fs)
	inflight := fs.Int("inflight", 0, "closed loop instead: keep this many events in flight per pair, as fast as acks come back (--rate ignored): the edge's saturation rate and its CPU per event")
	rxEdge := fs.String("rx-edge", "", "connect the receivers to this other edge (UDP address), so every event takes the mesh hop between the two edges")
	rxEdgeAdmin := fs.String("rx-edge-admin", "", "the admin URL of --rx-edge (its certificate hashes, and its CPU per event)")
	offline := fs.Bool("offline", false, "receivers stay offline: every event goes to its target's mailbox through the control plane, and is acked once stored there (the mailbox path's cost)")
	ephemeral := fs.Bool("ephemeral", false, "ephemeral events instead (no acks): the delivery latency and the edge's CPU per delivered event; with --inflight on the session stream, closed loop on deliveries, else at --rate as datagrams where they fit")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *inflight > maxOutstanding {
		return fmt.Errorf("--inflight %d: at most %d per pair", *inflight, maxOutstanding)
	}
	if err := checkOutstanding(*outstanding); err != nil {
		return err
	}
	if *ephemeral && (*offline || *rxEdge != "") {
		return errors.New("--ephemeral goes to online receivers on this edge: not with --offline or --rx-edge")
	}
	r := newResult("rate", d.transport)
	r.Params["pairs"], r.Params["rate"], r.Params["payload_bytes"] = float64(*pairs), *rate, float64(*size)
	if *inflight > 0 {
		r.Params["inflight"] = float64(*inflight)
	}
	devs, dl, err := d.prepare(ctx, *pairs)
	if err != nil {
		return err
	}
	defer dl.close()
	if *offline {
		r.Params["offline"] = 1
	}
	if *ephemeral {
		r.Params["ephemeral"] = 1
		// A closed loop waits for every event: none may be lost as a
		// datagram can be.
		dl.noDatagrams = *inflight > 0
	}
	var rxDl *dialer
	if *rxEdge != "" {
		if *rxEdgeAdmin == "" || *offline {
			return errors.New("--rx-edge needs --rx-edge-admin, and receivers that are online")
		}
		if rxDl, err = d.newDialerFor(ctx, *rxEdge, *rxEdgeAdmin); err != nil {
			return err
		}
		defer rxDl.close()
		r.Params["mesh_hop"] = 1
	}
	ps, err := d.openPairs(ctx, dl, r, devs, *offline, rxDl)
	if err != nil {
		return err
	}
	defer closePairs(ps)
	stop := d.showProgress(d.rateProgress(r))
	cpu, cpuErr := d.cpuAt(ctx, "")
	var ccpu time.Duration
	ccpuErr := errors.New("no --control-admin")
	if d.controlAdmin != "" {
		ccpu, ccpuErr = remoteCPU(ctx, d.controlAdmin)
	}
	var rxcpu time.Duration
	rxcpuErr := errors.New("no --rx-edge")
	if rxDl != nil {
		rxcpu, rxcpuErr = remoteCPU(ctx, *rxEdgeAdmin)
	}
	// The edge's own ack latency (an event's arrival to its sender's
	// Ack), from its histogram over the run: what the driver's figures
	// add to it is the driver's queueing and the way back.
	acks, acksErr := bucketsAt(ctx, d.edgeAdmin, "relay_edge_ack_seconds")
	start := time.Now()
	switch {
	case *ephemeral:
		// Rates over the sending time, not the wait for stragglers.
		r.Seconds = d.driveEphemeral(ctx, ps, *inflight, *rate, *dur, *size, r).Seconds()
	case *inflight > 0:
		d.saturate(ctx, ps, *inflight, *dur, *size, r)
	default:
		d.drive(ctx, ps, *rate, *dur, *size, *outstanding, r)
	}
	if !*ephemeral {
		r.Seconds = time.Since(start).Seconds()
	}
	stop()
	if *ephemeral {
		// The edge's CPU per event it delivered.
		if after, err := d.cpuAt(ctx, ""); cpuErr == nil && err == nil && r.Counts["received"] > 0 {
			r.Peaks["edge_cpu_us_per_event"] = float64((after - cpu).Nanoseconds()) / 1e3 / r.Counts["received"]
		}
		return d.finish(r)
	}
	// The edge's CPU per acknowledged event, when its /metrics say (an
	// edge in its own process: relayd dev's include the control plane).
	if after, err := d.cpuAt(ctx, ""); cpuErr == nil && err == nil && r.Counts["acked"] > 0 {
		r.Peaks["edge_cpu_us_per_event"] = float64((after - cpu).Nanoseconds()) / 1e3 / r.Counts["acked"]
	}
	if after, err := bucketsAt(ctx, d.edgeAdmin, "relay_edge_ack_seconds"); acksErr == nil && err == nil {
		for _, q := range []struct {
			name string
			q    float64
		}{{"edge_ack_p50_ms", 0.5}, {"edge_ack_p99_ms", 0.99}} {
			if v, ok := bucketQuantile(q.q, acks, after); ok {
				r.Peaks[q.name] = v * 1e3
			}
		}
	}
	if rxcpuErr == nil && r.Counts["acked"] > 0 {
		if after, err := remoteCPU(ctx, *rxEdgeAdmin); err == nil {
			r.Peaks["rx_edge_cpu_us_per_event"] = float64((after - rxcpu).Nanoseconds()) / 1e3 / r.Counts["acked"]
		}
	}
	if ccpuErr == nil && r.Counts["acked"] > 0 {
		if after, err := remoteCPU(ctx, d.controlAdmin); err == nil {
			r.Peaks["control_cpu_us_per_event"] = float64((after - ccpu).Nanoseconds()) / 1e3 / r.Counts["acked"]
		}
	}
	return d.finish(r)
}

// breakpoint: the rate scenario in steps of growing rate, each on the
// same pairs, until a step's ack p99 passes --p99 or an event fails: the
// last step that held is the edge's sustained rate at that latency.
func (d *driverConfig) breakpoint(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("breakpoint", flag.ContinueOnError)
	pairs := fs.Int("pairs", 50, "sender/receiver pairs")
	start := fs.Float64("start", 1000, "events per second of the first step")
	step := fs.Float64("step", 1000, "events per second added each step")
	stepDur := fs.Duration("step-duration", 10*time.Second, "how long each step sends")
	outstanding := outstandingFlag(fs)
	limit := fs.Duration("p99", 50*time.Millisecond, "a step holds while its ack p99 stays below this, and no event failed or was dropped")
	maxRate := fs.Float64("max-rate", 1e6, "stop after the step at this rate")
	size := fs.Int("size", 64, "payload bytes")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := checkOutstanding(*outstanding); err != nil {
		return err
	}
	r := newResult("breakpoint", d.transport)
	r.Params["pairs"], r.Params["start"], r.Params["step"], r.Params["p99_limit_ms"] = float64(*pairs), *start, *step, float64(limit.Milliseconds())
	devs, dl, err := d.prepare(ctx, *pairs)
	if err != nil {
		return err
	}
	defer dl.close()
	ps, err := d.openPairs(ctx, dl, r, devs, false)
	if err != nil {
		return err
	}
	defer closePairs(ps)
	begin := time.Now()
	held := 0.0
	for rate := *start; rate <= *maxRate && ctx.Err() == nil; rate += *step {
		sr := newResult("breakpoint", d.transport)
		began := time.Now()
		d.drive(ctx, ps, rate, *stepDur, *size, *outstanding, sr)
		// The step's own length, late acks included: a driver that fell
		// behind shows as a lower rate, not the nominal one.
		sr.Seconds = time.Since(began).Seconds()
		sr.derive()
		p99 := sr.Figures["ack_p99_ms"]
		ok := sr.Counts["failed"] == 0 && sr.Counts["dropped"] == 0 && p99 < float64(limit.Microseconds())/1e3
		r.Steps = append(r.Steps, rateStep{Rate: rate, AckedPerS: sr.Figures["acked_per_s"], AckP50Ms: sr.Figures["ack_p50_ms"], AckP99Ms: p99, Failed: sr.Counts["failed"], Dropped: sr.Counts["dropped"], Held: ok})
		if d.errw != nil && d.progress > 0 {
			fmt.Fprintf(d.errw, "relayload breakpoint %8.0f/s: acked %.0f/s, ack p50 %.2f ms, p99 %.2f ms, failed %.0f, dropped %.0f: %s\n", rate, sr.Figures["acked_per_s"], sr.Figures["ack_p50_ms"], p99, sr.Counts["failed"], sr.Counts["dropped"], map[bool]string{true: "held", false: "broke"}[ok])
		}
		r.merge(sr)
		if !ok {
			r.peak("first_broken_rate", rate)
			break
		}
		held = rate
	}
	r.Seconds = time.Since(begin).Seconds()
	r.peak("sustained_rate", held)
	return d.finish(r)
}

// sessions: open many idle sessions, paced by what the edge accepts and
// retried, and read the edge's memory before and after from its own
// metrics.
func (d *driverConfig) sessions(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("sessions", flag.ContinueOnError)
	count := fs.Int("sessions", 1000, "sessions to open (two devices per user)")
	hold := fs.Duration("hold", 5*time.Second, "how long the sessions stay idle before memory is read")
	noDatagrams := fs.Bool("no-datagrams", false, "devices say they send no datagrams (client.Config.NoDatagrams): the edge keeps no datagram reader for their sessions")
	if err := fs.Parse(args); err != nil {
		return err
	}
	r := newResult("sessions", d.transport)
	r.Params["sessions"] = float64(*count)
	users := (*count + 1) / 2
	devs, dl, err := d.prepare(ctx, users)
	if err != nil {
		return err
	}
	defer dl.close()
	if *noDatagrams {
		r.Params["no_datagrams"] = 1
		dl.noDatagrams = true
	}
	mem := []string{"go_memstats_heap_inuse_bytes", "process_resident_memory_bytes", "go_goroutines", "relay_edge_sessions"}
	before, err := d.settledMetrics(ctx, mem)
	if err != nil {
		return err
	}
	n := users * 2
	clients := make([]*client.Client, n)
	p := newPacer(d.concurrency, d.slowDial)
	stop := d.showProgress(func() string {
		c, errs, lat := r.snapshot()
		return fmt.Sprintf("sessions up=%.0f/%d failed attempts=%d window=%.1f p99 up=%.0fms", c["opened"], n, errs, p.current(), lat["handshake"]/1e3)
	})
	start := time.Now()
	// Every session gets its own attempts; one that fails for good is
	// counted and the rest go on.
	_ = parallel(ctx, n, d.concurrency, func(ctx context.Context, i int) error {
		r.count("attempts", 1)
		c, err := dl.connect(ctx, p, r, "handshake", devs[i/2][i%2], nil)
		if err != nil {
			r.count("failed", 1)
			return nil
		}
		clients[i] = c
		r.count("opened", 1)
		return nil
	})
	openTime := time.Since(start)
	stop()
	defer func() {
		for _, c := range clients {
			if c != nil {
				_ = c.Close()
			}
		}
	}()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err := sleepCtx(ctx, *hold); err != nil {
		return err
	}
	after, err := d.settledMetrics(ctx, mem)
	if err != nil {
		return err
	}
	r.Seconds = openTime.Seconds()
	opened := after["relay_edge_sessions"] - before["relay_edge_sessions"]
	if opened > 0 {
		per := func(k string) float64 { return (after[k] - before[k]) / opened }
		r.peak("edge_sessions", after["relay_edge_sessions"])
		r.peak("edge_heap_per_session_bytes", per("go_memstats_heap_inuse_bytes"))
		r.peak("edge_rss_per_session_bytes", per("process_resident_memory_bytes"))
		r.peak("edge_goroutines_per_session", per("go_goroutines"))
	}
	r.peak("edge_heap_inuse_bytes", after["go_memstats_heap_inuse_bytes"])
	r.peak("driver_goroutines", float64(runtime.NumGoroutine()))
	return d.finish(r)
}

// resume: devices connect once, then keep closing their session and
// resuming it on its ticket for --duration: resumes per second and the
// time a resume takes (dial to Welcome).
func (d *driverConfig) resume(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("resume", flag.ContinueOnError)
	devices := fs.Int("devices", 100, "devices that reconnect over and over")
	dur := fs.Duration("duration", 20*time.Second, "how long to reconnect")
	other := fs.String("other-edge", "", "resume on this other edge (UDP address) and on --edge in turn, as devices that move between the edges behind one name: the cluster's tickets, relay and TLS, at work")
	otherAdmin := fs.String("other-edge-admin", "", "the admin URL of --other-edge (its certificate hashes, CPU and TLS counts)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if (*other == "") != (*otherAdmin == "") {
		return errors.New("--other-edge and --other-edge-admin go together")
	}
	r := newResult("resume", d.transport)
	r.Params["devices"] = float64(*devices)
	devs, dl, err := d.prepare(ctx, (*devices+1)/2)
	if err != nil {
		return err
	}
	defer dl.close()
	// The edges whose CPU and TLS handshakes count, and a dialer per edge
	// (one only without --other-edge).
	admins, dls := []string{d.edgeAdmin}, []*dialer{dl}
	if *other != "" {
		odl, err := d.newDialerFor(ctx, *other, *otherAdmin)
		if err != nil {
			return err
		}
		defer odl.close()
		// A TLS session resumed on one edge carries the certificate of
		// the edge that began it: both pin both.
		pins := slices.Concat(dl.pins, odl.pins)
		dl.pins, odl.pins = pins, pins
		admins, dls = append(admins, *otherAdmin), append(dls, odl)
		r.Params["edges"] = 2
	}
	p := newPacer(d.concurrency, d.slowDial)
	stop := d.showProgress(func() string {
		c, errs, lat := r.snapshot()
		return fmt.Sprintf("resumed=%.0f full=%.0f failures=%d window=%.1f resume_p99=%.1fms", c["resumed"], c["full"], errs, p.current(), lat["resume"]/1e3)
	})
	// Each device: one full handshake (not timed as a resume), then
	// close-and-resume until the deadline, at least once (a run whose
	// first handshakes outlast a short --duration still resumes).
	cpu, cpuErr := edgesAt(ctx, admins)
	deadline := time.Now().Add(*dur)
	start := time.Now()
	_ = parallel(ctx, *devices, *devices, func(ctx context.Context, i int) error {
		dev := devs[i/2][i%2]
		c, err := dl.connect(ctx, p, r, "handshake", dev, nil)
		if err != nil {
			r.count("attempts", 1)
			r.count("failed", 1)
			return nil
		}
		for n := 1; (n == 1 || time.Now().Before(deadline)) && ctx.Err() == nil; n++ {
			ticket := c.ResumeTicket()
			_ = c.Close()
			r.count("attempts", 1)
			c, err = dls[n%len(dls)].connect(ctx, p, r, "resume", dev, ticket)
			if err != nil {
				r.count("failed", 1)
				return nil
			}
			if c.Resumed() {
				r.count("resumed", 1)
			} else {
				r.count("full", 1)
			}
		}
		_ = c.Close()
		return nil
	})
	r.Seconds = time.Since(start).Seconds()
	stop()
	// The edges' CPU per session they set up and tore down (dial, TLS,
	// handshake, ticket, close), the devices' first full handshakes
	// included, and the TLS handshakes that resumed on a session ticket,
	// when their /metrics say (edges in their own processes).
	if after, err := edgesAt(ctx, admins); cpuErr == nil && err == nil {
		if n := r.Counts["resumed"] + r.Counts["full"] + float64(*devices); n > 0 {
			r.Peaks["edge_cpu_us_per_session"] = float64((after.cpu - cpu.cpu).Nanoseconds()) / 1e3 / n
		}
		r.Counts["tls_resumed"] = after.tlsResumed - cpu.tlsResumed
	}
	return d.finish(r)
}

// edgeTotals are what resume reads from its edges' /metrics, summed.
type edgeTotals struct {
	cpu        time.Duration
	tlsResumed float64 // TLS handshakes that resumed, QUIC and HTTPS ports
}

// edgesAt reads the totals of the edges whose admin servers are admins.
func edgesAt(ctx context.Context, admins []string) (edgeTotals, error) {
	var t edgeTotals
	for _, a := range admins {
		cpu, err := remoteCPU(ctx, a)
		if err != nil {
			return t, err
		}
		quic, https := `relay_edge_connections_total{tls="resumed"}`, `relay_edge_https_handshakes_total{tls="resumed"}`
		m, err := metricsAt(ctx, a, quic, https)
		if err != nil {
			return t, err
		}
		t.cpu += cpu
		t.tlsResumed += m[quic] + m[https]
	}
	return t, nil
}

// storm: devices connect; then all of them lose their connection at the
// same instant (the driver closes its UDP sockets: nothing reaches the
// edge, as when the network or an edge dies under them) and come back at
// once on their resume tickets, paced and retried as clients with
// backoff do. Time to all back is measured from that instant.
func (d *driverConfig) storm(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("storm", flag.ContinueOnError)
	devices := fs.Int("devices", 1000, "devices that lose their edge at once")
	if err := fs.Parse(args); err != nil {
		return err
	}
	r := newResult("storm", d.transport)
	r.Params["devices"] = float64(*devices)
	devs, dl, err := d.prepare(ctx, (*devices+1)/2)
	if err != nil {
		return err
	}
	defer dl.close()
	n := (*devices + 1) / 2 * 2
	clients := make([]*client.Client, n)
	defer func() {
		for _, c := range clients {
			if c != nil {
				_ = c.Close()
			}
		}
	}()
	p := newPacer(d.concurrency, d.slowDial)
	var up atomic.Int64
	stopUp := d.showProgress(func() string { return fmt.Sprintf("before the storm: up=%d/%d window=%.1f", up.Load(), n, p.current()) })
	err = parallel(ctx, n, d.concurrency, func(ctx context.Context, i int) error {
		c, err := dl.connect(ctx, p, r, "handshake", devs[i/2][i%2], nil)
		clients[i] = c
		up.Add(1)
		return err
	})
	stopUp()
	if err != nil {
		return fmt.Errorf("connect before the storm: %w", err)
	}
	tickets := make([][]byte, n)
	for i, c := range clients {
		tickets[i] = c.ResumeTicket()
	}
	// The storm: every connection gone at once, then everyone back.
	stormAt := time.Now()
	dl.close()
	for i, c := range clients {
		go func() { _ = c.Close() }() // frees the client; nothing reaches the edge
		clients[i] = nil
	}
	stop := d.showProgress(func() string {
		c, errs, lat := r.snapshot()
		return fmt.Sprintf("back=%.0f/%d failed attempts=%d window=%.1f back_p99=%.0fms", c["back"], n, errs, p.current(), lat["back"]/1e3)
	})
	var last atomic.Int64
	_ = parallel(ctx, n, n, func(ctx context.Context, i int) error {
		r.count("attempts", 1)
		c, err := dl.connect(ctx, p, r, "reconnect", devs[i/2][i%2], tickets[i])
		if err != nil {
			r.count("failed", 1)
			return nil
		}
		clients[i] = c
		back := time.Since(stormAt)
		r.observe("back", back)
		for {
			old := last.Load()
			if int64(back) <= old || last.CompareAndSwap(old, int64(back)) {
				break
			}
		}
		r.count("back", 1)
		if c.Resumed() {
			r.count("resumed", 1)
		}
		return nil
	})
	stop()
	r.Seconds = time.Since(stormAt).Seconds()
	r.peak("all_back_s", time.Duration(last.Load()).Seconds())
	// What the edge counts now: the devices back, and for a moment the
	// lost sessions they replaced, which it is closing.
	if m, err := d.edgeMetrics(ctx, "relay_edge_sessions"); err == nil {
		r.peak("edge_sessions_after", m["relay_edge_sessions"])
	}
	return d.finish(r)
}

// settledMetrics has the edge collect its garbage (the admin port's
// heap profile with gc=1) and then reads its metrics. Twice: what sits in
// a sync.Pool (net/http's buffers among others) outlives one collection
// in the pool's victim cache, and would count in one reading and not in
// the next.
func (d *driverConfig) settledMetrics(ctx context.Context, names []string) (map[string]float64, error) {
	return settledMetricsAt(ctx, d.edgeAdmin, names)
}

// settledMetricsAt is settledMetrics of the process whose admin server is
// at base.
func settledMetricsAt(ctx context.Context, base string, names []string) (map[string]float64, error) {
	for range 2 {
		resp, err := adminGet(ctx, base+"/debug/pprof/heap?gc=1", adminTimeout)
		if err != nil {
			return nil, fmt.Errorf("have %s collect garbage: %w", base, err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
	}
	return metricsAt(ctx, base, names...)
}
