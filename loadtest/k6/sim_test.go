package k6

// This file and sim_modules_test.go are a test aid, not a k6: they run
// the committed bundles in github.com/grafana/sobek (the JavaScript
// engine k6 is built on) with just the k6 modules the scripts import,
// on real HTTP and WebSocket connections, so `go test` proves that the
// scripts work against a live relay without k6 installed (k6's Go module
// cannot be fetched here). What it does NOT do: k6's executors (a run is
// a fixed number of iterations on a fixed number of VUs per scenario),
// tags and sub-metrics, cloud or output plugins. It refuses what k6 does
// not offer: an import of a module or export it does not know fails the
// link, and the global object holds ECMAScript's built-ins plus only
// k6's own globals (console, __ENV, __VU, __ITER and the timers), so a
// script that leans on a browser or Node global (Buffer, process,
// window, fetch) fails with a ReferenceError. It offers a subset of k6:
// k6's require(), its WebCrypto global and its TextEncoder (newer
// releases) are left out, so the suite cannot come to depend on them.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/grafana/sobek"
)

// simRun is what one run of a bundle is given.
type simRun struct {
	Bundle string            // path of the bundled script
	Env    map[string]string // __ENV
	// VUs and Iterations per scenario: each scenario's exec function runs
	// Iterations times on each of VUs VUs (sequentially per VU, the VUs
	// in parallel), whatever its executor says.
	VUs, Iterations int
	// IterationTimeout bounds one iteration with its event loop.
	IterationTimeout time.Duration
	// Dir receives handleSummary's files (relative paths).
	Dir string
	Log func(format string, args ...any)
}

// simResult is what a run produced.
type simResult struct {
	Checks     map[string][2]int // name -> passes, fails
	Thresholds map[string]bool   // "metric: expr" -> ok
	Metrics    map[string]map[string]float64
	Errors     []string // exceptions that ended an iteration, setup or teardown
	Stdout     string   // handleSummary's stdout
	Files      map[string]string
}

// Passed is k6's verdict: no threshold failed, no check failed, nothing threw.
func (r *simResult) Passed() bool {
	for _, ok := range r.Thresholds {
		if !ok {
			return false
		}
	}
	for _, c := range r.Checks {
		if c[1] > 0 {
			return false
		}
	}
	return len(r.Errors) == 0
}

// sim is one run in progress: what its VUs share.
type sim struct {
	cfg     simRun
	source  string
	options map[string]any
	metrics *registry
	started time.Time

	mu     sync.Mutex // guards the fields below
	checks map[string]*[2]int
	errs   []string
}

// runBundle runs a bundle as `k6 run` would run it: init (options),
// setup, every scenario's exec function, teardown, thresholds,
// handleSummary.
func runBundle(ctx context.Context, cfg simRun) (*simResult, error) {
	src, err := os.ReadFile(cfg.Bundle)
	if err != nil {
		return nil, err
	}
	if cfg.Log == nil {
		cfg.Log = func(string, ...any) {}
	}
	s := &sim{cfg: cfg, source: string(src), metrics: newRegistry(), checks: map[string]*[2]int{}, started: time.Now()}
	s.metrics.builtins()

	// The init context: options, and the exports the run needs.
	initVU, err := s.newVU(ctx, 0, "")
	if err != nil {
		return nil, err
	}
	defer initVU.close()
	if o := initVU.export("options"); o != nil {
		if err := json.Unmarshal([]byte(mustJSON(initVU.rt, o)), &s.options); err != nil {
			return nil, fmt.Errorf("options: %w", err)
		}
	}
	if err := s.metrics.setThresholds(s.options["thresholds"]); err != nil {
		return nil, err
	}

	// setup(): its result reaches every VU as JSON, as in k6.
	dataJSON := "undefined"
	if f := initVU.export("setup"); f != nil {
		v, err := initVU.call(ctx, "setup", f, nil, 10*time.Minute)
		if err != nil {
			return nil, fmt.Errorf("setup: %w", err)
		}
		if v != nil && !sobek.IsUndefined(v) {
			dataJSON = mustJSON(initVU.rt, v)
		}
	}

	scenarios := map[string]string{"default": "default"}
	if sc, ok := s.options["scenarios"].(map[string]any); ok && len(sc) > 0 {
		scenarios = map[string]string{}
		for name, v := range sc {
			exec := "default"
			if m, ok := v.(map[string]any); ok {
				if e, ok := m["exec"].(string); ok && e != "" {
					exec = e
				}
			}
			scenarios[name] = exec
		}
	}
	names := make([]string, 0, len(scenarios))
	for n := range scenarios {
		names = append(names, n)
	}
	sort.Strings(names)
	vuID := 0
	for _, name := range names {
		var wg sync.WaitGroup
		for range max(cfg.VUs, 1) {
			vuID++
			id := vuID
			wg.Go(func() { s.runVU(ctx, id, name, scenarios[name], dataJSON) })
		}
		wg.Wait()
	}

	if f := initVU.export("teardown"); f != nil {
		if _, err := initVU.call(ctx, "teardown", f, []sobek.Value{initVU.parse(dataJSON)}, 10*time.Minute); err != nil {
			s.fail("teardown: %v", err)
		}
	}

	res := &simResult{Checks: map[string][2]int{}, Files: map[string]string{}}
	s.mu.Lock()
	for k, v := range s.checks {
		res.Checks[k] = *v
	}
	res.Errors = append(res.Errors, s.errs...)
	s.mu.Unlock()
	summary, thresholds := s.metrics.summary(time.Since(s.started), s.options)
	res.Thresholds = thresholds
	res.Metrics = map[string]map[string]float64{}
	for k, m := range summary {
		res.Metrics[k] = m["values"].(map[string]float64)
	}

	if f := initVU.export("handleSummary"); f != nil {
		data := map[string]any{
			"metrics":    summary,
			"root_group": map[string]any{"name": "", "path": "", "id": "", "groups": []any{}, "checks": s.checkList(res.Checks)},
			"state":      map[string]any{"testRunDurationMs": float64(time.Since(s.started).Milliseconds()), "isStdOutTTY": false, "isStdErrTTY": false},
			"options":    s.options,
		}
		b, _ := json.Marshal(data)
		out, err := initVU.call(ctx, "handleSummary", f, []sobek.Value{initVU.parse(string(b))}, time.Minute)
		if err != nil {
			return nil, fmt.Errorf("handleSummary: %w", err)
		}
		var files map[string]string
		if err := initVU.rt.ExportTo(out, &files); err != nil {
			return nil, fmt.Errorf("handleSummary returned %v: %w", out, err)
		}
		for path, content := range files {
			switch path {
			case "stdout":
				res.Stdout = content
			case "stderr":
				cfg.Log("%s", content)
			default:
				res.Files[path] = content
				p := path
				if !filepath.IsAbs(p) {
					p = filepath.Join(cfg.Dir, p)
				}
				if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
					return nil, err
				}
			}
		}
	}
	return res, nil
}

func (s *sim) checkList(checks map[string][2]int) []any {
	var out []any
	for name, c := range checks {
		out = append(out, map[string]any{"name": name, "path": "::" + name, "id": name, "passes": c[0], "fails": c[1]})
	}
	return out
}

func (s *sim) fail(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	s.cfg.Log("%s", msg)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.errs = append(s.errs, msg)
}

func (s *sim) check(name string, ok bool) {
	s.mu.Lock()
	c := s.checks[name]
	if c == nil {
		c = &[2]int{}
		s.checks[name] = c
	}
	if ok {
		c[0]++
	} else {
		c[1]++
	}
	s.mu.Unlock()
	s.metrics.add("checks", b2f(ok))
}

func (s *sim) runVU(ctx context.Context, id int, scenario, execName, dataJSON string) {
	vu, err := s.newVU(ctx, id, scenario)
	if err != nil {
		s.fail("VU %d: %v", id, err)
		return
	}
	defer vu.close()
	f := vu.export(execName)
	if f == nil {
		s.fail("scenario %s: the script exports no function %q", scenario, execName)
		return
	}
	data := vu.parse(dataJSON)
	for i := range max(s.cfg.Iterations, 1) {
		vu.iter = i
		vu.rt.Set("__ITER", i)
		vu.setExecution()
		start := time.Now()
		_, err := vu.call(ctx, execName, f, []sobek.Value{data}, s.cfg.IterationTimeout)
		s.metrics.add("iteration_duration", float64(time.Since(start).Microseconds())/1e3)
		s.metrics.add("iterations", 1)
		if err != nil {
			s.fail("scenario %s, VU %d, iteration %d: %v", scenario, id, i, err)
		}
	}
}

// vu is one virtual user: its own runtime and event loop, as in k6.
type vu struct {
	s        *sim
	id       int
	iter     int
	scenario string
	rt       *sobek.Runtime
	mod      sobek.ModuleRecord
	loop     *eventLoop
	exec     *sobek.Object // k6/execution's default export

	closers map[int]func() // open connections and timers, stopped with the iteration
	nextID  int
	onClose []func() // run when the VU ends
}

// own registers what must be stopped when an iteration ends abnormally;
// the returned func forgets it (once it stopped by itself).
func (v *vu) own(stop func()) (forget func()) {
	v.nextID++
	id := v.nextID
	v.closers[id] = stop
	return func() { delete(v.closers, id) }
}

func (s *sim) newVU(ctx context.Context, id int, scenario string) (*vu, error) {
	v := &vu{s: s, id: id, scenario: scenario, rt: sobek.New(), loop: newEventLoop(), closers: map[int]func(){}}
	v.rt.SetFieldNameMapper(sobek.UncapFieldNameMapper())
	v.globals()
	natives := v.modules(ctx)
	var resolve sobek.HostResolveImportedModuleFunc
	var main *sobek.SourceTextModuleRecord
	resolve = func(_ any, specifier string) (sobek.ModuleRecord, error) {
		if specifier == "main" {
			return main, nil
		}
		if m, ok := natives[specifier]; ok {
			return m, nil
		}
		return nil, fmt.Errorf("module %q is not one k6 offers to this suite (the test adapter knows %s)", specifier, strings.Join(sortedKeys(natives), ", "))
	}
	m, err := sobek.ParseModule(filepath.Base(s.cfg.Bundle), s.source, resolve)
	if err != nil {
		return nil, fmt.Errorf("parse %s: %w", s.cfg.Bundle, err)
	}
	main = m
	if err := m.Link(); err != nil {
		return nil, fmt.Errorf("link %s: %w", s.cfg.Bundle, err)
	}
	p := v.rt.CyclicModuleRecordEvaluate(m, resolve)
	switch p.State() {
	case sobek.PromiseStateRejected:
		return nil, fmt.Errorf("init %s: %v", s.cfg.Bundle, p.Result())
	case sobek.PromiseStatePending:
		return nil, errors.New("init: top-level await is not supported by k6")
	}
	v.mod = m
	return v, nil
}

// globals installs k6's globals and nothing else.
func (v *vu) globals() {
	rt := v.rt
	env := rt.NewObject()
	for k, val := range v.s.cfg.Env {
		_ = env.Set(k, val)
	}
	_ = rt.Set("__ENV", env)
	_ = rt.Set("__VU", v.id)
	_ = rt.Set("__ITER", 0)
	console := rt.NewObject()
	for _, level := range []string{"log", "info", "warn", "error", "debug"} {
		_ = console.Set(level, func(call sobek.FunctionCall) sobek.Value {
			parts := make([]string, len(call.Arguments))
			for i, a := range call.Arguments {
				parts[i] = a.String()
			}
			v.s.cfg.Log("VU %d %s: %s", v.id, level, strings.Join(parts, " "))
			return sobek.Undefined()
		})
	}
	_ = rt.Set("console", console)
	timers := v.timers()
	for _, name := range []string{"setTimeout", "clearTimeout", "setInterval", "clearInterval"} {
		_ = rt.Set(name, timers.Get(name))
	}
}

func (v *vu) export(name string) sobek.Value {
	b := v.rt.NamespaceObjectFor(v.mod).Get(name)
	if b == nil || sobek.IsUndefined(b) {
		return nil
	}
	return b
}

func (v *vu) parse(s string) sobek.Value {
	if s == "undefined" {
		return sobek.Undefined()
	}
	j := v.rt.Get("JSON").ToObject(v.rt)
	parse, _ := sobek.AssertFunction(j.Get("parse"))
	out, err := parse(j, v.rt.ToValue(s))
	if err != nil {
		panic(err)
	}
	return out
}

func mustJSON(rt *sobek.Runtime, val sobek.Value) string {
	j := rt.Get("JSON").ToObject(rt)
	stringify, _ := sobek.AssertFunction(j.Get("stringify"))
	out, err := stringify(j, val)
	if err != nil {
		panic(err)
	}
	if sobek.IsUndefined(out) {
		return "undefined"
	}
	return out.String()
}

// call runs f(args) and then the event loop until the returned promise
// (if any) settled and nothing is pending: an iteration in k6 ends when
// its event loop is empty.
func (v *vu) call(ctx context.Context, what string, f sobek.Value, args []sobek.Value, timeout time.Duration) (sobek.Value, error) {
	fn, ok := sobek.AssertFunction(f)
	if !ok {
		return nil, fmt.Errorf("%s is not a function", what)
	}
	if timeout <= 0 {
		timeout = time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var ret sobek.Value
	var callErr error
	v.loop.run(func() {
		ret, callErr = fn(sobek.Undefined(), args...)
	})
	if callErr != nil {
		v.loop.reset()
		v.closeConns()
		return nil, callErr
	}
	if err := v.loop.wait(ctx, v.rt); err != nil {
		v.loop.reset()
		v.closeConns()
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if p, ok := ret.Export().(*sobek.Promise); ok {
		switch p.State() {
		case sobek.PromiseStateRejected:
			return nil, fmt.Errorf("%s: uncaught (in promise) %v", what, p.Result())
		case sobek.PromiseStatePending:
			return nil, fmt.Errorf("%s: its promise never settled and nothing is left to settle it", what)
		}
		return p.Result(), nil
	}
	return ret, nil
}

func (v *vu) closeConns() {
	for id, c := range v.closers {
		delete(v.closers, id)
		c()
	}
}

func (v *vu) close() {
	v.closeConns()
	v.loop.reset()
	for _, f := range v.onClose {
		f()
	}
}

// eventLoop runs callbacks on the VU's goroutine: what timers and
// connections report from their own goroutines is queued here, and a
// reference count says whether anything may still report.
type eventLoop struct {
	mu     sync.Mutex // guards queue
	queue  []func()
	wake   chan struct{}
	refs   atomic.Int64
	failed error // an exception in a callback; set and read on the loop's goroutine
}

func newEventLoop() *eventLoop { return &eventLoop{wake: make(chan struct{}, 1)} }

// hold says one more thing may enqueue callbacks; release undoes it.
func (l *eventLoop) hold()    { l.refs.Add(1) }
func (l *eventLoop) release() { l.refs.Add(-1); l.signal() }

func (l *eventLoop) enqueue(f func()) {
	l.mu.Lock()
	l.queue = append(l.queue, f)
	l.mu.Unlock()
	l.signal()
}

func (l *eventLoop) signal() {
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

func (l *eventLoop) run(f func()) { f() }

// wait runs queued callbacks until nothing is queued or held.
func (l *eventLoop) wait(ctx context.Context, rt *sobek.Runtime) error {
	for {
		l.mu.Lock()
		q := l.queue
		l.queue = nil
		l.mu.Unlock()
		for _, f := range q {
			f()
			if l.failed != nil {
				err := l.failed
				l.failed = nil
				return err
			}
		}
		if len(q) > 0 {
			continue
		}
		if l.refs.Load() == 0 {
			return nil
		}
		select {
		case <-l.wake:
		case <-ctx.Done():
			return fmt.Errorf("still waiting for %d timers or connections: %w", l.refs.Load(), ctx.Err())
		}
	}
}

func (l *eventLoop) reset() {
	l.mu.Lock()
	l.queue = nil
	l.mu.Unlock()
	l.failed = nil
}

// callback calls a JavaScript function from the loop; an exception ends
// the iteration, as an uncaught exception in a k6 callback does.
func (v *vu) callback(f sobek.Value, args ...sobek.Value) {
	fn, ok := sobek.AssertFunction(f)
	if !ok {
		return
	}
	if _, err := fn(sobek.Undefined(), args...); err != nil && v.loop.failed == nil {
		v.loop.failed = err
	}
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
