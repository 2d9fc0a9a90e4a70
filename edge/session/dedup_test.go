package session

import (
	"fmt"
	"hash/maphash"
	"math/rand/v2"
	"testing"
)

// The table answers as the map and ring it replaced would: random
// remembers over a small id pool (ids coming back while still in the
// window, as refused events sent again do, and long probe runs in a
// small table), checked after every step for every id.
func TestDedupTableMatchesAMap(t *testing.T) {
	for _, window := range []int{1, 2, 3, 8, 64} {
		for seed := range uint64(20) {
			rng := rand.New(rand.NewPCG(seed, uint64(window)))
			tab := newDedupTable(maphash.MakeSeed(), window)
			model := map[string]*inflight{}
			ring := make([]*inflight, window)
			next := 0
			pool := 3 * window
			for step := range 2000 {
				f := &inflight{eventID: fmt.Sprintf("e%d", rng.IntN(pool))}
				if old := ring[next]; old != nil && model[old.eventID] == old {
					delete(model, old.eventID)
				}
				ring[next] = f
				next = (next + 1) % window
				model[f.eventID] = f
				tab.remember(f)
				used := 0
				for _, s := range tab.slots {
					if s.f != nil {
						used++
					}
				}
				if used != len(model) {
					t.Fatalf("window %d, seed %d, step %d: %d slots used, %d remembered", window, seed, step, used, len(model))
				}
				for i := range pool {
					id := fmt.Sprintf("e%d", i)
					if got, want := tab.get(id), model[id]; got != want {
						t.Fatalf("window %d, seed %d, step %d: get(%s) = %p, want %p", window, seed, step, id, got, want)
					}
				}
			}
		}
	}
}

// The cost of a durable event's duplicate check over many sessions'
// tables, as the edge runs it: look the new id up, remember it.
func BenchmarkDedup(b *testing.B) {
	const sessions, window = 256, 1024
	seed := maphash.MakeSeed()
	tabs := make([]*dedupTable, sessions)
	for i := range tabs {
		tabs[i] = newDedupTable(seed, window)
	}
	// Every id new, as a sender's are.
	ids := make([]string, b.N)
	for i := range ids {
		ids[i] = fmt.Sprintf("%024x", rand.Uint64())
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		tab := tabs[i%sessions]
		f := &inflight{eventID: ids[i]}
		if tab.get(f.eventID) == nil {
			tab.remember(f)
		}
	}
}
