// Package raftlog is the durable storage behind the control plane's
// hashicorp/raft instance: a [raft.LogStore] and [raft.StableStore] backed by
// a single Pebble database.
//
// The package owns one directory ([Config.Dir]) and everything in it. Inside
// that Pebble database it owns three keyspaces: the replicated log (entries
// keyed by big-endian index), the stable store (raft's current term, vote,
// and whatever else raft asks it to keep), and a small metadata keyspace
// (the layout version). Nothing else may write to the directory
// while a [Store] is open; Pebble's directory lock enforces this.
//
// Every write raft relies on for safety (StoreLog, StoreLogs, DeleteRange,
// Set, SetUint64) is fsynced before it returns. Entries are encoded with a
// small versioned binary format (see DESIGN.md next to this file) and
// validated when read back; undecodable bytes surface as a
// [*CorruptError] that matches [ErrCorrupt].
//
// A Store is safe for concurrent use. Raft calls StoreLogs from its main
// goroutine and DeleteRange from its snapshot goroutine; writers are
// serialised internally so the cached first and last index always match
// what is on disk.
package raftlog
