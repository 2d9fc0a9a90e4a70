package session

import (
	"bytes"
	"crypto/ed25519"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/edge-relay/relay/edge/frame"
	"github.com/edge-relay/relay/edge/proof"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// fuzzWorld is a fixed handshake setting: one device with a known key,
// a fixed clock and fixed "randomness", so a seed can carry a valid
// signature.
type fuzzWorld struct {
	dir  *memDir
	ring *Ring
	key  ed25519.PrivateKey
	now  time.Time
}

func newFuzzWorld() fuzzWorld {
	w := fuzzWorld{dir: newMemDir(), ring: NewRing(), now: time.Unix(1_800_000_000, 0)}
	w.key = ed25519.NewKeyFromSeed(bytes.Repeat([]byte{5}, 32))
	w.dir.set(DeviceInfo{ID: "d1", UserID: "u1", PublicKey: w.key.Public().(ed25519.PublicKey), State: DeviceActive})
	w.dir.set(DeviceInfo{ID: "r1", UserID: "u1", PublicKey: w.key.Public().(ed25519.PublicKey), State: DeviceRevoked})
	w.ring.Set("k1", []SessionKey{{ID: "k1", Secret: bytes.Repeat([]byte{1}, 32)}})
	return w
}

func (w fuzzWorld) handshake() *handshake {
	return &handshake{edgeID: "edge-f", dir: w.dir, ring: w.ring, now: func() time.Time { return w.now },
		random: bytes.NewReader(bytes.Repeat([]byte{9}, 1<<10)), maxAge: 24 * time.Hour,
		dummyKey:     ed25519.NewKeyFromSeed(bytes.Repeat([]byte{7}, 32)).Public().(ed25519.PublicKey),
		resumeWindow: 30 * time.Second, replays: newReplayCache(1000), conn: fixedBinding(pipeBinding)}
}

// fixedBinding is a connection with the given channel binding.
type fixedBinding []byte

func (b fixedBinding) ChannelBinding() []byte { return b }
func (b fixedBinding) Transport() string      { return "pipe" }

// nonce is what the fixed randomness yields.
func (w fuzzWorld) nonce() []byte { return bytes.Repeat([]byte{9}, proof.NonceSize) }

func stream(frames ...*relayv1.Frame) []byte {
	var b []byte
	for _, f := range frames {
		b, _ = frame.Append(b, f)
	}
	return b
}

func TestHandshakeStateMachine(t *testing.T) {
	w := newFuzzWorld()
	hello := &relayv1.Hello{UserId: "u1", DeviceId: "d1", ProtocolVersion: proof.ProtocolVersion, ClientTimeMs: 42}
	tr := proof.Transcript{UserID: "u1", DeviceID: "d1", ProtocolVersion: proof.ProtocolVersion, ClientTimeMs: 42, EdgeID: "edge-f",
		Nonce: w.nonce(), ServerTimeMs: w.now.UnixMilli(), Binding: pipeBinding}
	good := &relayv1.Frame{Kind: &relayv1.Frame_Authenticate{Authenticate: &relayv1.Authenticate{Signature: tr.Sign(w.key)}}}
	helloF := &relayv1.Frame{Kind: &relayv1.Frame_Hello{Hello: hello}}

	h := w.handshake()
	out, err := h.step(helloF)
	if err != nil || out.GetChallenge() == nil || !bytes.Equal(out.GetChallenge().GetNonce(), w.nonce()) {
		t.Fatalf("hello: %v %v", out, err)
	}
	if _, err := h.step(good); err != nil || !h.done() || h.resumed {
		t.Fatalf("authenticate: %v", err)
	}
	if _, err := h.step(good); !errors.Is(err, &CloseError{Code: relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME}) {
		t.Fatalf("frame after done: %v", err)
	}
	// A second authenticate before a hello, a hello twice, a revoked
	// device's valid signature: all refused.
	h = w.handshake()
	if _, err := h.step(good); !errors.Is(err, &CloseError{Code: relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME}) {
		t.Fatalf("authenticate first: %v", err)
	}
	h = w.handshake()
	_, _ = h.step(helloF)
	if _, err := h.step(helloF); !errors.Is(err, &CloseError{Code: relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME}) {
		t.Fatalf("hello twice: %v", err)
	}
	h = w.handshake()
	rh := &relayv1.Frame{Kind: &relayv1.Frame_Hello{Hello: &relayv1.Hello{UserId: "u1", DeviceId: "r1", ProtocolVersion: proof.ProtocolVersion, ClientTimeMs: 42}}}
	_, _ = h.step(rh)
	rtr := tr
	rtr.DeviceID = "r1"
	if _, err := h.step(&relayv1.Frame{Kind: &relayv1.Frame_Authenticate{Authenticate: &relayv1.Authenticate{Signature: rtr.Sign(w.key)}}}); !errors.Is(err, &CloseError{Code: relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED}) {
		t.Fatalf("revoked device: %v", err)
	}
	// An instance id above 64 bytes is refused before any challenge.
	h = w.handshake()
	long := &relayv1.Frame{Kind: &relayv1.Frame_Hello{Hello: &relayv1.Hello{UserId: "u1", DeviceId: "d1", ProtocolVersion: proof.ProtocolVersion, Instance: strings.Repeat("i", 65)}}}
	if out, err := h.step(long); out != nil || !errors.Is(err, &CloseError{Code: relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME}) {
		t.Fatalf("long instance: %v %v", out, err)
	}
	// No randomness: an internal error, not a panic or a weak nonce.
	h = w.handshake()
	h.random = bytes.NewReader(nil)
	if _, err := h.step(helloF); !errors.Is(err, &CloseError{Code: relayv1.ErrorCode_ERROR_CODE_INTERNAL}) {
		t.Fatalf("no randomness: %v", err)
	}
}

// FuzzHandshake feeds arbitrary frame streams to the handshake state
// machine: it must never panic, and never complete unless the input
// carried a valid signature over the transcript or a valid ticket.
func FuzzHandshake(f *testing.F) {
	w := newFuzzWorld()
	hello := &relayv1.Hello{UserId: "u1", DeviceId: "d1", ProtocolVersion: proof.ProtocolVersion, ClientTimeMs: 42}
	tr := proof.Transcript{UserID: "u1", DeviceID: "d1", ProtocolVersion: proof.ProtocolVersion, ClientTimeMs: 42, EdgeID: "edge-f",
		Nonce: w.nonce(), ServerTimeMs: w.now.UnixMilli(), Binding: pipeBinding}
	auth := &relayv1.Frame{Kind: &relayv1.Frame_Authenticate{Authenticate: &relayv1.Authenticate{Signature: tr.Sign(w.key)}}}
	ticket, _ := w.ring.Seal(Ticket{UserID: "u1", DeviceID: "d1", AuthAt: w.now, ExpiresAt: w.now.Add(time.Hour)})
	helloF := &relayv1.Frame{Kind: &relayv1.Frame_Hello{Hello: hello}}
	f.Add(stream(helloF, auth))
	// Version 1, as browsers sign: no binding.
	tr1 := tr
	tr1.ProtocolVersion = proof.UnboundVersion
	hello1 := &relayv1.Hello{UserId: "u1", DeviceId: "d1", ProtocolVersion: proof.UnboundVersion, ClientTimeMs: 42}
	f.Add(stream(&relayv1.Frame{Kind: &relayv1.Frame_Hello{Hello: hello1}},
		&relayv1.Frame{Kind: &relayv1.Frame_Authenticate{Authenticate: &relayv1.Authenticate{Signature: tr1.Sign(w.key)}}}))
	f.Add(stream(&relayv1.Frame{Kind: &relayv1.Frame_Hello{Hello: &relayv1.Hello{UserId: "u1", DeviceId: "d1", ProtocolVersion: proof.ProtocolVersion, ResumeTicket: ticket}}}))
	f.Add(stream(auth, helloF))
	f.Add(stream(helloF, helloF))
	f.Add([]byte{2, 0x0a, 0x00})
	f.Fuzz(func(t *testing.T, b []byte) {
		h := w.handshake()
		r := frame.NewReader(bytes.NewReader(b), 4096)
		var last *relayv1.Frame
		var hello *relayv1.Hello
		for !h.done() {
			fr := &relayv1.Frame{}
			if err := r.Read(fr); err != nil {
				return
			}
			if fr.GetHello() != nil && hello == nil {
				hello = fr.GetHello()
			}
			last = fr
			if _, err := h.step(fr); err != nil {
				var ce *CloseError
				if !errors.As(err, &ce) {
					t.Fatalf("error is not a *CloseError: %v", err)
				}
				return
			}
		}
		if h.resumed {
			tk, err := w.ring.Open(hello.GetResumeTicket(), w.now)
			if err != nil || tk.DeviceID != hello.GetDeviceId() || tk.UserID != hello.GetUserId() {
				t.Fatalf("resumed without a valid ticket: %v", err)
			}
			return
		}
		want := proof.Transcript{UserID: hello.GetUserId(), DeviceID: hello.GetDeviceId(), ProtocolVersion: hello.GetProtocolVersion(),
			ClientTimeMs: hello.GetClientTimeMs(), EdgeID: "edge-f", Nonce: w.nonce(), ServerTimeMs: w.now.UnixMilli(), Binding: pipeBinding}
		dev := w.dir.LookupDevice(hello.GetDeviceId())
		if dev.State != DeviceActive || dev.UserID != hello.GetUserId() {
			t.Fatalf("authenticated an unusable device %+v", dev)
		}
		if err := want.Verify(dev.PublicKey, last.GetAuthenticate().GetSignature()); err != nil {
			t.Fatalf("authenticated without a valid signature: %v", err)
		}
	})
}

// Version 2's proofs are bound to the connection: a signature or resume
// proof made over another connection's binding (a machine in the middle
// passing on what a device signed for it) fails, while version 1, which
// browsers speak, signs none. A Hello of version 2 on a connection with
// no binding is refused at once, with a code that says why.
func TestProofsAreBoundToTheConnection(t *testing.T) {
	w := newFuzzWorld()
	other := bytes.Repeat([]byte{0xee}, proof.BindingSize)
	hello := func(v uint32) *relayv1.Frame {
		return &relayv1.Frame{Kind: &relayv1.Frame_Hello{Hello: &relayv1.Hello{UserId: "u1", DeviceId: "d1", ProtocolVersion: v, ClientTimeMs: 42}}}
	}
	signed := func(v uint32, binding []byte) *relayv1.Frame {
		tr := proof.Transcript{UserID: "u1", DeviceID: "d1", ProtocolVersion: v, ClientTimeMs: 42, EdgeID: "edge-f",
			Nonce: w.nonce(), ServerTimeMs: w.now.UnixMilli(), Binding: binding}
		return &relayv1.Frame{Kind: &relayv1.Frame_Authenticate{Authenticate: &relayv1.Authenticate{Signature: tr.Sign(w.key)}}}
	}
	for _, c := range []struct {
		name    string
		version uint32
		signed  []byte // the binding the device signed
		ok      bool
	}{
		{"version 2 on its connection", proof.ProtocolVersion, pipeBinding, true},
		{"version 2 signed for another connection", proof.ProtocolVersion, other, false},
		{"version 2 signed without a binding", proof.ProtocolVersion, nil, false},
		{"version 1", proof.UnboundVersion, nil, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			h := w.handshake()
			out, err := h.step(hello(c.version))
			if err != nil || out.GetChallenge() == nil {
				t.Fatalf("hello: %v %v", out, err)
			}
			// Version 2's challenge tells the device what binding the
			// edge sees, as a hash; version 1's says nothing of it.
			if check := out.GetChallenge().GetBindingCheck(); proof.Bound(c.version) != bytes.Equal(check, proof.BindingCheck(pipeBinding)) ||
				!proof.Bound(c.version) && check != nil {
				t.Fatalf("version %d: binding check %x", c.version, check)
			}
			_, err = h.step(signed(c.version, c.signed))
			if c.ok != (err == nil && h.done()) {
				t.Fatalf("want ok %v, got %v", c.ok, err)
			}
			if !c.ok && !errors.Is(err, &CloseError{Code: relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED}) {
				t.Fatalf("want AUTH_FAILED, got %v", err)
			}
			if c.ok && (h.binding != nil) != proof.Bound(c.version) {
				t.Fatalf("version %d recorded binding %x", c.version, h.binding)
			}
			if !c.ok {
				return
			}
			// A re-authentication at the maximum age signs the same
			// connection's binding.
			ch, err := h.reauth()
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(h.tr.Binding, h.binding) || !bytes.Equal(ch.GetNonce(), h.tr.Nonce) || !bytes.Equal(ch.GetBindingCheck(), out.GetChallenge().GetBindingCheck()) {
				t.Fatalf("re-authentication transcript: %+v", h.tr)
			}
		})
	}
	for _, v := range []uint32{0, 3} {
		h := w.handshake()
		if _, err := h.step(hello(v)); !errors.Is(err, &CloseError{Code: relayv1.ErrorCode_ERROR_CODE_UNSUPPORTED_VERSION}) {
			t.Fatalf("version %d: %v", v, err)
		}
	}
	// TLS that does not end at the edge: version 2 cannot be checked,
	// version 1 can.
	h := w.handshake()
	h.conn = fixedBinding(nil)
	_, err := h.step(hello(proof.ProtocolVersion))
	var ce *CloseError
	if !errors.As(err, &ce) || ce.Code != relayv1.ErrorCode_ERROR_CODE_UNSUPPORTED_VERSION || !strings.Contains(ce.Msg, "TLS") {
		t.Fatalf("version 2 without a binding: %v", err)
	}
	h = w.handshake()
	h.conn = fixedBinding(nil)
	if _, err := h.step(hello(proof.UnboundVersion)); err != nil {
		t.Fatalf("version 1 without a binding: %v", err)
	}
	if _, err := h.step(signed(proof.UnboundVersion, nil)); err != nil || !h.done() {
		t.Fatalf("version 1 without a binding: %v", err)
	}

	// A resume proof made for another connection: the ticket is refused
	// (a challenge with a ticket error follows), and the proof's nonce
	// is not spent: the same proof still resumes on its own connection.
	ticket, _ := w.ring.Seal(Ticket{UserID: "u1", DeviceID: "d1", AuthAt: w.now, ExpiresAt: w.now.Add(time.Hour)})
	resume := &relayv1.Hello{UserId: "u1", DeviceId: "d1", ProtocolVersion: proof.ProtocolVersion, ClientTimeMs: w.now.UnixMilli(),
		ResumeTicket: ticket, Instance: "i", ResumeNonce: bytes.Repeat([]byte{3}, proof.ResumeNonceSize)}
	resume.ResumeProof = proof.ResumeTranscript{UserID: "u1", DeviceID: "d1", ProtocolVersion: proof.ProtocolVersion, ClientTimeMs: resume.GetClientTimeMs(),
		Instance: "i", Nonce: resume.GetResumeNonce(), Ticket: ticket, Binding: pipeBinding}.Sign(w.key)
	replays := newReplayCache(1000) // one edge's
	h = w.handshake()
	h.conn, h.replays = fixedBinding(other), replays
	out, err := h.step(&relayv1.Frame{Kind: &relayv1.Frame_Hello{Hello: resume}})
	if err != nil || out.GetChallenge().GetTicketError() != relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED {
		t.Fatalf("a resume proof for another connection: %v %v", out, err)
	}
	h = w.handshake()
	h.replays = replays
	if out, err := h.step(&relayv1.Frame{Kind: &relayv1.Frame_Hello{Hello: resume}}); err != nil || out != nil || !h.resumed {
		t.Fatalf("the resume proof on its own connection: %v %v", out, err)
	}
}
