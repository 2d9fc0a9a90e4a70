package partitiontest

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/anishathalye/porcupine"
)

// The control plane's API as a sequential specification, for porcupine.
// The history is split by key; each key is one object of the API:
//
//   - "user:<login>": the account with that login. create(login) gives it
//     an id; update, delete and read address it by id, so an id from an
//     earlier incarnation (deleted, then created again) is not found.
//   - "device:<id>": a device registered before the run, of an account the
//     run never deletes: rename, revoke, delete, read (listing the
//     account's devices).
//
// An operation whose outcome the client does not know (a timeout, an
// Unavailable) is recorded with its return at the end of the history and
// may or may not have taken effect: the model allows both.

// Op kinds.
const (
	OpCreate = "create"
	OpUpdate = "update" // user: display name; device: name
	OpDelete = "delete"
	OpRevoke = "revoke"
	OpRead   = "read"
)

// Input is what a client asked.
type Input struct {
	Key  string `json:"key"`
	Kind string `json:"kind"`
	// ID is the object's id (user ops other than create; device ops).
	ID string `json:"id,omitempty"`
	// Name is the value written (display name, device name).
	Name string `json:"name,omitempty"`
}

// Output is what the client saw.
type Output struct {
	// Unknown: no answer, or one that says the outcome is not known.
	Unknown bool `json:"unknown,omitempty"`
	// NotFound / Exists: the API's NotFound / AlreadyExists.
	NotFound bool `json:"not_found,omitempty"`
	Exists   bool `json:"exists,omitempty"`
	// ID created; Name and Revoked read.
	ID      string `json:"id,omitempty"`
	Name    string `json:"name,omitempty"`
	Revoked bool   `json:"revoked,omitempty"`
	// Err is any other error (recorded, and a checker failure).
	Err string `json:"err,omitempty"`
	// Failed: the call certainly had no effect (the node says no attempt
	// may have taken effect, or the request never left the client); such
	// an operation is left out of the history.
	Failed bool `json:"-"`
}

// objState is one object's state; comparable, so porcupine's == works.
type objState struct {
	ID      string // "" while the object does not exist; "?" created with an id never seen
	Name    string
	Revoked bool
}

// unseenID stands for the id of an account whose create's outcome the
// client did not learn.
const unseenID = "?"

// step returns the states the object may be in after the operation, or
// none if the operation could not have seen that output.
func step(s objState, in Input, out Output) []objState {
	if out.Unknown {
		next := []objState{s}
		if applied, ok := apply(s, in); ok {
			next = append(next, applied)
		}
		return next
	}
	switch in.Kind {
	case OpCreate:
		if out.Exists {
			return when(s.ID != "", s)
		}
		return when(s.ID == "" && out.ID != "", objState{ID: out.ID, Name: in.Name})
	case OpUpdate, OpDelete, OpRevoke:
		if out.NotFound {
			return when(s.ID != in.ID, s)
		}
		next, ok := apply(s, in)
		return when(ok, next)
	case OpRead:
		if out.NotFound {
			return when(s.ID != in.ID, s)
		}
		return when(s.ID == in.ID && s.Name == out.Name && s.Revoked == out.Revoked, s)
	}
	return nil
}

// apply is the effect of a write that succeeded.
func apply(s objState, in Input) (objState, bool) {
	switch in.Kind {
	case OpCreate:
		if s.ID != "" {
			return s, false
		}
		return objState{ID: unseenID, Name: in.Name}, true
	case OpUpdate:
		if s.ID != in.ID {
			return s, false
		}
		s.Name = in.Name
		return s, true
	case OpRevoke:
		if s.ID != in.ID {
			return s, false
		}
		s.Revoked = true
		return s, true
	case OpDelete:
		if s.ID != in.ID {
			return s, false
		}
		return objState{}, true
	}
	return s, false
}

func when(ok bool, s objState) []objState {
	if ok {
		return []objState{s}
	}
	return nil
}

// Model is the API's model. initial gives each key's state before the
// history began (devices registered beforehand).
func Model(initial map[string]objState) porcupine.Model {
	nm := porcupine.NondeterministicModel{
		Partition: func(h []porcupine.Operation) [][]porcupine.Operation {
			byKey := map[string][]porcupine.Operation{}
			var keys []string
			for _, op := range h {
				k := op.Input.(Input).Key
				if _, ok := byKey[k]; !ok {
					keys = append(keys, k)
				}
				byKey[k] = append(byKey[k], op)
			}
			sort.Strings(keys)
			var out [][]porcupine.Operation
			for _, k := range keys {
				out = append(out, byKey[k])
			}
			return out
		},
		// The key of the partition is not known here; every key starts
		// from "absent" except those in initial, which Step recognises by
		// the first operation's key (see keyedState).
		Init: func() []any { return []any{keyedState{}} },
		Step: func(state, input, output any) []any {
			ks := state.(keyedState)
			in := input.(Input)
			if !ks.started {
				ks = keyedState{started: true, s: initial[in.Key]}
			}
			var next []any
			for _, s := range step(ks.s, in, output.(Output)) {
				next = append(next, keyedState{started: true, s: s})
			}
			return next
		},
		DescribeOperation: func(input, output any) string {
			in, out := input.(Input), output.(Output)
			return fmt.Sprintf("%s %s %s %q -> %+v", in.Kind, in.Key, in.ID, in.Name, out)
		},
		DescribeState: func(state any) string { return fmt.Sprintf("%+v", state.(keyedState).s) },
	}
	return nm.ToModel()
}

// keyedState is an object's state within its partition; the first step
// of a partition takes the key's initial state.
type keyedState struct {
	started bool
	s       objState
}

// History records operations as clients invoke and complete them.
type History struct {
	start time.Time

	mu  sync.Mutex // guards ops
	ops []porcupine.Operation
}

// NewHistory starts an empty history.
func NewHistory() *History { return &History{start: time.Now()} }

// Invoke notes the start of an operation; the returned func records it
// with its output.
func (h *History) Invoke(client int, in Input) func(Output) {
	call := time.Since(h.start).Nanoseconds()
	return func(out Output) {
		if out.Failed {
			return
		}
		ret := time.Since(h.start).Nanoseconds()
		if out.Unknown {
			// It may take effect at any later time.
			ret = 1 << 62
		}
		h.mu.Lock()
		defer h.mu.Unlock()
		h.ops = append(h.ops, porcupine.Operation{ClientId: client, Input: in, Call: call, Output: out, Return: ret})
	}
}

// Ops are the operations recorded so far.
func (h *History) Ops() []porcupine.Operation {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]porcupine.Operation(nil), h.ops...)
}

// Check checks the history for linearizability. On a failure (or a
// check that ran out of time) it writes the history as JSON and
// porcupine's visualisation to dir and says where.
func (h *History) Check(model porcupine.Model, timeout time.Duration, dir string) (porcupine.CheckResult, string, error) {
	ops := h.Ops()
	res, info := porcupine.CheckOperationsVerbose(model, ops, timeout)
	if res == porcupine.Ok {
		return res, "", nil
	}
	if err := h.Save(dir); err != nil {
		return res, "", err
	}
	vis := filepath.Join(dir, "history.html")
	if err := porcupine.VisualizePath(model, info, vis); err != nil {
		return res, "", err
	}
	return res, dir, nil
}

// Save writes the history as JSON into dir (history.json).
func (h *History) Save(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(h.Ops(), "", " ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "history.json"), b, 0o644)
}
