package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// pending: connections to the edge's HTTPS port that never become a
// session, as anyone can open them without an account: idle (a TLS
// handshake and one request, then silence, held until the edge's idle
// timeout) or silent (TCP only, held until the handshake timeout). It
// reports what each costs the edge (its heap and goroutines, from its
// own /metrics after a collection) and whether the edge's bound
// (relayd edge --max-pending-https) held.
func (d *driverConfig) pending(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("pending", flag.ContinueOnError)
	count := fs.Int("conns", 1000, "connections to open and hold")
	mode := fs.String("mode", "idle", "idle (a TLS handshake and one request, then silence) or silent (TCP only)")
	hold := fs.Duration("hold", 0, "how long to hold them before measuring, beyond the time it takes the edge to count them")
	from := fs.String("from", "", "comma-separated local addresses to open them from, in turn (the edge bounds each source's share of its pending connections; on Linux any 127.0.0.0/8 address reaches an edge on loopback); empty: the system's choice")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var sources []net.Addr
	if *from != "" {
		for _, a := range strings.Split(*from, ",") {
			ip, err := netip.ParseAddr(strings.TrimSpace(a))
			if err != nil {
				return fmt.Errorf("--from: %w", err)
			}
			sources = append(sources, &net.TCPAddr{IP: ip.AsSlice()})
		}
	}
	if *mode != "idle" && *mode != "silent" {
		return fmt.Errorf("--mode %q: idle or silent", *mode)
	}
	r := newResult("pending", "https")
	r.Params["conns"], r.Params["mode"] = float64(*count), *mode
	mem := []string{"go_memstats_heap_inuse_bytes", "go_memstats_stack_inuse_bytes", "go_goroutines",
		"relay_edge_https_pending_connections", "relay_edge_https_pending_evicted_total"}
	// Sessions and connections of an earlier run may still be ending:
	// start from an edge whose goroutines have stopped changing.
	if err := d.waitQuiet(ctx); err != nil {
		return err
	}
	before, err := d.settledMetrics(ctx, mem)
	if err != nil {
		return err
	}
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			_ = c.Close()
		}
	}()
	start := time.Now()
	for i := range *count {
		var src net.Addr
		if len(sources) > 0 {
			src = sources[i%len(sources)]
		}
		c, err := openPending(ctx, d.edge, *mode, src)
		if err != nil {
			r.count("failed", 1)
			continue
		}
		conns = append(conns, c)
		r.count("opened", 1)
	}
	r.Seconds = time.Since(start).Seconds()
	// Wait until the edge counts them (or its bound stops the count); a
	// silent one the edge closed at its handshake timeout meanwhile
	// would never be counted, hence the deadline.
	want := before["relay_edge_https_pending_connections"] + float64(len(conns))
	counted := time.Now().Add(30 * time.Second)
	for {
		m, err := d.edgeMetrics(ctx, "relay_edge_https_pending_connections", "relay_edge_https_pending_evicted_total")
		if err != nil {
			return err
		}
		evicted := m["relay_edge_https_pending_evicted_total"] - before["relay_edge_https_pending_evicted_total"]
		if m["relay_edge_https_pending_connections"]+evicted >= want {
			break
		}
		if time.Now().After(counted) {
			return fmt.Errorf("the edge counts %.0f pending connections after 30 s, want %.0f (its handshake timeout closed some? open fewer at once)",
				m["relay_edge_https_pending_connections"], want)
		}
		if err := sleepCtx(ctx, 20*time.Millisecond); err != nil {
			return err
		}
	}
	if err := sleepCtx(ctx, *hold); err != nil {
		return err
	}
	after, err := d.settledMetrics(ctx, mem)
	if err != nil {
		return err
	}
	r.count("closed_by_edge", float64(closedByEdge(conns)))
	held := after["relay_edge_https_pending_connections"] - before["relay_edge_https_pending_connections"]
	r.peak("edge_pending", after["relay_edge_https_pending_connections"])
	r.count("evicted", after["relay_edge_https_pending_evicted_total"]-before["relay_edge_https_pending_evicted_total"])
	if held > 0 {
		per := func(k string) float64 { return (after[k] - before[k]) / held }
		r.peak("edge_heap_per_conn_bytes", per("go_memstats_heap_inuse_bytes"))
		r.peak("edge_stack_per_conn_bytes", per("go_memstats_stack_inuse_bytes"))
		r.peak("edge_goroutines_per_conn", per("go_goroutines"))
	}
	return d.finish(r)
}

// closedByEdge counts the connections the edge closed (its bound, or a
// timeout): a short read that times out finds one still open. (Run
// beside a flood of other connections, this says whether the bound
// closed these or the flood's.)
func closedByEdge(conns []net.Conn) int {
	var closed atomic.Int64
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for _, c := range conns {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			_ = c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
			var ne net.Error
			if _, err := c.Read(make([]byte, 1)); err != nil && !(errors.As(err, &ne) && ne.Timeout()) {
				closed.Add(1)
			}
		}()
	}
	wg.Wait()
	return int(closed.Load())
}

// waitQuiet waits (up to 10 s) until the edge's goroutine count reads the
// same three times in a row, 250 ms apart.
func (d *driverConfig) waitQuiet(ctx context.Context) error {
	last, same := -1.0, 0
	for range 40 {
		m, err := d.edgeMetrics(ctx, "go_goroutines")
		if err != nil {
			return err
		}
		if m["go_goroutines"] == last {
			if same++; same == 2 {
				return nil
			}
		} else {
			last, same = m["go_goroutines"], 0
		}
		if err := sleepCtx(ctx, 250*time.Millisecond); err != nil {
			return err
		}
	}
	return nil // measured anyway: an edge under other load never settles
}

// openPending opens one connection to the HTTPS port at addr (the edge's
// address: TCP on the UDP port's number) in the given mode.
func openPending(ctx context.Context, addr, mode string, from net.Addr) (net.Conn, error) {
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	dl := &net.Dialer{LocalAddr: from}
	if mode == "silent" {
		return dl.DialContext(dctx, "tcp", addr)
	}
	td := tls.Dialer{NetDialer: dl, Config: &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}}} // only the edge's cost is measured
	c, err := td.DialContext(dctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n")); err != nil {
		_ = c.Close()
		return nil, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err == nil {
		_, err = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
		if err == nil && resp.StatusCode != http.StatusOK {
			err = fmt.Errorf("GET /healthz: %s", resp.Status)
		}
	}
	if err != nil {
		_ = c.Close()
		return nil, errors.Join(errors.New("open an idle HTTPS connection"), err)
	}
	_ = c.SetDeadline(time.Time{})
	return c, nil
}
