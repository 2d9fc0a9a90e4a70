package api

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/auth"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// Activity goes to the log in commands of at most the batch size the
// state machine takes (a larger one it refuses whole), and the users of a
// batch that failed, and of those not tried after it, are written with
// the next flush rather than forgotten.
func TestActivityIsWrittenInBoundedBatchesAndRetried(t *testing.T) {
	th := newActivityThrottle(time.Minute)
	th.batch = 3
	now := time.Unix(1_000_000, 0)
	var all []string
	for i := range 8 {
		id := fmt.Sprintf("u%d", i)
		all = append(all, id)
		th.touch(id, now)
	}
	var written []string
	batches, failOn := 0, 2
	apply := func(_ context.Context, es []*statev1.Activity) error {
		batches++
		if len(es) > th.batch {
			t.Fatalf("a command of %d users, at most %d", len(es), th.batch)
		}
		if batches == failOn {
			return errors.New("no leader")
		}
		for _, e := range es {
			if e.GetSeenAtMs() != now.UnixMilli() {
				t.Fatalf("%s seen at %d, want %d", e.GetUserId(), e.GetSeenAtMs(), now.UnixMilli())
			}
			written = append(written, e.GetUserId())
		}
		return nil
	}
	th.flush(context.Background(), now, apply)
	if batches != 2 || len(written) != 3 {
		t.Fatalf("first flush: %d commands, %d users written; want 2 (the second failing) and 3", batches, len(written))
	}
	th.flush(context.Background(), now, apply)
	slices.Sort(written)
	if !slices.Equal(written, all) {
		t.Fatalf("written after the retry: %v, want %v", written, all)
	}
	th.flush(context.Background(), now, func(context.Context, []*statev1.Activity) error {
		t.Fatal("a third flush wrote again what was written")
		return nil
	})
}

// A new password's hash waits for one of the node's hashing slots, as a
// login's check does: a burst of password changes cannot take more
// memory and cores than the node has slots.
func TestPasswordHashesWaitForASlot(t *testing.T) {
	a := &Authenticator{cfg: AuthConfig{Password: auth.TestParams}, hashSlots: make(chan struct{}, 1)}
	a.hashSlots <- struct{}{} // the one slot is taken
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := a.hashPassword(ctx, "a password of some length"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("hashing with no free slot: %v, want to wait until the context ends", err)
	}
	<-a.hashSlots
	h, err := a.hashPassword(context.Background(), "a password of some length")
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := auth.VerifyPassword(h, "a password of some length"); !ok || err != nil {
		t.Fatalf("the hash does not verify: %v %v", ok, err)
	}
	if len(a.hashSlots) != 0 {
		t.Fatal("the slot was not given back")
	}
}
