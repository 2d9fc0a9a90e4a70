package api_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
)

func anyOneEntry(uid, did, id string, size int, expires time.Time) *edgev1.MailboxEntry {
	e := entry(uid, did, id, size, expires)
	e.AnyOne = true
	return e
}

func claimOf(uid, did, id string, expires time.Time) *edgev1.EventClaim {
	return &edgev1.EventClaim{UserId: uid, DeviceId: did, SenderDeviceId: "sender", EventId: id, ExpiresAtMs: expires.UnixMilli()}
}

func claimEvents(t *testing.T, cl edgev1connect.MailboxServiceClient, claims ...*edgev1.EventClaim) *edgev1.ClaimEventsResponse {
	t.Helper()
	resp, err := cl.ClaimEvents(ctxT(t, 20*time.Second), connect.NewRequest(&edgev1.ClaimEventsRequest{Claims: claims}))
	if err != nil {
		t.Fatal(err)
	}
	if resp.Msg.GetRevision() == 0 || len(resp.Msg.GetWon()) != len(claims) {
		t.Fatalf("claim answer %v for %d claims", resp.Msg, len(claims))
	}
	return resp.Msg
}

func wonList(r *edgev1.ClaimEventsResponse) string {
	return strings.Trim(fmt.Sprint(r.GetWon()), "[]")
}

// anyOneIDs renders entries as "seq:id", with a '*' for any_one ones.
func anyOneIDs(entries []*edgev1.MailboxEntry) string {
	var out []string
	for _, e := range entries {
		s := fmt.Sprintf("%d:%s", e.GetSeq(), e.GetEventId())
		if e.GetAnyOne() {
			s += "*"
		}
		out = append(out, s)
	}
	return strings.Join(out, " ")
}

// The first claim wins and, in the same revision on every replica,
// deletes the event from the other devices' mailboxes; later claims by
// others lose, the winner's retry wins, dead or foreign devices lose;
// any_one round-trips; malformed claims name the field.
func TestClaimEventsThroughTheAPI(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	mailboxUsers(t, c)
	if _, err := c.RegisterDevice(ctxT(t, 20*time.Second), 0, "alice", "a3"); err != nil {
		t.Fatal(err)
	}
	putter, claimer, reader := mailboxClients(t, c, c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE))
	hour := time.Now().Add(time.Hour)

	r := put(t, putter,
		anyOneEntry("alice", "a1", "call", 10, hour),
		anyOneEntry("alice", "a2", "call", 20, hour),
		anyOneEntry("alice", "a3", "call", 30, hour),
		entry("alice", "a2", "plain", 5, hour),
		anyOneEntry("alice", "a2", "task", 7, hour),
	)
	if got := results(r); got != "STORED/1 STORED/1 STORED/1 STORED/2 STORED/3" {
		t.Fatal(got)
	}
	if got, _ := fetch(t, reader, "a2", 0, 0); anyOneIDs(got) != "1:call* 2:plain 3:task*" {
		t.Fatalf("any_one did not round-trip: %s", anyOneIDs(got))
	}

	first := claimEvents(t, claimer, claimOf("alice", "a1", "call", hour))
	if wonList(first) != "true" {
		t.Fatalf("first claim: %s", wonList(first))
	}
	// Every replica, at the claim's revision, has the decision and has
	// deleted a2's and a3's entries of the event (counters too); a1 keeps
	// its own entry, a2 its other events.
	ctx := ctxT(t, 30*time.Second)
	for _, n := range c.Running() {
		f := n.Server.Node().FSM()
		if err := f.WaitApplied(ctx, first.GetRevision()); err != nil {
			t.Fatal(err)
		}
		if cl, err := f.Claim("sender", "call"); err != nil || cl.GetDeviceId() != "a1" {
			t.Fatalf("%s: claim record %v, %v", n.ID, cl, err)
		}
		for did, want := range map[string][2]uint64{"a1": {1, 10}, "a2": {2, 12}, "a3": {0, 0}} {
			mb, err := f.Mailbox(did)
			if err != nil || mb.GetCount() != want[0] || mb.GetBytes() != want[1] {
				t.Fatalf("%s: %s counters %v (%v), want count/bytes %v", n.ID, did, mb, err, want)
			}
		}
	}
	for did, want := range map[string]string{"a1": "1:call*", "a2": "2:plain 3:task*", "a3": ""} {
		if got, _ := fetch(t, reader, did, 0, 0); anyOneIDs(got) != want {
			t.Fatalf("%s after the claim: %q, want %q", did, anyOneIDs(got), want)
		}
	}

	// Another device loses, the winner's retry wins, and devices that are
	// revoked, another user's or missing lose without deciding anything.
	later := claimEvents(t, claimer,
		claimOf("alice", "a2", "call", hour),
		claimOf("alice", "a1", "call", hour),
		claimOf("alice", "r1", "task", hour),
		claimOf("alice", "b1", "task", hour),
		claimOf("alice", "nope", "task", hour),
	)
	if got := wonList(later); got != "false true false false false" {
		t.Fatalf("later claims: %s", got)
	}
	if got, _ := fetch(t, reader, "a2", 0, 0); anyOneIDs(got) != "2:plain 3:task*" {
		t.Fatalf("losing claims deleted entries: %s", anyOneIDs(got))
	}
	if got := wonList(claimEvents(t, putter, claimOf("alice", "a2", "task", hour), claimOf("alice", "a3", "task", hour))); got != "true false" {
		t.Fatalf("task: %s", got)
	}

	for _, tc := range []struct {
		name   string
		claims []*edgev1.EventClaim
		field  string
	}{
		{"no claims", nil, "claims"},
		{"too many claims", make([]*edgev1.EventClaim, fsm.MaxClaimBatch+1), "claims"},
		{"without event id", []*edgev1.EventClaim{claimOf("alice", "a1", "x", hour), claimOf("alice", "a1", "", hour)}, "claims[1].event_id"},
		{"without sender", []*edgev1.EventClaim{{UserId: "alice", DeviceId: "a1", EventId: "x", ExpiresAtMs: hour.UnixMilli()}}, "claims[0].sender_device_id"},
		{"bad device id", []*edgev1.EventClaim{claimOf("alice", "a 1", "x", hour)}, "claims[0].device_id"},
		{"without user", []*edgev1.EventClaim{claimOf("", "a1", "x", hour)}, "claims[0].user_id"},
		{"without expiry", []*edgev1.EventClaim{{UserId: "alice", DeviceId: "a1", SenderDeviceId: "sender", EventId: "x"}}, "claims[0].expires_at_ms"},
		{"expiry in two years", []*edgev1.EventClaim{claimOf("alice", "a1", "x", time.Now().Add(2*365*24*time.Hour))}, "claims[0].expires_at_ms"},
	} {
		_, err := claimer.ClaimEvents(ctx, connect.NewRequest(&edgev1.ClaimEventsRequest{Claims: tc.claims}))
		if connect.CodeOf(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("%s: %v, want InvalidArgument naming %s", tc.name, err, tc.field)
		}
	}
	c.WaitConverged()
	for _, n := range c.Running() {
		if _, err := n.Server.Node().FSM().Claim("sender", "x"); !errors.Is(err, fsm.ErrNotFound) {
			t.Fatalf("%s: a refused call recorded a claim: %v", n.ID, err)
		}
	}
}

// A claim's record outlives its event by ClaimRecordGrace: another
// device's claim that comes after the event expired, and after the
// leader's expiry removed what expired with it, still loses.
func TestALateClaimFindsWhoTookTheEvent(t *testing.T) {
	c, cl := expiryClusterWith(t, time.Hour)
	// The claims go to a follower, which writes record_grace_ms only once
	// it sees every member record the feature (registered as the nodes
	// start): without it a claim's record expires with its event.
	c.WaitFeature(fsm.FeatureClaimRecordGrace)
	soon := time.Now().Add(700 * time.Millisecond)
	if got := wonList(claimEvents(t, cl, claimOf("alice", "a1", "call", soon))); got != "true" {
		t.Fatal(got)
	}
	put(t, cl, entry("alice", "a2", "same-time", 10, soon))
	clustertest.Eventually(t, 20*time.Second, func() error {
		for _, n := range c.Running() {
			if mb, err := n.Server.Node().FSM().Mailbox("a2"); err != nil || mb.GetCount() != 0 {
				return fmt.Errorf("%s: the entry that expired with the event is still there: %v, %v", n.ID, mb, err)
			}
		}
		return nil
	})
	if got := wonList(claimEvents(t, cl, claimOf("alice", "a2", "call", soon))); got != "false" {
		t.Fatalf("a late claim of another device: %s, want lost", got)
	}
}

// Claim records expire by the leader's ExpireMailboxes on every replica,
// ClaimRecordGrace (300 ms here) after their event.
func TestClaimExpiryOnEveryReplica(t *testing.T) {
	c, cl := expiryCluster(t)
	soon, hour := time.Now().Add(700*time.Millisecond), time.Now().Add(time.Hour)
	if got := wonList(claimEvents(t, cl, claimOf("alice", "a1", "soon", soon), claimOf("alice", "a1", "later", hour))); got != "true true" {
		t.Fatal(got)
	}
	clustertest.Eventually(t, 20*time.Second, func() error {
		for _, n := range c.Running() {
			f := n.Server.Node().FSM()
			if _, err := f.Claim("sender", "soon"); !errors.Is(err, fsm.ErrNotFound) {
				return fmt.Errorf("%s: claim of soon: %v", n.ID, err)
			}
			if _, err := f.Claim("sender", "later"); err != nil {
				return fmt.Errorf("%s: claim of later: %v", n.ID, err)
			}
			if due, _ := f.MailboxExpiryDue(time.Now().UnixMilli(), true); due {
				return fmt.Errorf("%s: expiry still due", n.ID)
			}
		}
		return nil
	})
	// Removed, the record no longer decides the event.
	if got := wonList(claimEvents(t, cl, claimOf("alice", "a2", "soon", hour), claimOf("alice", "a2", "later", hour))); got != "true false" {
		t.Fatalf("after expiry: %s", got)
	}
	c.WaitConverged()
}
