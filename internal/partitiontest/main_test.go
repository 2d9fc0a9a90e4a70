// Package partitiontest holds the relay's partition tests: real relayd
// processes, each control node and edge in a network namespace of its
// own (internal/relaytest's Net), split by iptables, with the histories
// the clients saw checked for linearizability and exactly-once delivery.
package partitiontest

import (
	"fmt"
	"os"
	"testing"

	"github.com/edge-relay/relay/internal/relaytest"
)

// relayd is the binary under test, built once by TestMain.
var relayd string

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if os.Getenv("RELAYTEST_NETNS_PREFIX") != "" || os.Geteuid() != 0 {
		// Inside the namespace (or where there is none): build and run.
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
	}
	return relaytest.MainInNetns(m)
}
