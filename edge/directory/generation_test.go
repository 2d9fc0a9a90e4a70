package directory_test

import (
	"testing"

	"github.com/edge-relay/relay/edge/directory"
	"github.com/edge-relay/relay/edge/session"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
)

// Sessions keep the directory's answers while its generation stays the
// same (session.Directory): it must move with every message that can
// change what LookupDevice, UserActive or UserDevices answer, live or
// as part of a full copy, and before those answers can be read.
func TestGenerationMovesWithEveryChange(t *testing.T) {
	d := directory.New(directory.Config{Ring: session.NewRing()})
	gen := d.Generation()
	if gen == 0 {
		t.Fatal("generation 0 says changes are not tracked")
	}
	rev := uint64(0)
	apply := func(what string, m *edgev1.WatchResponse, check func() bool) {
		t.Helper()
		rev++
		m.Revision = rev
		d.Apply(m)
		if g := d.Generation(); g <= gen {
			t.Fatalf("%s: generation %d, was %d", what, g, gen)
		} else {
			gen = g
		}
		if !check() {
			t.Fatalf("%s: not applied", what)
		}
	}
	event := func(ev *edgev1.WatchEvent) *edgev1.WatchResponse {
		return &edgev1.WatchResponse{Kind: &edgev1.WatchResponse_Event{Event: ev}}
	}
	userPut := func(id string, active bool) *edgev1.WatchResponse {
		return event(&edgev1.WatchEvent{Kind: &edgev1.WatchEvent_UserPut{UserPut: &edgev1.UserState{Id: id, Active: active}}})
	}
	devicePut := func(id string, revoked bool) *edgev1.WatchResponse {
		return event(&edgev1.WatchEvent{Kind: &edgev1.WatchEvent_DevicePut{DevicePut: &edgev1.DeviceState{Id: id, UserId: "u1", Revoked: revoked}}})
	}
	state := func(id string) session.DeviceState { return d.LookupDevice(id).State }

	apply("a full copy begins", &edgev1.WatchResponse{Kind: &edgev1.WatchResponse_Resync{Resync: &edgev1.Resync{}}}, func() bool { return true })
	apply("a user in the copy", userPut("u1", true), func() bool { return true })
	apply("a device in the copy", devicePut("d1", false), func() bool { return true })
	apply("the copy in place", &edgev1.WatchResponse{Kind: &edgev1.WatchResponse_SnapshotDone{SnapshotDone: &edgev1.SnapshotDone{}}},
		func() bool { return d.UserActive("u1") && state("d1") == session.DeviceActive })
	apply("a new device", devicePut("d2", false), func() bool { return len(d.UserDevices("u1")) == 2 })
	apply("a revocation", devicePut("d2", true), func() bool { return state("d2") == session.DeviceRevoked })
	apply("a deletion", event(&edgev1.WatchEvent{Kind: &edgev1.WatchEvent_DeviceDeleted{DeviceDeleted: &edgev1.DeviceState{Id: "d2", UserId: "u1"}}}),
		func() bool { return state("d2") == session.DeviceDeleted })
	apply("a user disabled", userPut("u1", false), func() bool { return !d.UserActive("u1") })
	apply("a user deleted", event(&edgev1.WatchEvent{Kind: &edgev1.WatchEvent_UserDeleted{UserDeleted: "u1"}}), func() bool { return !d.UserActive("u1") })
	// During a later full copy the current one answers; a deletion in
	// the new copy still moves the generation (it leaves a tombstone at
	// once), and the copy in place answers with it.
	apply("another full copy begins", &edgev1.WatchResponse{Kind: &edgev1.WatchResponse_Resync{Resync: &edgev1.Resync{}}}, func() bool { return true })
	apply("a deletion in the copy", event(&edgev1.WatchEvent{Kind: &edgev1.WatchEvent_DeviceDeleted{DeviceDeleted: &edgev1.DeviceState{Id: "d1", UserId: "u1"}}}),
		func() bool { return state("d1") == session.DeviceActive })
	apply("the second copy in place", &edgev1.WatchResponse{Kind: &edgev1.WatchResponse_SnapshotDone{SnapshotDone: &edgev1.SnapshotDone{}}},
		func() bool { return state("d1") == session.DeviceDeleted })
}
