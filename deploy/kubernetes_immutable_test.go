package deploy

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

// Kubernetes refuses an update of a StatefulSet's spec that changes
// anything but the fields below ("updates to statefulset spec for fields
// other than ... are forbidden"), and of a Deployment's or DaemonSet's
// selector ("field is immutable"). A manifest that changes one of the
// others cannot be applied to an install of an earlier release:
// `kubectl apply -k` fails for the whole object, and none of its other
// changes (an image, a setting, a resource request) arrive.
var mutableStatefulSetFields = []string{
	"replicas", "ordinals", "template", "updateStrategy", "revisionHistoryLimit",
	"persistentVolumeClaimRetentionPolicy", "minReadySeconds",
}

// TestImmutableFields holds the fields of every overlay's workloads that
// Kubernetes does not let an update change to
// kubernetes/testdata/immutable-<overlay>.json, what the installs made
// so far were created with.
func TestImmutableFields(t *testing.T) {
	for name := range overlays {
		t.Run(name, func(t *testing.T) {
			got := immutableFields(t, render(t, filepath.Join("kubernetes", "overlays", name)))
			golden := filepath.Join("kubernetes", "testdata", "immutable-"+name+".json")
			if *update {
				b, err := json.MarshalIndent(got, "", "  ")
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(golden, append(b, '\n'), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			b, err := os.ReadFile(golden)
			if err != nil {
				t.Fatal(err)
			}
			var want map[string]any
			if err := json.Unmarshal(b, &want); err != nil {
				t.Fatalf("%s: %v", golden, err)
			}
			objs := map[string]bool{}
			for k := range got {
				objs[k] = true
			}
			for k := range want {
				objs[k] = true
			}
			for _, obj := range sortedKeys(objs) {
				g, w := indentJSON(t, got[obj]), indentJSON(t, want[obj])
				if !bytes.Equal(g, w) {
					t.Errorf("%s: %s: its immutable fields differ from %s. These cannot change on a live StatefulSet "+
						"(volumeClaimTemplates, selector, serviceName, podManagementPolicy: its whole spec but %v) "+
						"or Deployment or DaemonSet (selector): `kubectl apply -k` fails for it on every existing install, "+
						"and none of its other changes arrive. If the change is meant, write the upgrade step in "+
						"docs/operations.md, \"Upgrades\" (for instance: `kubectl delete statefulset NAME --cascade=orphan`, "+
						"then apply; claims grown by hand with `kubectl patch pvc`), then update the golden: "+
						"cd deploy && go test -run TestImmutableFields -update\nrendered now:\n%s\nin %s:\n%s",
						name, obj, golden, mutableStatefulSetFields, g, golden, w)
				}
			}
		})
	}
}

// immutableFields maps "Kind/name" to the fields of that object that an
// update may not change, as JSON values.
func immutableFields(t *testing.T, r *rendered) map[string]any {
	t.Helper()
	out := map[string]any{}
	for name, s := range r.statefulSets {
		spec := jsonValue(t, s.Spec).(map[string]any)
		for _, f := range mutableStatefulSetFields {
			delete(spec, f)
		}
		out["StatefulSet/"+name] = spec
	}
	for name, d := range r.deployments {
		out["Deployment/"+name] = map[string]any{"selector": jsonValue(t, d.Spec.Selector)}
	}
	for name, d := range r.daemonSets {
		out["DaemonSet/"+name] = map[string]any{"selector": jsonValue(t, d.Spec.Selector)}
	}
	if len(r.statefulSets) == 0 {
		t.Fatal("no StatefulSets rendered")
	}
	return out
}

// jsonValue is v as encoding/json reads it back, without the empty
// values the API types write (creationTimestamp: null, status: {}).
func jsonValue(t *testing.T, v any) any {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var out any
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	return pruneEmpty(out)
}

func pruneEmpty(v any) any {
	switch v := v.(type) {
	case map[string]any:
		for k, e := range v {
			if e = pruneEmpty(e); e == nil {
				delete(v, k)
			} else {
				v[k] = e
			}
		}
		if len(v) == 0 {
			return nil
		}
	case []any:
		for i, e := range v {
			v[i] = pruneEmpty(e)
		}
	}
	return v
}

func indentJSON(t *testing.T, v any) []byte {
	t.Helper()
	if v == nil {
		return []byte("(none)")
	}
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	return b
}
