// Package buildinfo says which release of the relay a binary is: the
// version and revision stamped at link time (make release-local, image,
// the release workflow) or, without them, what the Go toolchain recorded
// (the module's version, the VCS revision of a build from a checkout).
package buildinfo

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
)

// Stamped at link time, never written at run time:
//
//	go build -ldflags "-X github.com/edge-relay/relay/internal/buildinfo.version=v1.4.0 \
//	    -X github.com/edge-relay/relay/internal/buildinfo.revision=$(git rev-parse HEAD)"
var (
	version  string
	revision string
)

// Info is a binary's release.
type Info struct {
	// Version is the release ("v1.4.0", "v1.4.0-3-gabc1234-dirty"), or
	// "devel" for a build that was not stamped and whose module version
	// the toolchain does not know.
	Version string
	// Revision is the VCS commit it was built from ("" when unknown), with
	// Modified set when the working tree had changes.
	Revision string
	Modified bool
	// GoVersion is the toolchain that built it.
	GoVersion string
}

// Get returns this binary's release.
func Get() Info {
	return get(version, revision, debug.ReadBuildInfo)
}

func get(stampedVersion, stampedRevision string, read func() (*debug.BuildInfo, bool)) Info {
	info := Info{Version: stampedVersion, Revision: stampedRevision, GoVersion: runtime.Version()}
	bi, ok := read()
	if ok {
		if bi.GoVersion != "" {
			info.GoVersion = bi.GoVersion
		}
		if info.Version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			info.Version = bi.Main.Version
		}
		for _, s := range bi.Settings {
			switch {
			case s.Key == "vcs.revision" && info.Revision == "":
				info.Revision = s.Value
			case s.Key == "vcs.modified" && stampedRevision == "":
				info.Modified = s.Value == "true"
			}
		}
	}
	if info.Version == "" {
		info.Version = "devel"
	}
	if strings.HasSuffix(info.Version, "-dirty") {
		info.Modified = true
	}
	return info
}

// ShortRevision is the revision's first 12 characters.
func (i Info) ShortRevision() string {
	return i.Revision[:min(len(i.Revision), 12)]
}

// String is the release as a line says it: "v1.4.0 (abc123def456,
// go1.26.8)", "devel (abc123def456, modified, go1.26.8)".
func (i Info) String() string {
	var parts []string
	if i.Revision != "" {
		parts = append(parts, i.ShortRevision())
	}
	if i.Modified && !strings.HasSuffix(i.Version, "-dirty") {
		parts = append(parts, "modified")
	}
	parts = append(parts, i.GoVersion)
	return fmt.Sprintf("%s (%s)", i.Version, strings.Join(parts, ", "))
}

// Collector is relay_build_info: 1, labelled with the release, so that
// dashboards show which nodes run which release during an upgrade.
func (i Info) Collector() prometheus.Collector {
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "relay_build_info",
		Help:        "1, labelled with the release this process runs: version, revision (first 12 characters) and Go version.",
		ConstLabels: prometheus.Labels{"version": i.Version, "revision": i.ShortRevision(), "goversion": i.GoVersion},
	})
	g.Set(1)
	return g
}
