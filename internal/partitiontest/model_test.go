package partitiontest

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
)

func op(client int, call, ret int64, in Input, out Output) porcupine.Operation {
	return porcupine.Operation{ClientId: client, Call: call, Return: ret, Input: in, Output: out}
}

// The model accepts what the API may do and refuses what it must not:
// stale reads, lost writes, a create of a login that exists.
func TestModel(t *testing.T) {
	const u = "user:a"
	dev := map[string]objState{"device:d1": {ID: "d1", Name: "phone"}}
	tests := []struct {
		name string
		ops  []porcupine.Operation
		ok   bool
	}{
		{"create then read", []porcupine.Operation{
			op(0, 0, 1, Input{Key: u, Kind: OpCreate, Name: "x"}, Output{ID: "u1"}),
			op(1, 2, 3, Input{Key: u, Kind: OpRead, ID: "u1"}, Output{Name: "x"}),
		}, true},
		{"stale read after an acknowledged update", []porcupine.Operation{
			op(0, 0, 1, Input{Key: u, Kind: OpCreate, Name: "x"}, Output{ID: "u1"}),
			op(0, 2, 3, Input{Key: u, Kind: OpUpdate, ID: "u1", Name: "y"}, Output{}),
			op(1, 4, 5, Input{Key: u, Kind: OpRead, ID: "u1"}, Output{Name: "x"}),
		}, false},
		{"read concurrent with the update may see either", []porcupine.Operation{
			op(0, 0, 1, Input{Key: u, Kind: OpCreate, Name: "x"}, Output{ID: "u1"}),
			op(0, 2, 5, Input{Key: u, Kind: OpUpdate, ID: "u1", Name: "y"}, Output{}),
			op(1, 3, 4, Input{Key: u, Kind: OpRead, ID: "u1"}, Output{Name: "x"}),
		}, true},
		{"an update of unknown outcome may show up late", []porcupine.Operation{
			op(0, 0, 1, Input{Key: u, Kind: OpCreate, Name: "x"}, Output{ID: "u1"}),
			op(0, 2, 1<<62, Input{Key: u, Kind: OpUpdate, ID: "u1", Name: "y"}, Output{Unknown: true}),
			op(1, 4, 5, Input{Key: u, Kind: OpRead, ID: "u1"}, Output{Name: "x"}),
			op(1, 6, 7, Input{Key: u, Kind: OpRead, ID: "u1"}, Output{Name: "y"}),
		}, true},
		{"but not go back", []porcupine.Operation{
			op(0, 0, 1, Input{Key: u, Kind: OpCreate, Name: "x"}, Output{ID: "u1"}),
			op(0, 2, 1<<62, Input{Key: u, Kind: OpUpdate, ID: "u1", Name: "y"}, Output{Unknown: true}),
			op(1, 4, 5, Input{Key: u, Kind: OpRead, ID: "u1"}, Output{Name: "y"}),
			op(1, 6, 7, Input{Key: u, Kind: OpRead, ID: "u1"}, Output{Name: "x"}),
		}, false},
		{"create of an unknown outcome makes the login taken", []porcupine.Operation{
			op(0, 0, 1<<62, Input{Key: u, Kind: OpCreate, Name: "x"}, Output{Unknown: true}),
			op(1, 2, 3, Input{Key: u, Kind: OpCreate, Name: "y"}, Output{Exists: true}),
		}, true},
		{"login taken with nothing created", []porcupine.Operation{
			op(1, 2, 3, Input{Key: u, Kind: OpCreate, Name: "y"}, Output{Exists: true}),
		}, false},
		{"deleted then created again: the old id is gone", []porcupine.Operation{
			op(0, 0, 1, Input{Key: u, Kind: OpCreate, Name: "x"}, Output{ID: "u1"}),
			op(0, 2, 3, Input{Key: u, Kind: OpDelete, ID: "u1"}, Output{}),
			op(0, 4, 5, Input{Key: u, Kind: OpCreate, Name: "z"}, Output{ID: "u2"}),
			op(1, 6, 7, Input{Key: u, Kind: OpRead, ID: "u1"}, Output{Name: "x"}),
		}, false},
		{"device revoked stays revoked", []porcupine.Operation{
			op(0, 0, 1, Input{Key: "device:d1", Kind: OpRevoke, ID: "d1"}, Output{}),
			op(1, 2, 3, Input{Key: "device:d1", Kind: OpRead, ID: "d1"}, Output{Name: "phone"}),
		}, false},
		{"device renamed, revoked, read", []porcupine.Operation{
			op(0, 0, 1, Input{Key: "device:d1", Kind: OpUpdate, ID: "d1", Name: "tab"}, Output{}),
			op(0, 2, 3, Input{Key: "device:d1", Kind: OpRevoke, ID: "d1"}, Output{}),
			op(1, 4, 5, Input{Key: "device:d1", Kind: OpRead, ID: "d1"}, Output{Name: "tab", Revoked: true}),
		}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := porcupine.CheckOperations(Model(dev), tt.ops); got != tt.ok {
				t.Fatalf("linearizable = %v, want %v", got, tt.ok)
			}
		})
	}
}

// A history that is not linearizable is kept, as JSON and as porcupine's
// visualisation, for the failing run's report.
func TestHistoryKeptOnFailure(t *testing.T) {
	h := NewHistory()
	h.Invoke(0, Input{Key: "user:a", Kind: OpCreate, Name: "x"})(Output{ID: "u1"})
	h.Invoke(1, Input{Key: "user:a", Kind: OpRead, ID: "u1"})(Output{Name: "stale"})
	dir := t.TempDir()
	res, where, err := h.Check(Model(nil), time.Minute, dir)
	if err != nil {
		t.Fatal(err)
	}
	if res != porcupine.Illegal || where != dir {
		t.Fatalf("check = %s, kept in %q", res, where)
	}
	for _, f := range []string{"history.json", "history.html"} {
		if fi, err := os.Stat(filepath.Join(dir, f)); err != nil || fi.Size() == 0 {
			t.Errorf("%s: %v", f, err)
		}
	}
}
