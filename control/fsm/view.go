package fsm

import (
	"errors"
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

// eachRecord decodes the view's records under prefix for fn, which may
// wait (a watch's full copy sends each to a stream): the view scans with
// no iterator open while fn runs (state.Snapshot.Scan).
func eachRecord[T any, P interface {
	*T
	proto.Message
}](snap *state.Snapshot, prefix []byte, fn func(P) error) error {
	return snap.Scan(prefix, prefixEnd(prefix), func(_, val []byte) (bool, error) {
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

// History is the id of the state's history (see ReadHistory).
func (v *View) History() (string, error) { return ReadHistory(v.snap) }

// SessionKeyRing returns the ring as of the view.
func (v *View) SessionKeyRing() (*statev1.SessionKeyRing, error) {
	return sessionRing(v.snap)
}

// EachStoredMailbox calls fn, in device id order, for every mailbox that
// holds entries now, with the id of the user owning its device. Mailboxes
// whose entries were all acked or expired are left out: their counters
// stay (so seqs are never reused), but there is nothing to fetch.
func (v *View) EachStoredMailbox(fn func(userID string, mb *statev1.Mailbox) error) error {
	return eachRecord[statev1.Mailbox](v.snap, prefixMailbox, func(mb *statev1.Mailbox) error {
		if mb.GetCount() == 0 {
			return nil
		}
		if p, err := purging(v.snap, mb.GetDeviceId()); err != nil || p {
			return err // a revoked or deleted device's, being emptied
		}
		owner, err := deviceOwner(v.snap, mb.GetDeviceId())
		if errors.Is(err, ErrNotFound) {
			// Not expected: a device's owner record goes with the last of
			// its mailbox, whose purge record is checked above (removeDevice),
			// entries are stored only for existing devices, and this is
			// one view of one applied index. Should a stray record exist
			// anyway, it has no device to announce it to; failing here
			// would instead stop every full copy, and so every edge that
			// needs one.
			return nil
		}
		if err != nil {
			return fmt.Errorf("owner of the mailbox of %q: %w", mb.GetDeviceId(), err)
		}
		return fn(owner, mb)
	})
}
