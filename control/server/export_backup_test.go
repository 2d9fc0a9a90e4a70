package server

import "github.com/edge-relay/relay/control/backup"

// BackupSource is the source the node's scheduled backups read the state
// with, for tests that run a backup scheduler of their own over it.
func BackupSource(s *Server) backup.Source { return s.writeBackup }
