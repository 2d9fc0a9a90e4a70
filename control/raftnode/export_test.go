package raftnode

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
