package fsm

import (
	"fmt"

	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// MaxClaimBatch bounds the claims of one ClaimEvents command.
const MaxClaimBatch = 1024

// ValidateEventClaim checks one claim's own fields (not the state) at
// time nowMs; field prefixes the field names in the error. The API calls
// it before proposing, apply again.
func ValidateEventClaim(field string, c *statev1.EventClaim, nowMs int64) error {
	if c == nil {
		return fmt.Errorf("%s is missing", field)
	}
	if err := ValidateID(field+".sender_device_id", c.GetSenderDeviceId()); err != nil {
		return err
	}
	if err := ValidateEventID(field+".event_id", c.GetEventId()); err != nil {
		return err
	}
	if err := ValidateID(field+".device_id", c.GetDeviceId()); err != nil {
		return err
	}
	if err := ValidateID(field+".user_id", c.GetUserId()); err != nil {
		return err
	}
	return validExpiry(field+".expires_at_ms", c.GetExpiresAtMs(), nowMs)
}

// MaxClaimRecordGraceMs bounds ClaimEvents' record_grace_ms: a day.
const MaxClaimRecordGraceMs = 24 * 60 * 60 * 1000

func (t *txn) claimEvents(op *statev1.ClaimEvents) (*statev1.Result, error) {
	claims := op.GetClaims()
	if len(claims) == 0 || len(claims) > MaxClaimBatch {
		return nil, invalid("claims holds %d claims, want 1 to %d", len(claims), MaxClaimBatch)
	}
	if t.now <= 0 {
		return nil, invalid("proposed_at_ms is not set")
	}
	grace := op.GetRecordGraceMs()
	if grace < 0 || grace > MaxClaimRecordGraceMs {
		return nil, invalid("record_grace_ms %d is outside 0 to %d", grace, MaxClaimRecordGraceMs)
	}
	for i, c := range claims {
		if err := ValidateEventClaim(fmt.Sprintf("claims[%d]", i), c, t.now); err != nil {
			return nil, asInvalid(err)
		}
	}
	res := &statev1.Result{ClaimsWon: make([]bool, len(claims))}
	boxes := t.mailboxes()
	for i, c := range claims {
		g, err := boxes.targetGone(c.GetUserId(), c.GetDeviceId())
		if err != nil {
			return nil, err
		}
		if g {
			continue // a gone device takes nothing
		}
		key := claimKey(c.GetSenderDeviceId(), c.GetEventId())
		var rec statev1.EventClaim
		found, err := t.get(key, &rec)
		if err != nil {
			return nil, err
		}
		if found {
			res.ClaimsWon[i] = rec.GetDeviceId() == c.GetDeviceId()
			continue
		}
		if c.GetExpiresAtMs() <= t.now {
			// The event is over and nobody took it: the device, which
			// acknowledged it in time or the claim would not exist, keeps
			// it, as when the control plane cannot decide in time (a
			// duplicate is better than a Cancel for a device nobody beat).
			// Nothing is recorded: a record would outlive the event.
			res.ClaimsWon[i] = true
			continue
		}
		rec = statev1.EventClaim{
			SenderDeviceId: c.GetSenderDeviceId(), EventId: c.GetEventId(),
			DeviceId: c.GetDeviceId(), UserId: c.GetUserId(),
			ExpiresAtMs: c.GetExpiresAtMs(), ClaimedAtMs: t.now,
		}
		if err := t.put(key, &rec); err != nil {
			return nil, err
		}
		// Removed only grace after the event's expiry: a claim retried
		// late (batched, through a leader change) must find who took it,
		// not find nothing and take it too.
		if err := t.b.Set(claimExpiryKey(rec.ExpiresAtMs+grace, rec.SenderDeviceId, rec.EventId), nil); err != nil {
			return nil, err
		}
		if err := t.dropSiblings(&rec, boxes); err != nil {
			return nil, err
		}
		res.ClaimsWon[i] = true
	}
	if err := boxes.flush(); err != nil {
		return nil, err
	}
	return res, nil
}

// dropSiblings deletes the any_one entries of a claimed event from every
// mailbox but the winner's, through the event index (no scan), counting
// them off boxes.
func (t *txn) dropSiblings(rec *statev1.EventClaim, boxes *mailboxes) error {
	p := eventIndexPrefix(rec.GetSenderDeviceId(), rec.GetEventId())
	var refs []indexRef
	err := t.b.Iterate(p, prefixEnd(p), func(k, _ []byte) (bool, error) {
		did, seq, ok := parseEventIndexKey(k, p)
		if !ok {
			return false, fmt.Errorf("malformed event index key %q", k)
		}
		if did != rec.GetDeviceId() {
			refs = append(refs, indexRef{did, seq, append([]byte(nil), k...)})
		}
		return true, nil
	})
	if err != nil {
		return err
	}
	_, err = boxes.dropIndexed(refs, 0)
	return err
}

// expireClaims removes up to limit claim records whose time is at or
// before the command's, oldest first.
func (t *txn) expireClaims(limit int) error {
	if limit <= 0 {
		return nil
	}
	var due [][2][]byte // expiry key, claim key
	err := t.b.Iterate(prefixClaimExpiry, claimExpiryEnd(t.now), func(k, _ []byte) (bool, error) {
		if len(due) == limit {
			return false, nil
		}
		ck, ok := parseClaimExpiryKey(k)
		if !ok {
			return false, fmt.Errorf("malformed claim expiry key %q", k)
		}
		due = append(due, [2][]byte{append([]byte(nil), k...), ck})
		return true, nil
	})
	if err != nil {
		return err
	}
	for _, d := range due {
		for _, k := range d {
			if err := t.b.Delete(k); err != nil {
				return err
			}
		}
	}
	return nil
}

// Claim returns the record of who took an "any one" event, or
// ErrNotFound when nobody did (or the record expired and was removed).
func (f *FSM) Claim(sender, eventID string) (*statev1.EventClaim, error) {
	if ValidateID("sender_device_id", sender) != nil || ValidateEventID("event_id", eventID) != nil {
		return nil, fmt.Errorf("claim of %q/%q: %w", sender, eventID, ErrNotFound)
	}
	var c statev1.EventClaim
	if err := getRecord(f.store, claimKey(sender, eventID), &c, fmt.Sprintf("claim of %q/%q", sender, eventID)); err != nil {
		return nil, err
	}
	return &c, nil
}
