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
	l := New[netip.Addr, int](4, 2)
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
	l := New[netip.Addr, string](2, 0)
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
	l := New[netip.Addr, int](8, 3)
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

// Promoted entries go only once none that was not is left: at the bound
// newer entries that were not promoted go before an older one that was,
// of all and of a key; among promoted ones the first promoted goes.
func TestPromotedGoLast(t *testing.T) {
	expect := func(what string, got, want *Entry[netip.Addr, int]) {
		t.Helper()
		if got != want {
			t.Fatalf("%s: evicted %v, want %v", what, got, want)
		}
	}
	l := New[netip.Addr, int](3, 0)
	e0, _ := l.Add(0, a)
	e1, _ := l.Add(1, b)
	e2, _ := l.Add(2, b)
	if !l.Promote(e0) || l.Promote(e0) {
		t.Fatal("Promote of an entry on the list: want true once, then false")
	}
	e3, ev := l.Add(3, a)
	expect("the fourth", ev, e1)
	e4, ev := l.Add(4, a)
	expect("the fifth", ev, e2)
	e5, ev := l.Add(5, a)
	expect("the sixth", ev, e3)
	l.Promote(e5)
	l.Promote(e4) // promoted after e5: goes after it
	e6, ev := l.Add(6, a)
	expect("the seventh, all promoted: the first promoted", ev, e0)
	_, ev = l.Add(7, a)
	expect("the eighth: the one not promoted, before e5 and e4", ev, e6)
	if l.Remove(e1) || l.Promote(e3) {
		t.Fatal("Remove or Promote of an evicted entry did something")
	}
	if !l.Remove(e5) || l.Len() != 2 {
		t.Fatalf("removing a promoted entry: len %d, want 2", l.Len())
	}
	_, ev = l.Add(8, a)
	expect("below the bound again", ev, nil)
	_, ev = l.Add(9, a)
	if ev == nil || ev.Value != 7 {
		t.Fatalf("the tenth evicted %v, want 7 (not promoted, before e4)", ev)
	}

	k := New[netip.Addr, int](10, 2)
	k0, _ := k.Add(0, a)
	k.Promote(k0)
	k1, _ := k.Add(1, a)
	k2, ev := k.Add(2, a)
	expect("a's third", ev, k1)
	k.Promote(k2)
	_, ev = k.Add(3, a)
	expect("a's fourth, both of a's promoted", ev, k0)
}
