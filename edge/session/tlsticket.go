package session

import (
	"crypto/tls"
	"fmt"
	"time"
)

// tlsTicketVersion starts a TLS session ticket sealed by the ring. Its
// associated data differs from a resume ticket's (ticketVersion), and
// names the port, so no ticket opens as another kind or on the other port.
const tlsTicketVersion = 2

// maxTLSTicket bounds a TLS ticket: one presented is refused above it
// before any work is done on it, and a session whose ticket would be
// larger keeps to the edge's own keys. (A server's session state:
// secrets, times, quic-go's transport parameters; no certificates, as
// devices present none.)
const maxTLSTicket = 4 << 10

func tlsTicketAAD(purpose string) func(keyID string) []byte {
	return func(keyID string) []byte { return []byte("relay/1 tls session ticket " + purpose + " " + keyID) }
}

// ShareTLSTickets makes conf's TLS 1.3 session tickets the cluster's:
// sealed with the ring's current session key, as resume tickets are
// (associated data naming purpose, the port), so a device that comes
// back through any edge of the cluster resumes its TLS session there
// rather than only on the edge that issued the ticket. Tickets follow
// the ring's rotation: one sealed with a key that left the ring, or whose
// grace ended, is ignored and the handshake is a full one. Resumed
// sessions never carry early data (0-RTT): the resume nonce that guards
// a replayed Hello is checked per edge.
//
// What it costs: a resuming device is authenticated to the edge by the
// ticket alone, so whoever holds a session key (every edge, the control
// plane's state, its snapshots and backups) can open a device's ticket
// and pose as an edge to it while the ticket lasts; with per-process
// keys that took an edge's memory. And a client that pins certificates
// must pin every edge's: a resumed session carries the certificate of
// the edge that began it. Hence opt-in (relayd --cluster-tls-tickets).
//
// The edge's own ticket keys (crypto/tls's, rotated per process) remain
// for TLS 1.2 (the HTTPS port's oldest clients, whose resumptions have no
// forward secrecy) and while the ring has no current key (before the
// watch feed's first copy). Call it before conf is used or cloned.
func ShareTLSTickets(conf *tls.Config, ring *Ring, purpose string, now func() time.Time) {
	own := conf.Clone() // the fallback, with crypto/tls's own keys
	aad := tlsTicketAAD(purpose)
	conf.WrapSession = func(cs tls.ConnectionState, ss *tls.SessionState) ([]byte, error) {
		if cs.Version == tls.VersionTLS13 {
			ss.EarlyData = false
			b, err := ss.Bytes()
			if err != nil {
				return nil, fmt.Errorf("tls session state: %w", err)
			}
			if t, err := ring.seal(tlsTicketVersion, aad, b); err == nil && len(t) <= maxTLSTicket {
				return t, nil
			}
		}
		return own.EncryptTicket(cs, ss)
	}
	conf.UnwrapSession = func(identity []byte, cs tls.ConnectionState) (*tls.SessionState, error) {
		if len(identity) > 0 && identity[0] == tlsTicketVersion {
			if plain, err := ring.open(tlsTicketVersion, aad, maxTLSTicket, identity, now()); err == nil {
				ss, err := tls.ParseSessionState(plain)
				if err != nil {
					return nil, nil // not resumable: a full handshake
				}
				ss.EarlyData = false
				return ss, nil
			}
			// Not one of the ring's (or its key is gone): crypto/tls's own
			// tickets may start with this byte too.
		}
		return own.DecryptTicket(identity, cs)
	}
}
