package session

import "sync"

// emptyMailboxes remembers devices whose mailbox the edge found empty and
// that the watch feed has announced no entry for since, so a device that
// reconnects (a resume, a reconnect storm) opens its session without
// asking the control plane for its mailbox twice.
//
// It is only trusted while the edge follows the watch feed, which
// announces every stored entry (Hub.MailboxChanged): a device is marked
// only after a fetch that found nothing, during which no announcement
// and no interruption of the feed came (epoch unchanged); an
// announcement for it forgets it; a full copy of the state, in which the
// feed does not announce entries, forgets every device. A session that
// opened on the mark and whose device was announced before the session
// could be found fetches once it can (Session.run checks the mark again
// after registering).
type emptyMailboxes struct {
	mu    sync.Mutex
	live  bool   // the feed announces stored entries
	epoch uint64 // counts announcements and changes of live
	known map[string]struct{}
}

// maxKnownEmpty bounds the devices remembered; past it the set starts
// again (a fetch per device the next time it connects).
const maxKnownEmpty = 1 << 20

// lookup reports whether device's mailbox is known to be empty, and the
// epoch to pass to mark after a fetch.
func (e *emptyMailboxes) lookup(device string) (empty bool, epoch uint64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	_, empty = e.known[device]
	return empty && e.live, e.epoch
}

// mark remembers that a fetch begun at epoch found device's mailbox
// empty, unless something was announced or the feed changed meanwhile.
func (e *emptyMailboxes) mark(device string, epoch uint64) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.live || e.epoch != epoch {
		return false
	}
	if e.known == nil || len(e.known) >= maxKnownEmpty {
		e.known = make(map[string]struct{})
	}
	e.known[device] = struct{}{}
	return true
}

// changed forgets device: an entry was stored for it.
func (e *emptyMailboxes) changed(device string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.epoch++
	delete(e.known, device)
}

// feed notes whether the watch feed announces stored entries from now
// on; either way what was known is forgotten.
func (e *emptyMailboxes) feed(live bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.epoch++
	e.live = live
	e.known = nil
}
