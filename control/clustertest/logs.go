package clustertest

import (
	"context"
	"log/slog"
	"sync"
)

// LogRecorder is a slog.Handler that keeps every record, for tests that
// assert on what a node logged. Use it as Options.Logger's handler:
// slog.New(rec).
type LogRecorder struct {
	shared *recorded
	attrs  []slog.Attr
}

type recorded struct {
	mu   sync.Mutex // guards recs
	recs []Record
}

// Record is one logged record with its attributes flattened (groups are
// not used by the code under test).
type Record struct {
	Level   slog.Level
	Message string
	Attrs   map[string]slog.Value
}

// NewLogRecorder returns an empty recorder.
func NewLogRecorder() *LogRecorder { return &LogRecorder{shared: &recorded{}} }

// Enabled records every level, debug included.
func (r *LogRecorder) Enabled(context.Context, slog.Level) bool { return true }

// Handle keeps the record.
func (r *LogRecorder) Handle(_ context.Context, rec slog.Record) error {
	out := Record{Level: rec.Level, Message: rec.Message, Attrs: map[string]slog.Value{}}
	for _, a := range r.attrs {
		out.Attrs[a.Key] = a.Value.Resolve()
	}
	rec.Attrs(func(a slog.Attr) bool {
		out.Attrs[a.Key] = a.Value.Resolve()
		return true
	})
	r.shared.mu.Lock()
	r.shared.recs = append(r.shared.recs, out)
	r.shared.mu.Unlock()
	return nil
}

// WithAttrs returns a handler that adds attrs to every record.
func (r *LogRecorder) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &LogRecorder{shared: r.shared, attrs: append(append([]slog.Attr{}, r.attrs...), attrs...)}
}

// WithGroup is not needed by the code under test; groups are flattened.
func (r *LogRecorder) WithGroup(string) slog.Handler { return r }

// Find returns the records with the given message ("" : any) for which
// match (nil: any) holds.
func (r *LogRecorder) Find(msg string, match func(Record) bool) []Record {
	r.shared.mu.Lock()
	defer r.shared.mu.Unlock()
	var out []Record
	for _, rec := range r.shared.recs {
		if (msg == "" || rec.Message == msg) && (match == nil || match(rec)) {
			out = append(out, rec)
		}
	}
	return out
}
