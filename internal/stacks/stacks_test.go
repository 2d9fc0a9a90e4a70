package stacks

import (
	"sync"
	"testing"
)

func parkedHere(ready *sync.WaitGroup, release <-chan struct{}) {
	ready.Done()
	<-release
}

// Count finds goroutines by frames in order from the top, and only those.
func TestCount(t *testing.T) {
	var ready sync.WaitGroup
	release := make(chan struct{})
	var done sync.WaitGroup
	for range 3 {
		ready.Add(1)
		done.Go(func() { parkedHere(&ready, release) })
	}
	ready.Wait()
	defer func() { close(release); done.Wait() }()
	// Each is parked at the channel receive inside parkedHere (the
	// receive is printed above it, the function that started it below).
	if n := Count("stacks.parkedHere(", "stacks.TestCount.func"); n != 3 {
		t.Fatalf("Count found %d goroutines parked in parkedHere, want 3", n)
	}
	if n := Count("stacks.TestCount.func", "stacks.parkedHere("); n != 0 {
		t.Fatalf("frames in the wrong order matched %d goroutines", n)
	}
	if n := Count("stacks.noSuchFunction("); n != 0 {
		t.Fatalf("an absent frame matched %d goroutines", n)
	}
}
