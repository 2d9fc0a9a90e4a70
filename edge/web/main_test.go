package web_test

import (
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		goleak.IgnoreTopFunction("github.com/cockroachdb/pebble/v2/internal/cache.(*shard).releaseLoop"),
		// net/http keeps idle client connections' goroutines briefly.
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
	)
}
