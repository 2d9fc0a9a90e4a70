package client_test

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// The Go client is a library applications embed: it speaks the device
// protocol over the transports and needs nothing of the edge's server
// side (the session core, its listener, metrics, tracing exporters) nor
// of the control plane. Each package below would pull megabytes of code
// (and gRPC, Prometheus, Pebble) into every application.
func TestTheClientNeedsNoServerCode(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go") // go test runs where go is
	}
	out, err := exec.Command(goTool, "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	deps := strings.Fields(string(out))
	if len(deps) < 20 {
		t.Fatalf("go list gave %d packages: %q", len(deps), deps)
	}
	banned := []string{
		"github.com/edge-relay/relay/edge/session",
		"github.com/edge-relay/relay/edge/transport",
		"github.com/edge-relay/relay/edge/server",
		"github.com/edge-relay/relay/control/",
		"github.com/edge-relay/relay/internal/telemetry",
		"github.com/prometheus/",
		"go.opentelemetry.io/",
		"google.golang.org/grpc",
		"connectrpc.com/",
		"github.com/cockroachdb/pebble",
		"github.com/hashicorp/raft",
	}
	for _, d := range deps {
		for _, b := range banned {
			if d == strings.TrimSuffix(b, "/") || strings.HasPrefix(d, b) {
				t.Errorf("the client depends on %s", d)
			}
		}
	}
}
