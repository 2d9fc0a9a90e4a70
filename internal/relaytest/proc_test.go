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
