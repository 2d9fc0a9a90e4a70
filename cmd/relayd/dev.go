package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/raftnode"
	"github.com/edge-relay/relay/control/server"
	"github.com/edge-relay/relay/edge/controlconn"
	edgeserver "github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/edge/session"
	"github.com/edge-relay/relay/internal/flagenv"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

func runDev(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	fs := flag.NewFlagSet("relayd dev", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		dataDir, apiAddr, raftAddr, adminAddr string
		edgeAddr, edgeAdminAddr               string
		edgeSession                           session.Config
		common                                commonFlags
	)
	fs.StringVar(&dataDir, "data-dir", "./data", "where the deployment keeps its state")
	fs.StringVar(&apiAddr, "api-addr", "127.0.0.1:7400", "control API address")
	fs.StringVar(&raftAddr, "raft-addr", "127.0.0.1:7401", "Raft address")
	fs.StringVar(&adminAddr, "admin-addr", "127.0.0.1:7402", "control node's metrics, health and /debug/pprof/ address")
	fs.StringVar(&edgeAddr, "edge-addr", "127.0.0.1:7443", "edge address: UDP for QUIC and WebTransport, TCP for HTTPS")
	fs.StringVar(&edgeAdminAddr, "edge-admin-addr", "127.0.0.1:7444", "edge's plain-HTTP metrics, health, certificate hashes, console and /debug/pprof/")
	edgeSession.Limits = session.DefaultLimits()
	fs.Float64Var(&edgeSession.HandshakesPerSecond, "edge-handshakes-per-second", 20, "new sessions per second per client IPv4 address or IPv6 /64 (raise for load tests)")
	fs.IntVar(&edgeSession.Limits.EventsPerSecond, "edge-events-per-second", edgeSession.Limits.EventsPerSecond, "events per second per device")
	common.register(fs)
	fs.Usage = flagenv.Usage(fs, envPrefix, "relayd dev [flags]")
	if err := flagenv.Parse(fs, envPrefix, args, getenv); err != nil {
		return err
	}
	log, err := common.logger(stderr)
	if err != nil {
		return err
	}
	applyMemoryLimit(log, getenv)
	password, pwNote, pwSource, err := devAdminPassword(dataDir, getenv("RELAY_ADMIN_PASSWORD"))
	if err != nil {
		return err
	}
	_, statErr := os.Stat(filepath.Join(dataDir, "control"))
	fresh := errors.Is(statErr, os.ErrNotExist)
	certFile, keyFile, certUntil, certReused, err := devEdgeCert(dataDir, time.Now())
	if err != nil {
		return err
	}
	edgePassword, err := devSecret(filepath.Join(dataDir, "edge-password"))
	if err != nil {
		return err
	}
	tel, stop, err := common.startTracing(ctx, "relay-dev", "dev")
	if err != nil {
		return err
	}
	defer stop()
	cfg := server.Config{
		NodeID: "dev", DataDir: filepath.Join(dataDir, "control"),
		RaftAddr: raftAddr, APIAddr: apiAddr, AdminAddr: adminAddr,
		Bootstrap: true, Logger: log.With("part", "control"), AdminPassword: password, AdminPasswordSource: pwSource,
		TracerProvider: tel.TracerProvider(),
		// One voter and no peer to miss: its election at every start
		// need not wait hashicorp/raft's one to two seconds of silence
		// first (the first writes waited for it, and were logged slow).
		// A dev data dir is a single node's: with a second voter a 100 ms
		// lease would have the leader step down at any pause of its peer.
		Raft: raftnode.Tuning{HeartbeatTimeout: 100 * time.Millisecond, ElectionTimeout: 100 * time.Millisecond, LeaderLeaseTimeout: 100 * time.Millisecond},
	}
	s, err := server.Start(ctx, cfg)
	if err != nil {
		return err
	}
	stopControl := func() error {
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		return s.Shutdown(sctx)
	}
	// Wait for the single node to elect itself and create the first
	// admin, then give the edge its account (once: a restart finds it).
	initialized := func() bool { ok, _ := s.Node().FSM().Initialized(); return ok }
	if !waitUntil(ctx, func() bool { return s.Node().Ready() && initialized() }) {
		return stopControl()
	}
	if err := ensureEdgeAccount(ctx, s.APIURL(), password, edgePassword); err != nil {
		return errors.Join(err, stopControl())
	}
	e, err := edgeserver.Start(ctx, edgeserver.Config{
		EdgeID: "dev-edge", Addr: edgeAddr, AdminAddr: edgeAdminAddr, CertFile: certFile, KeyFile: keyFile,
		Control: controlconn.Config{URLs: []string{s.APIURL()}, Login: devEdgeLogin, Password: edgePassword},
		Session: edgeSession,
		Logger:  log.With("part", "edge"), TracerProvider: common.edgeTracing(tel),
	})
	if err != nil {
		return errors.Join(fmt.Errorf("start the edge: %w", err), stopControl())
	}
	if !waitUntil(ctx, e.Ready) {
		return errors.Join(e.Shutdown(context.Background()), stopControl())
	}
	hash := ""
	if hs := e.CertHashes(); len(hs) > 0 {
		hash = base64.StdEncoding.EncodeToString(hs[0].SHA256[:])
	}
	certNote := "new, kept in " + certFile
	if certReused {
		certNote = "the one kept in " + certFile
	}
	certNote += fmt.Sprintf(" until %s", certUntil.Local().Format(time.DateOnly))
	// relayctl calls http://127.0.0.1:7400 unless told otherwise.
	server := ""
	if s.APIURL() != "http://127.0.0.1:7400" {
		server = "\n  export RELAYCTL_SERVER=" + s.APIURL() + "   # the control API above, for relayctl\n"
	}
	fmt.Fprintf(stdout, devBanner, devState(s, fresh, dataDir), s.APIURL(), s.AdminAddr(), e.Addr(), e.HTTPSURL(), e.AdminURL(), e.AdminURL(), hash,
		certNote, dataDir, pwNote, server, dataDir, e.Addr(), hash, e.Addr(), hash)
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return errors.Join(e.Shutdown(sctx), stopControl())
}

// devEdgeLogin is the account the dev edge logs in with.
const devEdgeLogin = "dev-edge"

// ensureEdgeAccount creates the dev edge's account through the API, as
// an operator would with relayctl, unless it exists.
func ensureEdgeAccount(ctx context.Context, apiURL, adminPassword, edgePassword string) error {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	hc := &http.Client{Transport: &http.Transport{Protocols: &p}}
	defer hc.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	login, err := controlv1connect.NewAuthServiceClient(hc, apiURL).Login(ctx,
		connect.NewRequest(&controlv1.LoginRequest{Login: "admin", Password: adminPassword}))
	if err != nil {
		return fmt.Errorf("log in as admin to create the edge's account: %w", err)
	}
	req := connect.NewRequest(&controlv1.CreateUserRequest{Login: devEdgeLogin, DisplayName: "dev edge", Password: edgePassword, Role: controlv1.Role_ROLE_EDGE})
	req.Header().Set("Authorization", "Bearer "+login.Msg.GetTokens().GetAccessToken())
	_, err = controlv1connect.NewUserServiceClient(hc, apiURL).CreateUser(ctx, req)
	if err != nil && connect.CodeOf(err) != connect.CodeAlreadyExists {
		return fmt.Errorf("create the edge's account: %w", err)
	}
	return nil
}

const devBanner = `
relayd dev is running: a control node and an edge on this machine.
%s
  control API     %s   (Connect / gRPC / JSON)
  control health  http://%s/readyz
  edge (devices)  %s   (UDP: QUIC relay/1 and WebTransport)
  edge HTTPS      %s
  edge admin      %s/metrics
  device console  %s/   (open it in a browser; sign in as a user)
  edge cert hash  %s   (self-signed, %s;
                  clients pin the hash, which a restart keeps)
  data            %s   (delete it to start from scratch)
  admin login     admin, password %s

Try it from another terminal:
%s
  bin/relayctl login --password-stdin admin < %s/admin-password
  bin/relayctl user create --login alice --no-password
  bin/relayctl device register --user <alice's id> --name phone --generate-key phone.key
  bin/relayctl device register --user <alice's id> --name laptop --generate-key laptop.key

In a browser, open the device console above, sign in as a user with a
password (bin/relayctl user create --login bob, which asks for one) and
press "Register this browser as a device": the tab becomes one of its
devices and talks to the others.

Then connect the two devices through the edge, each in its own terminal:

  bin/relayctl relay listen --edge %s --cert-hash %s \
      --user <alice's id> --device <laptop's id> --key laptop.key
  bin/relayctl relay send --edge %s --cert-hash %s \
      --user <alice's id> --device <phone's id> --key phone.key hello

Stop with Ctrl-C.
`

// waitUntil polls cond every 20 ms until it holds (true) or ctx ends
// (false).
func waitUntil(ctx context.Context, cond func() bool) bool {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			return false
		case <-tick.C:
		}
	}
	return true
}

// devSecret returns the secret saved at path, or a new random one saved
// there (mode 0600).
func devSecret(path string) (string, error) {
	if b, err := os.ReadFile(path); err == nil {
		return strings.TrimSpace(string(b)), nil
	}
	var raw [18]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return "", err
	}
	pw := base64.RawURLEncoding.EncodeToString(raw[:])
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return "", fmt.Errorf("create %s: %w", filepath.Dir(path), err)
	}
	if err := os.WriteFile(path, []byte(pw+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("save %s: %w", path, err)
	}
	return pw, nil
}

// devAdminPassword returns the admin password of the dev deployment: the
// one in RELAY_ADMIN_PASSWORD, else the one saved in DATA/admin-password
// by an earlier run, else a new random one saved there (mode 0600) so the
// next run can tell it again. note is for the banner, source for the
// control node's first-start log line.
func devAdminPassword(dataDir, fromEnv string) (password, note, source string, err error) {
	path := filepath.Join(dataDir, "admin-password")
	if fromEnv != "" {
		if err := os.MkdirAll(dataDir, 0o700); err != nil {
			return "", "", "", err
		}
		if err := os.WriteFile(path, []byte(fromEnv+"\n"), 0o600); err != nil {
			return "", "", "", err
		}
		return fromEnv, "from RELAY_ADMIN_PASSWORD", "given in RELAY_ADMIN_PASSWORD (saved in " + path + ")", nil
	}
	_, statErr := os.Stat(path)
	pw, err := devSecret(path)
	if err != nil {
		return "", "", "", fmt.Errorf("admin password: %w", err)
	}
	if statErr == nil {
		return pw, "in " + path, "saved in " + path + " by an earlier run of relayd dev", nil
	}
	return pw, pw + " (saved in " + path + ")", "generated by relayd dev and saved in " + path, nil
}

// devState is the banner's line about the state the control node started
// from: new, or what it loaded from the data dir.
func devState(s *server.Server, fresh bool, dataDir string) string {
	if fresh {
		return "It started from an empty data dir (" + dataDir + ").\n"
	}
	f := s.Node().FSM()
	v, err := f.View()
	if err != nil {
		return ""
	}
	defer v.Close()
	users, devices := 0, 0
	_ = v.EachUser(func(*statev1.User) error { users++; return nil })
	_ = v.EachDevice(func(*statev1.Device) error { devices++; return nil })
	return fmt.Sprintf("It loaded the state kept in %s: %d accounts, %d devices, applied index %d.\n",
		dataDir, users, devices, v.AppliedIndex())
}
