package partitiontest

import (
	"strings"
	"testing"
	"time"
)

// The relay checker finds each kind of violation, and none in a clean log.
func TestRelayLogCheck(t *testing.T) {
	l := NewRelayLog()
	for _, id := range []string{"a", "b", "c", "d"} {
		l.Sending("s", id, []string{"r"}, time.Minute)
		l.Acked(id)
	}
	l.Sending("s", "e", []string{"r"}, time.Minute) // not acknowledged: may be lost
	l.Sending("s", "f", []string{"r"}, time.Minute)
	l.Refused("f")
	l.Received("r", "s", "a")
	l.Received("r", "s", "c") // b missing, then out of order
	l.Received("r", "s", "b")
	l.Received("r", "s", "c") // c twice
	l.Received("r", "x", "z") // never sent
	l.Received("r", "s", "f") // refused
	if l.Missing() != 1 {
		t.Fatalf("missing = %d, want 1 (d)", l.Missing())
	}
	got := strings.Join(l.Check(), "\n")
	for _, want := range []string{"out of the sender's order", "received c 2 times", "never received d", "nobody sent", "which the edge refused"} {
		if !strings.Contains(got, want) {
			t.Errorf("violations lack %q:\n%s", want, got)
		}
	}
	clean := NewRelayLog()
	clean.Sending("s", "a", []string{"r"}, time.Minute)
	clean.Acked("a")
	clean.Received("r", "s", "a")
	if bad := clean.Check(); len(bad) != 0 {
		t.Fatalf("clean log: %v", bad)
	}
}

// WaitComplete returns as soon as the last acknowledged event arrives,
// and with the count still missing when the time is up.
func TestRelayLogWaitComplete(t *testing.T) {
	l := NewRelayLog()
	l.Sending("s", "a", []string{"r", "q"}, time.Minute)
	l.Acked("a")
	if n := l.WaitComplete(10 * time.Millisecond); n != 2 {
		t.Fatalf("nothing received: %d missing, want 2", n)
	}
	done := make(chan int, 1)
	go func() { done <- l.WaitComplete(time.Minute) }()
	l.Received("r", "s", "a")
	l.Received("q", "s", "a")
	select {
	case n := <-done:
		if n != 0 {
			t.Fatalf("all received: %d missing", n)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("WaitComplete did not return once everything arrived")
	}
}
