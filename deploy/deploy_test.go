// Package deploy holds deployment files: systemd units, Prometheus rules
// and their unit tests, the Alertmanager configuration and the Grafana
// dashboards. Its tests check them against the real tools (promtool,
// amtool, Prometheus and Alertmanager from Debian) and against the
// metrics the real relayd binaries export.
package deploy

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

const runbookURL = "https://github.com/edge-relay/relay/blob/main/docs/runbooks.md#"

// watchdog is the dead man's switch's alert: it always fires, tells no
// person (severity none) and goes to the switch alone.
const watchdog = "RelayWatchdog"

// Every rule parses; every alert has a severity and component to route
// on, a summary, a description and a runbook link to a section of
// docs/runbooks.md that exists.
func TestAlertRules(t *testing.T) {
	anchors := runbookAnchors(t)
	seen := map[string]bool{}
	records := map[string]bool{}
	for _, path := range ruleFiles {
		f, err := readRules(path)
		if err != nil {
			t.Fatal(err)
		}
		component := strings.TrimSuffix(filepath.Base(path), "-alerts.yml")
		for _, g := range f.Groups {
			for _, r := range g.Rules {
				if _, err := promql.ParseExpr(r.Expr); err != nil {
					t.Errorf("%s: %s: %v", path, r.Expr, err)
				}
				if r.Record != "" {
					if !regexp.MustCompile(`^[a-z_]+:[a-z_]+:[a-z_]+$`).MatchString(r.Record) {
						t.Errorf("recording rule %s is not named level:metric:operation", r.Record)
					}
					records[r.Record] = true
					continue
				}
				if seen[r.Alert] {
					t.Errorf("alert %s defined twice", r.Alert)
				}
				seen[r.Alert] = true
				switch sev := r.Labels["severity"]; {
				case r.Alert == watchdog:
					if sev != "none" || r.Expr != "vector(1)" || r.For != "" {
						t.Errorf("%s: severity %q, expr %q, for %q: want severity none, always firing (vector(1), no for)", r.Alert, sev, r.Expr, r.For)
					}
				case !slices.Contains([]string{"page", "warn", "info"}, sev):
					t.Errorf("%s: severity %q, want page, warn or info", r.Alert, sev)
				}
				if r.Labels["component"] != component {
					t.Errorf("%s in %s: component %q, want %q", r.Alert, path, r.Labels["component"], component)
				}
				if r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
					t.Errorf("%s: summary or description missing", r.Alert)
				}
				anchor := strings.ToLower(r.Alert)
				if r.Annotations["runbook_url"] != runbookURL+anchor {
					t.Errorf("%s: runbook_url %q, want %q", r.Alert, r.Annotations["runbook_url"], runbookURL+anchor)
				}
				if !anchors[anchor] {
					t.Errorf("%s: docs/runbooks.md has no section %q", r.Alert, "## "+r.Alert)
				}
				delete(anchors, anchor)
			}
		}
	}
	if len(seen) < 25 {
		t.Errorf("only %d alerts", len(seen))
	}
	for a := range anchors {
		if strings.HasPrefix(a, "relay") {
			t.Errorf("docs/runbooks.md has a section %s for no alert", a)
		}
	}
	if !records["job:relay_control_raft_term:max"] {
		t.Error("the election alerts' recording rule is missing")
	}
}

// runbookAnchors returns the GitHub anchors of the level-2 headings of
// docs/runbooks.md.
func runbookAnchors(t *testing.T) map[string]bool {
	t.Helper()
	b, err := os.ReadFile("../docs/runbooks.md")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, line := range strings.Split(string(b), "\n") {
		if h, ok := strings.CutPrefix(line, "## "); ok {
			a := strings.ToLower(strings.TrimSpace(h))
			a = regexp.MustCompile(`[^a-z0-9 _-]`).ReplaceAllString(a, "")
			out[strings.ReplaceAll(a, " ", "-")] = true
		}
	}
	return out
}

// promtoolTests is a promtool unit-test file, as far as the checks below
// read it.
type promtoolTests struct {
	RuleFiles []string `yaml:"rule_files"`
	Tests     []struct {
		InputSeries []struct {
			Series string `yaml:"series"`
		} `yaml:"input_series"`
		AlertRuleTest []struct {
			Alertname string `yaml:"alertname"`
			ExpAlerts []struct {
				ExpLabels      map[string]string `yaml:"exp_labels"`
				ExpAnnotations map[string]string `yaml:"exp_annotations"`
			} `yaml:"exp_alerts"`
		} `yaml:"alert_rule_test"`
	} `yaml:"tests"`
}

func readPromtoolTests(t *testing.T) map[string]*promtoolTests {
	t.Helper()
	files, err := filepath.Glob("prometheus/tests/*.test.yml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no promtool test files: %v", err)
	}
	out := map[string]*promtoolTests{}
	for _, path := range files {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		var pt promtoolTests
		if err := yaml.Unmarshal(b, &pt); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		out[path] = &pt
	}
	return out
}

// Every alert has a promtool unit test in which it fires, with its
// labels and all of its annotations spelled out, and one in which it
// must not (but the watchdog, which always fires). (promtool itself runs
// them: TestPromtool.)
func TestEveryAlertIsUnitTested(t *testing.T) {
	rules, err := allRules()
	if err != nil {
		t.Fatal(err)
	}
	fires, quiet := map[string]bool{}, map[string]bool{}
	for path, pt := range readPromtoolTests(t) {
		for _, tc := range pt.Tests {
			for _, at := range tc.AlertRuleTest {
				if len(at.ExpAlerts) == 0 {
					quiet[at.Alertname] = true
					continue
				}
				fires[at.Alertname] = true
				for _, e := range at.ExpAlerts {
					if e.ExpLabels["severity"] == "" || e.ExpLabels["component"] == "" || e.ExpAnnotations["runbook_url"] == "" || e.ExpAnnotations["description"] == "" {
						t.Errorf("%s: an expected %s leaves out labels or annotations: %v %v", path, at.Alertname, e.ExpLabels, e.ExpAnnotations)
					}
				}
			}
		}
	}
	for _, r := range rules {
		if r.Alert == "" {
			continue
		}
		if !fires[r.Alert] {
			t.Errorf("no promtool test fires %s", r.Alert)
		}
		if !quiet[r.Alert] && r.Alert != watchdog {
			t.Errorf("no promtool test checks that %s stays quiet", r.Alert)
		}
		if quiet[r.Alert] && r.Alert == watchdog {
			t.Errorf("a promtool test expects %s quiet: it must always fire", r.Alert)
		}
	}
}

// dashboard is the part of a Grafana dashboard the checks read.
type dashboard struct {
	UID        string  `json:"uid"`
	Title      string  `json:"title"`
	Panels     []panel `json:"panels"`
	Templating struct {
		List []struct {
			Name  string          `json:"name"`
			Type  string          `json:"type"`
			Query json.RawMessage `json:"query"`
		} `json:"list"`
	} `json:"templating"`
	Annotations struct {
		List []struct {
			Expr string `json:"expr"`
		} `json:"list"`
	} `json:"annotations"`
}

type panel struct {
	ID         int             `json:"id"`
	Type       string          `json:"type"`
	Title      string          `json:"title"`
	Datasource json.RawMessage `json:"datasource"`
	GridPos    struct{ H, W, X, Y int }
	Targets    []struct {
		RefID      string          `json:"refId"`
		Expr       string          `json:"expr"`
		Datasource json.RawMessage `json:"datasource"`
	} `json:"targets"`
	Panels []panel `json:"panels"`
}

func readDashboards(t *testing.T) map[string]*dashboard {
	t.Helper()
	files, err := filepath.Glob("grafana/dashboards/*.json")
	if err != nil || len(files) < 2 {
		t.Fatalf("dashboards: %v %v", files, err)
	}
	out := map[string]*dashboard{}
	for _, path := range files {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		var d dashboard
		if err := json.Unmarshal(b, &d); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		out[path] = &d
	}
	return out
}

// dashboardQueries returns every PromQL query of the dashboards (panel
// targets, variable queries and annotations), keyed by where it is.
func dashboardQueries(t *testing.T) map[string]string {
	t.Helper()
	out := map[string]string{}
	for path, d := range readDashboards(t) {
		var walk func(ps []panel)
		walk = func(ps []panel) {
			for _, p := range ps {
				for _, tg := range p.Targets {
					out[fmt.Sprintf("%s panel %q %s", path, p.Title, tg.RefID)] = tg.Expr
				}
				walk(p.Panels)
			}
		}
		walk(d.Panels)
		for i, a := range d.Annotations.List {
			out[fmt.Sprintf("%s annotation %d", path, i)] = a.Expr
		}
		for _, v := range d.Templating.List {
			if v.Type != "query" {
				continue
			}
			var q struct {
				Query string `json:"query"`
			}
			if err := json.Unmarshal(v.Query, &q); err != nil {
				t.Fatalf("%s variable %s: %v", path, v.Name, err)
			}
			// label_values(METRIC, LABEL) is Grafana's, not PromQL: the
			// metric is checked as a selector.
			m := regexp.MustCompile(`^label_values\((.+), *\w+\)$`).FindStringSubmatch(q.Query)
			if m == nil {
				t.Fatalf("%s variable %s: query %q is not label_values(metric, label)", path, v.Name, q.Query)
			}
			out[fmt.Sprintf("%s variable %s", path, v.Name)] = m[1]
		}
	}
	return out
}

// The dashboards are well formed: unique ids, every panel on the grid and
// on the dashboard's data-source variable, every query valid PromQL (as
// Prometheus parses it) using only the dashboards' variables.
// TestSystem checks the metrics they name against the running binaries.
func TestDashboards(t *testing.T) {
	uids := map[string]bool{}
	for path, d := range readDashboards(t) {
		if d.UID == "" || uids[d.UID] || d.Title == "" {
			t.Errorf("%s: uid %q (unique, required), title %q", path, d.UID, d.Title)
		}
		uids[d.UID] = true
		vars := map[string]bool{}
		for _, v := range d.Templating.List {
			vars[v.Name] = true
		}
		if !vars["datasource"] || !vars["instance"] {
			t.Errorf("%s: variables %v, want datasource and instance", path, vars)
		}
		ids := map[int]bool{}
		queries := 0
		for _, p := range d.Panels {
			if ids[p.ID] {
				t.Errorf("%s: panel id %d twice", path, p.ID)
			}
			ids[p.ID] = true
			if p.GridPos.W <= 0 || p.GridPos.H <= 0 || p.GridPos.X+p.GridPos.W > 24 {
				t.Errorf("%s: panel %q off the grid: %+v", path, p.Title, p.GridPos)
			}
			if p.Type == "row" {
				continue
			}
			if !strings.Contains(string(p.Datasource), "${datasource}") || len(p.Targets) == 0 {
				t.Errorf("%s: panel %q has no query on ${datasource}", path, p.Title)
			}
			for _, tg := range p.Targets {
				queries++
				if !strings.Contains(string(tg.Datasource), "${datasource}") {
					t.Errorf("%s: panel %q query %s not on ${datasource}", path, p.Title, tg.RefID)
				}
			}
		}
		if queries < 20 {
			t.Errorf("%s: only %d queries", path, queries)
		}
	}
	for where, q := range dashboardQueries(t) {
		expanded, err := expandGrafana(q)
		if err != nil {
			t.Errorf("%s: %v", where, err)
			continue
		}
		expr, err := promql.ParseExpr(expanded)
		if err != nil {
			t.Errorf("%s: %q: %v", where, q, err)
			continue
		}
		if len(selectors(expr)) == 0 {
			t.Errorf("%s: %q reads no metric", where, q)
		}
	}
}

// The provisioning files load the dashboards from where they are
// installed and name a Prometheus data source.
func TestGrafanaProvisioning(t *testing.T) {
	var dash struct {
		APIVersion int `yaml:"apiVersion"`
		Providers  []struct {
			Name                  string            `yaml:"name"`
			Type                  string            `yaml:"type"`
			Folder                string            `yaml:"folder"`
			DisableDeletion       bool              `yaml:"disableDeletion"`
			AllowUIUpdates        bool              `yaml:"allowUiUpdates"`
			UpdateIntervalSeconds int               `yaml:"updateIntervalSeconds"`
			Options               map[string]string `yaml:"options"`
		} `yaml:"providers"`
	}
	var ds struct {
		APIVersion  int `yaml:"apiVersion"`
		Datasources []struct {
			Name, Type, UID, URL, Access string
			IsDefault                    bool           `yaml:"isDefault"`
			JSONData                     map[string]any `yaml:"jsonData"`
		} `yaml:"datasources"`
	}
	for path, v := range map[string]any{"grafana/provisioning/dashboards/relay.yml": &dash, "grafana/provisioning/datasources/prometheus.yml": &ds} {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		dec := yaml.NewDecoder(strings.NewReader(string(b)))
		dec.KnownFields(true)
		if err := dec.Decode(v); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
	}
	if dash.APIVersion != 1 || len(dash.Providers) != 1 || dash.Providers[0].Type != "file" || dash.Providers[0].Options["path"] == "" {
		t.Errorf("dashboard provider: %+v", dash)
	}
	if ds.APIVersion != 1 || len(ds.Datasources) != 1 || ds.Datasources[0].Type != "prometheus" || ds.Datasources[0].URL == "" {
		t.Errorf("data source: %+v", ds)
	}
}
