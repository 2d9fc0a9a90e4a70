package state

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/cockroachdb/pebble/v2/objstorage/objstorageprovider"
	"github.com/cockroachdb/pebble/v2/sstable"
	"github.com/cockroachdb/pebble/v2/vfs"
)

// importDirPrefix names the directories Import builds its tables in. They
// sit inside the store's directory so that ingesting a table is a hard
// link, and so that Open can remove what a crash left behind.
const importDirPrefix = "import-"

// defaultImportTableBytes is the size at which Import starts a new table.
// A table writer keeps the table's index in memory until the table is
// finished, so this, not the size of the export, bounds what an import
// holds.
const defaultImportTableBytes = 64 << 20

// Import replaces the whole content of the store with the export read from
// r, atomically: on any error, including a corrupt export, the store is
// left exactly as it was. It returns the number of records imported.
//
// The export is streamed into sstables on disk and ingested only once the
// decoder has verified its trailer, so memory does not grow with its size.
// See DESIGN.md for why the tables carry their own range deletions.
func (s *Store) Import(r io.Reader) (uint64, error) {
	return s.ImportChecked(r, nil)
}

// ImportChecked is Import with a check of every record before anything is
// ingested: an error from check (wrapped) fails the import with the
// store left as it was, so an export whose records the caller cannot use
// never replaces the content. check may be nil.
func (s *Store) ImportChecked(r io.Reader, check func(key, value []byte) error) (uint64, error) {
	dir, err := os.MkdirTemp(s.dir, importDirPrefix+"*")
	if err != nil {
		return 0, fmt.Errorf("import: %w", err)
	}
	defer func() {
		if err := os.RemoveAll(dir); err != nil {
			s.log.Warn("import: remove temporary tables", "dir", dir, "err", err)
		}
	}()
	dec := NewDecoder(r)
	paths, err := s.writeImportTables(dir, dec, check)
	if err != nil {
		return 0, fmt.Errorf("import: %w", err)
	}
	// One ingestion is one version edit under one sequence number range:
	// readers and snapshots see either none of the tables or all of them.
	if err := s.db.Ingest(context.Background(), paths); err != nil {
		return 0, fmt.Errorf("import: ingest: %w", err)
	}
	return dec.Count(), nil
}

// writeImportTables streams the records of dec into sstables in dir and
// returns their paths once dec has verified the whole export.
//
// Each table holds a range deletion over its own slice of the key space
// and the records that fall in it; the slices tile [0x00, 0xff), every key
// the FSM writes. Ingested together, the tables clear the old content and
// put the new one in place in a single step. An ingested table's keys all
// share one sequence number and a range deletion only hides keys older
// than itself, so a table's deletion spares its own records.
func (s *Store) writeImportTables(dir string, dec *Decoder, check func(key, value []byte) error) ([]string, error) {
	var paths []string
	var w *sstable.Writer
	defer func() {
		if w != nil {
			// Already failing; the file is removed with dir.
			_ = w.Close()
		}
	}()
	start := []byte{0x00}
	records := 0 // in the current table
	newTable := func() error {
		path := filepath.Join(dir, fmt.Sprintf("%06d.sst", len(paths)))
		f, err := vfs.Default.Create(path, vfs.WriteCategoryUnspecified)
		if err != nil {
			return fmt.Errorf("create table: %w", err)
		}
		paths = append(paths, path)
		w = sstable.NewWriter(objstorageprovider.NewFileWritable(f),
			s.opts.MakeWriterOptions(0, s.db.TableFormat()))
		return nil
	}
	// finishTable closes the current table, which covers [start, end).
	finishTable := func(end []byte) error {
		if err := w.DeleteRange(start, end); err != nil {
			return fmt.Errorf("write table: %w", err)
		}
		err := w.Close()
		w = nil
		if err != nil {
			return fmt.Errorf("finish table: %w", err)
		}
		return nil
	}
	if err := newTable(); err != nil {
		return nil, err
	}
	for {
		k, v, err := dec.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		if k[0] == 0xff {
			return nil, corrupt("key %q outside the store's key space", k)
		}
		if check != nil {
			if err := check(k, v); err != nil {
				return nil, fmt.Errorf("record %q: %w", k, err)
			}
		}
		// Splitting only after a record keeps every table's slice non-empty:
		// k is above every key already in it.
		if records > 0 && w.Raw().EstimatedSize() >= s.importTableBytes {
			if err := finishTable(k); err != nil {
				return nil, err
			}
			start, records = k, 0
			if err := newTable(); err != nil {
				return nil, err
			}
		}
		if err := w.Set(k, v); err != nil {
			return nil, fmt.Errorf("write table: %w", err)
		}
		records++
	}
	if err := finishTable([]byte{0xff}); err != nil {
		return nil, err
	}
	return paths, nil
}

// removeImportDirs removes the temporary tables of an import that a crash
// interrupted; the store had not changed, so they are only garbage.
func removeImportDirs(dir string) error {
	stale, err := filepath.Glob(filepath.Join(dir, importDirPrefix+"*"))
	if err != nil {
		return err
	}
	for _, d := range stale {
		if err := os.RemoveAll(d); err != nil {
			return err
		}
	}
	return nil
}
