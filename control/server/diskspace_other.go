//go:build !linux

package server

import (
	"errors"
	"fmt"
)

// statDisk is implemented on Linux only (the platform relayd ships for);
// elsewhere the disk metrics are left out.
func statDisk(path string) (avail, size uint64, err error) {
	return 0, 0, fmt.Errorf("statfs %s: %w", path, errors.ErrUnsupported)
}
