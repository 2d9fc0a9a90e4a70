package memlimit

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strings"
	"testing"

	"github.com/edge-relay/relay/internal/relaytest"
)

// tree writes files (path -> content) under a new root and returns it.
func tree(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for p, content := range files {
		full := filepath.Join(root, filepath.FromSlash(p))
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

const v1Unlimited = "9223372036854771712\n"

func TestCgroup(t *testing.T) {
	for _, tc := range []struct {
		name  string
		files map[string]string
		self  string
		want  int64
	}{
		{"v2, the pod's own limit", map[string]string{
			"cgroup.controllers":               "cpu memory pids\n",
			"kubepods/pod1/c1/memory.max":      "2147483648\n",
			"kubepods/pod1/memory.max":         "max\n",
			"kubepods/memory.max":              "max\n",
			"kubepods/pod1/c1/memory.high":     "1000\n", // not a limit
			"kubepods/pod1/c1/memory.swap.max": "0\n",
		}, "0::/kubepods/pod1/c1\n", 2 << 30},
		{"v2, a smaller limit above", map[string]string{
			"cgroup.controllers":          "memory\n",
			"kubepods/pod1/c1/memory.max": "max\n",
			"kubepods/pod1/memory.max":    "536870912\n",
			"kubepods/memory.max":         "1073741824\n",
		}, "0::/kubepods/pod1/c1\n", 512 << 20},
		{"v2, no limit anywhere", map[string]string{
			"cgroup.controllers":      "memory\n",
			"system.slice/memory.max": "max\n",
		}, "0::/system.slice\n", 0},
		{"v2 in a container: its cgroup at the root", map[string]string{
			"cgroup.controllers": "memory\n",
			"memory.max":         "268435456\n",
		}, "0::/\n", 256 << 20},
		{"v2 path not mounted here: read from the root", map[string]string{
			"cgroup.controllers": "memory\n",
			"memory.max":         "268435456\n",
		}, "0::/docker/abc\n", 256 << 20},
		{"v1, the limit on the process's cgroup", map[string]string{
			"memory/memory.limit_in_bytes":            v1Unlimited,
			"memory/docker/abc/memory.limit_in_bytes": "1073741824\n",
			"memory/docker/memory.limit_in_bytes":     v1Unlimited,
		}, "12:pids:/docker/abc\n4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n", 1 << 30},
		{"v1, unlimited", map[string]string{
			"memory/memory.limit_in_bytes":   v1Unlimited,
			"memory/a/memory.limit_in_bytes": v1Unlimited,
			"unified/cgroup.controllers":     "\n",
		}, "4:memory:/a\n0::/a\n", 0},
		{"v1 with the memory controller among others", map[string]string{
			"memory/memory.limit_in_bytes":   "104857600\n",
			"memory/a/memory.limit_in_bytes": v1Unlimited,
		}, "4:cpu,memory:/a\n", 100 << 20},
		{"hybrid: memory on the unified hierarchy", map[string]string{
			"unified/cgroup.controllers": "memory pids\n",
			"unified/a/memory.max":       "67108864\n",
		}, "1:name=systemd:/a\n0::/a\n", 64 << 20},
		{"v1 leaf not mounted here: its deepest existing ancestor", map[string]string{
			"memory/memory.limit_in_bytes":             v1Unlimited,
			"memory/process_api/memory.limit_in_bytes": "209715200\n",
		}, "4:memory:/process_api/abc\n", 200 << 20},
		{"no cgroups", map[string]string{}, "", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Cgroup(tree(t, tc.files), []byte(tc.self))
			if err != nil || got != tc.want {
				t.Fatalf("Cgroup = %d, %v; want %d", got, err, tc.want)
			}
		})
	}
}

func TestCgroupRefusesWhatItCannotRead(t *testing.T) {
	root := tree(t, map[string]string{"cgroup.controllers": "memory\n", "a/memory.max": "lots\n"})
	if _, err := Cgroup(root, []byte("0::/a\n")); err == nil || !strings.Contains(err.Error(), `"lots"`) {
		t.Fatalf("a limit file holding %q: %v", "lots", err)
	}
	if _, err := Cgroup(root, []byte("0:/a\n")); err == nil {
		t.Fatal("a malformed /proc/self/cgroup line was accepted")
	}
	root = tree(t, map[string]string{"cgroup.controllers": "memory\n", "a/memory.max": "-5\n"})
	if _, err := Cgroup(root, []byte("0::/a\n")); err == nil {
		t.Fatal("a negative limit was accepted")
	}
	// A level whose file cannot be read adds nothing; the others count.
	root = tree(t, map[string]string{"cgroup.controllers": "memory\n", "a/memory.max": "1048576\n", "a/b/memory.max": "max\n"})
	if err := os.Mkdir(filepath.Join(root, "memory.max"), 0o755); err != nil { // reading a directory fails
		t.Fatal(err)
	}
	if got, err := Cgroup(root, []byte("0::/a/b\n")); err != nil || got != 1<<20 {
		t.Fatalf("with an unreadable level: %d, %v; want %d", got, err, 1<<20)
	}
}

func TestSetKeepsGOMEMLIMIT(t *testing.T) {
	before := debug.SetMemoryLimit(-1)
	set, cg, err := Set(func(k string) string {
		if k == "GOMEMLIMIT" {
			return "1GiB"
		}
		return ""
	}, 0.9)
	if err != nil || set != 0 || cg != 0 || debug.SetMemoryLimit(-1) != before {
		t.Fatalf("Set with GOMEMLIMIT: %d, %d, %v; runtime limit %d, was %d", set, cg, err, debug.SetMemoryLimit(-1), before)
	}
	if _, _, err := Set(os.Getenv, 0); err == nil {
		t.Fatal("a ratio of 0 was accepted")
	}
}

// envChild makes the test binary the child of TestSetFromARealCgroup.
const envChild = "MEMLIMIT_TEST_CHILD"

// The test binary run again inside a real cgroup with a memory limit
// reads that limit through the kernel's own files and gives the runtime
// 90% of it; with GOMEMLIMIT set it leaves the operator's limit alone.
func TestSetFromARealCgroup(t *testing.T) {
	if os.Getenv(envChild) != "" {
		set, cg, err := Set(os.Getenv, 0.9)
		fmt.Printf("set=%d cgroup=%d runtime=%d err=%v\n", set, cg, debug.SetMemoryLimit(-1), err)
		return
	}
	var limit int64 = 768 << 20
	dir := relaytest.MemoryCgroup(t, limit)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	run := func(env ...string) string {
		t.Helper()
		argv := relaytest.InCgroup(dir, exe, "-test.run", "^TestSetFromARealCgroup$", "-test.count", "1")
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.Env = append(append(os.Environ(), envChild+"=1"), env...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("child: %v\n%s", err, out)
		}
		return string(out)
	}
	want := fmt.Sprintf("set=%d cgroup=%d runtime=%d err=<nil>", int64(float64(limit)*0.9), limit, int64(float64(limit)*0.9))
	if out := run("GOMEMLIMIT="); !strings.Contains(out, want) {
		t.Fatalf("in a cgroup limited to %d bytes the child said\n%s\nwant %q", limit, out, want)
	}
	want = fmt.Sprintf("set=0 cgroup=0 runtime=%d err=<nil>", 256<<20)
	if out := run("GOMEMLIMIT=256MiB"); !strings.Contains(out, want) {
		t.Fatalf("with GOMEMLIMIT=256MiB the child said\n%s\nwant %q", out, want)
	}
}
