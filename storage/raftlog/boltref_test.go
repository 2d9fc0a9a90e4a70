package raftlog

import (
	"bytes"
	"encoding/binary"

	"github.com/hashicorp/go-msgpack/v2/codec"
	"github.com/hashicorp/raft"
	bolt "go.etcd.io/bbolt"
)

// boltRef is the benchmark's BoltDB baseline. It reproduces the storage path
// of github.com/hashicorp/raft-boltdb/v2 v2.3.1 (one read-write bbolt
// transaction per StoreLogs, committed with fsync; a "logs" bucket keyed by
// big-endian index; entries msgpack-encoded with go-msgpack/v2 in the
// legacy time format; one read transaction per GetLog) on the same
// go.etcd.io/bbolt v1.3.5 that release requires.
//
// The library itself cannot be imported here: v2.3.1 imports
// github.com/hashicorp/go-metrics/compat, which go-metrics v0.7.0 (required
// by hashicorp/raft v1.8.0) no longer has, and no later v2 release exists.
// Only its metrics calls (no-ops without a configured sink) are left out.
type boltRef struct{ db *bolt.DB }

var boltRefLogs = []byte("logs")

func openBoltRef(path string) (*boltRef, error) {
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		return nil, err
	}
	err = db.Update(func(tx *bolt.Tx) error {
		if _, err := tx.CreateBucketIfNotExists(boltRefLogs); err != nil {
			return err
		}
		_, err := tx.CreateBucketIfNotExists([]byte("conf"))
		return err
	})
	if err != nil {
		db.Close()
		return nil, err
	}
	return &boltRef{db: db}, nil
}

func (b *boltRef) Close() error { return b.db.Close() }

func (b *boltRef) StoreLogs(logs []*raft.Log) error {
	tx, err := b.db.Begin(true)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	bucket := tx.Bucket(boltRefLogs)
	for _, l := range logs {
		key := make([]byte, 8)
		binary.BigEndian.PutUint64(key, l.Index)
		var buf bytes.Buffer
		h := codec.MsgpackHandle{BasicHandle: codec.BasicHandle{TimeNotBuiltin: true}}
		if err := codec.NewEncoder(&buf, &h).Encode(l); err != nil {
			return err
		}
		if err := bucket.Put(key, buf.Bytes()); err != nil {
			return err
		}
	}
	return tx.Commit()
}

func (b *boltRef) GetLog(index uint64, l *raft.Log) error {
	tx, err := b.db.Begin(false)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	key := make([]byte, 8)
	binary.BigEndian.PutUint64(key, index)
	val := tx.Bucket(boltRefLogs).Get(key)
	if val == nil {
		return raft.ErrLogNotFound
	}
	var h codec.MsgpackHandle
	return codec.NewDecoder(bytes.NewBuffer(val), &h).Decode(l)
}
