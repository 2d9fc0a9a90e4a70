package fsm

import (
	"encoding/binary"
)

// Key layout of the state store. Every key starts with a one-byte prefix
// below 0xff (storage/state relies on that), then ':'.
//
//	m:applied                 16 bytes: applied index, term (written in the
//	                          same batch as every state change)
//	m:horizon                 8 bytes: first change revision still kept
//	u:<user id>               state.v1.User
//	l:<login>                 user id (unique index on login)
//	d:<user id>\x00<dev id>   state.v1.Device
//	D:<device id>             user id (device ids are global)
//	n:<node id>               state.v1.Node
//	c:<rev:8><seq:4>          state.v1.Change
//	q:<request id>            state.v1.Result of the first apply of that id
//	Q:<rev:8><request id>     empty; orders request ids for pruning
var (
	keyApplied = []byte("m:applied")
	keyHorizon = []byte("m:horizon")

	prefixUser        = []byte("u:")
	prefixLogin       = []byte("l:")
	prefixDevice      = []byte("d:")
	prefixDeviceOwner = []byte("D:")
	prefixNode        = []byte("n:")
	prefixChange      = []byte("c:")
	prefixRequest     = []byte("q:")
	prefixRequestRev  = []byte("Q:")
)

func join(prefix []byte, parts ...string) []byte {
	n := len(prefix)
	for _, p := range parts {
		n += len(p) + 1
	}
	k := make([]byte, 0, n)
	k = append(k, prefix...)
	for i, p := range parts {
		if i > 0 {
			k = append(k, 0)
		}
		k = append(k, p...)
	}
	return k
}

func userKey(id string) []byte         { return join(prefixUser, id) }
func loginKey(login string) []byte     { return join(prefixLogin, login) }
func deviceKey(uid, did string) []byte { return join(prefixDevice, uid, did) }
func deviceOwnerKey(did string) []byte { return join(prefixDeviceOwner, did) }
func nodeKey(id string) []byte         { return join(prefixNode, id) }
func requestKey(id string) []byte      { return join(prefixRequest, id) }
func userDevicesPrefix(uid string) []byte {
	k := join(prefixDevice, uid)
	return append(k, 0)
}

func changeKey(rev uint64, seq uint32) []byte {
	k := make([]byte, 0, len(prefixChange)+12)
	k = append(k, prefixChange...)
	k = binary.BigEndian.AppendUint64(k, rev)
	return binary.BigEndian.AppendUint32(k, seq)
}

func requestRevKey(rev uint64, id string) []byte {
	k := make([]byte, 0, len(prefixRequestRev)+8+len(id))
	k = append(k, prefixRequestRev...)
	k = binary.BigEndian.AppendUint64(k, rev)
	return append(k, id...)
}

// prefixEnd returns the smallest key greater than every key with prefix p.
func prefixEnd(p []byte) []byte {
	end := append([]byte(nil), p...)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i] < 0xff {
			end[i]++
			return end[:i+1]
		}
	}
	return nil
}
