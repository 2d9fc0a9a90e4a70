package server

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/clustertest"
)

// A self-signed certificate is renewed before it expires, and the
// previous one's hash stays published while it is valid, so clients that
// pinned it keep connecting during the renewal.
func TestSelfSignedCertificateRenewal(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	// Valid until 2s from now (the validity counts an hour of slack
	// before now), renewed when less than 1s remains.
	s, err := selfSigned(log, time.Hour+2*time.Second, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	first := s.Hashes(time.Now())
	if len(first) != 1 {
		t.Fatalf("hashes: %v", first)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { s.run(ctx) })
	deadline := time.Now().Add(10 * time.Second)
	for {
		hs := s.Hashes(time.Now())
		if len(hs) == 2 && hs[1].SHA256 == first[0].SHA256 && hs[0].SHA256 != first[0].SHA256 {
			c, _ := s.GetCertificate(nil)
			if c.Leaf.Raw == nil || hs[0].NotAfter != c.Leaf.NotAfter {
				t.Fatal("the newest hash is not the served certificate's")
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not renewed: %v", hs)
		}
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	wg.Wait()
	// Expired hashes are not published.
	if hs := s.Hashes(time.Now().Add(time.Minute)); len(hs) != 0 {
		t.Fatalf("published expired hashes: %v", hs)
	}
}

// writePair writes a fresh self-signed certificate and key (PEM) to the
// files, through a rename as cert-manager and certbot replace them.
func writePair(t *testing.T, certFile, keyFile, name string) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	for file, block := range map[string]*pem.Block{certFile: {Type: "CERTIFICATE", Bytes: der}, keyFile: {Type: "EC PRIVATE KEY", Bytes: kder}} {
		if err := os.WriteFile(file+".new", pem.EncodeToMemory(block), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(file+".new", file); err != nil {
			t.Fatal(err)
		}
	}
	return der
}

// A certificate loaded from files is served again once the files change
// (a renewal), without a restart; the previous one's hash stays published
// while it is valid. Files that do not load leave the current certificate
// in place.
func TestCertificateFilesAreReloaded(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	first := writePair(t, certFile, keyFile, "first")
	s, err := staticCert(slog.New(slog.NewTextHandler(io.Discard, nil)), certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	s.reloadEvery = 10 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { s.run(ctx) })
	defer func() { cancel(); wg.Wait() }()
	served := func() []byte {
		c, _ := s.GetCertificate(nil)
		return c.Leaf.Raw
	}
	if !bytes.Equal(served(), first) {
		t.Fatal("the first certificate is not served")
	}

	second := writePair(t, certFile, keyFile, "second")
	clustertest.Eventually(t, 10*time.Second, func() error {
		if !bytes.Equal(served(), second) {
			return errors.New("the renewed certificate is not served")
		}
		return nil
	})
	hs := s.Hashes(time.Now())
	if len(hs) != 2 || hs[0].SHA256 != sha256.Sum256(second) || hs[1].SHA256 != sha256.Sum256(first) {
		t.Fatalf("hashes after the renewal: %v", hs)
	}

	// A key that does not match the certificate: the current pair stays.
	// (Looked at here, with the watcher stopped.)
	cancel()
	wg.Wait()
	if err := os.WriteFile(keyFile, []byte("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if changed, err := s.reload(); changed || err == nil {
		t.Fatalf("a broken key file: changed %v, err %v", changed, err)
	}
	if !bytes.Equal(served(), second) {
		t.Fatal("a broken key file replaced the certificate")
	}
}
