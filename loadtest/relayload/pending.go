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

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/quic-go/webtransport-go"

	"github.com/edge-relay/relay/edge/devconn"
)

// pending: connections to the edge that never become a session, as
// anyone can open them without an account. On the HTTPS port: idle (a
// TLS handshake and one request, then silence, held until the edge's
// idle timeout) or silent (TCP only, held until the handshake timeout).
// On the device port: quic or h3 (a QUIC handshake, native or HTTP/3,
// then no stream, held until the edge's stream timeout), or stream or wt
// (the session stream, native or of a WebTransport session, with half a
// frame on it: held in the session's handshake until its timeout). It
// reports what
// each costs the edge (its heap and goroutines, from its own /metrics
// after two collections) and whether the edge's bound (relayd edge
// --max-pending-https, --max-pending-quic) held.
func (d *driverConfig) pending(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("pending", flag.ContinueOnError)
	count := fs.Int("conns", 1000, "connections to open and hold")
	mode := fs.String("mode", "idle", "idle (a TLS handshake and one request, then silence) or silent (TCP only) to the HTTPS port; quic or h3 (a QUIC handshake, native or HTTP/3, and no stream), stream or wt (the session stream, native or a WebTransport session's, with half a frame) to the device port")
	hold := fs.Duration("hold", 0, "how long to hold them before measuring, beyond the time it takes the edge to count them")
	from := fs.String("from", "", "comma-separated local addresses to open them from, in turn (the edge bounds each source's share of its pending connections; on Linux any 127.0.0.0/8 address reaches an edge on loopback); empty: the system's choice")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var sources []netip.Addr
	if *from != "" {
		for _, a := range strings.Split(*from, ",") {
			ip, err := netip.ParseAddr(strings.TrimSpace(a))
			if err != nil {
				return fmt.Errorf("--from: %w", err)
			}
			sources = append(sources, ip)
		}
	}
	port := "https"
	switch *mode {
	case "idle", "silent":
	case "quic", "h3", "stream", "wt":
		port = "quic"
	default:
		return fmt.Errorf("--mode %q: idle, silent, quic, h3, stream or wt", *mode)
	}
	pendingGauge, evictedCounter := "relay_edge_"+port+"_pending_connections", "relay_edge_"+port+"_pending_evicted_total"
	r := newResult("pending", port)
	r.Params["conns"], r.Params["mode"] = float64(*count), *mode
	mem := []string{"go_memstats_heap_inuse_bytes", "go_memstats_stack_inuse_bytes", "go_goroutines", pendingGauge, evictedCounter}
	// Sessions and connections of an earlier run may still be ending:
	// start from an edge whose goroutines have stopped changing.
	if err := d.waitQuiet(ctx); err != nil {
		return err
	}
	before, err := d.settledMetrics(ctx, mem)
	if err != nil {
		return err
	}
	var conns []held
	q := &quicSources{from: map[netip.Addr]*quic.Transport{}}
	defer func() {
		for _, c := range conns {
			_ = c.Close()
		}
		q.close()
	}()
	start := time.Now()
	for i := range *count {
		var src netip.Addr
		if len(sources) > 0 {
			src = sources[i%len(sources)]
		}
		var c held
		var err error
		if port == "quic" {
			c, err = q.open(ctx, d.edge, *mode, src)
		} else {
			c, err = openPending(ctx, d.edge, *mode, src)
		}
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
	want := before[pendingGauge] + float64(len(conns))
	counted := time.Now().Add(30 * time.Second)
	for {
		m, err := d.edgeMetrics(ctx, pendingGauge, evictedCounter)
		if err != nil {
			return err
		}
		evicted := m[evictedCounter] - before[evictedCounter]
		if m[pendingGauge]+evicted >= want {
			break
		}
		if time.Now().After(counted) {
			return fmt.Errorf("the edge counts %.0f pending connections after 30 s, want %.0f (its handshake or stream timeout closed some? open fewer at once)",
				m[pendingGauge], want)
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
	kept := after[pendingGauge] - before[pendingGauge]
	r.peak("edge_pending", after[pendingGauge])
	r.count("evicted", after[evictedCounter]-before[evictedCounter])
	if kept > 0 {
		per := func(k string) float64 { return (after[k] - before[k]) / kept }
		r.peak("edge_heap_per_conn_bytes", per("go_memstats_heap_inuse_bytes"))
		r.peak("edge_stack_per_conn_bytes", per("go_memstats_stack_inuse_bytes"))
		r.peak("edge_goroutines_per_conn", per("go_goroutines"))
	}
	return d.finish(r)
}

// held is a connection the driver holds open: Closed says whether the
// edge closed it (its bound, or a timeout).
type held interface {
	Close() error
	Closed() bool
}

// tcpHeld is a connection to the HTTPS port: a short read that times
// out finds it still open.
type tcpHeld struct{ net.Conn }

func (c tcpHeld) Closed() bool {
	_ = c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	var ne net.Error
	_, err := c.Read(make([]byte, 1))
	return err != nil && !(errors.As(err, &ne) && ne.Timeout())
}

// quicHeld is a connection to the device port.
type quicHeld struct {
	c  *quic.Conn
	wt *webtransport.ClientConn // with mode wt
}

func (c quicHeld) Close() error { return c.c.CloseWithError(0, "") }
func (c quicHeld) Closed() bool { return c.c.Context().Err() != nil }

// closedByEdge counts the connections the edge closed (its bound, or a
// timeout). (Run beside a flood of other connections, this says whether
// the bound closed these or the flood's.)
func closedByEdge(conns []held) int {
	var closed atomic.Int64
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for _, c := range conns {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			if c.Closed() {
				closed.Add(1)
			}
		}()
	}
	wg.Wait()
	return int(closed.Load())
}

// quicSources opens QUIC connections to the device port, each source
// address (the zero one: the system's choice) through a socket of its
// own.
type quicSources struct {
	from map[netip.Addr]*quic.Transport
}

// open makes a QUIC handshake with the edge at addr from src, with ALPN
// relay/1 (modes quic and stream) or h3 (h3 and wt), and opens no stream
// (quic, h3) or the session stream with the first byte of a frame's
// length on it (stream; wt, in a WebTransport session).
func (q *quicSources) open(ctx context.Context, addr, mode string, src netip.Addr) (held, error) {
	tr := q.from[src]
	if tr == nil {
		la := &net.UDPAddr{}
		if src.IsValid() {
			la.IP = src.AsSlice()
		}
		udp, err := net.ListenUDP("udp", la)
		if err != nil {
			return nil, err
		}
		tr = &quic.Transport{Conn: udp}
		q.from[src] = tr
	}
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, err
	}
	alpn := devconn.ALPN
	if mode == "h3" || mode == "wt" {
		alpn = http3.NextProtoH3
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	tlsConf := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{alpn}, MinVersion: tls.VersionTLS13} // only the edge's cost is measured
	c, err := tr.Dial(dctx, ua, tlsConf, devconn.QUICConfig(time.Minute))
	if err != nil {
		return nil, err
	}
	h := quicHeld{c: c}
	var str interface{ Write([]byte) (int, error) }
	switch mode {
	case "stream":
		str, err = c.OpenStream()
	case "wt":
		if h.wt, err = (&webtransport.Transport{}).NewClientConn(c); err == nil {
			var sess *webtransport.Session
			if _, sess, err = h.wt.Dial(dctx, "https://"+addr+devconn.WebTransportPath, nil); err == nil {
				str, err = sess.OpenStream()
			}
		}
	}
	if err == nil && str != nil {
		_, err = str.Write([]byte{0x80}) // a frame length's first byte: the edge waits for the rest
	}
	if err != nil {
		_ = h.Close()
		return nil, err
	}
	return h, nil
}

func (q *quicSources) close() {
	for _, tr := range q.from {
		_ = tr.Close()
		_ = tr.Conn.Close()
	}
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
func openPending(ctx context.Context, addr, mode string, src netip.Addr) (held, error) {
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	dl := &net.Dialer{}
	if src.IsValid() {
		dl.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
	}
	if mode == "silent" {
		c, err := dl.DialContext(dctx, "tcp", addr)
		if err != nil {
			return nil, err
		}
		return tcpHeld{c}, nil
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
	return tcpHeld{c}, nil
}
