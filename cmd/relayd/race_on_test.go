//go:build race

package main_test

// raceBuild: the tests run under the race detector, and so do the
// binaries they build (a race a test's scenario provokes in relayd then
// fails the test: relaytest.StartCmd reads the report).
const raceBuild = true
