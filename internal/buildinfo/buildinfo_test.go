package buildinfo

import (
	"runtime/debug"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func buildInfo(main string, settings ...string) func() (*debug.BuildInfo, bool) {
	bi := &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Path: "github.com/edge-relay/relay", Version: main}}
	for i := 0; i+1 < len(settings); i += 2 {
		bi.Settings = append(bi.Settings, debug.BuildSetting{Key: settings[i], Value: settings[i+1]})
	}
	return func() (*debug.BuildInfo, bool) { return bi, true }
}

// A stamped version and revision win; without them, what the toolchain
// recorded; without that either, "devel".
func TestGet(t *testing.T) {
	for _, tc := range []struct {
		name              string
		version, revision string
		read              func() (*debug.BuildInfo, bool)
		want              Info
		line              string
	}{
		{"stamped", "v1.4.0", "0123456789abcdef0123", buildInfo("(devel)", "vcs.revision", "ffff", "vcs.modified", "true"),
			Info{Version: "v1.4.0", Revision: "0123456789abcdef0123", GoVersion: "go1.26.8"}, "v1.4.0 (0123456789ab, go1.26.8)"},
		{"stamped dirty", "v1.4.0-2-gabc-dirty", "abc", buildInfo("(devel)"),
			Info{Version: "v1.4.0-2-gabc-dirty", Revision: "abc", Modified: true, GoVersion: "go1.26.8"}, "v1.4.0-2-gabc-dirty (abc, go1.26.8)"},
		{"from a checkout", "", "", buildInfo("(devel)", "vcs.revision", "0123456789abcdef", "vcs.modified", "true"),
			Info{Version: "devel", Revision: "0123456789abcdef", Modified: true, GoVersion: "go1.26.8"}, "devel (0123456789ab, modified, go1.26.8)"},
		{"go install of a tag", "", "", buildInfo("v1.3.2"),
			Info{Version: "v1.3.2", GoVersion: "go1.26.8"}, "v1.3.2 (go1.26.8)"},
		{"nothing recorded", "", "", func() (*debug.BuildInfo, bool) { return nil, false },
			Info{Version: "devel"}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := get(tc.version, tc.revision, tc.read)
			if tc.want.GoVersion == "" {
				tc.want.GoVersion = got.GoVersion // the running toolchain's
				if !strings.HasPrefix(got.GoVersion, "go") {
					t.Fatalf("Go version %q", got.GoVersion)
				}
			}
			if got != tc.want {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
			if tc.line != "" && got.String() != tc.line {
				t.Fatalf("String() = %q, want %q", got.String(), tc.line)
			}
		})
	}
}

func TestCollector(t *testing.T) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(Info{Version: "v1.4.0", Revision: "0123456789abcdef", GoVersion: "go1.26.8"}.Collector())
	mfs, err := reg.Gather()
	if err != nil || len(mfs) != 1 || mfs[0].GetName() != "relay_build_info" {
		t.Fatalf("%v, %v", mfs, err)
	}
	m := mfs[0].GetMetric()[0]
	labels := map[string]string{}
	for _, l := range m.GetLabel() {
		labels[l.GetName()] = l.GetValue()
	}
	if m.GetGauge().GetValue() != 1 || labels["version"] != "v1.4.0" || labels["revision"] != "0123456789ab" || labels["goversion"] != "go1.26.8" {
		t.Fatalf("relay_build_info %v = %v", labels, m.GetGauge().GetValue())
	}
}
