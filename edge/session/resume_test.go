package session

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/edge-relay/relay/edge/proof"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// A ticket resumes only with a fresh proof of the device's key: a
// stolen ticket, an old or reused proof, or one signed by another key
// gets the challenge instead, saying why.
func TestResumeNeedsAFreshProof(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.ResumeWindow = 30 * time.Second })
	e.device("u1", "d1")
	ticket := e.online("d1").welcome.GetResumeTicket()
	_, otherKey, _ := ed25519.GenerateKey(rand.Reader)

	refused := func(t *testing.T, h *relayv1.Hello) {
		t.Helper()
		d := e.connect("d1")
		d.send(&relayv1.Frame{Kind: &relayv1.Frame_Hello{Hello: h}})
		ch := d.readDirect().GetChallenge()
		if ch == nil || ch.GetTicketError() != relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED {
			t.Fatalf("want a challenge refusing the ticket, got %v", ch)
		}
	}
	proven := func(mod func(*relayv1.Hello)) *relayv1.Hello {
		h := &relayv1.Hello{UserId: "u1", DeviceId: "d1", ProtocolVersion: proof.ProtocolVersion, ClientTimeMs: time.Now().UnixMilli(), ResumeTicket: ticket}
		if mod != nil {
			mod(h)
		}
		proveResume(h, e.keys["d1"])
		return h
	}
	t.Run("no proof", func(t *testing.T) {
		d := e.connect("d1")
		refused(t, d.helloUnproven(ticket).GetHello())
	})
	t.Run("another key", func(t *testing.T) {
		h := proven(nil)
		proveResume(h, otherKey)
		refused(t, h)
	})
	t.Run("proof of another ticket", func(t *testing.T) {
		h := proven(nil)
		h.ResumeTicket = bytes.Clone(ticket)
		h.ResumeTicket[len(h.ResumeTicket)-1] ^= 1
		refused(t, h) // the ticket no longer opens either; both are refused
	})
	t.Run("client time a minute off", func(t *testing.T) {
		refused(t, proven(func(h *relayv1.Hello) { h.ClientTimeMs -= 60000 }))
		refused(t, proven(func(h *relayv1.Hello) { h.ClientTimeMs += 60000 }))
	})
	t.Run("nonce of the wrong size", func(t *testing.T) {
		h := proven(nil)
		h.ResumeNonce = h.ResumeNonce[:8]
		h.ResumeProof = proof.ResumeTranscript{UserID: "u1", DeviceID: "d1", ProtocolVersion: proof.ProtocolVersion, ClientTimeMs: h.GetClientTimeMs(),
			Nonce: h.ResumeNonce, Ticket: ticket}.Sign(e.keys["d1"])
		refused(t, h)
	})
	t.Run("used once", func(t *testing.T) {
		h := proven(nil)
		d := e.connect("d1")
		d.send(&relayv1.Frame{Kind: &relayv1.Frame_Hello{Hello: h}})
		if w := d.readDirect().GetWelcome(); !w.GetResumed() {
			t.Fatalf("first use: %v", w)
		}
		refused(t, h)
	})
}

// An edge's replay cache dies with its process. A resume Hello captured
// on its way to an edge (by a TLS-terminating proxy, say) and replayed
// after the edge restarted is refused all the same: its proof was signed
// before the new process started. A device that resumes afresh gets in,
// and one whose proof is stamped a moment before the start (its clock
// offset a little behind) gets in with a full handshake.
func TestRestartedEdgeRefusesResumeProofsSignedBeforeItStarted(t *testing.T) {
	e := newEnv(t, nil)
	e.device("u1", "d1")
	ticket := e.online("d1").welcome.GetResumeTicket()

	d := e.connect("d1")
	captured := d.hello(ticket)
	d.send(captured)
	if w := d.readDirect().GetWelcome(); !w.GetResumed() {
		t.Fatalf("first use of the proof: want a resumed welcome, got %v", w)
	}
	d.startReading() // takes the GOING_AWAY of the drain below

	// The edge stops and starts again: the same id, ring and directory, a
	// hub of its own. Its clock is a second on from the old one's, so its
	// start is past the captured proof's millisecond whatever the speed
	// of this machine.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.hub.Drain(ctx, 0); err != nil {
		t.Fatal(err)
	}
	restarted := e.otherEdge("edge-test", func(c *Config) {
		c.Now = func() time.Time { return time.Now().Add(time.Second) }
	})
	resume := func(h *relayv1.Hello) (*dev, *relayv1.Frame) {
		t.Helper()
		d := restarted.connect("d1")
		d.send(&relayv1.Frame{Kind: &relayv1.Frame_Hello{Hello: h}})
		return d, d.readDirect()
	}

	if _, f := resume(captured.GetHello()); f.GetChallenge().GetTicketError() != relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED {
		t.Fatalf("replayed after the restart: want a challenge refusing the ticket (AUTH_FAILED), got %v", f)
	}

	fresh := &relayv1.Hello{UserId: "u1", DeviceId: "d1", ProtocolVersion: proof.ProtocolVersion,
		ClientTimeMs: restarted.hub.cfg.Now().UnixMilli(), ResumeTicket: ticket}
	proveResume(fresh, e.keys["d1"])
	if _, f := resume(fresh); !f.GetWelcome().GetResumed() {
		t.Fatalf("fresh proof after the restart: want a resumed welcome, got %v", f)
	}

	early := &relayv1.Hello{UserId: "u1", DeviceId: "d1", ProtocolVersion: proof.ProtocolVersion,
		ClientTimeMs: restarted.hub.started.UnixMilli() - 1, ResumeTicket: ticket}
	proveResume(early, e.keys["d1"])
	d, f := resume(early)
	ch := f.GetChallenge()
	if ch.GetTicketError() != relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED {
		t.Fatalf("proof stamped just before the start: want a challenge refusing the ticket, got %v", f)
	}
	d.answer(early, ch)
	if w := d.readDirect().GetWelcome(); w == nil || w.GetResumed() {
		t.Fatalf("full handshake after the refused proof: want a welcome, not resumed; got %v", w)
	}
}

// The replay cache never forgets a proof early: full, it refuses.
func TestReplayCacheIsBounded(t *testing.T) {
	c := newReplayCache(2)
	now := time.Unix(1000, 0)
	exp := now.Add(time.Minute)
	if !c.first("d", "a", exp, now) || !c.first("d", "b", exp, now) {
		t.Fatal("fresh keys refused")
	}
	if c.first("d", "a", exp, now) {
		t.Fatal("a repeated key was taken")
	}
	if c.first("d", "c", exp, now) {
		t.Fatal("a full cache took a key (it would have to forget one)")
	}
	later := exp.Add(time.Second)
	if !c.first("d", "c", later.Add(time.Minute), later) || !c.first("d", "a", later.Add(time.Minute), later) {
		t.Fatal("expired entries were not let go")
	}
	if c.size() != 2 {
		t.Fatalf("size %d", c.size())
	}
}

// One device cannot take more than its share of the cache: its proofs
// beyond it are refused (a full handshake instead) while other devices'
// are taken, and its places come back as its proofs expire. The same
// nonce of two devices is two proofs.
func TestReplayCacheSharesPlacesAmongDevices(t *testing.T) {
	c := newReplayCache(100)
	c.perOwner = 3
	now := time.Unix(1000, 0)
	exp := now.Add(time.Minute)
	for i := range 3 {
		if !c.first("greedy", fmt.Sprint(i), exp, now) {
			t.Fatalf("proof %d of the device refused", i)
		}
	}
	if c.first("greedy", "3", exp, now) {
		t.Fatal("a device took more than its share")
	}
	if !c.first("other", "0", exp, now) {
		t.Fatal("another device's proof refused (with the first's nonce)")
	}
	later := exp.Add(time.Second)
	if !c.first("greedy", "3", later.Add(time.Minute), later) {
		t.Fatal("the device's places did not come back when its proofs expired")
	}
}

// A failed proof costs the same whether the device exists or not: one
// signature check, over a transcript of the same size, with a key of the
// same size, and the same answer byte for byte. (150-200 us more for an
// existing device used to tell device ids apart.)
func TestFailedProofsLookAlike(t *testing.T) {
	type call struct{ pubLen, msgLen int }
	var mu sync.Mutex
	var calls []call
	e := newEnv(t, func(c *Config) {
		c.verify = func(pub, msg, sig []byte) bool {
			mu.Lock()
			calls = append(calls, call{len(pub), len(msg)})
			mu.Unlock()
			return verifyEd25519(pub, msg, sig)
		}
	})
	e.device("u1", "dev-1")
	_, wrongKey, _ := ed25519.GenerateKey(rand.Reader)
	attempt := func(device string) ([]call, []byte) {
		t.Helper()
		mu.Lock()
		calls = nil
		mu.Unlock()
		d := e.connect("dev-1")
		h := d.hello(nil)
		h.GetHello().DeviceId = device
		d.send(h)
		ch := d.readDirect().GetChallenge()
		d.send(sign(h.GetHello(), ch, wrongKey))
		cl := d.readDirect().GetClose()
		<-d.serve
		b, _ := marshalDeterministic.Marshal(cl)
		mu.Lock()
		defer mu.Unlock()
		return append([]call(nil), calls...), b
	}
	known, knownClose := attempt("dev-1")
	unknown, unknownClose := attempt("dev-2") // same length, no such device
	if len(known) != 1 || len(unknown) != 1 {
		t.Fatalf("signature checks: %d for a real device, %d for an unknown one; want one each", len(known), len(unknown))
	}
	if known[0] != unknown[0] || known[0].pubLen != ed25519.PublicKeySize {
		t.Fatalf("checks differ: real device %+v, unknown %+v", known[0], unknown[0])
	}
	if !bytes.Equal(knownClose, unknownClose) {
		t.Fatalf("answers differ: %x vs %x", knownClose, unknownClose)
	}
	// The same holds for a resume proof.
	for _, device := range []string{"dev-1", "dev-2"} {
		mu.Lock()
		calls = nil
		mu.Unlock()
		ticket, _ := e.ring.Seal(Ticket{UserID: "u1", DeviceID: device, AuthAt: time.Now(), ExpiresAt: time.Now().Add(time.Hour)})
		d := e.connect("dev-1")
		h := &relayv1.Hello{UserId: "u1", DeviceId: device, ProtocolVersion: proof.ProtocolVersion, ClientTimeMs: time.Now().UnixMilli(), ResumeTicket: ticket}
		proveResume(h, wrongKey)
		d.send(&relayv1.Frame{Kind: &relayv1.Frame_Hello{Hello: h}})
		if ch := d.readDirect().GetChallenge(); ch.GetTicketError() != relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED {
			t.Fatalf("%s: %v", device, ch)
		}
		mu.Lock()
		if len(calls) != 1 || calls[0].pubLen != ed25519.PublicKeySize {
			t.Fatalf("%s: resume proof checks %+v, want one with a full key", device, calls)
		}
		mu.Unlock()
	}
}
