package proof

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"testing"
)

func transcript() Transcript {
	return Transcript{UserID: "u1", DeviceID: "d1", ProtocolVersion: ProtocolVersion, ClientTimeMs: 1000,
		EdgeID: "edge-a", Nonce: bytes.Repeat([]byte{7}, NonceSize), ServerTimeMs: 1001}
}

func TestTranscriptSignatures(t *testing.T) {
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	tr := transcript()
	sig := tr.Sign(priv)
	if err := tr.Verify(pub, sig); err != nil {
		t.Fatal(err)
	}
	// A captured signature is useless with any other field changed:
	// another edge, another nonce (replay), another device, time.
	mods := map[string]func(*Transcript){
		"edge":        func(t *Transcript) { t.EdgeID = "edge-b" },
		"nonce":       func(t *Transcript) { t.Nonce = bytes.Repeat([]byte{8}, NonceSize) },
		"device":      func(t *Transcript) { t.DeviceID = "d2" },
		"user":        func(t *Transcript) { t.UserID = "u2" },
		"server time": func(t *Transcript) { t.ServerTimeMs++ },
		"client time": func(t *Transcript) { t.ClientTimeMs++ },
		"version":     func(t *Transcript) { t.ProtocolVersion = 2 },
		// Length prefixes keep field boundaries: moving a byte between
		// adjacent fields changes the encoding.
		"boundary": func(t *Transcript) { t.UserID, t.DeviceID = "u1d", "1" },
	}
	for name, mod := range mods {
		other := transcript()
		mod(&other)
		if err := other.Verify(pub, sig); !errors.Is(err, ErrBadSignature) {
			t.Errorf("%s changed but the signature still verifies: %v", name, err)
		}
	}
	otherPub, _, _ := ed25519.GenerateKey(rand.Reader)
	if err := tr.Verify(otherPub, sig); !errors.Is(err, ErrBadSignature) {
		t.Fatal("wrong key verified")
	}
	if err := tr.Verify(pub[:10], sig); !errors.Is(err, ErrBadSignature) {
		t.Fatal("short key")
	}
	short := tr
	short.Nonce = []byte{1}
	if err := short.Verify(pub, short.Sign(priv)); !errors.Is(err, ErrBadSignature) {
		t.Fatal("short nonce accepted")
	}
}

// A resume proof, like a handshake signature, is worthless with any
// field changed: another ticket, nonce, instance, device or time.
func TestResumeTranscriptSignatures(t *testing.T) {
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	base := func() ResumeTranscript {
		return ResumeTranscript{UserID: "u1", DeviceID: "d1", ProtocolVersion: ProtocolVersion, ClientTimeMs: 1000,
			Instance: "i1", Nonce: bytes.Repeat([]byte{7}, ResumeNonceSize), Ticket: []byte("ticket")}
	}
	sig := base().Sign(priv)
	if !ed25519.Verify(pub, base().Bytes(), sig) {
		t.Fatal("a resume proof does not verify")
	}
	mods := map[string]func(*ResumeTranscript){
		"ticket":      func(t *ResumeTranscript) { t.Ticket = []byte("tickets") },
		"nonce":       func(t *ResumeTranscript) { t.Nonce = bytes.Repeat([]byte{8}, ResumeNonceSize) },
		"instance":    func(t *ResumeTranscript) { t.Instance = "i2" },
		"device":      func(t *ResumeTranscript) { t.DeviceID = "d2" },
		"user":        func(t *ResumeTranscript) { t.UserID = "u2" },
		"client time": func(t *ResumeTranscript) { t.ClientTimeMs++ },
		"version":     func(t *ResumeTranscript) { t.ProtocolVersion = 2 },
		"boundary":    func(t *ResumeTranscript) { t.Instance, t.Ticket = "i1t", []byte("icket") },
	}
	for name, mod := range mods {
		other := base()
		mod(&other)
		if ed25519.Verify(pub, other.Bytes(), sig) {
			t.Errorf("%s changed but the proof still verifies", name)
		}
	}
	// A handshake signature is no resume proof, and the other way round:
	// the labels differ.
	tr := transcript()
	if bytes.Equal(tr.Bytes()[:30], base().Bytes()[:30]) {
		t.Fatal("the two transcripts begin alike")
	}
}

// The encodings are the protocol's (docs/protocol.md; relay.js builds
// the same bytes): pinned, so a refactoring cannot change what devices
// sign.
func TestTranscriptEncodingsArePinned(t *testing.T) {
	tr := Transcript{UserID: "u1", DeviceID: "d1", ProtocolVersion: 1, ClientTimeMs: 1000, EdgeID: "edge-a", Nonce: []byte{7, 7, 7}, ServerTimeMs: 1001}
	rt := ResumeTranscript{UserID: "u1", DeviceID: "d1", ProtocolVersion: 1, ClientTimeMs: 1000, Instance: "i1", Nonce: []byte{8, 8}, Ticket: []byte("tk")}
	for _, c := range []struct {
		name string
		got  []byte
		want string
	}{
		{"handshake", tr.Bytes(), "0000001872656c61792f31206465766963652068616e647368616b650000000275310000000264310000000100000000000003e800000006656467652d610000000307070700000000000003e9"},
		{"resume", rt.Bytes(), "0000001572656c61792f312064657669636520726573756d650000000275310000000264310000000100000000000003e800000002693100000002080800000002746b"},
	} {
		if got := hex.EncodeToString(c.got); got != c.want {
			t.Errorf("%s transcript:\n got %s\nwant %s", c.name, got, c.want)
		}
	}
}
