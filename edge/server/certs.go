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

// certSource serves the edge's certificate: loaded from files, or
// self-signed and renewed before it expires, with the hashes of the
// current and the previous certificate published so clients pinning
// either keep working across a renewal.
type certSource struct {
	log      *slog.Logger
	validity time.Duration
	renew    time.Duration
	static   bool

	mu     sync.RWMutex // guards the fields below
	cert   *tls.Certificate
	hashes []CertHash // newest first
}

func staticCert(certFile, keyFile string) (*certSource, error) {
	c, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("load certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(c.Certificate[0])
	if err != nil {
		return nil, fmt.Errorf("parse certificate: %w", err)
	}
	c.Leaf = leaf
	return &certSource{static: true, cert: &c, hashes: []CertHash{{SHA256: sha256.Sum256(leaf.Raw), NotAfter: leaf.NotAfter}}}, nil
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
	h := CertHash{SHA256: sha256.Sum256(der), NotAfter: leaf.NotAfter}
	s.mu.Lock()
	s.cert = &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
	s.hashes = append([]CertHash{h}, s.hashes...)
	// Keep the previous one until it expires; older ones have.
	if len(s.hashes) > 2 {
		s.hashes = s.hashes[:2]
	}
	s.mu.Unlock()
	// The encoding clients pin with (relayctl --cert-hash, the banner,
	// /.well-known/relay/certificate-hashes).
	s.log.Info("self-signed certificate", "sha256", base64.StdEncoding.EncodeToString(h.SHA256[:]), "not_after", leaf.NotAfter)
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

// run renews a self-signed certificate before it expires, until ctx
// ends.
func (s *certSource) run(ctx context.Context) {
	if s.static {
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
