package session

import (
	"crypto/tls"
	"time"
)

// tlsTicketVersion starts a TLS session ticket sealed by the ring; its
// associated data differs from a resume ticket's, so neither opens as the
// other.
const tlsTicketVersion = 2

// maxTLSTicket bounds a presented TLS ticket before any work is done on
// it (a server's session state: secrets, times, quic-go's transport
// parameters; no certificates, as devices present none).
const maxTLSTicket = 4 << 10

func tlsTicketAAD(keyID string) []byte { return []byte("relay/1 tls session ticket " + keyID) }

// ShareTLSTickets makes conf's TLS 1.3 session tickets the cluster's:
// sealed with the ring's current session key, as resume tickets are, so a
// device that comes back through any edge of the cluster resumes its TLS
// session there (no certificate signature) rather than only on the edge
// that issued the ticket: what servers behind one name should do, and
// what a reconnect storm after an edge is lost needs. Tickets follow the
// ring's rotation: one sealed with a key that left the ring, or whose
// grace ended, is ignored and the handshake is a full one.
//
// The edge's own ticket keys (crypto/tls's, rotated per process) remain
// for TLS 1.2 (the WebSocket listener's oldest clients, whose resumptions
// have no forward secrecy, so their tickets stay with one process) and
// while the ring has no current key (before the watch feed's first
// copy). Resumption in TLS 1.3 always runs a new key exchange here
// (crypto/tls offers only psk_dhe_ke), so a ticket key alone does not
// expose traffic. No edge accepts 0-RTT, so a shared ticket cannot be
// used to replay early data on another edge.
//
// Call it before conf is used (or cloned).
func ShareTLSTickets(conf *tls.Config, ring *Ring, now func() time.Time) {
	own := conf.Clone() // the fallback, with crypto/tls's own keys
	conf.WrapSession = func(cs tls.ConnectionState, ss *tls.SessionState) ([]byte, error) {
		if cs.Version == tls.VersionTLS13 {
			b, err := ss.Bytes()
			if err != nil {
				return nil, err
			}
			if t, err := ring.seal(tlsTicketVersion, tlsTicketAAD, b); err == nil {
				return t, nil
			}
		}
		return own.EncryptTicket(cs, ss)
	}
	conf.UnwrapSession = func(identity []byte, cs tls.ConnectionState) (*tls.SessionState, error) {
		if len(identity) > 0 && identity[0] == tlsTicketVersion {
			if plain, err := ring.open(tlsTicketVersion, tlsTicketAAD, maxTLSTicket, identity, now()); err == nil {
				if ss, err := tls.ParseSessionState(plain); err == nil {
					return ss, nil
				}
				return nil, nil // not resumable: a full handshake
			}
			// Not one of the ring's (or its key is gone): crypto/tls's own
			// tickets may start with this byte too.
		}
		return own.DecryptTicket(identity, cs)
	}
}
