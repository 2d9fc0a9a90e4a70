package deploy

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"testing"
)

// TestImage builds the image the way `make image` does, on scratch
// instead of distroless (base images cannot be pulled here), and checks
// what it holds: the two static binaries, a non-root user, the entry
// point, the documented ports, the OCI labels.
func TestImage(t *testing.T) {
	podman := tool(t, "podman", "podman")
	tag := fmt.Sprintf("localhost/relay-test:%d", os.Getpid())
	// The build leaves the prebuilt stage's image behind as a cache layer:
	// remove the images this test made, and those only.
	before := imageIDs(t, podman)
	t.Cleanup(func() {
		for id := range imageIDs(t, podman) {
			if !before[id] {
				_ = exec.Command(podman, "rmi", "-f", id).Run()
			}
		}
	})
	mk := exec.Command("make", "image", "IMAGE="+tag, "IMAGE_BASE=scratch", "VERSION=v9.9.9-test", "REVISION=0123abcd")
	mk.Dir = repoRoot
	if out, err := mk.CombinedOutput(); err != nil {
		t.Fatalf("make image: %v\n%s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command(podman, "rmi", "-f", tag).Run() })

	out, err := exec.Command(podman, "image", "inspect", tag).Output()
	if err != nil {
		t.Fatalf("podman image inspect: %v", err)
	}
	var images []struct {
		Architecture string
		Os           string
		Config       struct {
			User         string
			Entrypoint   []string
			Cmd          []string
			Env          []string
			ExposedPorts map[string]struct{}
			Labels       map[string]string
			Healthcheck  any
		}
	}
	if err := json.Unmarshal(out, &images); err != nil || len(images) != 1 {
		t.Fatalf("podman image inspect: %v\n%s", err, out)
	}
	img := images[0]
	if img.Os != "linux" || img.Architecture != runtime.GOARCH {
		t.Errorf("image for %s/%s, want linux/%s", img.Os, img.Architecture, runtime.GOARCH)
	}
	if img.Config.User != "65532:65532" {
		t.Errorf("runs as %q, want 65532:65532", img.Config.User)
	}
	if !slices.Equal(img.Config.Entrypoint, []string{"/usr/local/bin/relayd"}) {
		t.Errorf("entry point %q", img.Config.Entrypoint)
	}
	if img.Config.Healthcheck != nil {
		t.Error("the image has a HEALTHCHECK; orchestrators probe /healthz and /readyz")
	}
	var ports []string
	for p := range img.Config.ExposedPorts {
		ports = append(ports, p)
	}
	sort.Strings(ports)
	want := documentedPorts(t)
	if !slices.Equal(ports, want) {
		t.Errorf("exposed ports %v, want the ones the manifests use %v", ports, want)
	}
	for k, v := range map[string]string{
		"org.opencontainers.image.source":   "https://github.com/edge-relay/relay",
		"org.opencontainers.image.version":  "v9.9.9-test",
		"org.opencontainers.image.revision": "0123abcd",
	} {
		if img.Config.Labels[k] != v {
			t.Errorf("label %s = %q, want %q", k, img.Config.Labels[k], v)
		}
	}

	// The file system: exactly the two binaries, static, executable,
	// owned by root (the user they run as cannot replace them).
	archive := filepath.Join(t.TempDir(), "image.tar")
	if out, err := exec.Command(podman, "save", "--format", "docker-archive", "-o", archive, tag).CombinedOutput(); err != nil {
		t.Fatalf("podman save: %v\n%s", err, out)
	}
	// The directories the examples mount volumes at (the data dir, and
	// the backup dir of compose, Kubernetes and systemd): a fresh named
	// volume takes the owner of the directory it is mounted over, so
	// relayd (uid 65532) could not write to one that root owns.
	files, dirs := imageFiles(t, archive)
	for _, dir := range []string{"var/lib/relay", "var/lib/relay-backups"} {
		if d, ok := dirs[dir]; !ok || d.Uid != 65532 || d.Mode&0o200 == 0 {
			t.Errorf("/%s: %+v, want a directory that uid 65532 owns and may write (a fresh volume mounted there inherits it)", dir, d)
		}
	}
	var names []string
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	if !slices.Equal(names, []string{"usr/local/bin/relayctl", "usr/local/bin/relayd"}) {
		t.Errorf("the image holds %v, want relayd and relayctl alone (scratch base)", names)
	}
	for n, f := range files {
		if f.hdr.Mode&0o111 == 0 || f.hdr.Uid != 0 || f.hdr.Mode&0o022 != 0 {
			t.Errorf("%s: mode %o uid %d: want executable, owned by root, writable by root alone", n, f.hdr.Mode, f.hdr.Uid)
		}
		e, err := elf.NewFile(bytes.NewReader(f.data))
		if err != nil {
			t.Fatalf("%s: %v", n, err)
		}
		for _, p := range e.Progs {
			if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
				t.Errorf("%s is dynamically linked: it would not start on a distroless static base", n)
			}
		}
		if e.Machine != map[string]elf.Machine{"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64}[runtime.GOARCH] {
			t.Errorf("%s is for %v", n, e.Machine)
		}
	}
}

// imageIDs lists podman's images, intermediate ones included.
func imageIDs(t *testing.T, podman string) map[string]bool {
	out, err := exec.Command(podman, "images", "-a", "-q", "--no-trunc").Output()
	if err != nil {
		t.Fatalf("podman images: %v", err)
	}
	ids := map[string]bool{}
	for _, id := range strings.Fields(string(out)) {
		ids[id] = true
	}
	return ids
}

// documentedPorts are the ports the Kubernetes manifests give relayd's
// containers, in the image config's form ("7400/tcp").
func documentedPorts(t *testing.T) []string {
	r := render(t, filepath.Join("kubernetes", "overlays", "prod"))
	set := map[string]bool{}
	for _, w := range r.pods() {
		for _, p := range w.spec.Containers[0].Ports {
			set[fmt.Sprintf("%d/%s", p.ContainerPort, strings.ToLower(string(p.Protocol)))] = true
		}
	}
	var out []string
	for p := range set {
		out = append(out, p)
	}
	sort.Strings(out)
	return out
}

type imageFile struct {
	hdr  *tar.Header
	data []byte
}

// imageFiles reads the regular files and directories of a
// docker-archive's layers (the last layer that has a path wins, as in the
// image).
func imageFiles(t *testing.T, archive string) (map[string]imageFile, map[string]*tar.Header) {
	t.Helper()
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	blobs := map[string][]byte{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		blobs[h.Name] = b
	}
	var manifest []struct{ Layers []string }
	if err := json.Unmarshal(blobs["manifest.json"], &manifest); err != nil || len(manifest) != 1 {
		t.Fatalf("docker-archive manifest: %v", err)
	}
	files, dirs := map[string]imageFile{}, map[string]*tar.Header{}
	for _, l := range manifest[0].Layers {
		lr := tar.NewReader(bytes.NewReader(blobs[l]))
		for {
			h, err := lr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("layer %s: %v", l, err)
			}
			if h.Typeflag == tar.TypeDir {
				dirs[path.Clean(strings.TrimPrefix(h.Name, "./"))] = h
			}
			if h.Typeflag != tar.TypeReg {
				continue
			}
			b, err := io.ReadAll(lr)
			if err != nil {
				t.Fatal(err)
			}
			files[path.Clean(strings.TrimPrefix(h.Name, "./"))] = imageFile{hdr: h, data: b}
		}
	}
	return files, dirs
}
