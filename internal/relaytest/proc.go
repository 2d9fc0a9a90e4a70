package relaytest

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/edge-relay/relay/control/clustertest"
)

// BuildRelayd builds cmd/relayd into dir and returns the binary's path.
// Tests call it once, from TestMain.
func BuildRelayd(dir string) (string, error) {
	out := filepath.Join(dir, "relayd")
	// Built as cmd/relayd's end-to-end tests build it, so the two share
	// the build cache.
	cmd := exec.Command("go", "build", "-o", out, "github.com/edge-relay/relay/cmd/relayd")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build relayd: %v: %s", err, b)
	}
	return out, nil
}

// Proc is a process started on a host, whose JSON log lines (slog's
// JSON handler on stderr) are kept and can be waited for.
type Proc struct {
	Name string
	cmd  *exec.Cmd

	mu     sync.Mutex // guards the fields below
	logs   []map[string]any
	tail   []string      // the last tailLines lines as written
	cond   chan struct{} // closed and replaced on each new line
	paused bool
	// races holds the race detector's first report (a binary built with
	// -race), raceLines lines at most; racing is set inside a report.
	races  []string
	racing bool

	done chan struct{}
	err  error // set before done is closed
}

// Start starts a process on the host; t.Cleanup kills it if it still
// runs. Its log lines go to the test log when RELAY_TEST_LOG is set.
func (h *Host) Start(t clustertest.TB, name string, env []string, bin string, args ...string) *Proc {
	t.Helper()
	cmd := h.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	return StartCmd(t, name, cmd)
}

// StartCmd starts cmd, whose standard error carries JSON log lines, as
// a Proc; t.Cleanup kills it if it still runs. Its log lines go to the
// test log when RELAY_TEST_LOG is set.
func StartCmd(t clustertest.TB, name string, cmd *exec.Cmd) *Proc {
	t.Helper()
	// A test binary that dies takes its processes with it.
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	p := &Proc{Name: name, cmd: cmd, cond: make(chan struct{}), done: make(chan struct{})}
	verbose := os.Getenv("RELAY_TEST_LOG") != ""
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			var rec map[string]any
			if json.Unmarshal(sc.Bytes(), &rec) != nil {
				rec = map[string]any{"msg": sc.Text()}
			}
			if verbose {
				fmt.Fprintf(os.Stderr, "[%s] %s\n", name, sc.Text())
			}
			p.mu.Lock()
			p.logs = append(p.logs, rec)
			if len(p.tail) == tailLines {
				p.tail = append(p.tail[:0], p.tail[1:]...)
			}
			p.tail = append(p.tail, sc.Text())
			p.scanRace(sc.Text())
			close(p.cond)
			p.cond = make(chan struct{})
			p.mu.Unlock()
		}
		err := cmd.Wait()
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
		close(p.done)
	}()
	t.Cleanup(func() {
		// A failed test shows how its process ended and what it said
		// last (a panic, a fatal error): the first thing to look at when
		// a process-level test fails in CI, where RELAY_TEST_LOG is off.
		if f, ok := t.(failedLogger); ok && f.Failed() && !verbose {
			exited := p.Exited()
			p.mu.Lock()
			tail, err := slices.Clone(p.tail), p.err
			p.mu.Unlock()
			state := "still running"
			if exited {
				state = fmt.Sprintf("exited: %v", err)
			}
			f.Logf("%s (pid %d) %s at the failure; its last %d lines:\n%s", name, p.Pid(), state, len(tail), strings.Join(tail, "\n"))
		}
		p.Kill()
		// A binary built with -race (the e2e tests build relayd so when
		// they run under -race) reports races and goes on: the test
		// fails on the report, whatever else it checked.
		p.mu.Lock()
		races := slices.Clone(p.races)
		p.mu.Unlock()
		if len(races) > 0 {
			t.Errorf("%s (pid %d): the race detector reported a data race:\n%s", name, p.Pid(), strings.Join(races, "\n"))
		}
	})
	return p
}

// raceLines bounds the race report a failed test shows.
const raceLines = 80

// scanRace keeps the lines of the race detector's first report; p.mu
// is held.
func (p *Proc) scanRace(line string) {
	switch {
	case strings.HasPrefix(line, "WARNING: DATA RACE") && p.races == nil:
		p.racing, p.races = true, []string{line}
	case p.racing && strings.HasPrefix(line, "=================="):
		p.racing = false
	case p.racing && len(p.races) < raceLines:
		p.races = append(p.races, line)
	}
}

// tailLines is how many of a process's last lines a failed test shows.
const tailLines = 40

// failedLogger is the part of testing.TB the failure report needs.
type failedLogger interface {
	Failed() bool
	Logf(format string, args ...any)
}

// Pid is the process id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Done is closed when the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has exited.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Err is how the process exited (nil while it runs or after exit 0).
func (p *Proc) Err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// Kill sends SIGKILL (continuing a paused process first is not needed)
// and waits for the exit.
func (p *Proc) Kill() {
	if p.Exited() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// Signal sends sig to the process.
func (p *Proc) Signal(sig os.Signal) error { return p.cmd.Process.Signal(sig) }

// Pause stops the process with SIGSTOP.
func (p *Proc) Pause() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.paused = true
	return p.cmd.Process.Signal(syscall.SIGSTOP)
}

// Resume continues a paused process with SIGCONT.
func (p *Proc) Resume() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.paused = false
	return p.cmd.Process.Signal(syscall.SIGCONT)
}

// Paused reports whether Pause was called without Resume.
func (p *Proc) Paused() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.paused
}

// Stop sends SIGTERM and waits up to within for a clean exit.
func (p *Proc) Stop(within time.Duration) error {
	if p.Exited() {
		return p.Err()
	}
	if p.Paused() {
		_ = p.Resume()
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return p.Err()
	case <-time.After(within):
		p.Kill()
		return fmt.Errorf("%s did not exit within %v of SIGTERM", p.Name, within)
	}
}

// WaitLog waits for a log record whose message is msg (and, if where is
// set, for which where returns true) and returns it.
func (p *Proc) WaitLog(msg string, within time.Duration, where func(map[string]any) bool) (map[string]any, error) {
	deadline := time.After(within)
	seen := 0
	for {
		p.mu.Lock()
		logs, ch := p.logs, p.cond
		p.mu.Unlock()
		for ; seen < len(logs); seen++ {
			if logs[seen]["msg"] == msg && (where == nil || where(logs[seen])) {
				return logs[seen], nil
			}
		}
		select {
		case <-ch:
		case <-p.done:
			// Lines read before the exit are all in by now.
			p.mu.Lock()
			n := len(p.logs)
			p.mu.Unlock()
			if n > seen {
				continue
			}
			return nil, fmt.Errorf("%s exited (%v) before logging %q; its last words:%s", p.Name, p.Err(), msg, p.LastLogs(8))
		case <-deadline:
			return nil, fmt.Errorf("%s did not log %q within %v; its last words:%s", p.Name, msg, within, p.LastLogs(8))
		}
	}
}

// CountLogs counts the log records with message msg so far.
func (p *Proc) CountLogs(msg string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, l := range p.logs {
		if l["msg"] == msg {
			n++
		}
	}
	return n
}

// AllLogs renders every log record, one JSON object a line.
func (p *Proc) AllLogs() []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	var b bytes.Buffer
	for _, l := range p.logs {
		line, _ := json.Marshal(l)
		b.Write(line)
		b.WriteByte('\n')
	}
	return b.Bytes()
}

// LastLogs renders the last n log records, for failure messages.
func (p *Proc) LastLogs(n int) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	logs := p.logs[max(0, len(p.logs)-n):]
	var b strings.Builder
	for _, l := range logs {
		fmt.Fprintf(&b, "\n  %v", l)
	}
	return b.String()
}
