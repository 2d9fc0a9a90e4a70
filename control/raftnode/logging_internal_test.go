package raftnode

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// A leader's messages about a member it cannot reach come at WARN the
// first time for each member, then at most once a minute with the count
// held back at DEBUG in between; other messages keep their level.
func TestUnreachablePeerMessagesAreBudgeted(t *testing.T) {
	var out bytes.Buffer
	now := time.Unix(1_000_000, 0)
	l := newHCLoggerAt(slog.New(slog.NewJSONHandler(&out, &slog.HandlerOptions{Level: slog.LevelDebug})), "raft",
		func() time.Time { return now })
	records := func() []map[string]any {
		t.Helper()
		var recs []map[string]any
		sc := bufio.NewScanner(&out)
		for sc.Scan() {
			var r map[string]any
			if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
				t.Fatal(err)
			}
			recs = append(recs, r)
		}
		out.Reset()
		return recs
	}
	levels := func(recs []map[string]any) []string {
		var ls []string
		for _, r := range recs {
			ls = append(ls, r["level"].(string))
		}
		return ls
	}
	down := errors.New("dial tcp 127.0.0.1:7401: connect: connection refused")

	for range 5 {
		l.Error("failed to heartbeat to", "peer", "10.0.0.2:7401", "backoff time", "500ms", "error", down)
		now = now.Add(500 * time.Millisecond)
	}
	l.Error("failed to heartbeat to", "peer", "10.0.0.3:7401", "error", down)
	l.Warn("failed to contact", "server-id", "n2", "time", "2s")
	l.Warn("failed to contact", "server-id", "n2", "time", "3s")
	l.Error("failed to commit logs", "error", "disk full")
	if got := levels(records()); !slices.Equal(got, []string{"WARN", "DEBUG", "DEBUG", "DEBUG", "DEBUG", "WARN", "WARN", "DEBUG", "ERROR"}) {
		t.Fatalf("levels %v", got)
	}

	// A run that goes on is logged at its level once a minute, with the
	// count held back.
	for range 12 {
		now = now.Add(5 * time.Second)
		l.Error("failed to heartbeat to", "peer", "10.0.0.2:7401", "error", down)
	}
	recs := records()
	last := recs[len(recs)-1]
	if got := levels(recs); !slices.Equal(got[:11], slices.Repeat([]string{"DEBUG"}, 11)) || last["level"] != "WARN" ||
		last["repeated"] != float64(15) || last["peer"] != "10.0.0.2:7401" {
		t.Fatalf("a minute on: %v", recs)
	}
	// A pause ends the run: the next one starts another.
	now = now.Add(repeatGap)
	l.Error("failed to heartbeat to", "peer", "10.0.0.2:7401", "error", down)
	if recs := records(); len(recs) != 1 || recs[0]["level"] != "WARN" || recs[0]["repeated"] != nil {
		t.Fatalf("after a pause: %v", recs)
	}

	// An error that does not say the peer is gone stays an error, in a
	// run of its own; the peer as appendEntries gives it (a raft.Server)
	// keys its runs too.
	refused := errors.New("remote error: tls: bad certificate")
	// A node still joining refuses its leader for a moment: not an error.
	l.Error("failed to heartbeat to", "peer", "10.0.0.4:7401", "error", fmt.Errorf("raft peer n4 at 10.0.0.4:7401: %w", errNotJoined))
	if recs := records(); len(recs) != 1 || recs[0]["level"] != "WARN" {
		t.Fatalf("a node not joined yet: %v", recs)
	}
	member := raft.Server{ID: "n2", Address: "10.0.0.2:7401"}
	for range 2 {
		l.Error("failed to heartbeat to", "peer", "10.0.0.2:7401", "error", refused)
		l.Error("failed to appendEntries to", "peer", member, "error", down)
	}
	if got := levels(records()); !slices.Equal(got, []string{"ERROR", "WARN", "DEBUG", "DEBUG"}) {
		t.Fatalf("another error, a raft.Server peer: %v", got)
	}
}

// The repeats tracked stay bounded: past maxRepeatKeys, keys whose run
// ended are dropped, and with none to drop a new key is logged as it
// comes.
func TestUnreachableRepeatsStayBounded(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	w := &slogWriter{l: slog.New(slog.DiscardHandler), now: func() time.Time { return now }, repeats: map[string]*repeat{}}
	for i := range maxRepeatKeys {
		if lv, _ := w.budget("failed to heartbeat to", i, ""); lv != slog.LevelWarn {
			t.Fatalf("key %d: %v", i, lv)
		}
	}
	if lv, _ := w.budget("failed to heartbeat to", "one more", ""); lv != slog.LevelWarn || len(w.repeats) != maxRepeatKeys {
		t.Fatalf("past the bound: %v, %d keys", lv, len(w.repeats))
	}
	now = now.Add(repeatWindow)
	w.budget("failed to heartbeat to", "later", "")
	if len(w.repeats) != 1 {
		t.Fatalf("%d keys after the old ones aged out, want 1", len(w.repeats))
	}
}
