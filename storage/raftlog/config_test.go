package raftlog

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/cockroachdb/pebble/v2"
)

// recordHandler keeps every record it (or a handler derived from it with
// WithAttrs) is handed.
type recordHandler struct {
	*recordSink
	attrs []slog.Attr
}

type recordSink struct {
	mu      sync.Mutex
	records []slog.Record
}

func newRecordHandler() *recordHandler { return &recordHandler{recordSink: &recordSink{}} }

func (h *recordHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *recordHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	r.AddAttrs(h.attrs...)
	h.records = append(h.records, r)
	return nil
}
func (h *recordHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &recordHandler{recordSink: h.recordSink, attrs: append(append([]slog.Attr{}, h.attrs...), as...)}
}
func (h *recordHandler) WithGroup(string) slog.Handler { return h }

func TestConfigDefaults(t *testing.T) {
	cfg, err := Config{Dir: "x"}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Logger == nil || cfg.CacheSize != DefaultCacheSize || cfg.MemTableSize != DefaultMemTableSize || cfg.MaxOpenFiles != DefaultMaxOpenFiles {
		t.Fatalf("defaults not applied: %+v", cfg)
	}
	cfg, err = Config{Dir: "x", CacheSize: 1, MemTableSize: 2, MaxOpenFiles: 3}.withDefaults()
	if err != nil || cfg.CacheSize != 1 || cfg.MemTableSize != 2 || cfg.MaxOpenFiles != 3 {
		t.Fatalf("explicit values overridden: %+v, %v", cfg, err)
	}
}

func TestPebbleLoggerLevels(t *testing.T) {
	h := newRecordHandler()
	l := pebbleLogger{slog.New(h)}
	l.Infof("flushed %d tables", 3)
	l.Errorf("background error: %s", "boom")
	func() {
		defer func() {
			if r := recover(); r == nil || !strings.Contains(r.(string), "corrupt sstable 7") {
				t.Errorf("Fatalf recovered %v, want a panic naming the message", r)
			}
		}()
		l.Fatalf("corrupt sstable %d", 7)
	}()
	want := []struct {
		level slog.Level
		msg   string
	}{{slog.LevelDebug, "flushed 3 tables"}, {slog.LevelError, "background error: boom"}, {slog.LevelError, "corrupt sstable 7"}}
	if len(h.records) != len(want) {
		t.Fatalf("got %d records, want %d", len(h.records), len(want))
	}
	for i, w := range want {
		if r := h.records[i]; r.Level != w.level || r.Message != w.msg {
			t.Errorf("record %d = %v %q, want %v %q", i, r.Level, r.Message, w.level, w.msg)
		}
	}

	// Debug output is not even formatted when the level is off.
	quiet := pebbleLogger{slog.New(slog.NewTextHandler(&strings.Builder{}, &slog.HandlerOptions{Level: slog.LevelInfo}))}
	quiet.Infof("%v", panicStringer{})
}

type panicStringer struct{}

func (panicStringer) String() string { panic("formatted a disabled debug message") }

func TestPebbleOptions(t *testing.T) {
	h := newRecordHandler()
	cfg, err := Config{Dir: t.TempDir(), Logger: slog.New(h)}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	opts, closer := cfg.pebbleOptions()
	defer closer.Close()
	if opts.FormatMajorVersion != formatMajorVersion || opts.CacheSize != cfg.CacheSize || opts.FS == nil {
		t.Fatalf("options not taken from config: %+v", opts)
	}
	opts.EventListener.WriteStallBegin(pebble.WriteStallBeginInfo{Reason: "memtable count limit reached"})
	opts.EventListener.WriteStallEnd()
	if len(h.records) != 2 || h.records[0].Level != slog.LevelWarn {
		t.Fatalf("write stall events not logged at Warn: %v", h.records)
	}
}

func TestOpenLogsAtDebug(t *testing.T) {
	h := newRecordHandler()
	s, err := Open(Config{Dir: t.TempDir(), Logger: slog.New(h)})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	found := false
	for _, r := range h.records {
		if r.Message == "raft log opened" && r.Level == slog.LevelDebug {
			found = true
		}
	}
	if !found {
		t.Fatal("no debug record for the open")
	}
}
