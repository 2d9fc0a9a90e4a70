package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/edge-relay/relay/edge/devconn"
	"github.com/edge-relay/relay/edge/frame"
	"github.com/edge-relay/relay/edge/mailbox"
	edgeserver "github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/edge/session"
	"github.com/edge-relay/relay/edge/transport"
	"github.com/edge-relay/relay/internal/certpool"
	"github.com/edge-relay/relay/internal/flagenv"
)

// edgeFlags registers the flags of an edge into cfg.
type edgeFlags struct {
	control      flagenv.List
	controlCA    string
	passwordFile string
	origins      flagenv.List
	requireBound flagenv.List
	shutdown     time.Duration
	unvalidated  int
	revisionWait time.Duration
}

func (f *edgeFlags) register(fs *flag.FlagSet, cfg *edgeserver.Config) {
	host, _ := os.Hostname()
	l := session.DefaultLimits()
	cfg.Session.Limits = l
	fs.StringVar(&cfg.EdgeID, "edge-id", host, "this edge's id, signed into every device handshake")
	fs.StringVar(&cfg.Addr, "addr", "127.0.0.1:7443", "where devices connect: UDP (QUIC, WebTransport) and TCP (HTTPS) on this port")
	fs.StringVar(&cfg.AdminAddr, "admin-addr", "", "plain-HTTP address for /metrics, /healthz, /readyz, certificate hashes, the console and /debug/pprof/ (keep it private; empty: off)")
	fs.StringVar(&cfg.CertFile, "tls-cert", "", "PEM certificate for devices (empty: self-signed, 10 days, renewed, hash published)")
	fs.StringVar(&cfg.KeyFile, "tls-key", "", "PEM private key for --tls-cert")
	fs.BoolVar(&cfg.ClusterTLSTickets, "cluster-tls-tickets", false, "seal TLS 1.3 session tickets with the cluster's session keys, so devices resume TLS on any edge (its keys then also let whoever holds them impersonate an edge to a resuming device: see docs/protocol.md)")
	fs.Var(&f.control, "control", "control-plane API URL, http:// or https:// (repeatable, comma-separated; default http://127.0.0.1:7400)")
	fs.StringVar(&f.controlCA, "control-ca", "", "PEM CA bundle to verify https:// control URLs")
	fs.DurationVar(&cfg.ControlGrace, "control-grace", time.Minute, "refuse new sessions (GOING_AWAY) once the control plane has been silent this long; sessions in place keep relaying; not ready then only while a peer edge hears the control plane (0: never refuse)")
	fs.DurationVar(&cfg.Control.DialTimeout, "control-dial-timeout", 500*time.Millisecond, "give up a connection attempt to a control node after this long and try again")
	fs.StringVar(&cfg.Control.Login, "edge-login", "edge", "the edges' account on the control plane (role edge)")
	fs.StringVar(&f.passwordFile, "edge-password-file", "", "file holding the account's password (or set RELAY_EDGE_PASSWORD)")
	fs.StringVar(&cfg.PublicAddr, "public-addr", "", "UDP host:port browsers are told for WebTransport, or a host alone with the bound port (default: --addr as bound; an unspecified host becomes the host the page was loaded from)")
	fs.Var(&f.origins, "allowed-origin", "web origin (scheme://host[:port]) allowed, besides the edge's own page, to open WebTransport and WebSocket sessions (repeatable; * admits any page)")
	fs.StringVar(&cfg.MeshAddr, "mesh-addr", "", "UDP address of the mesh listener other edges connect to (default: the host of --addr, a free port)")
	fs.StringVar(&cfg.MeshAdvertise, "mesh-advertise", "", "mesh address other edges are told: host:port, or a host alone with the bound port (default: --mesh-addr as bound)")
	fs.DurationVar(&cfg.IdleTimeout, "idle-timeout", 30*time.Second, "close device connections silent this long")
	fs.DurationVar(&cfg.MeshIdleTimeout, "mesh-idle-timeout", 5*time.Second, "count a silent mesh link as broken after this long (forwards to a peer that died wait as long)")
	fs.DurationVar(&cfg.MeshPresenceGrace, "mesh-presence-grace", 10*time.Second, "keep the devices a peer edge announced this long after its mesh link ended, for it to reconnect (negative: none)")
	fs.IntVar(&cfg.Session.Limits.MaxPayloadBytes, "max-payload-bytes", l.MaxPayloadBytes, "largest event payload (an event, with its other fields at their longest, must fit the 256 KiB a mailbox entry holds: with --max-frame-bytes letting larger events in, at most 253458 with the other limits at their defaults)")
	fs.IntVar(&cfg.Session.Limits.MaxFrameBytes, "max-frame-bytes", l.MaxFrameBytes, "largest frame")
	fs.DurationVar(&cfg.Session.Limits.MaxTTL, "max-ttl", l.MaxTTL, "longest event TTL (plus --skew-tolerance, at most the 365 days a mailbox entry may live)")
	fs.DurationVar(&cfg.Session.Limits.SkewTolerance, "skew-tolerance", l.SkewTolerance, "how far a device's clock may be off")
	fs.IntVar(&cfg.Session.Limits.EventsPerSecond, "events-per-second", l.EventsPerSecond, "events per second per device (above it the edge reads more slowly)")
	fs.IntVar(&cfg.Session.Limits.BytesPerSecond, "bytes-per-second", l.BytesPerSecond, "bytes per second per device, every frame counted as sent and each mailbox copy of an event (above it the edge reads more slowly)")
	fs.IntVar(&cfg.Session.Limits.FramesPerSecond, "frames-per-second", l.FramesPerSecond, "frames of any kind per second per device (above it the edge reads more slowly)")
	fs.DurationVar(&cfg.Session.Limits.FrameTimeout, "frame-timeout", l.FrameTimeout, "how long a frame may take from its first byte to its last")
	fs.DurationVar(&cfg.Session.WriteTimeout, "write-timeout", 20*time.Second, "close a device that takes less than 64 KiB of what the edge writes in this long (SLOW_CONSUMER)")
	fs.DurationVar(&cfg.Session.ResumeWindow, "resume-window", 30*time.Second, "how far a resume proof's time may be from the edge's clock")
	fs.DurationVar(&cfg.Session.TicketTTL, "ticket-ttl", time.Hour, "lifetime of resume tickets")
	fs.Var(&f.requireBound, "require-bound-proofs", "transports (quic, webtransport, websocket; repeatable, comma-separated) on which devices must speak protocol version 2, whose proofs are bound to the TLS connection: version 1 is refused UNSUPPORTED_VERSION there (browsers speak 1 only; default: none)")
	fs.DurationVar(&cfg.Session.MaxSessionAge, "max-session-age", 24*time.Hour, "how long a proof of key lasts before the device must sign again")
	fs.IntVar(&cfg.Session.QueueLen, "queue-len", 256, "events waiting per receiving device before senders get QUEUE_FULL")
	fs.IntVar(&cfg.Session.UnackedLen, "unacked-len", 1024, "durable events queued or sent to a device and not yet acknowledged by it, or 4 MiB of them, before senders get QUEUE_FULL: bounds what a device that reads but never acknowledges holds")
	fs.IntVar(&cfg.Session.MaxSessions, "max-sessions", 0, "most sessions this edge takes; beyond it devices are sent to another edge (0: no bound)")
	fs.Float64Var(&cfg.Session.HandshakesPerSecond, "handshakes-per-second", 20, "new sessions per second per client IPv4 address or IPv6 /64")
	fs.DurationVar(&f.revisionWait, "revision-wait", 5*time.Second, "how long a handshake whose Hello names a control-plane revision (min_revision: a device that connects right after its registration) may wait for this edge to learn of it, at most half the 10s handshake timeout; then it goes on with what the edge knows (0: never wait)")
	fs.IntVar(&cfg.Session.MaxRevisionWaits, "max-revision-waits", 1024, "handshakes that may wait for a revision at once; beyond it they go on without waiting (0: none waits)")
	fs.IntVar(&f.unvalidated, "max-unvalidated-handshakes", transport.DefaultMaxUnvalidatedHandshakes, "QUIC handshakes from addresses not yet validated in progress at once; beyond it new connections must first answer a Retry, one round trip more (0: every connection must)")
	fs.IntVar(&cfg.MaxPendingHTTPS, "max-pending-https", 0, "HTTPS port connections that are not a device session (in their TLS handshake, serving a request, idle between requests, a WebSocket not yet admitted) at once; beyond it the oldest is closed, and one source (IPv4 address, IPv6 /64) holds at most a sixteenth of it (0: 4096, or with --max-sessions an eighth of it, 64 to 4096)")
	fs.IntVar(&cfg.MaxPendingQUIC, "max-pending-quic", 0, "device port QUIC connections, native and HTTP/3, that are not a device session (in their handshake, waiting for their session stream, in the session's handshake) at once; beyond it the oldest is closed, those that never opened a session stream first, and one source (IPv4 address, IPv6 /64) holds at most a sixteenth of it (0: 1024, or with --max-sessions a sixty-fourth of it, 64 to 1024)")
	fs.DurationVar(&cfg.DrainWindow, "drain-window", 10*time.Second, "on shutdown, spread clients' reconnects over this long")
	fs.DurationVar(&f.shutdown, "shutdown-timeout", 30*time.Second, "how long a graceful shutdown may take")
}

// apply completes cfg from the flags that need more than a value.
func (f *edgeFlags) apply(cfg *edgeserver.Config, getenv func(string) string) error {
	cfg.Control.URLs = f.control
	if len(cfg.Control.URLs) == 0 {
		cfg.Control.URLs = []string{"http://127.0.0.1:7400"}
	}
	cfg.AllowedOrigins = f.origins
	if err := devconn.CheckTransports(f.requireBound); err != nil {
		return fmt.Errorf("--require-bound-proofs: %w", err)
	}
	cfg.Session.RequireBoundProofs = f.requireBound
	cfg.MaxUnvalidatedHandshakes = f.unvalidated
	if f.unvalidated <= 0 {
		cfg.MaxUnvalidatedHandshakes = -1 // the config's zero is its default
	}
	// The same for the revision waits: the flags' zero is "never", the
	// session configuration's zero its default.
	cfg.Session.RevisionWait = f.revisionWait
	if f.revisionWait <= 0 || cfg.Session.MaxRevisionWaits <= 0 {
		cfg.Session.RevisionWait = -1
	}
	// Secrets come from the environment or a file, never from flags.
	cfg.Control.Password = getenv("RELAY_EDGE_PASSWORD")
	if f.passwordFile != "" {
		b, err := os.ReadFile(f.passwordFile)
		if err != nil {
			return fmt.Errorf("read --edge-password-file: %w", err)
		}
		cfg.Control.Password = strings.TrimSpace(string(b))
	}
	if cfg.Control.Password == "" {
		return errors.New("the edge needs its account's password: set RELAY_EDGE_PASSWORD or --edge-password-file")
	}
	if f.controlCA != "" {
		pool, err := certpool.FromFile(f.controlCA)
		if err != nil {
			return fmt.Errorf("--control-ca: %w", err)
		}
		cfg.Control.TLS = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	if cfg.EdgeID == "" {
		return errors.New("--edge-id is required (the host name was not available)")
	}
	return checkMailboxLimits(cfg.Session.Limits)
}

// minWebSocketIdleTimeout is the shortest --idle-timeout WebSocket
// devices live with: twice the 10 s the clients ping a WebSocket at
// (QUIC's idle timeout is negotiated, a WebSocket's is the edge's alone),
// so that one lost or late ping does not end a session. Shorter is
// taken, with a warning: an edge whose devices all speak QUIC may want
// to notice a dead one sooner.
const minWebSocketIdleTimeout = 20 * time.Second

// checkMailboxLimits refuses event limits that admit events a mailbox
// cannot keep: the edge would accept them and then fail to store them
// for an offline target (a TTL beyond the mailbox's even fails the call
// that carries it, with every other sender's entry in it).
func checkMailboxLimits(l session.Limits) error {
	l = l.WithDefaults()
	ttl, skew := l.MaxTTL, l.SkewTolerance
	if ttl > mailbox.MaxEntryTTL-skew {
		return fmt.Errorf("--max-ttl %v plus --skew-tolerance %v is above the %v a mailbox entry may live: lower --max-ttl to at most %v",
			ttl, skew, mailbox.MaxEntryTTL, mailbox.MaxEntryTTL-skew)
	}
	if n := l.LargestEvent(); n > mailbox.MaxEventBytes {
		// The largest payload that fits, whatever the frame limit.
		fit := l
		fit.MaxFrameBytes, fit.MaxPayloadBytes = frame.MaxFrameLimit, 1
		fit.MaxPayloadBytes = mailbox.MaxEventBytes - (fit.LargestEvent() - 1)
		for fit.LargestEvent() > mailbox.MaxEventBytes {
			fit.MaxPayloadBytes-- // its length's varint grew
		}
		return fmt.Errorf("--max-payload-bytes %d admits events of %d bytes with the other fields at their longest (under --max-frame-bytes %d), above the %d a mailbox entry holds: lower --max-payload-bytes to at most %d",
			l.MaxPayloadBytes, n, l.MaxFrameBytes, mailbox.MaxEventBytes, fit.MaxPayloadBytes)
	}
	return nil
}

func runEdge(ctx context.Context, args []string, stderr io.Writer, getenv func(string) string) error {
	fs := flag.NewFlagSet("relayd edge", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		cfg    edgeserver.Config
		f      edgeFlags
		common commonFlags
	)
	f.register(fs, &cfg)
	common.register(fs)
	fs.Usage = flagenv.Usage(fs, envPrefix, "relayd edge --control URL [flags]   (password in RELAY_EDGE_PASSWORD)")
	if err := flagenv.Parse(fs, envPrefix, args, getenv); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if err := f.apply(&cfg, getenv); err != nil {
		return err
	}
	log, err := common.logger(stderr)
	if err != nil {
		return err
	}
	applyMemoryLimit(log, getenv)
	cfg.Logger = log
	tel, stop, err := common.startTracing(ctx, "relay-edge", cfg.EdgeID)
	if err != nil {
		return err
	}
	defer stop()
	cfg.TracerProvider = common.edgeTracing(tel)
	if cfg.IdleTimeout < minWebSocketIdleTimeout {
		log.Warn("--idle-timeout is below two of the clients' WebSocket pings (every 10 s): WebSocket sessions may end TIMEOUT between two pings",
			"idle_timeout", cfg.IdleTimeout, "at_least", minWebSocketIdleTimeout)
	}
	if most := f.shutdown - edgeserver.ShutdownReserve - 5*time.Second; cfg.DrainWindow > most {
		log.Warn("the drain window does not fit the shutdown timeout: a shutdown spreads reconnects over less",
			"drain_window", cfg.DrainWindow, "shutdown_timeout", f.shutdown, "spread", max(most, 0))
	}
	s, err := edgeserver.Start(ctx, cfg)
	if err != nil {
		return err
	}
	<-ctx.Done()
	log.Info("shutting down: draining sessions", "window", cfg.DrainWindow)
	sctx, cancel := context.WithTimeout(context.Background(), f.shutdown)
	defer cancel()
	return s.Shutdown(sctx)
}
