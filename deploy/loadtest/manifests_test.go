// Package loadtest holds the manifests that run the load tests in
// Kubernetes (the k6 operator's TestRun, relayload as a Job); its test
// checks them against what the scripts and the driver actually accept.
package loadtest

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

type envVar struct {
	Name      string         `yaml:"name"`
	Value     string         `yaml:"value"`
	ValueFrom map[string]any `yaml:"valueFrom"`
}

func read(t *testing.T, path string, into any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, into); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

// source concatenates the files under dir whose names end in ext.
func source(t *testing.T, dir, ext string) string {
	t.Helper()
	var b strings.Builder
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(p, ext) && !strings.HasSuffix(p, "_test.go") {
			s, err := os.ReadFile(p)
			b.Write(s)
			return err
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func TestK6TestRun(t *testing.T) {
	var tr struct {
		APIVersion string `yaml:"apiVersion"`
		Kind       string `yaml:"kind"`
		Spec       struct {
			Parallelism int `yaml:"parallelism"`
			Script      struct {
				ConfigMap struct{ Name, File string } `yaml:"configMap"`
			} `yaml:"script"`
			Runner struct {
				Image string   `yaml:"image"`
				Env   []envVar `yaml:"env"`
			} `yaml:"runner"`
		} `yaml:"spec"`
	}
	read(t, "k6-testrun.yaml", &tr)
	if tr.APIVersion != "k6.io/v1alpha1" || tr.Kind != "TestRun" || tr.Spec.Parallelism < 2 {
		t.Fatalf("not a TestRun that splits the test: %+v", tr)
	}
	if _, err := os.Stat(filepath.Join("../../loadtest/k6/dist", tr.Spec.Script.ConfigMap.File)); err != nil {
		t.Fatalf("the TestRun runs %q, which is no bundle: %v", tr.Spec.Script.ConfigMap.File, err)
	}
	// Every variable set is one the scripts read, and the runners get a
	// token, never a password.
	src := source(t, "../../loadtest/k6/src", ".ts")
	read := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?:num|str)\("([A-Z0-9_]+)"|__ENV\.([A-Z0-9_]+)`).FindAllStringSubmatch(src, -1) {
		read[m[1]+m[2]] = true
	}
	// What k6 itself reads: Go's crypto/x509 takes the roots it checks
	// servers against from SSL_CERT_FILE (the control plane's CA).
	read["SSL_CERT_FILE"] = true
	var names []string
	for _, e := range tr.Spec.Runner.Env {
		names = append(names, e.Name)
		if !read[e.Name] {
			t.Errorf("the TestRun sets %s, which no script reads", e.Name)
		}
		if strings.Contains(strings.ToLower(e.Name), "password") {
			t.Errorf("a password in the TestRun: %s", e.Name)
		}
	}
	for _, need := range []string{"CONTROL_URL", "EDGE_URL", "RELAY_TOKEN"} {
		if !slices.Contains(names, need) {
			t.Errorf("the TestRun does not set %s", need)
		}
	}
	if !strings.HasPrefix(tr.Spec.Runner.Image, "grafana/k6:2.") {
		t.Errorf("runner image %q: the suite targets k6 v2", tr.Spec.Runner.Image)
	}
}

func TestRelayloadJob(t *testing.T) {
	var job struct {
		Kind string `yaml:"kind"`
		Spec struct {
			Parallelism    int    `yaml:"parallelism"`
			Completions    int    `yaml:"completions"`
			CompletionMode string `yaml:"completionMode"`
			Template       struct {
				Spec struct {
					RestartPolicy string `yaml:"restartPolicy"`
					Containers    []struct {
						Args []string `yaml:"args"`
						Env  []envVar `yaml:"env"`
					} `yaml:"containers"`
				} `yaml:"spec"`
			} `yaml:"template"`
		} `yaml:"spec"`
	}
	read(t, "relayload-job.yaml", &job)
	if job.Kind != "Job" || job.Spec.Parallelism < 2 || job.Spec.Parallelism != job.Spec.Completions || job.Spec.Template.Spec.RestartPolicy != "Never" {
		t.Fatalf("not a parallel Job of one run per pod: %+v", job.Spec)
	}
	if len(job.Spec.Template.Spec.Containers) != 1 {
		t.Fatal("want one container")
	}
	c := job.Spec.Template.Spec.Containers[0]
	// The arguments are relayload's: known flags, a known scenario, JSON
	// out (what merge reads).
	src := source(t, "../../loadtest/relayload", ".go")
	scenarios := map[string]bool{}
	for _, m := range regexp.MustCompile(`case "([a-z]+)":`).FindAllStringSubmatch(src, -1) {
		scenarios[m[1]] = true
	}
	scenario := ""
	for _, a := range c.Args {
		if !strings.HasPrefix(a, "--") {
			if scenario != "" {
				t.Fatalf("two scenarios: %s and %s", scenario, a)
			}
			scenario = a
			continue
		}
		name, _, _ := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if !strings.Contains(src, `"`+name+`", `) {
			t.Errorf("relayload has no flag --%s", name)
		}
	}
	if !scenarios[scenario] || scenario == "merge" || scenario == "plot" {
		t.Errorf("%q is not a relayload scenario", scenario)
	}
	if !slices.Contains(c.Args, "--json") {
		t.Error("the pods must print JSON for relayload merge")
	}
	if len(c.Env) != 1 || c.Env[0].Name != "RELAYCTL_TOKEN" || c.Env[0].ValueFrom == nil {
		t.Errorf("the pods get the admin's token from a secret, and nothing else: %+v", c.Env)
	}
	b, err := os.ReadFile("Dockerfile")
	if err != nil || !strings.Contains(string(b), "./loadtest/relayload") {
		t.Errorf("the Dockerfile does not build relayload: %v", err)
	}
}
