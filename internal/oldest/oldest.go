// Package oldest keeps a bounded list of entries, oldest first, and says
// which one to drop when a new one comes over the bound: the oldest of
// all, or, when the new entry's key already holds its share, the oldest
// of that key's. Listeners use it to bound the connections that have not
// yet proven themselves (a Raft hello, an HTTPS request or WebSocket
// handshake): closing the oldest rather than refusing the newest means a
// flood of silent connections cannot keep out a real peer, whose
// handshake takes a round trip or two, and the share keeps one source
// from pushing out everyone else's.
//
// An entry may be promoted (Promote): promoted entries go only once no
// entry that was not is left to take (of all, or of the key). A listener
// promotes a connection once a request's headers were read on it, past
// its TLS handshake, so a flood of connections that stay silent or stall
// before a request cannot push out a real client, however fast it comes.
package oldest

import (
	"container/list"
	"sync"
)

// List is a bounded list of entries of type T under keys of type K (a
// source address, an account), safe for concurrent use.
type List[K comparable, T any] struct {
	mu     sync.Mutex // guards the fields below
	limit  int
	perKey int // 0: no share per key
	// all holds the entries by tier (0: not promoted, evicted first),
	// each oldest first; byKey the same for each key's entries.
	all   [2]list.List
	byKey map[K]*tiers
}

type tiers struct {
	l [2]list.List
	n int
}

// Entry is a value on a List, until it is removed or evicted.
type Entry[K comparable, T any] struct {
	Value T
	key   K
	tier  int
	// elem and keyElem place the entry on its list's lists; nil once it
	// is off them. Guarded by the list's mu.
	elem, keyElem *list.Element
}

// New returns a list of at most limit entries, and at most perKey of one
// key (0: no share per key).
func New[K comparable, T any](limit, perKey int) *List[K, T] {
	return &List[K, T]{limit: limit, perKey: perKey, byKey: map[K]*tiers{}}
}

// SetLimit changes the bound; entries already over it go as new ones
// come.
func (l *List[K, T]) SetLimit(limit int) {
	l.mu.Lock()
	l.limit = limit
	l.mu.Unlock()
}

// Add puts v at the end of the list, under key, and returns its entry.
// When key already holds its share, the oldest of key's entries is taken
// off the list; else, at the bound, the oldest of all (either time, one
// not promoted if there is one). The one taken off (nil if none) is
// returned for its owner to drop.
func (l *List[K, T]) Add(v T, key K) (e, evicted *Entry[K, T]) {
	e = &Entry[K, T]{Value: v, key: key}
	l.mu.Lock()
	defer l.mu.Unlock()
	kt := l.byKey[key]
	switch {
	case l.perKey > 0 && kt != nil && kt.n >= l.perKey:
		evicted = front[K, T](&kt.l)
	case l.lenLocked() >= l.limit && l.lenLocked() > 0:
		evicted = front[K, T](&l.all)
	}
	if evicted != nil {
		l.removeLocked(evicted)
	}
	l.pushLocked(e)
	return e, evicted
}

// front is the oldest entry of the first tier that has one.
func front[K comparable, T any](ts *[2]list.List) *Entry[K, T] {
	for i := range ts {
		if f := ts[i].Front(); f != nil {
			return f.Value.(*Entry[K, T])
		}
	}
	return nil
}

// Promote moves e, if it is still on the list and was not promoted, to
// the end of the promoted entries: it goes only after every entry that
// was not. It reports whether it did.
func (l *List[K, T]) Promote(e *Entry[K, T]) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e.elem == nil || e.tier == 1 {
		return false
	}
	l.removeLocked(e)
	e.tier = 1
	l.pushLocked(e)
	return true
}

// Remove takes e off the list, if it is still on it (not evicted or
// removed before), and reports whether it did.
func (l *List[K, T]) Remove(e *Entry[K, T]) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e.elem == nil {
		return false
	}
	l.removeLocked(e)
	return true
}

// Len is the number of entries on the list.
func (l *List[K, T]) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lenLocked()
}

func (l *List[K, T]) lenLocked() int { return l.all[0].Len() + l.all[1].Len() }

// pushLocked puts e at the end of its tier; mu is held.
func (l *List[K, T]) pushLocked(e *Entry[K, T]) {
	if l.perKey > 0 {
		kt := l.byKey[e.key]
		if kt == nil {
			kt = &tiers{}
			l.byKey[e.key] = kt
		}
		e.keyElem = kt.l[e.tier].PushBack(e)
		kt.n++
	}
	e.elem = l.all[e.tier].PushBack(e)
}

// removeLocked takes e off the lists; mu is held and e is on them.
func (l *List[K, T]) removeLocked(e *Entry[K, T]) {
	l.all[e.tier].Remove(e.elem)
	if e.keyElem != nil {
		kt := l.byKey[e.key]
		kt.l[e.tier].Remove(e.keyElem)
		if kt.n--; kt.n == 0 {
			delete(l.byKey, e.key)
		}
	}
	e.elem, e.keyElem = nil, nil
}
