package fsm

import (
	"fmt"

	"google.golang.org/protobuf/proto"

	statev1 "github.com/edge-relay/relay/proto/state/v1"
	"github.com/edge-relay/relay/storage/state"
)

// View is a consistent, read-only copy-on-write view of the whole state
// at one applied index, for readers that need several records to agree
// (a watch resync, a backup). Close it when done.
type View struct {
	snap    *state.Snapshot
	applied uint64
}

// View opens a view of the state as it is now.
func (f *FSM) View() (*View, error) {
	snap := f.store.Snapshot()
	idx, _, err := ReadApplied(snap)
	if err != nil {
		_ = snap.Close()
		return nil, err
	}
	return &View{snap: snap, applied: idx}, nil
}

// Close releases the view.
func (v *View) Close() error { return v.snap.Close() }

// AppliedIndex is the revision the view reflects.
func (v *View) AppliedIndex() uint64 { return v.applied }

func eachRecord[T any, P interface {
	*T
	proto.Message
}](r state.Reader, prefix []byte, fn func(P) error) error {
	return r.Iterate(prefix, prefixEnd(prefix), func(_, val []byte) (bool, error) {
		m := P(new(T))
		if err := proto.Unmarshal(val, m); err != nil {
			return false, fmt.Errorf("decode %T: %w", m, err)
		}
		return true, fn(m)
	})
}

// EachUser calls fn for every user in id order.
func (v *View) EachUser(fn func(*statev1.User) error) error {
	return eachRecord[statev1.User](v.snap, prefixUser, fn)
}

// EachDevice calls fn for every device, ordered by user then device id.
func (v *View) EachDevice(fn func(*statev1.Device) error) error {
	return eachRecord[statev1.Device](v.snap, prefixDevice, fn)
}

// EachEdge calls fn for every registered edge in id order.
func (v *View) EachEdge(fn func(*statev1.Edge) error) error {
	return eachRecord[statev1.Edge](v.snap, prefixEdge, fn)
}

// SessionKeyRing returns the ring as of the view.
func (v *View) SessionKeyRing() (*statev1.SessionKeyRing, error) {
	return sessionRing(v.snap)
}
