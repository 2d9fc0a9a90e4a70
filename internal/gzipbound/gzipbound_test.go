package gzipbound

import (
	"bytes"
	"compress/gzip"
	"errors"
	"io"
	"testing"
)

// bomb returns n gzip members of 1 MiB of zeros each: about n KiB that
// inflate to n MiB.
func bomb(t *testing.T, n int) []byte {
	t.Helper()
	var member bytes.Buffer
	zw := gzip.NewWriter(&member)
	if _, err := zw.Write(make([]byte, 1<<20)); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return bytes.Repeat(member.Bytes(), n)
}

// A decompressor yields a message up to its limit whole, and of a larger
// one (a bomb drained as Connect drains it to report its size) at most
// limit+1 bytes before it fails with ErrTooLarge; Reset starts the count
// again for the next message.
func TestDecompressorStopsPastTheLimit(t *testing.T) {
	const limit = 3 << 20
	d := Decompressor(limit)()
	defer d.Close()
	for _, tc := range []struct {
		mib  int
		want int64
		err  error
	}{
		{3, 3 << 20, nil},
		{256, limit + 1, ErrTooLarge},
		{1, 1 << 20, nil},
	} {
		if err := d.Reset(bytes.NewReader(bomb(t, tc.mib))); err != nil {
			t.Fatal(err)
		}
		n, err := io.Copy(io.Discard, d)
		if n != tc.want || !errors.Is(err, tc.err) {
			t.Fatalf("%d MiB through a %d-byte limit: %d bytes, %v; want %d, %v", tc.mib, limit, n, err, tc.want, tc.err)
		}
	}
}

// The compressor writes gzip the decompressor reads.
func TestCompressorRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	c := Compressor()
	c.Reset(&buf)
	msg := bytes.Repeat([]byte("relay "), 1000)
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	d := Decompressor(int64(len(msg)))()
	if err := d.Reset(&buf); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(d)
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("round trip: %d bytes, %v", len(got), err)
	}
}
