//go:build !race

package main_test

// raceBuild: see race_on_test.go.
const raceBuild = false
