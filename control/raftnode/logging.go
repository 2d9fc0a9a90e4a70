package raftnode

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"strings"
	"sync"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
)

// newHCLogger returns an hclog.Logger (what hashicorp/raft speaks) whose
// records end up in slog with their level, message and key-value pairs.
func newHCLogger(l *slog.Logger, name string) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{
		Name:       name,
		Level:      hclog.Info,
		JSONFormat: true,
		Output:     &slogWriter{l: l},
	})
}

// slogWriter receives hclog's JSON lines and re-emits them through slog.
type slogWriter struct {
	l   *slog.Logger
	mu  sync.Mutex // guards buf
	buf []byte
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
	attrs := make([]slog.Attr, 0, len(rec))
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
