package raftnode

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

var errIsolated = errors.New("raft traffic cut by a fault test")

// Faults lets a test cut one node's Raft traffic, as a network partition
// would, while its API stays reachable: the node neither sends nor
// receives AppendEntries, votes or snapshots until Heal; fail some of
// the writes it proposes (FailWrites); or fail a restore part way
// (FailRestoreTerm). Production code leaves
// Config.Faults nil.
type Faults struct {
	mu     sync.Mutex // guards the fields below
	cutOff bool
	paused chan struct{} // non-nil while paused; closed by Heal
	layer  *streamLayer
	// failOp and failLeft: FailWrites' command and how many more of
	// them fail; failed counts those that did.
	failOp   string
	failLeft int
	failed   int
	// failRestore: the next restore fails once its snapshot is written.
	failRestore bool
}

// FailRestoreTerm makes the next restore (Config.RestoreFrom) of a node
// given these faults fail right after its Raft snapshot is written, where
// it records its term, as a failing disk would there: the one step of a
// restore after which the data dir holds Raft state, so the one whose
// failure must undo more than the import.
func (f *Faults) FailRestoreTerm() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failRestore = true
}

var errRestoreFault = errors.New("restore failed by a fault test")

// failRestoreTerm returns errRestoreFault once after FailRestoreTerm;
// else nil.
func (f *Faults) failRestoreTerm() error {
	if f == nil {
		return nil
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.failRestore {
		return nil
	}
	f.failRestore = false
	return errRestoreFault
}

// FailWrites makes the next n writes of the command op (its field name
// in state.v1.Command's oneof, such as "remove_node") that reach this
// node's ApplyLocal (its own as leader, and those followers forward to
// it) fail before they reach Raft, as a write does while the leader
// cannot reach a quorum for a moment: nothing is written and the caller
// sees ErrUnknownOutcome. It replaces an earlier FailWrites; n <= 0
// fails none.
func (f *Faults) FailWrites(op string, n int) {
	if (&statev1.Command{}).ProtoReflect().Descriptor().Oneofs().ByName("op").Fields().ByName(protoreflect.Name(op)) == nil {
		panic(fmt.Sprintf("raftnode.Faults.FailWrites: %q is no command of state.v1.Command's oneof op", op))
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failOp, f.failLeft = op, max(n, 0)
}

// FailedWrites returns how many writes FailWrites has failed.
func (f *Faults) FailedWrites() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.failed
}

var errWriteFault = errors.New("write failed by a fault test")

// failWrite returns errWriteFault, and counts it, when the encoded
// command is one FailWrites still fails; else nil.
func (f *Faults) failWrite(data []byte) error {
	if f == nil {
		return nil
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failLeft == 0 {
		return nil
	}
	var cmd statev1.Command
	if proto.Unmarshal(data, &cmd) != nil || opName(&cmd) != f.failOp {
		return nil
	}
	f.failLeft--
	f.failed++
	return errWriteFault
}

// Pause makes the node behave, to the others, like a process that was
// stopped (SIGSTOP): its Raft traffic is cut as by Isolate, and the
// writes and read indexes other nodes forward to it hang, unanswered,
// until Heal.
func (f *Faults) Pause() {
	f.mu.Lock()
	if f.paused == nil {
		f.paused = make(chan struct{})
	}
	f.mu.Unlock()
	f.Isolate()
}

// waitUnpaused blocks while the node is paused, or until ctx ends.
func (f *Faults) waitUnpaused(ctx context.Context) error {
	if f == nil {
		return nil
	}
	f.mu.Lock()
	ch := f.paused
	f.mu.Unlock()
	if ch == nil {
		return nil
	}
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Isolate cuts the node off from its peers: open Raft connections close,
// new ones are refused in both directions.
func (f *Faults) Isolate() {
	f.mu.Lock()
	f.cutOff = true
	l := f.layer
	f.mu.Unlock()
	if l != nil {
		l.cut()
	}
}

// Heal lets Raft traffic flow again and ends a pause.
func (f *Faults) Heal() {
	f.mu.Lock()
	f.cutOff = false
	if f.paused != nil {
		close(f.paused)
		f.paused = nil
	}
	f.mu.Unlock()
}

func (f *Faults) isolated() bool {
	if f == nil {
		return false
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.cutOff
}

// attach binds the faults to a node's (new) transport; a node restarted
// with the same Faults starts isolated if it was.
func (f *Faults) attach(l *streamLayer) {
	if f == nil {
		return
	}
	f.mu.Lock()
	f.layer = l
	f.mu.Unlock()
}
