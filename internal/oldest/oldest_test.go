package oldest

import (
	"net/netip"
	"sync"
	"testing"
)

var (
	a = netip.MustParseAddr("10.0.0.1")
	b = netip.MustParseAddr("10.0.0.2")
)

// At the bound the oldest goes; a key at its share loses its own oldest
// instead, even when another key's entry is older; removing an entry
// twice, or one evicted, changes nothing.
func TestEvictsTheOldest(t *testing.T) {
	l := New[int](4, 2)
	eb, _ := l.Add(0, b) // the oldest of all
	e1, ev := l.Add(1, a)
	if ev != nil {
		t.Fatalf("evicted %v below the bound", ev.Value)
	}
	l.Add(2, a)
	if _, ev := l.Add(3, a); ev != e1 || l.Len() != 3 {
		t.Fatalf("a's third entry evicted %v (len %d), want a's oldest, 1 (len 3)", ev, l.Len())
	}
	if l.Remove(e1) || l.Len() != 3 {
		t.Fatalf("removing an evicted entry took something off (len %d)", l.Len())
	}
	l.Add(4, b)
	if _, ev := l.Add(5, netip.Addr{}); ev != eb || l.Len() != 4 {
		t.Fatalf("at the bound evicted %v (len %d), want the oldest of all, 0 (len 4)", ev, l.Len())
	}
	if l.Remove(eb) || l.Len() != 4 {
		t.Fatalf("removing an evicted entry took something off (len %d)", l.Len())
	}
	if len(l.byKey) != 3 {
		t.Fatalf("%d keys, want 3 (a, b, the zero key)", len(l.byKey))
	}
}

// Without a share per key only the bound counts; removal empties the
// list and its keys; a lowered bound evicts as entries come.
func TestBoundAlone(t *testing.T) {
	l := New[string](2, 0)
	x, _ := l.Add("x", a)
	y, _ := l.Add("y", a)
	if !l.Remove(x) || l.Len() != 1 {
		t.Fatalf("remove x: len %d", l.Len())
	}
	if l.Remove(x) || l.Len() != 1 {
		t.Fatalf("remove x again took something off: len %d", l.Len())
	}
	l.SetLimit(1)
	if _, ev := l.Add("z", b); ev != y || l.Len() != 1 {
		t.Fatalf("under a lowered bound evicted %v (len %d), want y (len 1)", ev, l.Len())
	}
	if len(l.byKey) != 0 {
		t.Fatalf("keys kept without a share: %v", l.byKey)
	}
}

// Concurrent adds and removes keep the bound and leave nothing behind.
func TestConcurrentUse(t *testing.T) {
	l := New[int](8, 3)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			key := netip.AddrFrom4([4]byte{10, 0, 0, byte(g % 3)})
			for i := range 500 {
				e, _ := l.Add(i, key)
				if n := l.Len(); n > 8 {
					t.Errorf("length %d over the bound", n)
				}
				l.Remove(e)
			}
		})
	}
	wg.Wait()
	if n := l.Len(); n != 0 || len(l.byKey) != 0 {
		t.Fatalf("left %d entries, %d keys", n, len(l.byKey))
	}
}
