package raftnode

import (
	"errors"
	"testing"

	"google.golang.org/protobuf/proto"

	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// FailWrites fails only the command it names, as many times as it says,
// and refuses a name that is no command (a typo would fail nothing).
func TestFailWrites(t *testing.T) {
	var f Faults
	f.FailWrites("remove_node", 2)
	remove, _ := proto.Marshal(&statev1.Command{Op: &statev1.Command_RemoveNode{RemoveNode: &statev1.RemoveNode{Id: "n"}}})
	noop, _ := proto.Marshal(&statev1.Command{Op: &statev1.Command_Noop{Noop: &statev1.Noop{}}})
	if err := f.failWrite(noop); err != nil {
		t.Fatalf("a noop failed: %v", err)
	}
	for i := range 2 {
		if err := f.failWrite(remove); !errors.Is(err, errWriteFault) {
			t.Fatalf("removal %d: %v, want the fault", i, err)
		}
	}
	if err := f.failWrite(remove); err != nil || f.FailedWrites() != 2 {
		t.Fatalf("a third removal: %v, %d failed; want it through, 2 failed", err, f.FailedWrites())
	}
	var nilFaults *Faults
	if err := nilFaults.failWrite(remove); err != nil {
		t.Fatalf("no faults: %v", err)
	}
	defer func() {
		if recover() == nil {
			t.Fatal("FailWrites took a name that is no command")
		}
	}()
	f.FailWrites("remove_nodes", 1)
}
