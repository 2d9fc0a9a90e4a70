package relaytest

import (
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// recorder is the part of a testing.TB StartCmd uses, failed or not,
// keeping what a failure report logs.
type recorder struct {
	*testing.T
	failed   bool
	cleanups []func()
	logged   []string
}

func (r *recorder) Failed() bool     { return r.failed }
func (r *recorder) Cleanup(f func()) { r.cleanups = append(r.cleanups, f) }
func (r *recorder) Logf(format string, args ...any) {
	r.logged = append(r.logged, fmt.Sprintf(format, args...))
}

func (r *recorder) cleanUp() {
	for i := len(r.cleanups) - 1; i >= 0; i-- {
		r.cleanups[i]()
	}
}

// When a test fails, each process it started reports how it ended and
// its last lines (here a panic's, which are not JSON); a test that
// passes reports nothing.
func TestAFailedTestShowsItsProcessesLastLines(t *testing.T) {
	for _, failed := range []bool{true, false} {
		r := &recorder{T: t, failed: failed}
		script := `for i in $(seq 1 50); do echo "{\"msg\":\"line $i\"}" >&2; done; echo "panic: the end" >&2; exit 2`
		p := StartCmd(r, "dying", exec.Command("sh", "-c", script))
		select {
		case <-p.Done():
		case <-time.After(30 * time.Second):
			t.Fatal("the process did not exit")
		}
		r.cleanUp()
		if !failed {
			if len(r.logged) != 0 {
				t.Fatalf("a passing test logged %q", r.logged)
			}
			continue
		}
		if len(r.logged) != 1 {
			t.Fatalf("logged %d reports, want 1: %q", len(r.logged), r.logged)
		}
		out := r.logged[0]
		for _, want := range []string{"dying", "exited: exit status 2", "panic: the end", `{"msg":"line 50"}`} {
			if !strings.Contains(out, want) {
				t.Errorf("the report lacks %q:\n%s", want, out)
			}
		}
		if strings.Contains(out, `"line 11"`) {
			t.Errorf("the report holds more than the last %d lines:\n%s", tailLines, out)
		}
	}
}

// A process that reports a data race (a binary built with -race) fails
// the test with the report, though the process goes on and the test
// checked nothing else; a process without one fails nothing.
func TestARaceReportFailsTheTest(t *testing.T) {
	for _, raced := range []bool{true, false} {
		r := &errRecorder{recorder: recorder{T: t}}
		script := `echo '{"msg":"serving"}' >&2`
		if raced {
			script += `; printf '==================\nWARNING: DATA RACE\nWrite at 0x00c000123456 by goroutine 7:\n  main.serve()\n==================\n' >&2`
		}
		script += `; echo '{"msg":"still serving"}' >&2; exit 0`
		p := StartCmd(r, "racy", exec.Command("sh", "-c", script))
		select {
		case <-p.Done():
		case <-time.After(30 * time.Second):
			t.Fatal("the process did not exit")
		}
		r.cleanUp()
		if !raced {
			if len(r.errors) != 0 {
				t.Fatalf("a process without a race report failed the test: %q", r.errors)
			}
			continue
		}
		if len(r.errors) != 1 {
			t.Fatalf("%d errors, want 1: %q", len(r.errors), r.errors)
		}
		for _, want := range []string{"racy", "WARNING: DATA RACE", "main.serve()"} {
			if !strings.Contains(r.errors[0], want) {
				t.Errorf("the error lacks %q:\n%s", want, r.errors[0])
			}
		}
		if strings.Contains(r.errors[0], "still serving") {
			t.Errorf("the error holds lines after the report:\n%s", r.errors[0])
		}
	}
}

// errRecorder is a recorder that keeps the errors reported.
type errRecorder struct {
	recorder
	errors []string
}

func (r *errRecorder) Errorf(format string, args ...any) {
	r.errors = append(r.errors, fmt.Sprintf(format, args...))
}
