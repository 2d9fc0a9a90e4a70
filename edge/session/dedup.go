package session

import "hash/maphash"

// dedupTable remembers a session's last durable events by id, to tell a
// resent event from a new one. It replaces a map[string]*inflight plus a
// ring: the edge looks an id up for every durable event and forgets the
// oldest one, and with a map both meant hashing strings and reading the
// forgotten event's id from memory long gone cold. Here the ring keeps
// each entry's hash, so forgetting touches only the table, and a lookup
// compares ids only when their 64-bit hashes match.
//
// The table is open addressing with linear probing, at most half full
// (its size is the next power of two at least twice the window), with
// backward-shift deletion, so no tombstones build up.
type dedupTable struct {
	seed  maphash.Seed
	slots []dedupSlot
	ring  []dedupSlot // the remembered events in arrival order, next the oldest
	next  int
}

// dedupSlot is an event and the hash of its id; f == nil is empty.
type dedupSlot struct {
	h uint64
	f *inflight
}

func newDedupTable(seed maphash.Seed, window int) *dedupTable {
	n := 2
	for n < 2*window {
		n <<= 1
	}
	return &dedupTable{seed: seed, slots: make([]dedupSlot, n), ring: make([]dedupSlot, max(window, 1))}
}

// get returns the remembered event with this id, or nil.
func (t *dedupTable) get(id string) *inflight {
	h := maphash.String(t.seed, id)
	mask := uint64(len(t.slots) - 1)
	for i := h & mask; ; i = (i + 1) & mask {
		s := &t.slots[i]
		if s.f == nil {
			return nil
		}
		if s.h == h && s.f.eventID == id {
			return s.f
		}
	}
}

// remember records f, forgetting the oldest event beyond the window. An
// id seen before (a refused event sent again) now means f.
func (t *dedupTable) remember(f *inflight) {
	if old := t.ring[t.next]; old.f != nil {
		t.forget(old)
	}
	h := maphash.String(t.seed, f.eventID)
	t.ring[t.next] = dedupSlot{h: h, f: f}
	t.next = (t.next + 1) % len(t.ring)
	mask := uint64(len(t.slots) - 1)
	for i := h & mask; ; i = (i + 1) & mask {
		s := &t.slots[i]
		if s.f == nil || (s.h == h && s.f.eventID == f.eventID) {
			*s = dedupSlot{h: h, f: f}
			return
		}
	}
}

// forget removes e's event from the table, unless a newer event with its
// id took its slot.
func (t *dedupTable) forget(e dedupSlot) {
	mask := uint64(len(t.slots) - 1)
	i := e.h & mask
	for ; t.slots[i].f != e.f; i = (i + 1) & mask {
		if t.slots[i].f == nil {
			return
		}
	}
	// Backward shift: move later entries of the probe run into the hole
	// where their own probe sequence passes it.
	for {
		t.slots[i] = dedupSlot{}
		j := i
		for {
			j = (j + 1) & mask
			if t.slots[j].f == nil {
				return
			}
			home := t.slots[j].h & mask
			// j's entry may move to i unless its home lies cyclically
			// in (i, j].
			if (i < j && (home <= i || home > j)) || (i > j && home <= i && home > j) {
				break
			}
		}
		t.slots[i] = t.slots[j]
		i = j
	}
}
