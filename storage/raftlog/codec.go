package raftlog

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/raft"
)

// Key layout. Every key starts with a one-byte keyspace prefix so the three
// keyspaces never interleave and a log scan can be bounded by
// [logPrefix, logPrefix+1).
const (
	logPrefix    byte = 0x01 // logPrefix | uint64 index (big-endian) -> encoded entry
	stablePrefix byte = 0x02 // stablePrefix | raft's key -> raft's value
	metaPrefix   byte = 0x03 // metaPrefix | name -> store metadata

	logKeyLen = 1 + 8
)

// Fixed keys, as strings so they cannot be modified; convert at use.
const (
	// metaLayoutKey holds the on-disk layout version (uint64, big-endian).
	metaLayoutKey = "\x03layout"
	// "\x03commit" was reserved for a commit index, for hashicorp/raft
	// v1.8's CommitTrackingLogStore, by builds before the move to raft
	// v1.7.2. Those builds wrote it only if raft staged one, which it does
	// only with RestoreCommittedLogs, which the control plane never set. It
	// is no longer read or written; a store that has it keeps it.

	// logLowerBound and logUpperBound bound the log keyspace: [0x01, 0x02).
	logLowerBound = "\x01"
	logUpperBound = "\x02"
)

// layoutVersion is the version of the key layout above. Open refuses a
// directory written with a different version.
const layoutVersion uint64 = 1

// putLogKey writes the key of the entry at index into dst, which must be
// logKeyLen bytes long.
func putLogKey(dst []byte, index uint64) {
	dst[0] = logPrefix
	binary.BigEndian.PutUint64(dst[1:], index)
}

func logKey(index uint64) []byte {
	k := make([]byte, logKeyLen)
	putLogKey(k, index)
	return k
}

// logKeyIndex returns the index stored in a log key.
func logKeyIndex(key []byte) (uint64, error) {
	if len(key) != logKeyLen || key[0] != logPrefix {
		return 0, &CorruptError{Offset: -1, Reason: fmt.Sprintf("malformed log key %x", key)}
	}
	return binary.BigEndian.Uint64(key[1:]), nil
}

func stableKey(key []byte) []byte {
	k := make([]byte, 1+len(key))
	k[0] = stablePrefix
	copy(k[1:], key)
	return k
}

// Entry encoding, version 1:
//
//	byte     version (=1)
//	byte     flags (bit 0: AppendedAt present; other bits must be zero)
//	uvarint  Index
//	uvarint  Term
//	byte     Type
//	uvarint  len(Data), Data
//	uvarint  len(Extensions), Extensions
//	varint   AppendedAt Unix seconds   (only if flag bit 0)
//	uvarint  AppendedAt nanoseconds    (only if flag bit 0; < 1e9)
//
// A zero AppendedAt is stored as "absent" so it round-trips as the zero
// time.Time rather than as 1970 or year 1 in some other location.
const (
	encodingV1 byte = 1

	flagAppendedAt byte = 1 << 0
	knownFlags          = flagAppendedAt
)

// ErrCorrupt is matched (via errors.Is) by every error reporting bytes in the
// store that cannot be decoded or do not match their key.
var ErrCorrupt = errors.New("raftlog: corrupt data")

// CorruptError describes undecodable bytes. It matches [ErrCorrupt].
type CorruptError struct {
	// Index is the log index whose entry was being read, or 0 if unknown.
	Index uint64
	// Offset is the byte offset in the value at which decoding failed, or -1
	// if the problem is not tied to a position.
	Offset int
	// Reason says what was wrong.
	Reason string
}

func (e *CorruptError) Error() string {
	msg := "raftlog: corrupt data"
	if e.Index != 0 {
		msg += fmt.Sprintf(" in log entry %d", e.Index)
	}
	if e.Offset >= 0 {
		msg += fmt.Sprintf(" at byte %d", e.Offset)
	}
	return msg + ": " + e.Reason
}

// Is makes errors.Is(err, ErrCorrupt) true for every *CorruptError.
func (e *CorruptError) Is(target error) bool { return target == ErrCorrupt }

// encodedLen returns the exact number of bytes encodeLog writes for l.
func encodedLen(l *raft.Log) int {
	n := 2 + uvarintLen(l.Index) + uvarintLen(l.Term) + 1 +
		uvarintLen(uint64(len(l.Data))) + len(l.Data) +
		uvarintLen(uint64(len(l.Extensions))) + len(l.Extensions)
	if !l.AppendedAt.IsZero() {
		n += varintLen(l.AppendedAt.Unix()) + uvarintLen(uint64(l.AppendedAt.Nanosecond()))
	}
	return n
}

// encodeLog writes l into dst, which must be exactly encodedLen(l) bytes, and
// returns the number of bytes written.
func encodeLog(dst []byte, l *raft.Log) int {
	var flags byte
	if !l.AppendedAt.IsZero() {
		flags |= flagAppendedAt
	}
	dst[0] = encodingV1
	dst[1] = flags
	n := 2
	n += binary.PutUvarint(dst[n:], l.Index)
	n += binary.PutUvarint(dst[n:], l.Term)
	dst[n] = byte(l.Type)
	n++
	n += binary.PutUvarint(dst[n:], uint64(len(l.Data)))
	n += copy(dst[n:], l.Data)
	n += binary.PutUvarint(dst[n:], uint64(len(l.Extensions)))
	n += copy(dst[n:], l.Extensions)
	if flags&flagAppendedAt != 0 {
		n += binary.PutVarint(dst[n:], l.AppendedAt.Unix())
		n += binary.PutUvarint(dst[n:], uint64(l.AppendedAt.Nanosecond()))
	}
	return n
}

// decodeLog decodes src into l, overwriting every field. Data and Extensions
// are copied (into one allocation), so src may be reused afterwards. On
// failure l is left zeroed and the error is a *CorruptError.
func decodeLog(src []byte, l *raft.Log) error {
	*l = raft.Log{}
	d := decoder{src: src}
	version := d.byte("version")
	if d.err == nil && version != encodingV1 {
		d.fail(0, fmt.Sprintf("unknown encoding version %d", version))
	}
	flags := d.byte("flags")
	if d.err == nil && flags&^knownFlags != 0 {
		d.fail(1, fmt.Sprintf("unknown flags %#x", flags))
	}
	index := d.uvarint("index")
	term := d.uvarint("term")
	typ := d.byte("type")
	dataStart, dataLen := d.bytes("data")
	extStart, extLen := d.bytes("extensions")
	var appendedAt time.Time
	if flags&flagAppendedAt != 0 {
		secOff := d.off
		sec := d.varint("appended_at seconds")
		nsecOff := d.off
		nsec := d.uvarint("appended_at nanoseconds")
		if d.err == nil && nsec >= 1e9 {
			d.fail(nsecOff, fmt.Sprintf("appended_at nanoseconds %d out of range", nsec))
		}
		if d.err == nil {
			appendedAt = time.Unix(sec, int64(nsec)).UTC()
			if appendedAt.IsZero() {
				// The encoder never writes the zero time with the flag set,
				// so this encoding is not one we produce.
				d.fail(secOff, "appended_at flag set for zero time")
			}
		}
	}
	if d.err == nil && d.off != len(src) {
		d.fail(d.off, fmt.Sprintf("%d trailing bytes", len(src)-d.off))
	}
	if d.err != nil {
		return d.err
	}

	if total := dataLen + extLen; total > 0 {
		buf := make([]byte, total)
		copy(buf, src[dataStart:dataStart+dataLen])
		copy(buf[dataLen:], src[extStart:extStart+extLen])
		if dataLen > 0 {
			l.Data = buf[:dataLen:dataLen]
		}
		if extLen > 0 {
			l.Extensions = buf[dataLen:]
		}
	}
	l.Index = index
	l.Term = term
	l.Type = raft.LogType(typ)
	l.AppendedAt = appendedAt
	return nil
}

// decoder reads the primitives of the entry encoding, remembering the first
// failure so decodeLog can check once per group of fields.
type decoder struct {
	src []byte
	off int
	err *CorruptError
}

func (d *decoder) fail(off int, reason string) {
	if d.err == nil {
		d.err = &CorruptError{Offset: off, Reason: reason}
	}
}

func (d *decoder) byte(field string) byte {
	if d.err != nil {
		return 0
	}
	if d.off >= len(d.src) {
		d.fail(d.off, "truncated before "+field)
		return 0
	}
	b := d.src[d.off]
	d.off++
	return b
}

func (d *decoder) uvarint(field string) uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.src[d.off:])
	if n <= 0 {
		d.fail(d.off, "bad varint for "+field)
		return 0
	}
	d.off += n
	return v
}

func (d *decoder) varint(field string) int64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Varint(d.src[d.off:])
	if n <= 0 {
		d.fail(d.off, "bad varint for "+field)
		return 0
	}
	d.off += n
	return v
}

// bytes reads a length-prefixed byte string and returns its position.
func (d *decoder) bytes(field string) (start, n int) {
	lenOff := d.off
	l := d.uvarint(field + " length")
	if d.err != nil {
		return 0, 0
	}
	if l > uint64(len(d.src)-d.off) {
		d.fail(lenOff, fmt.Sprintf("%s length %d exceeds remaining %d bytes", field, l, len(d.src)-d.off))
		return 0, 0
	}
	start = d.off
	d.off += int(l)
	return start, int(l)
}

func uvarintLen(v uint64) int {
	n := 1
	for v >= 0x80 {
		v >>= 7
		n++
	}
	return n
}

func varintLen(v int64) int {
	// Zig-zag, as binary.PutVarint does.
	ux := uint64(v) << 1
	if v < 0 {
		ux = ^ux
	}
	return uvarintLen(ux)
}

// putUint64 and getUint64 encode the stable store's and metadata's integers.
func putUint64(v uint64) []byte {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	return b[:]
}

func getUint64(b []byte) (uint64, bool) {
	if len(b) != 8 {
		return 0, false
	}
	return binary.BigEndian.Uint64(b), true
}
