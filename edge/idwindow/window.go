// Package idwindow remembers the last N items seen, found by a string
// key: the duplicate window of a sender's event ids, kept by the edge for
// every session (whose items are the events in flight) and by the Go
// client for every sender it hears from.
//
// It replaces a map plus a ring of keys: a lookup for every event and a
// forget of the oldest one meant hashing strings and reading a forgotten
// key from memory long gone cold. Here the ring keeps each item's 64-bit
// hash, so forgetting touches only the table, and a lookup reads a key
// only when the hashes match. The table is open addressing with linear
// probing, at most half full (its size is the next power of two at least
// twice the window), with backward-shift deletion, so no tombstones
// build up.
package idwindow

import "hash/maphash"

// Window remembers the last n items added. The zero V is no item and
// cannot be added; items are told apart with ==. Not safe for concurrent
// use.
type Window[V comparable] struct {
	seed maphash.Seed
	key  func(V) string
	// slots is the table: 0 is empty, else the upper 32 bits of an item's
	// hash (which also choose its home slot) over its ring index plus one.
	// Eight bytes a slot, so a sender's window costs the cache half what
	// a slot holding the item would, and a probe reads the ring only when
	// 32 bits of the hash match.
	slots []uint64
	ring  []entry[V] // the items in the order added, next the oldest once full
	next  int
	n     int // the window: the most items the ring grows to
}

// entry is an item and the hash of its key; the zero V is empty.
type entry[V comparable] struct {
	h uint64
	v V
}

// startItems is how many items a new window has room for: it grows,
// doubling, to its full size as items come, so a sender heard from a few
// times costs about a kilobyte, not the whole window's 32 bytes an item.
const startItems = 16

// New returns a window of the last n items (at least 1, at most 1<<30),
// keyed by key, hashing with seed.
func New[V comparable](seed maphash.Seed, n int, key func(V) string) *Window[V] {
	n = min(max(n, 1), 1<<30) // ring indexes fit 32 bits
	first := min(n, startItems)
	return &Window[V]{seed: seed, key: key, n: n, slots: make([]uint64, tableSize(first)), ring: make([]entry[V], first)}
}

// tableSize is the table's size for n items: a power of two, at most half
// full.
func tableSize(n int) int {
	size := 2
	for size < 2*n {
		size <<= 1
	}
	return size
}

// tag is the part of a hash a slot keeps.
func tag(h uint64) uint64 { return h >> 32 }

// Get returns the remembered item with key k, or the zero V.
func (w *Window[V]) Get(k string) V {
	h := maphash.String(w.seed, k)
	t, mask := tag(h), uint64(len(w.slots)-1)
	for i := t & mask; ; i = (i + 1) & mask {
		s := w.slots[i]
		if s == 0 {
			var zero V
			return zero
		}
		if s>>32 == t {
			if e := &w.ring[s&0xffffffff-1]; e.h == h && w.key(e.v) == k {
				return e.v
			}
		}
	}
}

// Add remembers v, forgetting the oldest item beyond the window. A key
// remembered before now finds v. v must not be the zero V.
func (w *Window[V]) Add(v V) {
	var zero V
	at := w.next
	if at == len(w.ring) {
		// Still growing (a full ring wraps before this): room for twice
		// as many, and a table for them.
		w.ring = append(w.ring, make([]entry[V], min(2*len(w.ring), w.n)-len(w.ring))...)
		w.grow(tableSize(len(w.ring)))
	}
	if w.ring[at].v != zero {
		w.forget(at)
	}
	k := w.key(v)
	h := maphash.String(w.seed, k)
	w.ring[at] = entry[V]{h: h, v: v}
	if w.next = at + 1; w.next == w.n {
		w.next = 0
	}
	t, mask := tag(h), uint64(len(w.slots)-1)
	mine := t<<32 | uint64(at+1)
	for i := t & mask; ; i = (i + 1) & mask {
		s := w.slots[i]
		if s == 0 {
			w.slots[i] = mine
			return
		}
		if s>>32 == t {
			if e := &w.ring[s&0xffffffff-1]; e.h == h && w.key(e.v) == k {
				w.slots[i] = mine // the older item's entry leaves the ring unfound
				return
			}
		}
	}
}

// Len is how many keys the window finds (an item whose key a later one
// took is not counted).
func (w *Window[V]) Len() int {
	n := 0
	for _, s := range w.slots {
		if s != 0 {
			n++
		}
	}
	return n
}

// grow moves the table to one of size slots (when larger).
func (w *Window[V]) grow(size int) {
	if size <= len(w.slots) {
		return
	}
	slots := make([]uint64, size)
	mask := uint64(size - 1)
	for _, s := range w.slots {
		if s == 0 {
			continue
		}
		i := (s >> 32) & mask
		for slots[i] != 0 {
			i = (i + 1) & mask
		}
		slots[i] = s
	}
	w.slots = slots
}

// forget removes the ring entry at from the table, unless a newer item
// with its key took its slot.
func (w *Window[V]) forget(at int) {
	mask := uint64(len(w.slots) - 1)
	i := tag(w.ring[at].h) & mask
	for ; w.slots[i]&0xffffffff != uint64(at+1); i = (i + 1) & mask {
		if w.slots[i] == 0 {
			return
		}
	}
	// Backward shift: move later slots of the probe run into the hole
	// where their own probe sequence passes it.
	for {
		w.slots[i] = 0
		j := i
		for {
			j = (j + 1) & mask
			if w.slots[j] == 0 {
				return
			}
			home := (w.slots[j] >> 32) & mask
			// j's slot may move to i unless its home lies cyclically
			// in (i, j].
			if (i < j && (home <= i || home > j)) || (i > j && home <= i && home > j) {
				break
			}
		}
		w.slots[i] = w.slots[j]
		i = j
	}
}
