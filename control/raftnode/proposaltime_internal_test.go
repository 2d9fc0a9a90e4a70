package raftnode

import (
	"errors"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// checkProposalTime reads proposed_at_ms from a command's bytes (a peer's,
// forwarded) without decoding it: it agrees with the decoded command on
// every input that decodes, and never panics on the others.
func FuzzCheckProposalTime(f *testing.F) {
	now := time.UnixMilli(1_800_000_000_000)
	for _, cmd := range []*statev1.Command{
		{RequestId: "r", ProposedAtMs: now.UnixMilli(), Op: &statev1.Command_Noop{Noop: &statev1.Noop{}}},
		{RequestId: "r", ProposedAtMs: now.Add(2 * time.Minute).UnixMilli()},
		{ProposedAtMs: now.Add(-time.Hour).UnixMilli(), Op: &statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "a", Login: "a"}}}},
		{RequestId: "only an id"},
	} {
		b, err := proto.Marshal(cmd)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte{0x10})       // proposed_at_ms's tag, no value
	f.Add([]byte{0x10, 0xff}) // a truncated varint
	f.Fuzz(func(t *testing.T, data []byte) {
		err := checkProposalTime(data, now)
		if err != nil && !errors.Is(err, ErrClockSkew) {
			t.Fatalf("an error other than ErrClockSkew: %v", err)
		}
		var cmd statev1.Command
		if proto.Unmarshal(data, &cmd) != nil {
			return
		}
		at := time.UnixMilli(cmd.GetProposedAtMs())
		skewed := cmd.GetProposedAtMs() != 0 && (at.Sub(now) > MaxProposalSkew || at.Sub(now) < -MaxProposalSkew)
		if (err != nil) != skewed {
			t.Fatalf("proposed_at_ms %d (%v from now): refused %v, want %v", cmd.GetProposedAtMs(), at.Sub(now), err != nil, skewed)
		}
	})
}
