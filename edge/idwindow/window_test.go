package idwindow

import (
	"fmt"
	"hash/maphash"
	"math/rand/v2"
	"testing"
)

// item is what the edge keeps: a pointer to something with a key.
type item struct{ id string }

// The window answers as a map and a ring would: random adds over a small
// key pool (keys coming back while still in the window, as refused
// events sent again do, and long probe runs in a small table), checked
// after every step for every key.
func TestWindowMatchesAMap(t *testing.T) {
	for _, n := range []int{1, 2, 3, 8, 17, 64, 100} {
		seeds := uint64(20)
		if n > 64 {
			seeds = 3 // growth past 64 items; fewer runs keep the test quick under -race
		}
		for seed := range seeds {
			rng := rand.New(rand.NewPCG(seed, uint64(n)))
			w := New(maphash.MakeSeed(), n, func(it *item) string { return it.id })
			model := map[string]*item{}
			ring := make([]*item, n)
			next := 0
			pool := 3 * n
			for step := range 2000 {
				it := &item{id: fmt.Sprintf("e%d", rng.IntN(pool))}
				if old := ring[next]; old != nil && model[old.id] == old {
					delete(model, old.id)
				}
				ring[next] = it
				next = (next + 1) % n
				model[it.id] = it
				w.Add(it)
				if w.Len() != len(model) {
					t.Fatalf("window %d, seed %d, step %d: %d keys found, %d remembered", n, seed, step, w.Len(), len(model))
				}
				for i := range pool {
					id := fmt.Sprintf("e%d", i)
					if got, want := w.Get(id), model[id]; got != want {
						t.Fatalf("window %d, seed %d, step %d: Get(%s) = %p, want %p", n, seed, step, id, got, want)
					}
				}
			}
		}
	}
}

// A refused event sent again takes a second place in the window; its
// first place leaving the window must not forget the resend.
func TestWindowKeepsAReaddedKey(t *testing.T) {
	w := New(maphash.MakeSeed(), 2, func(it *item) string { return it.id })
	first, resent := &item{"x"}, &item{"x"}
	w.Add(first)
	w.Add(resent)
	w.Add(&item{"y"}) // first's place is reused
	if w.Get("x") != resent {
		t.Fatal("the resent item left the window with its first attempt")
	}
	w.Add(&item{"z"}) // now resent's place is reused
	if w.Get("x") != nil || w.Get("y") == nil || w.Get("z") == nil {
		t.Fatalf("window holds x %p, y %p, z %p; want y and z", w.Get("x"), w.Get("y"), w.Get("z"))
	}
}

// A window starts small and grows to its full size only as items come: a
// sender heard from a few times does not cost the whole window.
func TestWindowGrowsAsItemsCome(t *testing.T) {
	w := New(maphash.MakeSeed(), 4096, func(s string) string { return s })
	for i := range 10 {
		w.Add(fmt.Sprint(i))
	}
	if len(w.ring) != startItems || len(w.slots) != tableSize(startItems) {
		t.Fatalf("after 10 items: ring %d, table %d", len(w.ring), len(w.slots))
	}
	for i := 10; i < 5000; i++ {
		w.Add(fmt.Sprint(i))
	}
	if len(w.ring) != 4096 || len(w.slots) != 8192 || w.Len() != 4096 {
		t.Fatalf("after 5,000 items: ring %d, table %d, %d found", len(w.ring), len(w.slots), w.Len())
	}
	if w.Get("903") != "" || w.Get("904") != "904" || w.Get("4999") != "4999" {
		t.Fatal("the window is not the last 4,096 items")
	}
}

// Strings as items, as the Go client keeps ids: added only when not
// found, forgotten in order.
func TestWindowOfStrings(t *testing.T) {
	w := New(maphash.MakeSeed(), 3, func(s string) string { return s })
	for _, id := range []string{"a", "b", "c"} {
		if w.Get(id) != "" {
			t.Fatalf("%s found before it was added", id)
		}
		w.Add(id)
	}
	if w.Get("a") != "a" || w.Get("c") != "c" {
		t.Fatal("a remembered id was not found")
	}
	w.Add("d") // forgets a
	if w.Get("a") != "" || w.Get("b") != "b" || w.Get("d") != "d" || w.Len() != 3 {
		t.Fatalf("after a fourth id: a %q, b %q, d %q, %d keys", w.Get("a"), w.Get("b"), w.Get("d"), w.Len())
	}
}

// The cost of a durable event's duplicate check over many sessions'
// windows, as the edge runs it: look the new id up, remember it.
func BenchmarkWindow(b *testing.B) {
	const sessions, n = 256, 1024
	seed := maphash.MakeSeed()
	ws := make([]*Window[*item], sessions)
	for i := range ws {
		ws[i] = New(seed, n, func(it *item) string { return it.id })
	}
	// Every id new, as a sender's are.
	ids := make([]string, b.N)
	for i := range ids {
		ids[i] = fmt.Sprintf("%024x", rand.Uint64())
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		w := ws[i%sessions]
		it := &item{id: ids[i]}
		if w.Get(it.id) == nil {
			w.Add(it)
		}
	}
}
