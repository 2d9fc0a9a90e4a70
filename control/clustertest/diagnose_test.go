package clustertest

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeTB records what a failing test would report; its temp dirs come
// from the real test.
type fakeTB struct {
	*testing.T
	cleanups []func()
	fatal    string
	failed   bool
	logs     []string
}

// fatalCalled is what Fatalf panics with; its message shows if a call
// the test did not expect panics out of it.
type fatalCalled struct{ msg string }

func (f *fakeTB) Fatal(args ...any) { f.Fatalf("%s", fmt.Sprint(args...)) }
func (f *fakeTB) Fatalf(format string, args ...any) {
	f.fatal, f.failed = fmt.Sprintf(format, args...), true
	panic(fatalCalled{f.fatal})
}
func (f *fakeTB) Errorf(format string, args ...any) {
	f.failed = true
	f.logs = append(f.logs, fmt.Sprintf(format, args...))
}
func (f *fakeTB) Cleanup(fn func()) { f.cleanups = append(f.cleanups, fn) }
func (f *fakeTB) Failed() bool      { return f.failed }
func (f *fakeTB) Logf(format string, args ...any) {
	f.logs = append(f.logs, fmt.Sprintf(format, args...))
}

func (f *fakeTB) runCleanups() {
	for i := len(f.cleanups) - 1; i >= 0; i-- {
		f.cleanups[i]()
	}
}

// A wait that fails names every node's view of the cluster, and a failed
// test gets the nodes' last log lines: a flake in CI, where logs are
// off, says what the cluster was doing.
func TestAFailedWaitDescribesTheCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a cluster")
	}
	t.Setenv("RELAY_TEST_LOG", "")
	ft := &fakeTB{T: t}
	defer ft.runCleanups()
	c := Start(ft, 2, Options{})
	leader := c.Nodes[c.Leader()].ID
	func() {
		defer func() {
			if r := recover(); r != nil {
				if _, ok := r.(fatalCalled); !ok {
					panic(r)
				}
			}
		}()
		c.eventually(50*time.Millisecond, func() error { return errors.New("never true") })
		t.Fatal("eventually returned for a condition that never held")
	}()
	for _, want := range []string{"never true", "n1: ", "n2: ", "Leader", `leader="` + leader + `"`, "[n1 voter=true", "[n2 voter=true"} {
		if !strings.Contains(ft.fatal, want) {
			t.Errorf("failure %q does not contain %q", ft.fatal, want)
		}
	}
	ft.runCleanups()
	ft.cleanups = nil
	if len(ft.logs) != 1 {
		t.Fatalf("a failed test logged %d messages, want the log tail: %q", len(ft.logs), ft.logs)
	}
	for _, want := range []string{"test_node=n1", "test_node=n2", "caught up with the leader"} {
		if !strings.Contains(ft.logs[0], want) {
			t.Errorf("the log tail does not contain %q:\n%s", want, ft.logs[0])
		}
	}
}

// The tail keeps the newest lines, oldest first, once it wrapped.
func TestLogTailKeepsTheNewestLines(t *testing.T) {
	l := newLogTail()
	for i := 0; i < tailLines+3; i++ {
		fmt.Fprintf(l, "line %d\n", i)
	}
	lines := strings.Split(l.String(), "\n")
	if len(lines) != tailLines || lines[0] != "line 3" || lines[len(lines)-1] != fmt.Sprintf("line %d", tailLines+2) {
		t.Fatalf("tail has %d lines from %q to %q", len(lines), lines[0], lines[len(lines)-1])
	}
	short := newLogTail()
	fmt.Fprintf(short, "one\n")
	fmt.Fprintf(short, "two\n")
	if got := short.String(); got != "one\ntwo" {
		t.Fatalf("short tail = %q", got)
	}
}
