package raftnode

import (
	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// SetAfterWithdraw makes n call f after each attempt of its feature
// withdrawal has committed and settled, before it checks its record. Set
// it before the node stops.
func SetAfterWithdraw(n *Node, f func(attempt int)) { n.afterWithdraw = f }

// ApplyGate returns the bytes n's state machine has been handed and has
// not applied, and whether n's log store waits for it now.
func ApplyGate(n *Node) (held uint64, waiting bool) {
	held, waiting, _ = n.gate.stats()
	return held, waiting
}

// ApplyGateBooks returns how many stored entries n's gate still counts.
func ApplyGateBooks(n *Node) int {
	n.gate.mu.Lock()
	defer n.gate.mu.Unlock()
	return len(n.gate.stored)
}

// ConfigurationIndex returns the index of the newest configuration entry
// in n's Raft log (0 when it holds none): hashicorp/raft's
// GetConfiguration does not say.
func ConfigurationIndex(n *Node) (uint64, error) {
	first, err := n.logs.FirstIndex()
	if err != nil {
		return 0, err
	}
	last, err := n.logs.LastIndex()
	if err != nil {
		return 0, err
	}
	for i := last; i >= first && i > 0; i-- {
		var l raft.Log
		if err := n.logs.GetLog(i, &l); err != nil {
			return 0, err
		}
		if l.Type == raft.LogConfiguration {
			return i, nil
		}
	}
	return 0, nil
}

// LogCommands decodes the commands in n's Raft log.
func LogCommands(n *Node) ([]*statev1.Command, error) {
	first, err := n.logs.FirstIndex()
	if err != nil {
		return nil, err
	}
	last, err := n.logs.LastIndex()
	if err != nil {
		return nil, err
	}
	var out []*statev1.Command
	for i := max(first, 1); i <= last; i++ {
		var l raft.Log
		if err := n.logs.GetLog(i, &l); err != nil {
			return nil, err
		}
		if l.Type != raft.LogCommand {
			continue
		}
		var cmd statev1.Command
		if err := proto.Unmarshal(l.Data, &cmd); err != nil {
			return nil, err
		}
		out = append(out, &cmd)
	}
	return out, nil
}
