package main

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/quic-go/quic-go"

	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/internal/certpool"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

// driverConfig is what every scenario shares.
type driverConfig struct {
	control           string
	controlCA         string // --control-ca: the CA that verifies an https:// --control
	adminPasswordFile string
	adminPassword     string
	adminToken        string
	edge              string
	edgeAdmin         string
	controlAdmin      string
	transport         string
	concurrency       int
	asJSON            bool
	cpuProfile        string // --cpuprofile: the driver's own CPU profile
	progress          time.Duration
	thresholds        thresholds
	retries           int
	slowDial          time.Duration

	log  *slog.Logger
	out  io.Writer
	errw io.Writer
	http *http.Client
}

func (d *driverConfig) register(fs *flag.FlagSet) {
	fs.StringVar(&d.control, "control", "http://127.0.0.1:7400", "control API URL: http:// (HTTP/2 without TLS, relayd without --tls-*) or https:// (HTTP/2 over TLS)")
	fs.StringVar(&d.controlCA, "control-ca", "", "PEM file of the CA that verifies an https:// --control (the control plane's, as relayd edge --control-ca; default: the system's roots)")
	fs.StringVar(&d.adminPasswordFile, "admin-password-file", "data/admin-password", "file with the admin's password (or set RELAY_ADMIN_PASSWORD)")
	fs.StringVar(&d.edge, "edge", "127.0.0.1:7443", "the edge's UDP address")
	fs.StringVar(&d.edgeAdmin, "edge-admin", "http://127.0.0.1:7444", "the edge's admin URL (certificate hashes, /metrics)")
	fs.StringVar(&d.controlAdmin, "control-admin", "", "a control node's admin URL (/metrics): the rate scenario then also reports its CPU per event (the leader's, for the mailbox path)")
	fs.StringVar(&d.transport, "transport", "quic", "quic or webtransport")
	fs.IntVar(&d.concurrency, "concurrency", 32, "parallel API calls, and the most connection attempts in flight (dials are paced below it by how fast the edge answers)")
	fs.IntVar(&d.retries, "retries", 5, "attempts per session before it counts as failed (backoff with jitter between them)")
	fs.DurationVar(&d.slowDial, "slow-dial", 2*time.Second, "a session that takes longer than this to come up slows the dialing down")
	fs.BoolVar(&d.asJSON, "json", false, "print the result as one JSON object (relayload merge reads these)")
	fs.DurationVar(&d.progress, "progress", 2*time.Second, "print a progress line to stderr this often (0: never)")
	fs.Var(&d.thresholds, "threshold", "fail (exit 99) unless this holds, e.g. ack_p99_ms<50 or error_rate<0.01 (repeatable, or comma-separated)")
	fs.StringVar(&d.cpuProfile, "cpuprofile", "", "write the driver's own CPU profile of the scenario to this file (go tool pprof), to see whether the driver or the edge is the limit")
}

// device is a provisioned device.
type device struct {
	user, id string
	key      ed25519.PrivateKey
	// tls keeps the device's TLS session tickets across its reconnects,
	// as a device's process does: reconnects resume TLS.
	tls tls.ClientSessionCache
	// revision registered the device: its Hellos name it (MinRevision),
	// so an edge that has not caught up with it yet waits instead of
	// refusing a device it does not know.
	revision uint64
}

// controlClient is the HTTP client of the control API at url: HTTP/2
// without TLS (h2c, what relayd serves without --tls-*) for http://,
// HTTP/2 over TLS for https://, the server verified against the CA in
// caFile, or the system's roots without one.
func controlClient(url, caFile string) (*http.Client, error) {
	tr := &http.Transport{MaxIdleConnsPerHost: 64}
	var p http.Protocols
	switch {
	case strings.HasPrefix(url, "http://"):
		if caFile != "" {
			return nil, fmt.Errorf("--control-ca is for an https:// control URL, not %s", url)
		}
		p.SetUnencryptedHTTP2(true)
	case strings.HasPrefix(url, "https://"):
		p.SetHTTP2(true)
		// relayd's API takes TLS 1.3 only.
		tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS13}
		if caFile != "" {
			pool, err := certpool.FromFile(caFile)
			if err != nil {
				return nil, fmt.Errorf("--control-ca: %w", err)
			}
			tr.TLSClientConfig.RootCAs = pool
		}
	default:
		return nil, fmt.Errorf("--control %q: want an http:// or https:// URL", url)
	}
	tr.Protocols = &p
	return &http.Client{Transport: tr}, nil
}

func (d *driverConfig) setup() (token string, err error) {
	if d.http, err = controlClient(d.control, d.controlCA); err != nil {
		return "", err
	}
	if d.adminToken != "" {
		// An access token (relayctl token prints one): no login, which
		// the control plane throttles per account.
		return d.adminToken, nil
	}
	if d.adminPassword == "" {
		b, err := os.ReadFile(d.adminPasswordFile)
		if err != nil {
			return "", fmt.Errorf("admin password: set RELAY_ADMIN_PASSWORD or --admin-password-file: %w", err)
		}
		d.adminPassword = strings.TrimSpace(string(b))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := controlv1connect.NewAuthServiceClient(d.http, d.control).Login(ctx,
		connect.NewRequest(&controlv1.LoginRequest{Login: "admin", Password: d.adminPassword}))
	if err != nil {
		return "", fmt.Errorf("log in as admin at %s: %w", d.control, err)
	}
	return resp.Msg.GetTokens().GetAccessToken(), nil
}

func authed[T any](m *T, token string) *connect.Request[T] {
	r := connect.NewRequest(m)
	r.Header().Set("Authorization", "Bearer "+token)
	return r
}

// provisionCalls bounds the admin's API calls in flight while
// provisioning.
const provisionCalls = 32

// provision creates `users` accounts with `per` devices each.
func (d *driverConfig) provision(ctx context.Context, users, per int) ([][]device, error) {
	token, err := d.setup()
	if err != nil {
		return nil, err
	}
	uc := controlv1connect.NewUserServiceClient(d.http, d.control)
	dc := controlv1connect.NewDeviceServiceClient(d.http, d.control)
	run := newRunID()
	out := make([][]device, users)
	// The admin's calls in flight at once stay well within what the API
	// takes from one account (api.Limits.MaxCallsPerAccount, 64), however
	// many dials --concurrency lets run.
	err = parallel(ctx, users, min(d.concurrency, provisionCalls), func(ctx context.Context, i int) error {
		u, err := uc.CreateUser(ctx, authed(&controlv1.CreateUserRequest{Login: fmt.Sprintf("load-%s-%d", run, i)}, token))
		if err != nil {
			return fmt.Errorf("create user: %w", err)
		}
		uid := u.Msg.GetUser().GetId()
		for j := range per {
			pub, priv, _ := ed25519.GenerateKey(rand.Reader)
			r, err := dc.RegisterDevice(ctx, authed(&controlv1.RegisterDeviceRequest{UserId: uid, Name: fmt.Sprintf("d%d", j), PublicKey: pub}, token))
			if err != nil {
				return fmt.Errorf("register device: %w", err)
			}
			out[i] = append(out[i], device{user: uid, id: r.Msg.GetDevice().GetId(), key: priv, tls: tls.NewLRUClientSessionCache(2), revision: r.Msg.GetRevision()})
		}
		return nil
	})
	return out, err
}

// prepare provisions `users` users of two devices each and a dialer for them.
func (d *driverConfig) prepare(ctx context.Context, users int) ([][]device, *dialer, error) {
	devs, err := d.provision(ctx, users, 2)
	if err != nil {
		return nil, nil, err
	}
	dl, err := d.newDialer(ctx)
	if err != nil {
		return nil, nil, err
	}
	return devs, dl, nil
}

func newRunID() string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return fmt.Sprintf("%x", b)
}

// parallel runs f(0..n-1) with at most conc at once; the first error
// cancels the rest.
func parallel(ctx context.Context, n, conc int, f func(context.Context, int) error) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	sem := make(chan struct{}, max(conc, 1))
	var wg sync.WaitGroup
	for i := range n {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		wg.Go(func() {
			defer func() { <-sem }()
			if err := f(ctx, i); err != nil {
				cancel(err)
			}
		})
	}
	wg.Wait()
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return ctx.Err()
}

// adminTimeout bounds one request to an admin server, its answer read
// whole included: one that stopped answering (an edge paused or stopped
// in a fault run) fails that read instead of holding the run for ever.
const adminTimeout = 30 * time.Second

// adminGet GETs url from an admin server within timeout.
func adminGet(ctx context.Context, url string, timeout time.Duration) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	return (&http.Client{Timeout: timeout}).Do(req)
}

// certHashes fetches the certificate hashes the edge whose admin server
// is at admin publishes.
func certHashes(ctx context.Context, admin string) ([][]byte, error) {
	resp, err := adminGet(ctx, admin+"/.well-known/relay/certificate-hashes", adminTimeout)
	if err != nil {
		return nil, fmt.Errorf("fetch the edge's certificate hashes: %w", err)
	}
	defer resp.Body.Close()
	var doc struct {
		Hashes []struct{ Value string } `json:"hashes"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		return nil, err
	}
	var out [][]byte
	for _, h := range doc.Hashes {
		b, err := base64.StdEncoding.DecodeString(h.Value)
		if err != nil {
			return nil, err
		}
		out = append(out, b)
	}
	return out, nil
}

// dialer connects devices, sharing UDP sockets (one per 1000 QUIC
// connections) so that thousands of sessions need few file descriptors.
type dialer struct {
	d    *driverConfig
	edge string // the edge's UDP address
	pins [][]byte
	// noDatagrams: the devices say they send no datagrams.
	noDatagrams bool
	mu          sync.Mutex
	trs         []*quic.Transport
	socks       []net.PacketConn
	onSock      int
}

func (d *driverConfig) newDialer(ctx context.Context) (*dialer, error) {
	return d.newDialerFor(ctx, d.edge, d.edgeAdmin)
}

// newDialerFor is a dialer for the edge at addr, whose admin server is at
// admin.
func (d *driverConfig) newDialerFor(ctx context.Context, addr, admin string) (*dialer, error) {
	pins, err := certHashes(ctx, admin)
	if err != nil {
		return nil, err
	}
	return &dialer{d: d, edge: addr, pins: pins}, nil
}

func (dl *dialer) transport() (*quic.Transport, error) {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	if len(dl.trs) == 0 || dl.onSock >= 1000 {
		pc, err := net.ListenPacket("udp", localUDPAddr(dl.edge))
		if err != nil {
			return nil, err
		}
		dl.socks = append(dl.socks, pc)
		dl.trs = append(dl.trs, &quic.Transport{Conn: pc})
		dl.onSock = 0
	}
	dl.onSock++
	return dl.trs[len(dl.trs)-1], nil
}

// localUDPAddr is the address the dialer's sockets bind for an edge at
// edge: the loopback address for an edge on this machine's loopback
// (nothing outside can reach the socket then), else every address, the
// kernel picking each packet's source by its route. A socket bound to
// 127.0.0.1 cannot send to any other address (sendto: EINVAL), so an
// edge anywhere else, a Kubernetes Service among them, would see no
// packet.
func localUDPAddr(edge string) string {
	if host, _, err := net.SplitHostPort(edge); err == nil {
		if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
			return net.JoinHostPort(ip.String(), "0")
		}
	}
	return ":0"
}

func (dl *dialer) dial(ctx context.Context, dev device) (*client.Client, error) {
	return dl.dialTicket(ctx, dev, nil)
}

// dialTicket connects a device, resuming with ticket when one is given.
func (dl *dialer) dialTicket(ctx context.Context, dev device, ticket []byte) (*client.Client, error) {
	cfg := client.Config{Addr: dl.edge, UserID: dev.user, DeviceID: dev.id, Key: dev.key, CertHashes: dl.pins, Logger: dl.d.log, ReceiveBuffer: 8192, MaxPending: maxOutstanding, ResumeTicket: ticket, TLSSessions: dev.tls, NoDatagrams: dl.noDatagrams, MinRevision: dev.revision}
	if dl.d.transport == "webtransport" {
		cfg.Transport = client.WebTransport
	} else {
		tr, err := dl.transport()
		if err != nil {
			return nil, err
		}
		cfg.QUICTransport = tr
	}
	return client.Dial(ctx, cfg)
}

// close closes the UDP sockets: every QUIC connection on them is gone
// at once, without a word to the edge (as when a device loses its
// network). New dials open new sockets.
func (dl *dialer) close() {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	for _, tr := range dl.trs {
		_ = tr.Close()
	}
	for _, s := range dl.socks {
		_ = s.Close()
	}
	dl.trs, dl.socks, dl.onSock = nil, nil, 0
}

// finish derives the figures, checks the thresholds and prints r.
func (d *driverConfig) finish(r *result) error {
	r.derive()
	terr := d.thresholds.check(r)
	if terr != nil && !errors.Is(terr, errThresholds) {
		return terr
	}
	if err := r.write(d.out, d.asJSON); err != nil {
		return err
	}
	return terr
}

// showProgress prints line() to stderr every --progress until stop is
// called.
func (d *driverConfig) showProgress(line func() string) (stop func()) {
	if d.progress <= 0 || d.errw == nil {
		return func() {}
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	start := time.Now()
	wg.Go(func() {
		t := time.NewTicker(d.progress)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				fmt.Fprintf(d.errw, "relayload %6.1fs %s\n", time.Since(start).Seconds(), line())
			}
		}
	})
	return func() { close(done); wg.Wait() }
}

// edgeMetrics reads gauges from the edge's /metrics.
func (d *driverConfig) edgeMetrics(ctx context.Context, names ...string) (map[string]float64, error) {
	return metricsAt(ctx, d.edgeAdmin, names...)
}

// metricsAt reads the named metrics (summed over their labels) from the
// /metrics of the admin server at base; a name with one label,
// `name{label="value"}`, sums the series that have it (label values
// without commas).
func metricsAt(ctx context.Context, base string, names ...string) (map[string]float64, error) {
	out := map[string]float64{}
	err := scrape(ctx, base, func(name, labels string, v float64) {
		for _, want := range names {
			wbase, wlabel, _ := strings.Cut(want, "{")
			wlabel = strings.TrimSuffix(wlabel, "}")
			if wbase == name && (wlabel == "" || slices.Contains(strings.Split(labels, ","), wlabel)) {
				out[want] += v
			}
		}
	})
	return out, err
}

// scrape reads the /metrics of the admin server at base (the text
// format), calling fn with each sample's name, its labels (without the
// braces) and its value.
func scrape(ctx context.Context, base string, fn func(name, labels string, v float64)) error {
	resp, err := adminGet(ctx, base+"/metrics", adminTimeout)
	if err != nil {
		return fmt.Errorf("read the metrics of %s: %w", base, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("read the metrics of %s: %s", base, resp.Status)
	}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		name, value, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		v, err := strconv.ParseFloat(value, 64)
		if err != nil {
			continue
		}
		base, labels, _ := strings.Cut(name, "{")
		fn(base, strings.TrimSuffix(labels, "}"), v)
	}
	return sc.Err()
}

// bucketsAt reads a histogram's cumulative bucket counts from the
// /metrics at base, by upper bound (+Inf included), summed over its
// other labels.
func bucketsAt(ctx context.Context, base, histogram string) (map[float64]float64, error) {
	out := map[float64]float64{}
	err := scrape(ctx, base, func(name, labels string, v float64) {
		if name != histogram+"_bucket" {
			return
		}
		for l := range strings.SplitSeq(labels, ",") {
			if le, ok := strings.CutPrefix(l, `le="`); ok {
				if b, err := strconv.ParseFloat(strings.TrimSuffix(le, `"`), 64); err == nil {
					out[b] += v
				}
			}
		}
	})
	if err == nil && len(out) == 0 {
		err = fmt.Errorf("%s exports no histogram %s", base, histogram)
	}
	return out, err
}

// bucketQuantile estimates the q-quantile of what a histogram counted
// between two readings (before may be nil) as Prometheus's
// histogram_quantile does: linear within the bucket it falls in, the
// highest finite bound when it falls in +Inf. ok is false when nothing
// was counted.
func bucketQuantile(q float64, before, after map[float64]float64) (v float64, ok bool) {
	bounds := slices.Sorted(maps.Keys(after))
	if len(bounds) == 0 {
		return 0, false
	}
	total := after[bounds[len(bounds)-1]] - before[bounds[len(bounds)-1]]
	if total <= 0 {
		return 0, false
	}
	rank := q * total
	lower, below := 0.0, 0.0
	for _, b := range bounds {
		n := after[b] - before[b]
		if n >= rank {
			if math.IsInf(b, 1) {
				return lower, true
			}
			if n == below {
				return b, true
			}
			return lower + (b-lower)*(rank-below)/(n-below), true
		}
		lower, below = b, n
	}
	return lower, true
}

// sleepCtx waits for d, or returns ctx's error if it ends first.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
