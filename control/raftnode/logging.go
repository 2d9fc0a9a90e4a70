package raftnode

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
)

// newHCLogger returns an hclog.Logger (what hashicorp/raft speaks) whose
// records end up in slog with their level, message and key-value pairs.
func newHCLogger(l *slog.Logger, name string) hclog.Logger {
	return newHCLoggerAt(l, name, time.Now)
}

func newHCLoggerAt(l *slog.Logger, name string, now func() time.Time) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{
		Name:       name,
		Level:      hclog.Info,
		JSONFormat: true,
		Output:     &slogWriter{l: l, now: now, repeats: map[string]*repeat{}},
	})
}

// unreachable are hashicorp/raft's messages about a peer it cannot
// reach, each with the peer's key. A leader repeats them for as long as
// a member is down: "failed to heartbeat to" at ERROR twice per
// heartbeat timeout, for a member that is merely restarting. The bridge
// budgets each peer's: the first of a run comes at its level, the rest
// at DEBUG, and again at its level once a repeatWindow with the count
// held back. The level is WARN when the error says the peer is not
// there (refused, timed out, reset: networkErrors; the member being
// down is not this node's error, and RelayControlQuorumAtRisk and the
// Raft panels are where it shows), ERROR for anything else (a
// certificate refused, another cluster's node at the address).
var unreachable = map[string]string{
	"failed to heartbeat to":                  "peer",
	"failed to appendEntries to":              "peer",
	"failed to start pipeline replication to": "peer",
	"failed to pipeline appendEntries":        "peer",
	"failed to contact":                       "server-id",
}

// networkErrors are the texts of errors that say a peer is not there
// (down, restarting, cut off), as net and hashicorp/raft word them, or
// not ready for this node yet (a node still joining, its hello list
// full for a moment).
var networkErrors = []string{
	"connection refused", "connection reset", "i/o timeout", "EOF", "broken pipe",
	"no route to host", "network is unreachable", "host is down", "use of closed network connection",
	"deadline exceeded", raft.ErrTransportShutdown.Error(), raft.ErrPipelineShutdown.Error(),
	errNotJoined.Error(), errBusy.Error(),
}

// repeatWindow is how often a peer's unreachable message is logged at
// its level while it repeats; a pause of repeatGap ends a run, and the
// next message starts another.
const (
	repeatWindow = time.Minute
	repeatGap    = 10 * time.Second
)

// maxRepeatKeys bounds the repeats tracked (peers are the cluster's
// members: a handful; a key past the bound is logged as it comes).
const maxRepeatKeys = 256

// repeat is a run of one message about one peer: when it was last logged
// at its level, last seen, and how many came at DEBUG since.
type repeat struct {
	logged, seen time.Time
	held         int
}

// slogWriter receives hclog's JSON lines and re-emits them through slog.
type slogWriter struct {
	l   *slog.Logger
	now func() time.Time

	mu      sync.Mutex // guards the fields below
	buf     []byte
	repeats map[string]*repeat // by message and peer
}

func (w *slogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			break
		}
		w.emit(w.buf[:i])
		w.buf = w.buf[i+1:]
	}
	return len(p), nil
}

func (w *slogWriter) emit(line []byte) {
	var rec map[string]any
	if err := json.Unmarshal(line, &rec); err != nil {
		w.l.Info(string(line))
		return
	}
	level := slog.LevelInfo
	switch rec["@level"] {
	case "trace", "debug":
		level = slog.LevelDebug
	case "warn":
		level = slog.LevelWarn
	case "error":
		level = slog.LevelError
	}
	msg, _ := rec["@message"].(string)
	if level == slog.LevelError && msg == "failed to decode incoming command" {
		// Raft's transport reads each peer connection until it fails, and
		// its own close (a stop, a connection dropped from the pool) fails
		// it this way, or with its own shutdown error: not an error.
		// A connection the cluster check ended was logged by the check.
		if e, _ := rec["error"].(string); strings.Contains(e, net.ErrClosed.Error()) || e == raft.ErrTransportShutdown.Error() ||
			strings.HasPrefix(e, helloRefused) {
			level = slog.LevelDebug
		}
	}
	attrs := make([]slog.Attr, 0, len(rec)+1)
	if key, ok := unreachable[msg]; ok {
		var held int
		errText, _ := rec["error"].(string)
		level, held = w.budget(msg, rec[key], errText)
		if held > 0 {
			attrs = append(attrs, slog.Int("repeated", held))
		}
	}
	if m, ok := rec["@module"].(string); ok {
		attrs = append(attrs, slog.String("module", m))
	}
	for k, v := range rec {
		if len(k) > 0 && k[0] == '@' {
			continue
		}
		attrs = append(attrs, slog.Any(k, v))
	}
	w.l.LogAttrs(context.Background(), level, msg, attrs...)
}

// budget says at which level an unreachable peer's message goes, and
// how many of the same were held back at DEBUG since the last at that
// level. mu is held.
func (w *slogWriter) budget(msg string, peer any, errText string) (slog.Level, int) {
	level := slog.LevelError
	if errText == "" || slices.ContainsFunc(networkErrors, func(e string) bool { return strings.Contains(errText, e) }) {
		level = slog.LevelWarn
	}
	key := fmt.Sprint(msg, "\x00", peer, "\x00", level)
	now := w.now()
	r := w.repeats[key]
	if r == nil || now.Sub(r.seen) >= repeatGap {
		if r == nil && len(w.repeats) >= maxRepeatKeys {
			for k, old := range w.repeats {
				if now.Sub(old.seen) >= repeatGap {
					delete(w.repeats, k)
				}
			}
			if len(w.repeats) >= maxRepeatKeys {
				return level, 0
			}
		}
		w.repeats[key] = &repeat{logged: now, seen: now}
		return level, 0
	}
	r.seen = now
	if now.Sub(r.logged) < repeatWindow {
		r.held++
		return slog.LevelDebug, 0
	}
	held := r.held
	r.logged, r.held = now, 0
	return level, held
}
