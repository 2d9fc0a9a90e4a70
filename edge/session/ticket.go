package session

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"time"

	"golang.org/x/crypto/chacha20poly1305"
)

// Ticket is what a resume ticket proves: that this device completed a
// full handshake with some edge of the cluster, and when.
type Ticket struct {
	UserID    string
	DeviceID  string
	AuthAt    time.Time // the full handshake the session descends from
	ExpiresAt time.Time
}

// SessionKey is one key of the cluster's ring (from the watch feed).
type SessionKey struct {
	ID     string
	Secret []byte    // 32 bytes
	Expiry time.Time // zero while current
}

// Ticket errors.
var (
	ErrTicketMalformed  = errors.New("resume ticket malformed")
	ErrTicketUnknownKey = errors.New("resume ticket sealed with a key not in the ring")
	ErrTicketForged     = errors.New("resume ticket does not authenticate")
	ErrTicketExpired    = errors.New("resume ticket expired")
	ErrNoSessionKey     = errors.New("no current session key")
)

// Ring holds the session keys and seals and opens tickets with them. It
// is safe for concurrent use; the watch feed replaces the keys.
type Ring struct {
	mu      sync.RWMutex // guards the fields below
	current string
	keys    map[string]SessionKey
}

// NewRing returns an empty ring.
func NewRing() *Ring { return &Ring{keys: map[string]SessionKey{}} }

// Set replaces the ring's keys.
func (r *Ring) Set(current string, keys []SessionKey) {
	m := make(map[string]SessionKey, len(keys))
	for _, k := range keys {
		m[k.ID] = k
	}
	r.mu.Lock()
	r.current, r.keys = current, m
	r.mu.Unlock()
}

const ticketVersion = 1

// maxTicket bounds a presented ticket before any work is done on it.
const maxTicket = 512

func ticketAAD(keyID string) []byte { return []byte("relay/1 resume ticket " + keyID) }

// Seal makes a ticket, sealed (XChaCha20-Poly1305) with the current key.
// Layout: version(1) | key id length(1) | key id | nonce(24) | sealed.
func (r *Ring) Seal(t Ticket) ([]byte, error) {
	plain := make([]byte, 0, 64)
	str := func(s string) {
		plain = binary.AppendUvarint(plain, uint64(len(s)))
		plain = append(plain, s...)
	}
	str(t.UserID)
	str(t.DeviceID)
	plain = binary.BigEndian.AppendUint64(plain, uint64(t.AuthAt.UnixMilli()))
	plain = binary.BigEndian.AppendUint64(plain, uint64(t.ExpiresAt.UnixMilli()))
	return r.seal(ticketVersion, ticketAAD, plain)
}

// seal seals plain with the current key, in the layout Seal describes.
func (r *Ring) seal(version byte, aad func(keyID string) []byte, plain []byte) ([]byte, error) {
	r.mu.RLock()
	k, ok := r.keys[r.current]
	r.mu.RUnlock()
	if !ok {
		return nil, ErrNoSessionKey
	}
	aead, err := chacha20poly1305.NewX(k.Secret)
	if err != nil {
		return nil, fmt.Errorf("seal ticket: %w", err)
	}
	out := make([]byte, 0, 2+len(k.ID)+chacha20poly1305.NonceSizeX+len(plain)+chacha20poly1305.Overhead)
	out = append(out, version, byte(len(k.ID)))
	out = append(out, k.ID...)
	nonce := make([]byte, chacha20poly1305.NonceSizeX)
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	out = append(out, nonce...)
	return aead.Seal(out, nonce, plain, aad(k.ID)), nil
}

// open opens what seal sealed, at most max bytes long, at time now.
func (r *Ring) open(version byte, aad func(keyID string) []byte, max int, b []byte, now time.Time) ([]byte, error) {
	if len(b) < 2 || len(b) > max || b[0] != version {
		return nil, ErrTicketMalformed
	}
	idLen := int(b[1])
	if len(b) < 2+idLen+chacha20poly1305.NonceSizeX+chacha20poly1305.Overhead {
		return nil, ErrTicketMalformed
	}
	keyID := string(b[2 : 2+idLen])
	r.mu.RLock()
	k, ok := r.keys[keyID]
	r.mu.RUnlock()
	if !ok || (!k.Expiry.IsZero() && !now.Before(k.Expiry)) {
		return nil, ErrTicketUnknownKey
	}
	aead, err := chacha20poly1305.NewX(k.Secret)
	if err != nil {
		return nil, ErrTicketUnknownKey
	}
	nonce := b[2+idLen : 2+idLen+chacha20poly1305.NonceSizeX]
	plain, err := aead.Open(nil, nonce, b[2+idLen+chacha20poly1305.NonceSizeX:], aad(keyID))
	if err != nil {
		return nil, ErrTicketForged
	}
	return plain, nil
}

// Open checks and opens a ticket at time now. A ticket sealed with a key
// that left the ring, or whose key's grace period ended, is refused.
func (r *Ring) Open(b []byte, now time.Time) (Ticket, error) {
	plain, err := r.open(ticketVersion, ticketAAD, maxTicket, b, now)
	if err != nil {
		return Ticket{}, err
	}
	var t Ticket
	str := func() (string, bool) {
		n, w := binary.Uvarint(plain)
		if w <= 0 || uint64(len(plain)-w) < n {
			return "", false
		}
		s := string(plain[w : w+int(n)])
		plain = plain[w+int(n):]
		return s, true
	}
	var ok1, ok2 bool
	t.UserID, ok1 = str()
	t.DeviceID, ok2 = str()
	if !ok1 || !ok2 || len(plain) != 16 {
		return Ticket{}, ErrTicketMalformed
	}
	t.AuthAt = time.UnixMilli(int64(binary.BigEndian.Uint64(plain)))
	t.ExpiresAt = time.UnixMilli(int64(binary.BigEndian.Uint64(plain[8:])))
	if !now.Before(t.ExpiresAt) {
		return Ticket{}, ErrTicketExpired
	}
	return t, nil
}

// replayCache remembers the resume proofs an edge accepted until they
// are too old to be accepted again, so a proof works once. It is bounded:
// when full, proofs are refused (the device falls back to a full
// handshake), never forgotten early. Each device may hold at most
// perOwner of its places, so one device signing fresh proofs as fast as
// it may connect cannot fill it for every other device.
type replayCache struct {
	max, perOwner int

	mu     sync.Mutex // guards the fields below
	seen   map[string]time.Time
	owners map[string]int // places held, by device
	order  []replayEntry  // in insertion order; expiries grow with it within the window
	head   int
}

type replayEntry struct {
	owner, key string
	expires    time.Time
}

// maxProofsPerDevice bounds the resume proofs of one device an edge
// remembers at once (twice the resume window): more than a device that
// reconnects every quarter second needs.
const maxProofsPerDevice = 256

func newReplayCache(max int) *replayCache {
	return &replayCache{max: max, perOwner: maxProofsPerDevice, seen: map[string]time.Time{}, owners: map[string]int{}}
}

// first records owner's key until expires and reports whether it was new
// (and there was room for it).
func (c *replayCache) first(owner, key string, expires, now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.head < len(c.order) && !c.order[c.head].expires.After(now) {
		e := c.order[c.head]
		if exp, ok := c.seen[e.key]; ok && !exp.After(now) {
			delete(c.seen, e.key)
			if c.owners[e.owner]--; c.owners[e.owner] <= 0 {
				delete(c.owners, e.owner)
			}
		}
		c.order[c.head] = replayEntry{}
		c.head++
	}
	if c.head > len(c.order)/2 && c.head > 64 {
		c.order = append(c.order[:0], c.order[c.head:]...)
		c.head = 0
	}
	key = owner + "\x00" + key
	if exp, ok := c.seen[key]; ok && exp.After(now) {
		return false
	}
	if len(c.seen) >= c.max || c.owners[owner] >= c.perOwner {
		return false
	}
	c.seen[key] = expires
	c.owners[owner]++
	c.order = append(c.order, replayEntry{owner: owner, key: key, expires: expires})
	return true
}

// size is how many proofs are remembered.
func (c *replayCache) size() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.seen)
}
