// Package oldest keeps a bounded list of entries, oldest first, and says
// which one to drop when a new one comes over the bound: the oldest of
// all, or, when the new entry's key already holds its share, the oldest
// of that key's. Listeners use it to bound the connections that have not
// yet proven themselves (a Raft hello, an HTTPS request or WebSocket
// handshake): closing the oldest rather than refusing the newest means a
// flood of silent connections cannot keep out a real peer, whose
// handshake takes a round trip or two, and the share keeps one source
// from pushing out everyone else's.
package oldest

import (
	"container/list"
	"net/netip"
	"sync"
)

// List is a bounded list of entries, safe for concurrent use.
type List[T any] struct {
	mu     sync.Mutex
	limit  int
	perKey int // 0: no share per key
	all    list.List
	byKey  map[netip.Addr]*list.List
}

// Entry is a value on a List, until it is removed or evicted.
type Entry[T any] struct {
	Value T
	key   netip.Addr
	// elem and keyElem place the entry on its list's lists; nil once it
	// is off them. Guarded by the list's mu.
	elem, keyElem *list.Element
}

// New returns a list of at most limit entries, and at most perKey of one
// key (0: no share per key).
func New[T any](limit, perKey int) *List[T] {
	return &List[T]{limit: limit, perKey: perKey, byKey: map[netip.Addr]*list.List{}}
}

// SetLimit changes the bound; entries already over it go as new ones
// come.
func (l *List[T]) SetLimit(limit int) {
	l.mu.Lock()
	l.limit = limit
	l.mu.Unlock()
}

// Add puts v at the end of the list, under key, and returns its entry.
// When key already holds its share, the oldest of key's entries is taken
// off the list; else, at the bound, the oldest of all. The one taken off
// (nil if none) is returned for its owner to drop.
func (l *List[T]) Add(v T, key netip.Addr) (e, evicted *Entry[T]) {
	e = &Entry[T]{Value: v, key: key}
	l.mu.Lock()
	defer l.mu.Unlock()
	kl := l.byKey[key]
	switch {
	case l.perKey > 0 && kl != nil && kl.Len() >= l.perKey:
		evicted = kl.Front().Value.(*Entry[T])
	case l.all.Len() >= l.limit && l.all.Len() > 0:
		evicted = l.all.Front().Value.(*Entry[T])
	}
	if evicted != nil {
		l.removeLocked(evicted)
	}
	if l.perKey > 0 {
		if kl = l.byKey[key]; kl == nil {
			kl = list.New()
			l.byKey[key] = kl
		}
		e.keyElem = kl.PushBack(e)
	}
	e.elem = l.all.PushBack(e)
	return e, evicted
}

// Remove takes e off the list, if it is still on it (not evicted or
// removed before), and reports whether it did.
func (l *List[T]) Remove(e *Entry[T]) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e.elem == nil {
		return false
	}
	l.removeLocked(e)
	return true
}

// Len is the number of entries on the list.
func (l *List[T]) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.all.Len()
}

// removeLocked takes e off the lists; mu is held and e is on them.
func (l *List[T]) removeLocked(e *Entry[T]) {
	l.all.Remove(e.elem)
	if e.keyElem != nil {
		kl := l.byKey[e.key]
		kl.Remove(e.keyElem)
		if kl.Len() == 0 {
			delete(l.byKey, e.key)
		}
	}
	e.elem, e.keyElem = nil, nil
}
