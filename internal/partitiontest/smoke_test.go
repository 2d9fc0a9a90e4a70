package partitiontest

import (
	"testing"
	"time"

	"github.com/edge-relay/relay/internal/relaytest"
)

func TestSystemStarts(t *testing.T) {
	s := relaytest.StartSystem(t, relaytest.SystemOptions{Relayd: relayd, ControlNodes: 3, Edges: 2})
	l := s.Leader(30 * time.Second)
	t.Logf("leader %s", l.ID)
}
