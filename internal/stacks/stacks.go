// Package stacks reads this process's goroutine stacks, for tests that
// wait until goroutines reach (or leave) a given point, or count those of
// a kind.
package stacks

import (
	"runtime"
	"strings"
)

// All returns the stack of every goroutine of the process, one each, as
// runtime.Stack prints them.
func All() []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return strings.Split(string(buf[:n]), "\n\n")
		}
		buf = make([]byte, 2*len(buf))
	}
}

// Count returns how many goroutines have a stack that holds every one of
// frames (parts of function names as a stack prints them), in that order
// from the top.
func Count(frames ...string) int {
	n := 0
	for _, g := range All() {
		if holds(g, frames) {
			n++
		}
	}
	return n
}

func holds(stack string, frames []string) bool {
	for _, f := range frames {
		i := strings.Index(stack, f)
		if i < 0 {
			return false
		}
		stack = stack[i+len(f):]
	}
	return true
}
