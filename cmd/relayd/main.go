// Command relayd is the relay's daemon: `relayd control` runs a control
// plane node, `relayd edge` an edge, `relayd dev` a complete
// single-machine deployment with defaults that need no flags.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"go.opentelemetry.io/otel/trace"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/auth"
	"github.com/edge-relay/relay/control/backup"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
	"github.com/edge-relay/relay/control/server"
	"github.com/edge-relay/relay/internal/buildinfo"
	"github.com/edge-relay/relay/internal/flagenv"
	"github.com/edge-relay/relay/internal/memlimit"
	"github.com/edge-relay/relay/internal/telemetry"
)

const envPrefix = "RELAY_"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr, os.Getenv); err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "relayd:", err)
		}
		os.Exit(2)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, topUsage)
		return errors.New("missing command")
	}
	switch args[0] {
	case "control":
		return runControl(ctx, args[1:], stderr, getenv)
	case "edge":
		return runEdge(ctx, args[1:], stderr, getenv)
	case "dev":
		return runDev(ctx, args[1:], stdout, stderr, getenv)
	case "export-state":
		return runExportState(ctx, args[1:], stdout, stderr, getenv)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, topUsage)
		return nil
	case "version", "--version":
		fmt.Fprintln(stdout, "relayd", buildinfo.Get())
		return nil
	}
	fmt.Fprint(stderr, topUsage)
	return fmt.Errorf("unknown command %q", args[0])
}

const topUsage = `Usage: relayd <command> [flags]

Commands:
  control   run a control-plane node (Raft member serving the Connect API)
  edge      run an edge (devices connect over QUIC and WebTransport)
  dev       run a single-machine deployment (a control node and an edge) with embedded defaults
  export-state
            write a backup file of what a stopped control node applied, from its data dir
            (a cluster that lost its quorum for good; restore a new cluster from it)
  version   print the release this binary is

Run "relayd <command> --help" for the flags of a command.
`

// commonFlags are the logging and tracing flags every command has.
type commonFlags struct {
	logLevel  string
	logFormat string
	tracing   telemetry.Config
}

func (c *commonFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&c.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	fs.StringVar(&c.logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&c.tracing.OTLPEndpoint, "otlp-endpoint", "", "host:port of an OTLP/HTTP trace collector (empty: export no traces)")
	fs.BoolVar(&c.tracing.OTLPInsecure, "otlp-insecure", false, "send traces to the collector without TLS")
	fs.StringVar(&c.tracing.OTLPCAFile, "otlp-ca", "", "PEM CA bundle to verify the collector's certificate (default: the system's roots)")
	fs.Float64Var(&c.tracing.SampleRatio, "trace-sample-ratio", 1, "fraction of new traces to sample, 0 to 1 (callers' decisions are kept)")
}

// telemetry starts tracing for a process; stop flushes it.
func (c *commonFlags) startTracing(ctx context.Context, service, instance string) (*telemetry.Telemetry, func(), error) {
	cfg := c.tracing
	cfg.ServiceName, cfg.InstanceID = service, instance
	t, err := telemetry.New(ctx, cfg)
	if err != nil {
		return nil, nil, err
	}
	return t, func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = t.Shutdown(sctx)
	}, nil
}

// edgeTracing is the tracer provider for an edge: spans per event cost
// time on the hot path, so the edge records them only when they go
// somewhere.
func (c *commonFlags) edgeTracing(t *telemetry.Telemetry) trace.TracerProvider {
	if c.tracing.OTLPEndpoint == "" {
		return nil
	}
	return t.TracerProvider()
}

func (c *commonFlags) logger(w io.Writer) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(c.logLevel)); err != nil {
		return nil, fmt.Errorf("--log-level %q: %w", c.logLevel, err)
	}
	opts := &slog.HandlerOptions{Level: lvl}
	// Lines logged with a traced context carry its trace and span ids.
	switch c.logFormat {
	case "text":
		return slog.New(telemetry.LogHandler(slog.NewTextHandler(w, opts))), nil
	case "json":
		// Durations as the text format writes them ("1h0m0s"), not as
		// JSON's bare nanoseconds, which a reader takes for anything.
		opts.ReplaceAttr = func(_ []string, a slog.Attr) slog.Attr {
			if a.Value.Kind() == slog.KindDuration {
				a.Value = slog.StringValue(a.Value.Duration().String())
			}
			return a
		}
		return slog.New(telemetry.LogHandler(slog.NewJSONHandler(w, opts))), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", c.logFormat)
}

// zeroIsNoLimit is a flag.Func for a bound whose 0 on the command line
// means no limit, which api.AuthConfig spells as a negative value (its
// zero takes the default); a negative or malformed value is refused.
func zeroIsNoLimit[T int | time.Duration](dst *T, parse func(string) (T, error), what string) func(string) error {
	return func(v string) error {
		n, err := parse(v)
		if err == nil && n < 0 {
			err = errors.New("negative")
		}
		if err != nil {
			return fmt.Errorf("want %s of 0 or more, got %q: %w", what, v, err)
		}
		if n == 0 {
			n = -1
		}
		*dst = n
		return nil
	}
}

// atMost parses a count no larger than limit.
func atMost(limit int) func(string) (int, error) {
	return func(v string) (int, error) {
		n, err := strconv.Atoi(v)
		if err == nil && n > limit {
			err = fmt.Errorf("%d is more than %d", n, limit)
		}
		return n, err
	}
}

// controlFlags registers the flags of a control node into cfg.
func controlFlags(fs *flag.FlagSet, cfg *server.Config, join *flagenv.List, shutdown *time.Duration, backupKeyFile *string) {
	fs.StringVar(&cfg.NodeID, "node-id", "", "this node's stable id (letters, digits, '-', '_', '.')")
	fs.StringVar(&cfg.DataDir, "data-dir", "", "directory for the Raft log, snapshots and state")
	fs.StringVar(&cfg.RaftAddr, "raft-addr", "127.0.0.1:7401", "address Raft listens on")
	fs.StringVar(&cfg.RaftAdvertise, "raft-advertise", "", "Raft address other members dial (default: --raft-addr)")
	fs.StringVar(&cfg.APIAddr, "api-addr", "127.0.0.1:7400", "address the Connect API listens on")
	fs.StringVar(&cfg.APIAdvertise, "api-advertise", "", "API address other members and clients use (default: --api-addr)")
	fs.StringVar(&cfg.AdminAddr, "admin-addr", "127.0.0.1:7402", "address for /metrics, /healthz, /readyz and /debug/pprof/ (keep it private; empty: off)")
	fs.BoolVar(&cfg.Bootstrap, "bootstrap", false, "start a new cluster with this node as its only voter (first start only); with --join, only if no member listed there belongs to a cluster already (else it joins it): a seed that lost its data dir does not found a second cluster")
	fs.Var(join, "join", "API address of an existing member to join through (repeatable, comma-separated; first start only)")
	fs.DurationVar(&cfg.BootstrapWait, "bootstrap-wait", 30*time.Second, "with --bootstrap and --join: how long to wait for the members listed in --join that do not answer before founding the cluster")
	fs.StringVar(&cfg.RestoreFrom, "restore", "", "seed a new single-node cluster from this backup file (empty data dir only)")
	fs.BoolVar(&cfg.RestoreAllowPlaintext, "restore-allow-plaintext", false, "with a backup key: let --restore take a plaintext backup, which nothing authenticates (one you wrote without a key and whose origin you checked)")
	fs.StringVar(&cfg.CertFile, "tls-cert", "", "PEM certificate for Raft and API TLS")
	fs.StringVar(&cfg.KeyFile, "tls-key", "", "PEM private key for --tls-cert")
	fs.StringVar(&cfg.CAFile, "tls-ca", "", "PEM CA bundle that signs every member's certificate")
	fs.IntVar(&cfg.MaxPendingAPIConns, "max-pending-api-conns", server.DefaultMaxPendingAPIConns, "API port connections that have not carried a call that passed authentication (in their TLS handshake, logging in, idle or silent) at once; beyond it the oldest is closed, those that never carried a request first, and one source (IPv4 address, IPv6 /64) holds at most a sixteenth of it")
	fs.IntVar(&cfg.MaxAPIConnsPerAccount, "max-api-conns-per-account", server.DefaultMaxAPIConnsPerAccount, "API port connections one account (but an edge's) may hold once they carried a call that passed authentication; beyond it the account's oldest is closed")
	fs.IntVar(&cfg.MaxAPIConns, "max-api-conns", server.DefaultMaxAPIConns, "API port connections all accounts (but edges') may hold once they carried a call that passed authentication; beyond it the oldest is closed")
	fs.IntVar(&cfg.MaxTrustedAPIConns, "max-trusted-api-conns", server.DefaultMaxTrustedAPIConns, "API port connections of edges and other control nodes; beyond it the oldest is closed, and one source (IPv4 address, IPv6 /64) holds at most a sixteenth of it")
	fs.DurationVar(&cfg.SlowThreshold, "slow-threshold", 100*time.Millisecond, "log Raft applies and reads slower than this")
	fs.DurationVar(&cfg.SlowRPCThreshold, "slow-rpc-threshold", 300*time.Millisecond, "log API calls slower than this")
	fs.DurationVar(shutdown, "shutdown-timeout", 30*time.Second, "how long a graceful shutdown may take")
	fs.StringVar(&cfg.JoinToken, "join-token", "", "admin access token for --join when the cluster has no TLS client certificates (relayctl prints one with: relayctl login ... && relayctl token)")
	fs.DurationVar(&cfg.Auth.AccessTTL, "access-token-ttl", 15*time.Minute, "lifetime of access tokens")
	fs.DurationVar(&cfg.Auth.RefreshTTL, "refresh-token-ttl", 30*24*time.Hour, "lifetime of refresh tokens")
	cfg.Auth.LoginMaxAge = api.DefaultLoginMaxAge
	fs.Func("login-max-age", "longest a login lasts however often its refresh token is refreshed, then log in again; 0: no limit (default 2160h, 90 days)",
		zeroIsNoLimit(&cfg.Auth.LoginMaxAge, time.ParseDuration, "a duration"))
	cfg.Auth.TokensPerMinute = api.DefaultTokensPerMinute
	fs.Func("account-tokens-per-minute", fmt.Sprintf("logins and refreshes one account (not an edge's) may complete on this node in a minute; 0: no limit (default %d)", api.DefaultTokensPerMinute),
		zeroIsNoLimit(&cfg.Auth.TokensPerMinute, strconv.Atoi, "a count"))
	cfg.Auth.MaxSessions = api.DefaultMaxSessions
	fs.Func("account-max-sessions", fmt.Sprintf("sessions (logins not yet ended) one account (not an edge's) may hold; a login past it ends the account's oldest (a logout ends its own session); at most %d; 0: no cap (default %d)", fsm.MaxSessionCap, api.DefaultMaxSessions),
		zeroIsNoLimit(&cfg.Auth.MaxSessions, atMost(fsm.MaxSessionCap), "a count"))
	fs.DurationVar(&cfg.SessionKeyRotateEvery, "session-key-rotate", 24*time.Hour, "rotate the resume-ticket key this often")
	fs.DurationVar(&cfg.SessionKeyGrace, "session-key-grace", 24*time.Hour, "keep accepting tickets of a rotated-out key this long")
	fs.DurationVar(&cfg.SigningKeyRotateEvery, "signing-key-rotate", 30*24*time.Hour, "rotate the access-token signing key this often")
	fs.Func("max-devices-per-user", "devices an account may have, revoked ones included (default 100)", func(v string) error {
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil || n == 0 {
			return fmt.Errorf("want a positive number, got %q", v)
		}
		cfg.Devices.MaxDevicesPerUser = uint32(n)
		return nil
	})
	fs.Uint64Var(&cfg.Mailbox.MaxEntriesPerDevice, "mailbox-max-entries", 1000, "events a device's mailbox keeps at most while it is offline")
	fs.Uint64Var(&cfg.Mailbox.MaxBytesPerDevice, "mailbox-max-bytes", 4<<20, "event bytes a device's mailbox keeps at most")
	fs.Func("mailbox-fetches", fmt.Sprintf("mailbox reads this node serves at once, a quarter of them per edge (default %d); more wait up to 2s, then are refused as busy and the edge reads from another node", api.DefaultMaxFetches), func(v string) error {
		n, err := strconv.ParseUint(v, 10, 16)
		if err != nil || n == 0 {
			return fmt.Errorf("want a number from 1 to 65535, got %q", v)
		}
		cfg.Mailbox.Fetches.Max = int(n)
		return nil
	})
	fs.DurationVar(&cfg.MailboxExpireEvery, "mailbox-expire-every", 10*time.Second, "how often the leader removes expired mailbox entries and empties deleted devices' mailboxes")
	fs.DurationVar(&cfg.Edges.LeaseTTL, "edge-lease-ttl", 30*time.Second, "an edge leaves the member list this long after its last renewal")
	fs.DurationVar(&cfg.Edges.CertTTL, "edge-cert-ttl", 24*time.Hour, "lifetime of the mesh certificates issued to edges")
	fs.StringVar(&cfg.BackupDir, "backup-dir", "", "write a verified backup of the state here on schedule while this node leads (empty: no scheduled backups)")
	fs.DurationVar(&cfg.BackupEvery, "backup-every", time.Hour, "time between two scheduled backups")
	fs.IntVar(&cfg.BackupKeep, "backup-keep", 7, "scheduled backups kept in --backup-dir (older ones are removed)")
	fs.StringVar(backupKeyFile, "backup-key-file", "", "age identity file: encrypt scheduled backups and decrypt --restore with it (or the key itself in RELAY_BACKUP_KEY)")
}

// loadBackupKey reads the backup key from --backup-key-file, or from
// RELAY_BACKUP_KEY (the key itself, for secret stores that hand out
// environment variables); nil when neither is set.
func loadBackupKey(file string, getenv func(string) string) (*backup.Key, error) {
	inline := getenv("RELAY_BACKUP_KEY")
	switch {
	case file != "" && inline != "":
		return nil, errors.New("give the backup key in --backup-key-file or RELAY_BACKUP_KEY, not both")
	case file != "":
		return backup.LoadKey(file)
	case inline != "":
		k, err := backup.ParseKey(inline)
		if err != nil {
			return nil, fmt.Errorf("RELAY_BACKUP_KEY: %w", err)
		}
		return k, nil
	}
	return nil, nil
}

func runControl(ctx context.Context, args []string, stderr io.Writer, getenv func(string) string) error {
	fs := flag.NewFlagSet("relayd control", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		cfg      server.Config
		join     flagenv.List
		shutdown time.Duration
		common   commonFlags
		keyFile  string
	)
	controlFlags(fs, &cfg, &join, &shutdown, &keyFile)
	common.register(fs)
	fs.Usage = flagenv.Usage(fs, envPrefix, "relayd control --node-id ID --data-dir DIR [--bootstrap | --join ADDR] [flags]")
	if err := flagenv.Parse(fs, envPrefix, args, getenv); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	cfg.Join = join
	if cfg.Auth.AccessTTL <= minAccessTTL {
		// Clients take a token with a minute or less left for expired
		// (edges, relayctl): one shorter than this would have every call
		// log in or refresh, a Raft write each.
		return fmt.Errorf("--access-token-ttl %s: must be longer than %s", cfg.Auth.AccessTTL, minAccessTTL)
	}
	// Secrets come from the environment only, never from flags (which
	// other users of the machine can read in the process list).
	cfg.AdminPassword = getenv("RELAY_ADMIN_PASSWORD")
	if err := checkFirstAdminPassword(cfg); err != nil {
		return err
	}
	key, err := loadBackupKey(keyFile, getenv)
	if err != nil {
		return err
	}
	cfg.BackupKey = key
	log, err := common.logger(stderr)
	if err != nil {
		return err
	}
	applyMemoryLimit(log, getenv)
	cfg.Logger = log
	tel, stop, err := common.startTracing(ctx, "relay-control", cfg.NodeID)
	if err != nil {
		return err
	}
	defer stop()
	cfg.TracerProvider = tel.TracerProvider()
	err = server.Run(ctx, cfg, shutdown)
	switch {
	case errors.Is(err, backup.ErrKeyRequired):
		return fmt.Errorf("%w; give its key with --backup-key-file or RELAY_BACKUP_KEY", err)
	case errors.Is(err, backup.ErrPlaintext):
		return fmt.Errorf("%w; if you wrote this file yourself without a key (relayd export-state, relayctl backup) and checked it is that file, restore it with --restore-allow-plaintext (RELAY_RESTORE_ALLOW_PLAINTEXT)", err)
	}
	return err
}

// memoryLimitRatio is the share of its cgroup's memory limit relayd
// lets the Go runtime use before its garbage collector works harder
// (debug.SetMemoryLimit); the rest is for what the cgroup charges and
// the runtime does not count: the kernel's socket buffers and page
// cache (Pebble's files), and the binary's own pages.
const memoryLimitRatio = 0.9

// applyMemoryLimit gives the runtime a soft memory limit below the
// cgroup's (a pod's limits.memory, a unit's MemoryMax) unless GOMEMLIMIT
// is set, and says what it did.
func applyMemoryLimit(log *slog.Logger, getenv func(string) string) {
	set, cgroup, err := memlimit.Set(getenv, memoryLimitRatio)
	switch {
	case err != nil:
		log.Warn("no soft memory limit: cannot read the cgroup's memory limit", "err", err)
	case set > 0:
		log.Info("soft memory limit set below the cgroup's", "limit_bytes", set, "cgroup_limit_bytes", cgroup)
	}
}

// minAccessTTL is the shortest access-token lifetime a node takes.
const minAccessTTL = 2 * time.Minute

// checkFirstAdminPassword refuses a first admin's password that every
// later password change would refuse (auth.ValidatePassword), when it
// is the one the cluster starts with: a node bootstrapping a new cluster
// from a data dir without Raft state (raftnode.HasRaftState; a volume's
// lost+found or other files do not count, nor the empty store of a join
// that did not finish). A node that has run ignores
// RELAY_ADMIN_PASSWORD, so a restart with an old one set goes on.
func checkFirstAdminPassword(cfg server.Config) error {
	if cfg.AdminPassword == "" || !cfg.Bootstrap {
		return nil
	}
	has, err := raftnode.HasRaftState(cfg.DataDir)
	if err != nil {
		return fmt.Errorf("--data-dir: %w", err)
	}
	if has {
		return nil
	}
	if err := auth.ValidatePassword(cfg.AdminPassword); err != nil {
		return fmt.Errorf("RELAY_ADMIN_PASSWORD: %w", err)
	}
	return nil
}
