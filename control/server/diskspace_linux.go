package server

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// statDisk returns the bytes available to unprivileged users and the size of
// the filesystem holding path, as df(1) counts them.
func statDisk(path string) (avail, size uint64, err error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return 0, 0, fmt.Errorf("statfs %s: %w", path, err)
	}
	// Block counts are in fragments (f_frsize); filesystems that do not
	// set it count in f_bsize.
	unit := uint64(st.Frsize)
	if unit == 0 {
		unit = uint64(st.Bsize)
	}
	return st.Bavail * unit, st.Blocks * unit, nil
}
