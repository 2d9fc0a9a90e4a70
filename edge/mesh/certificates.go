package mesh

import "crypto/x509"

// Certificates returns the identity's mesh certificate and the cluster CA
// it chains to, both nil before the first registration. Metrics read them
// to tell when either expires.
func (i *Identity) Certificates() (cert, ca *x509.Certificate) {
	i.mu.RLock()
	defer i.mu.RUnlock()
	if i.cert == nil {
		return nil, nil
	}
	return i.cert.Leaf, i.ca
}
