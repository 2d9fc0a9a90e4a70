// Package mesh links the edges of a cluster: every edge dials every other
// member over QUIC with mutual TLS against the cluster CA, announces the
// devices it holds (a full set when the link comes up, deltas after), and
// forwards events for devices a peer holds, getting each one's outcome
// back. It keeps the table of which edge holds which device; a device
// announced by two edges is where its newer session is.
package mesh

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"
	"golang.org/x/time/rate"
	"google.golang.org/protobuf/proto"

	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
)

// Local is this edge's sessions as the mesh needs them (session.Hub
// provides it).
type Local interface {
	// LocalPresence lists the devices with a session here.
	LocalPresence() []*edgev1.DevicePresence
	// DeliverForwarded hands a forwarded event to the device's session
	// here; report is called once with the outcome (never for an
	// ephemeral event, whose Forward.id is 0).
	DeliverForwarded(f *edgev1.Forward, report func(edgev1.ForwardOutcome))
	// PeerHolds says peer edgeID holds a device since a time: an older
	// session of it here must close (the device moved), and one as old
	// too when edgeID sorts before this edge's id (the tie-break the
	// table of where devices are uses).
	PeerHolds(userID, deviceID string, since time.Time, instance, edgeID string)
	// PeerPresence says a device came online on some peer, or is on none
	// any more, for the presence frames of its user's devices here.
	PeerPresence(userID, deviceID string, online bool)
}

// Member is a peer to link to.
type Member struct {
	ID       string
	MeshAddr string
	// Key is the mesh public key the control plane registered for the
	// edge that holds ID's lease: a peer presenting a certificate for ID
	// with another key (an older process of that id, whose certificate
	// has not expired) is refused, in both directions. Nil: not known,
	// any certificate for ID from the cluster CA is accepted.
	Key ed25519.PublicKey
}

// Config configures a Mesh. Zero fields take the defaults in brackets.
type Config struct {
	// EdgeID is this edge's id (the one in its certificate); required.
	EdgeID string
	// Addr is the UDP address of the mesh listener ["127.0.0.1:0"].
	Addr string
	// Identity holds the mesh certificate; required. Links wait until it
	// has one.
	Identity *Identity
	// Local is this edge's sessions; required.
	Local Local
	// QueueLen and QueueBytes bound the frames waiting on one link, by
	// count and by the bytes of their events; beyond either, forwards are
	// answered NOT_DELIVERED (the sending edge stores them) [65536,
	// 64 MiB].
	QueueLen, QueueBytes int
	// MaxOutstanding bounds the forwards a peer has sent this edge whose
	// outcomes it has not read yet; at the bound this edge stops reading
	// the peer's link until it does [16384]. Forwards whose outcome is
	// not decided yet (deliveries their devices have not acknowledged)
	// may take half of it, one user's an eighth, and users holding fewer
	// than four a quarter more; forwards beyond are answered QUEUE_FULL at
	// once, so devices that never acknowledge cannot stop the link: only
	// a peer that does not read its outcomes does.
	MaxOutstanding int
	// IdleTimeout is how long a silent peer is given before its link
	// counts as broken (keep-alives go at a third of it) [5s]; a peer
	// that does not take a write (writeChunk) in as long is cut off too,
	// and so is one that sends no more of a frame it began (readPiece)
	// in as long. Until
	// then, forwards to a peer that died wait for their outcome, and so
	// do their senders' acknowledgements: it is the longest an edge's
	// crash holds up the events meant for its devices.
	IdleTimeout time.Duration
	// HelloTimeout is how long a peer that connected has to open its
	// link's stream and send its hello [5s].
	HelloTimeout time.Duration
	// PresenceGrace is how long the devices a peer announced stay where
	// they are after its link to this edge ended [10s; negative: none].
	// A peer that reconnects within it sends its full set, which settles
	// only what changed meanwhile: a blip of the link neither tells the
	// users' devices here that those devices went offline and came back,
	// nor sends the events meant for them into the mailboxes. A peer that
	// leaves the member list is forgotten at once.
	PresenceGrace time.Duration
	// MaxPeerDevices bounds the devices one peer may announce as its own
	// [DefaultMaxPeerDevices]: a peer that announces more (a bug there,
	// or a peer that never sends offlines) would fill this edge's memory.
	// Devices beyond it are ignored, and logged: events for them go to
	// their mailboxes, from which their edge delivers them.
	MaxPeerDevices int
	// Logger [slog.Default()]; Registerer for metrics [none].
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

// Mesh is safe for concurrent use.
type Mesh struct {
	cfg     Config
	udp     net.PacketConn
	tr      *quic.Transport
	ln      *quic.Listener
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	metrics metrics

	mu    sync.Mutex // guards links, inbound and keys
	links map[string]*link
	// stopped holds, by peer id, the last link stopped that may still be
	// answering what it held: a new link to the same id waits for it
	// (link.after). Pruned as they end.
	stopped map[string]*link
	inbound map[string]*inbound
	keys    map[string]ed25519.PublicKey // members' registered keys, by id

	// presMu orders presence announcements and status changes with link
	// set-up, so a link gets a full set and then every later delta, none
	// missed, and the latest status; it also guards the table of where
	// devices are and controlHeard.
	presMu sync.Mutex
	where  map[string]holder              // device -> newest holder
	byPeer map[string]map[string]DevPres  // peer -> devices it announced
	byUser map[string]map[string]struct{} // user -> its devices in where
	events []presenceEvent                // to tell Local once presMu is released
	// unconfirmed holds, for a peer whose full set is still arriving,
	// the devices it announced before that the set has not named yet:
	// they stay where they are until its last frame.
	unconfirmed map[string]map[string]struct{}
	// graced holds, for a peer whose link ended, the timer that forgets
	// what it announced once PresenceGrace has passed without a new link.
	graced map[string]*time.Timer
	// controlHeard is this edge's status, as SetControlHeard last set it.
	controlHeard bool

	// capped counts the devices ignored for a peer's bound since the
	// last warning, which capLog spaces (a minute).
	capped atomic.Int64
	capLog rate.Sometimes
	// unfit counts the devices ignored for a start too far ahead or an
	// id too long since the last warning, which unfitLog spaces (a
	// minute): a peer with a broken clock announces them in every frame.
	unfit    atomic.Int64
	unfitLog rate.Sometimes
}

// tellCapped logs, at most once a minute, the devices ignored because
// their peer announced more than Config.MaxPeerDevices.
func (m *Mesh) tellCapped(peer string, n int) {
	m.capped.Add(int64(n))
	m.capLog.Do(func() {
		m.cfg.Logger.Warn("mesh peer announced more devices than a peer may hold: those beyond are ignored, and their events go to their mailboxes",
			"peer", peer, "bound", m.cfg.MaxPeerDevices, "ignored_since_last_warning", m.capped.Swap(0))
	})
}

// tellUnfit logs, at most once a minute, the devices ignored because
// their peer announced a start more than maxSinceAhead from now or an id
// longer than maxIDLen.
func (m *Mesh) tellUnfit(peer string, n int) {
	m.unfit.Add(int64(n))
	m.unfitLog.Do(func() {
		m.cfg.Logger.Warn("mesh peer announced sessions that start more than an hour from now, or ids longer than a device's or user's can be: ignored",
			"peer", peer, "ignored_since_last_warning", m.unfit.Swap(0))
	})
}

type presenceEvent struct {
	user, device string
	online       bool
}

type holder struct {
	edge  string
	user  string
	since int64
}

// DevPres is a device as a peer announced it.
type DevPres struct {
	User  string
	Since int64
}

type metrics struct {
	links    prometheus.Gauge
	forwards *prometheus.CounterVec
	devices  prometheus.Gauge
	retries  prometheus.Counter
	// presenceLag counts links ended because their peer read presence
	// more slowly than it changed here (link.queuePresence).
	presenceLag prometheus.Counter
	// forwards' series, looked up once: forwarded counts every event of
	// the mesh hop, a label lookup each would cost it.
	noLink, linkDown, linkFull, tooLarge, ephemeral prometheus.Counter
	outcomes                                        map[edgev1.ForwardOutcome]prometheus.Counter
}

// outcome is forwards' series for an outcome a peer answered.
func (ms *metrics) outcome(o edgev1.ForwardOutcome) prometheus.Counter {
	if c, ok := ms.outcomes[o]; ok {
		return c
	}
	// One this release does not know, which the sending edge takes as
	// not delivered (a label per value would let a peer grow the series).
	return ms.outcomes[edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED]
}

// New opens the mesh listener; Run serves it.
func New(cfg Config) (*Mesh, error) {
	if cfg.EdgeID == "" || cfg.Identity == nil || cfg.Local == nil {
		return nil, errors.New("mesh: EdgeID, Identity and Local are required")
	}
	if cfg.Addr == "" {
		cfg.Addr = "127.0.0.1:0"
	}
	if cfg.QueueLen <= 0 {
		cfg.QueueLen = 1 << 16
	}
	if cfg.QueueBytes <= 0 {
		cfg.QueueBytes = 64 << 20
	}
	if cfg.MaxOutstanding <= 0 {
		cfg.MaxOutstanding = 1 << 14
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = 5 * time.Second
	}
	if cfg.HelloTimeout <= 0 {
		cfg.HelloTimeout = 5 * time.Second
	}
	if cfg.PresenceGrace == 0 {
		cfg.PresenceGrace = 10 * time.Second
	}
	if cfg.MaxPeerDevices <= 0 {
		cfg.MaxPeerDevices = DefaultMaxPeerDevices
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	udp, err := net.ListenPacket("udp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("listen mesh %s: %w", cfg.Addr, err)
	}
	retries := prometheus.NewCounter(prometheus.CounterOpts{
		Name: "relay_edge_mesh_retries_total", Help: "Connection attempts on the mesh port answered with a QUIC Retry (every one that brings no Retry token).",
	})
	// Every peer proves its address with a Retry before this edge keeps
	// any state for it, so a flood of spoofed Initials costs a stateless
	// answer no larger than what came in. A link's round trip more is
	// nothing: links are dialled once and again only after they break,
	// between edges that are close.
	tr := &quic.Transport{Conn: udp, VerifySourceAddress: func(net.Addr) bool { retries.Inc(); return true }}
	ln, err := tr.Listen(cfg.Identity.serverTLS(), quicConfig(cfg.IdleTimeout, true))
	if err != nil {
		_ = udp.Close()
		return nil, fmt.Errorf("listen mesh: %w", err)
	}
	m := &Mesh{cfg: cfg, udp: udp, tr: tr, ln: ln, links: map[string]*link{}, stopped: map[string]*link{}, inbound: map[string]*inbound{},
		where: map[string]holder{}, byPeer: map[string]map[string]DevPres{}, byUser: map[string]map[string]struct{}{},
		unconfirmed: map[string]map[string]struct{}{}, graced: map[string]*time.Timer{}, capLog: rate.Sometimes{Interval: time.Minute},
		unfitLog: rate.Sometimes{Interval: time.Minute}}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	m.metrics = metrics{
		links: prometheus.NewGauge(prometheus.GaugeOpts{Name: "relay_edge_mesh_links", Help: "Mesh links this edge dialed that are up."}),
		forwards: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_edge_mesh_forwards_total",
			Help: "Events forwarded to peer edges: durable ones by the outcome the peer answered (delivered, not_delivered, queue_full, target_gone) or found here (no_link, link_down, link_full, too_large), ephemeral ones sent (ephemeral; those not sent count as no_link, link_down, link_full, too_large).",
		}, []string{"outcome"}),
		devices: prometheus.NewGauge(prometheus.GaugeOpts{Name: "relay_edge_mesh_remote_devices", Help: "Devices peers announced as theirs."}),
		retries: retries,
		presenceLag: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "relay_edge_mesh_presence_lag_total",
			Help: "Mesh links this edge ended because the peer read presence changes more slowly than they came (QueueLen of them waited); each comes up again with a full set.",
		}),
	}
	// Every outcome exists from the start, so rate() and increase() see
	// the first failure.
	fw := m.metrics.forwards
	m.metrics.noLink, m.metrics.linkDown = fw.WithLabelValues("no_link"), fw.WithLabelValues("link_down")
	m.metrics.linkFull, m.metrics.ephemeral = fw.WithLabelValues("link_full"), fw.WithLabelValues("ephemeral")
	m.metrics.tooLarge = fw.WithLabelValues("too_large")
	m.metrics.outcomes = map[edgev1.ForwardOutcome]prometheus.Counter{}
	for v := range edgev1.ForwardOutcome_name {
		if o := edgev1.ForwardOutcome(v); o != edgev1.ForwardOutcome_FORWARD_OUTCOME_UNSPECIFIED {
			m.metrics.outcomes[o] = fw.WithLabelValues(outcomeLabel(o))
		}
	}
	hearing := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "relay_edge_mesh_peers_hearing_control",
		Help: "Peer edges that say over the mesh that they hear the control plane (relay-mesh/2 links): a cut-off edge steps aside while there is one.",
	}, func() float64 { return float64(len(m.PeersHearingControl())) })
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{m.metrics.links, m.metrics.forwards, m.metrics.devices, m.metrics.retries, m.metrics.presenceLag, hearing} {
			if err := cfg.Registerer.Register(c); err != nil {
				_ = ln.Close()
				_ = udp.Close()
				return nil, err
			}
		}
	}
	return m, nil
}

// quicConfig is a mesh connection's: the dialing edge opens its link's
// one stream (listen: the peer may open that one, and no other), and
// nothing else is opened either way, so a peer cannot park data on
// streams nobody accepts (quic-go's default lets it open 100 of each
// kind, each buffered up to the connection's window).
func quicConfig(idle time.Duration, listen bool) *quic.Config {
	bidi := int64(-1) // none
	if listen {
		bidi = 1
	}
	return &quic.Config{MaxIdleTimeout: idle, KeepAlivePeriod: idle / 3, HandshakeIdleTimeout: min(idle, 5*time.Second),
		MaxIncomingStreams: bidi, MaxIncomingUniStreams: -1}
}

// Addr is the mesh listener's address.
func (m *Mesh) Addr() net.Addr { return m.udp.LocalAddr() }

// Run accepts peers' links until Close.
func (m *Mesh) Run() {
	for {
		conn, err := m.ln.Accept(m.ctx)
		if err != nil {
			return
		}
		// Under mu, so Close (which cancels under it) waits for this one
		// or it is not started.
		m.mu.Lock()
		if m.ctx.Err() != nil {
			m.mu.Unlock()
			_ = conn.CloseWithError(0, "edge shutting down")
			return
		}
		m.wg.Go(func() { m.serveInbound(conn) })
		m.mu.Unlock()
	}
}

// Kill drops the mesh's socket at once, as a crash would: peers learn of
// it only when their links time out. For fault tests. Close still has
// to be called.
func (m *Mesh) Kill() { _ = m.udp.Close() }

// Close ends every link and the listener, and waits for their goroutines.
func (m *Mesh) Close() error {
	// Every link's context derives from the mesh's, and every inbound
	// connection closes with it (serveInbound). Cancelled under mu: a
	// SetMembers or Run that saw the mesh open has started its goroutines
	// before Wait below, and none starts after.
	m.mu.Lock()
	m.cancel()
	m.mu.Unlock()
	err := m.ln.Close()
	m.wg.Wait()
	m.presMu.Lock()
	for peer, t := range m.graced {
		t.Stop()
		delete(m.graced, peer)
	}
	m.presMu.Unlock()
	return errors.Join(err, m.tr.Close(), m.udp.Close())
}

// SetMembers makes the mesh link to exactly these peers (others are
// dropped; this edge's own entry is ignored), and take presence, forwards
// and status from these alone: a link from anyone else carries only this
// edge's status back (inbound.member).
func (m *Mesh) SetMembers(members []Member) {
	m.mu.Lock()
	if m.ctx.Err() != nil {
		m.mu.Unlock()
		return
	}
	want := map[string]Member{}
	for _, mb := range members {
		if mb.ID != m.cfg.EdgeID && mb.MeshAddr != "" {
			want[mb.ID] = mb
		}
	}
	var gone []string // peers no longer members
	maps.DeleteFunc(m.stopped, func(_ string, l *link) bool {
		select {
		case <-l.done:
			return true
		default:
			return false
		}
	})
	for id, l := range m.links {
		if mb, ok := want[id]; !ok || mb.MeshAddr != l.addr || !mb.Key.Equal(l.key) {
			l.stop()
			delete(m.links, id)
			m.stopped[id] = l
			if !ok {
				gone = append(gone, id)
			}
		}
	}
	m.keys = make(map[string]ed25519.PublicKey, len(want))
	for id, mb := range want {
		if mb.Key != nil {
			m.keys[id] = mb.Key
		}
		if _, ok := m.links[id]; !ok {
			l := newLink(m, id, mb.MeshAddr, mb.Key, m.stopped[id])
			m.links[id] = l
			m.wg.Go(l.run)
		}
	}
	// A link from a process that no longer holds its id goes; one from a
	// peer that left the list stays, but nothing it sends counts any more
	// (it still hears this edge's status); one from a peer that joined
	// it goes, so the peer dials again and its full set is read. Closed
	// outside mu: closing waits for the connection's loop.
	type closing struct {
		conn *quic.Conn
		why  string
	}
	var closes []closing
	for id, in := range m.inbound {
		switch {
		case !m.keyHolds(id, in.key):
			in.member.Store(false)
			closes = append(closes, closing{in.conn, "edge id now held by another key"})
		case m.links[id] == nil:
			in.member.Store(false)
		case !in.member.Load():
			closes = append(closes, closing{in.conn, "now a member: dial again"})
		}
	}
	m.mu.Unlock()
	for _, c := range closes {
		_ = c.conn.CloseWithError(0, c.why)
	}
	// A peer that left the member list is gone for good: what it
	// announced goes at once, whether its link ended (no grace period)
	// or is still up (what comes on it no longer counts).
	for _, id := range gone {
		m.presMu.Lock()
		m.dropPeerLocked(id)
	}
}

// keyHolds reports whether key may speak for edge id: the member list
// names that key for it, or names no key (with m.mu held).
func (m *Mesh) keyHolds(id string, key ed25519.PublicKey) bool {
	want, ok := m.keys[id]
	return !ok || want.Equal(key)
}

// SetControlHeard tells the peers whether this edge hears the control
// plane (it heard it within its control grace), when that changed since
// the last call; a link that comes up gets the latest value. Peers that
// speak relay-mesh/1 are not told.
func (m *Mesh) SetControlHeard(heard bool) {
	m.presMu.Lock()
	defer m.presMu.Unlock()
	if m.controlHeard == heard {
		return
	}
	m.controlHeard = heard
	for _, l := range m.linkList() {
		l.sendStatus(heard)
	}
	m.mu.Lock()
	for _, in := range m.inbound {
		if in.status {
			in.send(statusFrame(heard))
		}
	}
	m.mu.Unlock()
}

// PeersHearingControl returns the peers, sorted, that say they hear the
// control plane: members on their link to this edge, or back on this edge's link
// to them (so a peer that dropped this edge from its member list, as the
// control plane does once this edge's lease runs out, still counts while
// this edge links to it). A peer of relay-mesh/1, one that sent no
// status yet, or one linked neither way does not count.
func (m *Mesh) PeersHearingControl() []string {
	m.mu.Lock()
	var ids []string
	for id, in := range m.inbound {
		if in.member.Load() && in.controlHeard.Load() {
			ids = append(ids, id)
		}
	}
	for id, l := range m.links {
		if l.peerHeard.Load() && !slices.Contains(ids, id) {
			ids = append(ids, id)
		}
	}
	m.mu.Unlock()
	slices.Sort(ids)
	return ids
}

// Locate says which peer holds a device.
func (m *Mesh) Locate(deviceID string) (string, bool) {
	m.presMu.Lock()
	defer m.presMu.Unlock()
	h, ok := m.where[deviceID]
	return h.edge, ok
}

// Since says when the newest session of a device on a peer started, as
// that peer announced it.
func (m *Mesh) Since(deviceID string) (time.Time, bool) {
	m.presMu.Lock()
	defer m.presMu.Unlock()
	h, ok := m.where[deviceID]
	if !ok {
		return time.Time{}, false
	}
	return time.Unix(0, h.since), true
}

// Announce tells every peer that a device came online here, or left.
func (m *Mesh) Announce(p *edgev1.DevicePresence, online bool) {
	d := &edgev1.PresenceDelta{}
	if online {
		d.Online = []*edgev1.DevicePresence{p}
	} else {
		d.Offline = []*edgev1.DevicePresence{p}
	}
	f := &edgev1.MeshFrame{Kind: &edgev1.MeshFrame_PresenceDelta{PresenceDelta: d}}
	m.presMu.Lock()
	defer m.presMu.Unlock()
	for _, l := range m.linkList() {
		l.sendPresence(f)
	}
}

// linkList returns the links to the current members.
func (m *Mesh) linkList() []*link {
	m.mu.Lock()
	defer m.mu.Unlock()
	links := make([]*link, 0, len(m.links))
	for _, l := range m.links {
		links = append(links, l)
	}
	return links
}

// Forward sends an event to the peer holding its device. done (nil for
// an ephemeral event) gets the outcome exactly once: NOT_DELIVERED when
// the link is down or breaks before the peer answers.
func (m *Mesh) Forward(peer string, f *edgev1.Forward, done func(edgev1.ForwardOutcome)) {
	if !fitsFrame(f) {
		// The peer would refuse the frame, and the link with it, for
		// every device behind it, each time the sender tried again.
		m.metrics.tooLarge.Inc()
		if done != nil {
			done(edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED)
		}
		return
	}
	m.mu.Lock()
	l := m.links[peer]
	m.mu.Unlock()
	if l == nil {
		m.metrics.noLink.Inc()
		if done != nil {
			done(edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED)
		}
		return
	}
	l.forward(f, done)
}

// Stats are the sizes of the mesh's tables, for leak checks.
type Stats struct {
	RemoteDevices int // devices peers announced
	RemoteUsers   int // users with devices on peers
	PeerSets      int // peers with at least one announced device
	Settling      int // peers whose full set is still arriving
	Graced        int // peers whose link ended, their devices kept for PresenceGrace
	Pending       int // forwards waiting for their outcome
	LinksUp       int // links this edge dialed that are up
	Dials         int // connection attempts of this edge's links so far
	Waiting       int // links that wait for the link they replaced to answer what it held
}

// Stats returns the current table sizes.
func (m *Mesh) Stats() Stats {
	m.presMu.Lock()
	st := Stats{RemoteDevices: len(m.where), RemoteUsers: len(m.byUser), PeerSets: len(m.byPeer), Settling: len(m.unconfirmed), Graced: len(m.graced)}
	m.presMu.Unlock()
	m.mu.Lock()
	for _, l := range m.links {
		l.mu.Lock()
		st.Pending += len(l.pending)
		if l.up {
			st.LinksUp++
		}
		st.Dials += l.dials
		l.mu.Unlock()
		if l.waiting.Load() {
			st.Waiting++
		}
	}
	m.mu.Unlock()
	return st
}

// maxSinceAhead is how far past this edge's clock a session's start
// that a peer announces may be. Further is a broken clock or a bug: the
// entry is ignored (not clamped, which would leave the peer's later
// offline for it unmatched). A session here of that device starts after
// the one announced, so a start near the end of time would overflow the
// nanoseconds it is announced in, and the device could then hold a
// session nowhere but at that peer. An edge an hour ahead is broken
// anyway: it would refuse its devices' events as expired.
const maxSinceAhead = time.Hour

// maxIDLen is the longest id of a user or device (the control plane's
// fsm.MaxIDLen; the edge does not link the control plane's packages): a
// peer that announces a longer one announces a device that cannot
// exist, and with it would make MaxPeerDevices bound no bytes.
// TestAStartFarAheadIsIgnored fails when the two differ.
const maxIDLen = 64

// DefaultMaxPeerDevices is Config.MaxPeerDevices's default, for a peer
// far larger than any edge: a device a peer announces takes some 250
// bytes of this edge's tables (measured with 24-byte ids, five devices
// a user), so a peer holds at most some 250 MiB here.
const DefaultMaxPeerDevices = 1 << 20

// applyPresence records what a peer announced (with presMu held) and
// returns the devices whose older local sessions must close, how many it
// ignored for a start too far ahead (maxSinceAhead) or an id too long
// (maxIDLen), and how many for
// the peer's bound (Config.MaxPeerDevices). A full set's devices (inSet)
// are what the peer holds now, whatever it announced before; while one
// arrives, the devices it has not named yet do not count against the
// bound (the set's end forgets them).
func (m *Mesh) applyPresence(peer string, online, offline []*edgev1.DevicePresence, inSet bool) (moved []*edgev1.DevicePresence, ignored, capped int) {
	set := m.byPeer[peer]
	unconfirmed := m.unconfirmed[peer]
	var latest int64
	if len(online) > 0 {
		latest = time.Now().Add(maxSinceAhead).UnixNano()
	}
	for _, p := range offline {
		if cur, ok := set[p.GetDeviceId()]; ok && cur.Since == p.GetSinceNs() {
			delete(set, p.GetDeviceId())
			delete(unconfirmed, p.GetDeviceId())
			m.recomputeWhere(p.GetDeviceId())
		}
	}
	for _, p := range online {
		if p.GetSinceNs() > latest || len(p.GetDeviceId()) > maxIDLen || len(p.GetUserId()) > maxIDLen {
			ignored++
			continue
		}
		// The bound counts the devices the peer named since its set
		// began; those of its last set still unconfirmed hold room too,
		// but at most as many again: a peer that began set after set
		// and finished none (a new link each time) would otherwise have
		// each one's devices taken on top of the last one's.
		if _, known := set[p.GetDeviceId()]; !known && (len(set)-len(unconfirmed) >= m.cfg.MaxPeerDevices || len(set) >= 2*m.cfg.MaxPeerDevices) {
			capped++
			continue
		}
		if set == nil {
			set = map[string]DevPres{}
			m.byPeer[peer] = set
		}
		delete(unconfirmed, p.GetDeviceId())
		if cur, ok := set[p.GetDeviceId()]; ok && cur.Since > p.GetSinceNs() && !inSet {
			// An older session's announcement that came late (two
			// sessions of the device opened together there): the newer
			// one's stands, and its offline will match it.
			continue
		}
		set[p.GetDeviceId()] = DevPres{User: p.GetUserId(), Since: p.GetSinceNs()}
		m.recomputeWhere(p.GetDeviceId())
		moved = append(moved, p)
	}
	if len(set) == 0 {
		delete(m.byPeer, peer)
	}
	m.metrics.devices.Set(float64(len(m.where)))
	return moved, ignored, capped
}

// recomputeWhere sets where a device is: the peer with its newest
// session (with presMu held). A device appearing or disappearing is
// queued for Local (takeEvents).
func (m *Mesh) recomputeWhere(device string) {
	var best holder
	found := false
	for peer, set := range m.byPeer {
		if p, ok := set[device]; ok && (!found || p.Since > best.since || (p.Since == best.since && peer < best.edge)) {
			best, found = holder{edge: peer, user: p.User, since: p.Since}, true
		}
	}
	old, had := m.where[device]
	switch {
	case found:
		m.where[device] = best
		if !had {
			set := m.byUser[best.user]
			if set == nil {
				set = map[string]struct{}{}
				m.byUser[best.user] = set
			}
			set[device] = struct{}{}
			m.events = append(m.events, presenceEvent{best.user, device, true})
		}
	case had:
		delete(m.where, device)
		if set := m.byUser[old.user]; set != nil {
			delete(set, device)
			if len(set) == 0 {
				delete(m.byUser, old.user)
			}
		}
		m.events = append(m.events, presenceEvent{old.user, device, false})
	}
}

// takeEvents returns the queued presence changes (with presMu held).
func (m *Mesh) takeEvents() []presenceEvent {
	ev := m.events
	m.events = nil
	return ev
}

// tellPresence passes presence changes to Local (presMu not held).
func (m *Mesh) tellPresence(ev []presenceEvent) {
	for _, e := range ev {
		m.cfg.Local.PeerPresence(e.user, e.device, e.online)
	}
}

// Online lists a user's devices that peers hold.
func (m *Mesh) Online(userID string) []string {
	m.presMu.Lock()
	defer m.presMu.Unlock()
	set := m.byUser[userID]
	out := make([]string, 0, len(set))
	for d := range set {
		out = append(out, d)
	}
	slices.Sort(out)
	return out
}

// linkEndedLocked is told that peer's inbound link ended (with presMu
// held, which it releases): what the peer announced is forgotten once
// PresenceGrace has passed without a new link from it.
func (m *Mesh) linkEndedLocked(peer string) {
	if m.cfg.PresenceGrace < 0 || m.ctx.Err() != nil {
		m.dropPeerLocked(peer)
		return
	}
	if t := m.graced[peer]; t != nil {
		t.Stop()
	}
	if len(m.byPeer[peer]) == 0 {
		delete(m.graced, peer)
		m.dropPeerLocked(peer)
		return
	}
	var t *time.Timer
	t = time.AfterFunc(m.cfg.PresenceGrace, func() {
		m.presMu.Lock()
		if m.graced[peer] != t || !m.isInbound(peer, nil) {
			m.presMu.Unlock()
			return // a new link took over, or another grace began
		}
		delete(m.graced, peer)
		m.cfg.Logger.Info("mesh peer did not reconnect within the grace period; its devices are offline here", "peer", peer,
			"devices", len(m.byPeer[peer]), "grace", m.cfg.PresenceGrace)
		m.dropPeerLocked(peer)
	})
	m.graced[peer] = t
	m.presMu.Unlock()
}

// endGraceLocked stops peer's grace period, if one runs (presMu held):
// a new link of it came, whose full set settles what it announced.
func (m *Mesh) endGraceLocked(peer string) {
	if t := m.graced[peer]; t != nil {
		t.Stop()
		delete(m.graced, peer)
	}
}

// dropPeerLocked forgets what a peer announced (its link went away), and
// releases presMu, which the caller holds.
func (m *Mesh) dropPeerLocked(peer string) {
	m.endGraceLocked(peer)
	m.forgetPeerLocked(peer)
	m.metrics.devices.Set(float64(len(m.where)))
	ev := m.takeEvents()
	m.presMu.Unlock()
	m.tellPresence(ev)
}

// forgetPeerLocked drops everything peer announced; presMu is held.
func (m *Mesh) forgetPeerLocked(peer string) {
	set := m.byPeer[peer]
	delete(m.byPeer, peer)
	delete(m.unconfirmed, peer)
	for dev := range set {
		m.recomputeWhere(dev)
	}
}

// setPart places a presence frame within a peer's full set. A delta is
// in no set; first starts one (what the peer announced before becomes
// unconfirmed), last ends it (what is still unconfirmed goes). A set in
// one frame is both.
type setPart struct{ inSet, first, last bool }

// deltaFrame is a PresenceDelta of the peer's own, in no set.
var deltaFrame = setPart{}

// presenceFromPeer applies a peer's announcement, which came on link
// from: a delta, or a frame of its full set. A set replaces what the peer
// announced before without taking down, even for a moment, a device it
// names again: those devices keep where they are, and only the ones its
// last frame leaves unnamed go. Users' devices here hear of a change only
// (Local.PeerPresence), not of a link that was replaced (the peer
// reconnected before this edge noticed its old link had gone).
//
// Frames still coming in on a link that a newer one of the peer replaced
// are dropped: the newer link's set supersedes them, and counted into it
// they would end it early or undo it. from nil (tests) is not checked.
func (m *Mesh) presenceFromPeer(peer string, from *inbound, part setPart, online, offline []*edgev1.DevicePresence) {
	m.presMu.Lock()
	// Checked under presMu: SetMembers clears member before it takes
	// presMu to forget a peer that left, so nothing counts after that.
	if from != nil && (!from.member.Load() || !m.isInbound(peer, from)) {
		m.presMu.Unlock()
		return
	}
	if part.first {
		set := m.byPeer[peer]
		if len(set) > 0 || !part.last {
			u := make(map[string]struct{}, len(set))
			for dev := range set {
				u[dev] = struct{}{}
			}
			m.unconfirmed[peer] = u
		}
	}
	moved, ignored, capped := m.applyPresence(peer, online, offline, part.inSet)
	if part.last {
		m.settleLocked(peer)
	}
	ev := m.takeEvents()
	m.presMu.Unlock()
	if ignored > 0 {
		m.tellUnfit(peer, ignored)
	}
	if capped > 0 {
		m.tellCapped(peer, capped)
	}
	m.tellPresence(ev)
	m.notifyMoved(peer, moved)
}

// isInbound reports whether in is peer's current inbound link (presMu
// may be held: it is taken before mu).
func (m *Mesh) isInbound(peer string, in *inbound) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.inbound[peer] == in
}

// settleLocked ends a peer's full set: the devices it announced before
// and did not name again are gone. presMu is held.
func (m *Mesh) settleLocked(peer string) {
	unconfirmed := m.unconfirmed[peer]
	delete(m.unconfirmed, peer)
	if len(unconfirmed) == 0 {
		return
	}
	set := m.byPeer[peer]
	for dev := range unconfirmed {
		delete(set, dev)
		m.recomputeWhere(dev)
	}
	if len(set) == 0 {
		delete(m.byPeer, peer)
	}
	m.metrics.devices.Set(float64(len(m.where)))
}

// Frames on a link: uvarint length, then the encoded MeshFrame.
const maxFrame = 1 << 20

// fitsFrame reports whether a forward's frame is within maxFrame once
// the link gives it an id, measuring it only when its fields' bytes come
// near: what the frame adds to them (tags, lengths, numbers) is far
// under a kilobyte.
func fitsFrame(f *edgev1.Forward) bool {
	n := len(f.GetEvent()) + len(f.GetDeviceId()) + len(f.GetUserId()) + len(f.GetEventId()) + len(f.GetSenderDeviceId()) + len(f.GetTraceparent())
	if n <= maxFrame-1<<10 {
		return true
	}
	const idField = 1 + binary.MaxVarintLen64 // the id's tag and value, at most
	return proto.Size(&edgev1.MeshFrame{Kind: &edgev1.MeshFrame_Forward{Forward: f}})+idField <= maxFrame
}

func writeFrame(w io.Writer, buf []byte, f *edgev1.MeshFrame) ([]byte, error) {
	buf, err := appendFrame(buf[:0], f)
	if err != nil {
		return buf, err
	}
	_, err = w.Write(buf)
	return buf, err
}

func appendFrame(buf []byte, f *edgev1.MeshFrame) ([]byte, error) {
	buf = binary.AppendUvarint(buf, uint64(proto.Size(f)))
	return proto.MarshalOptions{}.MarshalAppend(buf, f)
}

// writeChunk is how much a link's writer gathers before it writes, and
// the most it writes at once: a batch (up to a queue's worth, 64 MiB, or
// MaxOutstanding outcomes) goes out in writes of at most this, each under
// its own deadline of the idle timeout, so a peer that reads steadily but
// more slowly than a burst is queued keeps its link. Only one that takes
// less than this in the idle timeout is cut off (as the device writer in
// edge/session does).
const writeChunk = 64 << 10

// frameWriter writes a link's frames in chunks (writeChunk), each under
// its own deadline.
type frameWriter struct {
	str     *quic.Stream
	timeout time.Duration
	buf     []byte
}

// add gathers f, and writes what was gathered once that reaches
// writeChunk; wrote says it did.
func (w *frameWriter) add(f *edgev1.MeshFrame) (wrote bool, err error) {
	if w.buf, err = appendFrame(w.buf, f); err != nil {
		return false, err
	}
	if len(w.buf) < writeChunk {
		return false, nil
	}
	return true, w.flush()
}

// flush writes what was gathered.
func (w *frameWriter) flush() error {
	for b := w.buf; len(b) > 0; {
		n := min(len(b), writeChunk)
		_ = w.str.SetWriteDeadline(time.Now().Add(w.timeout))
		if _, err := w.str.Write(b[:n]); err != nil {
			return err
		}
		b = b[n:]
	}
	w.buf = w.buf[:0]
	if cap(w.buf) > 2*writeChunk {
		w.buf = nil // a large frame's buffer is not kept
	}
	return nil
}

// readFrame reads one frame, with no deadline of its own: for a peer's
// hello, which its caller bounds as a whole, and for tests.
func readFrame(r *bufio.Reader, buf []byte, f *edgev1.MeshFrame) ([]byte, error) {
	return readFrameWithin(r, buf, f, nil, 0)
}

// readDeadliner is the part of a QUIC stream readFrameWithin needs.
type readDeadliner interface{ SetReadDeadline(time.Time) error }

// readPiece is how much of a frame must arrive within one stall timeout:
// writeChunk, what the peer's writer is given the same timeout for.
const readPiece = writeChunk

// readFrameWithin reads the next frame from a link's stream r reads.
// Waiting for a frame to begin has no deadline (a quiet link is fine;
// QUIC's keep-alives and idle timeout watch the peer), but once it has
// begun, each read of it (at most readPiece; smaller while the buffer
// grows) must complete within stall, else the read
// fails with os.ErrDeadlineExceeded: a peer stalled inside a frame holds
// its link, and the part it sent, no longer than that, while one sending
// a large frame slowly but steadily keeps its link. The deadline is set
// only when the read must wait on str; a frame already buffered costs
// nothing. With str nil, nothing is bounded.
func readFrameWithin(r *bufio.Reader, buf []byte, f *edgev1.MeshFrame, str readDeadliner, stall time.Duration) ([]byte, error) {
	armed := false
	// arm gives the next read of want bytes its stall timeout, unless r
	// already holds them.
	arm := func(want int) {
		if str == nil || r.Buffered() >= want {
			return
		}
		_ = str.SetReadDeadline(time.Now().Add(stall))
		armed = true
	}
	if str != nil {
		if _, err := r.Peek(1); err != nil {
			return buf, err
		}
		defer func() {
			if armed {
				_ = str.SetReadDeadline(time.Time{})
			}
		}()
		// The length, unless r holds all of it.
		b, _ := r.Peek(r.Buffered())
		if _, k := binary.Uvarint(b); k == 0 {
			arm(len(b) + 1)
		}
	}
	n, err := binary.ReadUvarint(r)
	if err != nil {
		return buf, err
	}
	if n > maxFrame {
		return buf, fmt.Errorf("mesh frame of %d bytes", n)
	}
	// The buffer grows with the bytes that arrive, not with the length
	// the peer declared: a peer that declares a large frame and sends
	// little of it holds little.
	buf = buf[:0]
	for len(buf) < int(n) {
		if len(buf) == cap(buf) {
			buf = slices.Grow(buf, min(int(n)-len(buf), max(4<<10, len(buf))))
		}
		want := min(int(n), cap(buf), len(buf)+readPiece) - len(buf)
		arm(want)
		k, err := io.ReadFull(r, buf[len(buf):len(buf)+want])
		buf = buf[:len(buf)+k]
		if err != nil {
			return buf, err
		}
	}
	f.Reset()
	return buf, proto.Unmarshal(buf, f)
}

// sortedIDs returns a map's keys in order.
func sortedIDs[V any](m map[uint64]V) []uint64 {
	ids := make([]uint64, 0, len(m))
	for id := range m {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

// outcomeLabel is a forward's outcome as the metrics name it:
// "delivered", "not_delivered", "queue_full", ...
func outcomeLabel(o edgev1.ForwardOutcome) string {
	return strings.ToLower(strings.TrimPrefix(o.String(), "FORWARD_OUTCOME_"))
}
