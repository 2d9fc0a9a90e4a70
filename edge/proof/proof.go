// Package proof defines what a device signs to prove its key to an edge:
// the handshake's transcript and the resume transcript, with the protocol
// constants they carry. The edge's session core checks these signatures
// and the clients make them; both encode them here, byte for byte.
package proof

import (
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
)

// Versions of the device protocol. A Hello names the one its device
// speaks, and both transcripts carry it, so nobody between a device and an
// edge can change it without breaking the device's signature.
const (
	// ProtocolVersion is the newest version, the one the Go client
	// speaks: its transcripts also carry the channel binding of the TLS
	// connection the session runs on (Binding), so a proof is worthless
	// on any other connection.
	ProtocolVersion = 2
	// UnboundVersion is the first version, whose transcripts carry no
	// channel binding. Browsers speak it: no browser API gives a page
	// the TLS exporter of a WebTransport session or a WebSocket.
	UnboundVersion = 1
)

// Bound reports whether the transcripts of a protocol version carry a
// channel binding.
func Bound(version uint32) bool { return version >= 2 }

// BindingLabel is the TLS exporter label of the channel binding
// (RFC 9266, "tls-exporter"), used with an empty context.
const BindingLabel = "EXPORTER-Channel-Binding"

// BindingSize is the size of a channel binding.
const BindingSize = 32

// ErrNoBinding is returned by Binding for a connection that has no
// channel binding to offer: not TLS 1.3, or a handshake not complete.
var ErrNoBinding = errors.New("the TLS connection has no channel binding")

// Binding is the channel binding of a TLS 1.3 connection (RFC 9266): both
// ends of one connection compute the same value, and the two connections
// of a machine in the middle get two different ones. TLS 1.2 is refused:
// its exporter binds the connection only with the extended master secret
// (RFC 9266, section 4.2), which a GODEBUG setting could take away
// unnoticed.
func Binding(cs *tls.ConnectionState) ([]byte, error) {
	if cs == nil || !cs.HandshakeComplete {
		return nil, ErrNoBinding
	}
	if cs.Version != tls.VersionTLS13 {
		return nil, fmt.Errorf("%w: %s, not TLS 1.3", ErrNoBinding, tls.VersionName(cs.Version))
	}
	b, err := cs.ExportKeyingMaterial(BindingLabel, nil, BindingSize)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNoBinding, err)
	}
	return b, nil
}

// NonceSize is the size of a challenge nonce.
const NonceSize = 32

// transcriptLabel separates these signatures from any other use of a
// device key.
const transcriptLabel = "relay/1 device handshake"

// bindingCheckLabel separates a binding check from any other hash of a
// binding.
const bindingCheckLabel = "relay/1 channel binding check"

// BindingCheck is what an edge tells a device of its channel binding
// (Challenge.binding_check): a hash that lets the device see whether the
// two ends are one connection, without giving the binding itself away.
func BindingCheck(binding []byte) []byte {
	h := sha256.New()
	h.Write([]byte(bindingCheckLabel))
	h.Write(binding)
	return h.Sum(nil)
}

// Transcript is what a device signs to prove its key: everything both
// sides said in the handshake, including the edge's nonce and id, so a
// captured signature is worthless on another edge or in another session,
// and (from version 2) the connection's channel binding, so it is
// worthless on another connection too.
type Transcript struct {
	UserID          string
	DeviceID        string
	ProtocolVersion uint32
	ClientTimeMs    int64
	EdgeID          string
	Nonce           []byte
	ServerTimeMs    int64
	// Binding is the channel binding of the connection (Binding), for a
	// ProtocolVersion that is Bound; ignored for version 1.
	Binding []byte
}

// Bytes returns the canonical encoding that is signed: the label, then
// every field length-prefixed (strings, nonce, binding) or fixed-width
// (numbers), in a fixed order, so no two transcripts encode alike. The
// binding comes last, only in a version that is Bound: version 1's
// encoding is what it always was.
func (t Transcript) Bytes() []byte {
	b := appendHead(make([]byte, 0, 168), transcriptLabel, t.UserID, t.DeviceID, t.ProtocolVersion, t.ClientTimeMs)
	b = appendString(b, t.EdgeID)
	b = appendString(b, string(t.Nonce))
	b = binary.BigEndian.AppendUint64(b, uint64(t.ServerTimeMs))
	return appendBinding(b, t.ProtocolVersion, t.Binding)
}

// appendBinding appends a Bound version's binding, length-prefixed.
func appendBinding(b []byte, version uint32, binding []byte) []byte {
	if !Bound(version) {
		return b
	}
	return appendString(b, string(binding))
}

// appendHead appends what both transcripts begin with: the label, the
// device's ids, the protocol version and the client's time.
func appendHead(b []byte, label, userID, deviceID string, version uint32, clientTimeMs int64) []byte {
	b = appendString(b, label)
	b = appendString(b, userID)
	b = appendString(b, deviceID)
	b = binary.BigEndian.AppendUint32(b, version)
	return binary.BigEndian.AppendUint64(b, uint64(clientTimeMs))
}

// appendString appends s length-prefixed (a big-endian uint32).
func appendString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(s)))
	return append(b, s...)
}

// ErrBadSignature is returned when a handshake signature does not verify.
var ErrBadSignature = errors.New("handshake signature does not verify")

// Sign signs the transcript with a device key (what clients do).
func (t Transcript) Sign(key ed25519.PrivateKey) []byte {
	return ed25519.Sign(key, t.Bytes())
}

// Verify checks a device's signature over the transcript.
func (t Transcript) Verify(pub []byte, sig []byte) error {
	if len(pub) != ed25519.PublicKeySize {
		return fmt.Errorf("%w: device key is %d bytes", ErrBadSignature, len(pub))
	}
	if len(t.Nonce) != NonceSize {
		return fmt.Errorf("%w: nonce is %d bytes", ErrBadSignature, len(t.Nonce))
	}
	if Bound(t.ProtocolVersion) && len(t.Binding) != BindingSize {
		return fmt.Errorf("%w: channel binding is %d bytes", ErrBadSignature, len(t.Binding))
	}
	if !ed25519.Verify(ed25519.PublicKey(pub), t.Bytes(), sig) {
		return ErrBadSignature
	}
	return nil
}

// resumeLabel separates resume proofs from handshake signatures.
const resumeLabel = "relay/1 device resume"

// ResumeNonceSize is the size of a Hello's resume_nonce.
const ResumeNonceSize = 16

// ResumeTranscript is what a device signs to resume with a ticket: the
// ticket itself, the Hello's ids, time and instance, and a fresh nonce.
// It binds the ticket to the device's key, so a ticket alone (stolen from
// a device's storage, say) resumes nothing; the time and the nonce keep a
// proof from being used twice; from version 2 the channel binding keeps
// it from being used on any connection but the one it was made for.
type ResumeTranscript struct {
	UserID          string
	DeviceID        string
	ProtocolVersion uint32
	ClientTimeMs    int64
	Instance        string
	Nonce           []byte
	Ticket          []byte
	// Binding is the channel binding of the connection, as in Transcript.
	Binding []byte
}

// Bytes returns the canonical encoding that is signed, built like a
// Transcript's under its own label.
func (t ResumeTranscript) Bytes() []byte {
	b := appendHead(make([]byte, 0, 136+len(t.Ticket)), resumeLabel, t.UserID, t.DeviceID, t.ProtocolVersion, t.ClientTimeMs)
	b = appendString(b, t.Instance)
	b = appendString(b, string(t.Nonce))
	b = appendString(b, string(t.Ticket))
	return appendBinding(b, t.ProtocolVersion, t.Binding)
}

// Sign signs the resume transcript with a device key (what clients do).
func (t ResumeTranscript) Sign(key ed25519.PrivateKey) []byte {
	return ed25519.Sign(key, t.Bytes())
}
