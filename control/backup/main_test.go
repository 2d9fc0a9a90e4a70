package backup_test

import (
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// Pebble's block cache release loop is a process-wide singleton
		// (the restore drill starts real nodes).
		goleak.IgnoreTopFunction("github.com/cockroachdb/pebble/v2/internal/cache.(*shard).releaseLoop"),
		goleak.IgnoreAnyFunction("github.com/hashicorp/go-metrics.(*InmemSignal).run"),
	)
}
