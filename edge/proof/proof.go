// Package proof defines what a device signs to prove its key to an edge:
// the handshake's transcript and the resume transcript, with the protocol
// constants they carry. The edge's session core checks these signatures
// and the clients make them; both encode them here, byte for byte.
package proof

import (
	"crypto/ed25519"
	"encoding/binary"
	"errors"
	"fmt"
)

// ProtocolVersion is the version of the device protocol.
const ProtocolVersion = 1

// NonceSize is the size of a challenge nonce.
const NonceSize = 32

// transcriptLabel separates these signatures from any other use of a
// device key.
const transcriptLabel = "relay/1 device handshake"

// Transcript is what a device signs to prove its key: everything both
// sides said in the handshake, including the edge's nonce and id, so a
// captured signature is worthless on another edge or in another session.
type Transcript struct {
	UserID          string
	DeviceID        string
	ProtocolVersion uint32
	ClientTimeMs    int64
	EdgeID          string
	Nonce           []byte
	ServerTimeMs    int64
}

// Bytes returns the canonical encoding that is signed: the label, then
// every field length-prefixed (strings, nonce) or fixed-width (numbers),
// in a fixed order, so no two transcripts encode alike.
func (t Transcript) Bytes() []byte {
	b := appendHead(make([]byte, 0, 128), transcriptLabel, t.UserID, t.DeviceID, t.ProtocolVersion, t.ClientTimeMs)
	b = appendString(b, t.EdgeID)
	b = appendString(b, string(t.Nonce))
	return binary.BigEndian.AppendUint64(b, uint64(t.ServerTimeMs))
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
// proof from being used twice.
type ResumeTranscript struct {
	UserID          string
	DeviceID        string
	ProtocolVersion uint32
	ClientTimeMs    int64
	Instance        string
	Nonce           []byte
	Ticket          []byte
}

// Bytes returns the canonical encoding that is signed, built like a
// Transcript's under its own label.
func (t ResumeTranscript) Bytes() []byte {
	b := appendHead(make([]byte, 0, 96+len(t.Ticket)), resumeLabel, t.UserID, t.DeviceID, t.ProtocolVersion, t.ClientTimeMs)
	b = appendString(b, t.Instance)
	b = appendString(b, string(t.Nonce))
	return appendString(b, string(t.Ticket))
}

// Sign signs the resume transcript with a device key (what clients do).
func (t ResumeTranscript) Sign(key ed25519.PrivateKey) []byte {
	return ed25519.Sign(key, t.Bytes())
}
