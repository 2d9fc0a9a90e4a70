package deploy

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/compose-spec/compose-go/v2/types"
	"sigs.k8s.io/yaml"
)

// TestCompose loads the compose file the way docker compose does (compose-go:
// schema, interpolation, merge keys) and checks the cluster it describes.
func TestCompose(t *testing.T) {
	opts, err := cli.NewProjectOptions([]string{"compose/compose.yaml"},
		cli.WithWorkingDirectory("compose"),
		cli.WithEnv([]string{"RELAY_ADMIN_PASSWORD=admin-secret", "RELAY_EDGE_PASSWORD=edge-secret", "RELAY_BACKUP_KEY=AGE-SECRET-KEY-1X43GLUTKFAQLLT8RC22CRLUHXX2KNKVGNE3Q3J5Z08YE7DHF0V9QU6QVPR"}),
		cli.WithInterpolation(true), cli.WithNormalization(true), cli.WithConsistency(true), cli.WithResolvedPaths(true))
	if err != nil {
		t.Fatal(err)
	}
	p, err := opts.LoadProject(context.Background())
	if err != nil {
		t.Fatalf("compose-go refuses compose.yaml: %v", err)
	}
	for _, s := range []string{"prometheus", "alertmanager", "grafana", "jaeger"} {
		if _, ok := p.Services[s]; !ok {
			t.Errorf("no %s service", s)
		}
	}
	control, edge := relaydFlags(t, "control"), relaydFlags(t, "edge")
	ctl := relayctlEnv(t)
	var controls, edges, bootstraps []string
	for name, s := range p.Services {
		if len(s.Command) == 0 || !strings.Contains(s.Image, "relay") {
			continue
		}
		flags := map[string]commandFlags{"control": control, "edge": edge}[s.Command[0]]
		if flags.byName == nil {
			t.Fatalf("%s runs relayd %q", name, s.Command)
		}
		switch s.Command[0] {
		case "control":
			controls = append(controls, name)
		case "edge":
			edges = append(edges, name)
		}
		checkComposeRelay(t, p, name, s, flags, ctl)
		if s.Environment["RELAY_BOOTSTRAP"] != nil {
			bootstraps = append(bootstraps, name)
		}
	}
	slices.Sort(controls)
	slices.Sort(edges)
	if len(controls) != 3 || len(edges) != 2 {
		t.Fatalf("want 3 control nodes and 2 edges, got %v and %v", controls, edges)
	}
	if len(bootstraps) != 1 {
		t.Errorf("want one node that bootstraps, got %v", bootstraps)
	}
	apiPort := port(t, control.flag(t, "api-addr").Default)
	for _, name := range controls {
		s := p.Services[name]
		if v := s.Environment["RELAY_NODE_ID"]; v == nil || *v != name {
			t.Errorf("%s: node id %v, want its service name", name, v)
		}
		join := s.Environment["RELAY_JOIN"]
		if slices.Contains(bootstraps, name) {
			// It asks the others before it founds the cluster: with a
			// lost volume it joins the live one instead.
			if join == nil || len(strings.Split(*join, ",")) != len(controls)-1 {
				t.Errorf("%s bootstraps without asking every other control node (RELAY_JOIN %v)", name, join)
			}
			continue
		}
		if join == nil || !strings.Contains(*join, bootstraps[0]+":"+apiPort) {
			t.Errorf("%s does not join through %s:%s", name, bootstraps[0], apiPort)
			continue
		}
		for _, a := range strings.Split(*join, ",") {
			h, pt, _ := strings.Cut(a, ":")
			if !slices.Contains(controls, h) || pt != apiPort || h == name {
				t.Errorf("%s joins through %q, not another control node's API", name, a)
			}
		}
	}
	for _, name := range edges {
		for _, u := range strings.Split(*p.Services[name].Environment["RELAY_CONTROL"], ",") {
			h, _ := strings.CutPrefix(u, "https://")
			host, pt, _ := strings.Cut(h, ":")
			if !slices.Contains(controls, host) || pt != apiPort {
				t.Errorf("%s: control URL %q is not a control node's API over https", name, u)
			}
		}
	}

	// The certificate up.sh makes names every control node.
	script, err := os.ReadFile("compose/up.sh")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range controls {
		if !certNames(string(script))[name] {
			t.Errorf("up.sh's certificate does not name %s", name)
		}
		// Raft peers dial a node's advertised name and check the
		// certificate for it; the fixed addresses are in it too.
		nets := p.Services[name].Networks
		if nets["relay"] == nil || nets["relay"].Ipv4Address == "" {
			t.Errorf("%s has no fixed address on the relay network", name)
		} else if !certNames(string(script))[nets["relay"].Ipv4Address] {
			t.Errorf("up.sh's certificate does not name %s's address %s", name, nets["relay"].Ipv4Address)
		}
	}

	// Prometheus scrapes every relay process and loads every rule file.
	checkComposePrometheus(t, controls, edges, control, edge)

	// Bind mounts exist.
	for name, s := range p.Services {
		for _, v := range s.Volumes {
			if v.Type != types.VolumeTypeBind {
				continue
			}
			rel, err := filepath.Rel(mustAbs(t, "."), v.Source)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(v.Source); err != nil {
				if !strings.HasPrefix(rel, "compose/certs") { // made by up.sh
					t.Errorf("%s mounts %s: %v", name, rel, err)
				}
			}
		}
	}
}

// certNames returns the names up.sh passes to relay-certs.sh.
func certNames(script string) map[string]bool {
	_, call, ok := strings.Cut(script, "relay-certs.sh certs")
	if !ok {
		return nil
	}
	call = strings.ReplaceAll(call, "\\\n", " ")
	call, _, _ = strings.Cut(call, "\n")
	names := map[string]bool{}
	for _, f := range strings.Fields(call) {
		names[f] = true
	}
	return names
}

func mustAbs(t *testing.T, p string) string {
	a, err := filepath.Abs(p)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func checkComposeRelay(t *testing.T, p *types.Project, name string, s types.ServiceConfig, flags commandFlags, relayctl map[string]bool) {
	t.Run(name, func(t *testing.T) {
		if s.User != "65532:65532" || !s.ReadOnly || !slices.Equal(s.CapDrop, []string{"ALL"}) || len(s.CapAdd) != 0 ||
			!slices.Contains(s.SecurityOpt, "no-new-privileges:true") {
			t.Error("want user 65532, a read-only root, capabilities dropped, no new privileges")
		}
		for k, v := range s.Environment {
			switch {
			case strings.HasPrefix(k, "RELAYCTL_"):
				if !relayctl[k] {
					t.Errorf("%s is no relayctl setting", k)
				}
			case strings.HasPrefix(k, "RELAY_"):
				if _, ok := flags.byEnv[k]; !ok && !secretEnv[k] {
					t.Errorf("%s is not a flag of relayd %s", k, s.Command[0])
				}
				if v == nil || *v == "" {
					t.Errorf("%s is empty", k)
				}
			}
		}
		if s.Command[0] == "edge" {
			var cap, pending string
			if v := s.Environment["RELAY_MAX_SESSIONS"]; v != nil {
				cap = *v
			}
			if v := s.Environment["RELAY_MAX_PENDING_HTTPS"]; v != nil {
				pending = *v
			}
			checkSessionCap(t, name, cap, pending, int64(s.MemLimit))
		}
		// Scheduled backups on a volume of their own, apart from the data.
		if dir := s.Environment["RELAY_BACKUP_DIR"]; dir != nil {
			var dataVol, backupVol string
			for _, v := range s.Volumes {
				switch v.Target {
				case *s.Environment["RELAY_DATA_DIR"]:
					dataVol = v.Source
				case *dir:
					backupVol = v.Source
				}
			}
			if backupVol == "" || backupVol == dataVol {
				t.Errorf("RELAY_BACKUP_DIR=%s is not a volume of its own", *dir)
			}
		} else if s.Environment["RELAY_DATA_DIR"] != nil {
			t.Error("a control node without scheduled backups (RELAY_BACKUP_DIR)")
		}
		// Listen addresses on relayd's default ports; advertised ports
		// are the listened ones.
		for _, e := range []string{"RELAY_API_ADDR", "RELAY_RAFT_ADDR", "RELAY_ADDR"} {
			v := s.Environment[e]
			if v == nil {
				continue
			}
			if def := flags.byEnv[e].Default; port(t, *v) != port(t, def) {
				t.Errorf("%s=%s, relayd's default port is %s", e, *v, port(t, def))
			}
			if adv := s.Environment[strings.Replace(e, "_ADDR", "_ADVERTISE", 1)]; adv != nil && port(t, *adv) != port(t, *v) {
				t.Errorf("%s advertises %s", e, *adv)
			}
		}
		if v := s.Environment["RELAY_SHUTDOWN_TIMEOUT"]; v != nil && s.StopGracePeriod != nil {
			d, err := parseSeconds(*v)
			if err != nil {
				t.Fatal(err)
			}
			if int64(*s.StopGracePeriod) < (d+5)*1e9 {
				t.Errorf("stop_grace_period %v does not cover --shutdown-timeout %s", s.StopGracePeriod, *v)
			}
		}
		// Every path relayd reads is mounted.
		for k, v := range s.Environment {
			if v == nil || !strings.HasPrefix(*v, "/") {
				continue
			}
			if !slices.ContainsFunc(s.Volumes, func(m types.ServiceVolumeConfig) bool {
				return *v == m.Target || strings.HasPrefix(*v, strings.TrimSuffix(m.Target, "/")+"/")
			}) && !slices.ContainsFunc(s.Tmpfs, func(m string) bool { return strings.HasPrefix(*v, strings.SplitN(m, ":", 2)[0]+"/") }) {
				t.Errorf("%s=%s is on no volume", k, *v)
			}
		}
		// The edges' admin ports and the control nodes' are published
		// for the person at the laptop, on 127.0.0.1 only.
		for _, pc := range s.Ports {
			if pc.HostIP != "127.0.0.1" {
				t.Errorf("port %d is published on %q, want 127.0.0.1", pc.Target, pc.HostIP)
			}
		}
	})
}

func checkComposePrometheus(t *testing.T, controls, edges []string, control, edge commandFlags) {
	b, err := os.ReadFile("compose/prometheus.yml")
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Global struct {
			ScrapeInterval     string `json:"scrape_interval"`
			EvaluationInterval string `json:"evaluation_interval"`
		} `json:"global"`
		RuleFiles []string `json:"rule_files"`
		Alerting  struct {
			Alertmanagers []struct {
				StaticConfigs []struct {
					Targets []string `json:"targets"`
				} `json:"static_configs"`
			} `json:"alertmanagers"`
		} `json:"alerting"`
		ScrapeConfigs []struct {
			JobName       string `json:"job_name"`
			StaticConfigs []struct {
				Targets []string `json:"targets"`
			} `json:"static_configs"`
		} `json:"scrape_configs"`
	}
	if err := yaml.UnmarshalStrict(b, &cfg); err != nil {
		t.Fatalf("compose/prometheus.yml: %v", err)
	}
	var targets []string
	for _, sc := range cfg.ScrapeConfigs {
		for _, s := range sc.StaticConfigs {
			targets = append(targets, s.Targets...)
		}
	}
	ctlAdmin := port(t, control.flag(t, "admin-addr").Default)
	for _, c := range controls {
		if !slices.Contains(targets, c+":"+ctlAdmin) {
			t.Errorf("Prometheus does not scrape %s:%s", c, ctlAdmin)
		}
	}
	for _, e := range edges {
		if !slices.Contains(targets, e+":7444") {
			t.Errorf("Prometheus does not scrape %s's admin port", e)
		}
	}
	rules, _ := filepath.Glob("prometheus/*.yml")
	for _, r := range rules {
		rb, err := os.ReadFile(r)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(rb), "\ngroups:") && !strings.HasPrefix(string(rb), "groups:") {
			continue
		}
		matched := false
		for _, pat := range cfg.RuleFiles {
			if ok, _ := filepath.Match(pat, "/etc/prometheus/rules/"+filepath.Base(r)); ok {
				matched = true
			}
		}
		if !matched {
			t.Errorf("rule file %s is not loaded by compose/prometheus.yml's rule_files %v", r, cfg.RuleFiles)
		}
	}
}
