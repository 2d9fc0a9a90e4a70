// Package dirsync makes changes to a directory's entries durable.
package dirsync

import (
	"fmt"
	"os"
)

// Sync fsyncs the directory dir, so that the files created, renamed or
// removed in it survive a power loss: a file's own fsync does not cover
// its entry in the directory.
func Sync(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}
