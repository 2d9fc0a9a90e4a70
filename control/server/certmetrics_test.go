package server

import (
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/edge-relay/relay/internal/testcerts"
)

// The node's certificate and every CA of the bundle (a duplicate once)
// are reported with their validity.
func TestTLSCertMetrics(t *testing.T) {
	dir := t.TempDir()
	ca, err := testcerts.NewCA(dir, "cluster")
	if err != nil {
		t.Fatal(err)
	}
	other, err := testcerts.NewCA(dir, "other")
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile, err := ca.Issue("n1")
	if err != nil {
		t.Fatal(err)
	}
	var bundle []byte
	for _, f := range []string{ca.CertFile, other.CertFile, ca.CertFile} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		bundle = append(bundle, b...)
	}
	bundleFile := filepath.Join(dir, "bundle.pem")
	if err := os.WriteFile(bundleFile, bundle, 0o600); err != nil {
		t.Fatal(err)
	}
	serverTLS, _, err := loadTLS(certFile, keyFile, bundleFile)
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewPedanticRegistry()
	if err := registerTLSCertMetrics(reg, serverTLS, bundleFile); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][2]int64{} // "certificate subject" -> not before, not after
	for name, f := range map[string]string{"tls CN=n1": certFile, "tls_ca CN=cluster": ca.CertFile, "tls_ca CN=other": other.CertFile} {
		c := parsePEMFile(t, f)
		want[name] = [2]int64{c.NotBefore.Unix(), c.NotAfter.Unix()}
	}
	got := map[string][2]int64{}
	for _, mf := range mfs {
		i := map[string]int{"relay_control_certificate_not_before_timestamp_seconds": 0, "relay_control_certificate_expiry_timestamp_seconds": 1}
		idx, ok := i[mf.GetName()]
		if !ok {
			t.Fatalf("unexpected metric %s", mf.GetName())
		}
		for _, m := range mf.GetMetric() {
			l := map[string]string{}
			for _, lp := range m.GetLabel() {
				l[lp.GetName()] = lp.GetValue()
			}
			if l["serial"] == "" {
				t.Errorf("%s without a serial: %v", mf.GetName(), l)
			}
			k := l["certificate"] + " " + l["subject"]
			v := got[k]
			v[idx] = int64(m.GetGauge().GetValue())
			got[k] = v
		}
	}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("%s: got %v, want %v", k, got[k], w)
		}
	}
	if err := registerTLSCertMetrics(prometheus.NewRegistry(), serverTLS, filepath.Join(dir, "missing.pem")); err == nil {
		t.Fatal("a missing CA file was accepted")
	}
}

func parsePEMFile(t *testing.T, f string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
