// Package directory is the edge's in-memory copy of what it needs from
// the control plane: devices with their keys, which users are active, the
// session-key ring and the edge members. It follows the control plane's
// watch feed (full copy, then changes; resumes from its revision after any
// error) and tells the edge whose sessions must close.
package directory

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/edge-relay/relay/edge/session"
	"github.com/edge-relay/relay/internal/jitter"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
)

// Device is what the edge knows of a device.
type Device struct {
	ID        string
	UserID    string
	PublicKey []byte
	Revoked   bool
}

// Removal says that sessions of a device (or of all devices of a user,
// when DeviceID is empty) must close, and why.
type Removal struct {
	UserID   string
	DeviceID string
	Reason   string // one of the Reason constants: also the sessions' close message
}

// Why devices and users are removed (Removal.Reason).
const (
	ReasonDeviceRevoked = "device revoked"
	ReasonDeviceDeleted = "device deleted"
	ReasonUserDeleted   = "user deleted"
	ReasonUserDisabled  = "user disabled"
)

// Config configures a Directory.
type Config struct {
	// Ring receives the session-key ring; required.
	Ring *session.Ring
	// OnRemove is called (from the following goroutine) for every device
	// or user whose sessions must close. It must not block for long.
	OnRemove func(Removal)
	// OnMailbox is called (from the following goroutine) when a device's
	// mailbox received entries up to seq, and after a full copy for every
	// mailbox that holds entries (the live announcements a gap in the feed
	// lost are not replayed). It must not block for long.
	OnMailbox func(userID, deviceID string, seq uint64)
	// OnEdges is called (from the following goroutine) after the member
	// list changed, with the new list.
	OnEdges func([]Edge)
	// OnRewind is called (from the following goroutine) after a full copy
	// whose revision is below the one the directory had reached: the
	// control plane was restored from an older backup (or built anew), so
	// its revisions and mailbox sequence numbers went back, and whatever
	// was derived from the old history (sessions' mailbox cursors) is
	// void. It is called before the copy's mailbox announcements.
	OnRewind func(from, to uint64)
	// StallTimeout: a watch stream that brings no message for this long
	// (the control plane sends a progress at least every 5 s, its
	// ProgressInterval, and ends a resumed stream it cannot serve within
	// its CatchUpWait, 3 s) is given up and resumed, on another control
	// node when the client moves on Unavailable (controlconn does). HTTP/2
	// pings do not tell: a node that holds the stream open and sends
	// nothing (its applied index lags the edge's revision) answers them.
	// Default 8s.
	StallTimeout time.Duration
	// Logger; default slog.Default().
	Logger *slog.Logger
}

type snapshot struct {
	devices map[string]Device
	byUser  map[string]map[string]struct{} // user -> its active devices
	users   map[string]bool                // id -> active
	edges   map[string]Edge
	// mail holds, while this is a full copy being staged, the mailboxes
	// it announced (one per mailbox with entries): they are passed to
	// OnMailbox once the copy is in place. Always empty in d.cur.
	mail []mailboxNote
	// ring holds, while this is a full copy being staged, the session
	// keys it carried: set in the Ring once the copy is in place, with the
	// rest. Set at once, a copy cut off after its keys (and the feed
	// resumed, from the revision before it, on a node behind the one that
	// sent it) would have the keys go back to an older ring, one whose
	// retired keys open tickets again. Always nil in d.cur.
	ring *stagedRing
}

// stagedRing is a session-key ring a full copy carried.
type stagedRing struct {
	current string
	keys    []session.SessionKey
}

// Edge is a member of the mesh.
type Edge struct {
	ID       string
	Addrs    []string // where devices connect
	MeshAddr string   // where edges connect
	// MeshKey is the Ed25519 key the edge registered its lease with (nil
	// in records from before the key was kept).
	MeshKey ed25519.PublicKey
}

func (s *snapshot) putDevice(d Device) {
	if old, ok := s.devices[d.ID]; ok {
		s.dropFromUser(old)
	}
	s.devices[d.ID] = d
	if !d.Revoked {
		set := s.byUser[d.UserID]
		if set == nil {
			set = map[string]struct{}{}
			s.byUser[d.UserID] = set
		}
		set[d.ID] = struct{}{}
	}
}

func (s *snapshot) deleteDevice(id string) {
	if old, ok := s.devices[id]; ok {
		s.dropFromUser(old)
		delete(s.devices, id)
	}
}

func (s *snapshot) dropFromUser(d Device) {
	if set := s.byUser[d.UserID]; set != nil {
		delete(set, d.ID)
		if len(set) == 0 {
			delete(s.byUser, d.UserID)
		}
	}
}

// maxTombstones bounds how many deleted devices are remembered (to tell a
// sender "deleted" rather than "unknown"); the oldest are forgotten first.
const maxTombstones = 1 << 16

// tombstones remembers devices deleted while this edge followed the
// feed: id -> owning user.
type tombstones struct {
	owner map[string]string
	order []string
}

func (t *tombstones) add(deviceID, userID string) {
	if t.owner == nil {
		t.owner = map[string]string{}
	}
	if _, ok := t.owner[deviceID]; ok {
		return
	}
	if len(t.order) >= maxTombstones {
		delete(t.owner, t.order[0])
		t.order = t.order[1:]
	}
	t.owner[deviceID] = userID
	t.order = append(t.order, deviceID)
}

func newSnapshot() snapshot {
	return snapshot{devices: map[string]Device{}, byUser: map[string]map[string]struct{}{}, users: map[string]bool{}, edges: map[string]Edge{}}
}

// Directory is safe for concurrent use: one goroutine applies the feed,
// sessions read.
type Directory struct {
	cfg Config

	mu       sync.RWMutex // guards the fields below
	cur      snapshot
	staging  *snapshot // non-nil during a full copy
	deleted  tombstones
	revision uint64
	history  string // of the last full copy (SnapshotDone.history)
	synced   bool
	changed  chan struct{} // closed and replaced when synced or revision moves
	// current is when the control plane last said the copy is complete
	// (a progress message, or the end of a full copy): see metrics.go.
	current time.Time
	// heard is when the last message of the feed arrived that keeps the
	// state fresh: every message, except those of a full copy begun after
	// another was cut off halfway (cutCopy), until one completes.
	heard time.Time
	// cutCopy says a full copy was cut off halfway since the state was
	// last current: the messages of the copies after it prove only that
	// the control plane answers, not that the state will be brought
	// current, so they do not count as hearing it (a copy that keeps
	// breaking would otherwise hold off --control-grace for good).
	cutCopy bool

	// announced is the revision up to which every mailbox announcement
	// was handed to OnMailbox (it trails revision, which moves before the
	// announcements are made, outside the lock); blind counts full copies
	// that did not announce the mailboxes holding entries (from control
	// planes older than that), after which what was stored during the gap
	// may never be announced.
	announced, blind atomic.Uint64
	// generation moves, under mu, with every message applied (so before
	// a reader can see what it changed): sessions keep the answers their
	// events need for as long as it stays the same.
	generation atomic.Uint64
}

// New returns an empty, unsynced directory.
func New(cfg Config) *Directory {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.OnRemove == nil {
		cfg.OnRemove = func(Removal) {}
	}
	if cfg.OnMailbox == nil {
		cfg.OnMailbox = func(string, string, uint64) {}
	}
	if cfg.OnEdges == nil {
		cfg.OnEdges = func([]Edge) {}
	}
	if cfg.OnRewind == nil {
		cfg.OnRewind = func(uint64, uint64) {}
	}
	if cfg.StallTimeout <= 0 {
		cfg.StallTimeout = 8 * time.Second
	}
	d := &Directory{cfg: cfg, cur: newSnapshot(), changed: make(chan struct{})}
	d.generation.Store(1) // 0 would say changes are not tracked
	return d
}

// Generation changes whenever what LookupDevice, UserActive and
// UserDevices answer may have changed (see session.Directory): it moves
// with every watch message applied, before the lock that publishes the
// message's changes is released.
func (d *Directory) Generation() uint64 { return d.generation.Load() }

// Device returns a device by id.
func (d *Directory) Device(id string) (Device, bool) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	dev, ok := d.cur.devices[id]
	return dev, ok
}

// LookupDevice tells the session core what is known of a device id.
func (d *Directory) LookupDevice(id string) session.DeviceInfo {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if dev, ok := d.cur.devices[id]; ok {
		st := session.DeviceActive
		if dev.Revoked {
			st = session.DeviceRevoked
		}
		return session.DeviceInfo{ID: id, UserID: dev.UserID, PublicKey: dev.PublicKey, State: st}
	}
	if user, ok := d.deleted.owner[id]; ok {
		return session.DeviceInfo{ID: id, UserID: user, State: session.DeviceDeleted}
	}
	return session.DeviceInfo{ID: id}
}

// UserActive reports whether a user exists and is active.
func (d *Directory) UserActive(id string) bool {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.cur.users[id]
}

// Edges returns the edge members, ordered by id.
func (d *Directory) Edges() []Edge {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.edgesLocked()
}

func (d *Directory) edgesLocked() []Edge {
	out := make([]Edge, 0, len(d.cur.edges))
	for _, e := range d.cur.edges {
		out = append(out, e)
	}
	slices.SortFunc(out, func(a, b Edge) int { return strings.Compare(a.ID, b.ID) })
	return out
}

// UserDevices lists a user's active devices, ordered by id.
func (d *Directory) UserDevices(userID string) []string {
	d.mu.RLock()
	defer d.mu.RUnlock()
	set := d.cur.byUser[userID]
	out := make([]string, 0, len(set))
	for id := range set {
		out = append(out, id)
	}
	slices.Sort(out)
	return out
}

// Synced reports whether a full copy has been received.
func (d *Directory) Synced() bool {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.synced
}

// LastHeard is when the last message of the watch feed arrived (zero
// before the first). The control plane sends one at least every few
// seconds on a healthy feed, so its age is how long the edge has been
// cut off from the control plane. After a full copy was cut off halfway,
// the messages of the next copies do not count until one is complete:
// an edge whose copies keep breaking is as cut off as one that hears
// nothing (its state stays as old as the last complete copy).
func (d *Directory) LastHeard() time.Time {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.heard
}

// History is the control plane's history the directory follows (the
// last full copy's snapshot_done.history; empty before one, or from a
// control plane that names none).
func (d *Directory) History() string {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.history
}

// Revision is the last revision applied completely (every change of it).
func (d *Directory) Revision() uint64 {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.revision
}

// AnnouncedRevision is the revision up to which every mailbox
// announcement of the feed has been handed to OnMailbox, and how many
// full copies so far announced none (so entries stored before them may
// not have been announced at all).
func (d *Directory) AnnouncedRevision() (rev, blindCopies uint64) {
	// announced first: a copy counts blind before it moves announced, so
	// whoever sees the revision after a copy sees the count too.
	rev = d.announced.Load()
	return rev, d.blind.Load()
}

// WaitRevision blocks until the directory is synced and has applied rev.
func (d *Directory) WaitRevision(ctx context.Context, rev uint64) error {
	for {
		d.mu.RLock()
		ok, ch := d.synced && d.revision >= rev, d.changed
		d.mu.RUnlock()
		if ok {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (d *Directory) notify() {
	close(d.changed)
	d.changed = make(chan struct{})
}

// Apply applies one watch message. Removals and mailbox announcements it
// implies are reported after the lock is released. Calls must not
// overlap: one goroutine follows the feed.
func (d *Directory) Apply(m *edgev1.WatchResponse) {
	var removals []Removal
	var notes []mailboxNote
	var edges []Edge
	edgesChanged := false
	var rewound bool
	var rewoundFrom uint64
	if d.cfg.Logger.Enabled(context.Background(), slog.LevelDebug) {
		d.cfg.Logger.Debug("watch message", "revision", m.GetRevision(), "message", redacted(m))
	}
	d.mu.Lock()
	wasSynced, wasRevision := d.synced, d.revision
	switch k := m.GetKind().(type) {
	case *edgev1.WatchResponse_Resync:
		if d.staging != nil {
			d.cutCopy = true // a new copy while one was under way
		}
		s := newSnapshot()
		d.staging = &s
	case *edgev1.WatchResponse_SnapshotDone:
		if d.staging != nil {
			edgesChanged = true
			removals = diff(d.cur, *d.staging)
			for _, r := range removals {
				if r.DeviceID != "" && r.Reason == ReasonDeviceDeleted {
					d.deleted.add(r.DeviceID, r.UserID)
				}
			}
			notes, d.staging.mail = d.staging.mail, nil
			if r := d.staging.ring; r != nil {
				d.cfg.Ring.Set(r.current, r.keys)
				d.staging.ring = nil
			}
			if !k.SnapshotDone.GetMailboxesAnnounced() {
				d.blind.Add(1)
			}
			d.cur, d.staging = *d.staging, nil
			d.synced = true
			// Another history (the cluster was restored from a backup), or
			// revisions gone back (restored by a release that did not
			// name histories): what came from the old one is void.
			if h := k.SnapshotDone.GetHistory(); d.revision > 0 && (h != d.history || m.GetRevision() < d.revision) {
				rewound, rewoundFrom = true, d.revision
			}
			d.history = k.SnapshotDone.GetHistory()
			// A full copy sets the revision, lower ones too: after a
			// restore the control plane's revisions go on from its
			// backup's, and resuming from the old history's would be
			// answered with a full copy again.
			d.revision = m.GetRevision()
			d.current = time.Now()
		}
	case *edgev1.WatchResponse_Event:
		target := &d.cur
		if d.staging != nil {
			target = d.staging
		}
		removals = d.applyEvent(target, k.Event, d.staging == nil)
		if mc := k.Event.GetMailboxChanged(); mc != nil {
			n := mailboxNote{mc.GetUserId(), mc.GetDeviceId(), mc.GetSeq()}
			if d.staging != nil {
				// Told once the copy is complete and in place, as its
				// removals are: a copy cut off halfway is dropped whole,
				// and the next one announces them again.
				d.staging.mail = append(d.staging.mail, n)
			} else {
				notes = append(notes, n)
			}
		}
		switch k.Event.GetKind().(type) {
		case *edgev1.WatchEvent_EdgePut, *edgev1.WatchEvent_EdgeDeleted:
			edgesChanged = d.staging == nil
		}
	case *edgev1.WatchResponse_Progress:
		if d.staging == nil {
			d.current = time.Now()
		}
	}
	// d.revision is the last *complete* revision, the one to resume from:
	// an event says every earlier revision is complete (one revision can
	// carry several changes); progress and the end of a full copy say
	// their own revision is.
	if d.staging == nil {
		complete := m.GetRevision()
		if _, isEvent := m.GetKind().(*edgev1.WatchResponse_Event); isEvent && complete > 0 {
			complete--
		}
		if complete > d.revision {
			d.revision = complete
		}
	}
	if d.staging == nil {
		d.cutCopy = false // the state is whole again
	}
	if !d.cutCopy {
		d.heard = time.Now()
	}
	if edgesChanged {
		edges = d.edgesLocked()
	}
	rev := d.revision
	// Before Unlock: a session that reads the old generation then asks
	// again at the next event; one that reads the new one waits for the
	// lock and sees the changes.
	d.generation.Add(1)
	// Waiters (WaitRevision) wake when what they wait for may have come,
	// not at every message: handshakes that wait for a revision are as
	// many as peers care to open.
	if d.synced != wasSynced || d.revision != wasRevision {
		d.notify()
	}
	d.mu.Unlock()
	for _, r := range removals {
		d.cfg.OnRemove(r)
	}
	if rewound {
		d.cfg.Logger.Warn("the control plane's revisions went back (restored from an older backup?): sessions start again",
			"from", rewoundFrom, "to", rev)
		d.cfg.OnRewind(rewoundFrom, rev)
	}
	for _, n := range notes {
		d.cfg.OnMailbox(n.user, n.device, n.seq)
	}
	// One goroutine applies the feed: this grows, but for a full copy from
	// a cluster restored from an older backup (its revisions go on from
	// the backup's), which makes less count as announced: sessions then
	// read mailboxes rather than trust announcements.
	d.announced.Store(rev)
	if edgesChanged {
		d.cfg.OnEdges(edges)
	}
}

type mailboxNote struct {
	user, device string
	seq          uint64
}

func (d *Directory) applyEvent(s *snapshot, ev *edgev1.WatchEvent, live bool) []Removal {
	var out []Removal
	switch k := ev.GetKind().(type) {
	case *edgev1.WatchEvent_UserPut:
		u := k.UserPut
		if live && s.users[u.GetId()] && !u.GetActive() {
			out = append(out, Removal{UserID: u.GetId(), Reason: ReasonUserDisabled})
		}
		s.users[u.GetId()] = u.GetActive()
	case *edgev1.WatchEvent_UserDeleted:
		delete(s.users, k.UserDeleted)
		if live {
			out = append(out, Removal{UserID: k.UserDeleted, Reason: ReasonUserDeleted})
		}
	case *edgev1.WatchEvent_DevicePut:
		dv := k.DevicePut
		old, had := s.devices[dv.GetId()]
		s.putDevice(Device{ID: dv.GetId(), UserID: dv.GetUserId(), PublicKey: dv.GetPublicKey(), Revoked: dv.GetRevoked()})
		if live && dv.GetRevoked() && (!had || !old.Revoked) {
			out = append(out, Removal{UserID: dv.GetUserId(), DeviceID: dv.GetId(), Reason: ReasonDeviceRevoked})
		}
	case *edgev1.WatchEvent_DeviceDeleted:
		s.deleteDevice(k.DeviceDeleted.GetId())
		d.deleted.add(k.DeviceDeleted.GetId(), k.DeviceDeleted.GetUserId())
		if live {
			out = append(out, Removal{UserID: k.DeviceDeleted.GetUserId(), DeviceID: k.DeviceDeleted.GetId(), Reason: ReasonDeviceDeleted})
		}
	case *edgev1.WatchEvent_SessionKeys:
		keys := make([]session.SessionKey, 0, len(k.SessionKeys.GetKeys()))
		for _, sk := range k.SessionKeys.GetKeys() {
			key := session.SessionKey{ID: sk.GetId(), Secret: sk.GetSecret()}
			if sk.GetExpiresAtMs() != 0 {
				key.Expiry = time.UnixMilli(sk.GetExpiresAtMs())
			}
			keys = append(keys, key)
		}
		if live {
			d.cfg.Ring.Set(k.SessionKeys.GetCurrentId(), keys)
		} else {
			s.ring = &stagedRing{current: k.SessionKeys.GetCurrentId(), keys: keys}
		}
	case *edgev1.WatchEvent_EdgePut:
		e := k.EdgePut
		var key ed25519.PublicKey
		if k := e.GetMeshPublicKey(); len(k) == ed25519.PublicKeySize {
			key = ed25519.PublicKey(k)
		}
		s.edges[e.GetId()] = Edge{ID: e.GetId(), Addrs: e.GetAddrs(), MeshAddr: e.GetMeshAddr(), MeshKey: key}
	case *edgev1.WatchEvent_EdgeDeleted:
		delete(s.edges, k.EdgeDeleted)
	}
	return out
}

// diff finds what a full copy removed or revoked compared with before.
func diff(old, cur snapshot) []Removal {
	var out []Removal
	for id, active := range old.users {
		if now, ok := cur.users[id]; !ok {
			out = append(out, Removal{UserID: id, Reason: ReasonUserDeleted})
		} else if active && !now {
			out = append(out, Removal{UserID: id, Reason: ReasonUserDisabled})
		}
	}
	for id, dv := range old.devices {
		if now, ok := cur.devices[id]; !ok {
			out = append(out, Removal{UserID: dv.UserID, DeviceID: id, Reason: ReasonDeviceDeleted})
		} else if now.Revoked && !dv.Revoked {
			out = append(out, Removal{UserID: dv.UserID, DeviceID: id, Reason: ReasonDeviceRevoked})
		}
	}
	return out
}

// Follow keeps the directory in step with the watch feed until ctx ends,
// resuming from the last revision after every error with backoff. token
// supplies the edge's access token for each (re)connection.
func (d *Directory) Follow(ctx context.Context, client edgev1connect.WatchServiceClient, token func(context.Context) (string, error)) error {
	const minBackoff, maxBackoff = 100 * time.Millisecond, 5 * time.Second
	backoff := minBackoff
	for ctx.Err() == nil {
		before := d.LastHeard()
		err := d.followOnce(ctx, client, token)
		if ctx.Err() != nil {
			break
		}
		// A full copy the stream ended halfway is cut off (the next
		// stream drops it): the messages of the copies after it do not
		// count until one completes. Not when the stream ended with its
		// access token, as every long enough stream does: that is no
		// trouble with the feed.
		d.mu.Lock()
		if d.staging != nil && !tokenExpired(err) {
			d.cutCopy = true
		}
		d.mu.Unlock()
		if f, ok := client.(StreamFailer); ok && !errors.Is(err, errToken) {
			// Not a token failure: controlconn's Token moves between
			// nodes itself, and no stream was tried.
			f.StreamFailed(err)
		}
		wait := backoff
		switch {
		case tokenExpired(err):
			// The control plane ends a stream when its access token
			// expires: resume at once, with a fresh one (token).
			backoff = minBackoff
			d.cfg.Logger.Debug("watch stream ended with its access token; resuming", "revision", d.Revision(), "err", err)
			continue
		case d.LastHeard() != before:
			// The stream worked for a while: resume right away. (A
			// stream that only brought a copy after a broken one, which
			// does not count, backs off: copies that keep breaking are
			// not retried in a tight loop.)
			backoff, wait = minBackoff, minBackoff
		case isTimeout(err) || errors.Is(err, errStalled):
			// Nothing answered (a partition, a paused node, a node that
			// holds the stream silent): the attempt itself took its
			// timeout, so try again at once (on the next node, after a
			// stall). Right after the network heals, the next attempt
			// gets through and revocations decided meanwhile arrive.
			wait = minBackoff
		default:
			backoff = min(2*backoff, maxBackoff)
		}
		d.cfg.Logger.Warn("watch feed interrupted; resuming", "revision", d.Revision(), "err", err, "backoff", wait)
		select {
		case <-ctx.Done():
		case <-time.After(jitter.Spread(wait)):
		}
	}
	return ctx.Err()
}

// StreamFailer is a watch client that wants to know how each stream
// ended (to move to another control node when one is unavailable).
type StreamFailer interface {
	StreamFailed(err error)
}

// tokenExpired reports whether the control plane ended a stream because
// its access token expired (control/api's StreamEndHeader).
func tokenExpired(err error) bool {
	var ce *connect.Error
	return errors.As(err, &ce) && ce.Code() == connect.CodeUnauthenticated && ce.Meta().Get("Relay-Stream-End") == "token-expired"
}

// errToken marks a failure to get the edge's token (no stream opened).
var errToken = errors.New("edge token")

// errStalled marks a stream given up after StallTimeout without a message.
var errStalled = errors.New("watch stream silent")

// isTimeout reports whether an attempt failed because nothing answered.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) ||
		(errors.As(err, &ne) && ne.Timeout()) || connect.CodeOf(err) == connect.CodeDeadlineExceeded
}

func (d *Directory) followOnce(ctx context.Context, client edgev1connect.WatchServiceClient, token func(context.Context) (string, error)) error {
	// A full copy cut off halfway is discarded; the server sends a new
	// one if it is still needed.
	d.mu.Lock()
	d.staging = nil
	d.mu.Unlock()
	tok, err := token(ctx)
	if err != nil {
		return fmt.Errorf("%w: %w", errToken, err)
	}
	from, history := uint64(0), ""
	d.mu.RLock()
	if d.synced {
		from, history = d.revision, d.history
	}
	d.mu.RUnlock()
	req := connect.NewRequest(&edgev1.WatchRequest{FromRevision: from, History: history})
	req.Header().Set("Authorization", "Bearer "+tok)
	// The stall timer runs while the stream is awaited (its headers
	// included: a node that lags sends none), not while a message is
	// applied: a slow apply here is no silence there.
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var stalled atomic.Bool
	stall := time.AfterFunc(d.cfg.StallTimeout, func() {
		stalled.Store(true)
		cancel()
	})
	defer stall.Stop()
	ended := func(err error) error {
		if stalled.Load() && ctx.Err() == nil {
			// Unavailable: the client moves to its next node.
			return connect.NewError(connect.CodeUnavailable, fmt.Errorf("%w for %s (the control node sends a progress at least every 5 s); resuming from revision %d elsewhere",
				errStalled, d.cfg.StallTimeout, d.Revision()))
		}
		return err
	}
	stream, err := client.Watch(sctx, req)
	if err != nil {
		return ended(err)
	}
	defer stream.Close()
	for stream.Receive() {
		stall.Stop()
		d.Apply(stream.Msg())
		stall.Reset(d.cfg.StallTimeout)
	}
	if err := stream.Err(); err != nil {
		return ended(err)
	}
	return ended(errors.New("watch stream ended"))
}

// redacted is m as text with its secrets cleared (the session keys'
// secrets, which seal resume and TLS tickets): a debug log is not a place
// for them. m itself is left as it is.
func redacted(m *edgev1.WatchResponse) string {
	c := proto.Clone(m)
	clearSecrets(c.ProtoReflect())
	return prototext.Format(c)
}

// clearSecrets clears every field named secret in m and the messages
// it holds.
func clearSecrets(m protoreflect.Message) {
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.Name() == "secret":
			m.Clear(fd)
		case fd.IsList() && fd.Message() != nil:
			for i := range v.List().Len() {
				clearSecrets(v.List().Get(i).Message())
			}
		case fd.IsMap() && fd.MapValue().Message() != nil:
			v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
				clearSecrets(mv.Message())
				return true
			})
		case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
			clearSecrets(v.Message())
		}
		return true
	})
}
