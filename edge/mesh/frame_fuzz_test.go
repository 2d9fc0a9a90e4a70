package mesh

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"testing"

	"google.golang.org/protobuf/proto"

	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
)

// FuzzReadFrame reads a link's bytes as the mesh does, frame after frame
// until the first error. Whatever a peer sends, the reader does not
// panic, holds a buffer sized by the bytes that came rather than by the
// lengths declared, and each frame it accepts survives being written and
// read again unchanged (what an edge relays on is what it read).
func FuzzReadFrame(f *testing.F) {
	seeds := []*edgev1.MeshFrame{
		{Kind: &edgev1.MeshFrame_Hello{Hello: &edgev1.MeshHello{}}},
		{Kind: &edgev1.MeshFrame_PresenceSet{PresenceSet: &edgev1.PresenceSet{}}},
		{Kind: &edgev1.MeshFrame_PresenceDelta{PresenceDelta: &edgev1.PresenceDelta{}}},
		{Kind: &edgev1.MeshFrame_Forward{Forward: &edgev1.Forward{DeviceId: "d_1", Event: []byte("event")}}},
		{Kind: &edgev1.MeshFrame_ForwardResult{ForwardResult: &edgev1.ForwardResult{}}},
		{Kind: &edgev1.MeshFrame_Status{Status: &edgev1.MeshStatus{ControlHeard: true}}},
	}
	var all bytes.Buffer
	for _, s := range seeds {
		var one bytes.Buffer
		if _, err := writeFrame(&one, nil, s); err != nil {
			f.Fatal(err)
		}
		f.Add(one.Bytes())
		all.Write(one.Bytes())
	}
	f.Add(all.Bytes())
	f.Add(binary.AppendUvarint(nil, maxFrame))                                      // the largest frame declared, none of it sent
	f.Add(binary.AppendUvarint(nil, maxFrame+1))                                    // one byte more than a frame may be
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}) // a uvarint overflow
	f.Add(append(binary.AppendUvarint(nil, 3), 0x0a, 0x05, 0x00))                   // a field longer than its frame
	f.Fuzz(func(t *testing.T, wire []byte) {
		r := bufio.NewReader(bytes.NewReader(wire))
		var buf []byte
		for {
			var got edgev1.MeshFrame
			var err error
			buf, err = readFrame(r, buf, &got)
			// The buffer grows at most to twice what arrived, plus the
			// reader's first step and the allocator's rounding.
			if limit := 2*len(wire) + 16<<10; cap(buf) > limit {
				t.Fatalf("%d bytes arrived and the reader holds %d", len(wire), cap(buf))
			}
			if err != nil {
				return
			}
			var again bytes.Buffer
			if _, err := writeFrame(&again, nil, &got); err != nil {
				t.Fatalf("a frame that was read does not write: %v", err)
			}
			var back edgev1.MeshFrame
			if _, err := readFrame(bufio.NewReader(&again), nil, &back); err != nil {
				t.Fatalf("a frame written from one that was read does not read back: %v", err)
			}
			if !proto.Equal(&got, &back) {
				t.Fatalf("a frame changed through a write and a read:\n%v\n%v", &got, &back)
			}
		}
	})
}
