package fsm

import (
	"bytes"
	"crypto/ed25519"
	"crypto/x509"
	"errors"

	"google.golang.org/protobuf/proto"

	statev1 "github.com/edge-relay/relay/proto/state/v1"
	"github.com/edge-relay/relay/storage/state"
)

// MaxCACertBytes bounds the cluster CA's certificate.
const MaxCACertBytes = 16 << 10

// validClusterCA checks a CA record: an Ed25519 seed and a CA certificate
// for that seed's public key. Parsing the certificate is a pure function
// of its bytes, so every replica decides the same.
func validClusterCA(field string, ca *statev1.ClusterCA) error {
	if ca == nil {
		return invalid("%s is missing", field)
	}
	if len(ca.GetPrivateSeed()) != ed25519.SeedSize {
		return invalid("%s.private_seed is %d bytes, want %d", field, len(ca.GetPrivateSeed()), ed25519.SeedSize)
	}
	if n := len(ca.GetCertificate()); n == 0 || n > MaxCACertBytes {
		return invalid("%s.certificate is %d bytes, want 1 to %d", field, n, MaxCACertBytes)
	}
	cert, err := x509.ParseCertificate(ca.GetCertificate())
	if err != nil {
		return invalid("%s.certificate: %v", field, err)
	}
	if !cert.IsCA || !cert.BasicConstraintsValid {
		return invalid("%s.certificate is not a CA certificate", field)
	}
	pub, ok := cert.PublicKey.(ed25519.PublicKey)
	want := ed25519.NewKeyFromSeed(ca.GetPrivateSeed()).Public().(ed25519.PublicKey)
	if !ok || !bytes.Equal(pub, want) {
		return invalid("%s.certificate is not for the key of %s.private_seed", field, field)
	}
	return nil
}

// hasClusterCA reports whether the CA was created.
func (t *txn) hasClusterCA() (bool, error) {
	_, err := t.b.Get(keyClusterCA)
	if errors.Is(err, state.ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}

// storeClusterCA writes a validated CA.
func (t *txn) storeClusterCA(ca *statev1.ClusterCA) error {
	ca = proto.Clone(ca).(*statev1.ClusterCA)
	if ca.CreatedAtMs == 0 {
		ca.CreatedAtMs = t.now
	}
	return t.put(keyClusterCA, ca)
}

func (t *txn) setClusterCA(op *statev1.SetClusterCA) (*statev1.Result, error) {
	if err := validClusterCA("ca", op.GetCa()); err != nil {
		return nil, err
	}
	if has, err := t.hasClusterCA(); err != nil {
		return nil, err
	} else if has {
		// Created already (by InitCluster or an earlier leader): the CA is
		// never replaced, since every mesh certificate chains to it.
		return &statev1.Result{}, nil
	}
	if err := t.storeClusterCA(op.GetCa()); err != nil {
		return nil, err
	}
	return &statev1.Result{Initialized: true}, nil
}

// ClusterCA returns the cluster CA, or ErrNotFound before one was
// created. It holds the private key: never hand it out.
func (f *FSM) ClusterCA() (*statev1.ClusterCA, error) {
	var ca statev1.ClusterCA
	if err := getRecord(f.store, keyClusterCA, &ca, "cluster CA"); err != nil {
		return nil, err
	}
	return &ca, nil
}
