package k6

// The test adapter's metrics (see sim_test.go): k6's four kinds, the
// built-in metrics the suite's thresholds may name, thresholds in k6's
// syntax ("p(95)<50", "rate<0.01", "max<=3000", ...), and the summary
// data handleSummary receives.

import (
	"fmt"
	"math"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

type metric struct {
	kind    string // counter, gauge, rate, trend
	isTime  bool
	samples []float64 // trend
	sum     float64   // counter, rate (trues)
	count   int
	last    float64 // gauge
	min     float64
	max     float64
}

type threshold struct {
	metric, expr string
	agg          string
	op           string
	value        float64
}

type registry struct {
	mu         sync.Mutex // guards the fields below
	metrics    map[string]*metric
	thresholds []threshold
}

func newRegistry() *registry { return &registry{metrics: map[string]*metric{}} }

// builtins declares the k6 built-in metrics this adapter produces.
func (r *registry) builtins() {
	for name, kind := range map[string]string{
		"checks": "rate", "http_reqs": "counter", "http_req_failed": "rate", "iterations": "counter",
	} {
		_ = r.declare(name, kind, false)
	}
	_ = r.declare("http_req_duration", "trend", true)
	_ = r.declare("iteration_duration", "trend", true)
}

func (r *registry) declare(name, kind string, isTime bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if m, ok := r.metrics[name]; ok {
		if m.kind != kind {
			return fmt.Errorf("metric %q is a %s already", name, m.kind)
		}
		return nil
	}
	r.metrics[name] = &metric{kind: kind, isTime: isTime, min: math.Inf(1), max: math.Inf(-1)}
	return nil
}

func (r *registry) add(name string, v float64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := r.metrics[name]
	if m == nil {
		return
	}
	m.count++
	m.min = math.Min(m.min, v)
	m.max = math.Max(m.max, v)
	switch m.kind {
	case "trend":
		m.samples = append(m.samples, v)
	case "counter", "rate":
		m.sum += v
	case "gauge":
		m.last = v
	}
}

var thresholdRe = regexp.MustCompile(`^\s*(avg|min|max|med|count|rate|value|p\((\d+(?:\.\d+)?)\))\s*(<=|>=|===|==|!=|<|>)\s*(-?[0-9.]+(?:e-?\d+)?)\s*$`)

// setThresholds reads options.thresholds: {metric: [expr | {threshold}]}.
func (r *registry) setThresholds(opt any) error {
	if opt == nil {
		return nil
	}
	m, ok := opt.(map[string]any)
	if !ok {
		return fmt.Errorf("thresholds: %T is not an object", opt)
	}
	for name, list := range m {
		r.mu.Lock()
		_, known := r.metrics[name]
		r.mu.Unlock()
		if !known {
			return fmt.Errorf("threshold on %q, a metric the script never declares (k6 refuses this too)", name)
		}
		items, ok := list.([]any)
		if !ok {
			items = []any{list}
		}
		for _, it := range items {
			expr, _ := it.(string)
			if o, ok := it.(map[string]any); ok {
				expr, _ = o["threshold"].(string)
			}
			sm := thresholdRe.FindStringSubmatch(expr)
			if sm == nil {
				return fmt.Errorf("threshold %q on %s: not an expression this adapter (or k6) understands", expr, name)
			}
			val, err := strconv.ParseFloat(sm[4], 64)
			if err != nil {
				return fmt.Errorf("threshold %q: %w", expr, err)
			}
			r.thresholds = append(r.thresholds, threshold{metric: name, expr: expr, agg: sm[1], op: sm[3], value: val})
		}
	}
	return nil
}

func (m *metric) values(d time.Duration, trendStats []string) map[string]float64 {
	out := map[string]float64{}
	switch m.kind {
	case "counter":
		out["count"] = m.sum
		out["rate"] = m.sum / math.Max(d.Seconds(), 1e-9)
	case "rate":
		out["passes"] = m.sum
		out["fails"] = float64(m.count) - m.sum
		out["rate"] = 0
		if m.count > 0 {
			out["rate"] = m.sum / float64(m.count)
		}
	case "gauge":
		out["value"], out["min"], out["max"] = m.last, zeroInf(m.min), zeroInf(m.max)
	case "trend":
		s := slices.Clone(m.samples)
		slices.Sort(s)
		for _, st := range trendStats {
			out[st] = trendStat(s, st)
		}
	}
	return out
}

func zeroInf(f float64) float64 {
	if math.IsInf(f, 0) {
		return 0
	}
	return f
}

// trendStat is k6's: avg, min, med, max, count, p(N) with linear
// interpolation between the closest ranks.
func trendStat(sorted []float64, st string) float64 {
	if len(sorted) == 0 {
		return 0
	}
	switch st {
	case "avg":
		sum := 0.0
		for _, x := range sorted {
			sum += x
		}
		return sum / float64(len(sorted))
	case "min":
		return sorted[0]
	case "max":
		return sorted[len(sorted)-1]
	case "med":
		return trendStat(sorted, "p(50)")
	case "count":
		return float64(len(sorted))
	}
	if strings.HasPrefix(st, "p(") && strings.HasSuffix(st, ")") {
		p, err := strconv.ParseFloat(st[2:len(st)-1], 64)
		if err != nil {
			return math.NaN()
		}
		pos := p / 100 * float64(len(sorted)-1)
		lo := int(math.Floor(pos))
		hi := min(lo+1, len(sorted)-1)
		return sorted[lo] + (sorted[hi]-sorted[lo])*(pos-float64(lo))
	}
	return math.NaN()
}

func (t threshold) holds(m *metric, d time.Duration) bool {
	var x float64
	switch t.agg {
	case "count":
		x = float64(m.count)
		if m.kind == "counter" {
			x = m.sum
		}
	case "rate":
		x = m.values(d, nil)["rate"]
	case "value":
		x = m.last
	default:
		s := slices.Clone(m.samples)
		slices.Sort(s)
		x = trendStat(s, t.agg)
	}
	switch t.op {
	case "<":
		return x < t.value
	case "<=":
		return x <= t.value
	case ">":
		return x > t.value
	case ">=":
		return x >= t.value
	case "==", "===":
		return x == t.value
	case "!=":
		return x != t.value
	}
	return false
}

// summary is handleSummary's data.metrics, and each threshold's verdict
// ("metric: expr" -> ok). Metrics without samples are left out, as k6
// does, unless a threshold names them.
func (r *registry) summary(d time.Duration, options map[string]any) (map[string]map[string]any, map[string]bool) {
	stats := []string{"avg", "min", "med", "max", "p(90)", "p(95)"}
	if ts, ok := options["summaryTrendStats"].([]any); ok {
		stats = stats[:0]
		for _, s := range ts {
			stats = append(stats, fmt.Sprint(s))
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string]map[string]any{}
	verdicts := map[string]bool{}
	for name, m := range r.metrics {
		var th map[string]any
		for _, t := range r.thresholds {
			if t.metric != name {
				continue
			}
			ok := t.holds(m, d)
			verdicts[name+": "+t.expr] = ok
			if th == nil {
				th = map[string]any{}
			}
			th[t.expr] = map[string]any{"ok": ok}
		}
		if m.count == 0 && th == nil {
			continue
		}
		contains := "default"
		if m.isTime {
			contains = "time"
		}
		e := map[string]any{"type": m.kind, "contains": contains, "values": m.values(d, stats)}
		if th != nil {
			e["thresholds"] = th
		}
		out[name] = e
	}
	return out, verdicts
}
