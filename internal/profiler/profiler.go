// Package profiler serves the Go runtime's profiles (net/http/pprof) on
// a relay process's admin port, under /debug/pprof/. (Importing
// net/http/pprof also fills http.DefaultServeMux, which no relay server
// uses.)
package profiler

import (
	"net/http"
	"net/http/pprof"
)

// Register adds /debug/pprof/ to mux: the index and every named profile
// (heap, goroutine, allocs, block, mutex, threadcreate) under it, plus
// cmdline, a CPU profile (?seconds=N), symbol lookup and an execution
// trace. Only a private port should carry them: a profile tells how the
// process spends its time and what it holds.
func Register(mux *http.ServeMux) {
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
}
