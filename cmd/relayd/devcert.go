package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"time"
)

// The dev edge's self-signed certificate: browsers take one pinned by
// hash only if it is valid for less than 14 days, so it is made for 10
// and replaced at a start that finds less than 3 left (the edge does not
// renew a certificate it was given as files).
const (
	devCertValidity = 10 * 24 * time.Hour
	devCertMinLeft  = 3 * 24 * time.Hour
)

// devEdgeCert returns the files of the dev edge's certificate in
// dataDir: the ones an earlier start made while they have devCertMinLeft
// left, so that a restart keeps the hash clients pinned, else new ones.
// reused says which.
func devEdgeCert(dataDir string, now time.Time) (certFile, keyFile string, notAfter time.Time, reused bool, err error) {
	certFile, keyFile = filepath.Join(dataDir, "edge-cert.pem"), filepath.Join(dataDir, "edge-key.pem")
	// Files that are missing, damaged or nearly expired are replaced.
	if c, err := tls.LoadX509KeyPair(certFile, keyFile); err == nil {
		if leaf, err := x509.ParseCertificate(c.Certificate[0]); err == nil && leaf.NotAfter.Sub(now) >= devCertMinLeft &&
			leaf.NotAfter.Sub(leaf.NotBefore) < 14*24*time.Hour {
			return certFile, keyFile, leaf.NotAfter, true, nil
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", time.Time{}, false, fmt.Errorf("edge certificate key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return "", "", time.Time{}, false, err
	}
	notAfter = now.Add(devCertValidity - time.Hour)
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "relay dev edge (self-signed)"},
		NotBefore:    now.Add(-time.Hour), // a little slack for clocks behind ours
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return "", "", time.Time{}, false, fmt.Errorf("self-sign the edge certificate: %w", err)
	}
	kb, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return "", "", time.Time{}, false, err
	}
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return "", "", time.Time{}, false, err
	}
	if err := writeFileAtomic(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kb})); err != nil {
		return "", "", time.Time{}, false, err
	}
	if err := writeFileAtomic(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})); err != nil {
		return "", "", time.Time{}, false, err
	}
	return certFile, keyFile, notAfter, false, nil
}

// writeFileAtomic writes a file (mode 0600) through a temporary one, so a
// crash leaves the old file or the new, never half of one.
func writeFileAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return os.Rename(tmp, path)
}
