package raftnode

// SetAfterWithdraw makes n call f after each attempt of its feature
// withdrawal has committed and settled, before it checks its record. Set
// it before the node stops.
func SetAfterWithdraw(n *Node, f func(attempt int)) { n.afterWithdraw = f }
