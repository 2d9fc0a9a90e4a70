// Package certpool reads the CA bundles the binaries are given (a PEM
// file of one or more certificates) into a certificate pool.
package certpool

import (
	"crypto/x509"
	"errors"
	"fmt"
	"os"
)

// ErrNoCertificates is returned for a file that holds no PEM certificate.
var ErrNoCertificates = errors.New("holds no PEM certificates")

// FromFile returns a pool of the certificates in the PEM file at path.
func FromFile(path string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read CA file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s %w", path, ErrNoCertificates)
	}
	return pool, nil
}
