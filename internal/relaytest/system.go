package relaytest

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/server"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

// Ports every relayd process of a System uses on its own host.
const (
	PortAPI       = 7400
	PortRaft      = 7401
	PortAdmin     = 7402
	PortEdge      = 7443
	PortEdgeMesh  = 7445
	PortEdgeAdmin = 7444
)

// SystemAdminPassword is the first admin's password in a System.
const SystemAdminPassword = "system-admin-password"

// SystemOptions shape a System.
type SystemOptions struct {
	// Relayd is the relayd binary (BuildRelayd); required.
	Relayd string
	// ControlNodes [3] and Edges [2] to start (Edges < 0: none).
	ControlNodes, Edges int
	// ControlArgs and EdgeArgs are extra flags for control node i and
	// edge i.
	ControlArgs func(i int) []string
	EdgeArgs    func(i int) []string
}

// System is a relay made of real relayd processes, each control node and
// each edge on a host of its own on Net.
type System struct {
	t       clustertest.TB
	opts    SystemOptions
	Net     *Net
	Control []*ControlNode
	Edges   []*EdgeNode
	// AdminToken is an access token of the first admin (valid for a day).
	AdminToken string
	dialer     *api.Dialer
	plain      *http.Client
	client     *http.Client // the dialer's, noting odd answers

	mu    sync.Mutex // guards the fields below
	procs []*Proc    // every process started, restarts included
	odd   []string   // answers that are not the API's (see Odd)
}

// ControlNode is a `relayd control` process on its host.
type ControlNode struct {
	ID   string
	Host *Host
	Dir  string
	Proc *Proc
	args []string
}

// API is the node's API address.
func (n *ControlNode) API() string { return n.Host.AddrPort(PortAPI) }

// EdgeNode is a `relayd edge` process on its host.
type EdgeNode struct {
	ID   string
	Host *Host
	Proc *Proc
	args []string
	// certFile and keyFile hold the edge's certificate, made once: a
	// restarted edge keeps it, so the devices' pins still hold.
	certFile, keyFile string
}

// Addr is where devices connect.
func (e *EdgeNode) Addr() string { return e.Host.AddrPort(PortEdge) }

// AdminURL is the edge's admin base URL.
func (e *EdgeNode) AdminURL() string { return "http://" + e.Host.AddrPort(PortEdgeAdmin) }

// StartSystem starts a control plane (bootstrapped on node 0, the others
// joined), the edges' account, and the edges, and waits until every
// edge is ready.
func StartSystem(t clustertest.TB, opts SystemOptions) *System {
	t.Helper()
	if opts.ControlNodes == 0 {
		opts.ControlNodes = 3
	}
	if opts.Edges == 0 {
		opts.Edges = 2
	}
	if opts.Edges < 0 {
		opts.Edges = 0
	}
	s := &System{t: t, opts: opts, Net: NewNet(t), dialer: api.NewDialer(nil),
		plain: &http.Client{Timeout: 5 * time.Second}}
	t.Cleanup(s.dialer.Close)
	s.client = &http.Client{Transport: oddNoter{s: s, next: s.dialer.HTTPClient().Transport}}
	base := t.TempDir()
	for i := range opts.ControlNodes {
		id := fmt.Sprintf("n%d", i+1)
		s.Control = append(s.Control, &ControlNode{ID: id, Host: s.Net.Host(id), Dir: filepath.Join(base, id)})
	}
	for i := range opts.Edges {
		id := fmt.Sprintf("e%d", i+1)
		s.Edges = append(s.Edges, &EdgeNode{ID: id, Host: s.Net.Host(id)})
	}
	s.startControl(0, "--bootstrap")
	tok := s.login("admin", SystemAdminPassword)
	s.AdminToken = tok
	for i := 1; i < len(s.Control); i++ {
		s.startControl(i, "--join", s.Control[0].API(), "--join-token", tok)
	}
	clustertest.Eventually(t, 60*time.Second, func() error {
		for _, n := range s.Control {
			st, err := s.Status(n, time.Second)
			if err != nil {
				return err
			}
			if st.GetLeaderId() == "" || len(st.GetMembers()) != len(s.Control) {
				return fmt.Errorf("%s: leader %q, %d members", n.ID, st.GetLeaderId(), len(st.GetMembers()))
			}
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := s.Users(s.Control[0]).CreateUser(ctx, Admin(s, &controlv1.CreateUserRequest{Login: "edges", Password: EdgePassword, Role: controlv1.Role_ROLE_EDGE})); err != nil {
		t.Fatalf("create the edges' account: %v", err)
	}
	for i := range s.Edges {
		s.StartEdge(i)
	}
	return s
}

func (s *System) startControl(i int, first ...string) {
	s.t.Helper()
	n := s.Control[i]
	args := []string{"control", "--node-id", n.ID, "--data-dir", n.Dir,
		"--raft-addr", n.Host.AddrPort(PortRaft), "--api-addr", n.API(), "--admin-addr", n.Host.AddrPort(PortAdmin),
		"--access-token-ttl", "24h", "--log-format", "json"}
	args = append(args, first...)
	if s.opts.ControlArgs != nil {
		args = append(args, s.opts.ControlArgs(i)...)
	}
	n.args = args
	s.runControl(n)
}

func (s *System) runControl(n *ControlNode) {
	s.t.Helper()
	n.Proc = s.track(n.Host.Start(s.t, n.ID, []string{"RELAY_ADMIN_PASSWORD=" + SystemAdminPassword}, s.opts.Relayd, n.args...))
	if _, err := n.Proc.WaitLog("control node serving", 60*time.Second, nil); err != nil {
		s.t.Fatal(err)
	}
}

// RestartControl starts node i again from its data dir (after a kill or
// a stop), without --bootstrap or --join.
func (s *System) RestartControl(i int) {
	s.t.Helper()
	n := s.Control[i]
	n.Proc.Kill()
	var args []string
	for j := 0; j < len(n.args); j++ {
		switch n.args[j] {
		case "--bootstrap":
			continue
		case "--join", "--join-token":
			j++
			continue
		}
		args = append(args, n.args[j])
	}
	n.args = args
	s.runControl(n)
}

// StartEdge starts edge i (again) and waits until it is ready.
func (s *System) StartEdge(i int) {
	s.t.Helper()
	e := s.Edges[i]
	var urls []string
	for _, n := range s.Control {
		urls = append(urls, "http://"+n.API())
	}
	if e.certFile == "" {
		var err error
		if e.certFile, e.keyFile, err = selfSignedFiles(s.t.TempDir(), e.Host.Addr.String()); err != nil {
			s.t.Fatalf("certificate for %s: %v", e.ID, err)
		}
	}
	args := []string{"edge", "--edge-id", e.ID, "--addr", e.Addr(), "--admin-addr", e.Host.AddrPort(PortEdgeAdmin),
		"--tls-cert", e.certFile, "--tls-key", e.keyFile,
		"--mesh-addr", e.Host.AddrPort(PortEdgeMesh), "--edge-login", "edges", "--control", strings.Join(urls, ","),
		"--log-format", "json"}
	if s.opts.EdgeArgs != nil {
		args = append(args, s.opts.EdgeArgs(i)...)
	}
	e.args = args
	if e.Proc != nil {
		e.Proc.Kill()
	}
	e.Proc = s.track(e.Host.Start(s.t, e.ID, []string{"RELAY_EDGE_PASSWORD=" + EdgePassword}, s.opts.Relayd, args...))
	if _, err := e.Proc.WaitLog("edge listening", 60*time.Second, nil); err != nil {
		s.t.Fatal(err)
	}
	clustertest.Eventually(s.t, 60*time.Second, func() error {
		if !s.EdgeReady(e) {
			return fmt.Errorf("edge %s not ready%s", e.ID, e.Proc.LastLogs(3))
		}
		return nil
	})
}

// selfSignedFiles writes a self-signed certificate for host
// (selfSigned) and its key as PEM files in dir.
func selfSignedFiles(dir, host string) (certFile, keyFile string, err error) {
	cert, err := selfSigned(host)
	if err != nil {
		return "", "", err
	}
	kder, err := x509.MarshalECPrivateKey(cert.PrivateKey.(*ecdsa.PrivateKey))
	if err != nil {
		return "", "", err
	}
	certFile, keyFile = filepath.Join(dir, "edge.pem"), filepath.Join(dir, "edge-key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}), 0o644); err != nil {
		return "", "", err
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		return "", "", err
	}
	return certFile, keyFile, nil
}

// selfSigned is a self-signed ECDSA P-256 certificate for host (an IP
// address), valid for 10 days (WebTransport's certificate hashes accept
// less than 14).
func selfSigned(host string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: host},
		NotBefore:    time.Now().Add(-time.Hour), NotAfter: time.Now().Add(10 * 24 * time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.ParseIP(host)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// EdgeReady asks the edge's /readyz.
func (s *System) EdgeReady(e *EdgeNode) bool {
	code, _, err := s.EdgeReadyz(e)
	return err == nil && code == http.StatusOK
}

// EdgeReadyz returns the edge's /readyz status code and body (which says
// why it is not ready).
func (s *System) EdgeReadyz(e *EdgeNode) (int, string, error) {
	resp, err := s.plain.Get(e.AdminURL() + "/readyz")
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	return resp.StatusCode, string(b), err
}

// EdgeMetric sums the samples of a metric on the edge's /metrics (0 when
// there is none).
func (s *System) EdgeMetric(e *EdgeNode, name string) (float64, error) {
	resp, err := s.plain.Get(e.AdminURL() + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	total := 0.0
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(line, name+" ") && !strings.HasPrefix(line, name+"{") {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			return 0, fmt.Errorf("metric line %q: %w", line, err)
		}
		total += v
	}
	return total, nil
}

// CertHashes are the SHA-256 hashes of the edge's certificates.
func (s *System) CertHashes(e *EdgeNode) [][]byte {
	s.t.Helper()
	resp, err := s.plain.Get(e.AdminURL() + server.CertHashesPath)
	if err != nil {
		s.t.Fatalf("certificate hashes of %s: %v", e.ID, err)
	}
	defer resp.Body.Close()
	var doc server.CertHashesDoc
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		s.t.Fatalf("certificate hashes of %s: %v", e.ID, err)
	}
	var out [][]byte
	for _, h := range doc.Hashes {
		b, err := base64.StdEncoding.DecodeString(h.Value)
		if err != nil {
			s.t.Fatal(err)
		}
		out = append(out, b)
	}
	return out
}

// login logs in through node 0, retrying until the API answers.
func (s *System) login(user, password string) string {
	s.t.Helper()
	var tok string
	clustertest.Eventually(s.t, 60*time.Second, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		resp, err := controlv1connect.NewAuthServiceClient(s.dialer.HTTPClient(), s.dialer.URL(s.Control[0].API())).
			Login(ctx, connect.NewRequest(&controlv1.LoginRequest{Login: user, Password: password}))
		if err != nil {
			return err
		}
		tok = resp.Msg.GetTokens().GetAccessToken()
		return nil
	})
	return tok
}

// HTTPClient is the client the System's Connect clients use.
func (s *System) HTTPClient() *http.Client { return s.client }

// oddNoter notes every answer with HTTP status 404 that does not carry
// a Connect error (the API's NotFound does): a bare or cut 404 is
// reported by connect-go as Unimplemented, and the chaos runs found one
// whose body a killed node never finished sending.
type oddNoter struct {
	s    *System
	next http.RoundTripper
}

func (o oddNoter) RoundTrip(req *http.Request) (*http.Response, error) {
	start := time.Now()
	resp, err := o.next.RoundTrip(req)
	if err != nil || resp.StatusCode != http.StatusNotFound {
		return resp, err
	}
	body, rerr := io.ReadAll(io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	resp.Body = io.NopCloser(bytes.NewReader(body))
	var connectErr struct {
		Code string `json:"code"`
	}
	if rerr == nil && json.Unmarshal(body, &connectErr) == nil && connectErr.Code != "" {
		return resp, nil // the API's NotFound
	}
	o.s.mu.Lock()
	o.s.odd = append(o.s.odd, fmt.Sprintf("%s %s %s at %s (took %v): %s %s, headers %v, body %q (read: %v)",
		req.Method, req.Host, req.URL.Path, start.Format(time.RFC3339Nano), time.Since(start), resp.Proto, resp.Status, resp.Header, body, rerr))
	o.s.mu.Unlock()
	return resp, nil
}

// Odd returns the answers that did not come from the API (see oddNoter).
func (s *System) Odd() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.odd...)
}

// DumpLogs writes every process's log (each start of each node) into
// dir, for a failed run's report.
func (s *System) DumpLogs(dir string) error {
	s.mu.Lock()
	procs := append([]*Proc(nil), s.procs...)
	s.mu.Unlock()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	seen := map[string]int{}
	for _, p := range procs {
		seen[p.Name]++
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("%s.%d.log", p.Name, seen[p.Name])), p.AllLogs(), 0o644); err != nil {
			return err
		}
	}
	return nil
}

func (s *System) track(p *Proc) *Proc {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.procs = append(s.procs, p)
	return p
}

// URL is the API base URL of a node.
func (s *System) URL(n *ControlNode) string { return s.dialer.URL(n.API()) }

// Users is a UserService client of node n.
func (s *System) Users(n *ControlNode) controlv1connect.UserServiceClient {
	return controlv1connect.NewUserServiceClient(s.client, s.URL(n))
}

// Devices is a DeviceService client of node n.
func (s *System) Devices(n *ControlNode) controlv1connect.DeviceServiceClient {
	return controlv1connect.NewDeviceServiceClient(s.client, s.URL(n))
}

func authorize[T any](m *T, token string) *connect.Request[T] {
	req := connect.NewRequest(m)
	req.Header().Set("Authorization", "Bearer "+token)
	return req
}

// Admin wraps a message in a request that carries the admin's token.
func Admin[T any](s *System, m *T) *connect.Request[T] { return authorize(m, s.AdminToken) }

// Status asks node n for its view of the cluster.
func (s *System) Status(n *ControlNode, within time.Duration) (*controlv1.StatusResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	resp, err := s.dialer.Cluster(n.API()).Status(ctx, Admin(s, &controlv1.StatusRequest{}))
	if err != nil {
		return nil, fmt.Errorf("status of %s: %w", n.ID, err)
	}
	return resp.Msg, nil
}

// Leader waits until a majority of the running nodes agree on a leader
// and returns it.
func (s *System) Leader(within time.Duration) *ControlNode {
	s.t.Helper()
	var leader *ControlNode
	clustertest.Eventually(s.t, within, func() error {
		votes := map[string]int{}
		for _, n := range s.Control {
			if n.Proc.Exited() || n.Proc.Paused() {
				continue
			}
			if st, err := s.Status(n, time.Second); err == nil && st.GetLeaderId() != "" {
				votes[st.GetLeaderId()]++
			}
		}
		for id, v := range votes {
			if v > len(s.Control)/2 {
				for _, n := range s.Control {
					if n.ID == id {
						leader = n
						return nil
					}
				}
			}
		}
		return fmt.Errorf("no leader a majority agrees on: %v", votes)
	})
	return leader
}

// SystemDevice is a registered device with its key.
type SystemDevice struct {
	ID, UserID string
	Key        ed25519.PrivateKey
}

// User creates an account through node 0 and returns its id.
func (s *System) User(login string) string {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := s.Users(s.Control[0]).CreateUser(ctx, Admin(s, &controlv1.CreateUserRequest{Login: login}))
	if err != nil {
		s.t.Fatalf("create user %s: %v", login, err)
	}
	return resp.Msg.GetUser().GetId()
}

// Device registers a device through node 0.
func (s *System) Device(userID, name string) SystemDevice {
	s.t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		s.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := s.Devices(s.Control[0]).RegisterDevice(ctx, Admin(s, &controlv1.RegisterDeviceRequest{UserId: userID, Name: name, PublicKey: pub}))
	if err != nil {
		s.t.Fatalf("register device %s: %v", name, err)
	}
	return SystemDevice{ID: resp.Msg.GetDevice().GetId(), UserID: userID, Key: priv}
}

// ClientConfig is a client configuration for a device on edge i, with
// the other edges to move to, pinning every edge's certificate.
func (s *System) ClientConfig(i int, d SystemDevice) client.Config {
	s.t.Helper()
	var pins [][]byte
	var others []string
	for j, e := range s.Edges {
		pins = append(pins, s.CertHashes(e)...)
		if j != i {
			others = append(others, e.Addr())
		}
	}
	return client.Config{
		Addr: s.Edges[i].Addr(), OtherAddrs: others, UserID: d.UserID, DeviceID: d.ID, Key: d.Key, CertHashes: pins,
		ReconnectMin: 50 * time.Millisecond, ReconnectMax: time.Second,
	}
}
