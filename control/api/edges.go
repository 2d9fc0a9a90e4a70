package api

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// CAValidity is the lifetime of the cluster CA's certificate. The CA is
// never replaced (every mesh certificate chains to it), so it is long.
const CAValidity = 10 * 365 * 24 * time.Hour

// MeshURIScheme is the scheme of a mesh certificate's URI SAN:
// relay-edge://<edge id>.
const MeshURIScheme = "relay-edge"

// errNoCA: the cluster CA was not created yet (a new cluster's leader
// creates it right after initializing).
var errNoCA = errors.New("the cluster CA was not created yet; retry shortly")

// EdgeConfig tunes EdgeService.
type EdgeConfig struct {
	// LeaseTTL is how long a registration lasts without renewal. Default
	// 30s. Edges are told to renew after a third of it.
	LeaseTTL time.Duration
	// CertTTL is a mesh certificate's lifetime (never beyond the CA's).
	// Default 24h.
	CertTTL time.Duration
	// Now is the clock; default time.Now.
	Now func() time.Time
}

func (c *EdgeConfig) applyDefaults() {
	if c.LeaseTTL <= 0 {
		c.LeaseTTL = 30 * time.Second
	}
	if c.CertTTL <= 0 {
		c.CertTTL = 24 * time.Hour
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

// EdgeServer serves EdgeService: edge registration under a lease, and
// mesh certificates from the cluster CA.
type EdgeServer struct {
	node *raftnode.Node
	cfg  EdgeConfig
	ca   atomic.Pointer[parsedCA] // once found: it never changes
}

// parsedCA is the cluster CA with its certificate parsed.
type parsedCA struct {
	ca   *statev1.ClusterCA
	cert *x509.Certificate
}

var _ edgev1connect.EdgeServiceHandler = (*EdgeServer)(nil)

// NewEdgeServer returns the EdgeService handler.
func NewEdgeServer(node *raftnode.Node, cfg EdgeConfig) *EdgeServer {
	cfg.applyDefaults()
	return &EdgeServer{node: node, cfg: cfg}
}

// ValidateHostPort checks a host:port address: a non-empty host and a
// numeric port from 1 to 65535, at most fsm.MaxAddrLen bytes.
func ValidateHostPort(field, addr string) error {
	if err := fsm.ValidateText(field, addr, fsm.MaxAddrLen, true); err != nil {
		return err
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%s %q is not host:port: %v", field, addr, err)
	}
	if host == "" {
		return fmt.Errorf("%s %q has no host", field, addr)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("%s %q has no port from 1 to 65535", field, addr)
	}
	return nil
}

// validEdgeID checks an edge id: fsm's id rules, and no empty
// dot-separated label, since the id is the host of the certificate's URI
// SAN (x509 refuses "a..b" there).
func validEdgeID(id string) error {
	if err := fsm.ValidateID("edge_id", id); err != nil {
		return err
	}
	for _, label := range strings.Split(id, ".") {
		if label == "" {
			return fmt.Errorf("edge_id %q has an empty label between dots (or one at either end)", id)
		}
	}
	return nil
}

// RegisterEdge registers or renews an edge and issues its mesh
// certificate.
func (s *EdgeServer) RegisterEdge(ctx context.Context, req *connect.Request[edgev1.RegisterEdgeRequest]) (*connect.Response[edgev1.RegisterEdgeResponse], error) {
	m := req.Msg
	if err := validEdgeID(m.GetEdgeId()); err != nil {
		return nil, invalidArg(err)
	}
	if err := ValidateHostPort("mesh_addr", m.GetMeshAddr()); err != nil {
		return nil, invalidArg(err)
	}
	if len(m.GetDeviceAddrs()) > fsm.MaxEdgeAddrs {
		return nil, invalidArg(fmt.Errorf("device_addrs has %d entries, at most %d", len(m.GetDeviceAddrs()), fsm.MaxEdgeAddrs))
	}
	for i, a := range m.GetDeviceAddrs() {
		if err := ValidateHostPort(fmt.Sprintf("device_addrs[%d]", i), a); err != nil {
			return nil, invalidArg(err)
		}
	}
	if len(m.GetMeshPublicKey()) != ed25519.PublicKeySize {
		return nil, invalidArg(fmt.Errorf("mesh_public_key is %d bytes; an Ed25519 public key is %d", len(m.GetMeshPublicKey()), ed25519.PublicKeySize))
	}
	// The CA first: an edge that cannot get a certificate is not put on
	// the member list.
	ca, caCert, err := s.clusterCA(ctx)
	if err != nil {
		return nil, toConnect(err)
	}
	now := s.cfg.Now()
	lease := now.Add(s.cfg.LeaseTTL)
	if _, err := s.node.Apply(ctx, &statev1.Command{ProposedAtMs: now.UnixMilli(), Op: &statev1.Command_RegisterEdge{RegisterEdge: &statev1.RegisterEdge{Edge: &statev1.Edge{
		Id: m.GetEdgeId(), Addrs: m.GetDeviceAddrs(), MeshAddr: m.GetMeshAddr(), LeaseExpiresAtMs: lease.UnixMilli(),
		MeshPublicKey: m.GetMeshPublicKey(),
	}}}}); err != nil {
		return nil, toConnect(err)
	}
	cert, err := IssueMeshCertificate(ca, caCert, m.GetEdgeId(), ed25519.PublicKey(m.GetMeshPublicKey()), now, s.cfg.CertTTL)
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&edgev1.RegisterEdgeResponse{
		LeaseExpiresAtMs: lease.UnixMilli(),
		RenewAfterMs:     now.Add(s.cfg.LeaseTTL / 3).UnixMilli(),
		LeaseTtlMs:       s.cfg.LeaseTTL.Milliseconds(),
		MeshCertificate:  cert,
		CaCertificate:    ca.GetCertificate(),
	}), nil
}

// DeregisterEdge removes an edge at once; an edge already gone (its lease
// ran out) is not an error.
func (s *EdgeServer) DeregisterEdge(ctx context.Context, req *connect.Request[edgev1.DeregisterEdgeRequest]) (*connect.Response[edgev1.DeregisterEdgeResponse], error) {
	if err := fsm.ValidateID("edge_id", req.Msg.GetEdgeId()); err != nil {
		return nil, invalidArg(err)
	}
	if n := len(req.Msg.GetMeshPublicKey()); n != 0 && n != ed25519.PublicKeySize {
		return nil, invalidArg(fmt.Errorf("mesh_public_key is %d bytes; an Ed25519 public key is %d", n, ed25519.PublicKeySize))
	}
	_, err := s.node.Apply(ctx, &statev1.Command{Op: &statev1.Command_DeregisterEdge{DeregisterEdge: &statev1.DeregisterEdge{
		Id: req.Msg.GetEdgeId(), MeshPublicKey: req.Msg.GetMeshPublicKey(),
	}}})
	if err != nil && !errors.Is(err, fsm.ErrNotFound) {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&edgev1.DeregisterEdgeResponse{}), nil
}

// clusterCA returns the CA and its parsed certificate. The CA never
// changes once created, so the local replica's copy is good and is
// parsed once; only when it has none yet does the node catch up with
// the leader first.
func (s *EdgeServer) clusterCA(ctx context.Context) (*statev1.ClusterCA, *x509.Certificate, error) {
	if p := s.ca.Load(); p != nil {
		return p.ca, p.cert, nil
	}
	f := s.node.FSM()
	ca, err := f.ClusterCA()
	if errors.Is(err, fsm.ErrNotFound) {
		if err := s.node.Barrier(ctx); err != nil {
			return nil, nil, err
		}
		ca, err = f.ClusterCA()
	}
	if errors.Is(err, fsm.ErrNotFound) {
		return nil, nil, errNoCA
	}
	if err != nil {
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(ca.GetCertificate())
	if err != nil {
		return nil, nil, fmt.Errorf("parse the cluster CA certificate: %w", err)
	}
	s.ca.Store(&parsedCA{ca: ca, cert: cert})
	return ca, cert, nil
}

// NewClusterCA makes the cluster CA: a fresh Ed25519 key and a
// self-signed CA certificate valid from a minute before now for
// validity. The leader calls it; the result travels in a command.
func NewClusterCA(now time.Time, validity time.Duration) (*statev1.ClusterCA, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "relay cluster CA", Organization: []string{"relay"}},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(validity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, priv)
	if err != nil {
		return nil, fmt.Errorf("create the cluster CA certificate: %w", err)
	}
	return &statev1.ClusterCA{PrivateSeed: priv.Seed(), Certificate: der, CreatedAtMs: now.UnixMilli()}, nil
}

// IssueMeshCertificate signs a mesh certificate for an edge's key: subject
// CN and URI SAN relay-edge://<edge id>, for server and client
// authentication, valid from a minute before now for ttl (never beyond the
// CA). It changes no state.
func IssueMeshCertificate(ca *statev1.ClusterCA, caCert *x509.Certificate, edgeID string, pub ed25519.PublicKey, now time.Time, ttl time.Duration) ([]byte, error) {
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	notAfter := now.Add(ttl)
	if notAfter.After(caCert.NotAfter) {
		notAfter = caCert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: edgeID},
		URIs:                  []*url.URL{{Scheme: MeshURIScheme, Host: edgeID}},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, pub, ed25519.NewKeyFromSeed(ca.GetPrivateSeed()))
	if err != nil {
		return nil, fmt.Errorf("issue mesh certificate for %s: %w", edgeID, err)
	}
	return der, nil
}

func randomSerial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}
