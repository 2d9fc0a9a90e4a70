package mesh

import (
	"crypto/ed25519"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"sync"
	"time"
)

// ALPN is the mesh's first application protocol; ALPNStatus adds the
// MeshStatus frame (proto/edge/v1/mesh.proto). Both ends offer both, the
// newer first, so edges of either version mesh during a rolling upgrade.
const (
	ALPN       = "relay-mesh/1"
	ALPNStatus = "relay-mesh/2"
)

// alpns returns the protocols offered, preferred first.
func alpns() []string { return []string{ALPNStatus, ALPN} }

// URIScheme names an edge in its mesh certificate: relay-edge://<id>.
const URIScheme = "relay-edge"

// Identity is an edge's mesh credentials: its certificate from the
// cluster CA (renewed with each registration) and the CA as the only
// trust root. It is safe for concurrent use.
type Identity struct {
	key ed25519.PrivateKey

	mu    sync.RWMutex // guards the fields below
	cert  *tls.Certificate
	ca    *x509.Certificate
	roots *x509.CertPool
}

// NewIdentity returns an identity for a key; Set gives it a certificate.
func NewIdentity(key ed25519.PrivateKey) *Identity { return &Identity{key: key} }

// PublicKey is what the control plane certifies.
func (i *Identity) PublicKey() ed25519.PublicKey { return i.key.Public().(ed25519.PublicKey) }

// Set installs a certificate (DER) for the identity's key and the CA
// certificate (DER) it chains to.
func (i *Identity) Set(certDER, caDER []byte) error {
	leaf, err := x509.ParseCertificate(certDER)
	if err != nil {
		return fmt.Errorf("mesh certificate: %w", err)
	}
	pub, ok := leaf.PublicKey.(ed25519.PublicKey)
	if !ok || !pub.Equal(i.PublicKey()) {
		return errors.New("mesh certificate is not for this edge's key")
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return fmt.Errorf("cluster CA certificate: %w", err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}); err != nil {
		return fmt.Errorf("mesh certificate does not chain to the cluster CA: %w", err)
	}
	i.mu.Lock()
	i.cert = &tls.Certificate{Certificate: [][]byte{certDER}, PrivateKey: i.key, Leaf: leaf}
	i.ca = ca
	i.roots = roots
	i.mu.Unlock()
	return nil
}

// Ready reports whether the identity has a certificate.
func (i *Identity) Ready() bool {
	i.mu.RLock()
	defer i.mu.RUnlock()
	return i.cert != nil
}

func (i *Identity) current() (*tls.Certificate, *x509.CertPool, error) {
	i.mu.RLock()
	defer i.mu.RUnlock()
	if i.cert == nil {
		return nil, nil, errors.New("no mesh certificate yet")
	}
	return i.cert, i.roots, nil
}

// EdgeIDOf returns the edge id a mesh certificate names.
func EdgeIDOf(cert *x509.Certificate) (string, error) {
	for _, u := range cert.URIs {
		if u.Scheme == URIScheme && u.Host != "" {
			return u.Host, nil
		}
	}
	return "", errors.New("certificate names no edge")
}

// EdgeURI is the URI SAN naming an edge.
func EdgeURI(id string) *url.URL { return &url.URL{Scheme: URIScheme, Host: id} }

// verifyPeer checks a peer's certificate chain against the cluster CA
// for the given usage and returns its leaf.
func (i *Identity) verifyPeer(raw [][]byte, usage x509.ExtKeyUsage) (*x509.Certificate, error) {
	_, roots, err := i.current()
	if err != nil {
		return nil, err
	}
	if len(raw) == 0 {
		return nil, errors.New("peer sent no certificate")
	}
	leaf, err := x509.ParseCertificate(raw[0])
	if err != nil {
		return nil, fmt.Errorf("peer certificate: %w", err)
	}
	inter := x509.NewCertPool()
	for _, r := range raw[1:] {
		if c, err := x509.ParseCertificate(r); err == nil {
			inter.AddCert(c)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}, CurrentTime: time.Now()}); err != nil {
		return nil, fmt.Errorf("peer certificate not from the cluster CA: %w", err)
	}
	return leaf, nil
}

// serverTLS is the listener's configuration: only clients with a
// certificate from the cluster CA get in.
func (i *Identity) serverTLS() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: alpns(),
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			c, _, err := i.current()
			return c, err
		},
		ClientAuth: tls.RequireAnyClientCert,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			leaf, err := i.verifyPeer(raw, x509.ExtKeyUsageClientAuth)
			if err == nil {
				_, err = EdgeIDOf(leaf)
			}
			return err
		},
	}
}

// clientTLS is the configuration for dialing peer: its certificate must
// come from the cluster CA, name peer, and be for key unless key is nil.
func (i *Identity) clientTLS(peer string, key ed25519.PublicKey) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: alpns(),
		// Verified below against the cluster CA and the peer's edge id;
		// host names play no part in the mesh.
		InsecureSkipVerify: true, //nolint:gosec // verified in VerifyPeerCertificate
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			c, _, err := i.current()
			return c, err
		},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			leaf, err := i.verifyPeer(raw, x509.ExtKeyUsageServerAuth)
			if err != nil {
				return err
			}
			id, err := EdgeIDOf(leaf)
			if err != nil {
				return err
			}
			if id != peer {
				return fmt.Errorf("peer is %q, want %q", id, peer)
			}
			if key != nil && !key.Equal(leaf.PublicKey) {
				return fmt.Errorf("peer %q presents a certificate for a key other than the one registered for it", peer)
			}
			return nil
		},
	}
}
