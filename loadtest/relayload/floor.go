package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"sync"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/edge-relay/relay/edge/client"
)

// The floor: what quic-go alone costs on the same path, to hold the
// relay's figures against (`relayload floor`, docs/benchmarks.md). A
// connection's first stream says what it is with its first byte, and
// which channel it is on with its second:
//
//	'r' a receiver: what the channel's senders send is written to it
//	's' a sender: its bytes are forwarded to the channel's latest receiver
//	'k' a sink: its bytes are read and dropped (one-way stream cost)
//
// The floor serves its own CPU time at GET /cpu (seconds, as text) on
// --admin, so a client can take the difference around a run.
const floorALPN = "relay-floor"

// floorMessage is the size of the messages the floor scenarios send: 64
// bytes, an 8-byte send time in nanoseconds first.
const floorMessage = 64

func floorCommand(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("floor", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:7500", "UDP address of the bare quic-go server")
	admin := fs.String("admin", "127.0.0.1:7501", "HTTP address serving /cpu")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cert, err := selfSigned()
	if err != nil {
		return err
	}
	ln, err := quic.ListenAddr(*listen, &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{floorALPN}, MinVersion: tls.VersionTLS13},
		&quic.Config{MaxIdleTimeout: 30 * time.Second})
	if err != nil {
		return err
	}
	defer ln.Close()
	hl, err := net.Listen("tcp", *admin)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, "%.6f\n", processCPU().Seconds())
	}), ReadHeaderTimeout: 5 * time.Second}
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { _ = srv.Serve(hl) })
	defer srv.Close()
	fmt.Fprintf(stdout, "floor listening on %s (QUIC) and %s (/cpu)\n", ln.Addr(), hl.Addr())
	f := &floor{}
	for {
		conn, err := ln.Accept(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		wg.Go(func() { f.serve(ctx, conn) })
	}
}

type floor struct {
	mu        sync.Mutex // guards receivers
	receivers map[byte]*quic.Stream
}

func (f *floor) serve(ctx context.Context, conn *quic.Conn) {
	defer conn.CloseWithError(0, "")
	str, err := conn.AcceptStream(ctx)
	if err != nil {
		return
	}
	var hdr [2]byte // role, channel
	if _, err := io.ReadFull(str, hdr[:]); err != nil {
		return
	}
	switch ch := hdr[1]; hdr[0] {
	case 'r':
		f.mu.Lock()
		if f.receivers == nil {
			f.receivers = make(map[byte]*quic.Stream)
		}
		f.receivers[ch] = str
		f.mu.Unlock()
		_, _ = str.Write([]byte{'R'}) // registered: senders may come
		<-conn.Context().Done()
	case 's':
		f.mu.Lock()
		to := f.receivers[ch]
		f.mu.Unlock()
		if to != nil {
			_, _ = io.Copy(to, str)
		}
	case 'k':
		_, _ = io.Copy(io.Discard, str)
	}
}

// processCPU is this process's CPU time, user and system.
func processCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func selfSigned() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// floorStream opens a stream of the given role on channel ch to the
// floor at addr.
func floorStream(ctx context.Context, addr string, role, ch byte) (*quic.Conn, *quic.Stream, error) {
	conn, err := quic.DialAddr(ctx, addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{floorALPN}, MinVersion: tls.VersionTLS13}, //nolint:gosec // a benchmark's own server
		&quic.Config{MaxIdleTimeout: 30 * time.Second, KeepAlivePeriod: 5 * time.Second})
	if err != nil {
		return nil, nil, fmt.Errorf("dial the floor at %s: %w", addr, err)
	}
	str, err := conn.OpenStreamSync(ctx)
	if err == nil {
		_, err = str.Write([]byte{role, ch})
	}
	if err != nil {
		_ = conn.CloseWithError(0, "")
		return nil, nil, err
	}
	return conn, str, nil
}

// cpuAt reads a process's CPU seconds: the floor's /cpu, or an edge's
// process_cpu_seconds_total.
func (d *driverConfig) cpuAt(ctx context.Context, floorAdmin string) (time.Duration, error) {
	if floorAdmin != "" {
		resp, err := adminGet(ctx, floorAdmin+"/cpu", adminTimeout)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		var s float64
		if _, err := fmt.Fscan(resp.Body, &s); err != nil {
			return 0, err
		}
		return time.Duration(s * float64(time.Second)), nil
	}
	return remoteCPU(ctx, d.edgeAdmin)
}

// remoteCPU reads process_cpu_seconds_total from the admin server at
// base.
func remoteCPU(ctx context.Context, base string) (time.Duration, error) {
	m, err := metricsAt(ctx, base, "process_cpu_seconds_total")
	if err != nil {
		return 0, err
	}
	s, ok := m["process_cpu_seconds_total"]
	if !ok {
		return 0, fmt.Errorf("%s exports no process_cpu_seconds_total", base)
	}
	return time.Duration(s * float64(time.Second)), nil
}

// oneway: device A sends events to device B at a fixed rate, each
// carrying its send time; B records how long each took to arrive (one
// process, one clock): the one-way latency through the edge. With
// --floor, the same over the bare quic-go forwarder instead.
func (d *driverConfig) oneway(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("oneway", flag.ContinueOnError)
	count := fs.Int("count", 20000, "messages to time")
	rate := fs.Float64("rate", 2000, "messages per second")
	floorAddr := fs.String("floor", "", "time the bare quic-go forwarder at this address instead of the relay")
	floorAdmin := fs.String("floor-admin", "", "with --floor: the floor's /cpu, for its CPU per message")
	if err := fs.Parse(args); err != nil {
		return err
	}
	r := newResult("oneway", d.transport)
	if *floorAddr != "" {
		r.Transport = "floor"
	}
	r.Params["count"], r.Params["rate"] = float64(*count), *rate
	// The first failure on either side cancels ctx, which ends the other.
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	fail := func(err error) { cancel(err) }
	// send sends a message stamped with the time it leaves. Messages are
	// due at fixed times (the rate holds, no tick is skipped); how late
	// the driver sends each is its own figure, send_lag, so the one-way
	// latency is the path's, and a driver that cannot keep the rate says
	// so.
	var send func() error
	var received func() (time.Duration, error)
	start := time.Now()
	stamp := func(b []byte) { binary.BigEndian.PutUint64(b, uint64(time.Since(start))) }
	took := func(b []byte) time.Duration { return time.Since(start) - time.Duration(binary.BigEndian.Uint64(b)) }
	if *floorAddr != "" {
		rconn, rx, err := floorStream(ctx, *floorAddr, 'r', 0)
		if err != nil {
			return err
		}
		defer rconn.CloseWithError(0, "")
		// A failure elsewhere ends the receiver's blocked read.
		stopRx := context.AfterFunc(ctx, func() { _ = rconn.CloseWithError(0, "") })
		defer stopRx()
		// The floor forwards to the latest receiver, and says when this
		// one is registered.
		if _, err := io.ReadFull(rx, make([]byte, 1)); err != nil {
			return fmt.Errorf("floor receiver: %w", err)
		}
		sconn, tx, err := floorStream(ctx, *floorAddr, 's', 0)
		if err != nil {
			return err
		}
		defer sconn.CloseWithError(0, "")
		msg := make([]byte, floorMessage)
		send = func() error { stamp(msg); _, err := tx.Write(msg); return err }
		in := make([]byte, floorMessage)
		received = func() (time.Duration, error) {
			if _, err := io.ReadFull(rx, in); err != nil {
				return 0, err
			}
			return took(in), nil
		}
	} else {
		pr, closePair, err := d.onePair(ctx, r)
		if err != nil {
			return err
		}
		defer closePair()
		a, b := pr.tx, pr.rx
		target := []string{pr.rxD.id}
		var sends sync.WaitGroup
		defer sends.Wait()
		send = func() error {
			payload := make([]byte, floorMessage)
			stamp(payload)
			// Not waiting for the ack: the one-way time is what B sees.
			// A send that fails ends the run: its message would never
			// reach the receiver, which would wait for it for ever.
			sends.Go(func() {
				if err := a.Send(ctx, client.Message{Targets: target, Payload: payload}); err != nil {
					fail(fmt.Errorf("send: %w", err))
				}
			})
			return nil
		}
		received = func() (time.Duration, error) {
			ev, err := b.Receive(ctx)
			if err != nil {
				return 0, err
			}
			return took(ev.Payload), nil
		}
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for range *count {
			d, err := received()
			if err != nil {
				fail(fmt.Errorf("receive: %w", err))
				return
			}
			r.observe("oneway", d)
		}
	})
	// The server's CPU per message (the relay's edge from its /metrics,
	// the floor from --floor-admin): at a paced rate a packet seldom
	// shares its trip with another, unlike the saturated runs.
	cpuFrom := "" // the edge's
	if *floorAddr != "" {
		cpuFrom = *floorAdmin
	}
	cpu, cpuErr := time.Duration(0), errors.New("no --floor-admin")
	if *floorAddr == "" || cpuFrom != "" {
		cpu, cpuErr = d.cpuAt(ctx, cpuFrom)
	}
	interval := time.Duration(float64(time.Second) / *rate)
	pace := newSchedule()
	defer pace.stop()
	began := time.Now()
	for i := range *count {
		due := began.Sub(start) + time.Duration(i+1)*interval
		pace.waitUntil(ctx, start.Add(due))
		if ctx.Err() != nil {
			break
		}
		r.observe("send_lag", time.Since(start)-due)
		if err := send(); err != nil {
			fail(err)
			break
		}
	}
	wg.Wait()
	if err := context.Cause(ctx); err != nil {
		return err
	}
	r.Seconds = time.Since(began).Seconds()
	r.count("messages", float64(*count))
	if cpuErr == nil {
		if after, err := d.cpuAt(ctx, cpuFrom); err == nil {
			r.Peaks["server_cpu_us_per_message"] = float64((after - cpu).Nanoseconds()) / 1e3 / float64(*count)
		}
	}
	return d.finish(r)
}

// stream: 64-byte messages one way into the floor's sink, as fast as
// QUIC takes them (the transport's own cost per message received, which
// the relay's CPU per event is held against), or with --forward through
// the floor's forwarder to receivers (a bare forwarder's cost per message
// taken in and sent on, what the edge does for every frame it relays but
// without reading the frames), as fast as QUIC takes them or, with
// --inflight, closed loop as `rate --inflight` drives the relay: each
// pair keeps that many messages on their way to its receiver. Each
// reports the floor's CPU per message.
func (d *driverConfig) stream(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("stream", flag.ContinueOnError)
	count := fs.Int("count", 1_000_000, "messages, over all pairs")
	floorAddr := fs.String("floor", "127.0.0.1:7500", "the floor's QUIC address")
	floorAdmin := fs.String("floor-admin", "http://127.0.0.1:7501", "the floor's /cpu")
	forward := fs.Bool("forward", false, "through the floor's forwarder to receivers, not into its sink")
	pairs := fs.Int("pairs", 1, "with --forward: sender-receiver pairs, each on a channel of its own (at most 256)")
	inflight := fs.Int("inflight", 0, "with --forward: messages each pair keeps on their way to its receiver (closed loop); 0: as fast as QUIC takes them")
	if err := fs.Parse(args); err != nil {
		return err
	}
	switch {
	case *count < 1:
		return errors.New("--count must be at least 1")
	case !*forward && (*pairs != 1 || *inflight != 0):
		return errors.New("--pairs and --inflight go with --forward")
	case *pairs < 1 || *pairs > 256 || *pairs > *count:
		return errors.New("--pairs must be 1 to 256 (a channel each), and at most --count")
	case *inflight < 0:
		return errors.New("--inflight must not be negative")
	}
	r := newResult("stream", "floor")
	if *forward {
		r.Params["forward"], r.Params["pairs"], r.Params["inflight"] = 1, float64(*pairs), float64(*inflight)
	}
	// The first failure on any side cancels ctx, which ends the others.
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	type lane struct {
		tx    *quic.Stream
		txc   *quic.Conn
		rx    *quic.Stream // nil into the sink
		n     int          // messages it carries
		slots chan struct{}
	}
	lanes := make([]*lane, *pairs)
	defer func() {
		for _, l := range lanes {
			if l != nil && l.txc != nil {
				_ = l.txc.CloseWithError(0, "")
			}
		}
	}()
	// Every receiver is registered before the first sender comes: each
	// pair has a channel of its own through the forwarder.
	for i := range lanes {
		l := &lane{n: *count / *pairs}
		if i < *count%*pairs {
			l.n++
		}
		lanes[i] = l
		if !*forward {
			continue
		}
		rconn, rx, err := floorStream(ctx, *floorAddr, 'r', byte(i))
		if err != nil {
			return err
		}
		defer rconn.CloseWithError(0, "")
		defer context.AfterFunc(ctx, func() { _ = rconn.CloseWithError(0, "") })()
		if _, err := io.ReadFull(rx, make([]byte, 1)); err != nil { // registered
			return fmt.Errorf("floor receiver: %w", err)
		}
		l.rx = rx
		if *inflight > 0 {
			l.slots = make(chan struct{}, *inflight)
		}
	}
	for i, l := range lanes {
		role := byte('k')
		if *forward {
			role = 's'
		}
		conn, str, err := floorStream(ctx, *floorAddr, role, byte(i))
		if err != nil {
			return err
		}
		l.tx, l.txc = str, conn
	}
	before, err := d.cpuAt(ctx, *floorAdmin)
	if err != nil {
		return err
	}
	began := time.Now()
	var wg sync.WaitGroup
	for _, l := range lanes {
		if l.rx != nil {
			wg.Go(func() {
				want := int64(l.n) * floorMessage
				if l.slots == nil {
					if n, err := io.CopyN(io.Discard, l.rx, want); err != nil {
						cancel(fmt.Errorf("floor receiver: %w after %d of %d bytes", err, n, want))
					}
					return
				}
				in := make([]byte, floorMessage)
				for range l.n {
					if _, err := io.ReadFull(l.rx, in); err != nil {
						cancel(fmt.Errorf("floor receiver: %w", err))
						return
					}
					<-l.slots
				}
			})
		}
		wg.Go(func() {
			msg := make([]byte, floorMessage)
			for range l.n {
				if l.slots != nil {
					select {
					case l.slots <- struct{}{}:
					case <-ctx.Done():
						return
					}
				}
				if _, err := l.tx.Write(msg); err != nil {
					cancel(fmt.Errorf("floor sender: %w", err))
					return
				}
			}
			_ = l.tx.Close()
			select {
			case <-l.txc.Context().Done(): // the floor closes a sink or sender when it has read everything
			case <-ctx.Done():
			}
		})
	}
	wg.Wait()
	if err := context.Cause(ctx); err != nil {
		return err
	}
	r.Seconds = time.Since(began).Seconds()
	after, err := d.cpuAt(ctx, *floorAdmin)
	if err != nil {
		return err
	}
	r.count("messages", float64(*count))
	r.Peaks["server_cpu_us_per_message"] = float64((after - before).Nanoseconds()) / 1e3 / float64(*count)
	return d.finish(r)
}
