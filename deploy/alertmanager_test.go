package deploy

import (
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/prometheus/model/labels"
	"go.yaml.in/yaml/v3"
)

// inhibitRule is one of alertmanager.yml's inhibit_rules.
type inhibitRule struct {
	Source, Target []*labels.Matcher
	Equal          []string
}

func readInhibitRules(t *testing.T) []inhibitRule {
	t.Helper()
	b, err := os.ReadFile("alertmanager/alertmanager.yml")
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		InhibitRules []struct {
			SourceMatchers []string `yaml:"source_matchers"`
			TargetMatchers []string `yaml:"target_matchers"`
			Equal          []string `yaml:"equal"`
		} `yaml:"inhibit_rules"`
	}
	if err := yaml.Unmarshal(b, &cfg); err != nil {
		t.Fatal(err)
	}
	// Alertmanager's matchers are PromQL's label matchers (anchored
	// regular expressions); a metric name lets a matcher that matches
	// the empty string (alertname!~"...") parse on its own.
	parse := func(ms []string) []*labels.Matcher {
		var out []*labels.Matcher
		for _, m := range ms {
			sel, err := promql.ParseMetricSelector("x{" + m + "}")
			if err != nil {
				t.Fatalf("inhibit rule matcher %s: %v", m, err)
			}
			for _, s := range sel {
				if s.Name != labels.MetricName {
					out = append(out, s)
				}
			}
		}
		return out
	}
	var out []inhibitRule
	for _, r := range cfg.InhibitRules {
		if len(r.SourceMatchers) == 0 || len(r.TargetMatchers) == 0 {
			t.Fatalf("an inhibit rule without source_matchers or target_matchers: %+v", r)
		}
		out = append(out, inhibitRule{Source: parse(r.SourceMatchers), Target: parse(r.TargetMatchers), Equal: r.Equal})
	}
	return out
}

func matchesAll(ms []*labels.Matcher, alert map[string]string) bool {
	for _, m := range ms {
		if !m.Matches(alert[m.Name]) {
			return false
		}
	}
	return true
}

// inhibited returns the alerts of firing that the rules hold back, as
// Alertmanager's inhibitor does: a target is held back by another
// firing alert that matches a rule's source, with the same values (or
// both none) of the rule's equal labels.
func inhibited(rules []inhibitRule, firing []map[string]string) []string {
	var out []string
	for i, target := range firing {
		if slices.ContainsFunc(rules, func(r inhibitRule) bool {
			if !matchesAll(r.Target, target) {
				return false
			}
			for j, source := range firing {
				if j != i && matchesAll(r.Source, source) &&
					!slices.ContainsFunc(r.Equal, func(l string) bool { return source[l] != target[l] }) {
					return true
				}
			}
			return false
		}) {
			out = append(out, alertKey(target))
		}
	}
	slices.Sort(out)
	return out
}

func alertKey(a map[string]string) string {
	if a["instance"] == "" {
		return a["alertname"]
	}
	return a["alertname"] + "@" + a["instance"]
}

// The inhibit rules hold back what follows from an alert that is
// already sent, and nothing else: in particular no alert that fires
// while the service still works (RelayControlQuorumAtRisk: one voter of
// three down, or a one-voter cluster for as long as it runs) holds back
// another component's alerts. TestSystem checks some of these cases on
// the real Alertmanager.
func TestInhibitRules(t *testing.T) {
	rules := readInhibitRules(t)
	// Every alert an inhibit rule names exists.
	all, err := allRules()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, r := range all {
		if r.Alert != "" {
			names = append(names, r.Alert)
		}
	}
	for i, r := range rules {
		for _, side := range [][]*labels.Matcher{r.Source, r.Target} {
			if !slices.ContainsFunc(names, func(n string) bool { return matchesAll(side, map[string]string{"alertname": n}) }) {
				t.Errorf("inhibit rule %d: %v matches no alert of the rules", i, side)
			}
		}
	}

	alert := func(name, instance string) map[string]string {
		a := map[string]string{"alertname": name}
		if instance != "" {
			a["instance"] = instance
		}
		return a
	}
	for _, c := range []struct {
		name   string
		firing []map[string]string
		held   []string
	}{
		{"a control node down holds back its own alerts, not another's",
			[]map[string]string{alert("RelayControlDown", "c1:7402"), alert("RelayControlNotReady", "c1:7402"), alert("RelayControlNotReady", "c2:7402")},
			[]string{"RelayControlNotReady@c1:7402"}},
		{"an edge down holds back its own alerts, not another's",
			[]map[string]string{alert("RelayEdgeDown", "e1:7444"), alert("RelayEdgeSlowAcks", "e1:7444"), alert("RelayEdgeSlowAcks", "e2:7444")},
			[]string{"RelayEdgeSlowAcks@e1:7444"}},
		// One voter of three down: writes still work, so edges failing to
		// write mailboxes are an incident of their own and page.
		{"a quorum at risk holds back no edge alert",
			[]map[string]string{alert("RelayControlQuorumAtRisk", ""), alert("RelayControlDown", "c1:7402"),
				alert("RelayEdgeMailboxWritesFailing", "e1:7444"), alert("RelayEdgeHighErrorRate", "e1:7444"), alert("RelayEdgeHandshakeFailures", "e1:7444")},
			nil},
		{"a one-voter cluster, always at risk, holds back no edge alert",
			[]map[string]string{alert("RelayControlQuorumAtRisk", ""), alert("RelayEdgeMailboxWritesFailing", "e1:7444")},
			nil},
		{"a control plane that is down pages once",
			[]map[string]string{alert("RelayControlPlaneDown", ""), alert("RelayControlQuorumAtRisk", ""), alert("RelayControlVoterMissing", ""),
				alert("RelayControlNoLeader", "c1:7402"), alert("RelayEdgeMailboxWritesFailing", "e1:7444"), alert("RelayEdgeHighErrorRate", "e1:7444"),
				alert("RelayEdgeControlCutOff", ""), alert("RelayEdgeNotAMember", "e1:7444"), alert("RelayEdgeHandshakeFailures", "e1:7444")},
			[]string{"RelayControlNoLeader@c1:7402", "RelayControlQuorumAtRisk", "RelayControlVoterMissing", "RelayEdgeControlCutOff",
				"RelayEdgeHandshakeFailures@e1:7444", "RelayEdgeHighErrorRate@e1:7444", "RelayEdgeMailboxWritesFailing@e1:7444", "RelayEdgeNotAMember@e1:7444"}},
		// A voter Pending while the rest runs: writes work, so an edge
		// failing to write mailboxes is an incident of its own.
		{"a missing voter holds back nothing",
			[]map[string]string{alert("RelayControlVoterMissing", ""), alert("RelayControlQuorumAtRisk", ""), alert("RelayEdgeMailboxWritesFailing", "e1:7444")},
			nil},
		// A failed mailbox write rejects its event with INTERNAL: an edge
		// cut off pages for the cut, not for the errors that follow.
		{"every edge cut off pages once",
			[]map[string]string{alert("RelayEdgeControlCutOff", ""), alert("RelayEdgeNotAMember", "e1:7444"), alert("RelayEdgeHandshakeFailures", "e1:7444"),
				alert("RelayEdgeMailboxWritesFailing", "e1:7444"), alert("RelayEdgeHighErrorRate", "e1:7444")},
			[]string{"RelayEdgeHandshakeFailures@e1:7444", "RelayEdgeHighErrorRate@e1:7444", "RelayEdgeMailboxWritesFailing@e1:7444", "RelayEdgeNotAMember@e1:7444"}},
		// Without a control outage, INTERNAL rejects are a page of their own.
		{"an edge's high error rate alone is sent",
			[]map[string]string{alert("RelayEdgeHighErrorRate", "e1:7444"), alert("RelayEdgeMailboxWritesFailing", "e1:7444")},
			nil},
		// The switch must hear the watchdog whatever else fires (here
		// every source of an inhibit rule that takes no instance, and
		// processes down).
		{"nothing holds back the watchdog",
			[]map[string]string{alert(watchdog, ""), alert("RelayControlPlaneDown", ""), alert("RelayEdgeControlCutOff", ""),
				alert("RelayControlDown", "c1:7402"), alert("RelayEdgeDown", "e1:7444")},
			[]string{"RelayEdgeControlCutOff"}},
		// One edge refusing devices while the others take them has no
		// page of its own to hide behind.
		{"one edge failing handshakes is sent",
			[]map[string]string{alert("RelayEdgeHandshakeFailures", "e1:7444"), alert("RelayEdgeMeshIncomplete", "e1:7444")},
			nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := inhibited(rules, c.firing); !slices.Equal(got, c.held) {
				t.Errorf("held back %v, want %v (firing: %s)", got, c.held, alertKeys(c.firing))
			}
		})
	}
}

func alertKeys(as []map[string]string) string {
	var s []string
	for _, a := range as {
		s = append(s, alertKey(a))
	}
	return strings.Join(s, ", ")
}
