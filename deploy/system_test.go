package deploy

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"go.yaml.in/yaml/v3"
)

// The relay's observability as an operator runs it: real relayd
// processes (three control nodes, two edges) serving real traffic, their
// /metrics checked against every metric the rules, the rules' unit tests
// and the dashboards name; then Debian's Prometheus scraping them with
// the project's rules and Debian's Alertmanager routing what fires to
// webhook receivers inside the test, while an edge and the control
// leader are killed and brought back.
func TestSystem(t *testing.T) {
	r := startRelay(t, 3, 2)
	r.traffic()
	t.Run("exported metrics", func(t *testing.T) { checkExportedMetrics(t, r.in(t)) })
	t.Run("alerts fire, route and resolve", func(t *testing.T) { alertsEndToEnd(t, r.in(t)) })
}

// scrape reads a /metrics page.
func scrape(url string) (map[string]*dto.MetricFamily, error) {
	b, err := httpGet(url)
	if err != nil {
		return nil, err
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("parse %s: %w", url, err)
	}
	return fams, nil
}

// exported maps every series name a scrape showed to its label names.
type exported map[string]map[string]bool

func (e exported) add(fams map[string]*dto.MetricFamily) {
	for name, mf := range fams {
		for _, m := range mf.GetMetric() {
			labels := []string{}
			for _, l := range m.GetLabel() {
				labels = append(labels, l.GetName())
			}
			names := map[string][]string{name: labels}
			switch mf.GetType() {
			case dto.MetricType_HISTOGRAM:
				names = map[string][]string{name + "_bucket": append(slices.Clone(labels), "le"), name + "_sum": labels, name + "_count": labels}
			case dto.MetricType_SUMMARY:
				names = map[string][]string{name: append(slices.Clone(labels), "quantile"), name + "_sum": labels, name + "_count": labels}
			}
			for n, ls := range names {
				if e[n] == nil {
					e[n] = map[string]bool{}
				}
				for _, l := range ls {
					e[n][l] = true
				}
			}
		}
	}
}

// fromPrometheus are series Prometheus makes itself, with their labels.
var fromPrometheus = map[string][]string{
	"up":     {},
	"ALERTS": {"alertname", "alertstate", "component", "severity"},
}

// Every metric a rule, a rule's unit test or a dashboard reads is one the
// running binaries export, with the labels the query matches on: a
// renamed metric or label fails here, not silently in production.
func checkExportedMetrics(t *testing.T, r *relay) {
	exp := exported{}
	families := map[string]bool{}
	var targets []string
	for _, n := range r.controls {
		targets = append(targets, n.admin)
	}
	for _, e := range r.edges {
		targets = append(targets, e.admin)
	}
	// The control nodes above run without TLS; a node with certificates
	// exports their validity.
	targets = append(targets, startTLSControl(t))
	for _, target := range targets {
		fams, err := scrape("http://" + target + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		exp.add(fams)
		for name := range fams {
			families[name] = true
		}
	}
	recorded := map[string]bool{}
	uses := map[string][]selectorUse{} // where -> what it reads
	rules, err := allRules()
	if err != nil {
		t.Fatal(err)
	}
	for _, rl := range rules {
		if rl.Record != "" {
			recorded[rl.Record] = true
		}
		expr, err := promql.ParseExpr(rl.Expr)
		if err != nil {
			t.Fatal(err)
		}
		uses["rule "+rl.Alert+rl.Record] = selectors(expr)
	}
	for where, q := range dashboardQueries(t) {
		q, err := expandGrafana(q)
		if err != nil {
			t.Fatal(err)
		}
		expr, err := promql.ParseExpr(q)
		if err != nil {
			t.Fatal(err)
		}
		uses[where] = selectors(expr)
	}
	for path, pt := range readPromtoolTests(t) {
		for _, tc := range pt.Tests {
			for _, s := range tc.InputSeries {
				lbls, err := promql.ParseMetric(s.Series)
				if err != nil {
					t.Fatalf("%s: %s: %v", path, s.Series, err)
				}
				u := selectorUse{metric: lbls.Get(model.MetricNameLabel)}
				lbls.Range(func(l labels.Label) {
					if l.Name != model.MetricNameLabel {
						u.labels = append(u.labels, l.Name)
					}
				})
				uses[path+" input "+s.Series] = []selectorUse{u}
			}
		}
	}
	checked := map[string]bool{}
	for where, us := range uses {
		for _, u := range us {
			if recorded[u.metric] {
				continue
			}
			have, ok := exp[u.metric]
			if pl, isProm := fromPrometheus[u.metric]; isProm {
				ok, have = true, map[string]bool{}
				for _, l := range pl {
					have[l] = true
				}
			}
			if !ok {
				t.Errorf("%s reads %s, which no running binary exports", where, u.metric)
				continue
			}
			checked[u.metric] = true
			for _, l := range u.labels {
				// job and instance come from Prometheus' targets.
				if !have[l] && l != "job" && l != "instance" {
					t.Errorf("%s matches %s on label %q, which it does not have (it has %v)", where, u.metric, l, keys(have))
				}
			}
		}
	}
	t.Logf("%d metrics named by rules, unit tests and dashboards found on the running binaries", len(checked))

	// And the other way: every relay_* family the binaries export is read
	// by an alert, a recording rule or a dashboard, so a new metric is
	// graphed or alerted on (or listed in notGraphed with the reason).
	read := map[string]bool{}
	for where, us := range uses {
		if strings.Contains(where, " input ") {
			continue // a unit test's input series reads nothing
		}
		for _, u := range us {
			read[u.metric] = true
		}
	}
	for f := range families {
		if !strings.HasPrefix(f, "relay_") || notGraphed[f] != "" {
			continue
		}
		if !read[f] && !read[f+"_bucket"] && !read[f+"_sum"] && !read[f+"_count"] {
			t.Errorf("%s is exported but no alert or dashboard reads it: graph it, alert on it, or say why not in notGraphed", f)
		}
	}
	for f := range notGraphed {
		if read[f] {
			t.Errorf("%s is read by an alert or dashboard; take it out of notGraphed", f)
		}
	}

	// And every relay_* family is in the operator's metric list: the
	// rules say "metric names are those of docs/operations.md".
	doc, err := os.ReadFile("../docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	for f := range families {
		if strings.HasPrefix(f, "relay_") && !regexp.MustCompile("`"+regexp.QuoteMeta(f)+"[`{]").Match(doc) {
			t.Errorf("%s is exported but docs/operations.md does not list it", f)
		}
	}
}

// notGraphed are relay_* metrics that no alert or dashboard reads, each
// with the reason.
var notGraphed = map[string]string{}

func keys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// startTLSControl starts a single control node with TLS certificates
// (made here: a CA and the node's certificate) and returns its admin
// address.
func startTLSControl(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "deploy test CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "t1"}, DNSNames: []string{"localhost"},
		IPAddresses: nil, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(12 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{
		"ca.pem":   pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		"node.pem": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		"key.pem":  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	admin := freePort(t)
	startProcess(t, "control-tls", []string{"RELAY_ADMIN_PASSWORD=" + adminPassword}, bin(t, "relayd"),
		"control", "--node-id", "t1", "--data-dir", filepath.Join(dir, "data"), "--bootstrap",
		"--raft-addr", freePort(t), "--api-addr", freePort(t), "--admin-addr", admin,
		"--tls-cert", filepath.Join(dir, "node.pem"), "--tls-key", filepath.Join(dir, "key.pem"), "--tls-ca", filepath.Join(dir, "ca.pem"))
	eventually(t, time.Minute, func() error {
		_, err := httpGet("http://" + admin + "/readyz")
		return err
	})
	return admin
}

// The test's copy of the configuration: every duration of the rules
// divided by timeScale (so `for: 1m` is 2 s), Prometheus scraping and
// evaluating every second, Alertmanager grouping for a second. The
// routing tree, inhibitions, rule expressions and thresholds are the
// shipped ones.
const (
	timeScale      = 30
	scrapeInterval = time.Second
	evalInterval   = time.Second
	groupWait      = time.Second
)

// notification is one webhook call of Alertmanager.
type notification struct {
	Receiver string `json:"receiver"`
	Status   string `json:"status"`
	Alerts   []struct {
		Status string            `json:"status"`
		Labels map[string]string `json:"labels"`
	} `json:"alerts"`
	at time.Time
}

// webhooks records what Alertmanager sends, per receiver.
type webhooks struct {
	mu  sync.Mutex // guards got
	got []notification
}

func (w *webhooks) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	var n notification
	b, _ := io.ReadAll(r.Body)
	if err := json.Unmarshal(b, &n); err != nil {
		http.Error(rw, err.Error(), http.StatusBadRequest)
		return
	}
	n.at = time.Now()
	if want := strings.TrimPrefix(r.URL.Path, "/"); n.Receiver != want {
		n.Receiver = "MISROUTED " + n.Receiver + " at " + want
	}
	w.mu.Lock()
	w.got = append(w.got, n)
	w.mu.Unlock()
}

// find returns when receiver first got alertname in status for the
// instance (any instance when empty) after since.
func (w *webhooks) find(receiver, alertname, status, instance string, since time.Time) (time.Time, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, n := range w.got {
		if n.Receiver != receiver || n.at.Before(since) {
			continue
		}
		for _, a := range n.Alerts {
			if a.Labels["alertname"] == alertname && a.Status == status && (instance == "" || a.Labels["instance"] == instance) {
				return n.at, true
			}
		}
	}
	return time.Time{}, false
}

func (w *webhooks) wait(t *testing.T, within time.Duration, receiver, alertname, status, instance string, since time.Time) time.Time {
	t.Helper()
	var at time.Time
	eventually(t, within, func() error {
		var ok bool
		if at, ok = w.find(receiver, alertname, status, instance, since); !ok {
			return fmt.Errorf("%s has not received %s %s for %q; received: %s", receiver, alertname, status, instance, w.summary())
		}
		return nil
	})
	return at
}

func (w *webhooks) summary() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var b strings.Builder
	for _, n := range w.got {
		fmt.Fprintf(&b, "\n  %s %s:", n.at.Format("15:04:05.000"), n.Receiver)
		for _, a := range n.Alerts {
			fmt.Fprintf(&b, " %s[%s]=%s", a.Labels["alertname"], a.Labels["instance"], a.Status)
		}
	}
	return b.String()
}

func alertsEndToEnd(t *testing.T, r *relay) {
	prometheus := tool(t, "prometheus", "prometheus")
	alertmanager := tool(t, "prometheus-alertmanager", "prometheus-alertmanager")
	dir := t.TempDir()
	hooks := &webhooks{}
	srv := httptest.NewServer(hooks)
	t.Cleanup(srv.Close)

	amAddr := freePort(t)
	writeFile(t, filepath.Join(dir, "alertmanager.yml"), testAlertmanagerConfig(t, srv.URL))
	startProcess(t, "alertmanager", nil, alertmanager,
		"--config.file="+filepath.Join(dir, "alertmanager.yml"), "--storage.path="+filepath.Join(dir, "am"),
		"--web.listen-address="+amAddr, "--cluster.listen-address=", "--log.level=debug")
	promAddr := freePort(t)
	writeFile(t, filepath.Join(dir, "prometheus.yml"), testPrometheusConfig(t, r, dir, amAddr))
	startProcess(t, "prometheus", nil, prometheus,
		"--config.file="+filepath.Join(dir, "prometheus.yml"), "--storage.tsdb.path="+filepath.Join(dir, "tsdb"),
		"--web.listen-address="+promAddr, "--rules.alert.resend-delay=1s", "--log.level=info")
	for _, u := range []string{"http://" + amAddr + "/-/ready", "http://" + promAddr + "/-/ready"} {
		eventually(t, time.Minute, func() error { _, err := httpGet(u); return err })
	}
	// Every rule loaded, every process scraped.
	rules, err := allRules()
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, time.Minute, func() error {
		if n := promQuery(t, promAddr, "count(up == 1)"); n != float64(len(r.controls)+len(r.edges)) {
			return fmt.Errorf("%v targets up", n)
		}
		if n := loadedRules(t, promAddr); n != len(rules) {
			return fmt.Errorf("Prometheus loaded %d rules of %d", n, len(rules))
		}
		return nil
	})
	edgeDownFor := forOf(t, rules, "RelayEdgeDown")

	// The dead man's switch hears the watchdog from the start (and no
	// other receiver does: checked at the end).
	hooks.wait(t, time.Minute, "deadmans-switch", watchdog, "firing", "", time.Time{})

	// An edge crashes: its page reaches the edges' on-call (and the chat).
	edge := r.edges[len(r.edges)-1]
	killed := time.Now()
	edge.p.kill()
	at := hooks.wait(t, 2*time.Minute, "edge-oncall-pagerduty", "RelayEdgeDown", "firing", edge.admin, killed)
	// The earliest it can: the failed scrape (interval and timeout),
	// `for:`, the next evaluation, Alertmanager's group_wait; with slack
	// for a busy machine.
	bound := scrapeInterval + scrapeInterval + edgeDownFor + evalInterval + groupWait
	took := at.Sub(killed)
	t.Logf("RelayEdgeDown reached the webhook %v after the kill (for %v + scrape %v + timeout %v + evaluation %v + group_wait %v = %v)",
		took.Round(time.Millisecond), edgeDownFor, scrapeInterval, scrapeInterval, evalInterval, groupWait, bound)
	if took > bound+20*time.Second {
		t.Errorf("RelayEdgeDown took %v to arrive, bound %v (+20 s slack)", took, bound)
	}
	hooks.wait(t, 30*time.Second, "chat-webhook", "RelayEdgeDown", "firing", edge.admin, killed)

	// The control leader crashes: the others elect a new one, and the
	// leader change reaches the chat; the dead node warns its team.
	leader, err := r.leader()
	if err != nil {
		t.Fatal(err)
	}
	killed = time.Now()
	leader.p.kill()
	hooks.wait(t, 2*time.Minute, "chat-webhook", "RelayControlLeaderChanged", "firing", "", killed)
	hooks.wait(t, 30*time.Second, "blackhole", "RelayControlLeaderChanged", "firing", "", killed)
	hooks.wait(t, time.Minute, "control-team-email", "RelayControlDown", "firing", leader.admin, killed)
	// One of three voters down: one more failure loses the quorum, which
	// pages the control plane's on-call.
	hooks.wait(t, time.Minute, "control-oncall-pagerduty", "RelayControlQuorumAtRisk", "firing", "", killed)
	// The other two still report three voters in the configuration, but
	// the dead one is still a target: RelayControlDown covers it, and
	// RelayControlVoterMissing (a voter with no target, a Pending pod)
	// stays quiet. Had it counted only the targets that are up, it would
	// have gone pending at the first failed scrape, before the two above.
	window := fmt.Sprintf("[%ds]", int(time.Since(killed).Seconds())+1)
	if n := promQuery(t, promAddr, `count(max_over_time(ALERTS{alertname="RelayControlVoterMissing"}`+window+`)) or vector(0)`); n != 0 {
		t.Errorf("RelayControlVoterMissing: %v series pending or firing since the kill (-1: no answer), for a voter whose node is down but still a target", n)
	}

	// Both come back: every alert resolves (the leader change once it is
	// older than its window).
	back := time.Now()
	r.startEdge(edge)
	r.restartControl(leader)
	hooks.wait(t, 2*time.Minute, "edge-oncall-pagerduty", "RelayEdgeDown", "resolved", edge.admin, back)
	hooks.wait(t, 2*time.Minute, "control-team-email", "RelayControlDown", "resolved", leader.admin, back)
	// (It may resolve while the nodes restart: any time after the kill.)
	hooks.wait(t, 2*time.Minute, "chat-webhook", "RelayControlLeaderChanged", "resolved", "", killed)

	// Inhibition, with the shipped rules of alertmanager.yml: while an
	// edge is down, its other alerts are not sent; another edge's are.
	sent := time.Now()
	postAlerts(t, amAddr,
		map[string]string{"alertname": "RelayEdgeDown", "instance": "inhibited:7444", "severity": "page", "component": "edge"},
		map[string]string{"alertname": "RelayEdgeSlowAcks", "instance": "inhibited:7444", "severity": "warn", "component": "edge"},
		map[string]string{"alertname": "RelayEdgeSlowAcks", "instance": "other:7444", "severity": "warn", "component": "edge"})
	hooks.wait(t, time.Minute, "edge-team-email", "RelayEdgeSlowAcks", "firing", "other:7444", sent)
	if _, ok := hooks.find("edge-team-email", "RelayEdgeSlowAcks", "firing", "inhibited:7444", sent); ok {
		t.Errorf("the slow acks of an edge that is down were sent:%s", hooks.summary())
	}
	// A quorum at risk (one voter of three down, as above; a one-voter
	// cluster always) still takes writes: an edge whose mailbox writes
	// fail meanwhile pages its on-call. (RelayControlPlaneDown would hold
	// it back: TestInhibitRules.) The posted RelayControlQuorumAtRisk has
	// a label of its own: Prometheus goes on resending the one above,
	// resolved, under the same labels.
	postAlerts(t, amAddr,
		map[string]string{"alertname": "RelayControlQuorumAtRisk", "severity": "page", "component": "control", "posted": "true"},
		map[string]string{"alertname": "RelayEdgeMailboxWritesFailing", "instance": "mailbox:7444", "severity": "page", "component": "edge"})
	hooks.wait(t, time.Minute, "control-oncall-pagerduty", "RelayControlQuorumAtRisk", "firing", "", sent)
	hooks.wait(t, time.Minute, "edge-oncall-pagerduty", "RelayEdgeMailboxWritesFailing", "firing", "mailbox:7444", sent)
	hooks.mu.Lock()
	defer hooks.mu.Unlock()
	for _, n := range hooks.got {
		if strings.HasPrefix(n.Receiver, "MISROUTED") {
			t.Errorf("%s", n.Receiver)
		}
		for _, a := range n.Alerts {
			if a.Labels["alertname"] == watchdog && n.Receiver != "deadmans-switch" {
				t.Errorf("%s reached %s: it is for the dead man's switch alone", watchdog, n.Receiver)
			}
		}
	}
}

func writeFile(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// forOf returns an alert's `for:` in the test's copy of the rules.
func forOf(t *testing.T, rules []rule, alert string) time.Duration {
	t.Helper()
	for _, r := range rules {
		if r.Alert == alert {
			d, err := model.ParseDuration(r.For)
			if err != nil {
				t.Fatal(err)
			}
			return time.Duration(d) / timeScale
		}
	}
	t.Fatalf("no alert %s", alert)
	return 0
}

// testPrometheusConfig is deploy/prometheus/prometheus.yml with the
// relay's processes as targets, short intervals, the scaled rules and the
// test's Alertmanager.
func testPrometheusConfig(t *testing.T, r *relay, dir, amAddr string) []byte {
	t.Helper()
	var cfg map[string]any
	b, err := os.ReadFile("prometheus/prometheus.yml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &cfg); err != nil {
		t.Fatal(err)
	}
	cfg["global"] = map[string]any{"scrape_interval": scrapeInterval.String(), "scrape_timeout": scrapeInterval.String(), "evaluation_interval": evalInterval.String()}
	var files []string
	for _, f := range cfg["rule_files"].([]any) {
		scaled, err := scaleRules(filepath.Join("prometheus", f.(string)), timeScale)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, f.(string))
		writeFile(t, p, scaled)
		files = append(files, p)
	}
	cfg["rule_files"] = files
	cfg["alerting"] = map[string]any{"alertmanagers": []any{map[string]any{"static_configs": []any{map[string]any{"targets": []string{amAddr}}}}}}
	targets := map[string][]string{}
	for _, n := range r.controls {
		targets["relay-control"] = append(targets["relay-control"], n.admin)
	}
	for _, e := range r.edges {
		targets["relay-edge"] = append(targets["relay-edge"], e.admin)
	}
	for _, sc := range cfg["scrape_configs"].([]any) {
		sc := sc.(map[string]any)
		job := sc["job_name"].(string)
		if len(targets[job]) == 0 {
			t.Fatalf("prometheus.yml scrapes job %s, which the rules do not know", job)
		}
		sc["static_configs"] = []any{map[string]any{"targets": targets[job]}}
		delete(targets, job)
	}
	if len(targets) > 0 {
		t.Fatalf("prometheus.yml has no job for %v", targets)
	}
	out, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// testAlertmanagerConfig is deploy/alertmanager/alertmanager.yml with
// every receiver replaced by a webhook to base/<receiver name> and
// grouping timers of a second. Routes and inhibitions are the shipped
// ones.
func testAlertmanagerConfig(t *testing.T, base string) []byte {
	t.Helper()
	var cfg map[string]any
	b, err := os.ReadFile("alertmanager/alertmanager.yml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &cfg); err != nil {
		t.Fatal(err)
	}
	var timers func(route map[string]any)
	timers = func(route map[string]any) {
		delete(route, "group_wait")
		delete(route, "group_interval")
		delete(route, "repeat_interval")
		if subs, ok := route["routes"].([]any); ok {
			for _, s := range subs {
				timers(s.(map[string]any))
			}
		}
	}
	root := cfg["route"].(map[string]any)
	timers(root)
	root["group_wait"], root["group_interval"], root["repeat_interval"] = groupWait.String(), "1s", "1h"
	var receivers []any
	for _, rc := range cfg["receivers"].([]any) {
		name := rc.(map[string]any)["name"].(string)
		receivers = append(receivers, map[string]any{"name": name,
			"webhook_configs": []any{map[string]any{"url": base + "/" + url.PathEscape(name), "send_resolved": true}}})
	}
	cfg["receivers"] = receivers
	out, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// promQuery evaluates an instant query to a single number (NaN-free; -1
// when the result is empty).
func promQuery(t *testing.T, addr, q string) float64 {
	t.Helper()
	b, err := httpGet("http://" + addr + "/api/v1/query?query=" + url.QueryEscape(q))
	if err != nil {
		return -1
	}
	var resp struct {
		Data struct {
			Result []struct {
				Value [2]any `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if err := json.Unmarshal(b, &resp); err != nil || len(resp.Data.Result) == 0 {
		return -1
	}
	var v float64
	if s, ok := resp.Data.Result[0].Value[1].(string); ok {
		fmt.Sscan(s, &v)
	}
	return v
}

// loadedRules counts the rules Prometheus has loaded.
func loadedRules(t *testing.T, addr string) int {
	t.Helper()
	b, err := httpGet("http://" + addr + "/api/v1/rules")
	if err != nil {
		return 0
	}
	var resp struct {
		Data struct {
			Groups []struct {
				Rules []json.RawMessage `json:"rules"`
			} `json:"groups"`
		} `json:"data"`
	}
	if json.Unmarshal(b, &resp) != nil {
		return 0
	}
	n := 0
	for _, g := range resp.Data.Groups {
		n += len(g.Rules)
	}
	return n
}

// postAlerts sends alerts to Alertmanager as Prometheus would.
func postAlerts(t *testing.T, addr string, labels ...map[string]string) {
	t.Helper()
	var alerts []map[string]any
	for _, l := range labels {
		alerts = append(alerts, map[string]any{"labels": l, "startsAt": time.Now().Format(time.RFC3339), "endsAt": time.Now().Add(10 * time.Minute).Format(time.RFC3339)})
	}
	b, err := json.Marshal(alerts)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Post("http://"+addr+"/api/v2/alerts", "application/json", bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		t.Fatalf("post alerts: %s: %s", resp.Status, body)
	}
}
