package main_test

import (
	"io"
	"net/http"
	"os/exec"
	"strings"
	"testing"
)

// What TestMain stamps the binaries with, as make release-local does.
const (
	stampedVersion      = "v0.0.0-e2e"
	stampedRevision     = "0123456789abcdef0123456789abcdef01234567"
	stampedVersionFlag  = "github.com/edge-relay/relay/internal/buildinfo.version=" + stampedVersion
	stampedRevisionFlag = "github.com/edge-relay/relay/internal/buildinfo.revision=" + stampedRevision
)

// Both binaries print the release they were stamped with.
func TestBinariesSayTheirRelease(t *testing.T) {
	for _, tc := range []struct {
		bin  string
		args []string
		want string
	}{
		{bins.relayd, []string{"version"}, "relayd " + stampedVersion + " (0123456789ab, go"},
		{bins.relayd, []string{"--version"}, "relayd " + stampedVersion + " (0123456789ab, go"},
		{bins.relayctl, []string{"version", "--client"}, "relayctl " + stampedVersion + " (0123456789ab, go"},
	} {
		out, err := exec.Command(tc.bin, tc.args...).Output()
		if err != nil || !strings.HasPrefix(string(out), tc.want) {
			t.Errorf("%s %s: %v, printed %q, want %q...", tc.bin, strings.Join(tc.args, " "), err, out, tc.want)
		}
	}
}

// get returns the body of a GET that must answer 200.
func get(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d, %v", url, resp.StatusCode, err)
	}
	return string(b)
}
