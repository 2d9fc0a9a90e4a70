package relaytest

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/edge-relay/relay/control/clustertest"
)

// EnvRequireCgroup makes MemoryCgroup fail the test, not skip it, where
// it cannot create a cgroup (.ci/run sets it: CI runs as root).
const EnvRequireCgroup = "RELAY_REQUIRE_CGROUP"

// MemoryCgroup creates a memory cgroup limited to limit bytes (cgroup v2
// at /sys/fs/cgroup, else the v1 hierarchy at /sys/fs/cgroup/memory) and
// removes it when the test ends; start a process in it with InCgroup.
// Without root or a memory controller it skips the test (fails it under
// RELAY_REQUIRE_CGROUP=1).
func MemoryCgroup(t clustertest.TB, limit int64) string {
	t.Helper()
	dir, why := newMemoryCgroup(limit)
	if why != "" {
		skipUnlessRequired(t, EnvRequireCgroup, "cannot create a memory cgroup ("+why+"); this test needs root")
	}
	t.Cleanup(func() {
		// A cgroup whose last process is still exiting cannot be
		// removed yet (EBUSY).
		clustertest.Eventually(t, 10*time.Second, func() error { return removeCgroup(dir) })
	})
	return dir
}

// sweepStaleCgroups removes the cgroups of test processes that died
// before their cleanup ran (a -timeout panic, a kill).
func sweepStaleCgroups(base string) {
	dirs, _ := filepath.Glob(filepath.Join(base, "relaytest-*-*"))
	for _, d := range dirs {
		pid, err := strconv.Atoi(strings.Split(filepath.Base(d), "-")[1])
		if err == nil && syscall.Kill(pid, 0) == syscall.ESRCH {
			_ = removeCgroup(d) // still busy: the next sweep
		}
	}
}

// removeCgroup kills what is still in the cgroup dir and removes it.
func removeCgroup(dir string) error {
	if b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs")); err == nil {
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	if err := os.Remove(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

func newMemoryCgroup(limit int64) (dir, why string) {
	if os.Geteuid() != 0 {
		return "", "not root"
	}
	base, file := "/sys/fs/cgroup", "memory.max"
	if b, err := os.ReadFile(filepath.Join(base, "cgroup.subtree_control")); err != nil || !strings.Contains(string(b), "memory") {
		base, file = "/sys/fs/cgroup/memory", "memory.limit_in_bytes"
		if _, err := os.Stat(filepath.Join(base, file)); err != nil {
			return "", "no cgroup v2 hierarchy delegating the memory controller at /sys/fs/cgroup, no v1 hierarchy at /sys/fs/cgroup/memory"
		}
	}
	sweepStaleCgroups(base)
	dir, err := os.MkdirTemp(base, fmt.Sprintf("relaytest-%d-", os.Getpid()))
	if err != nil {
		return "", err.Error()
	}
	if err := os.WriteFile(filepath.Join(dir, file), []byte(strconv.FormatInt(limit, 10)), 0o644); err != nil {
		_ = os.Remove(dir)
		return "", err.Error()
	}
	return dir, ""
}

// InCgroup returns the argv that runs argv in the cgroup dir: a shell
// that joins it, then becomes the command (so the command's first
// instruction already runs there).
func InCgroup(dir string, argv ...string) []string {
	return append([]string{"sh", "-c", `echo $$ > "$0/cgroup.procs" && shift && exec "$@"`, dir, "--"}, argv...)
}
