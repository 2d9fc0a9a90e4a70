package fsm

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"

	"google.golang.org/protobuf/proto"

	statev1 "github.com/edge-relay/relay/proto/state/v1"
	"github.com/edge-relay/relay/storage/state"
)

// Reads go straight to the store and see the latest applied state of this
// replica. Whether that is linearizable is the caller's business
// (control/raftnode waits for a read index first).

func getRecord(r state.Reader, key []byte, m proto.Message, what string) error {
	v, err := r.Get(key)
	if errors.Is(err, state.ErrNotFound) {
		return fmt.Errorf("%s: %w", what, ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("read %s: %w", what, err)
	}
	if err := proto.Unmarshal(v, m); err != nil {
		return fmt.Errorf("decode %s: %w", what, err)
	}
	return nil
}

// GetUser returns the user with the given id, or ErrNotFound.
func (f *FSM) GetUser(id string) (*statev1.User, error) {
	var u statev1.User
	if err := getRecord(f.store, userKey(id), &u, fmt.Sprintf("user %q", id)); err != nil {
		return nil, err
	}
	return &u, nil
}

// GetUserByLogin returns the user with the given login, or ErrNotFound.
func (f *FSM) GetUserByLogin(login string) (*statev1.User, error) {
	id, err := f.store.Get(loginKey(login))
	if errors.Is(err, state.ErrNotFound) {
		return nil, fmt.Errorf("login %q: %w", login, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("read login %q: %w", login, err)
	}
	return f.GetUser(string(id))
}

// ListUsers returns up to limit users with ids greater than after, in id
// order, and whether more follow.
func (f *FSM) ListUsers(after string, limit int) ([]*statev1.User, bool, error) {
	start := userKey(after)
	if after != "" {
		start = append(start, 0)
	}
	var out []*statev1.User
	more := false
	err := f.store.Iterate(start, prefixEnd(prefixUser), func(_, v []byte) (bool, error) {
		if len(out) == limit {
			more = true
			return false, nil
		}
		var u statev1.User
		if err := proto.Unmarshal(v, &u); err != nil {
			return false, fmt.Errorf("decode user: %w", err)
		}
		out = append(out, &u)
		return true, nil
	})
	return out, more, err
}

// GetDevice returns a device of userID. A device of another user answers
// ErrNotFound exactly like a missing one.
func (f *FSM) GetDevice(userID, deviceID string) (*statev1.Device, error) {
	var d statev1.Device
	if err := getRecord(f.store, deviceKey(userID, deviceID), &d, fmt.Sprintf("device %q", deviceID)); err != nil {
		return nil, err
	}
	return &d, nil
}

// ListDevices returns the devices of a user in id order.
func (f *FSM) ListDevices(userID string) ([]*statev1.Device, error) {
	p := userDevicesPrefix(userID)
	var out []*statev1.Device
	err := f.store.Iterate(p, prefixEnd(p), func(_, v []byte) (bool, error) {
		var d statev1.Device
		if err := proto.Unmarshal(v, &d); err != nil {
			return false, fmt.Errorf("decode device: %w", err)
		}
		out = append(out, &d)
		return true, nil
	})
	return out, err
}

// Nodes returns the recorded control nodes in id order.
func (f *FSM) Nodes() ([]*statev1.Node, error) {
	var out []*statev1.Node
	err := f.store.Iterate(prefixNode, prefixEnd(prefixNode), func(_, v []byte) (bool, error) {
		var n statev1.Node
		if err := proto.Unmarshal(v, &n); err != nil {
			return false, fmt.Errorf("decode node: %w", err)
		}
		out = append(out, &n)
		return true, nil
	})
	return out, err
}

// GetNode returns one control node's record, or ErrNotFound.
func (f *FSM) GetNode(id string) (*statev1.Node, error) {
	var n statev1.Node
	if err := getRecord(f.store, nodeKey(id), &n, fmt.Sprintf("node %q", id)); err != nil {
		return nil, err
	}
	return &n, nil
}

// Horizon returns the oldest revision the change feed can still answer
// from: changes after revision Horizon()-1 are all kept.
func (f *FSM) Horizon() (uint64, error) {
	v, err := f.store.Get(keyHorizon)
	if errors.Is(err, state.ErrNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("read horizon: %w", err)
	}
	return binary.BigEndian.Uint64(v), nil
}

// Changes returns up to limit changes with revisions greater than after,
// in order, read from one consistent view. It returns ErrCompacted when
// changes after `after` were already pruned; the caller must resync from
// a full copy of the state.
//
// One revision may hold several changes (deleting a user emits one per
// device, then the user's), so a full page may end inside a revision:
// continue with ChangesFrom at the position after the last change
// returned, never with Changes(lastRevision), which would skip the rest
// of that revision.
func (f *FSM) Changes(after uint64, limit int) ([]*statev1.Change, error) {
	return f.ChangesFrom(ChangePos{Revision: after + 1}, limit)
}

// ChangePos is a position in the change feed: the change with this
// revision and sequence number within it, or the first one after it.
type ChangePos struct {
	Revision uint64
	Seq      uint32
}

// After returns the position just past change c.
func After(c *statev1.Change) ChangePos {
	return ChangePos{Revision: c.GetRevision(), Seq: c.GetSeq() + 1}
}

// ChangesFrom returns up to limit changes at or after pos, in order, read
// from one consistent view. It returns ErrCompacted when changes at pos
// were already pruned. When it returns fewer than limit changes, the last
// one's revision is complete: a revision's changes are written in one
// atomic batch, so the view holds all of them or none.
func (f *FSM) ChangesFrom(pos ChangePos, limit int) ([]*statev1.Change, error) {
	snap := f.store.Snapshot()
	defer snap.Close()
	var horizon uint64
	if v, err := snap.Get(keyHorizon); err == nil {
		horizon = binary.BigEndian.Uint64(v)
	} else if !errors.Is(err, state.ErrNotFound) {
		return nil, fmt.Errorf("read horizon: %w", err)
	}
	if pos.Revision < horizon {
		return nil, fmt.Errorf("changes from revision %d (horizon %d): %w", pos.Revision, horizon, ErrCompacted)
	}
	var out []*statev1.Change
	err := snap.Iterate(changeKey(pos.Revision, pos.Seq), prefixEnd(prefixChange), func(_, v []byte) (bool, error) {
		if len(out) == limit {
			return false, nil
		}
		var c statev1.Change
		if err := proto.Unmarshal(v, &c); err != nil {
			return false, fmt.Errorf("decode change: %w", err)
		}
		out = append(out, &c)
		return true, nil
	})
	return out, err
}

// Digest returns a SHA-256 over the whole replicated state except the
// applied index: two replicas that applied the same commands have the
// same digest. Tests and `relayctl cluster status` use it to compare.
func (f *FSM) Digest() ([32]byte, error) {
	snap := f.store.Snapshot()
	defer snap.Close()
	h := sha256.New()
	var lb [binary.MaxVarintLen64]byte
	err := snap.Iterate(nil, nil, func(k, v []byte) (bool, error) {
		if string(k) == string(keyApplied) {
			return true, nil
		}
		for _, p := range [][]byte{k, v} {
			h.Write(lb[:binary.PutUvarint(lb[:], uint64(len(p)))])
			h.Write(p)
		}
		return true, nil
	})
	var sum [32]byte
	if err != nil {
		return sum, fmt.Errorf("digest: %w", err)
	}
	copy(sum[:], h.Sum(nil))
	return sum, nil
}

// GetRefreshToken returns a refresh token by id, or ErrNotFound.
func (f *FSM) GetRefreshToken(id string) (*statev1.RefreshToken, error) {
	var t statev1.RefreshToken
	if err := getRecord(f.store, tokenKey(id), &t, "refresh token"); err != nil {
		return nil, err
	}
	return &t, nil
}

// GetTokenFamily returns a refresh-token family by id, or ErrNotFound.
func (f *FSM) GetTokenFamily(id string) (*statev1.TokenFamily, error) {
	var t statev1.TokenFamily
	if err := getRecord(f.store, familyKey(id), &t, "token family"); err != nil {
		return nil, err
	}
	return &t, nil
}

// SigningKeys returns every signing key still valid for verification, in
// id order, and the id of the current one ("" when none was created yet).
func (f *FSM) SigningKeys() ([]*statev1.SigningKey, string, error) {
	snap := f.store.Snapshot()
	defer snap.Close()
	var cur string
	if v, err := snap.Get(keyCurrentSigning); err == nil {
		cur = string(v)
	} else if !errors.Is(err, state.ErrNotFound) {
		return nil, "", fmt.Errorf("read current signing key: %w", err)
	}
	var out []*statev1.SigningKey
	err := snap.Iterate(prefixSigningKey, prefixEnd(prefixSigningKey), func(_, v []byte) (bool, error) {
		var k statev1.SigningKey
		if err := proto.Unmarshal(v, &k); err != nil {
			return false, fmt.Errorf("decode signing key: %w", err)
		}
		out = append(out, &k)
		return true, nil
	})
	return out, cur, err
}

// SessionKeyRing returns the session-key ring.
func (f *FSM) SessionKeyRing() (*statev1.SessionKeyRing, error) {
	snap := f.store.Snapshot()
	defer snap.Close()
	ring, err := sessionRing(snap)
	if err != nil {
		return nil, fmt.Errorf("read session key ring: %w", err)
	}
	return ring, nil
}

// Edges returns the registered edges in id order.
func (f *FSM) Edges() ([]*statev1.Edge, error) {
	var out []*statev1.Edge
	err := f.store.Iterate(prefixEdge, prefixEnd(prefixEdge), func(_, v []byte) (bool, error) {
		var e statev1.Edge
		if err := proto.Unmarshal(v, &e); err != nil {
			return false, fmt.Errorf("decode edge: %w", err)
		}
		out = append(out, &e)
		return true, nil
	})
	return out, err
}

// DeviceOwner returns the id of the user that owns a device, or
// ErrNotFound.
func (f *FSM) DeviceOwner(deviceID string) (string, error) {
	return deviceOwner(f.store, deviceID)
}

func deviceOwner(r state.Reader, deviceID string) (string, error) {
	v, err := r.Get(deviceOwnerKey(deviceID))
	if errors.Is(err, state.ErrNotFound) || (err == nil && len(v) == 0) {
		// Empty: the id of a deleted device, whose mailbox is still
		// being emptied.
		return "", fmt.Errorf("device %q: %w", deviceID, ErrNotFound)
	}
	if err != nil {
		return "", fmt.Errorf("read device owner: %w", err)
	}
	return string(v), nil
}

// Initialized reports whether InitCluster has applied.
func (f *FSM) Initialized() (bool, error) { return hasKey(f.store, keyInitialized, "initialized flag") }

// hasKey reports whether r holds key (a flag named what).
func hasKey(r state.Reader, key []byte, what string) (bool, error) {
	_, err := r.Get(key)
	if errors.Is(err, state.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read %s: %w", what, err)
	}
	return true, nil
}

// UserTokenCount returns how many refresh tokens a user has.
func (f *FSM) UserTokenCount(userID string) (int, error) {
	p := userTokensPrefix(userID)
	n := 0
	err := f.store.Iterate(p, prefixEnd(p), func(_, _ []byte) (bool, error) {
		n++
		return true, nil
	})
	return n, err
}
