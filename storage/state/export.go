package state

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"slices"
)

// The export format, version 1 (all integers unsigned):
//
//	magic    8 bytes "RLYSTAT1"
//	record*  uvarint(len(key)) key uvarint(len(value)) value   (len(key) >= 1)
//	end      uvarint(0)
//	count    8 bytes big-endian: number of records
//	crc      4 bytes big-endian: CRC-32C of every byte before it
//
// Records are in key order. A reader accepts a file only when the trailer
// checks out and nothing follows it, so a truncated or corrupted backup is
// refused before any of it is applied.
const exportMagic = "RLYSTAT1"

const (
	// MaxKeyLen bounds a key in an export; larger means corruption.
	MaxKeyLen = 64 << 10
	// MaxValueLen bounds a value in an export; larger means corruption.
	MaxValueLen = 64 << 20
)

// ErrCorrupt reports an export that is not well formed. Errors returned by
// the decoder for bad input wrap it.
var ErrCorrupt = errors.New("state: corrupt export")

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Export writes every key of r in the export format to w and returns the
// number of records written. Give it a Snapshot for a consistent copy
// (read with Snapshot.Scan: w may be slow without keeping the store's
// memtables for it).
func Export(w io.Writer, r Reader) (uint64, error) {
	return ExportContext(context.Background(), w, r)
}

// ExportContext is Export that stops with ctx's error, leaving a partial
// export in w, once ctx ends: it looks before each record, so a backup
// of a large state that is cancelled or runs out of time ends at once
// instead of when the whole state is written.
func ExportContext(ctx context.Context, w io.Writer, r Reader) (uint64, error) {
	done := ctx.Done() // nil for a context that never ends
	crc := crc32.New(castagnoli)
	bw := bufio.NewWriterSize(io.MultiWriter(w, crc), 256<<10)
	if _, err := bw.WriteString(exportMagic); err != nil {
		return 0, fmt.Errorf("write export header: %w", err)
	}
	var count uint64
	var lenBuf [binary.MaxVarintLen64]byte
	scan := r.Iterate
	if s, ok := r.(interface {
		Scan(start, end []byte, fn func(key, value []byte) (bool, error)) error
	}); ok {
		// A backup's stream may be slow to take what is written: no
		// iterator stays open while it waits (Snapshot.Scan).
		scan = s.Scan
	}
	err := scan(nil, nil, func(k, v []byte) (bool, error) {
		select {
		case <-done:
			return false, ctx.Err()
		default:
		}
		for _, part := range [][]byte{k, v} {
			n := binary.PutUvarint(lenBuf[:], uint64(len(part)))
			if _, err := bw.Write(lenBuf[:n]); err != nil {
				return false, err
			}
			if _, err := bw.Write(part); err != nil {
				return false, err
			}
		}
		count++
		return true, nil
	})
	if err != nil {
		return 0, fmt.Errorf("write export records: %w", err)
	}
	var trailer [9]byte // uvarint(0) + count
	binary.BigEndian.PutUint64(trailer[1:], count)
	if _, err := bw.Write(trailer[:]); err != nil {
		return 0, fmt.Errorf("write export trailer: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return 0, fmt.Errorf("flush export: %w", err)
	}
	var sum [4]byte
	binary.BigEndian.PutUint32(sum[:], crc.Sum32())
	if _, err := w.Write(sum[:]); err != nil {
		return 0, fmt.Errorf("write export checksum: %w", err)
	}
	return count, nil
}

// Decoder reads an export record by record. Records are only trustworthy
// once Next has returned io.EOF, which it does after verifying the trailer.
type Decoder struct {
	r       *bufio.Reader
	crc     hash.Hash32
	started bool
	done    bool
	count   uint64
	lastKey []byte
}

// NewDecoder returns a decoder reading from r.
func NewDecoder(r io.Reader) *Decoder {
	return &Decoder{r: bufio.NewReaderSize(r, 256<<10), crc: crc32.New(castagnoli)}
}

// Count is the number of records decoded so far.
func (d *Decoder) Count() uint64 { return d.count }

func corrupt(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorrupt, fmt.Sprintf(format, args...))
}

func (d *Decoder) readFull(buf []byte, what string) error {
	if _, err := io.ReadFull(d.r, buf); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return corrupt("truncated in %s", what)
		}
		return fmt.Errorf("read export %s: %w", what, err)
	}
	d.crc.Write(buf)
	return nil
}

// readChunk is the most readN allocates ahead of the bytes it has read.
const readChunk = 64 << 10

// readN reads n bytes. The length comes from the export, which may be
// hostile: a few bytes claiming a MaxValueLen value must not cost
// MaxValueLen of memory, so the buffer grows only as bytes arrive.
func (d *Decoder) readN(n uint64, what string) ([]byte, error) {
	buf := make([]byte, 0, min(n, readChunk))
	for uint64(len(buf)) < n {
		next := min(n-uint64(len(buf)), readChunk)
		buf = slices.Grow(buf, int(next))
		part := buf[len(buf) : len(buf)+int(next)]
		if err := d.readFull(part, what); err != nil {
			return nil, err
		}
		buf = buf[:len(buf)+int(next)]
	}
	return buf, nil
}

func (d *Decoder) readUvarint(what string) (uint64, error) {
	var buf [binary.MaxVarintLen64]byte
	for i := range buf {
		b, err := d.r.ReadByte()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return 0, corrupt("truncated in %s length", what)
			}
			return 0, fmt.Errorf("read export %s length: %w", what, err)
		}
		buf[i] = b
		if b < 0x80 {
			d.crc.Write(buf[:i+1])
			v, n := binary.Uvarint(buf[:i+1])
			if n <= 0 {
				return 0, corrupt("bad %s length", what)
			}
			return v, nil
		}
	}
	return 0, corrupt("%s length overflows", what)
}

// Next returns the next record. The slices are owned by the caller. At the
// verified end of the export it returns io.EOF; any malformation returns an
// error wrapping ErrCorrupt.
func (d *Decoder) Next() (key, value []byte, err error) {
	if d.done {
		return nil, nil, io.EOF
	}
	if !d.started {
		var m [len(exportMagic)]byte
		if err := d.readFull(m[:], "header"); err != nil {
			return nil, nil, err
		}
		if string(m[:]) != exportMagic {
			return nil, nil, corrupt("not a state export (bad magic %q)", m[:])
		}
		d.started = true
	}
	klen, err := d.readUvarint("key")
	if err != nil {
		return nil, nil, err
	}
	if klen == 0 {
		return nil, nil, d.finish()
	}
	if klen > MaxKeyLen {
		return nil, nil, corrupt("key length %d exceeds %d", klen, MaxKeyLen)
	}
	key, err = d.readN(klen, "key")
	if err != nil {
		return nil, nil, err
	}
	if d.lastKey != nil && string(key) <= string(d.lastKey) {
		return nil, nil, corrupt("keys out of order at record %d", d.count+1)
	}
	vlen, err := d.readUvarint("value")
	if err != nil {
		return nil, nil, err
	}
	if vlen > MaxValueLen {
		return nil, nil, corrupt("value length %d exceeds %d", vlen, MaxValueLen)
	}
	value, err = d.readN(vlen, "value")
	if err != nil {
		return nil, nil, err
	}
	d.count++
	d.lastKey = key
	return key, value, nil
}

func (d *Decoder) finish() error {
	var cnt [8]byte
	if err := d.readFull(cnt[:], "trailer"); err != nil {
		return err
	}
	if got := binary.BigEndian.Uint64(cnt[:]); got != d.count {
		return corrupt("trailer counts %d records, found %d", got, d.count)
	}
	want := d.crc.Sum32()
	var sum [4]byte
	if _, err := io.ReadFull(d.r, sum[:]); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return corrupt("truncated in checksum")
		}
		return fmt.Errorf("read export checksum: %w", err)
	}
	if got := binary.BigEndian.Uint32(sum[:]); got != want {
		return corrupt("checksum mismatch (stored %08x, computed %08x)", got, want)
	}
	if _, err := d.r.ReadByte(); err == nil {
		return corrupt("trailing bytes after checksum")
	} else if !errors.Is(err, io.EOF) {
		return fmt.Errorf("read after export trailer: %w", err)
	}
	d.done = true
	return io.EOF
}
