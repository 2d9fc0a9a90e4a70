package raftlog

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

func encode(l *raft.Log) []byte {
	b := make([]byte, encodedLen(l))
	if n := encodeLog(b, l); n != len(b) {
		panic("encodedLen disagrees with encodeLog")
	}
	return b
}

func codecSamples() []*raft.Log {
	return []*raft.Log{
		{},
		{Index: 1, Term: 1, Type: raft.LogConfiguration, Data: []byte("cfg")},
		{Index: math.MaxUint64, Term: math.MaxUint64, Type: 255, Data: make([]byte, 300), Extensions: []byte{1}},
		{Index: 1 << 40, Term: 3, AppendedAt: time.Unix(1_700_000_000, 999_999_999)},
		{Index: 2, Term: 2, AppendedAt: time.Unix(-1, 1)},
		{Index: 3, Term: 2, AppendedAt: time.Date(1, 1, 1, 0, 0, 0, 1, time.UTC)}, // one ns after zero
		testLog(12345),
	}
}

func TestCodecRoundTrip(t *testing.T) {
	for _, want := range codecSamples() {
		var got raft.Log
		if err := decodeLog(encode(want), &got); err != nil {
			t.Fatalf("decode(encode(%+v)): %v", want, err)
		}
		if !logsEqual(&got, want) {
			t.Fatalf("round trip: got %+v, want %+v", got, *want)
		}
	}
}

func TestDecodeRejectsCorruption(t *testing.T) {
	valid := encode(testLog(7))
	zeroTimeFlagged := encode(&raft.Log{Index: 1, AppendedAt: time.Unix(1, 0)})
	// Replace the 1-second timestamp with the zero time's Unix seconds.
	zeroTimeFlagged = zeroTimeFlagged[:len(zeroTimeFlagged)-2]
	zeroTimeFlagged = append(zeroTimeFlagged, varintBytes(time.Time{}.Unix())...)
	zeroTimeFlagged = append(zeroTimeFlagged, 0)

	cases := map[string]struct {
		in     []byte
		reason string
	}{
		"empty":             {nil, "truncated before version"},
		"unknown version":   {append([]byte{2}, valid[1:]...), "unknown encoding version 2"},
		"unknown flags":     {append([]byte{1, 0x82}, valid[2:]...), "unknown flags"},
		"trailing bytes":    {append(append([]byte{}, valid...), 0), "1 trailing bytes"},
		"varint overflow":   {append([]byte{1, 0}, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01), "bad varint for index"},
		"data too long":     {[]byte{1, 0, 1, 1, 0, 5, 'a'}, "data length 5 exceeds"},
		"ext too long":      {[]byte{1, 0, 1, 1, 0, 0, 9}, "extensions length 9 exceeds"},
		"nanos out of rng":  {[]byte{1, 1, 1, 1, 0, 0, 0, 2, 0x80, 0x94, 0xeb, 0xdc, 0x03}, "nanoseconds 1000000000 out of range"},
		"zero time flagged": {zeroTimeFlagged, "zero time"},
		"missing seconds":   {[]byte{1, 1, 1, 1, 0, 0, 0}, "bad varint for appended_at seconds"},
	}
	for i := range valid {
		cases[fmt.Sprintf("truncated at %d", i)] = struct {
			in     []byte
			reason string
		}{valid[:i], ""}
	}
	for name, tc := range cases {
		l := raft.Log{Index: 99, Data: []byte("stale")}
		err := decodeLog(tc.in, &l)
		var ce *CorruptError
		if !errors.Is(err, ErrCorrupt) || !errors.As(err, &ce) {
			t.Errorf("%s: error = %v, want *CorruptError", name, err)
			continue
		}
		if !strings.Contains(ce.Error(), tc.reason) {
			t.Errorf("%s: error = %q, want it to mention %q", name, ce.Error(), tc.reason)
		}
		if l.Index != 0 || l.Data != nil {
			t.Errorf("%s: entry not zeroed on error: %+v", name, l)
		}
	}
}

func varintBytes(v int64) []byte {
	b := make([]byte, 10)
	n := 0
	ux := uint64(v) << 1
	if v < 0 {
		ux = ^ux
	}
	for ux >= 0x80 {
		b[n] = byte(ux) | 0x80
		ux >>= 7
		n++
	}
	b[n] = byte(ux)
	return b[:n+1]
}

func TestCorruptErrorText(t *testing.T) {
	e := &CorruptError{Index: 5, Offset: 3, Reason: "bad"}
	if got, want := e.Error(), "raftlog: corrupt data in log entry 5 at byte 3: bad"; got != want {
		t.Fatalf("Error() = %q, want %q", got, want)
	}
	e = &CorruptError{Offset: -1, Reason: "bad"}
	if got, want := e.Error(), "raftlog: corrupt data: bad"; got != want {
		t.Fatalf("Error() = %q, want %q", got, want)
	}
}

// FuzzDecodeLog checks that decoding arbitrary bytes never panics, fails
// only with a *CorruptError, and that anything it accepts re-encodes to an
// entry that decodes to the same value.
func FuzzDecodeLog(f *testing.F) {
	for _, l := range codecSamples() {
		f.Add(encode(l))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		var l raft.Log
		err := decodeLog(in, &l)
		if err != nil {
			var ce *CorruptError
			if !errors.As(err, &ce) || !errors.Is(err, ErrCorrupt) {
				t.Fatalf("decode error %v (%T) is not a *CorruptError", err, err)
			}
			if ce.Offset > len(in) {
				t.Fatalf("error offset %d beyond input length %d", ce.Offset, len(in))
			}
			return
		}
		if len(l.Data) > len(in) || len(l.Extensions) > len(in) {
			t.Fatalf("decoded more bytes than the input holds")
		}
		enc := encode(&l)
		var again raft.Log
		if err := decodeLog(enc, &again); err != nil {
			t.Fatalf("re-encoded entry does not decode: %v", err)
		}
		if !logsEqual(&l, &again) {
			t.Fatalf("re-encode changed the entry: %+v vs %+v", l, again)
		}
		if len(enc) > len(in) {
			t.Fatalf("canonical encoding (%d bytes) longer than accepted input (%d bytes)", len(enc), len(in))
		}
	})
}

func TestKeyspaces(t *testing.T) {
	if metaLayoutKey[0] != metaPrefix {
		t.Fatal("metadata keys are outside the metadata keyspace")
	}
	if logLowerBound[0] != logPrefix || logUpperBound[0] != logPrefix+1 || stablePrefix != logPrefix+1 {
		t.Fatal("log bounds do not cover exactly the log keyspace")
	}
	if k := logKey(0x0102030405060708); string(k) != "\x01\x01\x02\x03\x04\x05\x06\x07\x08" {
		t.Fatalf("logKey = %x, want prefix + big-endian index", k)
	}
	if k := stableKey([]byte("CurrentTerm")); string(k) != "\x02CurrentTerm" {
		t.Fatalf("stableKey = %q", k)
	}
}
