package fsm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"unicode/utf8"

	"google.golang.org/protobuf/proto"

	statev1 "github.com/edge-relay/relay/proto/state/v1"
	"github.com/edge-relay/relay/storage/state"
)

// Mailbox limits. The per-device quotas travel in each PutMailbox command
// (the proposer's configuration), bounded by the caps here; apply never
// reads a node-local setting, so replicas configured differently cannot
// diverge.
const (
	// MaxMailboxBatch bounds the entries of one PutMailbox command.
	MaxMailboxBatch = 1024
	// MaxMailboxBatchBytes bounds the summed event sizes of one command
	// (one Raft entry).
	MaxMailboxBatchBytes = 16 << 20
	// MaxMailboxEventBytes bounds one stored event.
	MaxMailboxEventBytes = 256 << 10
	// MaxMailboxTTLMs bounds how far after the command's time an entry may
	// expire (a year and a day: far beyond any TTL an edge allows, so it
	// only catches garbage).
	MaxMailboxTTLMs = 366 * 24 * 3600 * 1000
	// MaxMailboxAck bounds the seqs of one AckMailbox command.
	MaxMailboxAck = 4096

	// DefaultMailboxMaxEntries and DefaultMailboxMaxBytes are the quotas
	// per device when a command carries none.
	DefaultMailboxMaxEntries = 1000
	DefaultMailboxMaxBytes   = 4 << 20
	// MaxMailboxQuotaEntries and MaxMailboxQuotaBytes cap the quotas a
	// command may carry.
	MaxMailboxQuotaEntries = 1 << 20
	MaxMailboxQuotaBytes   = 1 << 30

	// MaxMailboxPageBytes bounds the event bytes one FetchMailbox returns
	// (a page holds at least one entry): with quotas raised, a page of
	// entries of MaxMailboxEventBytes would otherwise reach tens of MiB.
	MaxMailboxPageBytes = 1 << 20

	// DefaultExpireLimit is how many entries one ExpireMailboxes removes
	// when it names no limit; MaxExpireLimit caps the limit it may name.
	DefaultExpireLimit = 4096
	MaxExpireLimit     = 1 << 16
	// DefaultExpireBytes is the max_bytes the leader sets on its
	// ExpireMailboxes (feature mailbox_expire_bytes): 4096 entries of
	// MaxMailboxEventBytes would otherwise be a GiB read in one apply.
	DefaultExpireBytes = 64 << 20

	// DefaultPurgeLimit is the purge_limit the API and the leader set:
	// how many entries of deleted and revoked devices' mailboxes one
	// command removes. MaxPurgeBytes bounds the event bytes of those
	// entries one command reads, whatever its limit (an entry holds up
	// to MaxMailboxEventBytes): it stops once they reach it. With quotas
	// raised to their caps, one device's mailbox alone would otherwise be
	// read, and its deletions held, in one apply. Changing it changes
	// what commands do: it needs a feature of its own.
	DefaultPurgeLimit = 4096
	MaxPurgeBytes     = 64 << 20
)

// ValidateEventID checks the id of an event: 1 to MaxIDLen bytes of
// UTF-8 (ids are client-generated; any characters are allowed).
func ValidateEventID(field, id string) error {
	if id == "" || len(id) > MaxIDLen || !utf8.ValidString(id) {
		return fmt.Errorf("%s must be 1 to %d bytes of UTF-8", field, MaxIDLen)
	}
	return nil
}

// ValidateMailboxEntry checks one entry's own fields (not the state) at
// time nowMs; field prefixes the field names in the error. The API calls
// it before proposing, apply again.
func ValidateMailboxEntry(field string, e *statev1.MailboxEntry, nowMs int64) error {
	if e == nil {
		return fmt.Errorf("%s is missing", field)
	}
	if err := ValidateID(field+".device_id", e.GetDeviceId()); err != nil {
		return err
	}
	if err := ValidateID(field+".user_id", e.GetUserId()); err != nil {
		return err
	}
	if err := ValidateID(field+".sender_device_id", e.GetSenderDeviceId()); err != nil {
		return err
	}
	if err := ValidateEventID(field+".event_id", e.GetEventId()); err != nil {
		return err
	}
	if n := len(e.GetEvent()); n == 0 || n > MaxMailboxEventBytes {
		return fmt.Errorf("%s.event is %d bytes, want 1 to %d", field, n, MaxMailboxEventBytes)
	}
	if tp := e.GetTraceparent(); len(tp) > MaxTraceparentBytes || !printableASCII(tp) {
		return fmt.Errorf("%s.traceparent must be at most %d bytes of printable ASCII", field, MaxTraceparentBytes)
	}
	return validExpiry(field+".expires_at_ms", e.GetExpiresAtMs(), nowMs)
}

// MaxTraceparentBytes bounds a mailbox entry's trace context (a W3C
// traceparent is 55 bytes).
const MaxTraceparentBytes = 64

func printableASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

// validExpiry checks an expiry time: positive, and at most MaxMailboxTTLMs
// after nowMs (when nowMs is known).
func validExpiry(field string, exp, nowMs int64) error {
	if exp <= 0 {
		return fmt.Errorf("%s must be positive", field)
	}
	if nowMs > 0 && exp-nowMs > MaxMailboxTTLMs {
		return fmt.Errorf("%s is more than %d days ahead", field, MaxMailboxTTLMs/(24*3600*1000))
	}
	return nil
}

// mailboxes holds the counters of the mailboxes one command changes, each
// read once and written once by flush, in the order the devices were first
// met: deterministic.
type mailboxes struct {
	t     *txn
	boxes map[string]*statev1.Mailbox
	order []string
	// gone and active cache target checks (see targetGone).
	gone, active map[string]bool
}

func (t *txn) mailboxes() *mailboxes {
	return &mailboxes{t: t, boxes: map[string]*statev1.Mailbox{}}
}

// get returns the device's counters (zero when it has no mailbox yet).
func (m *mailboxes) get(did string) (*statev1.Mailbox, error) {
	if mb, ok := m.boxes[did]; ok {
		return mb, nil
	}
	mb := &statev1.Mailbox{DeviceId: did}
	if _, err := m.t.get(mailboxKey(did), mb); err != nil {
		return nil, err
	}
	m.boxes[did] = mb
	m.order = append(m.order, did)
	return mb, nil
}

// drop deletes a stored entry (see dropMailEntry) and counts it off its
// device's counters.
func (m *mailboxes) drop(e *statev1.MailboxEntry) error {
	mb, err := m.get(e.GetDeviceId())
	if err != nil {
		return err
	}
	return m.t.dropMailEntry(e, mb)
}

// indexRef is an index record pointing at a device's entry.
type indexRef struct {
	did string
	seq uint64
	key []byte // the index record's own key
}

// dropIndexed drops the entries the index records point at, in order,
// until their events reach maxBytes (0: no bound; the entry that
// reaches it is dropped too), and returns how many records it took. A
// record without its entry cannot happen (they are written and deleted
// together); it is deleted rather than looped on.
func (m *mailboxes) dropIndexed(refs []indexRef, maxBytes uint64) (dropped int, err error) {
	var read uint64
	for i, r := range refs {
		if maxBytes > 0 && read >= maxBytes {
			return i, nil
		}
		var e statev1.MailboxEntry
		ok, err := m.t.get(mailEntryKey(r.did, r.seq), &e)
		if err != nil {
			return i, err
		}
		if !ok {
			if err := m.t.b.Delete(r.key); err != nil {
				return i, err
			}
			continue
		}
		read += uint64(len(e.GetEvent()))
		if err := m.drop(&e); err != nil {
			return i, err
		}
	}
	return len(refs), nil
}

// targetGone reports, cached for the command (nothing in it changes
// devices or users), whether a device cannot receive entries (see
// mailTargetGone).
func (m *mailboxes) targetGone(userID, deviceID string) (bool, error) {
	if m.gone == nil {
		m.gone, m.active = map[string]bool{}, map[string]bool{}
	}
	key := userID + "\x00" + deviceID
	if g, ok := m.gone[key]; ok {
		return g, nil
	}
	g, err := m.t.mailTargetGone(userID, deviceID, m.active)
	if err != nil {
		return true, err
	}
	m.gone[key] = g
	return g, nil
}

func (m *mailboxes) flush() error {
	for _, did := range m.order {
		if err := m.t.put(mailboxKey(did), m.boxes[did]); err != nil {
			return err
		}
	}
	return nil
}

// mailboxQuotas returns a command's quotas, defaults filled in.
func mailboxQuotas(op *statev1.PutMailbox) (entries, bytes uint64, err error) {
	entries, bytes = op.GetMaxEntriesPerDevice(), op.GetMaxBytesPerDevice()
	if entries == 0 {
		entries = DefaultMailboxMaxEntries
	}
	if bytes == 0 {
		bytes = DefaultMailboxMaxBytes
	}
	if entries > MaxMailboxQuotaEntries {
		return 0, 0, invalid("max_entries_per_device %d is above the cap %d", entries, MaxMailboxQuotaEntries)
	}
	if bytes > MaxMailboxQuotaBytes {
		return 0, 0, invalid("max_bytes_per_device %d is above the cap %d", bytes, MaxMailboxQuotaBytes)
	}
	return entries, bytes, nil
}

func (t *txn) putMailbox(op *statev1.PutMailbox) (*statev1.Result, error) {
	entries := op.GetEntries()
	if len(entries) == 0 || len(entries) > MaxMailboxBatch {
		return nil, invalid("entries holds %d entries, want 1 to %d", len(entries), MaxMailboxBatch)
	}
	maxEntries, maxBytes, err := mailboxQuotas(op)
	if err != nil {
		return nil, err
	}
	// Validate every entry before the first write.
	total := 0
	for i, e := range entries {
		if err := ValidateMailboxEntry(fmt.Sprintf("entries[%d]", i), e, t.now); err != nil {
			return nil, asInvalid(err)
		}
		total += len(e.GetEvent())
	}
	if total > MaxMailboxBatchBytes {
		return nil, invalid("entries hold %d event bytes, at most %d per command", total, MaxMailboxBatchBytes)
	}
	res := &statev1.Result{MailboxResults: make([]*statev1.MailboxResult, len(entries))}
	// Each device's counters are read once and written once.
	boxes := t.mailboxes()
	// One change per device that received entries, with its highest seq,
	// in the order the devices first had an entry stored.
	var changed []*statev1.MailboxChanged
	changedAt := map[string]int{}
	for i, e := range entries {
		g, err := boxes.targetGone(e.GetUserId(), e.GetDeviceId())
		if err != nil {
			return nil, err
		}
		if g {
			res.MailboxResults[i] = &statev1.MailboxResult{Status: statev1.MailboxStatus_MAILBOX_STATUS_TARGET_GONE}
			continue
		}
		r, stored, err := t.putMailEntry(e, boxes, maxEntries, maxBytes, op.GetReplaceExpired())
		if err != nil {
			return nil, err
		}
		res.MailboxResults[i] = r
		if !stored {
			continue
		}
		if j, ok := changedAt[e.GetDeviceId()]; ok {
			changed[j].Seq = r.Seq
		} else {
			changedAt[e.GetDeviceId()] = len(changed)
			changed = append(changed, &statev1.MailboxChanged{DeviceId: e.GetDeviceId(), UserId: e.GetUserId(), Seq: r.Seq})
		}
	}
	if err := boxes.flush(); err != nil {
		return nil, err
	}
	for _, c := range changed {
		if err := t.emit(&statev1.Change{Kind: statev1.ChangeKind_CHANGE_KIND_MAILBOX_CHANGED, Object: &statev1.Change_MailboxChanged{MailboxChanged: c}}); err != nil {
			return nil, err
		}
	}
	return res, nil
}

// mailTargetGone reports whether a device cannot receive mailbox entries:
// it does not exist, belongs to another user, is revoked, or its user is
// missing or not active. active caches users' status across calls.
func (t *txn) mailTargetGone(userID, deviceID string, active map[string]bool) (bool, error) {
	var d statev1.Device
	found, err := t.get(deviceKey(userID, deviceID), &d)
	if err != nil || !found || d.Revoked {
		return true, err
	}
	ok, known := active[userID]
	if !known {
		var u statev1.User
		found, err = t.get(userKey(userID), &u)
		if err != nil {
			return true, err
		}
		ok = found && u.Status == statev1.UserStatus_USER_STATUS_ACTIVE
		active[userID] = ok
	}
	return !ok, nil
}

// putMailEntry stores one entry for a live target, counting it on its
// device's counters in boxes (flushed by the caller); stored is false
// when nothing was written (a duplicate, expired, or a full mailbox).
func (t *txn) putMailEntry(e *statev1.MailboxEntry, boxes *mailboxes, maxEntries, maxBytes uint64, replaceExpired bool) (*statev1.MailboxResult, bool, error) {
	did := e.GetDeviceId()
	dedup := mailDedupKey(did, e.GetSenderDeviceId(), e.GetEventId())
	if v, err := t.b.Get(dedup); err == nil {
		if len(v) != 8 {
			return nil, false, fmt.Errorf("mailbox dedup record %q: %d bytes", dedup, len(v))
		}
		seq := binary.BigEndian.Uint64(v)
		// The first copy may have expired without being removed yet
		// (ExpireMailboxes runs now and then): no fetch returns it, so
		// answering STORED would acknowledge an event nobody gets. It is
		// removed now, and the resend taken as new, as it would be once
		// ExpireMailboxes had run (replace_expired: releases before it
		// answer STORED, and replicas must apply the command alike).
		if !replaceExpired {
			return &statev1.MailboxResult{Status: statev1.MailboxStatus_MAILBOX_STATUS_STORED, Seq: seq}, false, nil
		}
		var first statev1.MailboxEntry
		found, err := t.get(mailEntryKey(did, seq), &first)
		if err != nil {
			return nil, false, err
		}
		if !found || first.GetExpiresAtMs() > t.now {
			return &statev1.MailboxResult{Status: statev1.MailboxStatus_MAILBOX_STATUS_STORED, Seq: seq}, false, nil
		}
		mb, err := boxes.get(did)
		if err != nil {
			return nil, false, err
		}
		if err := t.dropMailEntry(&first, mb); err != nil {
			return nil, false, err
		}
	} else if !errors.Is(err, state.ErrNotFound) {
		return nil, false, err
	}
	if e.GetExpiresAtMs() <= t.now {
		return &statev1.MailboxResult{Status: statev1.MailboxStatus_MAILBOX_STATUS_EXPIRED}, false, nil
	}
	if e.GetAnyOne() {
		// Stored after its event was claimed (the claim raced the write):
		// no device but the one that took it may see it.
		if _, err := t.b.Get(claimKey(e.GetSenderDeviceId(), e.GetEventId())); err == nil {
			return &statev1.MailboxResult{Status: statev1.MailboxStatus_MAILBOX_STATUS_TAKEN}, false, nil
		} else if !errors.Is(err, state.ErrNotFound) {
			return nil, false, err
		}
	}
	mb, err := boxes.get(did)
	if err != nil {
		return nil, false, err
	}
	size := uint64(len(e.GetEvent()))
	if mb.Count+1 > maxEntries || mb.Bytes+size > maxBytes {
		return &statev1.MailboxResult{Status: statev1.MailboxStatus_MAILBOX_STATUS_FULL}, false, nil
	}
	mb.LastSeq++
	mb.Count++
	mb.Bytes += size
	stored := &statev1.MailboxEntry{
		Seq: mb.LastSeq, DeviceId: did, UserId: e.GetUserId(), Event: e.GetEvent(),
		EventId: e.GetEventId(), SenderDeviceId: e.GetSenderDeviceId(),
		ExpiresAtMs: e.GetExpiresAtMs(), StoredAtMs: t.now, AnyOne: e.GetAnyOne(), Traceparent: e.GetTraceparent(),
	}
	if err := t.put(mailEntryKey(did, stored.Seq), stored); err != nil {
		return nil, false, err
	}
	if stored.AnyOne {
		if err := t.b.Set(eventIndexKey(stored.SenderDeviceId, stored.EventId, did, stored.Seq), nil); err != nil {
			return nil, false, err
		}
	}
	if err := t.b.Set(mailExpiryKey(stored.ExpiresAtMs, did, stored.Seq), nil); err != nil {
		return nil, false, err
	}
	if err := t.b.Set(dedup, binary.BigEndian.AppendUint64(nil, stored.Seq)); err != nil {
		return nil, false, err
	}
	return &statev1.MailboxResult{Status: statev1.MailboxStatus_MAILBOX_STATUS_STORED, Seq: stored.Seq}, true, nil
}

// dropMailEntry deletes one stored entry with its index records and takes
// it off mb's counters (the caller writes mb).
func (t *txn) dropMailEntry(e *statev1.MailboxEntry, mb *statev1.Mailbox) error {
	return t.dropMailEntrySized(e, uint64(len(e.GetEvent())), mb)
}

// dropMailEntrySized is dropMailEntry for an entry whose event bytes
// were let go: size is how many it held.
func (t *txn) dropMailEntrySized(e *statev1.MailboxEntry, size uint64, mb *statev1.Mailbox) error {
	keys := [][]byte{
		mailEntryKey(e.GetDeviceId(), e.GetSeq()),
		mailExpiryKey(e.GetExpiresAtMs(), e.GetDeviceId(), e.GetSeq()),
		mailDedupKey(e.GetDeviceId(), e.GetSenderDeviceId(), e.GetEventId()),
	}
	if e.GetAnyOne() {
		keys = append(keys, eventIndexKey(e.GetSenderDeviceId(), e.GetEventId(), e.GetDeviceId(), e.GetSeq()))
	}
	for _, k := range keys {
		if err := t.b.Delete(k); err != nil {
			return err
		}
	}
	if mb.Count > 0 {
		mb.Count--
	}
	if mb.Bytes >= size {
		mb.Bytes -= size
	} else {
		mb.Bytes = 0
	}
	return nil
}

func (t *txn) ackMailbox(op *statev1.AckMailbox) (*statev1.Result, error) {
	did := op.GetDeviceId()
	if err := ValidateID("device_id", did); err != nil {
		return nil, asInvalid(err)
	}
	if len(op.GetSeqs()) > MaxMailboxAck {
		return nil, invalid("seqs holds %d seqs, at most %d allowed", len(op.GetSeqs()), MaxMailboxAck)
	}
	mb := &statev1.Mailbox{}
	found, err := t.get(mailboxKey(did), mb)
	if err != nil {
		return nil, err
	}
	if !found {
		return &statev1.Result{}, nil // no mailbox: nothing to delete
	}
	dropped := false
	for _, seq := range op.GetSeqs() {
		var e statev1.MailboxEntry
		ok, err := t.get(mailEntryKey(did, seq), &e)
		if err != nil {
			return nil, err
		}
		if !ok {
			continue // unknown, or acked twice in this list
		}
		if err := t.dropMailEntry(&e, mb); err != nil {
			return nil, err
		}
		dropped = true
	}
	if dropped {
		if err := t.put(mailboxKey(did), mb); err != nil {
			return nil, err
		}
	}
	return &statev1.Result{}, nil
}

func (t *txn) expireMailboxes(op *statev1.ExpireMailboxes) (*statev1.Result, error) {
	limit := int(op.GetLimit())
	if limit == 0 {
		limit = DefaultExpireLimit
	}
	if limit > MaxExpireLimit {
		return nil, invalid("limit %d is above the cap %d", limit, MaxExpireLimit)
	}
	if t.now <= 0 {
		return nil, invalid("proposed_at_ms is not set")
	}
	budget, err := newPurgeBudget(op.GetPurgeLimit())
	if err != nil {
		return nil, err
	}
	var due []indexRef
	err = t.b.Iterate(prefixMailExpiry, mailExpiryEnd(t.now), func(k, _ []byte) (bool, error) {
		if len(due) == limit {
			return false, nil
		}
		did, seq, ok := parseMailExpiryKey(k)
		if !ok {
			return false, fmt.Errorf("malformed mailbox expiry key %q", k)
		}
		due = append(due, indexRef{did, seq, append([]byte(nil), k...)})
		return true, nil
	})
	if err != nil {
		return nil, err
	}
	boxes := t.mailboxes()
	dropped, err := boxes.dropIndexed(due, op.GetMaxBytes())
	if err != nil {
		return nil, err
	}
	if err := boxes.flush(); err != nil {
		return nil, err
	}
	// Claim records share the limit, after the entries (none once the
	// bytes stopped them: more are due).
	if dropped == len(due) {
		if err := t.expireClaims(limit - len(due)); err != nil {
			return nil, err
		}
	}
	if budget != nil {
		if err := t.purgeMailboxes(budget); err != nil {
			return nil, err
		}
	}
	return &statev1.Result{}, nil
}

// purgeBudget is what a command's purge_limit leaves to remove.
type purgeBudget struct {
	entries, bytes int
}

// newPurgeBudget is the budget of a command's purge_limit; nil (no
// bound: the command predates the feature) for 0.
func newPurgeBudget(limit uint32) (*purgeBudget, error) {
	if limit == 0 {
		return nil, nil
	}
	if limit > MaxExpireLimit {
		return nil, invalid("purge_limit %d is above the cap %d", limit, MaxExpireLimit)
	}
	return &purgeBudget{entries: int(limit), bytes: MaxPurgeBytes}, nil
}

// spent reports whether nothing is left (never for no budget).
func (b *purgeBudget) spent() bool { return b != nil && (b.entries <= 0 || b.bytes <= 0) }

// deleteMailbox removes a device's mailbox: entries, index records and
// counters, at most what budget allows (nil: all). A mailbox not emptied
// keeps its counters and gets a purge record, and later commands'
// budgets go on with it (purgeMailboxes); gone reports whether it was
// emptied, its purge record deleted with it.
func (t *txn) deleteMailbox(did string, budget *purgeBudget) (gone bool, err error) {
	type dropped struct {
		e    *statev1.MailboxEntry
		size uint64
	}
	var entries []dropped
	gone = true
	p := mailEntriesPrefix(did)
	err = t.b.Iterate(p, prefixEnd(p), func(_, v []byte) (bool, error) {
		if budget.spent() {
			gone = false
			return false, nil
		}
		e := &statev1.MailboxEntry{}
		if err := proto.Unmarshal(v, e); err != nil {
			return false, fmt.Errorf("decode mailbox entry: %w", err)
		}
		size := len(e.GetEvent())
		entries = append(entries, dropped{e, uint64(size)})
		e.Event = nil // only its size counts from here
		if budget != nil {
			// The event's bytes, as the command that stored it gave them:
			// the record's length could differ between replicas of two
			// releases (a field only one of them stores).
			budget.entries--
			budget.bytes -= size
		}
		return true, nil
	})
	if err != nil {
		return false, err
	}
	mb := &statev1.Mailbox{DeviceId: did}
	if !gone {
		if _, err := t.get(mailboxKey(did), mb); err != nil {
			return false, err
		}
	}
	for _, d := range entries {
		if err := t.dropMailEntrySized(d.e, d.size, mb); err != nil {
			return false, err
		}
	}
	if !gone {
		if err := t.put(mailboxKey(did), mb); err != nil {
			return false, err
		}
		return false, t.b.Set(mailPurgeKey(did), nil)
	}
	if err := t.b.Delete(mailboxKey(did)); err != nil {
		return false, err
	}
	return true, t.b.Delete(mailPurgeKey(did))
}

// purging reports whether a device's mailbox is being emptied (it has a
// purge record): none of it is fetched or announced any more.
func purging(r state.Reader, did string) (bool, error) {
	_, err := r.Get(mailPurgeKey(did))
	if errors.Is(err, state.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read the purge record of %q: %w", did, err)
	}
	return true, nil
}

// purgeMailboxes goes on emptying the mailboxes of deleted and revoked
// devices (their purge records), in device id order, within budget. A
// deleted device's id is free again once its mailbox is gone.
func (t *txn) purgeMailboxes(budget *purgeBudget) error {
	var dids []string
	// Every device looked at either empties its mailbox or spends the
	// rest of the budget, so no more than the budget's entries (and one)
	// can be reached.
	err := t.b.Iterate(prefixMailPurge, prefixEnd(prefixMailPurge), func(k, _ []byte) (bool, error) {
		dids = append(dids, string(k[len(prefixMailPurge):]))
		return len(dids) <= budget.entries, nil
	})
	if err != nil {
		return err
	}
	for _, did := range dids {
		if budget.spent() {
			return nil
		}
		gone, err := t.deleteMailbox(did, budget)
		if err != nil || !gone {
			return err
		}
		owner, err := t.b.Get(deviceOwnerKey(did))
		if errors.Is(err, state.ErrNotFound) {
			continue
		}
		if err != nil {
			return err
		}
		if len(owner) == 0 { // a deleted device's id, taken until now
			if err := t.b.Delete(deviceOwnerKey(did)); err != nil {
				return err
			}
		}
	}
	return nil
}

// FetchMailbox returns up to limit entries of a device's mailbox with
// seqs after afterSeq, oldest first, holding at most maxBytes of events
// (0 or more than MaxMailboxPageBytes: MaxMailboxPageBytes; always at
// least one entry), skipping entries that expired at
// or before nowMs (expiry may not have removed them yet), and whether
// more unexpired entries follow. One consistent view. A device that does
// not exist answers ErrNotFound.
func (f *FSM) FetchMailbox(deviceID string, afterSeq uint64, limit, maxBytes int, nowMs int64) ([]*statev1.MailboxEntry, bool, error) {
	if maxBytes <= 0 || maxBytes > MaxMailboxPageBytes {
		maxBytes = MaxMailboxPageBytes
	}
	snap := f.store.Snapshot()
	defer snap.Close()
	if _, err := deviceOwner(snap, deviceID); err != nil {
		return nil, false, err
	}
	if p, err := purging(snap, deviceID); err != nil || p {
		return nil, false, err // a revoked device's, being emptied
	}
	if afterSeq == ^uint64(0) {
		return nil, false, nil // nothing can follow
	}
	var out []*statev1.MailboxEntry
	more, size := false, 0
	err := snap.Iterate(mailEntryKey(deviceID, afterSeq+1), prefixEnd(mailEntriesPrefix(deviceID)), func(_, v []byte) (bool, error) {
		var e statev1.MailboxEntry
		if err := proto.Unmarshal(v, &e); err != nil {
			return false, fmt.Errorf("decode mailbox entry: %w", err)
		}
		if e.GetExpiresAtMs() <= nowMs {
			return true, nil
		}
		size += len(e.GetEvent())
		if len(out) == limit || (len(out) > 0 && size > maxBytes) {
			more = true
			return false, nil
		}
		out = append(out, &e)
		return true, nil
	})
	if err != nil {
		return nil, false, err
	}
	return out, more, nil
}

// Mailbox returns a device's mailbox counters, or ErrNotFound when it
// never received an entry (or the device is gone).
func (f *FSM) Mailbox(deviceID string) (*statev1.Mailbox, error) {
	var mb statev1.Mailbox
	if err := getRecord(f.store, mailboxKey(deviceID), &mb, fmt.Sprintf("mailbox of %q", deviceID)); err != nil {
		return nil, err
	}
	return &mb, nil
}

// MailboxExpiryDue reports whether some mailbox entry or claim record
// expires at or before nowMs, or (with purge) a deleted or revoked
// device's mailbox is still being emptied: the leader proposes
// ExpireMailboxes only then.
func (f *FSM) MailboxExpiryDue(nowMs int64, purge bool) (bool, error) {
	due := false
	found := func(_, _ []byte) (bool, error) {
		due = true
		return false, nil
	}
	if err := f.store.Iterate(prefixMailExpiry, mailExpiryEnd(nowMs), found); err != nil || due {
		return due, err
	}
	if purge {
		if err := f.store.Iterate(prefixMailPurge, prefixEnd(prefixMailPurge), found); err != nil || due {
			return due, err
		}
	}
	err := f.store.Iterate(prefixClaimExpiry, claimExpiryEnd(nowMs), found)
	return due, err
}
