// Package deploy holds deployment files; its test checks that the alert
// rules parse and only use metrics the code exports.
package deploy

import (
	"os"
	"regexp"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

type rules struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Alert       string            `yaml:"alert"`
			Expr        string            `yaml:"expr"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

func TestAlertRules(t *testing.T) {
	for _, f := range []string{"prometheus/control-alerts.yml", "prometheus/edge-alerts.yml"} {
		t.Run(f, func(t *testing.T) { checkRules(t, f) })
	}
}

func checkRules(t *testing.T, file string) {
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var r rules
	if err := yaml.Unmarshal(b, &r); err != nil {
		t.Fatal(err)
	}
	// Every relay_* metric a rule uses must be one the code defines.
	src := ""
	for _, f := range []string{"../control/raftnode/metrics.go", "../control/server/interceptor.go", "../control/api/watch.go",
		"../edge/session/metrics.go", "../edge/transport/listener.go", "../edge/server/server.go",
		"../edge/mesh/mesh.go", "../edge/mailbox/mailbox.go"} {
		s, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		src += string(s)
	}
	metric := regexp.MustCompile(`relay_[a-z_]+`)
	n := 0
	for _, g := range r.Groups {
		for _, rule := range g.Rules {
			n++
			if rule.Alert == "" || rule.Expr == "" || rule.Labels["severity"] == "" || rule.Annotations["summary"] == "" || rule.Annotations["description"] == "" {
				t.Errorf("rule %+v is incomplete", rule)
			}
			for _, m := range metric.FindAllString(rule.Expr, -1) {
				base := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(m, "_bucket"), "_count"), "_sum")
				if !strings.Contains(src, `"`+base+`"`) {
					t.Errorf("alert %s uses %s, which no code exports", rule.Alert, m)
				}
			}
		}
	}
	if n < 5 {
		t.Fatalf("only %d rules", n)
	}
}
