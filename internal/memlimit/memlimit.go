// Package memlimit gives the Go runtime a soft memory limit below the
// memory limit of the cgroup the process runs in (a Kubernetes pod's
// limits.memory, a systemd unit's MemoryMax), so that the garbage
// collector works harder as the heap nears the limit instead of the
// kernel's OOM killer ending the process. GOMEMLIMIT, when set, wins.
package memlimit

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
)

// unlimited is where a cgroup's limit means "none": cgroup v1 reports an
// unlimited cgroup as the largest page count times the page size (about
// 2^63), v2 as "max".
const unlimited = 1 << 62

// Cgroup returns the memory limit the cgroups of a process put on it, in
// bytes: the smallest of its own cgroup's and its ancestors' limits, 0
// when none of them has one. root is where the cgroup file systems are
// mounted (/sys/fs/cgroup) and self the process's /proc/PID/cgroup.
//
// Both versions are read: the unified hierarchy (cgroup v2,
// memory.max) when root holds it, else the v1 memory controller's
// hierarchy (memory.limit_in_bytes), else a v2 hierarchy mounted at
// root/unified that has the memory controller. A path from self that
// does not exist under root (a container that sees its own cgroup
// mounted at root, without a cgroup namespace) is read from the deepest
// part of it that does.
func Cgroup(root string, self []byte) (int64, error) {
	v2, v1 := "", "" // the cgroup paths; a path always starts with "/"
	sc := bufio.NewScanner(bytes.NewReader(self))
	for sc.Scan() {
		// hierarchy-ID:controller-list:cgroup-path
		id, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		ctrls, p, ok := strings.Cut(rest, ":")
		if !ok {
			return 0, fmt.Errorf("memlimit: malformed cgroup line %q", sc.Text())
		}
		if id == "0" && ctrls == "" {
			v2 = p
		}
		for c := range strings.SplitSeq(ctrls, ",") {
			if c == "memory" {
				v1 = p
			}
		}
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("memlimit: %w", err)
	}
	switch {
	case v2 != "" && hasFile(filepath.Join(root, "cgroup.controllers")):
		return smallest(root, v2, "memory.max")
	case v1 != "" && isDir(filepath.Join(root, "memory")):
		return smallest(filepath.Join(root, "memory"), v1, "memory.limit_in_bytes")
	case v2 != "" && controls(filepath.Join(root, "unified"), "memory"):
		return smallest(filepath.Join(root, "unified"), v2, "memory.max")
	}
	return 0, nil
}

// smallest reads file in the cgroup p under base and in each cgroup
// above it up to base, and returns the smallest limit set (0: none).
// Where p is not under base as a whole (the process sees a cgroup mounted
// at base that its /proc/self/cgroup names by a longer path), it starts
// from the deepest part of p that is. A level whose file cannot be read
// (permissions) adds nothing; one that holds something other than a
// limit is an error.
func smallest(base, p, file string) (int64, error) {
	p = path.Clean("/" + p)
	for p != "/" && !isDir(filepath.Join(base, filepath.FromSlash(p))) {
		p = path.Dir(p)
	}
	var least int64
	for {
		n, err := readLimit(filepath.Join(base, filepath.FromSlash(p), file))
		if err != nil {
			return 0, err
		}
		if n > 0 && (least == 0 || n < least) {
			least = n
		}
		if p == "/" {
			return least, nil
		}
		p = path.Dir(p)
	}
}

// readLimit reads one limit file: 0 for none, or for a file that is
// not there (the root of a v2 hierarchy) or cannot be read.
func readLimit(file string) (int64, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return 0, nil
	}
	s := strings.TrimSpace(string(b))
	if s == "max" {
		return 0, nil
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("memlimit: %s holds %q, not a limit", file, s)
	}
	if n >= unlimited {
		return 0, nil
	}
	return n, nil
}

func hasFile(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}

func isDir(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}

// controls reports whether the v2 hierarchy at dir has controller c.
func controls(dir, c string) bool {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.controllers"))
	if err != nil {
		return false
	}
	for _, f := range strings.Fields(string(b)) {
		if f == c {
			return true
		}
	}
	return false
}

// Set gives the Go runtime a soft memory limit of ratio (0 to 1) times
// the memory limit of this process's cgroups, unless the environment
// sets GOMEMLIMIT (the runtime then has the operator's limit already).
// It returns the limit it set and the cgroups' limit; both are 0 when
// it set none.
func Set(getenv func(string) string, ratio float64) (set, cgroup int64, err error) {
	if ratio <= 0 || ratio > 1 {
		return 0, 0, fmt.Errorf("memlimit: ratio %v not in (0, 1]", ratio)
	}
	if getenv("GOMEMLIMIT") != "" {
		return 0, 0, nil
	}
	self, err := os.ReadFile("/proc/self/cgroup")
	if errors.Is(err, fs.ErrNotExist) {
		return 0, 0, nil // not Linux, or no /proc: nothing to read
	}
	if err != nil {
		return 0, 0, fmt.Errorf("memlimit: %w", err)
	}
	cgroup, err = Cgroup("/sys/fs/cgroup", self)
	if err != nil || cgroup == 0 {
		return 0, 0, err
	}
	set = int64(float64(cgroup) * ratio)
	debug.SetMemoryLimit(set)
	return set, cgroup, nil
}
