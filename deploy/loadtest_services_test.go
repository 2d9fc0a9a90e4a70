package deploy

import (
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"
)

// testRun is the part of the k6 operator's TestRun the manifest sets
// (k6.io/v1alpha1; its Go module would bring the operator along).
type testRun struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		Parallelism int `json:"parallelism"`
		Script      struct {
			ConfigMap struct {
				Name string `json:"name"`
				File string `json:"file"`
			} `json:"configMap"`
		} `json:"script"`
		Arguments string `json:"arguments,omitempty"`
		Runner    struct {
			Image        string                      `json:"image"`
			Resources    corev1.ResourceRequirements `json:"resources"`
			Env          []corev1.EnvVar             `json:"env"`
			VolumeMounts []corev1.VolumeMount        `json:"volumeMounts,omitempty"`
			Volumes      []corev1.Volume             `json:"volumes,omitempty"`
		} `json:"runner"`
	} `json:"spec"`
}

// loadPod is a load test's pod as the checks need it: where it runs,
// what it dials the control API at, and the file it checks the API's
// certificate against.
type loadPod struct {
	file, namespace string
	labels          labels.Set
	controlURL      string
	caFile          string // --control-ca, or SSL_CERT_FILE for k6
	mounts          []corev1.VolumeMount
	volumes         []corev1.Volume
}

func decodeStrict(t *testing.T, file string, into any) string {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.UnmarshalStrict(b, into); err != nil {
		t.Fatalf("%s does not decode strictly: %v", file, err)
	}
	return string(b)
}

func loadPods(t *testing.T) (ns *corev1.Namespace, pods []loadPod, texts map[string]string) {
	t.Helper()
	texts = map[string]string{}
	ns = &corev1.Namespace{}
	texts["namespace.yaml"] = decodeStrict(t, filepath.Join("loadtest", "namespace.yaml"), ns)

	var job batchv1.Job
	texts["relayload-job.yaml"] = decodeStrict(t, filepath.Join("loadtest", "relayload-job.yaml"), &job)
	spec := job.Spec.Template.Spec
	if len(spec.Containers) != 1 {
		t.Fatalf("relayload-job.yaml: %d containers, want 1", len(spec.Containers))
	}
	p := loadPod{file: "relayload-job.yaml", namespace: job.Namespace, labels: job.Spec.Template.Labels,
		mounts: spec.Containers[0].VolumeMounts, volumes: spec.Volumes}
	for _, a := range spec.Containers[0].Args {
		if v, ok := strings.CutPrefix(a, "--control="); ok {
			p.controlURL = v
		}
		if v, ok := strings.CutPrefix(a, "--control-ca="); ok {
			p.caFile = v
		}
	}
	pods = append(pods, p)

	var tr testRun
	texts["k6-testrun.yaml"] = decodeStrict(t, filepath.Join("loadtest", "k6-testrun.yaml"), &tr)
	p = loadPod{file: "k6-testrun.yaml", namespace: tr.Namespace, labels: labels.Set{},
		mounts: tr.Spec.Runner.VolumeMounts, volumes: tr.Spec.Runner.Volumes}
	for _, e := range tr.Spec.Runner.Env {
		switch e.Name {
		case "CONTROL_URL":
			p.controlURL = e.Value
		case "SSL_CERT_FILE":
			p.caFile = e.Value
		}
	}
	pods = append(pods, p)
	return ns, pods, texts
}

// The load test manifests (deploy/loadtest) reach the relay of the prod
// overlay: every Service address they use is one the overlay creates, in
// its namespace, with that port; the NetworkPolicies let the load test
// namespace (as namespace.yaml labels it) reach the pods behind it; the
// control API is dialed over TLS, at a name the control certificate has,
// and checked against the control plane's CA, copied from the Secret the
// edges take it from into a ConfigMap the pods mount.
func TestLoadtestManifestsReachTheRelay(t *testing.T) {
	r := render(t, filepath.Join("kubernetes", "overlays", "prod"))
	relayNS := r.namespaces[0].Name
	ns, pods, texts := loadPods(t)
	if ns.Labels["relay.edge-relay.dev/loadtest"] != "true" {
		t.Errorf("namespace.yaml: labels %v, want relay.edge-relay.dev/loadtest=true", ns.Labels)
	}

	host := regexp.MustCompile(`([a-z0-9-]+)\.` + regexp.QuoteMeta(relayNS) + `(?:\.svc)?(?:\.cluster\.local)?:(\d+)`)
	n := 0
	for _, p := range pods {
		if p.namespace != ns.Name {
			t.Errorf("%s runs in namespace %q, not namespace.yaml's %q", p.file, p.namespace, ns.Name)
		}
		for _, m := range host.FindAllStringSubmatch(texts[p.file], -1) {
			n++
			svc, ok := r.services[m[1]]
			if !ok {
				t.Errorf("%s: %s: no Service %s in namespace %s", p.file, m[0], m[1], relayNS)
				continue
			}
			port, _ := strconv.Atoi(m[2])
			var targets []string
			for _, sp := range svc.Spec.Ports {
				if int(sp.Port) == port {
					targets = append(targets, sp.TargetPort.String())
				}
			}
			if len(targets) == 0 {
				t.Errorf("%s: %s: Service %s has no port %d", p.file, m[0], m[1], port)
			}
			for _, target := range targets {
				checkAdmitted(t, r, p, ns, svc, target, m[0])
			}
		}

		// The control API, over TLS.
		u, ok := strings.CutPrefix(p.controlURL, "https://")
		if !ok {
			t.Errorf("%s dials the control API at %q: every overlay serves it over TLS only, want https://", p.file, p.controlURL)
			continue
		}
		h := u[:strings.LastIndexByte(u, ':')]
		if !host.MatchString(u) {
			t.Errorf("%s: control URL %s names no Service of namespace %s", p.file, p.controlURL, relayNS)
		}
		if cert, ok := r.certificates["relay-control"]; !ok {
			t.Error("the prod overlay has no Certificate relay-control")
		} else if !slices.ContainsFunc(cert.Spec.DNSNames, func(p string) bool { return matchHostname(p, h) }) {
			t.Errorf("%s dials %s, which the control certificate (%v) does not name", p.file, h, cert.Spec.DNSNames)
		}
		checkCAMount(t, r, p, texts[p.file])
	}
	if n < 4 {
		t.Fatalf("only %d service addresses found in the manifests", n)
	}
}

// checkAdmitted: every NetworkPolicy of a pod behind svc admits the load
// test pod p (another namespace) on the port named target.
func checkAdmitted(t *testing.T, r *rendered, p loadPod, ns *corev1.Namespace, svc *corev1.Service, target, addr string) {
	t.Helper()
	for _, server := range r.pods() {
		if server.spec.HostNetwork || !labels.SelectorFromSet(svc.Spec.Selector).Matches(server.labels) {
			continue // NetworkPolicies do not apply to host-network pods
		}
		for name, np := range r.netpols {
			sel, err := metav1.LabelSelectorAsSelector(&np.Spec.PodSelector)
			if err != nil || !sel.Matches(server.labels) {
				continue
			}
			if !slices.ContainsFunc(np.Spec.Ingress, func(rule networkingv1.NetworkPolicyIngressRule) bool {
				return admitsPort(rule, target) && admitsFromNamespace(rule, ns, p.labels)
			}) {
				t.Errorf("%s: %s: NetworkPolicy %s does not let pods of namespace %s (labels %v) reach %s on port %s",
					p.file, addr, name, ns.Name, ns.Labels, server.name, target)
			}
		}
	}
}

// admitsFromNamespace: the rule admits a pod with podLabels in the
// namespace ns, which is not the policy's own.
func admitsFromNamespace(rule networkingv1.NetworkPolicyIngressRule, ns *corev1.Namespace, podLabels labels.Set) bool {
	return len(rule.From) == 0 || slices.ContainsFunc(rule.From, func(peer networkingv1.NetworkPolicyPeer) bool {
		if peer.NamespaceSelector == nil {
			return false // a pod selector alone, or an ipBlock: the policy's namespace, or addresses
		}
		nsSel, err := metav1.LabelSelectorAsSelector(peer.NamespaceSelector)
		if err != nil || !nsSel.Matches(labels.Set(ns.Labels)) {
			return false
		}
		if peer.PodSelector == nil {
			return true
		}
		podSel, err := metav1.LabelSelectorAsSelector(peer.PodSelector)
		return err == nil && podSel.Matches(podLabels)
	})
}

// checkCAMount: the CA file p checks the control API against is ca.crt
// of a ConfigMap it mounts, which the manifest's steps make from the
// ca.crt of the Secret the edges mount as their control CA.
func checkCAMount(t *testing.T, r *rendered, p loadPod, text string) {
	t.Helper()
	if p.caFile == "" {
		t.Errorf("%s dials the control API over TLS without its CA (--control-ca, or SSL_CERT_FILE for k6)", p.file)
		return
	}
	i := slices.IndexFunc(p.mounts, func(m corev1.VolumeMount) bool { return path.Join(m.MountPath, "ca.crt") == p.caFile })
	if i < 0 {
		t.Errorf("%s: the CA %s is no ca.crt of a mounted volume", p.file, p.caFile)
		return
	}
	j := slices.IndexFunc(p.volumes, func(v corev1.Volume) bool { return v.Name == p.mounts[i].Name })
	if j < 0 || p.volumes[j].ConfigMap == nil {
		t.Errorf("%s: volume %s of the CA is no ConfigMap", p.file, p.mounts[i].Name)
		return
	}
	cm := p.volumes[j].ConfigMap.Name
	if !strings.Contains(text, "create configmap "+cm+" --from-file=ca.crt=") {
		t.Errorf("%s: its steps do not make the ConfigMap %s with a ca.crt", p.file, cm)
	}
	var edgeCA string
	if d, ok := r.deployments["relay-edge"]; ok {
		for _, v := range d.Spec.Template.Spec.Volumes {
			if v.Name == "control-ca" && v.Secret != nil {
				edgeCA = v.Secret.SecretName
			}
		}
	}
	if edgeCA == "" {
		t.Fatal("the edges mount no Secret as control-ca")
	}
	if want := "-n " + r.namespaces[0].Name + " get secret " + edgeCA + " -o jsonpath='{.data.ca\\.crt}'"; !strings.Contains(text, want) {
		t.Errorf("%s: its steps do not copy the CA from the Secret the edges use (want %q)", p.file, want)
	}
}
