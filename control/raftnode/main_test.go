package raftnode_test

import (
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// Pebble's and glog-style background flushers that outlive a test
		// are process-wide singletons, not per-node goroutines.
		goleak.IgnoreTopFunction("github.com/cockroachdb/pebble/v2/internal/cache.(*shard).releaseLoop"),
		goleak.IgnoreAnyFunction("github.com/hashicorp/go-metrics.(*InmemSignal).run"),
	)
}
