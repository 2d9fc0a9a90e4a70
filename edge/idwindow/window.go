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
	seed  maphash.Seed
	key   func(V) string
	slots []slot[V]
	ring  []slot[V] // the items in the order added, next the oldest
	next  int
}

// slot is an item and the hash of its key; the zero V is empty.
type slot[V comparable] struct {
	h uint64
	v V
}

// New returns a window of the last n items (at least 1), keyed by key,
// hashing with seed.
func New[V comparable](seed maphash.Seed, n int, key func(V) string) *Window[V] {
	size := 2
	for size < 2*n {
		size <<= 1
	}
	return &Window[V]{seed: seed, key: key, slots: make([]slot[V], size), ring: make([]slot[V], max(n, 1))}
}

// Get returns the remembered item with key k, or the zero V.
func (w *Window[V]) Get(k string) V {
	var zero V
	h := maphash.String(w.seed, k)
	mask := uint64(len(w.slots) - 1)
	for i := h & mask; ; i = (i + 1) & mask {
		s := &w.slots[i]
		if s.v == zero {
			return zero
		}
		if s.h == h && w.key(s.v) == k {
			return s.v
		}
	}
}

// Add remembers v, forgetting the oldest item beyond the window. A key
// remembered before now finds v. v must not be the zero V, nor equal
// (==) to an item still in the window.
func (w *Window[V]) Add(v V) {
	var zero V
	if old := w.ring[w.next]; old.v != zero {
		w.forget(old)
	}
	k := w.key(v)
	h := maphash.String(w.seed, k)
	w.ring[w.next] = slot[V]{h: h, v: v}
	w.next = (w.next + 1) % len(w.ring)
	mask := uint64(len(w.slots) - 1)
	for i := h & mask; ; i = (i + 1) & mask {
		s := &w.slots[i]
		if s.v == zero || (s.h == h && w.key(s.v) == k) {
			*s = slot[V]{h: h, v: v}
			return
		}
	}
}

// Len is how many keys the window finds (an item whose key a later one
// took is not counted).
func (w *Window[V]) Len() int {
	var zero V
	n := 0
	for _, s := range w.slots {
		if s.v != zero {
			n++
		}
	}
	return n
}

// forget removes e's item from the table, unless a newer item with its
// key took its slot.
func (w *Window[V]) forget(e slot[V]) {
	var zero V
	mask := uint64(len(w.slots) - 1)
	i := e.h & mask
	for ; w.slots[i].v != e.v; i = (i + 1) & mask {
		if w.slots[i].v == zero {
			return
		}
	}
	// Backward shift: move later entries of the probe run into the hole
	// where their own probe sequence passes it.
	for {
		w.slots[i] = slot[V]{}
		j := i
		for {
			j = (j + 1) & mask
			if w.slots[j].v == zero {
				return
			}
			home := w.slots[j].h & mask
			// j's entry may move to i unless its home lies cyclically
			// in (i, j].
			if (i < j && (home <= i || home > j)) || (i > j && home <= i && home > j) {
				break
			}
		}
		w.slots[i] = w.slots[j]
		i = j
	}
}
