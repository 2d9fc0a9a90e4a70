package raftlog

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// crashChildEnv, when set, makes the test binary run runCrashChild against
// the directory it names instead of running tests (see TestMain).
const crashChildEnv = "RAFTLOG_CRASH_CHILD_DIR"

// crashBatchLimit bounds the child in case the parent never kills it.
const crashBatchLimit = 200_000

// crashBatchSize is the size of the batch the child writes starting at
// start. It is a pure function so the parent can recompute batch bounds.
func crashBatchSize(start uint64) uint64 { return 1 + start*7%16 }

// crashEntry is the entry the child writes at index i.
func crashEntry(i uint64) *raft.Log {
	data := make([]byte, i*37%300)
	x := i*0x9e3779b97f4a7c15 | 1
	for j := range data {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		data[j] = byte(x)
	}
	return &raft.Log{
		Index:      i,
		Term:       i/1000 + 1,
		Type:       raft.LogCommand,
		Data:       data,
		Extensions: []byte(strconv.FormatUint(i, 16)),
		AppendedAt: time.Unix(1_700_000_000+int64(i), int64(i%1e9)),
	}
}

// runCrashChild appends batches to the store in dir, continuing after
// whatever is there, and prints each acknowledged last index on its own line
// once StoreLogs has returned. It runs until killed.
func runCrashChild(dir string) int {
	s, err := Open(Config{Dir: dir, Logger: discardLogger()})
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	defer s.Close()
	last, err := s.LastIndex()
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	for n := 0; n < crashBatchLimit; n++ {
		start := last + 1
		size := crashBatchSize(start)
		batch := make([]*raft.Log, 0, size)
		for i := start; i < start+size; i++ {
			batch = append(batch, crashEntry(i))
		}
		if err := s.StoreLogs(batch); err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			return 3
		}
		last = start + size - 1
		// Unbuffered: the line is in the pipe before the next batch starts.
		if _, err := fmt.Fprintf(os.Stdout, "%d\n", last); err != nil {
			return 4
		}
	}
	return 0
}

// runChildUntilKilled starts a child on dir, SIGKILLs it after it has
// acknowledged killAfter batches, and returns the highest index it
// acknowledged (including acks already in the pipe when it died).
func runChildUntilKilled(t *testing.T, exe, dir string, killAfter int) uint64 {
	t.Helper()
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), crashChildEnv+"="+dir)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Backstop so a wedged child cannot hang the test; it is not part of the
	// synchronisation.
	backstop := time.AfterFunc(2*time.Minute, func() { _ = cmd.Process.Kill() })
	defer backstop.Stop()

	var lastAck uint64
	acks, killed := 0, false
	r := bufio.NewReader(stdout)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			break // EOF once the child is gone; a partial line is not an ack
		}
		v, err := strconv.ParseUint(strings.TrimSuffix(line, "\n"), 10, 64)
		if err != nil {
			t.Fatalf("child printed %q: %v", line, err)
		}
		if v <= lastAck {
			t.Fatalf("child acknowledged %d after %d", v, lastAck)
		}
		lastAck = v
		acks++
		if acks == killAfter {
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatalf("kill child: %v", err)
			}
			killed = true
		}
	}
	err = cmd.Wait()
	var exitErr *exec.ExitError
	if !killed || !errors.As(err, &exitErr) {
		t.Fatalf("child ended on its own after %d acks (wait: %v); stderr:\n%s", acks, err, stderr.String())
	}
	if ws, ok := exitErr.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("child did not die of SIGKILL: %v; stderr:\n%s", err, stderr.String())
	}
	return lastAck
}

// TestCrashRecovery kills a writer process with SIGKILL mid-stream several
// times over the same directory and checks every acknowledged entry
// survived, intact and without gaps, and no batch was torn. SIGKILL loses
// the process, not the page cache, so this checks atomicity and recovery,
// not fsync itself.
func TestCrashRecovery(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns child processes")
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var prevLast uint64
	for iter, killAfter := range []int{1, 7, 40, 3, 250} {
		lastAck := runChildUntilKilled(t, exe, dir, killAfter)
		if lastAck <= prevLast {
			t.Fatalf("iteration %d: child acknowledged up to %d, not past the previous %d", iter, lastAck, prevLast)
		}

		s, err := Open(Config{Dir: dir, Logger: discardLogger()})
		if err != nil {
			t.Fatalf("iteration %d: reopen after SIGKILL: %v", iter, err)
		}
		first, _ := s.FirstIndex()
		last, _ := s.LastIndex()
		if first != 1 || last < lastAck {
			s.Close()
			t.Fatalf("iteration %d: log holds %d..%d, want 1..k with k >= %d (last ack)", iter, first, last, lastAck)
		}
		// At most the one batch in flight at the kill may have landed
		// without its ack being seen.
		if next := lastAck + crashBatchSize(lastAck+1); last != lastAck && last != next {
			s.Close()
			t.Fatalf("iteration %d: last index %d is neither the last ack %d nor the end of the next batch %d", iter, last, lastAck, next)
		}
		var lastBatchStart uint64
		for start := uint64(1); start <= last; start += crashBatchSize(start) {
			lastBatchStart = start
		}
		if lastBatchStart+crashBatchSize(lastBatchStart)-1 != last {
			s.Close()
			t.Fatalf("iteration %d: last index %d is not a batch boundary (torn batch)", iter, last)
		}
		for i := uint64(1); i <= last; i++ {
			var got raft.Log
			if err := s.GetLog(i, &got); err != nil {
				s.Close()
				t.Fatalf("iteration %d: GetLog(%d): %v", iter, i, err)
			}
			if want := crashEntry(i); !logsEqual(&got, want) {
				s.Close()
				t.Fatalf("iteration %d: entry %d damaged: %+v", iter, i, got)
			}
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		t.Logf("iteration %d: killed after %d acks; last ack %d, recovered 1..%d", iter, killAfter, lastAck, last)
		prevLast = last
	}
}
