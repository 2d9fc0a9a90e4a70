// Package gzipbound provides a gzip decompressor for Connect that stops
// at a size limit. Connect reads at most its read limit plus one byte of
// a decompressed message and then drains the rest to report the size,
// which for a gzip bomb (a megabyte that inflates to gigabytes) means
// inflating all of it; this decompressor fails instead once past the
// limit, so the drain ends at once.
package gzipbound

import (
	"compress/gzip"
	"errors"
	"io"

	"connectrpc.com/connect"
)

// ErrTooLarge ends a decompression that went past the limit.
var ErrTooLarge = errors.New("decompressed message exceeds the size limit")

// Decompressor returns a factory of gzip decompressors that produce at
// most limit+1 bytes per message (the caller tells a message past the
// limit by that last byte, as Connect does), then fail with ErrTooLarge
// if read on while the message has more.
func Decompressor(limit int64) func() connect.Decompressor {
	return func() connect.Decompressor { return &reader{limit: limit} }
}

// Compressor returns gzip compressors at the default level.
func Compressor() connect.Compressor {
	w, _ := gzip.NewWriterLevel(io.Discard, gzip.DefaultCompression) // the level is valid
	return w
}

type reader struct {
	zr    gzip.Reader
	limit int64
	n     int64
	// opened is set once a Reset has read a gzip header: before that
	// the gzip.Reader has no inflater, and its Close would panic.
	opened bool
}

func (b *reader) Read(p []byte) (int, error) {
	if b.n > b.limit {
		return 0, ErrTooLarge
	}
	if rest := b.limit + 1 - b.n; int64(len(p)) > rest {
		p = p[:rest]
	}
	n, err := b.zr.Read(p)
	b.n += int64(n)
	return n, err
}

func (b *reader) Reset(r io.Reader) error {
	b.n = 0
	err := b.zr.Reset(r)
	if err == nil {
		b.opened = true
	}
	return err
}

// Close ends the current message; it is safe whatever Reset returned.
func (b *reader) Close() error {
	if !b.opened {
		return nil
	}
	return b.zr.Close()
}
