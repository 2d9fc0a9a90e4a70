package deploy

import (
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
)

// The load test manifests (deploy/loadtest) reach the relay by its
// Services' in-cluster names: each name, namespace and port they use must
// be one the prod overlay creates.
func TestLoadtestManifestsNameRealServices(t *testing.T) {
	r := render(t, filepath.Join("kubernetes", "overlays", "prod"))
	host := regexp.MustCompile(`([a-z0-9-]+)\.([a-z0-9-]+)\.svc:(\d+)`)
	files, err := filepath.Glob(filepath.Join("loadtest", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no load test manifests: %v", err)
	}
	n := 0
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range host.FindAllStringSubmatch(string(b), -1) {
			n++
			svc, ok := r.services[m[1]]
			if !ok || svc.Namespace != m[2] {
				t.Errorf("%s: %s: no Service %s in namespace %s", f, m[0], m[1], m[2])
				continue
			}
			port, _ := strconv.Atoi(m[3])
			found := false
			for _, p := range svc.Spec.Ports {
				found = found || int(p.Port) == port
			}
			if !found {
				t.Errorf("%s: %s: Service %s has no port %d", f, m[0], m[1], port)
			}
		}
	}
	if n < 3 {
		t.Fatalf("only %d service addresses found in the manifests", n)
	}
}
