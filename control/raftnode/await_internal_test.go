package raftnode

import (
	"errors"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// stuckFuture is an apply future Raft never answers, as one left queued
// in its apply channel when it shut down (hashicorp/raft#498); answer
// ends it.
type stuckFuture struct {
	raft.ApplyFuture
	answer chan error
}

func (f stuckFuture) Error() error { return <-f.answer }

// An apply whose future Raft never answers ends once Raft has shut down
// (the node's goroutines that stop waits for among them), and one that
// was answered returns its answer.
func TestAnApplyRaftNeverAnswersEndsWithRaft(t *testing.T) {
	n := &Node{raftDown: make(chan struct{})}
	answered := stuckFuture{answer: make(chan error, 1)}
	want := errors.New("the answer")
	answered.answer <- want
	if err := n.await(answered); !errors.Is(err, want) {
		t.Fatalf("an answered future: %v, want its answer", err)
	}
	stuck := stuckFuture{answer: make(chan error)}
	t.Cleanup(func() { close(stuck.answer) }) // ends await's waiter
	got := make(chan error, 1)
	go func() { got <- n.await(stuck) }()
	close(n.raftDown)
	select {
	case err := <-got:
		if !errors.Is(err, raft.ErrRaftShutdown) {
			t.Fatalf("a future Raft never answers, after Raft stopped: %v, want ErrRaftShutdown", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the apply still waits after Raft stopped")
	}
}
