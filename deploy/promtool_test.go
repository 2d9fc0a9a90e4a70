package deploy

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// tool returns the path of a command the test needs, and skips the test
// (saying so) where it is not installed; CI installs it (.ci/run) and
// sets RELAY_DEPLOY_TOOLS=required, which turns the skip into a failure.
func tool(t *testing.T, name, debianPackage string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		msg := fmt.Sprintf("%s is not installed (Debian package %s; .ci/run installs it)", name, debianPackage)
		if os.Getenv("RELAY_DEPLOY_TOOLS") == "required" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return p
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", filepath.Base(name), strings.Join(args, " "), err, out)
	}
	return string(out)
}

// promtool checks the rules and the example configuration, and runs the
// rules' unit tests: every alert fires for the series that should fire
// it, with the expected labels and annotations, and stays quiet for the
// others.
func TestPromtool(t *testing.T) {
	promtool := tool(t, "promtool", "prometheus")
	run(t, promtool, append([]string{"check", "rules"}, ruleFiles...)...)
	run(t, promtool, "check", "config", "prometheus/prometheus.yml")
	tests, err := filepath.Glob("prometheus/tests/*.test.yml")
	if err != nil || len(tests) == 0 {
		t.Fatalf("no unit tests: %v", err)
	}
	out := run(t, promtool, append([]string{"test", "rules"}, tests...)...)
	if strings.Count(out, "SUCCESS") != len(tests) {
		t.Fatalf("promtool test rules:\n%s", out)
	}
}

// amtool accepts the Alertmanager configuration, and its routing tree
// sends every alert of the rules where the configuration says: pages to
// the component's on-call, warnings to its team's mail, info to the chat
// only; everything to the chat as well; but the watchdog to the dead
// man's switch alone.
func TestAlertmanagerConfig(t *testing.T) {
	amtool := tool(t, "amtool", "prometheus-alertmanager")
	const config = "alertmanager/alertmanager.yml"
	run(t, amtool, "check-config", config)
	rules, err := allRules()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rules {
		if r.Alert == "" {
			continue
		}
		sev, comp := r.Labels["severity"], r.Labels["component"]
		want := "chat-webhook," + map[string]string{
			"page": comp + "-oncall-pagerduty",
			"warn": comp + "-team-email",
			"info": "blackhole",
		}[sev]
		if r.Alert == watchdog {
			want = "deadmans-switch"
		}
		run(t, amtool, "config", "routes", "test", "--config.file="+config, "--verify.receivers="+want,
			"alertname="+r.Alert, "severity="+sev, "component="+comp, "instance=host:7402")
	}
	// An alert without the labels falls through to the operators' mail.
	run(t, amtool, "config", "routes", "test", "--config.file="+config, "--verify.receivers=ops-email", "alertname=Other")
}
