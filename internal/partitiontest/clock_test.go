package partitiontest

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/internal/relaytest"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// A device whose clock jumps after its handshake (the Go client has no
// clock to move, so the sender here is a raw connection stamping events
// with its own jumped clock). Jumps within the edge's skew tolerance are
// absorbed: the events are acknowledged and delivered once each; a jump
// forward beyond it is refused with CREATED_IN_FUTURE, a jump backward
// past the TTL with EXPIRED, and nothing refused is ever delivered.
// Nothing is delivered after its expiry (created, or now if earlier,
// plus TTL plus the tolerance). The jumps come in an order drawn from
// the seed.
func TestClientClockJumps(t *testing.T) {
	seed, _, _ := chaosConfig(t, 0)
	const skew, ttl = 2 * time.Second, 5 * time.Second
	s := relaytest.StartSystem(t, relaytest.SystemOptions{Relayd: relayd, ControlNodes: 1, Edges: 1,
		EdgeArgs: func(int) []string { return []string{"--skew-tolerance", skew.String()} }})
	user := s.User("frank")
	snd, rcv := s.Device(user, "sender"), s.Device(user, "receiver")
	cr := mustDial(t, s, 0, rcv, nil)
	tr := newTraffic()
	tr.receive(cr, rcv.ID)

	raw := relaytest.DialRaw(t, s.Edges[0].Addr(), client.QUIC)
	raw.Login(relaytest.Device{ID: snd.ID, UserID: snd.UserID, Key: snd.Key})

	type jump struct {
		by   time.Duration
		want relayv1.ErrorCode // UNSPECIFIED: acknowledged
	}
	jumps := []jump{
		{0, 0},
		{skew / 2, 0},
		{-skew / 2, 0},
		{5 * skew, relayv1.ErrorCode_ERROR_CODE_CREATED_IN_FUTURE},
		{-(ttl + 2*skew), relayv1.ErrorCode_ERROR_CODE_EXPIRED},
	}
	rng := rand.New(rand.NewPCG(seed, 3<<32))
	rng.Shuffle(len(jumps), func(i, j int) { jumps[i], jumps[j] = jumps[j], jumps[i] })
	seq := uint64(0)
	for _, j := range jumps {
		t.Logf("sender's clock jumps to %+v", j.by)
		for i := range 5 {
			seq++
			id := fmt.Sprintf("jump%v-%d", j.by, i)
			created := time.Now().Add(j.by)
			ev := &relayv1.Event{Id: id, SenderDeviceId: snd.ID, Targets: []string{rcv.ID}, Seq: seq,
				CreatedAtMs: created.UnixMilli(), TtlMs: ttl.Milliseconds(), Type: "t"}
			// The edge lets it live until min(created, now) + TTL + the
			// tolerance.
			tr.log.Sending(snd.ID, id, []string{rcv.ID}, ttl+skew+min(0, j.by))
			if err := raw.Send(&relayv1.Frame{Kind: &relayv1.Frame_Event{Event: ev}}); err != nil {
				t.Fatal(err)
			}
			got := waitOutcome(t, raw, id)
			if got != j.want {
				t.Fatalf("event sent with the clock %+v off: %v, want %v", j.by, got, j.want)
			}
			if got == 0 {
				tr.log.Acked(id)
			} else {
				tr.log.Refused(id)
			}
		}
	}
	tr.finish(t, 30*time.Second, cr)
}

// waitOutcome reads frames until the edge acknowledges or rejects id:
// 0 for an Ack, the code of a Reject.
func waitOutcome(t *testing.T, raw *relaytest.Raw, id string) relayv1.ErrorCode {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		f, err := raw.Next(time.Until(deadline))
		if err != nil {
			t.Fatalf("waiting for the outcome of %s: %v", id, err)
		}
		switch {
		case f.GetAck().GetEventId() == id:
			return 0
		case f.GetReject().GetEventId() == id:
			return f.GetReject().GetCode()
		case f.GetPing() != nil:
			_ = raw.Send(&relayv1.Frame{Kind: &relayv1.Frame_Pong{Pong: &relayv1.Pong{}}})
		}
	}
	t.Fatalf("no outcome for %s", id)
	return 0
}
