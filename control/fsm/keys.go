package fsm

import (
	"encoding/binary"
	"encoding/hex"

	"github.com/edge-relay/relay/storage/state"
)

// Key layout of the state store. Every key starts with a one-byte prefix
// below 0xff (storage/state relies on that), then ':'.
//
//	m:applied                 16 bytes: applied index, term (written in the
//	                          same batch as every state change)
//	m:horizon                 8 bytes: first change revision still kept
//	u:<user id>               state.v1.User
//	l:<login>                 user id (unique index on login)
//	d:<user id>\x00<dev id>   state.v1.Device
//	D:<device id>             user id (device ids are global); empty: the
//	                          id of a deleted device, taken until its
//	                          mailbox is emptied (p:)
//	n:<node id>               state.v1.Node
//	c:<rev:8><seq:4>          state.v1.Change
//	q:<request id>            state.v1.Result of the first apply of that id
//	Q:<rev:8><request id>     empty; orders request ids for pruning
//	t:<token id>              state.v1.RefreshToken
//	X:<expires:8><token id>   empty; orders refresh tokens for expiry
//	f:<family id>             state.v1.TokenFamily
//	x:<user>\x00<family>\x00<token>  empty; a user's tokens, for deletion
//	F:<user>\x00<created:8><family>   empty; a user's families opened
//	                          under a session cap (IssueRefreshToken.
//	                          max_sessions), oldest first; kept up only
//	                          while the feature session_cap is in use
//	Y:<until:8><family id>    empty; a family ended (its tokens deleted)
//	                          whose record is kept, revoked, until then
//	                          for its access tokens; pruned while the
//	                          feature session_cap is in use
//	s:<key id>                state.v1.SigningKey
//	k:<key id>                state.v1.SessionKey
//	m:initialized             present once InitCluster applied
//	m:signing                 id of the current signing key
//	m:session                 id of the current session key
//	e:<edge id>               state.v1.Edge
//	m:ca                      state.v1.ClusterCA (present once created)
//	m:gated                   empty; present once EnableGatedApply applied
//	m:history                 id of the state's history, drawn when a node
//	                          restores a backup (absent: the history the
//	                          cluster was created with)
//	b:<dev id>\x00<seq:8>     state.v1.MailboxEntry
//	B:<dev id>                state.v1.Mailbox (seq counter, count, bytes)
//	p:<dev id>                empty; the mailbox of a deleted or revoked
//	                          device, still being emptied (purge_limit)
//	w:<expires:8><dev id>\x00<seq:8>   empty; orders mailbox entries for expiry
//	W:<dev id>\x00<sender id>\x00<event id>  8 bytes: seq of that stored
//	                          event (dedup; the event id is last, so it may
//	                          hold any bytes)
//	v:<event><dev id>\x00<seq:8>   empty; the any_one entries of one event
//	a:<event>                 state.v1.EventClaim: who took that event
//	A:<expires:8><event>      empty; orders claims for expiry
//	g:a<address hash, hex>    state.v1.LoginThrottle of a client address
//	g:l<login>                state.v1.LoginThrottle of a login name
//	G:<expires:8><g: key>     empty; orders throttle records for pruning
//
// where <event> is <sender id>\x00<len:1><event id>: the length makes
// one event's keys a prefix of no other event's, whatever bytes its id
// holds.
var (
	keyApplied = []byte("m:applied")
	keyHorizon = []byte("m:horizon")
	keyHistory = []byte("m:history")
	// keyFormat holds the state's format (StateFormat), 8 bytes big
	// endian; a state without it is of format 1.
	keyFormat = []byte("m:format")

	prefixUser        = []byte("u:")
	prefixLogin       = []byte("l:")
	prefixDevice      = []byte("d:")
	prefixDeviceOwner = []byte("D:")
	prefixNode        = []byte("n:")
	prefixChange      = []byte("c:")
	prefixRequest     = []byte("q:")
	prefixRequestRev  = []byte("Q:")
	prefixToken       = []byte("t:")
	prefixTokenExpiry = []byte("X:")
	prefixFamily      = []byte("f:")
	prefixUserTokens  = []byte("x:")
	prefixUserFamily  = []byte("F:")
	prefixEndedFamily = []byte("Y:")
	prefixSigningKey  = []byte("s:")
	prefixSessionKey  = []byte("k:")
	prefixEdge        = []byte("e:")
	prefixMailEntry   = []byte("b:")
	prefixMailbox     = []byte("B:")
	prefixMailPurge   = []byte("p:")
	prefixMailExpiry  = []byte("w:")
	prefixMailDedup   = []byte("W:")
	prefixEventIndex  = []byte("v:")
	prefixClaim       = []byte("a:")
	prefixClaimExpiry = []byte("A:")
	prefixThrottle    = []byte("g:")
	prefixThrottleExp = []byte("G:")

	keyInitialized    = []byte("m:initialized")
	keyCurrentSigning = []byte("m:signing")
	keyCurrentSession = []byte("m:session")
	keyClusterCA      = []byte("m:ca")
)

func tokenKey(id string) []byte      { return join(prefixToken, id) }
func familyKey(id string) []byte     { return join(prefixFamily, id) }
func signingKeyKey(id string) []byte { return join(prefixSigningKey, id) }
func sessionKeyKey(id string) []byte { return join(prefixSessionKey, id) }
func edgeKey(id string) []byte       { return join(prefixEdge, id) }
func userTokenKey(uid, fid, tid string) []byte {
	return join(prefixUserTokens, uid, fid, tid)
}

// familyTokensPrefix is where a family's user-token keys start.
func familyTokensPrefix(uid, fid string) []byte {
	return append(join(prefixUserTokens, uid, fid), 0)
}
func userTokensPrefix(uid string) []byte {
	return append(join(prefixUserTokens, uid), 0)
}

// userFamilyKey indexes a family under its user, ordered by when it was
// opened (then by id).
func userFamilyKey(uid string, created int64, fid string) []byte {
	k := userFamiliesPrefix(uid)
	k = binary.BigEndian.AppendUint64(k, uint64(created))
	return append(k, fid...)
}
func userFamiliesPrefix(uid string) []byte {
	return append(join(prefixUserFamily, uid), 0)
}

func tokenExpiryKey(expires int64, id string) []byte {
	k := make([]byte, 0, len(prefixTokenExpiry)+8+len(id))
	k = append(k, prefixTokenExpiry...)
	k = binary.BigEndian.AppendUint64(k, uint64(expires))
	return append(k, id...)
}

func throttleAddrKey(hash []byte) []byte   { return join(prefixThrottle, "a"+hex.EncodeToString(hash)) }
func throttleLoginKey(login string) []byte { return join(prefixThrottle, "l"+login) }

// endedFamilyKey indexes an ended family's record for pruning at until.
func endedFamilyKey(until int64, id string) []byte {
	k := make([]byte, 0, len(prefixEndedFamily)+8+len(id))
	k = append(k, prefixEndedFamily...)
	k = binary.BigEndian.AppendUint64(k, uint64(until))
	return append(k, id...)
}

func throttleExpiryKey(expires int64, key []byte) []byte {
	k := make([]byte, 0, len(prefixThrottleExp)+8+len(key))
	k = append(k, prefixThrottleExp...)
	k = binary.BigEndian.AppendUint64(k, uint64(expires))
	return append(k, key...)
}

func join(prefix []byte, parts ...string) []byte {
	n := len(prefix)
	for _, p := range parts {
		n += len(p) + 1
	}
	k := make([]byte, 0, n)
	k = append(k, prefix...)
	for i, p := range parts {
		if i > 0 {
			k = append(k, 0)
		}
		k = append(k, p...)
	}
	return k
}

func userKey(id string) []byte         { return join(prefixUser, id) }
func loginKey(login string) []byte     { return join(prefixLogin, login) }
func deviceKey(uid, did string) []byte { return join(prefixDevice, uid, did) }
func deviceOwnerKey(did string) []byte { return join(prefixDeviceOwner, did) }
func nodeKey(id string) []byte         { return join(prefixNode, id) }
func requestKey(id string) []byte      { return join(prefixRequest, id) }
func userDevicesPrefix(uid string) []byte {
	k := join(prefixDevice, uid)
	return append(k, 0)
}

func changeKey(rev uint64, seq uint32) []byte {
	k := make([]byte, 0, len(prefixChange)+12)
	k = append(k, prefixChange...)
	k = binary.BigEndian.AppendUint64(k, rev)
	return binary.BigEndian.AppendUint32(k, seq)
}

func requestRevKey(rev uint64, id string) []byte {
	k := make([]byte, 0, len(prefixRequestRev)+8+len(id))
	k = append(k, prefixRequestRev...)
	k = binary.BigEndian.AppendUint64(k, rev)
	return append(k, id...)
}

// prefixEnd returns the smallest key greater than every key with prefix p.
func prefixEnd(p []byte) []byte {
	end := append([]byte(nil), p...)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i] < 0xff {
			end[i]++
			return end[:i+1]
		}
	}
	return nil
}

func mailboxKey(did string) []byte { return join(prefixMailbox, did) }

func mailPurgeKey(did string) []byte { return join(prefixMailPurge, did) }

// mailEntriesPrefix is the prefix of every entry of one device's mailbox.
func mailEntriesPrefix(did string) []byte { return append(join(prefixMailEntry, did), 0) }

func mailEntryKey(did string, seq uint64) []byte {
	return binary.BigEndian.AppendUint64(mailEntriesPrefix(did), seq)
}

func mailExpiryKey(expires int64, did string, seq uint64) []byte {
	k := make([]byte, 0, len(prefixMailExpiry)+8+len(did)+1+8)
	k = append(k, prefixMailExpiry...)
	k = binary.BigEndian.AppendUint64(k, uint64(expires))
	k = append(k, did...)
	k = append(k, 0)
	return binary.BigEndian.AppendUint64(k, seq)
}

// mailExpiryEnd is the first expiry key after every entry that expires at
// or before t.
func mailExpiryEnd(t int64) []byte {
	k := make([]byte, 0, len(prefixMailExpiry)+8)
	k = append(k, prefixMailExpiry...)
	return binary.BigEndian.AppendUint64(k, uint64(t)+1)
}

// timedSuffix returns what follows the prefix and the 8-byte time or
// revision of an index key (request ids by revision, refresh tokens and
// login throttles by expiry). None shorter is written; one that came in
// with a snapshot or backup is reported not ok, and skipped alike on
// every node.
func timedSuffix(k, prefix []byte) ([]byte, bool) {
	if len(k) < len(prefix)+8 {
		return nil, false
	}
	return k[len(prefix)+8:], true
}

// dueIDs returns, in key order, the ids of the index entries under
// prefix before end (prefix, an 8-byte time or revision, an id), those
// timedSuffix takes.
func dueIDs(r state.Reader, prefix, end []byte) ([]string, error) {
	var ids []string
	err := r.Iterate(prefix, end, func(k, _ []byte) (bool, error) {
		if id, ok := timedSuffix(k, prefix); ok {
			ids = append(ids, string(id))
		}
		return true, nil
	})
	return ids, err
}

// parseMailExpiryKey returns the device id and seq of an expiry key.
func parseMailExpiryKey(k []byte) (did string, seq uint64, ok bool) {
	rest := k[len(prefixMailExpiry):]
	if len(rest) < 8+1+8 || rest[len(rest)-9] != 0 {
		return "", 0, false
	}
	return string(rest[8 : len(rest)-9]), binary.BigEndian.Uint64(rest[len(rest)-8:]), true
}

func mailDedupKey(did, sender, eventID string) []byte {
	return join(prefixMailDedup, did, sender, eventID)
}

// eventPart encodes an event (sender, event id) inside a key. Event ids
// are at most MaxIDLen (< 256) bytes, validated before any key is built.
func eventPart(k []byte, sender, eventID string) []byte {
	k = append(k, sender...)
	k = append(k, 0, byte(len(eventID)))
	return append(k, eventID...)
}

// eventIndexPrefix is the prefix of every index record of one event.
func eventIndexPrefix(sender, eventID string) []byte {
	return eventPart(append([]byte(nil), prefixEventIndex...), sender, eventID)
}

func eventIndexKey(sender, eventID, did string, seq uint64) []byte {
	k := append(eventIndexPrefix(sender, eventID), did...)
	k = append(k, 0)
	return binary.BigEndian.AppendUint64(k, seq)
}

// parseEventIndexKey returns the device id and seq of an index record
// whose event prefix is p.
func parseEventIndexKey(k, p []byte) (did string, seq uint64, ok bool) {
	rest := k[len(p):]
	if len(rest) < 1+8 || rest[len(rest)-9] != 0 {
		return "", 0, false
	}
	return string(rest[:len(rest)-9]), binary.BigEndian.Uint64(rest[len(rest)-8:]), true
}

func claimKey(sender, eventID string) []byte {
	return eventPart(append([]byte(nil), prefixClaim...), sender, eventID)
}

func claimExpiryKey(expires int64, sender, eventID string) []byte {
	k := binary.BigEndian.AppendUint64(append([]byte(nil), prefixClaimExpiry...), uint64(expires))
	return eventPart(k, sender, eventID)
}

// claimExpiryEnd is the first claim expiry key after every claim that
// expires at or before t.
func claimExpiryEnd(t int64) []byte {
	return binary.BigEndian.AppendUint64(append([]byte(nil), prefixClaimExpiry...), uint64(t)+1)
}

// parseClaimExpiryKey returns the claim key a claim expiry key orders.
func parseClaimExpiryKey(k []byte) ([]byte, bool) {
	rest := k[len(prefixClaimExpiry):]
	if len(rest) < 8+2 {
		return nil, false
	}
	return append(append([]byte(nil), prefixClaim...), rest[8:]...), true
}
