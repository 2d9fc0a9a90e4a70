package deploy

import (
	"strconv"
	"strings"
	"testing"
)

// sessionBytes is what one device session costs an edge's memory: about
// 100 KiB of RSS for an idle native session (docs/operations.md,
// "Memory"; docs/benchmarks.md measures it). pendingBytes is what a
// connection to the HTTPS port that is not a session costs at most: 19
// KiB of heap and an 8 KiB stack for an idle one (docs/benchmarks.md,
// "Connections to the HTTPS port that never become a session").
// pendingQUICBytes is the same for a QUIC connection to the device port
// that has not reached the hub: 44-45 KiB of heap and 18 KiB of stacks
// for an HTTP/3 one, the dearer kind (docs/benchmarks.md, "QUIC
// connections that never become a session"; one in the session's
// handshake counts as a session), and the 96 KiB its peer may send the
// edge does not read (edge/transport.InitialConnectionReceiveWindow).
const (
	sessionBytes     = 100 << 10
	pendingBytes     = 27 << 10
	pendingQUICBytes = 160 << 10
)

// defaultPending is relayd edge's --max-pending-https default for an edge
// that takes at most maxSessions sessions
// (edge/server.MaxPendingHTTPSFor): an eighth of them, from 64 to 4096.
func defaultPending(maxSessions int64) int64 {
	return min(max(maxSessions/8, 64), 4096)
}

// defaultPendingQUIC is relayd edge's --max-pending-quic default for an
// edge that takes at most maxSessions sessions
// (edge/transport.MaxPendingQUICFor): a sixty-fourth of them, from 64 to
// 1024.
func defaultPendingQUIC(maxSessions int64) int64 {
	return min(max(maxSessions/64, 64), 1024)
}

// checkSessionCap: an edge bounds its sessions (--max-sessions), its
// HTTPS connections that are not a session (--max-pending-https, a flood
// of which anyone can send) and its QUIC connections that are not one
// (--max-pending-quic, left at its default, which follows the session
// cap) below what its memory limit holds, with a fifth of the limit left
// for bursts of events and the runtime. Without the cap a reconnect
// storm sends an edge devices until the OOM killer ends it, and its
// devices then storm the next edge.
func checkSessionCap(t *testing.T, where, maxSessions, maxPending string, memLimit int64) {
	t.Helper()
	n, err := strconv.ParseInt(maxSessions, 10, 64)
	if err != nil || n <= 0 {
		t.Errorf("%s: RELAY_MAX_SESSIONS %q: want a bound on sessions, set from the memory limit", where, maxSessions)
		return
	}
	p := defaultPending(n)
	if maxPending != "" {
		if p, err = strconv.ParseInt(maxPending, 10, 64); err != nil || p <= 0 || p >= n {
			t.Errorf("%s: RELAY_MAX_PENDING_HTTPS %q: want a positive number below RELAY_MAX_SESSIONS=%d (or none, for the default): WebSockets in their handshakes hold sessions' places", where, maxPending, n)
			return
		}
	}
	if memLimit <= 0 {
		t.Errorf("%s: no memory limit to size RELAY_MAX_SESSIONS=%d against", where, n)
		return
	}
	q := defaultPendingQUIC(n)
	if need := n*sessionBytes + p*pendingBytes + q*pendingQUICBytes; need > memLimit*8/10 {
		t.Errorf("%s: RELAY_MAX_SESSIONS=%d, RELAY_MAX_PENDING_HTTPS=%d and the %d pending QUIC connections that follow from the first need about %d MiB (100 KiB a session, 27 KiB a pending HTTPS connection, 160 KiB a pending QUIC one), more than 80%% of the memory limit of %d MiB",
			where, n, p, q, need>>20, memLimit>>20)
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
