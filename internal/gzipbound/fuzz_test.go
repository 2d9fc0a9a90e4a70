package gzipbound

import (
	"bytes"
	"compress/gzip"
	"errors"
	"io"
	"testing"
)

// FuzzDecompressor feeds a request body, whatever it holds, through a
// decompressor with a small limit, as Connect reads one: it yields at
// most limit+1 bytes, those bytes are what compress/gzip inflates from
// the same body, a body within the limit comes out whole with the same
// outcome as compress/gzip's, and one past it is refused: limit+1 bytes, then ErrTooLarge if read on.
func FuzzDecompressor(f *testing.F) {
	gz := func(members ...[]byte) []byte {
		var b bytes.Buffer
		for _, m := range members {
			zw := gzip.NewWriter(&b)
			zw.Write(m) //nolint:errcheck // a bytes.Buffer takes it all
			zw.Close()  //nolint:errcheck
		}
		return b.Bytes()
	}
	whole := gz([]byte("a small message"))
	f.Add(whole, uint16(64))
	f.Add(whole, uint16(3))                                     // past the limit
	f.Add(gz([]byte("one"), []byte("two")), uint16(64))         // two members
	f.Add(gz(make([]byte, 1<<16)), uint16(1024))                // zeros that inflate 60-fold
	f.Add(whole[:len(whole)-5], uint16(64))                     // cut short
	f.Add(append(append([]byte{}, whole...), 0x1f), uint16(64)) // trailing garbage
	f.Add([]byte{}, uint16(0))
	f.Add([]byte("not gzip at all"), uint16(64))
	f.Fuzz(func(t *testing.T, body []byte, limit16 uint16) {
		limit := int64(limit16)
		d := Decompressor(limit)()
		defer d.Close()
		var got []byte
		var err error
		if err = d.Reset(bytes.NewReader(body)); err == nil {
			got, err = io.ReadAll(d)
		}
		if int64(len(got)) > limit+1 {
			t.Fatalf("a %d-byte limit let %d bytes through", limit, len(got))
		}
		if errors.Is(err, ErrTooLarge) && int64(len(got)) != limit+1 {
			t.Fatalf("ErrTooLarge after %d bytes through a %d-byte limit", len(got), limit)
		}
		// compress/gzip's own reading of the body, capped a little past
		// the limit (the body may be a bomb).
		var want []byte
		zr, werr := gzip.NewReader(bytes.NewReader(body))
		if werr == nil {
			want, werr = io.ReadAll(io.LimitReader(zr, limit+2))
		}
		if !bytes.HasPrefix(want, got) {
			t.Fatalf("the decompressor yielded bytes compress/gzip does not: %q, want a prefix of %q", got, want)
		}
		switch {
		case int64(len(want)) > limit:
			// Refused: limit+1 bytes, more than the limit, which the
			// caller counts as Connect does (a message of exactly that
			// size then ends), or an error. A body both too large and
			// corrupt may fail on either count first, as inflating hands
			// back bytes and an error together.
			if err == nil && int64(len(got)) != limit+1 {
				t.Fatalf("%d bytes or more through a %d-byte limit came out as %d bytes and no error", len(want), limit, len(got))
			}
		case werr != nil:
			if err == nil || errors.Is(err, ErrTooLarge) {
				t.Fatalf("a body compress/gzip refuses (%v) ended with %v", werr, err)
			}
		default:
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("a body within the limit: %q, %v; want %q", got, err, want)
			}
		}
	})
}
