package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// histogram counts latencies in buckets 2% wide (log scale from 1 µs),
// so that results of many pods merge exactly and percentiles come out
// within 2%.
type histogram struct {
	Counts map[int]uint64 `json:"counts"` // bucket -> samples
	N      uint64         `json:"n"`
	SumUS  float64        `json:"sum_us"`
	MaxUS  float64        `json:"max_us"`
}

const bucketGrowth = 1.02

var logGrowth = math.Log(bucketGrowth)

func newHistogram() *histogram { return &histogram{Counts: map[int]uint64{}} }

func (h *histogram) add(d time.Duration) {
	us := math.Max(float64(d.Nanoseconds())/1e3, 1)
	h.Counts[int(math.Log(us)/logGrowth)]++
	h.N++
	h.SumUS += us
	h.MaxUS = math.Max(h.MaxUS, us)
}

func (h *histogram) merge(o *histogram) {
	for b, n := range o.Counts {
		h.Counts[b] += n
	}
	h.N += o.N
	h.SumUS += o.SumUS
	h.MaxUS = math.Max(h.MaxUS, o.MaxUS)
}

// quantile in µs: the upper edge of the bucket holding the q-th sample
// (never above the largest sample).
func (h *histogram) quantile(q float64) float64 {
	if h.N == 0 {
		return 0
	}
	keys := make([]int, 0, len(h.Counts))
	for k := range h.Counts {
		keys = append(keys, k)
	}
	sort.Ints(keys)
	rank := uint64(math.Ceil(q * float64(h.N)))
	var seen uint64
	for _, k := range keys {
		seen += h.Counts[k]
		if seen >= max(rank, 1) {
			return math.Min(math.Pow(bucketGrowth, float64(k+1)), h.MaxUS)
		}
	}
	return h.MaxUS
}

// result is what a scenario measured, in a form that merges: counts and
// errors add up, histograms merge, peaks take the largest, and figures
// are derived again from the merged whole.
type result struct {
	Scenario  string                `json:"scenario"`
	Transport string                `json:"transport,omitempty"`
	Runs      int                   `json:"runs"`
	Seconds   float64               `json:"seconds"`
	Params    map[string]any        `json:"params,omitempty"`
	Counts    map[string]float64    `json:"counts"`
	Errors    map[string]int        `json:"errors"` // failures by cause
	Latency   map[string]*histogram `json:"latency"`
	Peaks     map[string]float64    `json:"peaks,omitempty"`
	Figures   map[string]float64    `json:"figures"`
	// Thresholds are the verdicts of --threshold, by expression.
	Thresholds map[string]bool `json:"thresholds,omitempty"`
	// Steps of a breakpoint run, in order.
	Steps []rateStep `json:"steps,omitempty"`

	mu sync.Mutex // guards the maps while the scenario runs
}

func newResult(scenario, transport string) *result {
	return &result{Scenario: scenario, Transport: transport, Runs: 1, Params: map[string]any{}, Counts: map[string]float64{},
		Errors: map[string]int{}, Latency: map[string]*histogram{}, Peaks: map[string]float64{}, Figures: map[string]float64{}}
}

func (r *result) count(name string, n float64) {
	r.mu.Lock()
	r.Counts[name] += n
	r.mu.Unlock()
}

// get returns counter name's value.
func (r *result) get(name string) float64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.Counts[name]
}

func (r *result) fail(cause string) {
	r.mu.Lock()
	r.Errors[cause]++
	r.mu.Unlock()
}

func (r *result) observe(name string, d time.Duration) {
	r.mu.Lock()
	h := r.Latency[name]
	if h == nil {
		h = newHistogram()
		r.Latency[name] = h
	}
	h.add(d)
	r.mu.Unlock()
}

func (r *result) peak(name string, v float64) {
	r.mu.Lock()
	if old, ok := r.Peaks[name]; !ok || v > old {
		r.Peaks[name] = v
	}
	r.mu.Unlock()
}

func (r *result) snapshot() (counts map[string]float64, errs int, lat map[string]float64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	counts = map[string]float64{}
	for k, v := range r.Counts {
		counts[k] = v
	}
	for _, n := range r.Errors {
		errs += n
	}
	lat = map[string]float64{}
	for k, h := range r.Latency {
		lat[k] = h.quantile(0.99)
	}
	return counts, errs, lat
}

// derive computes the figures: per-second rates of every count, the
// percentiles of every latency, and the error rate (failures per
// attempt, when the scenario counts attempts).
func (r *result) derive() {
	if _, ok := r.Counts["attempts"]; ok {
		r.Counts["failed"] += 0 // a threshold on failures finds it at zero too
	}
	r.Figures = map[string]float64{}
	for k, v := range r.Counts {
		if r.Seconds > 0 {
			r.Figures[k+"_per_s"] = v / r.Seconds
		}
	}
	for k, h := range r.Latency {
		r.Figures[k+"_p50_ms"] = h.quantile(0.50) / 1e3
		r.Figures[k+"_p90_ms"] = h.quantile(0.90) / 1e3
		r.Figures[k+"_p95_ms"] = h.quantile(0.95) / 1e3
		r.Figures[k+"_p99_ms"] = h.quantile(0.99) / 1e3
		r.Figures[k+"_max_ms"] = h.MaxUS / 1e3
	}
	failures := 0
	for _, n := range r.Errors {
		failures += n
	}
	r.Figures["errors"] = float64(failures)
	if a := r.Counts["attempts"]; a > 0 {
		r.Figures["error_rate"] = r.Counts["failed"] / a
		if d, ok := r.Counts["dropped"]; ok {
			// Turns an open loop skipped (see drive): not errors of the
			// edge's, but the rate asked for was not sent.
			r.Figures["drop_rate"] = d / a
		}
	}
}

// rateStep is one step of a breakpoint run.
type rateStep struct {
	Rate      float64 `json:"rate"`
	AckedPerS float64 `json:"acked_per_s"`
	AckP50Ms  float64 `json:"ack_p50_ms"`
	AckP99Ms  float64 `json:"ack_p99_ms"`
	Failed    float64 `json:"failed"`
	// Dropped counts the events not sent because their pair already had
	// maxOutstanding waiting for acks.
	Dropped float64 `json:"dropped"`
	Held    bool    `json:"held"`
}

// merge adds o's counts, failures and latencies into r.
func (r *result) merge(o *result) {
	for k, v := range o.Counts {
		r.Counts[k] += v
	}
	for k, v := range o.Errors {
		r.Errors[k] += v
	}
	for k, h := range o.Latency {
		if r.Latency[k] == nil {
			r.Latency[k] = newHistogram()
		}
		r.Latency[k].merge(h)
	}
	for k, v := range o.Peaks {
		r.Peaks[k] = math.Max(r.Peaks[k], v)
	}
}

// mergeResults adds up results of the same scenario (pods of one Job).
func mergeResults(rs []*result) (*result, error) {
	if len(rs) == 0 {
		return nil, errors.New("no results to merge")
	}
	out := newResult(rs[0].Scenario, rs[0].Transport)
	out.Runs = 0
	out.Params = rs[0].Params
	for _, r := range rs {
		if r.Scenario != out.Scenario {
			return nil, fmt.Errorf("cannot merge a %s result into %s results", r.Scenario, out.Scenario)
		}
		out.Runs += max(r.Runs, 1)
		out.Seconds = math.Max(out.Seconds, r.Seconds) // the pods ran side by side
		out.merge(r)
	}
	out.derive()
	return out, nil
}

// threshold is one --threshold: a figure, count or peak compared with a
// number, e.g. "ack_p99_ms<50", "error_rate<=0.01", "resumed_per_s>100".
type threshold struct {
	expr, name, op string
	value          float64
}

var thresholdRe = regexp.MustCompile(`^\s*([a-z0-9_]+)\s*(<=|>=|==|!=|<|>)\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*$`)

func parseThreshold(s string) (threshold, error) {
	m := thresholdRe.FindStringSubmatch(s)
	if m == nil {
		return threshold{}, fmt.Errorf("threshold %q: want NAME OP NUMBER, e.g. ack_p99_ms<50", s)
	}
	v, err := strconv.ParseFloat(m[3], 64)
	if err != nil {
		return threshold{}, fmt.Errorf("threshold %q: %w", s, err)
	}
	return threshold{expr: strings.ReplaceAll(s, " ", ""), name: m[1], op: m[2], value: v}, nil
}

// thresholds is the repeatable --threshold flag.
type thresholds []threshold

func (t *thresholds) String() string {
	var s []string
	for _, x := range *t {
		s = append(s, x.expr)
	}
	return strings.Join(s, ",")
}

func (t *thresholds) Set(s string) error {
	for part := range strings.SplitSeq(s, ",") {
		th, err := parseThreshold(part)
		if err != nil {
			return err
		}
		*t = append(*t, th)
	}
	return nil
}

// errThresholds says a run measured what it should but missed a threshold.
var errThresholds = errors.New("thresholds failed")

// check evaluates the thresholds on r; a name r does not have is an
// error (a typo must not pass silently).
func (t thresholds) check(r *result) error {
	if len(t) == 0 {
		return nil
	}
	r.Thresholds = map[string]bool{}
	failed := false
	for _, th := range t {
		v, ok := r.Figures[th.name]
		if !ok {
			v, ok = r.Counts[th.name]
		}
		if !ok {
			v, ok = r.Peaks[th.name]
		}
		if !ok {
			names := slices.Concat(slices.Collect(mapKeys(r.Figures)), slices.Collect(mapKeys(r.Counts)), slices.Collect(mapKeys(r.Peaks)))
			slices.Sort(names)
			return fmt.Errorf("threshold %s: %s measured no %q (it has %s)", th.expr, r.Scenario, th.name, strings.Join(names, ", "))
		}
		var pass bool
		switch th.op {
		case "<":
			pass = v < th.value
		case "<=":
			pass = v <= th.value
		case ">":
			pass = v > th.value
		case ">=":
			pass = v >= th.value
		case "==":
			pass = v == th.value
		case "!=":
			pass = v != th.value
		}
		r.Thresholds[th.expr] = pass
		failed = failed || !pass
	}
	if failed {
		return errThresholds
	}
	return nil
}

func mapKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// write prints r as one JSON object, or as aligned text for people.
func (r *result) write(w io.Writer, asJSON bool) error {
	if asJSON {
		return json.NewEncoder(w).Encode(r)
	}
	fmt.Fprintf(w, "%s", r.Scenario)
	if r.Transport != "" {
		fmt.Fprintf(w, " over %s", r.Transport)
	}
	fmt.Fprintf(w, ": %.1fs", r.Seconds)
	if r.Runs > 1 {
		fmt.Fprintf(w, ", %d runs merged", r.Runs)
	}
	fmt.Fprintln(w)
	section := func(title string, m map[string]float64) {
		if len(m) == 0 {
			return
		}
		fmt.Fprintf(w, "  %s\n", title)
		for _, k := range slices.Sorted(mapKeys(m)) {
			fmt.Fprintf(w, "    %-30s %s\n", k, strconv.FormatFloat(m[k], 'f', -1, 64))
		}
	}
	params := map[string]float64{}
	for k, v := range r.Params {
		if f, ok := v.(float64); ok {
			params[k] = f
		}
	}
	section("parameters", params)
	section("counts", r.Counts)
	section("figures", roundAll(r.Figures))
	section("peaks", r.Peaks)
	if len(r.Errors) > 0 {
		fmt.Fprintf(w, "  failures by cause\n")
		for _, k := range slices.Sorted(mapKeys(r.Errors)) {
			fmt.Fprintf(w, "    %-30s %d\n", k, r.Errors[k])
		}
	}
	if len(r.Steps) > 0 {
		fmt.Fprintf(w, "  steps\n    %10s %10s %10s %10s %7s\n", "rate", "acked/s", "p50 ms", "p99 ms", "failed")
		for _, s := range r.Steps {
			verdict := "held"
			if !s.Held {
				verdict = "broke"
			}
			fmt.Fprintf(w, "    %10.0f %10.1f %10.2f %10.2f %7.0f %s\n", s.Rate, s.AckedPerS, s.AckP50Ms, s.AckP99Ms, s.Failed, verdict)
		}
	}
	if len(r.Thresholds) > 0 {
		fmt.Fprintf(w, "  thresholds\n")
		for _, k := range slices.Sorted(mapKeys(r.Thresholds)) {
			verdict := "ok"
			if !r.Thresholds[k] {
				verdict = "FAILED"
			}
			fmt.Fprintf(w, "    %-30s %s\n", k, verdict)
		}
	}
	return nil
}

func roundAll(m map[string]float64) map[string]float64 {
	out := map[string]float64{}
	for k, v := range m {
		out[k] = math.Round(v*1000) / 1000
	}
	return out
}
