package raftnode

import (
	"errors"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// A heartbeat still being handled when the node stops holds up the
// transport's Close, and so the closing of the stores behind it; one that
// arrives after Close is refused without reaching Raft. Without the gate
// Raft could write a new term to a closed log store and panic
// (hashicorp/raft#717).
func TestCloseWaitsForHeartbeatInFlight(t *testing.T) {
	leader, follower := newTestTransport(t), newTestTransport(t)
	defer leader.Close()

	started := make(chan struct{})
	var startOnce sync.Once
	release := make(chan struct{})
	handled := make(chan struct{}, 2)
	follower.SetHeartbeatHandler(func(rpc raft.RPC) {
		handled <- struct{}{}
		startOnce.Do(func() { close(started) })
		<-release
		rpc.Respond(&raft.AppendEntriesResponse{Term: 7, Success: true}, nil)
	})
	consumerDone := make(chan struct{})
	stopConsumer := make(chan struct{})
	defer func() { close(stopConsumer); <-consumerDone }()
	go func() {
		// A heartbeat must never be dispatched to Raft's main loop.
		defer close(consumerDone)
		for {
			select {
			case rpc := <-follower.Consumer():
				rpc.Respond(nil, errors.New("not a heartbeat"))
				t.Errorf("heartbeat dispatched to the consumer: %T", rpc.Command)
			case <-stopConsumer:
				return
			}
		}
	}()

	heartbeat := func() error {
		var resp raft.AppendEntriesResponse
		return leader.AppendEntries("follower", follower.LocalAddr(), &raft.AppendEntriesRequest{
			RPCHeader: raft.RPCHeader{ID: []byte("leader"), Addr: []byte(leader.LocalAddr())},
			Term:      7,
		}, &resp)
	}
	sent := make(chan error, 1)
	go func() { sent <- heartbeat() }()
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("the heartbeat never reached the handler")
	}

	closed := make(chan error, 1)
	go func() { closed <- follower.Close() }()
	// Close must not return while the heartbeat is handled. A bounded
	// look: a Close that did not wait returns well within it.
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) while a heartbeat was being handled", err)
	case <-time.After(200 * time.Millisecond):
	}
	close(release)
	select {
	case err := <-closed:
		if err != nil {
			t.Fatalf("close: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return after the heartbeat ended")
	}
	if err := <-sent; err != nil {
		// The answer may or may not have made it out before the
		// connection closed; either is fine, the handler ran once.
		t.Logf("first heartbeat: %v", err)
	}

	// After Close a heartbeat never reaches the handler. Here the
	// transport's connections are gone, so it fails to send; the gate's
	// own refusal, for one a connection still delivers, is
	// TestGateRefusesHeartbeatAfterClose's.
	if err := heartbeat(); err == nil {
		t.Fatal("a heartbeat after Close was answered as handled")
	}
	if n := len(handled); n != 1 {
		t.Fatalf("handler ran %d times, want 1", n)
	}
}

// The gate itself refuses a heartbeat that arrives once Close has begun,
// answering with ErrTransportShutdown instead of handing it to Raft.
func TestGateRefusesHeartbeatAfterClose(t *testing.T) {
	tr := newTestTransport(t)
	called := false
	wrapped := tr.gated(func(raft.RPC) { called = true })
	if err := tr.Close(); err != nil {
		t.Fatal(err)
	}
	resp := make(chan raft.RPCResponse, 1)
	wrapped(raft.RPC{Command: &raft.AppendEntriesRequest{Term: 1}, RespChan: resp})
	if called {
		t.Fatal("a heartbeat after Close reached Raft's handler")
	}
	select {
	case r := <-resp:
		if !errors.Is(r.Error, raft.ErrTransportShutdown) {
			t.Fatalf("refusal = %v, want %v", r.Error, raft.ErrTransportShutdown)
		}
	default:
		t.Fatal("a refused heartbeat got no answer")
	}
}

// newTestTransport is a node's Raft transport on a free port of 127.0.0.1.
func newTestTransport(t *testing.T) *raftTransport {
	t.Helper()
	layer, err := newStreamLayer("127.0.0.1:0", nil, nil, nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	return newRaftTransport(raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream: layer, MaxPool: 1, Timeout: 10 * time.Second,
		Logger: newHCLogger(slog.New(slog.DiscardHandler), "raft-net"),
	}))
}
