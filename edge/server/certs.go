package server

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"fmt"
	"log/slog"
	"math/big"
	"os"
	"sync"
	"time"
)

// Browsers accept a certificate pinned with serverCertificateHashes only
// when it is valid for less than 14 days; it must be an ECDSA key.
const (
	selfSignedValidity = 10 * 24 * time.Hour
	selfSignedRenew    = 3 * 24 * time.Hour
)

// CertHash is a published certificate hash.
type CertHash struct {
	SHA256   [32]byte
	NotAfter time.Time
}

// certReloadEvery is how often certificate files are read again: a
// renewed certificate (cert-manager rewriting a Secret, certbot a file)
// is served within it, without a restart.
const certReloadEvery = 30 * time.Second

// certSource serves the edge's certificate: loaded from files (and loaded
// again when they change), or self-signed and renewed before it expires,
// with the hashes of the current and the previous certificate published
// so clients pinning either keep working across a renewal.
type certSource struct {
	log      *slog.Logger
	validity time.Duration
	renew    time.Duration
	static   bool
	// Files of a static certificate, the digest of what was last loaded
	// from them, and how often to look at them again.
	certFile, keyFile string
	loaded            [sha256.Size]byte
	reloadEvery       time.Duration

	mu     sync.RWMutex // guards the fields below
	cert   *tls.Certificate
	hashes []CertHash // newest first
}

func staticCert(log *slog.Logger, certFile, keyFile string) (*certSource, error) {
	s := &certSource{log: log, static: true, certFile: certFile, keyFile: keyFile, reloadEvery: certReloadEvery}
	if _, err := s.reload(); err != nil {
		return nil, err
	}
	return s, nil
}

// reload reads the certificate files and serves what they hold if it
// changed (changed false: the same bytes as last time). A pair that does
// not load leaves the current certificate in place.
func (s *certSource) reload() (changed bool, err error) {
	certPEM, err := os.ReadFile(s.certFile)
	if err != nil {
		return false, fmt.Errorf("load certificate: %w", err)
	}
	keyPEM, err := os.ReadFile(s.keyFile)
	if err != nil {
		return false, fmt.Errorf("load certificate key: %w", err)
	}
	h := sha256.New()
	h.Write(certPEM)
	h.Write(keyPEM)
	var digest [sha256.Size]byte
	h.Sum(digest[:0])
	if digest == s.loaded {
		return false, nil
	}
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return false, fmt.Errorf("load certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(c.Certificate[0])
	if err != nil {
		return false, fmt.Errorf("parse certificate: %w", err)
	}
	c.Leaf = leaf
	s.loaded = digest
	s.serve(&c)
	return true, nil
}

// serve makes c the certificate served and publishes its hash, keeping
// the previous one's while it is valid.
func (s *certSource) serve(c *tls.Certificate) {
	h := CertHash{SHA256: sha256.Sum256(c.Leaf.Raw), NotAfter: c.Leaf.NotAfter}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cert = c
	s.hashes = append([]CertHash{h}, s.hashes...)
	if len(s.hashes) > 2 {
		s.hashes = s.hashes[:2]
	}
}

func selfSigned(log *slog.Logger, validity, renew time.Duration) (*certSource, error) {
	s := &certSource{log: log, validity: validity, renew: renew}
	if err := s.rotate(time.Now()); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *certSource) rotate(now time.Time) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("certificate key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "relay edge (self-signed)"},
		// A little slack for clocks behind ours.
		NotBefore:   now.Add(-time.Hour),
		NotAfter:    now.Add(s.validity - time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return fmt.Errorf("self-sign certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return err
	}
	// The previous one stays published until it expires; older ones have.
	s.serve(&tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf})
	// The encoding clients pin with (relayctl --cert-hash, the banner,
	// /.well-known/relay/certificate-hashes).
	h := sha256.Sum256(der)
	s.log.Info("self-signed certificate", "sha256", base64.StdEncoding.EncodeToString(h[:]), "not_after", leaf.NotAfter)
	return nil
}

// GetCertificate is a tls.Config.GetCertificate.
func (s *certSource) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.cert, nil
}

// Hashes are the certificate hashes to publish, newest first, without
// any that expired.
func (s *certSource) Hashes(now time.Time) []CertHash {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]CertHash, 0, len(s.hashes))
	for _, h := range s.hashes {
		if now.Before(h.NotAfter) {
			out = append(out, h)
		}
	}
	return out
}

// run renews a self-signed certificate before it expires, or reloads a
// static one's files when they change, until ctx ends.
func (s *certSource) run(ctx context.Context) {
	if s.static {
		s.watchFiles(ctx)
		return
	}
	var retry time.Time
	for {
		s.mu.RLock()
		due := s.cert.Leaf.NotAfter.Add(-s.renew)
		s.mu.RUnlock()
		if retry.After(due) {
			due = retry
		}
		t := time.NewTimer(time.Until(due))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case now := <-t.C:
			if err := s.rotate(now); err != nil {
				s.log.Error("renew self-signed certificate; retrying in a minute", "err", err)
				retry = now.Add(time.Minute)
			}
		}
	}
}

// watchFiles reloads the certificate files every reloadEvery until ctx
// ends. A pair that does not load (a renewal written halfway, a key that
// does not match) is logged and the current certificate kept; the next
// look tries again.
func (s *certSource) watchFiles(ctx context.Context) {
	t := time.NewTicker(s.reloadEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		changed, err := s.reload()
		switch {
		case err != nil:
			s.log.Warn("certificate files do not load; serving the current certificate", "cert_file", s.certFile, "err", err)
		case changed:
			c, _ := s.GetCertificate(nil)
			s.log.Info("certificate reloaded", "cert_file", s.certFile, "subject", c.Leaf.Subject.String(), "not_after", c.Leaf.NotAfter)
		}
	}
}
