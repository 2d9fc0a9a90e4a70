package fsm

import (
	"fmt"
	"slices"

	"google.golang.org/protobuf/proto"

	statev1 "github.com/edge-relay/relay/proto/state/v1"
	"github.com/edge-relay/relay/storage/state"
)

// keyGatedApply is present once EnableGatedApply applied (m:gated).
var keyGatedApply = []byte("m:gated")

// gates is what apply knows about the features the node records list:
// read through the batch (so the records written by the batch's earlier
// entries count) the first time a command needs it, and again after an
// entry changed a record or the switch. The FSM keeps it from one batch
// to the next while no record changed (FSM.gateCache).
type gates struct {
	valid   bool
	on      bool     // EnableGatedApply applied
	shut    []string // features gated at apply that some record lacks
	touched bool     // the batch changed a record or the switch (FSM.MembersVersion)
}

// invalidate makes the next command read the records again.
func (g *gates) invalidate() { g.valid, g.touched = false, true }

// load reads the switch and the records through b.
func (g *gates) load(b *state.Batch) error {
	// A new slice: the FSM's cache may still hold the old one.
	g.valid, g.shut = true, nil
	on, err := hasKey(b, keyGatedApply, "gated apply switch")
	if g.on = on; err != nil || !on {
		return err
	}
	recs, common, err := commonFeatures(b)
	if err != nil {
		return err
	}
	for _, f := range FeaturesGatedAtApply() {
		if recs == 0 || !slices.Contains(common, f) {
			g.shut = append(g.shut, f)
		}
	}
	return nil
}

// ensure loads the gates unless they are valid.
func (g *gates) ensure(b *state.Batch) error {
	if g.valid {
		return nil
	}
	return g.load(b)
}

// commonFeatures returns how many node records r holds and the features
// every one of them lists.
func commonFeatures(r state.Reader) (records int, common []string, err error) {
	err = r.Iterate(prefixNode, prefixEnd(prefixNode), func(_, v []byte) (bool, error) {
		var n statev1.Node
		if err := proto.Unmarshal(v, &n); err != nil {
			return false, fmt.Errorf("decode node: %w", err)
		}
		if records == 0 {
			common = slices.Clone(n.GetFeatures())
		} else {
			common = slices.DeleteFunc(common, func(f string) bool { return !slices.Contains(n.GetFeatures(), f) })
		}
		records++
		return true, nil
	})
	return records, common, err
}

// ignoreShut clears from cmd the fields of the features gated shut
// (ignoreFeature) and returns those it carried, sorted.
func (g *gates) ignoreShut(b *state.Batch, cmd *statev1.Command) ([]string, error) {
	if err := g.ensure(b); err != nil {
		return nil, err
	}
	if !g.on {
		return nil, nil
	}
	var ignored []string
	for _, f := range g.shut {
		if ignoreFeature(f, cmd) {
			ignored = append(ignored, f)
		}
	}
	return ignored, nil
}

// gatedApplyOn reports whether gated apply is on at this entry.
func (t *txn) gatedApplyOn() (bool, error) {
	err := t.gates.ensure(t.b)
	return t.gates.on, err
}

// featureOpen reports whether a feature gated at apply is in use at this
// entry: gated apply is on and every node record lists it. What apply
// does by itself for such a feature (upkeep in pruning, in a deletion)
// waits for it as the commands' fields do, so that a replica of a release
// without the feature, which does none of it, holds the same state.
func (t *txn) featureOpen(feature string) (bool, error) {
	if err := t.gates.ensure(t.b); err != nil {
		return false, err
	}
	return t.gates.on && !slices.Contains(t.gates.shut, feature), nil
}

// enableGatedApply applies EnableGatedApply.
func (t *txn) enableGatedApply() (*statev1.Result, error) {
	if on, err := t.gatedApplyOn(); err != nil || on {
		return &statev1.Result{}, err
	}
	recs, common, err := commonFeatures(t.b)
	if err != nil {
		return nil, err
	}
	if recs == 0 || !slices.Contains(common, FeatureGatedApply) {
		return nil, precondition("gated apply needs every node record to list the feature %q", FeatureGatedApply)
	}
	if err := t.b.Set(keyGatedApply, nil); err != nil {
		return nil, err
	}
	t.gates.invalidate()
	return &statev1.Result{}, nil
}

// GatedApply reports whether gated apply is on (EnableGatedApply).
func (f *FSM) GatedApply() (bool, error) { return hasKey(f.store, keyGatedApply, "gated apply switch") }
