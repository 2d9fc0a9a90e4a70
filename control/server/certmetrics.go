package server

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// The validity of the node's TLS certificate and of the CAs it trusts for
// Raft and the API, so an alert fires before one expires. The files are
// read once at start (a new certificate needs a restart), so so are these.
var (
	descCertNotAfter = prometheus.NewDesc("relay_control_certificate_expiry_timestamp_seconds",
		"When a certificate of the node expires (Unix time), by certificate: tls (--tls-cert), tls_ca (each of --tls-ca).", []string{"certificate", "subject", "serial"}, nil)
	descCertNotBefore = prometheus.NewDesc("relay_control_certificate_not_before_timestamp_seconds",
		"When a certificate of the node became valid (Unix time); with the expiry it gives the lifetime.", []string{"certificate", "subject", "serial"}, nil)
)

// certBounds is one certificate's validity.
type certBounds struct {
	name, subject, serial string
	notBefore, notAfter   time.Time
}

func boundsOf(name string, c *x509.Certificate) certBounds {
	return certBounds{name, c.Subject.String(), c.SerialNumber.Text(16), c.NotBefore, c.NotAfter}
}

// registerTLSCertMetrics registers the validity of the node's certificate
// (the first of conf.Certificates) and of every certificate in the PEM
// file caFile.
func registerTLSCertMetrics(reg prometheus.Registerer, conf *tls.Config, caFile string) error {
	leaf, err := x509.ParseCertificate(conf.Certificates[0].Certificate[0])
	if err != nil {
		return fmt.Errorf("parse TLS certificate: %w", err)
	}
	certs := certCollector{boundsOf("tls", leaf)}
	b, err := os.ReadFile(caFile)
	if err != nil {
		return fmt.Errorf("read CA %s: %w", caFile, err)
	}
	seen := map[string]bool{}
	for blk, rest := pem.Decode(b); blk != nil; blk, rest = pem.Decode(rest) {
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return fmt.Errorf("parse CA %s: %w", caFile, err)
		}
		cb := boundsOf("tls_ca", c)
		if k := cb.subject + "/" + cb.serial; !seen[k] {
			seen[k] = true
			certs = append(certs, cb)
		}
	}
	return reg.Register(certs)
}

type certCollector []certBounds

func (c certCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descCertNotAfter
	ch <- descCertNotBefore
}

func (c certCollector) Collect(ch chan<- prometheus.Metric) {
	for _, b := range c {
		ch <- prometheus.MustNewConstMetric(descCertNotAfter, prometheus.GaugeValue, float64(b.notAfter.Unix()), b.name, b.subject, b.serial)
		ch <- prometheus.MustNewConstMetric(descCertNotBefore, prometheus.GaugeValue, float64(b.notBefore.Unix()), b.name, b.subject, b.serial)
	}
}
