package server

import (
	"crypto/x509"

	"github.com/prometheus/client_golang/prometheus"
)

// The validity of every certificate the edge presents or trusts, so an
// alert can fire before one expires: the device certificate (from files,
// or self-signed and renewed by the edge), the mesh certificate (renewed
// with every lease renewal) and the cluster CA the mesh trusts.
var (
	descCertNotAfter = prometheus.NewDesc("relay_edge_certificate_expiry_timestamp_seconds",
		"When a certificate of the edge expires (Unix time), by certificate: device, mesh, cluster_ca.", []string{"certificate"}, nil)
	descCertNotBefore = prometheus.NewDesc("relay_edge_certificate_not_before_timestamp_seconds",
		"When a certificate of the edge became valid (Unix time); with the expiry it gives the lifetime.", []string{"certificate"}, nil)
)

// certCollector reads the certificates at scrape time: renewals show up
// without any bookkeeping.
type certCollector struct{ s *Server }

func (c certCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descCertNotAfter
	ch <- descCertNotBefore
}

func (c certCollector) Collect(ch chan<- prometheus.Metric) {
	c.s.certs.mu.RLock()
	device := c.s.certs.cert.Leaf
	c.s.certs.mu.RUnlock()
	mesh, ca := c.s.identity.Certificates()
	for _, cert := range []struct {
		name string
		c    *x509.Certificate
	}{{"device", device}, {"mesh", mesh}, {"cluster_ca", ca}} {
		if cert.c == nil {
			continue // not registered yet: no mesh certificate or CA
		}
		ch <- prometheus.MustNewConstMetric(descCertNotAfter, prometheus.GaugeValue, float64(cert.c.NotAfter.Unix()), cert.name)
		ch <- prometheus.MustNewConstMetric(descCertNotBefore, prometheus.GaugeValue, float64(cert.c.NotBefore.Unix()), cert.name)
	}
}

// registerAll registers collectors, stopping at the first error.
func registerAll(reg prometheus.Registerer, cs ...prometheus.Collector) error {
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			return err
		}
	}
	return nil
}
