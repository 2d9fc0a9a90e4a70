// Package server assembles a control-plane node for `relayd control`: the
// Raft node, the Connect API on its own listener, and the admin HTTP
// endpoints (/metrics, /healthz, /readyz). It owns start-up (bootstrap,
// join, restore) and the ordered shutdown.
package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"connectrpc.com/connect"
	"connectrpc.com/otelconnect"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
	"google.golang.org/protobuf/reflect/protoregistry"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/backup"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/openapi"
	"github.com/edge-relay/relay/control/raftnode"
	"github.com/edge-relay/relay/internal/buildinfo"
	"github.com/edge-relay/relay/internal/certpool"
	"github.com/edge-relay/relay/internal/connbound"
	"github.com/edge-relay/relay/internal/profiler"
	"github.com/edge-relay/relay/internal/telemetry"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
)

// Config configures a control node.
type Config struct {
	// NodeID is this member's stable id. Required.
	NodeID string
	// DataDir holds all of the node's state. Required.
	DataDir string
	// RaftAddr is the address Raft listens on (host:port).
	RaftAddr string
	// RaftAdvertise is the Raft address other members dial; default RaftAddr.
	RaftAdvertise string
	// APIAddr is the address the Connect API listens on.
	APIAddr string
	// APIAdvertise is the API address other members and clients use;
	// default APIAddr with the port actually bound.
	APIAdvertise string
	// AdminAddr serves /metrics, /healthz, /readyz and the Go profiler
	// (/debug/pprof/); empty disables it. Keep it private.
	AdminAddr string
	// Bootstrap starts a new cluster when the data dir is empty. With
	// Join set too, it does so only if no member listed there belongs to
	// a cluster (asked for up to BootstrapWait); if one does, the node
	// joins it instead: a node that lost its data dir (a new volume under
	// the same name) does not found a second cluster beside the first.
	Bootstrap bool
	// BootstrapWait bounds how long a Bootstrap with Join waits for the
	// members that do not answer before it founds the cluster. Default
	// 30s.
	BootstrapWait time.Duration
	// Join lists API addresses of existing members to join through (when
	// the data dir is empty).
	Join []string
	// RestoreFrom seeds a new single-node cluster from a backup file:
	// one encrypted to BackupKey, or, without BackupKey, a plaintext one.
	RestoreFrom string
	// RestoreAllowPlaintext lets RestoreFrom be a plaintext backup although
	// BackupKey is set. Without it such a file is refused
	// (backup.ErrPlaintext): nothing authenticates a plaintext backup, and
	// where backups are encrypted one that is not may have been put in
	// place of the real one by whoever can write the backup storage.
	RestoreAllowPlaintext bool
	// BackupDir, if set, turns on scheduled backups: while this node
	// leads it writes a verified backup there every BackupEvery (default
	// 1h) and keeps the newest BackupKeep (default 7).
	BackupDir   string
	BackupEvery time.Duration
	BackupKeep  int
	// BackupKey encrypts scheduled backups and decrypts RestoreFrom; nil
	// writes plaintext backups (which hold password hashes and keys).
	BackupKey *backup.Key
	// CertFile, KeyFile and CAFile enable TLS: mutual TLS for Raft and for
	// node-to-node API calls, TLS for the API. All three or none.
	CertFile, KeyFile, CAFile string
	// SlowThreshold: Raft applies and reads slower than this are logged.
	// Default 100ms.
	SlowThreshold time.Duration
	// SlowRPCThreshold: API calls slower than this are logged. Default 300ms.
	SlowRPCThreshold time.Duration
	// Logger; default slog.Default().
	Logger *slog.Logger
	// Raft tunes Raft; FSM tunes the state machine.
	Raft raftnode.Tuning
	FSM  fsm.Config
	// Features the node records as its own (raftnode.Config.Features);
	// nil: this release's. Tests set another list to stand for a node of
	// an older release.
	Features []string
	// Auth configures tokens, password hashing and login throttling.
	Auth api.AuthConfig
	// Limits bound request sizes, body arrival time and the calls without
	// credentials in flight (api.Limits has the defaults).
	Limits api.Limits
	// MaxPendingAPIConns bounds the API port's connections that have not
	// yet carried a call that passed authentication (a TLS handshake, a
	// login, an idle or silent connection); at the bound the oldest is
	// closed, those that never carried a request first, and one source
	// holds at most a sixteenth of it. Default DefaultMaxPendingAPIConns.
	MaxPendingAPIConns int
	// MaxAPIConnsPerAccount bounds one account's connections that did
	// carry such a call (edges' aside); beyond it, the account's oldest
	// is closed. Default DefaultMaxAPIConnsPerAccount.
	MaxAPIConnsPerAccount int
	// MaxAPIConns bounds those connections of all accounts; beyond it,
	// the oldest is closed. Default DefaultMaxAPIConns.
	MaxAPIConns int
	// MaxTrustedAPIConns bounds edges' and other nodes' connections;
	// beyond it, the oldest is closed. Default DefaultMaxTrustedAPIConns.
	MaxTrustedAPIConns int
	// AdminPassword is the first admin's password when this node
	// initializes a new cluster; empty generates one and logs it once.
	AdminPassword string
	// AdminPasswordSource says where AdminPassword came from, for the
	// log line of the first start. Default "given in
	// RELAY_ADMIN_PASSWORD".
	AdminPasswordSource string
	// JoinToken is an admin access token presented when joining without
	// TLS client certificates.
	JoinToken string
	// SessionKeyRotateEvery rotates the resume-ticket key on this
	// schedule (leader only). Default 24h.
	SessionKeyRotateEvery time.Duration
	// SessionKeyGrace keeps a rotated-out session key valid this long.
	// Default 24h.
	SessionKeyGrace time.Duration
	// SigningKeyRotateEvery rotates the access-token signing key on this
	// schedule. Default 30 days.
	SigningKeyRotateEvery time.Duration
	// Watch tunes the edges' watch feed.
	Watch api.WatchConfig
	// Edges tunes edge registration: lease TTL (default 30s) and mesh
	// certificate lifetime (default 24h).
	Edges api.EdgeConfig
	// Mailbox tunes mailboxes: per-device quotas (default 1000 entries and
	// 4 MiB) and the fetches the node serves at once (default 64, 16 per
	// edge).
	Mailbox api.MailboxConfig
	// Devices tunes device registration: the most devices per account
	// (default 100).
	Devices api.DeviceConfig
	// MailboxExpireEvery: the leader looks for expired mailbox entries and
	// event claims this often and proposes their removal. Default 10s.
	MailboxExpireEvery time.Duration
	// EdgeExpireEvery: the leader looks for edges whose lease ran out this
	// often and proposes their removal, so a dead edge leaves the member
	// list within its lease plus this. Default 5s.
	EdgeExpireEvery time.Duration
	// TracerProvider traces API calls and Raft applies; nil traces
	// nothing (trace context from callers is still passed on).
	TracerProvider trace.TracerProvider
	// RaftFaults lets fault tests cut this node's Raft traffic, fail its
	// writes or fail its restore; nil in production.
	RaftFaults *raftnode.Faults
}

func (c *Config) applyDefaults() error {
	if c.NodeID == "" {
		return errors.New("node id is required (--node-id)")
	}
	if c.DataDir == "" {
		return errors.New("data dir is required (--data-dir)")
	}
	if c.RaftAddr == "" {
		return errors.New("raft address is required (--raft-addr)")
	}
	if c.APIAddr == "" {
		return errors.New("api address is required (--api-addr)")
	}
	// The advertised addresses default to the binds, and a bind to every
	// interface is no address another node can dial: dialed, [::]:port
	// leads back to the dialer (a leader adding such a node would send
	// itself entries and votes), and a follower would forward writes to
	// itself.
	if c.RaftAdvertise == "" && raftnode.EveryInterface(c.RaftAddr) {
		return fmt.Errorf("--raft-addr %s listens on every interface: set --raft-advertise to the address the other members dial", c.RaftAddr)
	}
	if c.APIAdvertise == "" && raftnode.EveryInterface(c.APIAddr) {
		return fmt.Errorf("--api-addr %s listens on every interface: set --api-advertise to the address the other members and clients use", c.APIAddr)
	}
	if c.BootstrapWait <= 0 {
		c.BootstrapWait = 30 * time.Second
	}
	n := 0
	for _, f := range []string{c.CertFile, c.KeyFile, c.CAFile} {
		if f != "" {
			n++
		}
	}
	if n != 0 && n != 3 {
		return errors.New("TLS needs --tls-cert, --tls-key and --tls-ca together")
	}
	// Every mailbox write carries the quotas, and the state refuses one
	// above its caps: a node would fail every write it took.
	if q := c.Mailbox.MaxEntriesPerDevice; q > fsm.MaxMailboxQuotaEntries {
		return fmt.Errorf("--mailbox-max-entries %d is above the cap %d", q, fsm.MaxMailboxQuotaEntries)
	}
	if q := c.Mailbox.MaxBytesPerDevice; q > fsm.MaxMailboxQuotaBytes {
		return fmt.Errorf("--mailbox-max-bytes %d is above the cap %d", q, fsm.MaxMailboxQuotaBytes)
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.SlowRPCThreshold <= 0 {
		c.SlowRPCThreshold = 300 * time.Millisecond
	}
	if c.SessionKeyRotateEvery <= 0 {
		c.SessionKeyRotateEvery = 24 * time.Hour
	}
	if c.SessionKeyGrace <= 0 {
		c.SessionKeyGrace = 24 * time.Hour
	}
	if c.SigningKeyRotateEvery <= 0 {
		c.SigningKeyRotateEvery = 30 * 24 * time.Hour
	}
	if c.MailboxExpireEvery <= 0 {
		c.MailboxExpireEvery = 10 * time.Second
	}
	if c.EdgeExpireEvery <= 0 {
		c.EdgeExpireEvery = 5 * time.Second
	}
	if c.BackupEvery <= 0 {
		c.BackupEvery = time.Hour
	}
	if c.MaxPendingAPIConns <= 0 {
		c.MaxPendingAPIConns = DefaultMaxPendingAPIConns
	}
	if c.MaxAPIConnsPerAccount <= 0 {
		c.MaxAPIConnsPerAccount = DefaultMaxAPIConnsPerAccount
	}
	if c.MaxTrustedAPIConns <= 0 {
		c.MaxTrustedAPIConns = DefaultMaxTrustedAPIConns
	}
	if c.MaxAPIConns <= 0 {
		c.MaxAPIConns = DefaultMaxAPIConns
	}
	return nil
}

// Server is a running control node.
type Server struct {
	cfg    Config
	log    *slog.Logger
	node   *raftnode.Node
	dialer *api.Dialer
	reg    *prometheus.Registry

	apiLn, adminLn net.Listener
	apiSrv         *http.Server
	adminSrv       *http.Server
	tls            *tls.Config
	authn          *api.Authenticator
	ready          chan struct{}     // closed once everything is wired
	backups        *backup.Scheduler // nil unless BackupDir is set
	bg             context.CancelFunc

	// stopping is set as soon as Shutdown begins: /readyz answers 503
	// from then on, so load balancers stop sending requests while the
	// ones in flight finish.
	stopping atomic.Bool
	// inflight and served count the API's requests being handled and
	// handled (shutdownAPI).
	inflight, served atomic.Int64

	wg       sync.WaitGroup
	stopOnce sync.Once
	stopErr  error
}

// Start brings a node up: listeners bound, Raft running, API served, and
// (with Join) membership requested. It returns without waiting for a
// leader; see Ready.
func Start(ctx context.Context, cfg Config) (_ *Server, err error) {
	if err := cfg.applyDefaults(); err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, log: cfg.Logger.With("node", cfg.NodeID), reg: prometheus.NewRegistry(), ready: make(chan struct{})}
	s.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), buildinfo.Get().Collector())
	dirs := []diskDir{{"data", cfg.DataDir}}
	if cfg.BackupDir != "" {
		dirs = append(dirs, diskDir{"backups", cfg.BackupDir})
	}
	s.reg.MustRegister(newDiskSpace(s.log, dirs...))
	defer func() {
		if err != nil {
			_ = s.Shutdown(context.Background())
		}
	}()

	var serverTLS, clientTLS *tls.Config
	if cfg.CertFile != "" {
		serverTLS, clientTLS, err = loadTLS(cfg.CertFile, cfg.KeyFile, cfg.CAFile)
		if err != nil {
			return nil, err
		}
		if err := registerTLSCertMetrics(s.reg, serverTLS, cfg.CAFile); err != nil {
			return nil, err
		}
	}
	s.tls = serverTLS

	s.apiLn, err = net.Listen("tcp", cfg.APIAddr)
	if err != nil {
		return nil, fmt.Errorf("listen for api on %s: %w", cfg.APIAddr, err)
	}
	apiAdv := cfg.APIAdvertise
	if apiAdv == "" {
		apiAdv = s.apiLn.Addr().String()
	}
	if cfg.AdminAddr != "" {
		s.adminLn, err = net.Listen("tcp", cfg.AdminAddr)
		if err != nil {
			return nil, fmt.Errorf("listen for admin on %s: %w", cfg.AdminAddr, err)
		}
	}
	tp := cfg.TracerProvider
	if tp == nil {
		tp = noop.NewTracerProvider()
	}
	otelOpts := []otelconnect.Option{otelconnect.WithTracerProvider(tp), otelconnect.WithPropagator(telemetry.Propagator()),
		otelconnect.WithTrustRemote(), otelconnect.WithoutMetrics()}
	clientOtel, err := otelconnect.NewInterceptor(otelOpts...)
	if err != nil {
		return nil, fmt.Errorf("tracing interceptor: %w", err)
	}
	serverOtel, err := otelconnect.NewInterceptor(otelOpts...)
	if err != nil {
		return nil, fmt.Errorf("tracing interceptor: %w", err)
	}
	s.dialer = api.NewDialer(clientTLS, connect.WithInterceptors(clientOtel))

	if cfg.Bootstrap && len(cfg.Join) > 0 && cfg.RestoreFrom == "" {
		// Raft state, not a Raft store: a start that waited to join and
		// was stopped left an empty store, and asks again.
		has, err := raftnode.HasRaftState(cfg.DataDir)
		if err != nil {
			return nil, err
		}
		if !has {
			at, err := s.clusterAt(ctx)
			if err != nil {
				return nil, err
			}
			if at != "" {
				s.log.Warn("not founding a new cluster: a member listed in --join belongs to one; joining it instead", "via", at)
				cfg.Bootstrap, s.cfg.Bootstrap = false, false
			}
		}
	}

	var raftServerTLS *tls.Config
	if serverTLS != nil {
		raftServerTLS = serverTLS.Clone()
		raftServerTLS.ClientAuth = tls.RequireAndVerifyClientCert
	}
	s.node, err = raftnode.Open(ctx, raftnode.Config{
		NodeID: cfg.NodeID, DataDir: cfg.DataDir, Features: cfg.Features,
		RaftBind: cfg.RaftAddr, RaftAdvertise: cfg.RaftAdvertise, APIAdvertise: apiAdv,
		Bootstrap: cfg.Bootstrap, RestoreFrom: cfg.RestoreFrom, Joining: len(cfg.Join) > 0,
		OpenBackup: s.openBackup,
		TLSServer:  raftServerTLS, TLSClient: clientTLS,
		Peers: s.dialer, Logger: cfg.Logger, SlowThreshold: cfg.SlowThreshold,
		Metrics: s.reg, FSM: cfg.FSM, Raft: cfg.Raft,
		OnLeader: s.leaderTasks, Tracer: tp.Tracer("github.com/edge-relay/relay/control/raftnode"),
		Faults: cfg.RaftFaults,
	})
	if err != nil {
		return nil, err
	}
	s.authn = api.NewAuthenticator(s.node, cfg.Auth)
	s.dialer.SetTokenSource(s.authn.NodeToken)
	authServer, err := api.NewAuthServer(s.node, s.authn, s.log)
	if err != nil {
		return nil, err
	}

	mux := http.NewServeMux()
	interceptors := connect.WithInterceptors(serverOtel, newLoggingInterceptor(s.log, cfg.SlowRPCThreshold, s.reg), s.authn)
	// opts returns the handler options of a service: the interceptors
	// and its request size limit.
	opts := func(service string) connect.HandlerOption {
		return connect.WithHandlerOptions(interceptors, cfg.Limits.HandlerOptions(service))
	}
	mux.Handle(controlv1connect.NewClusterServiceHandler(api.NewClusterServer(s.node, s.dialer, s.log, cfg.Watch.SendTimeout), opts(controlv1connect.ClusterServiceName)))
	mux.Handle(controlv1connect.NewPeerServiceHandler(api.NewPeerServer(s.node), opts(controlv1connect.PeerServiceName)))
	mux.Handle(controlv1connect.NewAuthServiceHandler(authServer, opts(controlv1connect.AuthServiceName)))
	mux.Handle(controlv1connect.NewUserServiceHandler(api.NewUserServer(s.node, s.authn), opts(controlv1connect.UserServiceName)))
	mux.Handle(controlv1connect.NewDeviceServiceHandler(api.NewDeviceServer(s.node, s.cfg.Devices), opts(controlv1connect.DeviceServiceName)))
	mux.Handle(controlv1connect.NewKeyServiceHandler(api.NewKeyServer(s.node, s.authn, cfg.SessionKeyGrace), opts(controlv1connect.KeyServiceName)))
	watch := api.NewWatchServer(s.node, watchConfig(cfg.Watch, s.log, s.reg))
	mux.Handle(edgev1connect.NewWatchServiceHandler(watch, opts(edgev1connect.WatchServiceName)))
	mux.Handle(edgev1connect.NewActivityServiceHandler(api.NewActivityServer(s.node), opts(edgev1connect.ActivityServiceName)))
	mux.Handle(edgev1connect.NewEdgeServiceHandler(api.NewEdgeServer(s.node, cfg.Edges), opts(edgev1connect.EdgeServiceName)))
	mailboxCfg := cfg.Mailbox
	if mailboxCfg.Metrics == nil {
		mailboxCfg.Metrics = s.reg
	}
	mux.Handle(api.NewMailboxServer(s.node, mailboxCfg).Handler(opts(edgev1connect.MailboxServiceName)))
	mux.Handle("GET /.well-known/jwks.json", api.JWKSHandler(s.authn.Keys()))
	doc, err := openapi.Generate(openapi.Info{Title: "relay control API", Version: "v1"},
		openapi.Services(protoregistry.GlobalFiles, "control.v1", "edge.v1"), api.Policy().Public)
	if err != nil {
		return nil, err
	}
	mux.HandleFunc("GET /openapi.json", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(doc)
	})
	limits := cfg.Limits
	if limits.Metrics == nil {
		limits.Metrics = s.reg
	}
	// No ReadTimeout or WriteTimeout: watch and backup streams live long.
	// Guard gives each request body its own deadline instead.
	s.apiSrv = &http.Server{
		Handler:           connbound.Promoting(withRequestIDs(s.countInflight(api.WithClientCert(s.authn.Guard(api.WithResponseController(mux), limits))))),
		ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute, MaxHeaderBytes: 64 << 10,
		HTTP2: &http.HTTP2Config{MaxReceiveBufferPerConnection: MaxAPIReceiveBuffer, MaxReceiveBufferPerStream: MaxAPIReceiveBuffer,
			WriteByteTimeout: limits.WithDefaults().WriteByteTimeout},
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
		// The Authenticator vouches for the connection of a call that
		// passed its checks (connbound); a request moves its connection
		// behind those that never carried one (Promoting).
		ConnContext: connbound.ContextWithConn,
	}
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetHTTP2(true)
	if serverTLS == nil {
		protos.SetUnencryptedHTTP2(true)
	}
	s.apiSrv.Protocols = &protos
	// Watch streams never end by themselves: end them as shutdown begins.
	s.apiSrv.RegisterOnShutdown(watch.Close)
	apiLn, err := boundAPIConns(s.apiLn, apiConnBounds{MaxPending: cfg.MaxPendingAPIConns,
		MaxPerAccount: cfg.MaxAPIConnsPerAccount, Max: cfg.MaxAPIConns, MaxTrusted: cfg.MaxTrustedAPIConns}, s.reg, s.log)
	if err != nil {
		return nil, err
	}
	if serverTLS != nil {
		t := serverTLS.Clone()
		t.ClientAuth = tls.VerifyClientCertIfGiven
		t.NextProtos = []string{"h2", "http/1.1"}
		apiLn = tls.NewListener(apiLn, t)
	}
	s.serve(s.apiSrv, apiLn, "api")

	if s.adminLn != nil {
		s.adminSrv = &http.Server{Handler: s.adminMux(), ReadHeaderTimeout: 10 * time.Second,
			ReadTimeout: 30 * time.Second, WriteTimeout: time.Minute, IdleTimeout: 2 * time.Minute, MaxHeaderBytes: 64 << 10}
		s.serve(s.adminSrv, s.adminLn, "admin")
	}

	bgctx, bg := context.WithCancel(context.Background())
	s.bg = bg
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.authn.RunActivity(bgctx)
	}()
	if cfg.BackupDir != "" {
		s.backups, err = backup.Start(backup.Config{
			Dir: cfg.BackupDir, Every: cfg.BackupEvery, Keep: cfg.BackupKeep, Key: cfg.BackupKey,
			Source: s.writeBackup, Leading: s.node.IsLeader, Logger: s.log, Metrics: s.reg,
		})
		if err != nil {
			return nil, err
		}
	}
	close(s.ready)

	if len(cfg.Join) > 0 && !s.node.IsMemberOrHasState() {
		if err := s.join(ctx, apiAdv); err != nil {
			return nil, err
		}
	}
	s.log.Info("control node serving", "api", apiAdv, "raft", s.node.RaftAddr(), "admin", s.AdminAddr(), "version", buildinfo.Get().String())
	return s, nil
}

func (s *Server) serve(srv *http.Server, ln net.Listener, name string) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("http server stopped", "server", name, "err", err)
		}
	}()
}

// joinHint names the likely cause of a join call from a node that
// speaks plain HTTP whose connection the member ended without an answer
// (closed or reset: not refused, nor a name or route that failed): the
// member speaks TLS, and drops the plaintext.
//
// net/http's HTTP/2 client reports a connection the server closed before
// the first request went out as "client conn could not be established",
// without the cause (no sentinel is exported): under load a plaintext
// join sees that rather than the EOF.
func (s *Server) joinHint(err error) string {
	if err == nil || s.tls != nil || connect.IsWireError(err) ||
		!(errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) ||
			strings.Contains(err.Error(), "http2: client conn could not be established")) {
		return ""
	}
	return "if the cluster's members use TLS, give this node --tls-cert, --tls-key and --tls-ca from the cluster's CA"
}

// clusterAt asks the members listed in cfg.Join, once a second for up
// to BootstrapWait, whether they belong to a cluster (a history, or a
// member list: a cluster of a release before histories has none). It
// returns the address of the first that does, or "" once every one
// answered that it does not (new nodes waiting to join this one) or the
// wait ran out with none answering at all. A member that refuses to
// answer this node (no certificate from the cluster's CA, an expired
// --join-token) may well belong to one: that is an error, as is ctx
// ending. A second cluster beside a live one costs far more than a node
// that will not start.
func (s *Server) clusterAt(ctx context.Context) (string, error) {
	deadline := time.Now().Add(s.cfg.BootstrapWait)
	for {
		empty := 0
		var refused error
		for _, addr := range s.cfg.Join {
			cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			st, err := s.dialer.Cluster(addr).Status(cctx, joinRequest(s.cfg.JoinToken, &controlv1.StatusRequest{}))
			cancel()
			switch c := connect.CodeOf(err); {
			case err == nil && (st.Msg.GetHistory() != "" || len(st.Msg.GetMembers()) > 0):
				return addr, nil
			case err == nil:
				empty++
			case c == connect.CodeUnauthenticated || c == connect.CodePermissionDenied:
				refused = fmt.Errorf("%s refused to say whether it belongs to a cluster: %w", addr, err)
			default:
				s.log.Info("before founding a cluster: no answer yet", "from", addr, "err", err)
			}
		}
		if empty == len(s.cfg.Join) {
			return "", nil
		}
		if !time.Now().Before(deadline) {
			if refused != nil {
				return "", fmt.Errorf("not founding a cluster: %w (give this node TLS certificates from the cluster's CA, or a current --join-token; to found a new cluster regardless, start it without --join)", refused)
			}
			return "", nil
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("before founding a cluster, asking %v whether one exists: %w", s.cfg.Join, ctx.Err())
		case <-time.After(time.Second):
		}
	}
}

// joinRequest wraps msg, a call to a member made while joining, with
// token (the join token) when there is one.
func joinRequest[T any](token string, msg *T) *connect.Request[T] {
	req := connect.NewRequest(msg)
	if token != "" {
		req.Header().Set("Authorization", "Bearer "+token)
	}
	return req
}

// errVoterLostData is a join refused because the cluster still counts a
// voter of this node's id, while this node's data dir is empty.
var errVoterLostData = errors.New("this node's id is a voter of the cluster, but its data dir holds no Raft state: it lost its data")

// joinVia asks the member at addr for its cluster's history, which the
// node's Raft transport then speaks for (raftnode.Node.ExpectHistory:
// until then it takes no Raft traffic), and then to add this node.
func (s *Server) joinVia(ctx context.Context, addr string, req *controlv1.AddVoterRequest) error {
	c := s.dialer.Cluster(addr)
	st, err := c.Status(ctx, joinRequest(s.cfg.JoinToken, &controlv1.StatusRequest{}))
	if err != nil {
		return err
	}
	// A voter of this id whose data dir is empty lost its data (a new
	// volume, a wiped disk). Raft counted it in the majorities that
	// committed entries; taken back as the same voter with an empty log
	// (hashicorp/raft accepts AddVoter of a member as done), it would vote
	// for a candidate that lacks them, and committed writes could be lost
	// in the next election. It joins again only as a new member, once
	// removed.
	if slices.ContainsFunc(st.Msg.GetMembers(), func(m *controlv1.Member) bool {
		return m.GetId() == s.cfg.NodeID && m.GetSuffrage() == controlv1.Suffrage_SUFFRAGE_VOTER
	}) {
		return fmt.Errorf("%w: remove it first (relayctl cluster remove %s), and it joins as a new member", errVoterLostData, s.cfg.NodeID)
	}
	everyMemberChecks := len(st.Msg.GetMembers()) > 0
	for _, m := range st.Msg.GetMembers() {
		everyMemberChecks = everyMemberChecks && slices.Contains(m.GetFeatures(), fsm.FeatureRaftClusterCheck)
	}
	if err := s.node.ExpectHistory(st.Msg.GetHistory(), everyMemberChecks); err != nil {
		return fmt.Errorf("status of %s: %w", addr, err)
	}
	_, err = c.AddVoter(ctx, joinRequest(s.cfg.JoinToken, req))
	return err
}

// join asks the members in cfg.Join, in turn, to add this node, until one
// accepts or ctx ends.
func (s *Server) join(ctx context.Context, apiAdv string) error {
	req := &controlv1.AddVoterRequest{Id: s.cfg.NodeID, RaftAddr: s.node.RaftAddr(), ApiAddr: apiAdv}
	backoff := 100 * time.Millisecond
	hint := "" // kept once an attempt gave one: the last may end in the deadline
	for {
		var lastErr error
		for _, addr := range s.cfg.Join {
			// An earlier attempt's AddVoter may have committed with its
			// answer lost: the leader's replication then makes this node
			// a member, and the member list would now name it.
			if s.node.IsMemberOrHasState() {
				return nil
			}
			cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
			err := s.joinVia(cctx, addr, req)
			cancel()
			if err == nil {
				s.log.Info("joined the cluster", "via", addr)
				return nil
			}
			lastErr = err
			if errors.Is(err, errVoterLostData) {
				// Tried again until an operator removes the old member:
				// then this node joins without a restart.
				s.log.Error("join refused: this node lost its data", "via", addr, "err", err)
				break
			}
			if h := s.joinHint(err); h != "" {
				hint = h
				s.log.Warn("join attempt failed", "via", addr, "err", err, "hint", hint)
			} else {
				s.log.Warn("join attempt failed", "via", addr, "err", err)
			}
			if c := connect.CodeOf(err); c == connect.CodeUnauthenticated || c == connect.CodePermissionDenied {
				return fmt.Errorf("join cluster via %s: %w (give --join-token with an admin access token, or TLS certificates from the cluster CA)", addr, err)
			}
		}
		select {
		case <-ctx.Done():
			if hint != "" {
				return fmt.Errorf("join cluster via %v: %w (last error: %v; %s)", s.cfg.Join, ctx.Err(), lastErr, hint)
			}
			return fmt.Errorf("join cluster via %v: %w (last error: %v)", s.cfg.Join, ctx.Err(), lastErr)
		case <-time.After(backoff):
		}
		if backoff < 5*time.Second {
			backoff *= 2
		}
	}
}

// adminMux is the metrics, the probes and the Go profiler: the admin
// port is meant for localhost or a private network.
func (s *Server) adminMux() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{}))
	profiler.Register(mux)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if s.stopping.Load() {
			http.Error(w, "not ready: shutting down", http.StatusServiceUnavailable)
			return
		}
		if s.node.Removed() {
			http.Error(w, "not ready: this node was removed from the cluster its data dir belongs to (see its log)", http.StatusServiceUnavailable)
			return
		}
		if !s.node.Ready() {
			http.Error(w, "not ready: no leader known or not caught up with the log yet", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	return mux
}

// writeBackup is the source of scheduled backups: the same consistent copy
// ClusterService.Backup streams (a linearizable read barrier, then the
// FSM's export). It stops once ctx ends, the export too: the scheduler's
// timeout and its Close (which Shutdown waits for) end a backup of a
// large state at once, not when the whole state is written.
func (s *Server) writeBackup(ctx context.Context, w io.Writer) error {
	if err := s.node.Barrier(ctx); err != nil {
		return err
	}
	_, err := s.node.FSM().WriteBackupContext(ctx, w)
	return err
}

// openBackup opens the backup file a restore reads (RestoreFrom). A
// plaintext one where a key is configured is refused unless
// RestoreAllowPlaintext, and restored with a warning when it is: the
// operator vouches for a file nothing authenticates.
func (s *Server) openBackup(path string) (io.ReadCloser, error) {
	rc, err := backup.OpenFile(path, s.cfg.BackupKey)
	if errors.Is(err, backup.ErrPlaintext) && s.cfg.RestoreAllowPlaintext {
		s.log.Warn("restoring a plaintext backup although a backup key is configured, as --restore-allow-plaintext allows: nothing authenticates its content",
			"file", path)
		return backup.OpenFile(path, s.cfg.BackupKey, backup.AllowPlaintext(true))
	}
	return rc, err
}

// Backups returns the backup scheduler, nil unless BackupDir is set.
func (s *Server) Backups() *backup.Scheduler { return s.backups }

// Node returns the Raft node.
func (s *Server) Node() *raftnode.Node { return s.node }

// APIAddr returns the address the API listens on.
func (s *Server) APIAddr() string { return s.apiLn.Addr().String() }

// APIURL returns the base URL of the API.
func (s *Server) APIURL() string { return s.dialer.URL(s.APIAddr()) }

// AdminAddr returns the admin listener's address, or "" when disabled.
func (s *Server) AdminAddr() string {
	if s.adminLn == nil {
		return ""
	}
	return s.adminLn.Addr().String()
}

// Registry returns the node's Prometheus registry.
func (s *Server) Registry() *prometheus.Registry { return s.reg }

// Shutdown stops the node in order: /readyz turns 503 at once; the node
// steps down (raftnode.Node.StepDown: a leader hands leadership over,
// the node withdraws its features) while its API still answers; the API
// stops taking requests and finishes those in flight (shutdownAPI);
// Raft and the stores stop (handing leadership over again if the node
// was elected meanwhile); then the admin endpoints close. Safe to call
// more than once.
func (s *Server) Shutdown(ctx context.Context) error {
	s.stopping.Store(true)
	s.stopOnce.Do(func() {
		var errs []error
		// The leadership hand-over first, while the API still answers the
		// writes other nodes forward here.
		if s.node != nil {
			s.node.StepDown(ctx)
		}
		if s.apiSrv != nil {
			if err := s.shutdownAPI(ctx); err != nil {
				errs = append(errs, fmt.Errorf("api shutdown: %w", err))
			}
		} else if s.apiLn != nil {
			_ = s.apiLn.Close()
		}
		if s.authn != nil {
			s.authn.StopStreams()
		}
		if s.bg != nil {
			s.bg()
		}
		if s.backups != nil {
			_ = s.backups.Close()
		}
		if s.node != nil {
			if err := s.node.Shutdown(ctx); err != nil {
				errs = append(errs, err)
			}
		}
		if s.adminSrv != nil {
			if err := s.adminSrv.Shutdown(ctx); err != nil {
				errs = append(errs, fmt.Errorf("admin shutdown: %w", err))
			}
		} else if s.adminLn != nil {
			_ = s.adminLn.Close()
		}
		s.wg.Wait()
		if s.dialer != nil {
			s.dialer.Close()
		}
		s.stopErr = errors.Join(errs...)
	})
	return s.stopErr
}

// apiQuiet is how long shutdownAPI waits with no request in flight, and
// none ending, before it closes the API's connections: time for clients
// to see the HTTP/2 GOAWAY, and for the last response's frames to leave.
const apiQuiet = 100 * time.Millisecond

// shutdownAPI stops the API gracefully: no new connections, a GOAWAY on
// every HTTP/2 one, every request in flight answered (bounded by ctx).
// Once the API has been quiet for apiQuiet, it closes what connections
// are left: Go's HTTP/2 server would otherwise hold each one open for a
// second after its GOAWAY, waiting for the client to hang up, and the
// clients of a control node (other nodes' peer connections, edges) keep
// theirs open while idle. What the close can still cut: a connection
// whose first request had not arrived, and the last bytes a plain
// (non-Connect) handler left to flush when it returned, if its client's
// window stayed shut that long; clients see a request never answered.
func (s *Server) shutdownAPI(ctx context.Context) error {
	done := make(chan error, 1)
	go func() { done <- s.apiSrv.Shutdown(ctx) }()
	poll := time.NewTicker(5 * time.Millisecond)
	defer poll.Stop()
	served, quietSince, start, told := s.served.Load(), time.Now(), time.Now(), false
	for {
		select {
		case err := <-done:
			return err
		case <-poll.C:
		}
		if n, in := s.served.Load(), s.inflight.Load(); n != served || in != 0 {
			served, quietSince = n, time.Now()
			if in != 0 && !told && time.Since(start) >= apiQuiet {
				s.log.Info("shutdown waits for the API's requests in flight", "requests", in)
				told = true
			}
			continue
		}
		if time.Since(quietSince) >= apiQuiet {
			if err := s.apiSrv.Close(); err != nil {
				return err
			}
			if err := <-done; err != nil && !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		}
	}
}

// countInflight counts the requests h is handling, and those it handled
// (shutdownAPI).
func (s *Server) countInflight(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.inflight.Add(1)
		defer func() {
			s.inflight.Add(-1)
			s.served.Add(1)
		}()
		h.ServeHTTP(w, r)
	})
}

// Kill stops the node abruptly, as a crash would (listeners closed, no
// leadership transfer, in-flight requests cut). For fault tests.
func (s *Server) Kill() {
	s.stopping.Store(true)
	s.stopOnce.Do(func() {
		if s.apiSrv != nil {
			_ = s.apiSrv.Close()
		}
		if s.authn != nil {
			s.authn.StopStreams()
		}
		if s.bg != nil {
			s.bg()
		}
		if s.backups != nil {
			_ = s.backups.Close()
		}
		if s.node != nil {
			_ = s.node.Kill()
		}
		if s.adminSrv != nil {
			_ = s.adminSrv.Close()
		}
		s.wg.Wait()
		if s.dialer != nil {
			s.dialer.Close()
		}
	})
}

// Run starts a node and serves until ctx ends, then shuts it down within
// shutdownTimeout.
func Run(ctx context.Context, cfg Config, shutdownTimeout time.Duration) error {
	s, err := Start(ctx, cfg)
	if err != nil {
		return err
	}
	<-ctx.Done()
	s.log.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	return s.Shutdown(sctx)
}

func loadTLS(certFile, keyFile, caFile string) (server, client *tls.Config, err error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, nil, fmt.Errorf("load TLS key pair %s, %s: %w", certFile, keyFile, err)
	}
	pool, err := certpool.FromFile(caFile)
	if err != nil {
		return nil, nil, fmt.Errorf("--tls-ca: %w", err)
	}
	server = &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool, MinVersion: tls.VersionTLS13}
	client = &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, MinVersion: tls.VersionTLS13}
	return server, client, nil
}

func watchConfig(c api.WatchConfig, log *slog.Logger, reg prometheus.Registerer) api.WatchConfig {
	if c.Logger == nil {
		c.Logger = log
	}
	if c.Metrics == nil {
		c.Metrics = reg
	}
	return c
}
