package proof

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"net"
	"testing"

	"github.com/edge-relay/relay/internal/testcerts"
)

func transcript() Transcript {
	return Transcript{UserID: "u1", DeviceID: "d1", ProtocolVersion: ProtocolVersion, ClientTimeMs: 1000,
		EdgeID: "edge-a", Nonce: bytes.Repeat([]byte{7}, NonceSize), ServerTimeMs: 1001, Binding: bytes.Repeat([]byte{9}, BindingSize)}
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
		"version":     func(t *Transcript) { t.ProtocolVersion = 3 },
		"unbound":     func(t *Transcript) { t.ProtocolVersion = UnboundVersion },
		// Another TLS connection (a machine in the middle's).
		"binding": func(t *Transcript) { t.Binding = bytes.Repeat([]byte{10}, BindingSize) },
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
	unbound := tr
	unbound.Binding = nil
	if err := unbound.Verify(pub, unbound.Sign(priv)); !errors.Is(err, ErrBadSignature) {
		t.Fatal("a version 2 transcript without a binding verified")
	}
	// Version 1 carries none, and ignores one given.
	v1 := tr
	v1.ProtocolVersion = UnboundVersion
	sig1 := v1.Sign(priv)
	v1.Binding = nil
	if err := v1.Verify(pub, sig1); err != nil {
		t.Fatalf("version 1: %v", err)
	}
}

// A resume proof, like a handshake signature, is worthless with any
// field changed: another ticket, nonce, instance, device or time.
func TestResumeTranscriptSignatures(t *testing.T) {
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	base := func() ResumeTranscript {
		return ResumeTranscript{UserID: "u1", DeviceID: "d1", ProtocolVersion: ProtocolVersion, ClientTimeMs: 1000,
			Instance: "i1", Nonce: bytes.Repeat([]byte{7}, ResumeNonceSize), Ticket: []byte("ticket"), Binding: bytes.Repeat([]byte{9}, BindingSize)}
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
		"version":     func(t *ResumeTranscript) { t.ProtocolVersion = 3 },
		"unbound":     func(t *ResumeTranscript) { t.ProtocolVersion = UnboundVersion },
		"binding":     func(t *ResumeTranscript) { t.Binding = bytes.Repeat([]byte{10}, BindingSize) },
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
	// Version 1 (relay.js), a binding given or not: it is not signed.
	tr := Transcript{UserID: "u1", DeviceID: "d1", ProtocolVersion: 1, ClientTimeMs: 1000, EdgeID: "edge-a", Nonce: []byte{7, 7, 7}, ServerTimeMs: 1001, Binding: []byte{5}}
	rt := ResumeTranscript{UserID: "u1", DeviceID: "d1", ProtocolVersion: 1, ClientTimeMs: 1000, Instance: "i1", Nonce: []byte{8, 8}, Ticket: []byte("tk")}
	// Version 2: the same with the binding appended, length-prefixed.
	tr2, rt2 := tr, rt
	tr2.ProtocolVersion, tr2.Binding = 2, []byte{5, 6}
	rt2.ProtocolVersion, rt2.Binding = 2, []byte{5, 6}
	for _, c := range []struct {
		name string
		got  []byte
		want string
	}{
		{"handshake", tr.Bytes(), "0000001872656c61792f31206465766963652068616e647368616b650000000275310000000264310000000100000000000003e800000006656467652d610000000307070700000000000003e9"},
		{"resume", rt.Bytes(), "0000001572656c61792f312064657669636520726573756d650000000275310000000264310000000100000000000003e800000002693100000002080800000002746b"},
		{"handshake v2", tr2.Bytes(), "0000001872656c61792f31206465766963652068616e647368616b650000000275310000000264310000000200000000000003e800000006656467652d610000000307070700000000000003e9000000020506"},
		{"resume v2", rt2.Bytes(), "0000001572656c61792f312064657669636520726573756d650000000275310000000264310000000200000000000003e800000002693100000002080800000002746b000000020506"},
	} {
		if got := hex.EncodeToString(c.got); got != c.want {
			t.Errorf("%s transcript:\n got %s\nwant %s", c.name, got, c.want)
		}
	}
}

// Both ends of one TLS connection compute the same binding; a machine in
// the middle, with a connection to each side, has two that differ, so a
// transcript signed on one connection does not verify on the other.
func TestBindingIsTheConnections(t *testing.T) {
	cert := selfSigned(t)
	pair := func(version ...uint16) (client, server tls.ConnectionState) {
		v := uint16(tls.VersionTLS13)
		if len(version) > 0 {
			v = version[0]
		}
		a, b := net.Pipe()
		defer a.Close()
		defer b.Close()
		srv := tls.Server(b, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: v, MaxVersion: v})
		cl := tls.Client(a, &tls.Config{InsecureSkipVerify: true, MinVersion: v, MaxVersion: v}) //nolint:gosec // a test's own certificate
		errs := make(chan error, 1)
		go func() { errs <- srv.Handshake() }()
		if err := cl.Handshake(); err != nil {
			t.Fatal(err)
		}
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
		return cl.ConnectionState(), srv.ConnectionState()
	}
	c1, s1 := pair()
	_, s2 := pair()
	bc, err := Binding(&c1)
	if err != nil {
		t.Fatal(err)
	}
	bs, err := Binding(&s1)
	if err != nil {
		t.Fatal(err)
	}
	if len(bc) != BindingSize || !bytes.Equal(bc, bs) {
		t.Fatalf("the ends of one connection disagree: %x / %x", bc, bs)
	}
	other, err := Binding(&s2)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(bc, other) {
		t.Fatal("two connections have the same binding")
	}
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	tr := transcript()
	tr.Binding = bc
	sig := tr.Sign(priv)
	tr.Binding = other
	if err := tr.Verify(pub, sig); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("a signature made on one connection verified on another: %v", err)
	}
	if !bytes.Equal(BindingCheck(bc), BindingCheck(bs)) || bytes.Equal(BindingCheck(bc), BindingCheck(other)) || len(BindingCheck(bc)) != 32 {
		t.Fatal("binding checks do not tell the connections apart")
	}
	// TLS 1.2's exporter binds the connection only with the extended
	// master secret: refused.
	c12, s12 := pair(tls.VersionTLS12)
	if _, err := Binding(&c12); !errors.Is(err, ErrNoBinding) {
		t.Fatalf("TLS 1.2 client: %v", err)
	}
	if _, err := Binding(&s12); !errors.Is(err, ErrNoBinding) {
		t.Fatalf("TLS 1.2 server: %v", err)
	}
	if _, err := Binding(nil); !errors.Is(err, ErrNoBinding) {
		t.Fatalf("no connection: %v", err)
	}
	if _, err := Binding(&tls.ConnectionState{}); !errors.Is(err, ErrNoBinding) {
		t.Fatalf("a handshake not complete: %v", err)
	}
}

// selfSigned is a throwaway certificate for 127.0.0.1.
func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	ca, err := testcerts.NewCA(t.TempDir(), "proof test")
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.IssuePair("edge")
	if err != nil {
		t.Fatal(err)
	}
	return cert
}
