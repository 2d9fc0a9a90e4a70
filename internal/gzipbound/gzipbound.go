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
// most limit+1 bytes per message, then fail with ErrTooLarge.
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
	return b.zr.Reset(r)
}

func (b *reader) Close() error { return b.zr.Close() }
