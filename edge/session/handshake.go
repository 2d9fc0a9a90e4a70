package session

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"io"
	"time"
	"unicode/utf8"

	"github.com/edge-relay/relay/edge/proof"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// DeviceState is what the edge's directory says of a device id.
type DeviceState int

// Device states.
const (
	// DeviceUnknown: no such device (or one the directory never saw).
	DeviceUnknown DeviceState = iota
	// DeviceActive: registered and not revoked.
	DeviceActive
	// DeviceRevoked: registered and revoked.
	DeviceRevoked
	// DeviceDeleted: deleted while this edge was following the feed.
	DeviceDeleted
)

// DeviceInfo is a device as the directory knows it.
type DeviceInfo struct {
	ID        string
	UserID    string
	PublicKey []byte
	State     DeviceState
}

// Directory is what the session core needs to know of the control plane's
// state. edge/directory provides it, following the watch feed.
type Directory interface {
	// LookupDevice returns what is known of a device id.
	LookupDevice(id string) DeviceInfo
	// UserActive reports whether an account exists and is active.
	UserActive(id string) bool
	// UserDevices lists a user's active (not revoked) devices.
	UserDevices(userID string) []string
	// AnnouncedRevision is the control-plane revision up to which every
	// mailbox announcement has been made here (Hub.MailboxChanged), and a
	// count of the full copies of the feed that announced no mailboxes:
	// entries stored before one of those may never be announced.
	AnnouncedRevision() (rev, blindCopies uint64)
	// Generation changes (before the change can be seen) whenever what
	// LookupDevice, UserActive or UserDevices answer may have changed, so
	// a session may keep an answer for as long as it stays the same. 0
	// says changes are not tracked: ask every time.
	Generation() uint64
	// Revision is the last control-plane revision the directory applied
	// completely; WaitRevision returns once the directory (synced with
	// the feed) has applied rev, or ctx's error.
	Revision() uint64
	WaitRevision(ctx context.Context, rev uint64) error
}

// CloseError ends a session with a protocol code, sent to the client in
// a Close frame.
type CloseError struct {
	Code relayv1.ErrorCode
	Msg  string
	// ReplacedBy is, for REPLACED, the client instance that took over.
	ReplacedBy string
}

func (e *CloseError) Error() string { return fmt.Sprintf("%s: %s", e.Code, e.Msg) }

// Is makes errors.Is(err, &CloseError{Code: c}) match any CloseError with
// code c.
func (e *CloseError) Is(target error) bool {
	var t *CloseError
	return errors.As(target, &t) && t.Code == e.Code && t.Msg == ""
}

func closeErr(code relayv1.ErrorCode, format string, args ...any) *CloseError {
	return &CloseError{Code: code, Msg: fmt.Sprintf(format, args...)}
}

// authFailed is the one answer to every failed proof of identity: it never
// says whether the device exists, belongs to the user or was revoked.
func authFailed() *CloseError {
	return closeErr(relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED, "authentication failed")
}

// binder is what the handshake needs of the connection: its channel
// binding (devconn.Conn.ChannelBinding).
type binder interface {
	ChannelBinding() []byte
	Transport() string
}

type hsState int

const (
	hsAwaitHello hsState = iota
	hsAwaitAuth
	hsDone
)

// handshake is the server side of the device handshake as a pure state
// machine: frames in, frames out, no I/O, so it can be tested and fuzzed
// alone. The session feeds it until done() or an error.
type handshake struct {
	edgeID string
	dir    Directory
	ring   *Ring
	now    func() time.Time
	random io.Reader
	maxAge time.Duration
	// dummyKey stands in for the key of a device that cannot sign in, so
	// a failed proof costs one signature check whether the device exists
	// or not (no timing oracle for device ids).
	dummyKey []byte
	// resumeWindow bounds how far a resume proof's client time may be
	// from now; replays refuses a proof seen before.
	resumeWindow time.Duration
	replays      *replayCache
	// proofsSince is when replays began (the hub's start): a resume proof
	// signed before it is refused, since this edge's previous process
	// may have accepted it and replays does not know (zero: no bound).
	proofsSince time.Time
	// verify checks an Ed25519 signature [ed25519.Verify]; tests count
	// its calls.
	verify func(pub, msg, sig []byte) bool
	// conn gives the channel binding of the session's connection, which
	// version 2's proofs sign.
	conn binder
	// requireBound refuses a version whose proofs are not bound to the
	// connection (Config.RequireBoundProofs names its transport).
	requireBound bool

	state  hsState
	hello  *relayv1.Hello
	device DeviceInfo
	tr     proof.Transcript
	// binding is the connection's channel binding, for a Hello whose
	// version signs it (nil for version 1).
	binding []byte

	// Results, valid once done.
	authAt  time.Time
	resumed bool
}

// done reports whether the device proved who it is.
func (h *handshake) done() bool { return h.state == hsDone }

// step consumes one client frame and returns the frame to answer with (a
// Challenge, or nil once done: the session sends the Welcome). Any error
// is a *CloseError.
func (h *handshake) step(f *relayv1.Frame) (*relayv1.Frame, error) {
	switch h.state {
	case hsAwaitHello:
		hello := f.GetHello()
		if hello == nil {
			return nil, closeErr(relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME, "expected hello, got %T", f.GetKind())
		}
		return h.onHello(hello)
	case hsAwaitAuth:
		auth := f.GetAuthenticate()
		if auth == nil {
			return nil, closeErr(relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME, "expected authenticate, got %T", f.GetKind())
		}
		// One signature check on every path: against the device's key, or
		// the dummy key for a device that cannot sign in. The device is
		// looked up now, not at the Hello: what the directory learnt while
		// the device was signing counts (a registration the Hello's
		// min_revision waited for, a key changed, a device revoked).
		h.device = h.dir.LookupDevice(h.hello.GetDeviceId())
		ok := verified(h.verifier(), h.keyFor(h.device), h.tr.Bytes(), auth.GetSignature(), len(h.tr.Nonce) == proof.NonceSize)
		// The device may have been revoked while it was signing.
		if !ok || !h.usable() {
			return nil, authFailed()
		}
		h.state, h.authAt = hsDone, h.now()
		return nil, nil
	default:
		return nil, closeErr(relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME, "handshake already complete")
	}
}

// lookupRevision is the Hello's min_revision when step(f) is to look the
// device up to check a proof (the Authenticate of a full handshake, or a
// Hello that resumes), else 0: the revision the session waits for first.
func (h *handshake) lookupRevision(f *relayv1.Frame) uint64 {
	switch {
	case h.state == hsAwaitAuth && f.GetAuthenticate() != nil:
		return h.hello.GetMinRevision()
	case h.state == hsAwaitHello && len(f.GetHello().GetResumeTicket()) > 0:
		return f.GetHello().GetMinRevision()
	}
	return 0
}

func validID(s string) bool { return s != "" && len(s) <= maxDeviceIDBytes && utf8.ValidString(s) }

// maxDeviceIDBytes bounds the user and device ids a device sends: in its
// Hello, and as an event's targets.
const maxDeviceIDBytes = 128

// maxInstanceBytes bounds Hello.instance.
const maxInstanceBytes = 64

func (h *handshake) onHello(hello *relayv1.Hello) (*relayv1.Frame, error) {
	v := hello.GetProtocolVersion()
	if v < proof.UnboundVersion || v > proof.ProtocolVersion {
		return nil, closeErr(relayv1.ErrorCode_ERROR_CODE_UNSUPPORTED_VERSION,
			"protocol version %d not supported, this edge speaks %d to %d", v, proof.UnboundVersion, proof.ProtocolVersion)
	}
	if !proof.Bound(v) && h.requireBound {
		return nil, closeErr(relayv1.ErrorCode_ERROR_CODE_UNSUPPORTED_VERSION,
			"protocol version %d does not bind its proofs to the TLS connection, which this edge requires on %s; speak version %d",
			v, h.conn.Transport(), proof.ProtocolVersion)
	}
	if proof.Bound(v) {
		// The device signs the binding of the TLS connection it sees; the
		// edge checks it against the one it sees (and tells the device a
		// hash of it in the Challenge, so a device behind a proxy that
		// ends its TLS learns why it would fail). A connection with no
		// binding (not TLS 1.3) cannot carry this version: say so rather
		// than fail every signature.
		if h.binding = h.conn.ChannelBinding(); len(h.binding) != proof.BindingSize {
			return nil, closeErr(relayv1.ErrorCode_ERROR_CODE_UNSUPPORTED_VERSION,
				"protocol version %d binds its proofs to the TLS connection, and this connection has no channel binding (it needs TLS 1.3 from the device to the edge); speak version %d",
				v, proof.UnboundVersion)
		}
	}
	if !validID(hello.GetUserId()) || !validID(hello.GetDeviceId()) {
		return nil, closeErr(relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME, "hello needs a user id and a device id of 1 to 128 bytes of UTF-8")
	}
	if len(hello.GetInstance()) > maxInstanceBytes {
		return nil, closeErr(relayv1.ErrorCode_ERROR_CODE_MALFORMED_FRAME, "hello.instance longer than %d bytes", maxInstanceBytes)
	}
	h.hello = hello
	now := h.now()

	var ticketErr relayv1.ErrorCode
	if t := hello.GetResumeTicket(); len(t) > 0 {
		h.device = h.dir.LookupDevice(hello.GetDeviceId())
		tk, err := h.ring.Open(t, now)
		switch {
		case err != nil:
			ticketErr = ticketCode(err)
		case tk.UserID != hello.GetUserId() || tk.DeviceID != hello.GetDeviceId():
			ticketErr = relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED
		case h.maxAge > 0 && !now.Before(tk.AuthAt.Add(h.maxAge)):
			ticketErr = relayv1.ErrorCode_ERROR_CODE_SESSION_EXPIRED
		case !h.resumeProofValid(hello, now):
			// The ticket is bound to the device's key: without a fresh
			// signature it proves nothing (a stolen ticket).
			ticketErr = relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED
		case !h.usable():
			// A ticket outlives neither its device nor its account.
			return nil, authFailed()
		default:
			h.state, h.authAt, h.resumed = hsDone, tk.AuthAt, true
			return nil, nil
		}
	}
	nonce := make([]byte, proof.NonceSize)
	if _, err := io.ReadFull(h.random, nonce); err != nil {
		return nil, closeErr(relayv1.ErrorCode_ERROR_CODE_INTERNAL, "no randomness for a challenge")
	}
	// The challenge goes out even for a device that does not exist or is
	// not this user's, so the answer never tells which ids are real; the
	// signature check then fails.
	h.tr = proof.Transcript{
		UserID: hello.GetUserId(), DeviceID: hello.GetDeviceId(), ProtocolVersion: hello.GetProtocolVersion(),
		ClientTimeMs: hello.GetClientTimeMs(), EdgeID: h.edgeID, Nonce: nonce, ServerTimeMs: now.UnixMilli(), Binding: h.binding,
	}
	h.state = hsAwaitAuth
	return &relayv1.Frame{Kind: &relayv1.Frame_Challenge{Challenge: &relayv1.Challenge{
		Nonce: nonce, ServerTimeMs: h.tr.ServerTimeMs, EdgeId: h.edgeID, TicketError: ticketErr, BindingCheck: h.bindingCheck(),
	}}}, nil
}

// resumeProofValid checks a Hello's resume proof: a signature with the
// device's key over the resume transcript, a client time within the
// resume window of now, and a nonce not seen before. It checks one
// signature whether the device exists or not.
func (h *handshake) resumeProofValid(hello *relayv1.Hello, now time.Time) bool {
	rt := proof.ResumeTranscript{
		UserID: hello.GetUserId(), DeviceID: hello.GetDeviceId(), ProtocolVersion: hello.GetProtocolVersion(),
		ClientTimeMs: hello.GetClientTimeMs(), Instance: hello.GetInstance(), Nonce: hello.GetResumeNonce(),
		Ticket: hello.GetResumeTicket(), Binding: h.binding,
	}
	if !verified(h.verifier(), h.keyFor(h.device), rt.Bytes(), hello.GetResumeProof(), len(rt.Nonce) == proof.ResumeNonceSize) {
		return false
	}
	signed := time.UnixMilli(hello.GetClientTimeMs())
	skew := signed.Sub(now)
	if skew > h.resumeWindow || skew < -h.resumeWindow {
		return false
	}
	// The replay cache lives in this process: a proof signed before it
	// started may have been accepted by the edge's previous process
	// within the window, and would be taken again. A device whose proof
	// is refused for it does a full handshake, as for any refused proof.
	if signed.Before(h.proofsSince) {
		return false
	}
	return h.replays.first(hello.GetDeviceId(), string(hello.GetResumeNonce()), now.Add(2*h.resumeWindow), now)
}

// keyFor is the key a device's signatures are checked against: its own
// while it may sign in, else the dummy key (which nothing signs with).
func (h *handshake) keyFor(d DeviceInfo) []byte {
	if d.State == DeviceActive && d.UserID == h.hello.GetUserId() && len(d.PublicKey) == ed25519.PublicKeySize {
		return d.PublicKey
	}
	return h.dummyKey
}

func (h *handshake) verifier() func(pub, msg, sig []byte) bool {
	if h.verify != nil {
		return h.verify
	}
	return verifyEd25519
}

// verified checks sig over msg with verify, always calling it once: a
// nonce of the wrong size (nonceOK false) fails after the check, not
// instead of it.
func verified(verify func(pub, msg, sig []byte) bool, pub, msg, sig []byte, nonceOK bool) bool {
	return verify(pub, msg, sig) && nonceOK
}

// verifyEd25519 is ed25519.Verify without its panic on a key of the wrong
// size (keyFor always passes 32 bytes; this is the belt to its braces).
func verifyEd25519(pub, msg, sig []byte) bool {
	return len(pub) == ed25519.PublicKeySize && ed25519.Verify(pub, msg, sig)
}

// usable reports whether the hello's device is an active device of the
// hello's user, and the user is active.
func (h *handshake) usable() bool {
	d := h.dir.LookupDevice(h.hello.GetDeviceId())
	return d.State == DeviceActive && d.UserID == h.hello.GetUserId() && h.dir.UserActive(d.UserID)
}

// reauth prepares a fresh challenge for a session that reached its
// maximum age; verifyReauth checks the answer.
// trimHello keeps of the Hello only what the session reads once the
// handshake is done (the ids and version a re-authentication signs, the
// datagram flags): its resume ticket, proof and nonce, and fields the
// edge does not know, are the device's to size, and a session lives
// long. Call it when the handshake is done.
func (h *handshake) trimHello() {
	in := h.hello
	h.hello = &relayv1.Hello{
		UserId: in.GetUserId(), DeviceId: in.GetDeviceId(), ProtocolVersion: in.GetProtocolVersion(),
		ClientTimeMs: in.GetClientTimeMs(), Instance: in.GetInstance(),
		NoDatagrams: in.GetNoDatagrams(), DeferDatagrams: in.GetDeferDatagrams(), MinRevision: in.GetMinRevision(),
	}
}

func (h *handshake) reauth() (*relayv1.Challenge, error) {
	nonce := make([]byte, proof.NonceSize)
	if _, err := io.ReadFull(h.random, nonce); err != nil {
		return nil, fmt.Errorf("challenge nonce: %w", err)
	}
	// From the session's Hello: a session that resumed has no transcript
	// of its own yet (its opening checked no challenge).
	hello := h.hello
	h.tr = proof.Transcript{
		UserID: hello.GetUserId(), DeviceID: hello.GetDeviceId(), ProtocolVersion: hello.GetProtocolVersion(),
		ClientTimeMs: hello.GetClientTimeMs(), EdgeID: h.edgeID, Nonce: nonce, ServerTimeMs: h.now().UnixMilli(), Binding: h.binding,
	}
	h.device = h.dir.LookupDevice(h.hello.GetDeviceId())
	h.state = hsAwaitAuth
	return &relayv1.Challenge{Nonce: nonce, ServerTimeMs: h.tr.ServerTimeMs, EdgeId: h.edgeID, BindingCheck: h.bindingCheck()}, nil
}

// bindingCheck is the Challenge's binding_check: for a Hello whose
// version binds its proofs, a hash of the connection's binding as the
// edge sees it (nil for version 1).
func (h *handshake) bindingCheck() []byte {
	if h.binding == nil {
		return nil
	}
	return proof.BindingCheck(h.binding)
}

func ticketCode(err error) relayv1.ErrorCode {
	if errors.Is(err, ErrTicketExpired) {
		return relayv1.ErrorCode_ERROR_CODE_SESSION_EXPIRED
	}
	return relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED
}
