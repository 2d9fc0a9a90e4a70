package deploy

import (
	"bytes"
	"flag"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	schedulingv1 "k8s.io/api/scheduling/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

var update = flag.Bool("update", false, "rewrite generated files (kubernetes/components/monitoring/prometheusrule.yaml, kubernetes/testdata/immutable-*.json)")

// overlay is what one kustomize overlay must deploy.
type overlay struct {
	namespace    string
	controlNodes int  // voters: the seed and the joining nodes
	edges        int  // Deployment replicas; 0 with edgeDaemon
	edgeDaemon   bool // edges as a hostNetwork DaemonSet
	monitoring   bool // ServiceMonitors and PrometheusRule
	certManager  bool // the control plane's certificate from cert-manager
	pinnedImage  bool // a released tag, never a moving one
	// podSecurity is the Pod Security level the namespace enforces
	// ("" for none: the cluster's default).
	podSecurity string
	// backupStateMiB is the largest state whose RELAY_BACKUP_KEEP + 1
	// backups the control pods' backups volume holds, the figure
	// docs/operations.md gives.
	backupStateMiB int64
}

var overlays = map[string]overlay{
	"dev":              {namespace: "relay-dev", controlNodes: 1, edges: 1, backupStateMiB: 70},
	"prod":             {namespace: "relay", controlNodes: 3, edges: 3, monitoring: true, certManager: true, pinnedImage: true, podSecurity: "restricted", backupStateMiB: 354},
	"prod-hostnetwork": {namespace: "relay", controlNodes: 3, edgeDaemon: true, monitoring: true, certManager: true, pinnedImage: true, podSecurity: "privileged", backupStateMiB: 354},
}

// Local, strict mirrors of the two cert-manager kinds the manifests use
// (cert-manager's own Go module would bring much of Kubernetes with it).
// Only the fields the manifests set are here, so a typo still fails.
type certificate struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		IsCA        bool     `json:"isCA,omitempty"`
		CommonName  string   `json:"commonName,omitempty"`
		SecretName  string   `json:"secretName"`
		DNSNames    []string `json:"dnsNames,omitempty"`
		Duration    string   `json:"duration,omitempty"`
		RenewBefore string   `json:"renewBefore,omitempty"`
		PrivateKey  struct {
			Algorithm      string `json:"algorithm"`
			Size           int    `json:"size"`
			RotationPolicy string `json:"rotationPolicy,omitempty"`
		} `json:"privateKey"`
		Usages    []string  `json:"usages,omitempty"`
		IssuerRef issuerRef `json:"issuerRef"`
	} `json:"spec"`
}

type issuerRef struct {
	Kind string `json:"kind"`
	Name string `json:"name"`
}

type issuer struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		SelfSigned *struct{} `json:"selfSigned,omitempty"`
		CA         *struct {
			SecretName string `json:"secretName"`
		} `json:"ca,omitempty"`
	} `json:"spec"`
}

// rendered is an overlay built by kustomize and decoded into API types.
type rendered struct {
	namespaces      []*corev1.Namespace
	serviceAccounts map[string]*corev1.ServiceAccount
	services        map[string]*corev1.Service
	statefulSets    map[string]*appsv1.StatefulSet
	deployments     map[string]*appsv1.Deployment
	daemonSets      map[string]*appsv1.DaemonSet
	pdbs            map[string]*policyv1.PodDisruptionBudget
	netpols         map[string]*networkingv1.NetworkPolicy
	serviceMonitors map[string]*monitoringv1.ServiceMonitor
	rules           map[string]*monitoringv1.PrometheusRule
	certificates    map[string]*certificate
	issuers         map[string]*issuer
	priorityClasses map[string]*schedulingv1.PriorityClass
	objects         []metav1.Object
}

// render builds an overlay with kustomize (the library kubectl -k uses)
// and decodes every object strictly into its API type: a field that the
// type does not have fails the test.
func render(t *testing.T, dir string) *rendered {
	t.Helper()
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	rm, err := k.Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	r := &rendered{
		serviceAccounts: map[string]*corev1.ServiceAccount{}, services: map[string]*corev1.Service{},
		statefulSets: map[string]*appsv1.StatefulSet{}, deployments: map[string]*appsv1.Deployment{},
		daemonSets: map[string]*appsv1.DaemonSet{}, pdbs: map[string]*policyv1.PodDisruptionBudget{},
		netpols: map[string]*networkingv1.NetworkPolicy{}, serviceMonitors: map[string]*monitoringv1.ServiceMonitor{},
		rules: map[string]*monitoringv1.PrometheusRule{}, certificates: map[string]*certificate{}, issuers: map[string]*issuer{},
		priorityClasses: map[string]*schedulingv1.PriorityClass{},
	}
	for _, res := range rm.Resources() {
		y, err := res.AsYAML()
		if err != nil {
			t.Fatal(err)
		}
		kind := res.GetApiVersion() + "/" + res.GetKind()
		var obj metav1.Object
		switch kind {
		case "v1/Namespace":
			o := &corev1.Namespace{}
			r.namespaces, obj = append(r.namespaces, o), o
		case "v1/ServiceAccount":
			obj = into(r.serviceAccounts, res.GetName(), &corev1.ServiceAccount{})
		case "v1/Service":
			obj = into(r.services, res.GetName(), &corev1.Service{})
		case "apps/v1/StatefulSet":
			obj = into(r.statefulSets, res.GetName(), &appsv1.StatefulSet{})
		case "apps/v1/Deployment":
			obj = into(r.deployments, res.GetName(), &appsv1.Deployment{})
		case "apps/v1/DaemonSet":
			obj = into(r.daemonSets, res.GetName(), &appsv1.DaemonSet{})
		case "policy/v1/PodDisruptionBudget":
			obj = into(r.pdbs, res.GetName(), &policyv1.PodDisruptionBudget{})
		case "networking.k8s.io/v1/NetworkPolicy":
			obj = into(r.netpols, res.GetName(), &networkingv1.NetworkPolicy{})
		case "monitoring.coreos.com/v1/ServiceMonitor":
			obj = into(r.serviceMonitors, res.GetName(), &monitoringv1.ServiceMonitor{})
		case "monitoring.coreos.com/v1/PrometheusRule":
			obj = into(r.rules, res.GetName(), &monitoringv1.PrometheusRule{})
		case "cert-manager.io/v1/Certificate":
			obj = into(r.certificates, res.GetName(), &certificate{})
		case "cert-manager.io/v1/Issuer":
			obj = into(r.issuers, res.GetName(), &issuer{})
		case "scheduling.k8s.io/v1/PriorityClass":
			obj = into(r.priorityClasses, res.GetName(), &schedulingv1.PriorityClass{})
		default:
			t.Fatalf("%s: %s %s is of no kind this test knows; teach it", dir, kind, res.GetName())
		}
		if err := yaml.UnmarshalStrict(y, obj); err != nil {
			t.Fatalf("%s: %s %s does not decode strictly: %v\n%s", dir, kind, res.GetName(), err, y)
		}
		r.objects = append(r.objects, obj)
	}
	return r
}

func into[T any](m map[string]*T, name string, v *T) *T {
	m[name] = v
	return v
}

func TestKubernetesOverlays(t *testing.T) {
	control := relaydFlags(t, "control")
	edge := relaydFlags(t, "edge")
	ctl := relayctlEnv(t)
	cluster := renderCluster(t)
	for name, want := range overlays {
		t.Run(name, func(t *testing.T) {
			r := render(t, filepath.Join("kubernetes", "overlays", name))
			checkNamespaces(t, r, want)
			// The pods name the classes a cluster admin applied once.
			r.priorityClasses = cluster.priorityClasses
			checkControlPlane(t, r, want, control)
			checkEdges(t, r, want, edge, control)
			for _, pod := range r.pods() {
				t.Run(pod.kind+"/"+pod.name, func(t *testing.T) {
					checkPod(t, r, pod, want, map[string]commandFlags{"control": control, "edge": edge}, ctl)
					checkPodSecurity(t, r, pod)
				})
			}
			checkPriorities(t, r)
			checkServices(t, r)
			checkNetworkPolicies(t, r, want)
			checkMonitoring(t, r, want)
			checkCertificates(t, r, want)
		})
	}
}

// renderCluster renders kubernetes/cluster, what a cluster admin applies
// once for every namespace the relay runs in: cluster-scoped objects
// alone, PriorityClasses so far.
func renderCluster(t *testing.T) *rendered {
	t.Helper()
	r := render(t, filepath.Join("kubernetes", "cluster"))
	for _, o := range r.objects {
		if _, ok := o.(*schedulingv1.PriorityClass); !ok || o.GetNamespace() != "" {
			t.Errorf("kubernetes/cluster holds %T %s (namespace %q): it is for cluster-scoped objects that every namespace shares",
				o, o.GetName(), o.GetNamespace())
		}
	}
	if len(r.priorityClasses) == 0 {
		t.Error("kubernetes/cluster holds no PriorityClass")
	}
	return r
}

func checkNamespaces(t *testing.T, r *rendered, want overlay) {
	if len(r.namespaces) != 1 || r.namespaces[0].Name != want.namespace {
		t.Errorf("want exactly the namespace %s, got %v", want.namespace, r.namespaces)
	}
	if len(r.namespaces) == 1 {
		l := r.namespaces[0].Labels
		if got := l[podSecurityEnforce]; got != want.podSecurity {
			t.Errorf("namespace %s enforces Pod Security %q, want %q", want.namespace, got, want.podSecurity)
		}
		// Where the namespace enforces less than restricted (for the
		// host-network edges), everything else is still held to it by
		// warnings and the audit log.
		if want.podSecurity != "" {
			for _, mode := range []string{"warn", "audit"} {
				if got := l["pod-security.kubernetes.io/"+mode]; got != "restricted" {
					t.Errorf("namespace %s: pod-security.kubernetes.io/%s %q, want restricted", want.namespace, mode, got)
				}
			}
		}
	}
	for _, o := range r.objects {
		switch o.(type) {
		case *corev1.Namespace:
			if o.GetNamespace() != "" {
				t.Errorf("%T %s is cluster-scoped but has namespace %q", o, o.GetName(), o.GetNamespace())
			}
		case *schedulingv1.PriorityClass:
			// Cluster-wide, shared by every namespace the relay runs in:
			// `kubectl delete -k` of one overlay would delete what the
			// pods of the others name, and Kubernetes would refuse their
			// new pods; an operator with rights in the namespace alone
			// could not apply it.
			t.Errorf("the overlay holds the PriorityClass %s: it is cluster-wide, and belongs in kubernetes/cluster, which a cluster admin applies once", o.GetName())
		default:
			if o.GetNamespace() != want.namespace {
				t.Errorf("%T %s is in namespace %q, want %q", o, o.GetName(), o.GetNamespace(), want.namespace)
			}
		}
	}
}

// workload is the pod template of a StatefulSet, Deployment or DaemonSet.
type workload struct {
	kind, name, namespace string
	replicas              int
	labels                labels.Set
	spec                  *corev1.PodSpec
}

func (r *rendered) pods() []workload {
	var out []workload
	for n, s := range r.statefulSets {
		out = append(out, workload{"StatefulSet", n, s.Namespace, int(ptrOr(s.Spec.Replicas, 1)), s.Spec.Template.Labels, &s.Spec.Template.Spec})
	}
	for n, d := range r.deployments {
		out = append(out, workload{"Deployment", n, d.Namespace, int(ptrOr(d.Spec.Replicas, 1)), d.Spec.Template.Labels, &d.Spec.Template.Spec})
	}
	for n, d := range r.daemonSets {
		out = append(out, workload{"DaemonSet", n, d.Namespace, -1, d.Spec.Template.Labels, &d.Spec.Template.Spec})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].kind+out[i].name < out[j].kind+out[j].name })
	return out
}

func ptrOr[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}

func env(c *corev1.Container, name string) (corev1.EnvVar, bool) {
	for _, e := range c.Env {
		if e.Name == name {
			return e, true
		}
	}
	return corev1.EnvVar{}, false
}

func mustEnv(t *testing.T, c *corev1.Container, name string) string {
	t.Helper()
	e, ok := env(c, name)
	if !ok {
		t.Fatalf("container %s has no %s", c.Name, name)
	}
	return e.Value
}

// checkControlPlane: a seed of one that bootstraps, the others join it;
// the PDB keeps a quorum of all of them.
func checkControlPlane(t *testing.T, r *rendered, want overlay, flags commandFlags) {
	seed, ok1 := r.statefulSets["relay-control-seed"]
	nodes, ok2 := r.statefulSets["relay-control"]
	if !ok1 || !ok2 || len(r.statefulSets) != 2 {
		t.Fatalf("want the StatefulSets relay-control-seed and relay-control, got %v", sortedKeys(r.statefulSets))
	}
	if n := ptrOr(seed.Spec.Replicas, 1); n != 1 {
		t.Errorf("the seed has %d replicas, want 1: more would each found a cluster", n)
	}
	total := 1 + int(ptrOr(nodes.Spec.Replicas, 1))
	if total != want.controlNodes {
		t.Errorf("%d control nodes, want %d", total, want.controlNodes)
	}
	sc, nc := &seed.Spec.Template.Spec.Containers[0], &nodes.Spec.Template.Spec.Containers[0]
	if v := mustEnv(t, sc, "RELAY_BOOTSTRAP"); v != "true" {
		t.Errorf("the seed's RELAY_BOOTSTRAP is %q", v)
	}
	// The seed asks the other nodes before it founds the cluster, so that
	// with a lost volume it joins the live one instead of founding a
	// second: it names every other node and not itself; alone (dev) it
	// names none.
	seedJoin, hasSeedJoin := env(sc, "RELAY_JOIN")
	switch {
	case want.controlNodes == 1 && hasSeedJoin:
		t.Errorf("the seed is the only node and still has RELAY_JOIN %q: it waits for names that never answer", seedJoin.Value)
	case want.controlNodes > 1 && !hasSeedJoin:
		t.Error("the seed has no RELAY_JOIN: with a lost volume it founds a second cluster beside the live one")
	case want.controlNodes > 1:
		var others []string
		for i := range int(ptrOr(nodes.Spec.Replicas, 1)) {
			others = append(others, fmt.Sprintf("relay-control-%d.relay-control:%s", i, port(t, flags.flag(t, "api-addr").Default)))
		}
		if got := strings.Split(seedJoin.Value, ","); !slices.Equal(got, others) {
			t.Errorf("the seed's RELAY_JOIN is %q, want the other nodes %q", got, others)
		}
	}
	if _, ok := env(nc, "RELAY_BOOTSTRAP"); ok {
		t.Error("the joining nodes have RELAY_BOOTSTRAP: each would found a cluster of its own")
	}
	// Every join address is a control pod's API address under the
	// headless Service; the seed's is among them.
	apiPort := port(t, flags.flag(t, "api-addr").Default)
	joinHost := regexp.MustCompile(`^(relay-control(?:-seed)?)-(\d+)\.relay-control:(\d+)$`)
	var haveSeed bool
	for _, a := range strings.Split(mustEnv(t, nc, "RELAY_JOIN"), ",") {
		m := joinHost.FindStringSubmatch(a)
		if m == nil || m[3] != apiPort {
			t.Errorf("join address %q is not <pod>.relay-control:%s", a, apiPort)
			continue
		}
		haveSeed = haveSeed || m[1] == "relay-control-seed" && m[2] == "0"
	}
	if !haveSeed {
		t.Error("RELAY_JOIN does not name the seed relay-control-seed-0")
	}
	// Each node advertises its pod's stable DNS name under the headless
	// Service, never a pod IP: relayd keeps the name in the Raft
	// configuration and resolves it at each dial, so a pod rescheduled
	// onto another IP is found again.
	raftPort := port(t, flags.flag(t, "raft-addr").Default)
	for _, s := range []*appsv1.StatefulSet{seed, nodes} {
		c := &s.Spec.Template.Spec.Containers[0]
		pod, ok := env(c, "POD_NAME")
		if !ok || pod.ValueFrom == nil || pod.ValueFrom.FieldRef == nil || pod.ValueFrom.FieldRef.FieldPath != "metadata.name" {
			t.Errorf("%s: POD_NAME is not the pod's name from the downward API", s.Name)
		}
		for name, p := range map[string]string{"RELAY_RAFT_ADVERTISE": raftPort, "RELAY_API_ADVERTISE": apiPort} {
			if v := mustEnv(t, c, name); v != "$(POD_NAME)."+s.Spec.ServiceName+":"+p {
				t.Errorf("%s: %s=%q, want $(POD_NAME).%s:%s (the pod's stable name)", s.Name, name, v, s.Spec.ServiceName, p)
			}
		}
	}
	for _, s := range []*appsv1.StatefulSet{seed, nodes} {
		hs, ok := r.services[s.Spec.ServiceName]
		if !ok || hs.Spec.ClusterIP != corev1.ClusterIPNone || !hs.Spec.PublishNotReadyAddresses {
			t.Errorf("%s: serviceName %q is not a headless Service that publishes not-ready pods", s.Name, s.Spec.ServiceName)
		}
		var claimNames []string
		for _, c := range s.Spec.VolumeClaimTemplates {
			claimNames = append(claimNames, c.Name)
			if c.Spec.Resources.Requests.Storage().IsZero() {
				t.Errorf("%s: volume claim %s has no size", s.Name, c.Name)
			}
		}
		if !slices.Equal(claimNames, []string{"data", "backups"}) {
			t.Errorf("%s: volume claims %v, want data and backups (scheduled backups apart from the data)", s.Name, claimNames)
		}
		// Scheduled backups are on, on their own volume, encrypted with the
		// key of a Secret when it exists.
		c := &s.Spec.Template.Spec.Containers[0]
		dir := mustEnv(t, c, "RELAY_BACKUP_DIR")
		if !slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool {
			return m.Name == "backups" && (dir == m.MountPath || strings.HasPrefix(dir, m.MountPath+"/"))
		}) {
			t.Errorf("%s: RELAY_BACKUP_DIR=%s is not on the backups volume", s.Name, dir)
		}
		mustEnv(t, c, "RELAY_BACKUP_EVERY")
		checkBackupVolume(t, s, mustEnv(t, c, "RELAY_BACKUP_KEEP"), want.backupStateMiB)
		if k, ok := env(c, "RELAY_BACKUP_KEY"); !ok || k.ValueFrom == nil || k.ValueFrom.SecretKeyRef == nil {
			t.Errorf("%s: RELAY_BACKUP_KEY does not come from a Secret", s.Name)
		}
		if p := s.Spec.PersistentVolumeClaimRetentionPolicy; p == nil || p.WhenDeleted != appsv1.RetainPersistentVolumeClaimRetentionPolicyType || p.WhenScaled != appsv1.RetainPersistentVolumeClaimRetentionPolicyType {
			t.Errorf("%s: the Raft log's volumes must be retained", s.Name)
		}
		sel, err := metav1.LabelSelectorAsSelector(s.Spec.Selector)
		if err != nil || !sel.Matches(labels.Set(s.Spec.Template.Labels)) {
			t.Errorf("%s: selector does not match its pods", s.Name)
		}
	}
	doc, err := os.ReadFile(guide)
	if err != nil {
		t.Fatal(err)
	}
	if figure := fmt.Sprintf("%d MiB", want.backupStateMiB); !bytes.Contains(doc, []byte(figure)) {
		t.Errorf("docs/operations.md does not give the state the backups volume holds, %s", figure)
	}
	// An image change touches both sets' pod templates at once, and each
	// RollingUpdate set then restarts its pods on its own schedule: the
	// pods they may take down together must leave a quorum standing.
	if total > 1 {
		var down int
		var rolling []string
		for _, s := range []*appsv1.StatefulSet{seed, nodes} {
			if s.Spec.UpdateStrategy.Type == appsv1.OnDeleteStatefulSetStrategyType {
				continue
			}
			n := 1
			if ru := s.Spec.UpdateStrategy.RollingUpdate; ru != nil && ru.MaxUnavailable != nil {
				n = ru.MaxUnavailable.IntValue()
			}
			down += min(n, int(ptrOr(s.Spec.Replicas, 1)))
			rolling = append(rolling, s.Name)
		}
		if tolerated := total - (total/2 + 1); down > tolerated {
			t.Errorf("StatefulSets %v roll at once and may restart %d of %d voters together, but the cluster tolerates %d down: "+
				"make all but one updateStrategy OnDelete", rolling, down, total, tolerated)
		}
	}
	// The two sets' selectors must not overlap.
	sel, _ := metav1.LabelSelectorAsSelector(seed.Spec.Selector)
	if sel.Matches(labels.Set(nodes.Spec.Template.Labels)) {
		t.Error("the seed's selector matches the joining nodes' pods")
	}

	pdb, ok := r.pdbs["relay-control"]
	if !ok {
		t.Fatal("no PodDisruptionBudget relay-control")
	}
	switch {
	case total == 1:
		// No quorum to keep: a budget that allows no eviction would block
		// every drain of the node it runs on.
		if pdb.Spec.MinAvailable != nil || pdb.Spec.MaxUnavailable == nil || pdb.Spec.MaxUnavailable.IntValue() < 1 {
			t.Errorf("PDB of one control node: minAvailable %v, maxUnavailable %v; want maxUnavailable 1, so that a drain can evict it",
				pdb.Spec.MinAvailable, pdb.Spec.MaxUnavailable)
		}
	case pdb.Spec.MinAvailable == nil:
		t.Errorf("PDB of %d control nodes without minAvailable, want the quorum, %d", total, total/2+1)
	case pdb.Spec.MinAvailable.IntValue() != total/2+1:
		t.Errorf("PDB minAvailable %s, want the quorum of %d nodes, %d", pdb.Spec.MinAvailable.String(), total, total/2+1)
	}
	psel, _ := metav1.LabelSelectorAsSelector(pdb.Spec.Selector)
	for _, s := range []*appsv1.StatefulSet{seed, nodes} {
		if !psel.Matches(labels.Set(s.Spec.Template.Labels)) {
			t.Errorf("the control PDB does not cover %s", s.Name)
		}
	}
	if want.controlNodes > 1 {
		a := nodes.Spec.Template.Spec.Affinity
		if a == nil || a.PodAntiAffinity == nil || len(a.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution) == 0 {
			t.Error("control nodes may share a Kubernetes node: want required pod anti-affinity")
		}
	}
}

// stateShareOfData is the largest part of the data volume the state can
// take: the volume also holds two Raft snapshots (each a copy of the
// state) and the room Pebble's compactions need, about another.
const stateShareOfData = 4

// checkBackupVolume: the backups volume holds what relayd keeps there at
// its fullest, --backup-keep backups and the one being written (old ones
// are pruned only once a new one verified), each about the size of the
// state. A volume that fills stays full: no backup succeeds, so none is
// pruned, whatever --backup-keep then says. The volumes' sizes are fixed
// for an existing StatefulSet (its claim templates are immutable), so
// the largest state both hold is a figure docs/operations.md gives, what
// an operator watches relay_backup_last_size_bytes against before growing
// the PVCs.
func checkBackupVolume(t *testing.T, s *appsv1.StatefulSet, keep string, wantMiB int64) {
	n, err := strconv.ParseInt(keep, 10, 64)
	if err != nil || n <= 0 {
		t.Errorf("%s: RELAY_BACKUP_KEEP %q: want a positive number", s.Name, keep)
		return
	}
	size := map[string]int64{}
	for _, c := range s.Spec.VolumeClaimTemplates {
		size[c.Name] = c.Spec.Resources.Requests.Storage().Value()
	}
	// A filesystem keeps about a tenth of its volume for itself: its
	// journal and metadata, and ext4's 5% reserved for root, which relayd
	// (uid 65532) cannot use.
	usable := func(b int64) int64 { return b / 10 * 9 }
	state := min(usable(size["backups"])/(n+1), usable(size["data"])/stateShareOfData) >> 20
	if state != wantMiB {
		t.Errorf("%s: the backups volume (%d MiB) holds RELAY_BACKUP_KEEP+1 = %d backups, and the data volume (%d MiB) holds a state with its snapshots, "+
			"of up to %d MiB, but docs/operations.md and this test say %d MiB: update both (and mind that a volume's size cannot change on a live StatefulSet)",
			s.Name, size["backups"]>>20, n+1, size["data"]>>20, state, wantMiB)
	}
}

func checkEdges(t *testing.T, r *rendered, want overlay, edge, control commandFlags) {
	var spec *corev1.PodSpec
	if want.edgeDaemon {
		ds, ok := r.daemonSets["relay-edge"]
		if !ok || len(r.deployments) != 0 {
			t.Fatalf("want the DaemonSet relay-edge and no Deployment, got %v, %v", sortedKeys(r.daemonSets), sortedKeys(r.deployments))
		}
		spec = &ds.Spec.Template.Spec
		if !spec.HostNetwork || spec.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
			t.Error("the edge DaemonSet must use the host network with ClusterFirstWithHostNet DNS")
		}
		if _, ok := r.services["relay-edge"]; ok {
			t.Error("the LoadBalancer relay-edge is left with host-network edges")
		}
		c := &spec.Containers[0]
		// A host alone (relayd adds the bound port): with a port, an IPv6
		// node address, substituted without brackets, is no host:port.
		if got := mustEnv(t, c, "RELAY_PUBLIC_ADDR"); got != "$(HOST_IP)" {
			t.Errorf("RELAY_PUBLIC_ADDR %q, want the node's address alone", got)
		}
		if got := mustEnv(t, c, "RELAY_MESH_ADVERTISE"); got != "$(HOST_IP)" {
			t.Errorf("RELAY_MESH_ADVERTISE %q, want the node's address alone", got)
		}
		for _, p := range c.Ports {
			if p.HostPort != p.ContainerPort {
				t.Errorf("port %s: hostPort %d, want %d", p.Name, p.HostPort, p.ContainerPort)
			}
		}
	} else {
		d, ok := r.deployments["relay-edge"]
		if !ok || len(r.daemonSets) != 0 {
			t.Fatalf("want the Deployment relay-edge, got %v", sortedKeys(r.deployments))
		}
		if n := int(ptrOr(d.Spec.Replicas, 1)); n != want.edges {
			t.Errorf("%d edges, want %d", n, want.edges)
		}
		if ru := d.Spec.Strategy.RollingUpdate; ru == nil || ru.MaxUnavailable == nil || ru.MaxUnavailable.IntValue() != 0 {
			t.Error("edge rollouts must add an edge before draining one (maxUnavailable 0)")
		}
		spec = &d.Spec.Template.Spec
		lb, ok := r.services["relay-edge"]
		if !ok || lb.Spec.Type != corev1.ServiceTypeLoadBalancer || lb.Spec.ExternalTrafficPolicy != corev1.ServiceExternalTrafficPolicyLocal {
			t.Fatal("want the LoadBalancer Service relay-edge with externalTrafficPolicy Local")
		}
		protos := map[corev1.Protocol]int32{}
		for _, p := range lb.Spec.Ports {
			protos[p.Protocol] = p.Port
		}
		if protos[corev1.ProtocolUDP] == 0 || protos[corev1.ProtocolUDP] != protos[corev1.ProtocolTCP] {
			t.Errorf("relay-edge must offer UDP and TCP on one port, has %v", protos)
		}
		if got := mustEnv(t, &spec.Containers[0], "RELAY_MESH_ADVERTISE"); got != "$(POD_IP)" {
			t.Errorf("RELAY_MESH_ADVERTISE %q, want the pod's address alone (relayd adds the port; IPv6 needs no brackets then)", got)
		}
		if want.edges > 1 && (spec.Affinity == nil || spec.Affinity.PodAntiAffinity == nil) {
			t.Error("edges have no pod anti-affinity")
		}
	}
	if _, ok := r.pdbs["relay-edge"]; !ok {
		t.Error("no PodDisruptionBudget for the edges")
	}
	// The edges reach the control plane at every control pod's own name
	// under the headless Service (the certificate's *.relay-control),
	// over TLS checked against the control plane's CA. Not at the API
	// Service: the edge keeps one pooled HTTP/2 connection per URL, which
	// kube-proxy pins to one pod behind a Service, so the edge's failover
	// (to the next URL when a watch stalls or a node answers unavailable)
	// could not leave a lagging or hung pod. Each pod is named, so that
	// the edges can fail over to any.
	c := &spec.Containers[0]
	apiPort := port(t, control.flag(t, "api-addr").Default)
	named := map[string]bool{}
	for _, u := range strings.Split(mustEnv(t, c, "RELAY_CONTROL"), ",") {
		host, ok := strings.CutPrefix(u, "https://")
		if !ok {
			t.Errorf("control URL %q is not https", u)
			continue
		}
		pod, _, ok := controlPodAt(r, host)
		switch _, svc := r.services[strings.TrimSuffix(host, ":"+apiPort)]; {
		case svc:
			t.Errorf("control URL %q is a Service: kube-proxy pins the edge's pooled HTTP/2 connection to one pod behind it, and the edge's failover cannot leave that pod; "+
				"name every control pod instead (https://<pod>.relay-control:%s)", u, apiPort)
		case !ok || port(t, host) != apiPort:
			t.Errorf("control URL %q is not a control pod's API, https://<pod>.<its headless Service>:%s", u, apiPort)
		case named[pod]:
			t.Errorf("RELAY_CONTROL names %s twice", pod)
		default:
			named[pod] = true
		}
	}
	for _, pod := range sortedKeys(controlPods(r)) {
		if !named[pod] {
			t.Errorf("RELAY_CONTROL does not name the control pod %s: the edges cannot fail over to it", pod)
		}
	}
	if got, want := port(t, mustEnv(t, c, "RELAY_ADDR")), port(t, edge.flag(t, "addr").Default); got != want {
		t.Errorf("edges listen on %s, relayd's default is %s: keep one port everywhere", got, want)
	}
}

// controlPods maps the name of every pod of the control plane's
// StatefulSets to its StatefulSet.
func controlPods(r *rendered) map[string]*appsv1.StatefulSet {
	pods := map[string]*appsv1.StatefulSet{}
	for name, s := range r.statefulSets {
		for i := range int(ptrOr(s.Spec.Replicas, 1)) {
			pods[fmt.Sprintf("%s-%d", name, i)] = s
		}
	}
	return pods
}

// controlPodAt resolves host:port, when it names a StatefulSet's pod by
// its stable name under the set's headless Service (<pod>.<service>), to
// the pod and its StatefulSet.
func controlPodAt(r *rendered, hostport string) (string, *appsv1.StatefulSet, bool) {
	i := strings.LastIndexByte(hostport, ':')
	if i < 0 {
		return "", nil, false
	}
	pod, svc, _ := strings.Cut(hostport[:i], ".")
	s, ok := controlPods(r)[pod]
	if !ok || s.Spec.ServiceName != svc {
		return "", nil, false
	}
	return pod, s, true
}

var envRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// secretEnv are read by relayd from the environment only, never as flags.
var secretEnv = map[string]bool{"RELAY_ADMIN_PASSWORD": true, "RELAY_EDGE_PASSWORD": true, "RELAY_BACKUP_KEY": true}

// checkPod holds every relay pod to the same rules.
func checkPod(t *testing.T, r *rendered, w workload, want overlay, flags map[string]commandFlags, relayctl map[string]bool) {
	s := w.spec
	if len(s.Containers) != 1 || len(s.InitContainers) != 0 {
		t.Fatalf("want one container, got %d (+%d init)", len(s.Containers), len(s.InitContainers))
	}
	c := &s.Containers[0]
	if len(c.Args) != 1 {
		t.Fatalf("args %q: want the relayd command alone (settings go in RELAY_* variables)", c.Args)
	}
	cmd, ok := flags[c.Args[0]]
	if !ok {
		t.Fatalf("relayd %s is no command this test knows", c.Args[0])
	}

	// Security: non-root, no privilege, read-only root, no capabilities.
	psc := s.SecurityContext
	if psc == nil || !ptrOr(psc.RunAsNonRoot, false) || ptrOr(psc.RunAsUser, 0) != 65532 || psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Error("pod securityContext: want runAsNonRoot, runAsUser 65532 and the RuntimeDefault seccomp profile")
	}
	sc := c.SecurityContext
	if sc == nil || ptrOr(sc.AllowPrivilegeEscalation, true) || !ptrOr(sc.ReadOnlyRootFilesystem, false) || ptrOr(sc.Privileged, false) ||
		sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) != 0 {
		t.Error("container securityContext: want no privilege escalation, a read-only root, not privileged, capabilities drop ALL and add none")
	}
	if ptrOr(s.AutomountServiceAccountToken, true) {
		t.Error("the service account token is mounted; relayd never calls the Kubernetes API")
	}
	if _, ok := r.serviceAccounts[s.ServiceAccountName]; !ok {
		t.Errorf("service account %q is not deployed", s.ServiceAccountName)
	}

	// Resources: requests for scheduling, a memory limit, and a memory
	// request as large as the limit. Under node memory pressure the
	// kubelet evicts first the pods whose use is over their requests, and
	// a hard eviction kills at once: no drain for an edge, no leadership
	// transfer for a control node. A pod that requests its limit is never
	// over it, and then goes by its priority (a class of the relay's own).
	req, lim := c.Resources.Requests, c.Resources.Limits
	if req.Cpu().IsZero() || req.Memory().IsZero() || lim.Memory().IsZero() {
		t.Errorf("resources: want cpu and memory requests and a memory limit, got %v", c.Resources)
	}
	if lim.Memory().Cmp(*req.Memory()) != 0 {
		t.Errorf("memory request %s, limit %s: want the request equal to the limit (a pod over its request is evicted first under node memory pressure, without its graceful stop)",
			req.Memory(), lim.Memory())
	}
	if pc, ok := r.priorityClasses[s.PriorityClassName]; !ok {
		t.Errorf("priorityClassName %q is no PriorityClass of kubernetes/cluster", s.PriorityClassName)
	} else if pc.Value <= 0 || pc.GlobalDefault {
		t.Errorf("PriorityClass %s: value %d, globalDefault %v; want a priority above pods without a class, and no default for others' pods",
			pc.Name, pc.Value, pc.GlobalDefault)
	}
	if c.Args[0] == "edge" {
		v, _ := env(c, "RELAY_MAX_SESSIONS")
		pending, _ := env(c, "RELAY_MAX_PENDING_HTTPS")
		checkSessionCap(t, w.kind+" "+w.name, v.Value, pending.Value, lim.Memory().Value())
	}

	// Image: the overlay's, pinned in production.
	if !strings.Contains(c.Image, "/relay:") && !strings.Contains(c.Image, "/relay@sha256:") {
		t.Errorf("image %q is not a tagged relay image", c.Image)
	}
	if want.pinnedImage && (strings.HasSuffix(c.Image, ":latest") || strings.HasSuffix(c.Image, ":dev")) {
		t.Errorf("image %q is a moving tag", c.Image)
	}

	// Environment: each RELAY_* variable is a flag of this command
	// (or a secret relayd reads from the environment), each RELAYCTL_* a
	// relayctl setting, and $(VAR) names a variable defined before it.
	defined := map[string]bool{}
	for _, e := range c.Env {
		for _, m := range envRef.FindAllStringSubmatch(e.Value, -1) {
			if !defined[m[1]] {
				t.Errorf("%s uses $(%s), which is not defined before it (Kubernetes would leave it as is)", e.Name, m[1])
			}
		}
		defined[e.Name] = true
		switch {
		case strings.HasPrefix(e.Name, "RELAYCTL_"):
			if !relayctl[e.Name] {
				t.Errorf("%s is no relayctl setting", e.Name)
			}
		case strings.HasPrefix(e.Name, "RELAY_"):
			if _, ok := cmd.byEnv[e.Name]; !ok && !secretEnv[e.Name] {
				t.Errorf("%s is not a flag of relayd %s", e.Name, c.Args[0])
			}
		}
	}

	// Ports: each listen address's port is a named container port, and it
	// is relayd's default port where relayd has one.
	ports := map[string]corev1.ContainerPort{}
	for _, p := range c.Ports {
		ports[p.Name] = p
	}
	for envName, portName := range map[string]string{
		"RELAY_API_ADDR": "api", "RELAY_RAFT_ADDR": "raft", "RELAY_ADMIN_ADDR": "admin",
		"RELAY_ADDR": "https", "RELAY_MESH_ADDR": "mesh",
	} {
		e, ok := env(c, envName)
		if !ok {
			continue
		}
		p := port(t, e.Value)
		if cp, ok := ports[portName]; !ok || strconv.Itoa(int(cp.ContainerPort)) != p {
			t.Errorf("%s=%s but container port %q is %v", envName, e.Value, portName, cp.ContainerPort)
		}
		if def := cmd.byEnv[envName].Default; def != "" && port(t, def) != p {
			t.Errorf("%s port %s differs from relayd's default %s", envName, p, def)
		}
		// An advertised host alone (no colon) takes the bound port.
		if adv, ok := env(c, strings.Replace(envName, "_ADDR", "_ADVERTISE", 1)); ok && strings.Contains(adv.Value, ":") && port(t, adv.Value) != p {
			t.Errorf("%s advertises port %s, listens on %s", envName, port(t, adv.Value), p)
		}
	}
	if _, ok := env(c, "RELAY_ADDR"); ok {
		if q, ok := ports["quic"]; !ok || q.Protocol != corev1.ProtocolUDP || q.ContainerPort != ports["https"].ContainerPort {
			t.Error("the edge's QUIC port (UDP) must be its HTTPS port")
		}
	}

	// Probes: readiness on /readyz, liveness on /healthz, both on the
	// plain-HTTP admin port.
	for probe, path := range map[*corev1.Probe]string{c.ReadinessProbe: "/readyz", c.LivenessProbe: "/healthz"} {
		if probe == nil || probe.HTTPGet == nil || probe.HTTPGet.Path != path || probe.HTTPGet.Port != intstr.FromString("admin") {
			t.Errorf("want an HTTP probe of %s on the admin port, got %+v", path, probe)
		}
	}

	// A control node opens Raft (replaying its log, or installing a
	// snapshot from the leader) before its admin port listens: the
	// liveness probe alone would kill a node that restores a large
	// snapshot, again and again. A startup probe holds liveness off for
	// minutes.
	if c.Args[0] == "control" {
		p := c.StartupProbe
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/healthz" || p.HTTPGet.Port != intstr.FromString("admin") {
			t.Errorf("want a startup probe of /healthz on the admin port, got %+v", p)
		} else if budget := max(p.PeriodSeconds, 10) * max(p.FailureThreshold, 3); budget < 600 {
			t.Errorf("the startup probe gives a node %ds to open Raft, want at least 600s", budget)
		}
	}

	// Graceful stop: the grace period covers the preStop sleep and
	// relayd's own --shutdown-timeout.
	shutdown := mustEnv(t, c, "RELAY_SHUTDOWN_TIMEOUT")
	d, err := parseSeconds(shutdown)
	if err != nil {
		t.Fatal(err)
	}
	var pre int64
	if c.Lifecycle != nil && c.Lifecycle.PreStop != nil && c.Lifecycle.PreStop.Sleep != nil {
		pre = c.Lifecycle.PreStop.Sleep.Seconds
	}
	if pre == 0 {
		t.Error("no preStop sleep: endpoints would still send traffic to a stopping pod")
	}
	if g := ptrOr(s.TerminationGracePeriodSeconds, 30); g < pre+d+5 {
		t.Errorf("terminationGracePeriodSeconds %d < preStop %ds + shutdown timeout %ds + 5s", g, pre, d)
	}

	// Files: every path relayd is given lies on a mounted volume (the
	// root is read-only), and every mount names a volume of the pod.
	vols := map[string]corev1.Volume{}
	for _, v := range s.Volumes {
		vols[v.Name] = v
	}
	for _, m := range c.VolumeMounts {
		if _, ok := vols[m.Name]; !ok && !slices.ContainsFunc(claims(r, w), func(n string) bool { return n == m.Name }) {
			t.Errorf("mount %s names no volume", m.Name)
		}
	}
	for _, e := range c.Env {
		if !strings.HasPrefix(e.Value, "/") {
			continue
		}
		if !slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool {
			return strings.HasPrefix(e.Value, m.MountPath+"/") || e.Value == m.MountPath
		}) {
			t.Errorf("%s=%s is on no mounted volume", e.Name, e.Value)
		}
	}
}

func claims(r *rendered, w workload) []string {
	var out []string
	if s, ok := r.statefulSets[w.name]; ok && w.kind == "StatefulSet" {
		for _, c := range s.Spec.VolumeClaimTemplates {
			out = append(out, c.Name)
		}
	}
	return out
}

func parseSeconds(s string) (int64, error) {
	n, ok := strings.CutSuffix(s, "s")
	if !ok {
		return 0, fmt.Errorf("duration %q: write it in seconds (30s)", s)
	}
	return strconv.ParseInt(n, 10, 64)
}

// checkPriorities: the control plane's pods rank above the edges'. A node
// short of memory evicts an edge before a voter: the edges' devices
// reconnect to the others, while a voter lost costs the cluster a
// failure it tolerates (and its pod may stay Pending).
func checkPriorities(t *testing.T, r *rendered) {
	prio := map[string][]int32{}
	for _, w := range r.pods() {
		if pc, ok := r.priorityClasses[w.spec.PriorityClassName]; ok {
			prio[w.spec.Containers[0].Args[0]] = append(prio[w.spec.Containers[0].Args[0]], pc.Value)
		}
	}
	if len(prio["control"]) == 0 || len(prio["edge"]) == 0 {
		t.Fatalf("priorities of control and edge pods: %v", prio)
	}
	if slices.Min(prio["control"]) <= slices.Max(prio["edge"]) {
		t.Errorf("control pods' priorities %v are not above the edges' %v", prio["control"], prio["edge"])
	}
}

// checkServices: every Service selects pods, and its ports name ports
// those pods have, with the same protocol.
func checkServices(t *testing.T, r *rendered) {
	for name, svc := range r.services {
		var selected []workload
		for _, w := range r.pods() {
			if labels.SelectorFromSet(svc.Spec.Selector).Matches(w.labels) {
				selected = append(selected, w)
			}
		}
		if len(selected) == 0 {
			t.Errorf("Service %s selects no pods", name)
			continue
		}
		for _, sp := range svc.Spec.Ports {
			for _, w := range selected {
				if !slices.ContainsFunc(w.spec.Containers[0].Ports, func(cp corev1.ContainerPort) bool {
					return cp.Name == sp.TargetPort.StrVal && cp.Protocol == ptrOr(&sp.Protocol, corev1.ProtocolTCP) ||
						sp.Protocol == "" && cp.Name == sp.TargetPort.StrVal && cp.Protocol == corev1.ProtocolTCP
				}) {
					t.Errorf("Service %s port %s: %s %s has no %s port %q", name, sp.Name, w.kind, w.name, sp.Protocol, sp.TargetPort.String())
				}
			}
		}
	}
}

func checkNetworkPolicies(t *testing.T, r *rendered, want overlay) {
	for _, w := range r.pods() {
		var covered bool
		for name, np := range r.netpols {
			sel, err := metav1.LabelSelectorAsSelector(&np.Spec.PodSelector)
			if err != nil || !sel.Matches(w.labels) {
				continue
			}
			covered = true
			for _, rule := range np.Spec.Ingress {
				for _, p := range rule.Ports {
					if p.Port == nil || !slices.ContainsFunc(w.spec.Containers[0].Ports, func(cp corev1.ContainerPort) bool {
						return cp.Name == p.Port.StrVal && cp.Protocol == ptrOr(p.Protocol, corev1.ProtocolTCP)
					}) {
						t.Errorf("NetworkPolicy %s opens %v, which %s has not", name, p.Port, w.name)
					}
				}
			}
		}
		if !covered && !w.spec.HostNetwork {
			t.Errorf("no NetworkPolicy selects %s %s", w.kind, w.name)
		}
	}
	checkControlAPIReachable(t, r)
}

// checkControlAPIReachable: every workload that calls the control API
// (RELAY_CONTROL) is let in on the API port by the NetworkPolicies of the
// pods behind the Service it dials. A pod selector matches only traffic
// from pod addresses: a host-network pod's comes from its node's address,
// which common CNIs match to no pod, so it needs an ipBlock peer.
func checkControlAPIReachable(t *testing.T, r *rendered) {
	for _, client := range r.pods() {
		v, ok := env(&client.spec.Containers[0], "RELAY_CONTROL")
		if !ok {
			continue
		}
		for _, u := range strings.Split(v.Value, ",") {
			hostport := strings.TrimPrefix(strings.TrimPrefix(u, "https://"), "http://")
			// The pods it reaches, and the name of the port it reaches
			// them at: a pod by its own name, on the container port of
			// that number; or a Service's pods, on its target port.
			var servers []workload
			var target string
			if _, s, ok := controlPodAt(r, hostport); ok {
				for _, w := range r.pods() {
					if w.kind == "StatefulSet" && w.name == s.Name {
						servers = append(servers, w)
					}
				}
				for _, cp := range s.Spec.Template.Spec.Containers[0].Ports {
					if strconv.Itoa(int(cp.ContainerPort)) == port(t, hostport) {
						target = cp.Name
					}
				}
			} else if svc, ok := r.services[hostport[:strings.LastIndexByte(hostport, ':')]]; ok {
				for _, sp := range svc.Spec.Ports {
					if strconv.Itoa(int(sp.Port)) == port(t, hostport) {
						target = sp.TargetPort.String()
					}
				}
				for _, w := range r.pods() {
					if labels.SelectorFromSet(svc.Spec.Selector).Matches(w.labels) {
						servers = append(servers, w)
					}
				}
			}
			if target == "" {
				t.Errorf("%s %s: control URL %q reaches no port of a control pod", client.kind, client.name, u)
			}
			for _, server := range servers {
				for name, np := range r.netpols {
					sel, err := metav1.LabelSelectorAsSelector(&np.Spec.PodSelector)
					if err != nil || !sel.Matches(server.labels) {
						continue
					}
					if !slices.ContainsFunc(np.Spec.Ingress, func(rule networkingv1.NetworkPolicyIngressRule) bool {
						return admitsPort(rule, target) && admitsPeer(rule, client)
					}) {
						how := "a podSelector peer"
						if client.spec.HostNetwork {
							how = "an ipBlock peer (its traffic comes from the node's address)"
						}
						t.Errorf("NetworkPolicy %s does not let %s %s reach %s on port %s: want %s", name, client.kind, client.name, server.name, target, how)
					}
				}
			}
		}
	}
}

func admitsPort(rule networkingv1.NetworkPolicyIngressRule, name string) bool {
	return len(rule.Ports) == 0 || slices.ContainsFunc(rule.Ports, func(p networkingv1.NetworkPolicyPort) bool {
		return p.Port == nil || p.Port.String() == name
	})
}

func admitsPeer(rule networkingv1.NetworkPolicyIngressRule, client workload) bool {
	return len(rule.From) == 0 || slices.ContainsFunc(rule.From, func(p networkingv1.NetworkPolicyPeer) bool {
		if client.spec.HostNetwork {
			return p.IPBlock != nil
		}
		if p.PodSelector == nil || p.NamespaceSelector != nil {
			return false
		}
		sel, err := metav1.LabelSelectorAsSelector(p.PodSelector)
		return err == nil && sel.Matches(client.labels)
	})
}

func checkMonitoring(t *testing.T, r *rendered, want overlay) {
	if !want.monitoring {
		if len(r.serviceMonitors)+len(r.rules) != 0 {
			t.Error("monitoring objects in an overlay without the Prometheus Operator")
		}
		return
	}
	if len(r.serviceMonitors) != 2 {
		t.Errorf("want ServiceMonitors for control and edges, got %v", sortedKeys(r.serviceMonitors))
	}
	for name, sm := range r.serviceMonitors {
		sel, _ := metav1.LabelSelectorAsSelector(&sm.Spec.Selector)
		var hits int
		for _, svc := range r.services {
			if !sel.Matches(labels.Set(svc.Labels)) {
				continue
			}
			hits++
			for _, ep := range sm.Spec.Endpoints {
				if !slices.ContainsFunc(svc.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == ep.Port }) {
					t.Errorf("ServiceMonitor %s scrapes port %q, which Service %s has not", name, ep.Port, svc.Name)
				}
			}
		}
		if hits != 1 {
			t.Errorf("ServiceMonitor %s selects %d Services, want 1", name, hits)
		}
		// The rules and dashboards select their targets by job.
		for _, svc := range r.services {
			if sel.Matches(labels.Set(svc.Labels)) && (sm.Spec.JobLabel == "" || svc.Labels[sm.Spec.JobLabel] != name) {
				t.Errorf("ServiceMonitor %s would scrape Service %s as job %q, want %q (the rules' job)", name, svc.Name, svc.Labels[sm.Spec.JobLabel], name)
			}
		}
		for _, job := range ruleJobs(t) {
			if _, ok := r.serviceMonitors[job]; !ok {
				t.Errorf("the rules select job %q, which no ServiceMonitor scrapes", job)
			}
		}
	}
	rule, ok := r.rules["relay"]
	if !ok {
		t.Fatal("no PrometheusRule relay")
	}
	if len(rule.Spec.Groups) == 0 {
		t.Error("the PrometheusRule has no rules")
	}
	// The watchdog always fires: an overlay has it only by choice
	// (components/watchdog), once its Alertmanager routes it to a dead
	// man's switch; the user's own Alertmanager would page with it.
	for name := range ruleHolding(r, watchdog) {
		t.Errorf("the PrometheusRule %s holds %s, which always fires: with an Alertmanager that does not route it, its default receiver gets it for ever; "+
			"keep it in components/watchdog, which an overlay adds by choice", name, watchdog)
	}
	checkMonitoringSelection(t, r)
}

// ruleHolding returns the PrometheusRules that hold an alert, and how
// many rules each holds.
func ruleHolding(r *rendered, alert string) map[string]int {
	out := map[string]int{}
	for name, pr := range r.rules {
		var n int
		var holds bool
		for _, g := range pr.Spec.Groups {
			for _, rule := range g.Rules {
				n++
				holds = holds || rule.Alert == alert
			}
		}
		if holds {
			out[name] = n
		}
	}
	return out
}

// TestWatchdogComponent: an overlay that adds components/watchdog gets a
// PrometheusRule that holds the watchdog alone, selected by the same
// label as the other monitoring objects.
func TestWatchdogComponent(t *testing.T) {
	dir := t.TempDir()
	// kustomize takes no absolute paths.
	rel := func(p string) string {
		a, err := filepath.Abs(p)
		if err == nil {
			p, err = filepath.Rel(dir, a)
		}
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	k := fmt.Sprintf("resources:\n  - %s\ncomponents:\n  - %s\n",
		rel("kubernetes/overlays/prod"), rel("kubernetes/components/watchdog"))
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o644); err != nil {
		t.Fatal(err)
	}
	r := render(t, dir)
	if got := ruleHolding(r, watchdog); len(got) != 1 || got["relay-watchdog"] != 1 {
		t.Errorf("PrometheusRules holding %s, with their number of rules: %v; want relay-watchdog with it alone", watchdog, got)
	}
	if _, ok := r.rules["relay"]; !ok {
		t.Error("no PrometheusRule relay beside the watchdog's")
	}
	checkMonitoringSelection(t, r)
}

// monitoringSelection is the label by which a Prometheus of the operator
// selects ServiceMonitors and PrometheusRules in kube-prometheus-stack
// (`release: <Helm release>`), set at the patch point of
// components/monitoring.
const monitoringSelection = "release"

// checkMonitoringSelection: a Prometheus of the operator ignores every
// ServiceMonitor and PrometheusRule its selectors do not match, saying
// nothing. Each of them carries the selection label, with one value, set
// in one place that is marked for the operator to change; nothing else
// carries it.
func checkMonitoringSelection(t *testing.T, r *rendered) {
	values := map[string][]string{}
	for _, o := range r.objects {
		v, ok := o.GetLabels()[monitoringSelection]
		switch o.(type) {
		case *monitoringv1.ServiceMonitor, *monitoringv1.PrometheusRule:
			if !ok || v == "" {
				t.Errorf("%T %s has no label %s: kube-prometheus-stack's Prometheus would not select it", o, o.GetName(), monitoringSelection)
			}
			values[v] = append(values[v], o.GetName())
		default:
			if ok {
				t.Errorf("%T %s has the monitoring selection label %s=%s, meant for ServiceMonitors and PrometheusRules", o, o.GetName(), monitoringSelection, v)
			}
		}
	}
	if len(values) > 1 {
		t.Errorf("the monitoring objects carry different %s labels: %v", monitoringSelection, values)
	}
	for _, component := range []string{"kubernetes/components/monitoring/kustomization.yaml", "kubernetes/components/watchdog/kustomization.yaml"} {
		b, err := os.ReadFile(component)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Contains(b, []byte("# CHANGE-ME")) || !bytes.Contains(b, []byte("path: /metadata/labels/"+monitoringSelection+"\n")) {
			t.Errorf("%s: no patch of the label %s marked CHANGE-ME", component, monitoringSelection)
		}
	}
}

// checkCertificates: the control plane's certificate names every address
// its nodes are dialed at, and it serves and authenticates (client auth:
// a node's certificate authorizes its join).
func checkCertificates(t *testing.T, r *rendered, want overlay) {
	if !want.certManager {
		if len(r.certificates) != 0 {
			t.Error("cert-manager objects in an overlay without cert-manager")
		}
		return
	}
	cert, ok := r.certificates["relay-control"]
	if !ok {
		t.Fatal("no Certificate relay-control")
	}
	for _, s := range r.statefulSets {
		if !slices.ContainsFunc(s.Spec.Template.Spec.Volumes, func(v corev1.Volume) bool {
			return v.Secret != nil && v.Secret.SecretName == cert.Spec.SecretName
		}) {
			t.Errorf("%s does not mount the Secret %s", s.Name, cert.Spec.SecretName)
		}
	}
	if !slices.Contains(cert.Spec.Usages, "server auth") || !slices.Contains(cert.Spec.Usages, "client auth") {
		t.Errorf("usages %v: want server auth and client auth", cert.Spec.Usages)
	}
	if iss, ok := r.issuers[cert.Spec.IssuerRef.Name]; !ok || iss.Spec.CA == nil {
		t.Errorf("issuer %s is not a CA issuer of this overlay", cert.Spec.IssuerRef.Name)
	}
	for _, host := range controlHosts(t, r) {
		if !slices.ContainsFunc(cert.Spec.DNSNames, func(p string) bool { return matchHostname(p, host) }) {
			t.Errorf("the control certificate (%v) does not name %s", cert.Spec.DNSNames, host)
		}
	}
}

// controlHosts lists the host names at which control nodes are dialed,
// with $(POD_NAME) replaced by every pod's name.
func controlHosts(t *testing.T, r *rendered) []string {
	var hosts []string
	add := func(v string, pods []string) {
		for _, a := range strings.Split(v, ",") {
			a = strings.TrimPrefix(a, "https://")
			h := a[:strings.LastIndexByte(a, ':')]
			for _, p := range pods {
				hosts = append(hosts, strings.ReplaceAll(h, "$(POD_NAME)", p))
			}
		}
	}
	for name, s := range r.statefulSets {
		var pods []string
		for i := range int(ptrOr(s.Spec.Replicas, 1)) {
			pods = append(pods, fmt.Sprintf("%s-%d", name, i))
		}
		c := &s.Spec.Template.Spec.Containers[0]
		for _, e := range []string{"RELAY_API_ADVERTISE", "RELAY_RAFT_ADVERTISE", "RELAY_JOIN", "RELAYCTL_SERVER"} {
			if v, ok := env(c, e); ok {
				add(v.Value, pods)
			}
		}
	}
	for _, w := range r.pods() {
		if v, ok := env(&w.spec.Containers[0], "RELAY_CONTROL"); ok {
			add(v.Value, []string{w.name})
		}
	}
	if len(hosts) == 0 {
		t.Fatal("found no control addresses")
	}
	return hosts
}

// matchHostname is crypto/x509's rule: a leading "*." matches exactly one
// label.
func matchHostname(pattern, host string) bool {
	if rest, ok := strings.CutPrefix(pattern, "*."); ok {
		i := strings.IndexByte(host, '.')
		return i > 0 && host[i+1:] == rest
	}
	return pattern == host
}

// ruleJobs returns the job names the alert rules select.
func ruleJobs(t *testing.T) []string {
	files, _ := filepath.Glob("prometheus/*-alerts.yml")
	set := map[string]bool{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range regexp.MustCompile(`job="([a-z-]+)"`).FindAllStringSubmatch(string(b), -1) {
			set[m[1]] = true
		}
	}
	return sortedKeys(set)
}

func sortedKeys[V any](m map[string]V) []string { return slices.Sorted(maps.Keys(m)) }

// The PrometheusRules of components/monitoring and components/watchdog
// are generated from the rule files in deploy/prometheus, so the alerts
// live in one place. RelayWatchdog, which always fires, is in a
// component of its own that an overlay adds by choice: behind the
// Prometheus Operator the Alertmanager is often the user's own, and it
// sends an alert no route takes to its default receiver, a pager more
// often than not.
var generatedRules = []struct {
	file, name string
	// holds reports whether a rule belongs in this PrometheusRule.
	holds func(monitoringv1.Rule) bool
}{
	{"kubernetes/components/monitoring/prometheusrule.yaml", "relay", func(r monitoringv1.Rule) bool { return r.Alert != watchdog }},
	{"kubernetes/components/watchdog/prometheusrule.yaml", "relay-watchdog", func(r monitoringv1.Rule) bool { return r.Alert == watchdog }},
}

func TestPrometheusRuleIsGenerated(t *testing.T) {
	for _, g := range generatedRules {
		want := generatePrometheusRule(t, g.name, g.holds)
		if *update {
			if err := os.WriteFile(g.file, want, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		got, err := os.ReadFile(g.file)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s is stale: regenerate it with `cd deploy && go test -run TestPrometheusRuleIsGenerated -update`", g.file)
		}
	}
}

// generatePrometheusRule makes the PrometheusRule name of the rules of
// deploy/prometheus/*.yml that holds takes, in their groups.
func generatePrometheusRule(t *testing.T, name string, holds func(monitoringv1.Rule) bool) []byte {
	t.Helper()
	files, err := filepath.Glob("prometheus/*.yml")
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(files)
	rule := monitoringv1.PrometheusRule{
		TypeMeta:   metav1.TypeMeta{APIVersion: "monitoring.coreos.com/v1", Kind: "PrometheusRule"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app.kubernetes.io/name": "relay"}},
	}
	var sources []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var rf struct {
			Groups []monitoringv1.RuleGroup `json:"groups"`
		}
		// Only rule files (deploy/prometheus may hold other configuration).
		var probe map[string]any
		if err := yaml.Unmarshal(b, &probe); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if _, ok := probe["groups"]; !ok {
			continue
		}
		if err := yaml.UnmarshalStrict(b, &rf); err != nil {
			t.Fatalf("%s is not a rule file the Prometheus Operator takes: %v", f, err)
		}
		var took bool
		for _, g := range rf.Groups {
			g.Rules = slices.DeleteFunc(g.Rules, func(r monitoringv1.Rule) bool { return !holds(r) })
			if len(g.Rules) > 0 {
				rule.Spec.Groups = append(rule.Spec.Groups, g)
				took = true
			}
		}
		if took {
			sources = append(sources, "deploy/"+f)
		}
	}
	if len(rule.Spec.Groups) == 0 {
		t.Fatalf("no rules for the PrometheusRule %s in deploy/prometheus/*.yml", name)
	}
	out, err := yaml.Marshal(rule)
	if err != nil {
		t.Fatal(err)
	}
	// creationTimestamp: null is what an empty metav1.Time marshals to.
	out = bytes.Replace(out, []byte("  creationTimestamp: null\n"), nil, 1)
	head := "# Generated from " + strings.Join(sources, ", ") + " by deploy/kubernetes_test.go\n" +
		"# (go test -run TestPrometheusRuleIsGenerated -update). Do not edit.\n"
	return append([]byte(head), out...)
}
