// Package server assembles an edge: the UDP listener for QUIC and
// WebTransport, the HTTPS port (certificate hashes, health, metrics), an
// optional plain-HTTP admin port, the certificate (from files, or
// self-signed and renewed), the link to the control plane, the directory
// that follows its watch feed, activity reports, and an ordered shutdown.
package server

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"connectrpc.com/otelconnect"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/edge-relay/relay/edge/controlconn"
	"github.com/edge-relay/relay/edge/devconn"
	"github.com/edge-relay/relay/edge/directory"
	"github.com/edge-relay/relay/edge/mailbox"
	"github.com/edge-relay/relay/edge/mesh"
	"github.com/edge-relay/relay/edge/session"
	"github.com/edge-relay/relay/edge/transport"
	"github.com/edge-relay/relay/edge/web"
	"github.com/edge-relay/relay/internal/buildinfo"
	"github.com/edge-relay/relay/internal/connbound"
	"github.com/edge-relay/relay/internal/profiler"
	"github.com/edge-relay/relay/internal/telemetry"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// Config configures an edge. Zero fields take the defaults in brackets.
type Config struct {
	// EdgeID names the edge in handshakes and logs; required.
	EdgeID string
	// Addr is where devices connect: UDP for QUIC and WebTransport, and
	// TCP (same port number) for HTTPS ["127.0.0.1:7443"]. Port 0 picks a
	// free UDP port and uses the same number for TCP when it is free.
	Addr string
	// AdminAddr serves /metrics, /healthz, /readyz and the certificate
	// hashes over plain HTTP; empty disables it.
	AdminAddr string
	// CertFile and KeyFile hold the edge's certificate; without them a
	// self-signed ECDSA certificate valid for 10 days is made, renewed 3
	// days before it expires, and its SHA-256 published.
	CertFile, KeyFile string
	// Control reaches the control plane with the edge's credential;
	// required.
	Control controlconn.Config
	// Session tunes the session core (EdgeID, Directory, Ring, Logger,
	// Metrics and Tracer are set by the server).
	Session session.Config
	// PublicAddr is the UDP host:port browsers are told to reach for
	// WebTransport (EdgeInfoPath), or a host alone (an IPv6 address
	// with or without brackets) with Addr's port as bound [Addr as bound;
	// an unspecified host such as 0.0.0.0 is replaced by the host the
	// page was loaded from].
	PublicAddr string
	// AllowedOrigins lists the web origins, besides the edge's own page,
	// whose pages may open WebTransport and WebSocket sessions; "*" admits
	// any (see transport.OriginPolicy) [none].
	AllowedOrigins []string
	// MeshAddr is the UDP address of the mesh listener (other edges
	// connect there) [the host of Addr, a free port]; MeshAdvertise the
	// address other edges are told, host:port or a host alone with
	// MeshAddr's port as bound [MeshAddr as bound].
	MeshAddr, MeshAdvertise string
	// IdleTimeout closes device connections that send nothing, not even
	// keep-alives [30s]; MeshIdleTimeout does the same for mesh links
	// [5s].
	IdleTimeout, MeshIdleTimeout time.Duration
	// MeshPresenceGrace is how long the devices a peer edge announced stay
	// where they are after its mesh link ended, for it to reconnect
	// (mesh.Config.PresenceGrace) [10s; negative: none].
	MeshPresenceGrace time.Duration
	// MaxUnvalidatedHandshakes is how many QUIC handshakes from
	// addresses not yet validated the device port runs at once before it
	// sends new connections a Retry first (see transport.Config) [1024;
	// negative: always].
	MaxUnvalidatedHandshakes int
	// HTTPIdleTimeout closes HTTPS and admin connections (HTTP/1.1
	// keep-alive and HTTP/2) that carry no request for this long [60s]:
	// a client that opens connections and goes silent holds none for
	// long.
	HTTPIdleTimeout time.Duration
	// HTTPWriteTimeout bounds each answer of the HTTPS port, from the end
	// of its request's headers to its last byte [60s]: the console page,
	// relay.js, the console's calls passed on to the control plane,
	// health and info. A client that stops reading (over HTTP/2 it need
	// only give the edge no flow-control window) holds a handler no
	// longer. A WebSocket session is not bounded by it: net/http lifts a
	// connection's deadlines when it is hijacked, and the session's
	// writer sets its own.
	HTTPWriteTimeout time.Duration
	// MaxPendingHTTPS bounds the HTTPS port's connections that are not a
	// device session (in their TLS handshake, serving a request, idle
	// between requests, a WebSocket whose session is not admitted yet)
	// at the bound the oldest is
	// closed, and one source (IPv4 address, IPv6 /64) holds at most a
	// sixteenth of it (at least 16), beyond which its own oldest is
	// [MaxPendingHTTPSFor the session cap: 4096, or an eighth of
	// Session.MaxSessions, at least 64; 0 takes it].
	// Those that never carried a request go first. A flood of
	// connections holds at most this many; one whose connections stay
	// silent or stall before a request's headers (in their TLS handshake,
	// after HTTP/2's preface) cannot push out a real client, and one that
	// sends a request on each (a key exchange each) and stalls keeps it
	// out only by filling the bound, from many sources, faster than the
	// client's handshakes take.
	MaxPendingHTTPS int
	// MaxPendingQUIC bounds the device port's QUIC connections, native
	// and HTTP/3, that are not a device session (in their handshake,
	// waiting for their session stream or WebTransport session, in the
	// session's handshake) [transport.MaxPendingQUICFor the session cap:
	// 1024, or a sixty-fourth of Session.MaxSessions, at least 64]; at
	// the bound the oldest is closed, those that never opened a
	// session stream first, and one source (IPv4 address, IPv6 /64)
	// holds at most a sixteenth of it (at least 16), beyond which its own
	// oldest is (see transport.Config.MaxPendingQUIC).
	MaxPendingQUIC int
	// ClusterTLSTickets seals the device ports' TLS 1.3 session tickets
	// with the cluster's session keys (session.ShareTLSTickets), so a
	// device resumes TLS on any edge; off, each edge process keeps its
	// own ticket keys. On, a session key also lets whoever holds it (the
	// control plane's state and backups hold it) impersonate an edge to a
	// device that resumes, and clients that pin certificates must pin
	// every edge's (docs/protocol.md, "TLS session tickets").
	ClusterTLSTickets bool
	// NoMailbox runs the edge without the control plane's mailboxes:
	// events for devices that are not connected are refused
	// (TARGET_OFFLINE). For tests and single-edge setups that want it.
	NoMailbox bool
	// ControlGrace is how long the edge goes on admitting sessions
	// without hearing from the control plane (its watch feed, which
	// carries a message at least every few seconds when healthy). Past
	// it, the edge cannot know of revocations, deletions or key
	// rotations, so it refuses new sessions and resumes (GOING_AWAY, so
	// devices try another edge) while the sessions it has go on relaying;
	// admission comes back with the feed. 0 turns the fail-safe off.
	ControlGrace time.Duration
	// DrainWindow spreads the clients' reconnects over this long on
	// shutdown [10s].
	DrainWindow time.Duration
	// ActivityEvery is how often device activity is reported [30s].
	ActivityEvery time.Duration
	// Logger [slog.Default()]; TracerProvider [none]; Registry for
	// metrics [a new one, served on /metrics].
	Logger         *slog.Logger
	TracerProvider trace.TracerProvider
	Registry       *prometheus.Registry
}

// Server is a running edge.
type Server struct {
	cfg      Config
	log      *slog.Logger
	certs    *certSource
	ring     *session.Ring
	dir      *directory.Directory
	hub      *session.Hub
	listener *transport.Listener
	control  *controlconn.Conn
	https    *http.Server
	httpsLn  net.Listener
	admin    *http.Server
	adminLn  net.Listener

	ws         *transport.WebSocketHandler
	wsSessions sync.WaitGroup // WebSocket sessions (their HTTP handlers)
	mailbox    *mailbox.Client
	mesh       *mesh.Mesh
	identity   *mesh.Identity
	// leaseUntil is when the membership lease runs out on this edge's
	// clock (Unix nanoseconds; 0 before the first registration); regErr
	// is the last registration's error (nil after a success).
	leaseUntil atomic.Int64
	regErr     atomic.Pointer[string]
	cutOff     atomic.Bool // last logged state of controlSilent
	// stepAside holds the peers that hear the control plane while this
	// edge has been cut off from it for StepAsideAfter (nil otherwise):
	// the edge is then not ready, so its load balancer sends devices to
	// them (see Ready).
	stepAside atomic.Pointer[[]string]

	cancel     context.CancelFunc
	stopBgWork context.CancelFunc // mailbox writer and registration, stopped last
	// stopRegister ends the registration loop at its next wait, without
	// cutting short a registration under way; registerDone is closed once
	// the loop returned.
	stopRegister func()
	registerDone chan struct{}

	portDown   atomic.Pointer[string] // a device port that stopped accepting, and why
	activityMu sync.Mutex             // guards unreported; one activity report at a time
	// unreported is, by device, the activity of a report that failed,
	// sent with the next one.
	unreported map[string]session.Activity
	wg         sync.WaitGroup
	bg         sync.WaitGroup
	ready      atomic.Bool // listeners up; the directory's sync is checked live
	stopping   atomic.Bool // Shutdown or Kill began
	once       sync.Once
}

// Start starts an edge. It returns once the listeners are up; Ready
// reports when the directory has synced and sessions can be served.
func Start(ctx context.Context, cfg Config) (_ *Server, err error) {
	if cfg.EdgeID == "" {
		return nil, errors.New("edge: EdgeID is required")
	}
	if cfg.Addr == "" {
		cfg.Addr = "127.0.0.1:7443"
	}
	if cfg.DrainWindow <= 0 {
		cfg.DrainWindow = 10 * time.Second
	}
	if cfg.ActivityEvery <= 0 {
		cfg.ActivityEvery = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	// Without a provider nothing is traced, and the per-event path
	// builds no span at all (the session core and the mailbox writer get
	// no tracer); the Connect interceptor gets the no-op provider.
	var tracer trace.Tracer
	if cfg.TracerProvider != nil {
		tracer = cfg.TracerProvider.Tracer("github.com/edge-relay/relay/edge")
	}
	if cfg.TracerProvider == nil {
		cfg.TracerProvider = noop.NewTracerProvider()
	}
	if cfg.Registry == nil {
		cfg.Registry = prometheus.NewRegistry()
		cfg.Registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	// (A registry shared with another server of this process has it.)
	if err := cfg.Registry.Register(buildinfo.Get().Collector()); err != nil && !errors.As(err, new(prometheus.AlreadyRegisteredError)) {
		return nil, fmt.Errorf("register relay_build_info: %w", err)
	}
	for _, a := range []struct{ what, v string }{{"public address", cfg.PublicAddr}, {"mesh advertise address", cfg.MeshAdvertise}} {
		if a.v == "" {
			continue
		}
		if _, _, err := splitAdvertised(a.v); err != nil {
			return nil, fmt.Errorf("%s %q: %w", a.what, a.v, err)
		}
	}
	s := &Server{cfg: cfg, log: cfg.Logger.With("edge", cfg.EdgeID), ring: session.NewRing()}
	defer func() {
		if err != nil {
			s.closeAll(ctx, true)
		}
	}()

	if cfg.CertFile != "" || cfg.KeyFile != "" {
		s.certs, err = staticCert(s.log, cfg.CertFile, cfg.KeyFile)
	} else {
		s.certs, err = selfSigned(s.log, selfSignedValidity, selfSignedRenew)
	}
	if err != nil {
		return nil, err
	}

	// The W3C trace context goes with every call, so the control plane's
	// spans join the edge's traces.
	otel, err := otelconnect.NewInterceptor(otelconnect.WithTracerProvider(cfg.TracerProvider),
		otelconnect.WithPropagator(telemetry.Propagator()), otelconnect.WithoutMetrics())
	if err != nil {
		return nil, err
	}
	cc := cfg.Control
	cc.Options = append(cc.Options, connect.WithInterceptors(otel))
	if cc.Logger == nil {
		cc.Logger = s.log
	}
	// Edges listing the same control nodes spread over them: each starts
	// at the one its id hashes to (and fails over from there).
	if cc.Start == 0 {
		h := fnv.New32a()
		_, _ = h.Write([]byte(cfg.EdgeID))
		cc.Start = int(h.Sum32() & math.MaxInt32)
	}
	if s.control, err = controlconn.New(cc); err != nil {
		return nil, err
	}

	metrics := session.NewMetrics(cfg.Registry)
	if err := registerAll(cfg.Registry,
		boolGauge("relay_edge_ready", "1 when /readyz answers 200: listeners up, watch feed synced, registered as a member, and not stepping aside for peer edges that hear the control plane (cut off with no such peer it stays ready, relaying for its sessions: see relay_edge_control_cut_off).", s.Ready),
		boolGauge("relay_edge_member", "1 while the edge holds its membership lease (registered, renewed before it ran out on the edge's clock): other edges route to it.", s.member),
		boolGauge("relay_edge_control_cut_off", "1 while the control plane has been silent for longer than --control-grace (new sessions refused).", s.controlSilent),
	); err != nil {
		return nil, err
	}
	if err := cfg.Registry.Register(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "relay_edge_session_limit", Help: "The most sessions this edge takes (handshakes included); 0 when unbounded.",
	}, func() float64 { return float64(cfg.Session.MaxSessions) })); err != nil {
		return nil, err
	}
	s.dir = directory.New(directory.Config{
		Ring: s.ring, Logger: s.log, OnRemove: s.onRemove,
		OnMailbox: func(user, device string, seq uint64) { s.hub.MailboxChanged(user, device, seq) },
		OnEdges:   s.onEdges,
		// After a restore every session starts again: their mailbox
		// cursors and start revisions belong to the old history.
		OnRewind: func(uint64, uint64) {
			s.hub.Restart(s.cfg.DrainWindow, "the control plane was restored; reconnect")
		},
	})
	sc := cfg.Session
	sc.EdgeID, sc.Directory, sc.Ring, sc.Logger, sc.Metrics = cfg.EdgeID, s.dir, s.ring, s.log, metrics
	sc.Tracer = tracer
	sc.Ready = func() bool { return s.dir.Synced() && !s.controlSilent() }
	if !cfg.NoMailbox {
		if s.mailbox, err = mailbox.New(mailbox.Config{API: s.control, Logger: s.log, Registerer: cfg.Registry, Tracer: tracer, History: s.dir.History}); err != nil {
			return nil, err
		}
		sc.Mailbox = s.mailbox
	}
	_, meshKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	s.identity = mesh.NewIdentity(meshKey)
	if err := registerAll(cfg.Registry, certCollector{s}, s.dir.Collector()); err != nil {
		return nil, err
	}
	meshAddr := cfg.MeshAddr
	if meshAddr == "" {
		h, _, err := net.SplitHostPort(cfg.Addr)
		if err != nil {
			return nil, fmt.Errorf("edge address %q: %w", cfg.Addr, err)
		}
		meshAddr = net.JoinHostPort(h, "0")
	}
	hubReady := make(chan struct{})
	s.mesh, err = mesh.New(mesh.Config{
		EdgeID: cfg.EdgeID, Addr: meshAddr, Identity: s.identity, Local: lateLocal{s, hubReady},
		Logger: s.log, Registerer: cfg.Registry, IdleTimeout: cfg.MeshIdleTimeout, PresenceGrace: cfg.MeshPresenceGrace,
	})
	if err != nil {
		return nil, err
	}
	sc.Remote = s.mesh
	if cfg.MeshAdvertise != "" {
		// A host alone gets the port the mesh bound.
		if s.cfg.MeshAdvertise, err = advertised(cfg.MeshAdvertise, s.mesh.Addr().String()); err != nil {
			return nil, err
		}
	}
	if s.hub, err = session.NewHub(sc); err != nil {
		return nil, err
	}
	close(hubReady)

	if cfg.AdminAddr != "" {
		// Bound before the device listeners: the admin port serves the
		// console page, and that page's origin is one of the edge's own.
		if s.adminLn, err = net.Listen("tcp", cfg.AdminAddr); err != nil {
			return nil, fmt.Errorf("listen admin %s: %w", cfg.AdminAddr, err)
		}
	}
	origins := s.originPolicy()
	tlsConf := &tls.Config{GetCertificate: s.certs.GetCertificate, MinVersion: tls.VersionTLS13}
	if cfg.ClusterTLSTickets {
		session.ShareTLSTickets(tlsConf, s.ring, "quic", time.Now)
	}
	host, port, err := net.SplitHostPort(cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("edge address %q: %w", cfg.Addr, err)
	}
	// UDP and TCP on the same port number. With port 0 the UDP port is
	// picked first; if its number is taken for TCP, pick again.
	var ln net.Listener
	for attempt := 0; ; attempt++ {
		s.listener, err = transport.Listen(transport.Config{
			Addr: cfg.Addr, TLS: tlsConf, Hub: s.hub, Origins: origins,
			Logger: s.log, Registerer: cfg.Registry, IdleTimeout: cfg.IdleTimeout,
			MaxUnvalidatedHandshakes: cfg.MaxUnvalidatedHandshakes, MaxPendingQUIC: cfg.MaxPendingQUIC,
		})
		if err != nil {
			return nil, err
		}
		tcpAddr := net.JoinHostPort(host, fmt.Sprint(s.listener.Addr().(*net.UDPAddr).Port))
		if ln, err = net.Listen("tcp", tcpAddr); err == nil {
			break
		}
		_ = s.listener.Close()
		s.listener = nil
		if port != "0" || attempt >= 20 {
			return nil, fmt.Errorf("listen tcp %s: %w", tcpAddr, err)
		}
	}
	if cfg.PublicAddr != "" {
		// A host alone gets the port the device listener bound.
		if s.cfg.PublicAddr, err = advertised(cfg.PublicAddr, s.Addr()); err != nil {
			return nil, err
		}
	}
	httpsConf := &tls.Config{GetCertificate: s.certs.GetCertificate, MinVersion: tls.VersionTLS12, NextProtos: []string{"h2", "http/1.1"}}
	httpsHandshakes := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "relay_edge_https_handshakes_total", Help: "TLS handshakes on the HTTPS port (WebSocket sessions, the console page, certificate hashes), by kind: full, or resumed on a session ticket.",
	}, []string{"tls"})
	if err := cfg.Registry.Register(httpsHandshakes); err != nil {
		return nil, err
	}
	// Called at the end of every handshake, resumed ones included.
	httpsConf.VerifyConnection = func(cs tls.ConnectionState) error {
		httpsHandshakes.WithLabelValues(transport.TLSHandshake(cs)).Inc()
		return nil
	}
	if cfg.ClusterTLSTickets {
		session.ShareTLSTickets(httpsConf, s.ring, "https", time.Now)
	}
	maxPending := cfg.MaxPendingHTTPS
	if maxPending <= 0 {
		maxPending = MaxPendingHTTPSFor(cfg.Session.MaxSessions)
	}
	if n := cfg.Session.MaxSessions; n > 0 && maxPending >= n {
		s.log.Warn("the HTTPS port's pending connections are bounded at or above the session cap: WebSockets that never finish their handshakes could hold every session's place (lower --max-pending-https)",
			"max_pending_https", maxPending, "max_sessions", n)
	}
	pending, err := pendingHTTPS(ln, maxPending, cfg.Registry)
	if err != nil {
		return nil, err
	}
	s.httpsLn = tls.NewListener(pending, httpsConf)
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	s.cancel = cancel
	s.ws = &transport.WebSocketHandler{Hub: s.hub, Origins: origins, IdleTimeout: cfg.IdleTimeout, Ctx: runCtx}
	httpIdle := cfg.HTTPIdleTimeout
	if httpIdle <= 0 {
		httpIdle = 60 * time.Second
	}
	httpWrite := cfg.HTTPWriteTimeout
	if httpWrite <= 0 {
		httpWrite = 60 * time.Second
	}
	// Request headers: what a WebSocket upgrade or a console call needs
	// is a few KiB; net/http's default allows 1 MiB a request. An HTTP/2
	// connection carries at most MaxHTTP2Streams requests at once
	// (net/http's default is 250): each holds a handler until its answer
	// is out, up to HTTPWriteTimeout, and a connection counts once
	// against MaxPendingHTTPS. A browser's console and relay.js need few.
	// A request's connection goes after those that never carried one
	// (connbound.Promoting). What a connection's requests may have sent
	// and their handlers not read is MaxHTTPSReceiveBuffer, not
	// net/http's 1 MiB a stream and a connection.
	s.https = &http.Server{Handler: connbound.Promoting(s.publicMux()), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: httpIdle,
		ConnContext: connbound.ContextWithConn,
		HTTP2: &http.HTTP2Config{MaxConcurrentStreams: MaxHTTP2Streams,
			MaxReceiveBufferPerConnection: MaxHTTPSReceiveBuffer, MaxReceiveBufferPerStream: MaxHTTPSReceiveBuffer},
		WriteTimeout: httpWrite, MaxHeaderBytes: MaxHeaderBytes, ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelDebug)}
	if cfg.AdminAddr != "" {
		s.admin = &http.Server{Handler: s.adminMux(), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: httpIdle, MaxHeaderBytes: MaxHeaderBytes}
	}

	s.wg.Go(func() {
		if err := s.listener.Serve(); err != nil {
			s.portFailed("quic", err)
		}
	})
	s.wg.Go(func() {
		if err := s.https.Serve(s.httpsLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.portFailed("https", err)
		}
	})
	if s.admin != nil {
		s.wg.Go(func() { serveHTTP(s.log, s.admin, s.adminLn) })
	}
	s.wg.Go(func() { s.certs.run(runCtx) })
	s.wg.Go(func() { _ = s.dir.Follow(runCtx, s.control.Watch(), s.control.Token) })
	s.wg.Go(func() { s.reportActivity(runCtx) })
	if cfg.ControlGrace > 0 {
		s.wg.Go(func() { s.watchControlGrace(runCtx) })
	}
	s.wg.Go(s.mesh.Run)
	// The mailbox writer and the registration outlive the sessions on
	// shutdown: the drain hands events to mailboxes, then the edge leaves
	// the member list.
	bgCtx, stopBg := context.WithCancel(context.WithoutCancel(ctx))
	s.stopBgWork = stopBg
	if s.mailbox != nil {
		s.bg.Go(func() { s.mailbox.Run(bgCtx) })
	}
	regQuit, regDone := make(chan struct{}), make(chan struct{})
	s.stopRegister = sync.OnceFunc(func() { close(regQuit) })
	s.registerDone = regDone
	s.bg.Go(func() {
		defer close(regDone)
		s.register(bgCtx, regQuit)
	})
	s.ready.Store(true)
	s.log.Info("edge listening", "quic", s.listener.Addr().String(), "https", s.httpsLn.Addr().String(), "admin", s.AdminURL(), "version", buildinfo.Get().String())
	return s, nil
}

// originPolicy is which pages may open sessions: the edge's own console
// (on its HTTPS port, whose number is the UDP port's, and on the admin
// port), reached by the session's host, the public address's host, or
// "localhost" for an edge on the loopback; plus AllowedOrigins.
func (s *Server) originPolicy() transport.OriginPolicy {
	p := transport.OriginPolicy{Allowed: s.cfg.AllowedOrigins, Pages: []transport.Page{{Scheme: "https"}}}
	if s.adminLn != nil {
		_, port, _ := net.SplitHostPort(s.adminLn.Addr().String())
		p.Pages = append(p.Pages, transport.Page{Scheme: "http", Port: port})
	}
	if s.cfg.PublicAddr != "" {
		if h, _, err := splitAdvertised(s.cfg.PublicAddr); err == nil {
			p.Hosts = append(p.Hosts, h)
		}
	}
	if h, _, err := net.SplitHostPort(s.cfg.Addr); err == nil {
		if ip, err := netip.ParseAddr(h); err == nil && ip.IsLoopback() {
			p.Hosts = append(p.Hosts, "localhost", "127.0.0.1", "::1")
		} else if h == "localhost" {
			p.Hosts = append(p.Hosts, "localhost", "127.0.0.1", "::1")
		}
	}
	return p
}

// portFailed records that a device port stopped accepting (a fatal
// socket error): unless the edge is stopping, it is neither ready nor
// healthy from then on, and says why, so that a load balancer or
// Kubernetes takes it out and its devices move on, and a liveness probe
// restarts it. It does not come back by itself.
func (s *Server) portFailed(port string, err error) {
	if s.stopping.Load() {
		return
	}
	msg := port + " port: " + err.Error()
	s.portDown.Store(&msg)
	s.log.Error("a device port stopped accepting connections; the edge is not ready until it is restarted", "port", port, "err", err)
}

// KillDevicePort closes the QUIC device port's socket, as a fatal socket
// error would, and leaves the rest running. For fault tests.
func (s *Server) KillDevicePort() { s.listener.Kill() }

func serveHTTP(log *slog.Logger, srv *http.Server, ln net.Listener) {
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Error("http server", "addr", ln.Addr().String(), "err", err)
	}
}

// onRemove closes the sessions the control plane just took away.
func (s *Server) onRemove(r directory.Removal) {
	if r.DeviceID != "" {
		s.hub.CloseDevice(r.UserID, r.DeviceID, relayv1.ErrorCode_ERROR_CODE_REVOKED, r.Reason)
		return
	}
	s.hub.CloseUser(r.UserID, relayv1.ErrorCode_ERROR_CODE_REVOKED, r.Reason)
}

// reportActivity tells the control plane when devices were last active
// (session start or last event), in batches: the devices online now and
// those whose sessions ended since the last report.
func (s *Server) reportActivity(ctx context.Context) {
	t := time.NewTicker(s.cfg.ActivityEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.sendActivity(ctx, s.hub.TakeActivity())
		}
	}
}

// maxUnreported bounds the devices whose activity a failed report keeps
// for the next one.
const maxUnreported = 1 << 16

func (s *Server) sendActivity(ctx context.Context, acts []session.Activity) {
	s.activityMu.Lock()
	defer s.activityMu.Unlock()
	// One entry per device: its latest activity, with what a failed
	// report left (the devices whose sessions ended then are in no later
	// TakeActivity; those online are again).
	latest := s.unreported
	if latest == nil {
		latest = make(map[string]session.Activity, len(acts))
	}
	s.unreported = nil
	for _, a := range acts {
		if cur, ok := latest[a.DeviceID]; !ok || a.At.After(cur.At) {
			latest[a.DeviceID] = a
		}
	}
	if len(latest) == 0 {
		return
	}
	entries := make([]*edgev1.Activity, 0, len(latest))
	for _, a := range latest {
		entries = append(entries, &edgev1.Activity{UserId: a.UserID, DeviceId: a.DeviceID, SeenAtMs: a.At.UnixMilli()})
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := s.control.ReportActivity(rctx, entries); err != nil {
		if len(latest) <= maxUnreported {
			s.unreported = latest
		}
		if ctx.Err() == nil {
			s.log.Warn("activity report failed; its devices go with the next one", "devices", len(entries), "err", err)
		}
	}
}

// StepAsideAfter is how long an edge cut off from the control plane
// waits, once a peer edge says it hears the control plane, before it
// stops being ready. In an outage of the whole control plane the edges'
// graces end up to one feed heartbeat (5 s) apart, and until the last
// one's ends some peer still says it hears: twice the heartbeat keeps
// every edge ready through that.
const StepAsideAfter = 10 * time.Second

// StepBackAfter is how long an edge that stepped aside, still cut off,
// waits once no peer says it hears the control plane before it is ready
// again (the control plane went down for every edge): a mesh link that
// reconnects meanwhile does not make it flap.
const StepBackAfter = 5 * time.Second

// Ready reports whether the edge should get new devices from its load
// balancer: listeners up (and no shutdown begun), the directory synced
// with the control plane's watch feed, registered as a member, and not
// stepping aside.
//
// An edge cut off from the control plane for longer than ControlGrace
// refuses new sessions (see CutOff). It steps aside, not ready, when a
// peer edge reachable through the mesh still hears the control plane
// (for StepAsideAfter): the outage is its own, and devices do better on
// that peer. When no peer does (the whole control plane is down, or this
// edge reaches no peer) it stays ready, or is ready again after
// StepBackAfter: a load balancer would otherwise
// drop every edge at once, and with them (Kubernetes flushes a removed
// endpoint's UDP flows) the sessions they hold, which go on relaying. A
// lease that ran out after registering does not count either (see
// relay_edge_member): in such an outage every lease runs out.
func (s *Server) Ready() bool {
	why, _ := s.notReady()
	return why == ""
}

// notReady says why the edge does not serve sessions ("" when it does):
// reason, one of a few fixed words, and detail, which may name the
// control plane's URLs (a registration error) or peer edges.
func (s *Server) notReady() (reason, detail string) {
	st := readiness{listening: s.ready.Load(), stopping: s.stopping.Load(), synced: s.dir.Synced(), registered: s.leaseUntil.Load() != 0}
	if down := s.portDown.Load(); down != nil {
		st.portDown = *down
	}
	if e := s.regErr.Load(); e != nil {
		st.regErr = *e
	}
	if peers := s.stepAside.Load(); peers != nil {
		st.stepAsideFor = *peers
	}
	return st.why()
}

// CutOff reports whether the edge has not heard from the control plane
// for longer than ControlGrace, and so admits no sessions.
func (s *Server) CutOff() bool { return s.controlSilent() }

func (s *Server) controlSilent() bool {
	if s.cfg.ControlGrace <= 0 {
		return false
	}
	heard := s.dir.LastHeard()
	return !heard.IsZero() && time.Since(heard) > s.cfg.ControlGrace
}

// watchControlGrace logs when the edge stops and starts admitting
// sessions because of the control plane's silence, tells the peers
// whether it hears the control plane, and decides whether to step aside
// (see Ready).
func (s *Server) watchControlGrace(ctx context.Context) {
	// A quarter of the grace, at most 250 ms; above 0 (NewTicker panics
	// on 0), which a grace under 4ns would give.
	tick := time.NewTicker(max(min(s.cfg.ControlGrace/4, 250*time.Millisecond), time.Millisecond))
	defer tick.Stop()
	// Since when, with this edge cut off, some peer has heard the control
	// plane (elsewhereSince), or none has (noneSince).
	var elsewhereSince, noneSince time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		cut := s.controlSilent()
		// A draining edge (not ready) gives its peers no reason to step
		// aside for it.
		s.mesh.SetControlHeard(!cut && !s.dir.LastHeard().IsZero() && s.ready.Load())
		var peers []string
		if cut {
			peers = s.mesh.PeersHearingControl()
		}
		now := time.Now()
		switch {
		case !cut:
			elsewhereSince, noneSince = time.Time{}, time.Time{}
			if s.stepAside.Swap(nil) != nil {
				s.log.Info("control plane heard again; no longer stepping aside")
			}
		case len(peers) > 0:
			noneSince = time.Time{}
			if elsewhereSince.IsZero() {
				elsewhereSince = now
			}
			if s.stepAside.Load() != nil || now.Sub(elsewhereSince) >= StepAsideAfter {
				if s.stepAside.Swap(&peers) == nil {
					s.log.Warn("cut off from the control plane while peer edges hear it; not ready, so the load balancer sends devices to them",
						"peers", peers)
				}
			}
		default: // cut off, and no peer says it hears the control plane
			elsewhereSince = time.Time{}
			if noneSince.IsZero() {
				noneSince = now
			}
			// A link that reconnects, or a peer's status that flips for
			// a moment, does not bring the edge back.
			if now.Sub(noneSince) >= StepBackAfter && s.stepAside.Swap(nil) != nil {
				s.log.Info("no peer edge hears the control plane any more; ready, relaying for the sessions held and refusing new ones")
			}
		}
		if s.cutOff.Swap(cut) != cut {
			silent := time.Since(s.dir.LastHeard())
			if cut {
				s.log.Warn("control plane silent for longer than the grace; refusing new sessions, relaying for those in place",
					"silent", silent.Round(time.Millisecond), "grace", s.cfg.ControlGrace)
			} else {
				s.log.Info("control plane heard again; admitting sessions", "revision", s.dir.Revision())
			}
		}
	}
}

// Addr is the UDP address devices connect to.
func (s *Server) Addr() string { return s.listener.Addr().String() }

// HTTPSURL is the base URL of the HTTPS port.
func (s *Server) HTTPSURL() string { return "https://" + s.httpsLn.Addr().String() }

// AdminURL is the base URL of the admin port ("" when disabled).
func (s *Server) AdminURL() string {
	if s.adminLn == nil {
		return ""
	}
	return "http://" + s.adminLn.Addr().String()
}

// CertHashes are the SHA-256 hashes of the certificates clients may pin.
func (s *Server) CertHashes() []CertHash { return s.certs.Hashes(time.Now()) }

// Hub is the session core (for tests and tools).
func (s *Server) Hub() *session.Hub { return s.hub }

// Mesh is the edge's links to the other edges.
func (s *Server) Mesh() *mesh.Mesh { return s.mesh }

// Registry holds the edge's metrics.
func (s *Server) Registry() *prometheus.Registry { return s.cfg.Registry }

// Directory is the edge's copy of the control plane's state.
func (s *Server) Directory() *directory.Directory { return s.dir }

// EdgeInfoPath serves EdgeInfo as JSON: what a page needs to reach the
// edge's UDP side.
const EdgeInfoPath = "/.well-known/relay/edge"

// EdgeInfo describes the edge to pages.
type EdgeInfo struct {
	ID   string `json:"id"`
	Addr string `json:"addr"` // UDP host:port for WebTransport
}

// publicAddr is the UDP address a page that reached the edge as
// requestHost should use for WebTransport.
func (s *Server) publicAddr(requestHost string) string {
	if s.cfg.PublicAddr != "" {
		return s.cfg.PublicAddr
	}
	bound := s.Addr()
	host, port, err := net.SplitHostPort(bound)
	if err != nil {
		return bound
	}
	if ip, err := netip.ParseAddr(host); err == nil && !ip.IsUnspecified() {
		return bound
	}
	if h, _, err := net.SplitHostPort(requestHost); err == nil {
		requestHost = h
	}
	if requestHost == "" {
		return bound
	}
	return net.JoinHostPort(strings.Trim(requestHost, "[]"), port)
}

// CertHashesPath serves the certificate hashes as JSON.
const CertHashesPath = devconn.CertHashesPath

// CertHashesDoc is the JSON document served at CertHashesPath.
type CertHashesDoc struct {
	Hashes []CertHashJSON `json:"hashes"`
}

// CertHashJSON is one hash: base64 of the SHA-256 of the certificate's
// DER, as WebTransport's serverCertificateHashes wants it.
type CertHashJSON struct {
	Algorithm string    `json:"algorithm"`
	Value     string    `json:"value"`
	NotAfter  time.Time `json:"notAfter"`
}

func (s *Server) publicMux() http.Handler {
	mux := http.NewServeMux()
	// The console page and relay.js; web.Handler answers 404 for any
	// other path the more specific routes below do not take.
	mux.Handle("GET /", web.Handler())
	mux.Handle("POST /api/", s.control.Proxy("/api"))
	mux.HandleFunc("GET "+EdgeInfoPath, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		_ = json.NewEncoder(w).Encode(EdgeInfo{ID: s.cfg.EdgeID, Addr: s.publicAddr(r.Host)})
	})
	mux.HandleFunc("GET "+devconn.WebSocketPath, func(w http.ResponseWriter, r *http.Request) {
		// A hijacked connection is no longer the HTTP server's: the edge
		// tracks the session itself so shutdown waits for it.
		s.wsSessions.Add(1)
		defer s.wsSessions.Done()
		s.ws.ServeHTTP(w, r)
	})
	mux.HandleFunc("GET /healthz", s.healthz(false))
	mux.HandleFunc("GET /readyz", s.readyz(false))
	mux.HandleFunc("GET "+CertHashesPath, func(w http.ResponseWriter, _ *http.Request) {
		var doc CertHashesDoc
		for _, h := range s.CertHashes() {
			doc.Hashes = append(doc.Hashes, CertHashJSON{Algorithm: "sha-256", Value: base64.StdEncoding.EncodeToString(h.SHA256[:]), NotAfter: h.NotAfter})
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		// Pages on other origins (the console, a developer's app) read it.
		w.Header().Set("Access-Control-Allow-Origin", "*")
		_ = json.NewEncoder(w).Encode(doc)
	})
	return mux
}

// MaxHeaderBytes bounds the request headers the edge's HTTPS and admin
// ports read, and its device port's over HTTP/3 (the control plane's API
// has the same bound).
const MaxHeaderBytes = transport.MaxHeaderBytes

// MaxHTTP2Streams is how many requests one HTTP/2 connection to the HTTPS
// port may have under way at once.
const MaxHTTP2Streams = 16

// MaxHTTPSReceiveBuffer is the flow-control window the HTTPS port grants
// an HTTP/2 connection, and each of its streams: what request bodies a
// connection can make the edge hold before a handler reads them.
// net/http's default, 1 MiB of each, let a client that gives the edge no
// window of its own (so an answer's last flush blocks until
// HTTPWriteTimeout) park 1 MiB a connection, at MaxPendingHTTPS
// connections some 4 GiB. No request to this port has a body above
// 64 KiB (a proxied API call's is cut there), so none arrives slower
// for it: one window holds the largest whole.
const MaxHTTPSReceiveBuffer = 64 << 10

// adminMux is the public endpoints plus the metrics and the Go profiler,
// which only the admin port (meant for localhost or a private network)
// serves: the metrics tell how many devices an edge holds and what they
// do, which is no business of the internet's.
func (s *Server) adminMux() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/", s.publicMux())
	mux.HandleFunc("GET /healthz", s.healthz(true))
	mux.HandleFunc("GET /readyz", s.readyz(true))
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.cfg.Registry, promhttp.HandlerOpts{}))
	profiler.Register(mux)
	return mux
}

// ShutdownReserve is the part of Shutdown's context the drain leaves for
// what comes after it: leaving the member list (so peers stop routing
// here at once, not when the lease runs out), closing, and logging out
// of the control plane. Each step is bounded on its own too; those that
// hang (a control plane that does not answer) leave the later ones less,
// down to none once ctx is done.
const ShutdownReserve = 10 * time.Second

// Shutdown stops the edge in order: no new sessions; every client told
// to go away (spread over DrainWindow) and its queued frames flushed;
// what devices did not acknowledge handed to their mailboxes (or back to
// the edges that forwarded it); the edge leaves the member list; then
// listeners and the mesh close, and last the edge logs out of the
// control plane (its session there ends) and its link to it closes. With a
// deadline on ctx, the whole of it ends by then: the drain is cut short
// to leave ShutdownReserve for the rest.
func (s *Server) Shutdown(ctx context.Context) error {
	var err error
	s.once.Do(func() {
		s.stopping.Store(true)
		s.ready.Store(false)
		s.mesh.SetControlHeard(false)
		// The clients' goodbyes spread over the window, then 5 s for the
		// last sessions to end and their hand-offs to be stored.
		const settle = 5 * time.Second
		window := s.cfg.DrainWindow
		if dl, ok := ctx.Deadline(); ok {
			window = max(0, min(window, time.Until(dl)-ShutdownReserve-settle))
		}
		dctx, cancel := context.WithTimeout(ctx, window+settle)
		err = s.hub.Drain(dctx, window)
		if s.mailbox != nil {
			err = errors.Join(err, s.mailbox.Flush(dctx))
		}
		cancel()
		// What the drained sessions did since the last report, with its
		// own time: the drain may have used dctx up.
		actx, acancel := context.WithTimeout(ctx, 2*time.Second)
		s.sendActivity(actx, s.hub.TakeActivity())
		acancel()
		dctx, cancel = context.WithTimeout(ctx, 5*time.Second)
		// No renewal after the deregistration: one started then, or one
		// under way whose write lands after it, would put the edge back on
		// the member list for a lease, and peers would dial a closed mesh
		// port meanwhile. One under way goes to its end first (cancelled,
		// its write could still land later).
		s.stopRegister()
		select {
		case <-s.registerDone:
		case <-dctx.Done():
		}
		if derr := s.control.DeregisterEdge(dctx, s.cfg.EdgeID, s.identity.PublicKey()); derr != nil && s.leaseUntil.Load() != 0 {
			s.log.Warn("could not leave the member list; the lease will run out", "err", derr)
		}
		cancel()
		s.closeAll(ctx, true)
	})
	return err
}

// Kill stops the edge as a crash would: its sockets go at once, so
// devices and peers learn of it only when their connections time out;
// nothing queued is handed off and the edge stays a member until its
// lease runs out. For fault tests.
func (s *Server) Kill() {
	s.once.Do(func() {
		s.stopping.Store(true)
		s.ready.Store(false)
		s.listener.Kill()
		s.mesh.Kill()
		if s.stopBgWork != nil {
			s.stopBgWork() // no more mailbox writes, no renewals
		}
		ctx, cancel := context.WithCancel(context.Background())
		cancel() // nothing waits for a graceful close
		s.closeAll(ctx, false)
	})
}

// logoutTimeout bounds the edge's logout from the control plane when it
// stops, as DeregisterEdge's is.
const logoutTimeout = 5 * time.Second

// closeAll closes what is left; the HTTP servers get what remains of ctx,
// five seconds at most, to finish their requests, then are cut. With
// logout, the edge's session on the control plane is ended last (within
// what remains of ctx, logoutTimeout at most), once nothing of the edge
// uses it any more.
func (s *Server) closeAll(ctx context.Context, logout bool) {
	if s.cancel != nil {
		s.cancel()
	}
	if s.mesh != nil {
		_ = s.mesh.Close()
	}
	if s.stopBgWork != nil {
		s.stopBgWork()
	}
	s.bg.Wait()
	if s.listener != nil {
		_ = s.listener.Close()
	}
	for _, srv := range []*http.Server{s.https, s.admin} {
		if srv != nil {
			sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			if srv.Shutdown(sctx) != nil {
				_ = srv.Close()
			}
			cancel()
		}
	}
	for _, ln := range []net.Listener{s.httpsLn, s.adminLn} {
		if ln != nil {
			_ = ln.Close()
		}
	}
	s.wg.Wait()
	s.wsSessions.Wait()
	if s.control != nil {
		if logout {
			lctx, cancel := context.WithTimeout(ctx, logoutTimeout)
			if err := s.control.Logout(lctx); err != nil {
				s.log.Warn("could not end the edge's session on the control plane; it ends when its refresh token expires", "err", err)
			}
			cancel()
		}
		s.control.Close()
	}
}

// boolGauge is a gauge that reads 1 while cond holds, 0 otherwise.
func boolGauge(name, help string, cond func() bool) prometheus.Collector {
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, func() float64 {
		if cond() {
			return 1
		}
		return 0
	})
}
