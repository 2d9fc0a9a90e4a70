package deploy

import (
	"fmt"
	"os"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/promql/parser"
	"go.yaml.in/yaml/v3"
)

// promql parses PromQL as Prometheus does.
var promql = parser.NewParser(parser.Options{})

// ruleFile is a Prometheus rule file.
type ruleFile struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []rule `yaml:"rules"`
	} `yaml:"groups"`
}

type rule struct {
	Record      string            `yaml:"record,omitempty"`
	Alert       string            `yaml:"alert,omitempty"`
	Expr        string            `yaml:"expr"`
	For         string            `yaml:"for,omitempty"`
	Labels      map[string]string `yaml:"labels,omitempty"`
	Annotations map[string]string `yaml:"annotations,omitempty"`
}

// ruleFiles are the project's rule files.
var ruleFiles = []string{"prometheus/control-alerts.yml", "prometheus/edge-alerts.yml", "prometheus/monitoring-alerts.yml"}

func readRules(path string) (*ruleFile, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var f ruleFile
	if err := yaml.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &f, nil
}

// allRules returns every rule of the project's rule files.
func allRules() ([]rule, error) {
	var out []rule
	for _, path := range ruleFiles {
		f, err := readRules(path)
		if err != nil {
			return nil, err
		}
		for _, g := range f.Groups {
			out = append(out, g.Rules...)
		}
	}
	return out, nil
}

// selectorUse is what an expression asks of one metric: its name and
// the labels its selector matches on.
type selectorUse struct {
	metric string
	labels []string
}

// selectors returns the metrics an expression reads, with the label
// names each selector matches on.
func selectors(expr parser.Expr) []selectorUse {
	var out []selectorUse
	parser.Inspect(expr, func(n parser.Node, _ []parser.Node) error {
		vs, ok := n.(*parser.VectorSelector)
		if !ok {
			return nil
		}
		u := selectorUse{metric: vs.Name}
		for _, m := range vs.LabelMatchers {
			if m.Name == model.MetricNameLabel {
				if u.metric == "" && m.Type.String() == "=" {
					u.metric = m.Value
				}
				continue
			}
			u.labels = append(u.labels, m.Name)
		}
		out = append(out, u)
		return nil
	})
	return out
}

// grafanaVars are the dashboard variables a panel's query may use, with
// a value that makes the query valid PromQL to check.
var grafanaVars = map[string]string{
	"$__rate_interval": "5m",
	"$__interval":      "1m",
	"$__range":         "1h",
	"$instance":        ".+",
}

var leftoverVar = regexp.MustCompile(`\$\{?[A-Za-z_]\w*`)

// expandGrafana replaces a query's dashboard variables, and fails on a
// variable the dashboards do not define.
func expandGrafana(q string) (string, error) {
	keys := make([]string, 0, len(grafanaVars))
	for k := range grafanaVars {
		keys = append(keys, k)
	}
	// Longest first: $__rate_interval before $__range.
	sort.Slice(keys, func(i, j int) bool { return len(keys[i]) > len(keys[j]) })
	for _, k := range keys {
		q = strings.ReplaceAll(q, k, grafanaVars[k])
	}
	if v := leftoverVar.FindString(q); v != "" {
		return "", fmt.Errorf("unknown dashboard variable %s in %q", v, q)
	}
	return q, nil
}

// scaleRules returns the rules of path with every duration divided by
// factor: `for:`, range selectors, subqueries and offsets. Thresholds
// stay. The system test runs Prometheus on this copy so an alert with
// `for: 1m` fires after 2 s at factor 30; the shipped rules are never
// weakened.
func scaleRules(path string, factor int) ([]byte, error) {
	f, err := readRules(path)
	if err != nil {
		return nil, err
	}
	scale := func(d time.Duration) time.Duration {
		s := d / time.Duration(factor)
		if d > 0 && s < time.Second {
			s = time.Second
		}
		return s.Round(time.Millisecond)
	}
	for gi := range f.Groups {
		for ri := range f.Groups[gi].Rules {
			r := &f.Groups[gi].Rules[ri]
			expr, err := promql.ParseExpr(r.Expr)
			if err != nil {
				return nil, fmt.Errorf("%s: %s: %w", path, r.Expr, err)
			}
			parser.Inspect(expr, func(n parser.Node, _ []parser.Node) error {
				switch n := n.(type) {
				case *parser.MatrixSelector:
					n.Range, n.RangeExpr = scale(n.Range), nil
				case *parser.SubqueryExpr:
					n.Range, n.RangeExpr = scale(n.Range), nil
					n.Step, n.StepExpr = scale(n.Step), nil
					n.OriginalOffset, n.OriginalOffsetExpr = scale(n.OriginalOffset), nil
				case *parser.VectorSelector:
					n.OriginalOffset, n.OriginalOffsetExpr = scale(n.OriginalOffset), nil
				}
				return nil
			})
			r.Expr = expr.String()
			if r.For != "" {
				d, err := model.ParseDuration(r.For)
				if err != nil {
					return nil, fmt.Errorf("%s: for %q: %w", path, r.For, err)
				}
				r.For = model.Duration(scale(time.Duration(d))).String()
			}
		}
	}
	return yaml.Marshal(f)
}
