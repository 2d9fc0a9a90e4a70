// Package partitiontest holds the relay's partition tests: real relayd
// processes, each control node and edge in a network namespace of its
// own (internal/relaytest's Net), split by iptables, with the histories
// the clients saw checked for linearizability and exactly-once delivery.
package partitiontest

import (
	"fmt"
	"os"
	"testing"

	"go.uber.org/goleak"

	"github.com/edge-relay/relay/internal/relaytest"
)

// relayd is the binary under test, built once by TestMain.
var relayd string

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if os.Getenv("RELAYTEST_NETNS_PREFIX") != "" {
		// The inner run, in the namespace: the outer one built relayd
		// (where the module proxy can be reached, if it must be).
		relayd = os.Getenv("RELAYTEST_RELAYD")
		return relaytest.MainInNetns(leakChecked{m})
	}
	if os.Geteuid() == 0 {
		dir, err := os.MkdirTemp("", "relay-partition-bin")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		if relayd, err = relaytest.BuildRelayd(dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		os.Setenv("RELAYTEST_RELAYD", relayd)
	}
	return relaytest.MainInNetns(leakChecked{m})
}

// leakChecked fails a passing run that leaves goroutines behind (the
// clients, watchers and process readers the tests start all have
// owners that stop them).
type leakChecked struct{ m *testing.M }

func (l leakChecked) Run() int {
	code := l.m.Run()
	if code != 0 || os.Getenv("RELAYTEST_NETNS_PREFIX") == "" {
		return code
	}
	// net/http keeps idle client connections' goroutines briefly.
	if err := goleak.Find(goleak.IgnoreTopFunction("internal/poll.runtime_pollWait")); err != nil {
		fmt.Fprintln(os.Stderr, "goroutines left behind:", err)
		return 1
	}
	return 0
}
