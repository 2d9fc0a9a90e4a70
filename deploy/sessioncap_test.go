package deploy

import (
	"strconv"
	"strings"
	"testing"
)

// sessionBytes is what one device session costs an edge's memory: about
// 100 KiB of RSS for an idle native session (docs/operations.md,
// "Memory"; docs/benchmarks.md measures it).
const sessionBytes = 100 << 10

// checkSessionCap: an edge bounds its sessions (--max-sessions) below what
// its memory limit holds, with a fifth of the limit left for bursts of
// events and the runtime. Without the cap a reconnect storm sends an edge
// devices until the OOM killer ends it, and its devices then storm the
// next edge.
func checkSessionCap(t *testing.T, where, maxSessions string, memLimit int64) {
	t.Helper()
	n, err := strconv.ParseInt(maxSessions, 10, 64)
	if err != nil || n <= 0 {
		t.Errorf("%s: RELAY_MAX_SESSIONS %q: want a bound on sessions, set from the memory limit", where, maxSessions)
		return
	}
	if memLimit <= 0 {
		t.Errorf("%s: no memory limit to size RELAY_MAX_SESSIONS=%d against", where, n)
		return
	}
	if n*sessionBytes > memLimit*8/10 {
		t.Errorf("%s: RELAY_MAX_SESSIONS=%d needs about %d MiB (100 KiB a session), more than 80%% of the memory limit of %d MiB",
			where, n, n*sessionBytes>>20, memLimit>>20)
	}
}

// systemdBytes parses a systemd size (MemoryMax=8G): a number with an
// optional K, M, G or T suffix, in powers of 1024.
func systemdBytes(s string) (int64, error) {
	mult := int64(1)
	if i := strings.IndexAny(s, "KMGT"); i >= 0 && i == len(s)-1 {
		mult = 1 << (10 * (1 + strings.IndexByte("KMGT", s[i])))
		s = s[:i]
	}
	n, err := strconv.ParseInt(s, 10, 64)
	return n * mult, err
}
