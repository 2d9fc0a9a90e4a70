package partitiontest

import (
	"fmt"
	"sort"
	"sync"
	"time"
)

// RelayLog records what senders saw acknowledged and what receivers got
// at the client API (after the client's own deduplication), and checks
// the relay's promise: every event a sender saw acknowledged reaches each
// target exactly once, in the order the sender sent them, and nothing
// arrives after its TTL; an event whose send failed arrives at most once,
// and one the edge refused never.
type RelayLog struct {
	mu   sync.Mutex // guards the fields below
	sent map[string]*sentEvent
	// order: per sender, ids in the order they were sent.
	order map[string][]string
	recv  map[string][]received // by target device
	// changed is closed and replaced on every ack and receipt.
	changed chan struct{}
}

type sentEvent struct {
	sender  string
	targets []string
	index   int // position in the sender's order
	acked   bool
	refused bool // the edge refused it: it must never arrive
	sentAt  time.Time
	ttl     time.Duration
}

type received struct {
	id, sender string
	at         time.Time
}

// NewRelayLog returns an empty log.
func NewRelayLog() *RelayLog {
	return &RelayLog{sent: map[string]*sentEvent{}, order: map[string][]string{}, recv: map[string][]received{}, changed: make(chan struct{})}
}

// Sending notes an event about to be sent (one sender sends one at a
// time, so this is its order); Acked marks it acknowledged.
func (l *RelayLog) Sending(sender, id string, targets []string, ttl time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.sent[id] = &sentEvent{sender: sender, targets: targets, index: len(l.order[sender]), sentAt: time.Now(), ttl: ttl}
	l.order[sender] = append(l.order[sender], id)
}

// Acked marks an event acknowledged to its sender.
func (l *RelayLog) Acked(id string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.sent[id].acked = true
	l.notify()
}

// Refused marks an event the edge refused (a Reject): it must never
// arrive.
func (l *RelayLog) Refused(id string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.sent[id].refused = true
}

// Received notes an event a target got from its client.
func (l *RelayLog) Received(target, sender, id string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.recv[target] = append(l.recv[target], received{id: id, sender: sender, at: time.Now()})
	l.notify()
}

// notify wakes WaitComplete; l.mu is held.
func (l *RelayLog) notify() {
	close(l.changed)
	l.changed = make(chan struct{})
}

// WaitComplete waits until every acknowledged event has reached each of
// its targets, or within has passed, and returns how many (event,
// target) pairs are still missing.
func (l *RelayLog) WaitComplete(within time.Duration) int {
	deadline := time.After(within)
	for {
		l.mu.Lock()
		ch := l.changed
		l.mu.Unlock()
		n := l.Missing()
		if n == 0 {
			return 0
		}
		select {
		case <-ch:
		case <-deadline:
			return n
		}
	}
}

// Missing counts acknowledged (event, target) pairs not yet received.
func (l *RelayLog) Missing() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	got := map[[2]string]bool{}
	for target, rs := range l.recv {
		for _, r := range rs {
			got[[2]string{target, r.id}] = true
		}
	}
	n := 0
	for id, s := range l.sent {
		if !s.acked {
			continue
		}
		for _, t := range s.targets {
			if !got[[2]string{t, id}] {
				n++
			}
		}
	}
	return n
}

// Stats: events sent, acknowledged, deliveries.
func (l *RelayLog) Stats() (sent, acked, delivered int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, s := range l.sent {
		sent++
		if s.acked {
			acked++
		}
	}
	for _, rs := range l.recv {
		delivered += len(rs)
	}
	return sent, acked, delivered
}

// Check returns every violation found.
func (l *RelayLog) Check() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var bad []string
	count := map[[2]string]int{}
	for target, rs := range l.recv {
		last := map[string]int{} // sender -> index of the last event received from it
		for _, r := range rs {
			count[[2]string{target, r.id}]++
			s, ok := l.sent[r.id]
			if !ok {
				bad = append(bad, fmt.Sprintf("%s received %s, which nobody sent", target, r.id))
				continue
			}
			if r.sender != s.sender {
				bad = append(bad, fmt.Sprintf("%s received %s from %s, sent by %s", target, r.id, r.sender, s.sender))
			}
			if s.refused {
				bad = append(bad, fmt.Sprintf("%s received %s, which the edge refused", target, r.id))
			}
			if prev, ok := last[s.sender]; ok && s.index < prev {
				bad = append(bad, fmt.Sprintf("%s received %s (#%d of %s) after #%d: out of the sender's order", target, r.id, s.index, s.sender, prev))
			}
			last[s.sender] = s.index
			// The TTL counts from the sender's clock at sending; sender
			// and receiver share this machine's clock, with a margin for
			// the time the send call took to start.
			if r.at.After(s.sentAt.Add(s.ttl + time.Second)) {
				bad = append(bad, fmt.Sprintf("%s received %s %v after it was sent, past its TTL %v", target, r.id, r.at.Sub(s.sentAt), s.ttl))
			}
		}
	}
	for id, s := range l.sent {
		for _, t := range s.targets {
			n := count[[2]string{t, id}]
			switch {
			case n > 1:
				bad = append(bad, fmt.Sprintf("%s received %s %d times", t, id, n))
			case n == 0 && s.acked && time.Since(s.sentAt) < s.ttl:
				bad = append(bad, fmt.Sprintf("%s never received %s (#%d of %s), which was acknowledged", t, id, s.index, s.sender))
			}
		}
	}
	sort.Strings(bad)
	return bad
}
