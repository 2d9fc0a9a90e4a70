package web

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// hashFiles is build.mjs's hashFiles: files by path and content.
func hashFiles(t *testing.T, files []string) string {
	t.Helper()
	files = slices.Sorted(slices.Values(files))
	h := sha256.New()
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(b)
		io.WriteString(h, f+"\n"+hex.EncodeToString(sum[:])+"\n")
	}
	return hex.EncodeToString(h.Sum(nil))
}

// walk lists the files under dir as build.mjs's walk does.
func walk(t *testing.T, dir string) []string {
	t.Helper()
	var files []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			files = append(files, filepath.ToSlash(p))
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// The committed bundles are built from the committed sources: run
// `make web` after changing anything under edge/web or the device
// protocol's proto (which src/gen is generated from). A hand edit of
// dist/ fails too.
func TestBundleIsFresh(t *testing.T) {
	stamp, err := os.ReadFile("dist/SOURCES.sha256")
	if err != nil {
		t.Fatal(err)
	}
	var sources []string
	for _, dir := range []string{"src", "static", "../../proto/relay/v1"} {
		for _, f := range walk(t, dir) {
			if !strings.HasPrefix(f, "../") || strings.HasSuffix(f, ".proto") {
				sources = append(sources, f)
			}
		}
	}
	sources = append(sources, "build.mjs", "package-lock.json", "tsconfig.json")
	want := fmt.Sprintf("sources %s\nbundle %s\n",
		hashFiles(t, sources), hashFiles(t, []string{"dist/console.js", "dist/favicon.svg", "dist/index.html", "dist/relay.js"}))
	if string(stamp) != want {
		t.Fatalf("edge/web/dist is stale: its stamp says\n%swhat is committed hashes to\n%srun make web", stamp, want)
	}
}

func TestHandler(t *testing.T) {
	srv := httptest.NewServer(Handler())
	defer srv.Close()
	for path, want := range map[string]string{"/": "text/html", "/relay.js": "text/javascript", "/console.js": "text/javascript",
		"/favicon.svg": "image/svg+xml", "/favicon.ico": "image/svg+xml"} {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), want) || resp.Header.Get("Cross-Origin-Opener-Policy") != "same-origin" {
			t.Fatalf("%s: %d %q", path, resp.StatusCode, resp.Header)
		}
		// The page may not be framed, nor post or resolve elsewhere.
		if want == "text/html" {
			csp := resp.Header.Get("Content-Security-Policy")
			for _, d := range []string{"frame-ancestors 'none'", "base-uri 'none'", "form-action 'self'", "default-src 'self'"} {
				if !strings.Contains(csp, d) {
					t.Errorf("%s: Content-Security-Policy %q lacks %s", path, csp, d)
				}
			}
			if xfo := resp.Header.Get("X-Frame-Options"); xfo != "DENY" {
				t.Errorf("%s: X-Frame-Options %q, want DENY", path, xfo)
			}
		}
	}
	resp, err := http.Get(srv.URL + "/SOURCES.sha256")
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != 404 {
		t.Fatalf("served a file that is not the page's: %d", resp.StatusCode)
	}
}
