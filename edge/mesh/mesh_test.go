package mesh

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/prometheus/client_golang/prometheus"
	"io"
	"log/slog"
	"math"
	"math/big"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/quic-go/quic-go"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// testCA issues mesh certificates as the control plane does.
type testCA struct {
	key  ed25519.PrivateKey
	cert *x509.Certificate
	der  []byte
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test cluster CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{key: key, cert: cert, der: der}
}

func (ca *testCA) issue(t *testing.T, id string, pub ed25519.PublicKey) []byte {
	t.Helper()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: id},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour), URIs: []*url.URL{EdgeURI(id)},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// fakeLocal records what the mesh asks of the edge's sessions.
type fakeLocal struct {
	mu       sync.Mutex
	devices  []*edgev1.DevicePresence
	outcome  edgev1.ForwardOutcome
	got      []*edgev1.Forward
	moved    []string
	deliverC chan struct{}
	// hold names users whose forwards get no outcome, as if their
	// devices never acknowledged them.
	hold map[string]bool
	// presence is what PeerPresence told, in order: "+d" online, "-d" gone.
	presence []string
}

func (f *fakeLocal) LocalPresence() []*edgev1.DevicePresence {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]*edgev1.DevicePresence(nil), f.devices...)
}

func (f *fakeLocal) DeliverForwarded(fw *edgev1.Forward, report func(edgev1.ForwardOutcome)) {
	f.mu.Lock()
	f.got = append(f.got, fw)
	o := f.outcome
	if f.hold[fw.GetUserId()] {
		o = 0
	}
	f.mu.Unlock()
	if report != nil && o != 0 {
		report(o)
	}
}

func (f *fakeLocal) PeerHolds(user, device string, since time.Time, instance, edgeID string) {
	f.mu.Lock()
	f.moved = append(f.moved, device)
	f.mu.Unlock()
}

func (f *fakeLocal) PeerPresence(user, device string, online bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if online {
		f.presence = append(f.presence, "+"+device)
	} else {
		f.presence = append(f.presence, "-"+device)
	}
}

// takePresence returns what PeerPresence told since the last call.
func (f *fakeLocal) takePresence() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	p := f.presence
	f.presence = nil
	return p
}

func (f *fakeLocal) forwards() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.got)
}

func startMesh(t *testing.T, ca *testCA, id string, local *fakeLocal) *Mesh {
	t.Helper()
	return startMeshWith(t, ca, id, local, nil)
}

// startMeshWith starts a mesh whose configuration mod may adjust; it
// returns a function that closes it (and is called at cleanup too).
func startMeshWith(t *testing.T, ca *testCA, id string, local Local, mod func(*Config)) *Mesh {
	t.Helper()
	cfg := Config{EdgeID: id, Identity: testIdentity(t, ca, id), Local: local, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	if mod != nil {
		mod(&cfg)
	}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { m.Run(); close(done) }()
	t.Cleanup(func() { _ = m.Close(); <-done })
	return m
}

// testIdentity is a fresh key with a certificate from ca naming id.
func testIdentity(t *testing.T, ca *testCA, id string) *Identity {
	t.Helper()
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	idn := NewIdentity(key)
	if err := idn.Set(ca.issue(t, id, idn.PublicKey()), ca.der); err != nil {
		t.Fatal(err)
	}
	return idn
}

// rawLink dials addr as a peer driven by hand and opens its link's
// stream; the connection closes at cleanup.
func rawLink(ctx context.Context, t *testing.T, addr string, tlsConf *tls.Config, idle time.Duration) (*quic.Conn, *quic.Stream) {
	t.Helper()
	conn, err := quic.DialAddr(ctx, addr, tlsConf, quicConfig(idle, false))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.CloseWithError(0, "") })
	str, err := conn.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return conn, str
}

// sendOnLink dials addr as a peer driven by hand (rawLink) and writes
// frames on its link; the connection closes at cleanup.
func sendOnLink(ctx context.Context, t *testing.T, addr string, tlsConf *tls.Config, frames ...*edgev1.MeshFrame) *quic.Conn {
	t.Helper()
	conn, str := rawLink(ctx, t, addr, tlsConf, time.Minute)
	var buf []byte
	var err error
	for _, f := range frames {
		if buf, err = writeFrame(str, buf, f); err != nil {
			t.Fatal(err)
		}
	}
	return conn
}

// meshAndRawPeer starts edge-a's mesh with local, and returns it with the
// identity of edge-x, a member of the same CA a test drives by hand
// (sendOnLink), and a context for a minute of that. edge-x's address is
// one where nothing answers: a's own link to it never comes up.
func meshAndRawPeer(t *testing.T, local *fakeLocal) (*Mesh, *Identity, context.Context) {
	t.Helper()
	ca := newTestCA(t)
	a := startMesh(t, ca, "edge-a", local)
	a.SetMembers([]Member{{ID: "edge-x", MeshAddr: "127.0.0.1:9"}})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return a, testIdentity(t, ca, "edge-x"), ctx
}

// helloFrom is the hello of edge-x to edge-a.
func helloFrom() *edgev1.MeshFrame {
	return &edgev1.MeshFrame{Kind: &edgev1.MeshFrame_Hello{Hello: &edgev1.MeshHello{EdgeId: "edge-x", PeerId: "edge-a"}}}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	clustertest.Eventually(t, 30*time.Second, func() error {
		if !cond() {
			return fmt.Errorf("still waiting for %s", what)
		}
		return nil
	})
}

func TestPresenceAndForwarding(t *testing.T) {
	ca := newTestCA(t)
	la := &fakeLocal{devices: []*edgev1.DevicePresence{{DeviceId: "d1", UserId: "u", SinceNs: 10}}, outcome: edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED}
	lb := &fakeLocal{devices: []*edgev1.DevicePresence{{DeviceId: "d9", UserId: "u", SinceNs: 5}}}
	// b forgets a's devices as soon as a is gone (the grace period has a
	// test of its own).
	a, b := startMesh(t, ca, "edge-a", la), startMeshWith(t, ca, "edge-b", lb, func(c *Config) { c.PresenceGrace = -1 })
	members := []Member{{ID: "edge-a", MeshAddr: a.Addr().String()}, {ID: "edge-b", MeshAddr: b.Addr().String()}}
	a.SetMembers(members)
	b.SetMembers(members)
	// Full sets when the links come up.
	waitFor(t, "b learns d1 is on a", func() bool { e, ok := b.Locate("d1"); return ok && e == "edge-a" })
	waitFor(t, "a learns d9 is on b", func() bool { e, ok := a.Locate("d9"); return ok && e == "edge-b" })
	// Deltas.
	a.Announce(&edgev1.DevicePresence{DeviceId: "d2", UserId: "u", SinceNs: 11}, true)
	waitFor(t, "b learns d2", func() bool { _, ok := b.Locate("d2"); return ok })
	a.Announce(&edgev1.DevicePresence{DeviceId: "d2", UserId: "u", SinceNs: 11}, false)
	waitFor(t, "b forgets d2", func() bool { _, ok := b.Locate("d2"); return !ok })
	// An offline delta for an older session of a device does not remove
	// its newer one.
	a.Announce(&edgev1.DevicePresence{DeviceId: "d1", UserId: "u", SinceNs: 3}, false)

	// Forwards get their outcome; in order.
	outcomes := make(chan edgev1.ForwardOutcome, 10)
	for range 5 {
		b.Forward("edge-a", &edgev1.Forward{DeviceId: "d1", UserId: "u", Event: []byte("x")}, func(o edgev1.ForwardOutcome) { outcomes <- o })
	}
	for range 5 {
		if o := nextOutcome(t, outcomes); o != edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED {
			t.Fatalf("outcome %v", o)
		}
	}
	if _, ok := b.Locate("d1"); !ok {
		t.Fatal("an offline delta of an older session removed the newer one")
	}
	// Ephemeral forwards get no outcome: they count when sent.
	for range 3 {
		b.Forward("edge-a", &edgev1.Forward{DeviceId: "d1", UserId: "u", Event: []byte("e")}, nil)
	}
	waitFor(t, "a got the ephemeral forwards", func() bool { return la.forwards() == 8 })
	for o, want := range map[string]float64{"delivered": 5, "ephemeral": 3, "link_down": 0, "link_full": 0} {
		if got := counterValue(b.metrics.forwards.WithLabelValues(o)); got != want {
			t.Errorf("forwards{outcome=%q} = %v, want %v", o, got, want)
		}
	}
	// A forward to an edge that is not a member: NOT_DELIVERED at once.
	b.Forward("edge-x", &edgev1.Forward{DeviceId: "d1"}, func(o edgev1.ForwardOutcome) { outcomes <- o })
	if o := nextOutcome(t, outcomes); o != edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED {
		t.Fatalf("outcome %v", o)
	}

	// A peer that never answers, then goes away: its pending forwards
	// are answered NOT_DELIVERED, and what it announced is forgotten.
	la.mu.Lock()
	la.outcome = 0
	la.mu.Unlock()
	b.Forward("edge-a", &edgev1.Forward{DeviceId: "d1", UserId: "u"}, func(o edgev1.ForwardOutcome) { outcomes <- o })
	waitFor(t, "a got the forward", func() bool { return la.forwards() == 9 })
	if st := b.Stats(); st.Pending != 1 || st.RemoteDevices != 1 {
		t.Fatalf("b's tables: %+v", st)
	}
	_ = a.Close()
	if o := nextOutcome(t, outcomes); o != edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED {
		t.Fatalf("outcome after the peer left: %v", o)
	}
	waitFor(t, "b forgets a's devices", func() bool {
		st := b.Stats()
		return st.RemoteDevices == 0 && st.RemoteUsers == 0 && st.PeerSets == 0 && st.Pending == 0 && st.LinksUp == 0
	})
}

// Every link is dialled through a Retry: the mesh port keeps no state
// for an address that has not shown it receives there.
func TestLinksComeThroughARetry(t *testing.T) {
	ca := newTestCA(t)
	a, b := startMesh(t, ca, "edge-a", &fakeLocal{}), startMesh(t, ca, "edge-b", &fakeLocal{})
	members := []Member{{ID: "edge-a", MeshAddr: a.Addr().String()}, {ID: "edge-b", MeshAddr: b.Addr().String()}}
	a.SetMembers(members)
	b.SetMembers(members)
	waitFor(t, "both links up", func() bool { return a.Stats().LinksUp == 1 && b.Stats().LinksUp == 1 })
	for _, m := range []*Mesh{a, b} {
		var v dto.Metric
		if err := m.metrics.retries.Write(&v); err != nil {
			t.Fatal(err)
		}
		if v.GetCounter().GetValue() < 1 {
			t.Fatalf("%s sent its peer's link no Retry", m.cfg.EdgeID)
		}
	}
}

// A device announced by another edge with a newer session makes the
// local one close.
func TestNewerSessionElsewhereWins(t *testing.T) {
	ca := newTestCA(t)
	la := &fakeLocal{devices: []*edgev1.DevicePresence{{DeviceId: "d1", UserId: "u", SinceNs: 20}}}
	lb := &fakeLocal{}
	a, b := startMesh(t, ca, "edge-a", la), startMesh(t, ca, "edge-b", lb)
	members := []Member{{ID: "edge-a", MeshAddr: a.Addr().String()}, {ID: "edge-b", MeshAddr: b.Addr().String()}}
	a.SetMembers(members)
	b.SetMembers(members)
	waitFor(t, "b told to close its older d1", func() bool {
		lb.mu.Lock()
		defer lb.mu.Unlock()
		return len(lb.moved) == 1 && lb.moved[0] == "d1"
	})
}

// A peer's announcements of one device may arrive out of order (two
// sessions of it opened together there, each announcing after it
// registered): an online older than the one recorded is stale and
// ignored, so the newer session's offline clears the device rather than
// leaving it "online" at that edge for the link's life.
func TestALateOlderOnlineIsIgnored(t *testing.T) {
	m := startMesh(t, newTestCA(t), "edge-a", &fakeLocal{})
	online := func(since int64) []*edgev1.DevicePresence {
		return []*edgev1.DevicePresence{{DeviceId: "d", UserId: "u", SinceNs: since}}
	}
	m.presenceFromPeer("edge-b", nil, deltaFrame, online(2), nil)
	m.presenceFromPeer("edge-b", nil, deltaFrame, online(1), nil)
	if at, ok := m.Locate("d"); !ok || at != "edge-b" {
		t.Fatalf("d is at %q %v", at, ok)
	}
	m.presenceFromPeer("edge-b", nil, deltaFrame, nil, online(2))
	if at, ok := m.Locate("d"); ok {
		t.Fatalf("d is still at %q after its newest session went offline", at)
	}
	if on := m.Online("u"); len(on) != 0 {
		t.Fatalf("u's devices online elsewhere: %v", on)
	}
}

// Only certificates from the cluster CA get into the mesh, in either
// direction.
func TestForeignCertificatesAreRefused(t *testing.T) {
	ca, other := newTestCA(t), newTestCA(t)
	la := &fakeLocal{devices: []*edgev1.DevicePresence{{DeviceId: "d1", UserId: "u", SinceNs: 1}}}
	lx := &fakeLocal{devices: []*edgev1.DevicePresence{{DeviceId: "dx", UserId: "u", SinceNs: 1}}}
	a := startMesh(t, ca, "edge-a", la)
	x := startMesh(t, other, "edge-x", lx) // its own CA, which a does not trust
	members := []Member{{ID: "edge-a", MeshAddr: a.Addr().String()}, {ID: "edge-x", MeshAddr: x.Addr().String()}}
	a.SetMembers(members)
	x.SetMembers(members)
	// Give both time to try: a never learns x's device, x never a's.
	b := startMesh(t, ca, "edge-b", &fakeLocal{})
	b.SetMembers(append(members, Member{ID: "edge-b", MeshAddr: b.Addr().String()}))
	a.SetMembers(append(members, Member{ID: "edge-b", MeshAddr: b.Addr().String()}))
	waitFor(t, "b learns a's device (the mesh works)", func() bool { _, ok := b.Locate("d1"); return ok })
	waitFor(t, "x tried to reach a and b several times", func() bool { return x.Stats().Dials >= 4 })
	waitFor(t, "a tried to reach x several times", func() bool { return a.Stats().Dials >= 4 })
	if x.Stats().LinksUp != 0 || a.Stats().LinksUp != 1 {
		t.Fatalf("links up: x %d, a %d", x.Stats().LinksUp, a.Stats().LinksUp)
	}
	if _, ok := a.Locate("dx"); ok {
		t.Fatal("a accepted presence from a peer with a foreign certificate")
	}
	if _, ok := x.Locate("d1"); ok {
		t.Fatal("a foreign peer learnt a's devices")
	}
	if _, ok := b.Locate("dx"); ok {
		t.Fatal("b accepted a foreign peer")
	}
	// A certificate for another edge's id does not pass as that edge.
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	idn := NewIdentity(key)
	if err := idn.Set(ca.issue(t, "edge-a", ed25519.PublicKey(make([]byte, 32))), ca.der); err == nil {
		t.Fatal("installed a certificate for another key")
	}
}

// A peer with a certificate for an edge id from the cluster CA, but for
// a key other than the one the member list registers for that id (an
// older process of the id whose certificate has not expired), is cut off
// and refused in both directions; the holder of the registered key links.
func TestOnlyTheRegisteredKeySpeaksForAnEdgeID(t *testing.T) {
	ca := newTestCA(t)
	presence := func(id string) []*edgev1.DevicePresence {
		return []*edgev1.DevicePresence{{DeviceId: id, UserId: "u", SinceNs: 1}}
	}
	a := startMesh(t, ca, "edge-a", &fakeLocal{devices: presence("da")})
	stale := startMeshWith(t, ca, "edge-b", &fakeLocal{devices: presence("stale")}, func(c *Config) { c.PresenceGrace = -1 })
	fresh := startMesh(t, ca, "edge-b", &fakeLocal{devices: presence("fresh")})
	key := func(m *Mesh) ed25519.PublicKey { return m.cfg.Identity.PublicKey() }
	memberA := []Member{{ID: "edge-a", MeshAddr: a.Addr().String(), Key: key(a)}}
	stale.SetMembers(memberA) // fresh links to a only at the end
	located := func(m *Mesh, device string) func() bool {
		return func() bool { _, ok := m.Locate(device); return ok }
	}
	// While a knows no key for edge-b, the stale process links both ways.
	a.SetMembers([]Member{{ID: "edge-b", MeshAddr: stale.Addr().String()}})
	waitFor(t, "a learns the stale process's device", located(a, "stale"))
	waitFor(t, "the stale process learns a's device", located(stale, "da"))

	// The control plane registered fresh's key for edge-b: a drops the
	// stale process's links and refuses it, even at the address it knows.
	a.SetMembers([]Member{{ID: "edge-b", MeshAddr: stale.Addr().String(), Key: key(fresh)}})
	waitFor(t, "a forgets the stale process's device", func() bool { return !located(a, "stale")() })
	waitFor(t, "the stale process forgets a's device", func() bool { return !located(stale, "da")() })
	aDials, staleDials := a.Stats().Dials, stale.Stats().Dials
	waitFor(t, "both tried again several times", func() bool {
		return a.Stats().Dials >= aDials+3 && stale.Stats().Dials >= staleDials+3
	})
	if located(a, "stale")() || located(stale, "da")() || a.Stats().LinksUp != 0 {
		t.Fatalf("the stale process is linked: a holds its device %v, it holds a's %v, a's links up %d",
			located(a, "stale")(), located(stale, "da")(), a.Stats().LinksUp)
	}

	// At fresh's address, the registered key links both ways.
	a.SetMembers([]Member{{ID: "edge-b", MeshAddr: fresh.Addr().String(), Key: key(fresh)}})
	fresh.SetMembers(memberA)
	waitFor(t, "a learns fresh's device", located(a, "fresh"))
	waitFor(t, "fresh learns a's device", located(fresh, "da"))
}

// An edge with a certificate from the cluster CA that is not in the
// member list (deregistered, removed, or not heard of yet) links only to
// hear this edge's status, which a cut-off edge whose lease ran out
// needs to step aside (docs/consistency.md, "Partitions"): nothing it
// sends counts. Its presence is never applied, so it cannot make a
// device's session here close (PeerHolds); its forwards are answered
// NOT_DELIVERED and never reach a device; its status does not count. An
// edge that joins the list has that link closed and is heard on the next;
// a member the list drops is forgotten at once and speaks no more on
// the link it keeps.
func TestOnlyMembersSpeakOnTheMesh(t *testing.T) {
	ca := newTestCA(t)
	local := &fakeLocal{outcome: edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED}
	a := startMesh(t, ca, "edge-a", local)
	notX := []Member{{ID: "edge-b", MeshAddr: "127.0.0.1:9"}}
	a.SetMembers(notX)
	idn := testIdentity(t, ca, "edge-x")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	victim := func(dev string) *edgev1.MeshFrame {
		return &edgev1.MeshFrame{Kind: &edgev1.MeshFrame_PresenceSet{PresenceSet: &edgev1.PresenceSet{Devices: []*edgev1.DevicePresence{
			{DeviceId: dev, UserId: "u", SinceNs: time.Now().UnixNano(), Instance: "not-the-victims"}}}}}
	}
	forward := func(id uint64) *edgev1.MeshFrame {
		return &edgev1.MeshFrame{Kind: &edgev1.MeshFrame_Forward{Forward: &edgev1.Forward{Id: id, DeviceId: "victim", UserId: "u", Event: []byte("x")}}}
	}
	hello := &edgev1.MeshFrame{Kind: &edgev1.MeshFrame_Hello{Hello: &edgev1.MeshHello{EdgeId: "edge-x", PeerId: "edge-a"}}}
	write := func(str *quic.Stream, frames ...*edgev1.MeshFrame) {
		t.Helper()
		var buf []byte
		var err error
		for _, f := range frames {
			if buf, err = writeFrame(str, buf, f); err != nil {
				t.Fatal(err)
			}
		}
	}
	// next reads a's frames on the link up to a forward's result, and
	// returns its outcome: a reads a link in order, so it has taken in
	// every frame sent before that forward.
	next := func(r *bufio.Reader, id uint64) edgev1.ForwardOutcome {
		t.Helper()
		for {
			f := &edgev1.MeshFrame{}
			if _, err := readFrame(r, nil, f); err != nil {
				t.Fatalf("waiting for forward %d's result: %v", id, err)
			}
			if res := f.GetForwardResult(); res != nil {
				if res.GetId() != id {
					t.Fatalf("result for forward %d, want %d", res.GetId(), id)
				}
				return res.GetOutcome()
			}
		}
	}
	heard := func(r *bufio.Reader) bool {
		t.Helper()
		for {
			f := &edgev1.MeshFrame{}
			if _, err := readFrame(r, nil, f); err != nil {
				t.Fatalf("waiting for a's status: %v", err)
			}
			if st := f.GetStatus(); st != nil && st.GetControlHeard() {
				return true
			}
		}
	}
	nothingCounted := func(when string, devices ...string) {
		t.Helper()
		local.mu.Lock()
		defer local.mu.Unlock()
		for _, d := range devices {
			if e, ok := a.Locate(d); ok || slices.Contains(local.moved, d) {
				t.Fatalf("%s: %s located at %q (%v), sessions told to close %v", when, d, e, ok, local.moved)
			}
		}
		if len(local.got) != 0 || len(a.PeersHearingControl()) != 0 {
			t.Fatalf("%s: forwards delivered %d, peers hearing the control plane %v", when, len(local.got), a.PeersHearingControl())
		}
	}

	// Not a member: the link is taken, but only to tell x a's status.
	conn, str := rawLink(ctx, t, a.Addr().String(), idn.clientTLS("edge-a", nil), time.Minute)
	r := bufio.NewReader(str)
	write(str, hello, victim("victim"), statusFrame(true), forward(0), forward(1))
	if o := next(r, 1); o != edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED {
		t.Fatalf("a non-member's forward: %v, want NOT_DELIVERED", o)
	}
	nothingCounted("from a non-member", "victim")
	a.SetControlHeard(true)
	heard(r)

	// x joins the list: its link goes, and the next one counts.
	a.SetMembers([]Member{{ID: "edge-x", MeshAddr: "127.0.0.1:9"}})
	waitFor(t, "x's non-member link closed", func() bool { return conn.Context().Err() != nil })
	_, str = rawLink(ctx, t, a.Addr().String(), idn.clientTLS("edge-a", nil), time.Minute)
	r = bufio.NewReader(str)
	write(str, hello, victim("victim"), forward(1))
	if o := next(r, 1); o != edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED {
		t.Fatalf("a member's forward: %v, want DELIVERED", o)
	}
	if e, ok := a.Locate("victim"); !ok || e != "edge-x" {
		t.Fatalf("a member's device is at %q (%v)", e, ok)
	}

	// x leaves the list: what it announced goes at once, and its link,
	// kept, carries nothing that counts.
	a.SetMembers(notX)
	if st := a.Stats(); st.RemoteDevices != 0 || st.Graced != 0 {
		t.Fatalf("after x left the list, a's tables %+v", st)
	}
	local.mu.Lock()
	local.got, local.moved = nil, nil
	local.mu.Unlock()
	write(str, victim("victim2"), statusFrame(true), forward(2))
	if o := next(r, 2); o != edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED {
		t.Fatalf("an ex-member's forward: %v, want NOT_DELIVERED", o)
	}
	nothingCounted("from an ex-member", "victim", "victim2")
	a.SetControlHeard(false)
	a.SetControlHeard(true)
	heard(r)
}

// An edge that joins links to a peer before the peer has heard of it
// (each learns the member list from its own watch): the peer does not
// refuse that link (refusals would grow the new edge's backoff towards
// its 5 s cap) but closes it as soon as it learns, and the new edge dials
// once more, after its link's first backoff (50 ms): two dials at most.
func TestAJoiningEdgeIsHeardOnceThePeerLearnsOfIt(t *testing.T) {
	ca := newTestCA(t)
	a := startMesh(t, ca, "edge-a", &fakeLocal{})
	x := startMesh(t, ca, "edge-x", &fakeLocal{devices: presenceOf("dx")})
	x.SetMembers([]Member{{ID: "edge-a", MeshAddr: a.Addr().String()}})
	waitFor(t, "x's link to a up", func() bool { return x.Stats().LinksUp == 1 })
	if _, ok := a.Locate("dx"); ok {
		t.Fatal("a took the set of an edge it has not heard of")
	}
	start := time.Now()
	a.SetMembers([]Member{{ID: "edge-x", MeshAddr: x.Addr().String()}})
	waitFor(t, "a learns x's device", func() bool { _, ok := a.Locate("dx"); return ok })
	t.Logf("x heard %v after a learnt of it", time.Since(start).Round(time.Millisecond))
	// a may hear x's device first on its own link to x. x's link, which a
	// closes if it was still a non-member's when a learnt of x (a link a
	// registers after that is a member's), is up again after one more
	// dial at most.
	waitFor(t, "x's link to a up", func() bool { return x.Stats().LinksUp == 1 })
	if d := x.Stats().Dials; d > 2 {
		t.Fatalf("x's link dialed %d times, want at most 2: the first, taken though a had not heard of x, and one after a closed it", d)
	}
}

// A peer cannot announce a session that starts far in the future: a
// session here of the device would start after it, beyond what fits in
// the nanoseconds it is announced in. An entry more than an hour ahead
// is ignored; one a minute ahead (a clock a little off) is taken. So is
// a device whose id, or its user's, is longer than any can be (the
// control plane's bound, fsm.MaxIDLen: an id it accepts is taken): with
// such ids a peer's bound of devices would bound no bytes. What is ignored is
// logged, at most once a minute: a peer with a broken clock sends such
// starts in every frame.
func TestAStartFarAheadIsIgnored(t *testing.T) {
	local := &fakeLocal{}
	w := &warnings{}
	m := startMeshWith(t, newTestCA(t), "edge-a", local, func(c *Config) { c.Logger = slog.New(w) })
	m.presenceFromPeer("edge-b", nil, deltaFrame, []*edgev1.DevicePresence{
		{DeviceId: "pinned", UserId: "u", SinceNs: math.MaxInt64},
		{DeviceId: "ahead", UserId: "u", SinceNs: time.Now().Add(2 * maxSinceAhead).UnixNano()},
		{DeviceId: "skewed", UserId: "u", SinceNs: time.Now().Add(time.Minute).UnixNano()},
		{DeviceId: strings.Repeat("d", fsm.MaxIDLen+1), UserId: "u", SinceNs: 1},
		{DeviceId: "long-user", UserId: strings.Repeat("u", fsm.MaxIDLen+1), SinceNs: 1},
		{DeviceId: strings.Repeat("d", fsm.MaxIDLen), UserId: strings.Repeat("u", fsm.MaxIDLen), SinceNs: 1},
	}, nil)
	m.presenceFromPeer("edge-b", nil, deltaFrame, []*edgev1.DevicePresence{
		{DeviceId: "pinned-again", UserId: "u", SinceNs: math.MaxInt64},
	}, nil)
	const unfit = "mesh peer announced sessions that start more than an hour from now, or ids longer than a device's or user's can be: ignored"
	w.mu.Lock()
	if n := slices.Index(w.msgs, unfit); n < 0 || slices.Contains(w.msgs[n+1:], unfit) {
		t.Errorf("warnings %q: want the ignored devices logged once for both frames", w.msgs)
	}
	w.mu.Unlock()
	if m.unfit.Load() != 1 {
		t.Errorf("%d devices ignored since the warning, want the second frame's 1", m.unfit.Load())
	}
	for dev, want := range map[string]bool{"pinned": false, "pinned-again": false, "ahead": false, "skewed": true,
		strings.Repeat("d", fsm.MaxIDLen+1): false, "long-user": false, strings.Repeat("d", fsm.MaxIDLen): true} {
		if _, ok := m.Locate(dev); ok != want {
			t.Errorf("%s located %v, want %v", dev, ok, want)
		}
	}
	local.mu.Lock()
	defer local.mu.Unlock()
	if !slices.Equal(local.moved, []string{"skewed", strings.Repeat("d", fsm.MaxIDLen)}) {
		t.Fatalf("sessions here told to close: %v, want skewed and the longest id", local.moved)
	}
}

// A member's link that ends keeps what it announced for PresenceGrace:
// a peer that reconnects within it sends its full set, which settles
// only what changed, so the users' devices here hear of no blip; a peer
// that leaves the member list is forgotten at once; one that does not
// come back, once the grace has passed.
func TestALinkThatEndsKeepsItsPeersDevicesForTheGrace(t *testing.T) {
	ca := newTestCA(t)
	local := &fakeLocal{}
	a := startMeshWith(t, ca, "edge-a", local, func(c *Config) { c.PresenceGrace = time.Minute })
	idn := testIdentity(t, ca, "edge-x")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// edge-x is a member (at an address where nothing answers: a's own
	// link to it never comes up, which changes nothing here).
	a.SetMembers([]Member{{ID: "edge-x", MeshAddr: "127.0.0.1:9"}})
	marker := func(name string) *edgev1.MeshFrame {
		return &edgev1.MeshFrame{Kind: &edgev1.MeshFrame_PresenceDelta{PresenceDelta: &edgev1.PresenceDelta{Online: presenceOf(name)}}}
	}
	told := func(what string) func() bool {
		return func() bool {
			local.mu.Lock()
			defer local.mu.Unlock()
			return slices.Contains(local.presence, what)
		}
	}
	link := func(frames ...*edgev1.MeshFrame) *quic.Conn {
		return sendOnLink(ctx, t, a.Addr().String(), idn.clientTLS("edge-a", nil), append([]*edgev1.MeshFrame{helloFrom()}, frames...)...)
	}
	first := link(append(presenceFrames(presenceOf("d1", "d2")), marker("m1"))...)
	waitFor(t, "a learns x's devices", told("+m1"))
	local.takePresence()

	_ = first.CloseWithError(0, "blip")
	waitFor(t, "x's link ended", func() bool { return a.Stats().Graced == 1 })
	if e, ok := a.Locate("d1"); !ok || e != "edge-x" || a.Stats().RemoteDevices != 3 {
		t.Fatalf("within the grace, d1 is at %q (%v) and a holds %d devices; want x's 3 kept", e, ok, a.Stats().RemoteDevices)
	}
	// x is back with d2 gone and d3 new: only that is told.
	second := link(append(presenceFrames(presenceOf("d1", "d3")), marker("m2"))...)
	waitFor(t, "a reads x's new set", told("+m2"))
	got := local.takePresence()
	slices.Sort(got)
	if want := []string{"+d3", "+m2", "-d2", "-m1"}; !slices.Equal(got, want) {
		t.Fatalf("after the blip a told %v, want %v", got, want)
	}
	if st := a.Stats(); st.Graced != 0 || st.RemoteDevices != 3 {
		t.Fatalf("after x came back, a's tables %+v", st)
	}

	// x's link ends again, and x leaves the member list: gone at once.
	_ = second.CloseWithError(0, "gone")
	waitFor(t, "x's link ended again", func() bool { return a.Stats().Graced == 1 })
	a.SetMembers(nil)
	if st := a.Stats(); st.Graced != 0 || st.RemoteDevices != 0 {
		t.Fatalf("after x left the member list, a's tables %+v", st)
	}
	got = local.takePresence()
	slices.Sort(got)
	if want := []string{"-d1", "-d3", "-m2"}; !slices.Equal(got, want) {
		t.Fatalf("after x left, a told %v, want %v", got, want)
	}

	// A member that does not come back: forgotten once the grace passed.
	local2 := &fakeLocal{}
	a2 := startMeshWith(t, ca, "edge-a", local2, func(c *Config) { c.PresenceGrace = 200 * time.Millisecond })
	a2.SetMembers([]Member{{ID: "edge-x", MeshAddr: "127.0.0.1:9"}})
	third := sendOnLink(ctx, t, a2.Addr().String(), idn.clientTLS("edge-a", nil), helloFrom(), marker("d4"))
	waitFor(t, "a2 learns d4", func() bool { _, ok := a2.Locate("d4"); return ok })
	_ = third.CloseWithError(0, "gone for good")
	waitFor(t, "a2 forgets d4 after the grace", func() bool {
		st := a2.Stats()
		return st.RemoteDevices == 0 && st.Graced == 0 && st.PeerSets == 0
	})
	// Local hears of it once the tables' lock is let go: a moment after.
	waitFor(t, "a2 tells d4 went", func() bool {
		local2.mu.Lock()
		defer local2.mu.Unlock()
		return slices.Contains(local2.presence, "-d4")
	})
	if got := local2.takePresence(); !slices.Equal(got, []string{"+d4", "-d4"}) {
		t.Fatalf("a2 told %v", got)
	}
}

// Each edge tells its peers whether it hears the control plane: a peer
// counts it while its link is up and its latest status says so, a link
// that comes up carries the status set before it, and a peer gone from
// the mesh no longer counts.
func TestPeersTellWhetherTheyHearTheControlPlane(t *testing.T) {
	ca := newTestCA(t)
	a, b, c := startMesh(t, ca, "edge-a", &fakeLocal{}), startMesh(t, ca, "edge-b", &fakeLocal{}), startMesh(t, ca, "edge-c", &fakeLocal{})
	hearing := func(m *Mesh, want ...string) func() bool {
		return func() bool { return slices.Equal(m.PeersHearingControl(), want) }
	}
	ab := []Member{{ID: "edge-a", MeshAddr: a.Addr().String()}, {ID: "edge-b", MeshAddr: b.Addr().String()}}
	a.SetMembers(ab)
	b.SetMembers(ab)
	waitFor(t, "both links up", func() bool { return a.Stats().LinksUp == 1 && b.Stats().LinksUp == 1 })
	if got := a.PeersHearingControl(); len(got) != 0 {
		t.Fatalf("peers hearing the control plane before any status: %v", got)
	}
	b.SetControlHeard(true)
	waitFor(t, "a learns b hears the control plane", hearing(a, "edge-b"))
	if got := b.PeersHearingControl(); len(got) != 0 {
		t.Fatalf("b counts %v, but a said nothing", got)
	}

	// c set its status before linking: its link brings it.
	c.SetControlHeard(true)
	abc := append(ab, Member{ID: "edge-c", MeshAddr: c.Addr().String()})
	for _, m := range []*Mesh{a, b, c} {
		m.SetMembers(abc)
	}
	waitFor(t, "a learns c hears the control plane", hearing(a, "edge-b", "edge-c"))
	waitFor(t, "b learns c hears the control plane", hearing(b, "edge-c"))

	b.SetControlHeard(false)
	waitFor(t, "a learns b no longer hears it", hearing(a, "edge-c"))
	_ = c.Close()
	waitFor(t, "a forgets c", hearing(a))
	waitFor(t, "b forgets c", hearing(b))
}

// A peer that speaks relay-mesh/1 only (an edge not upgraded yet, which
// ends a link on a frame it does not know) gets no status frame; the
// link carries presence and forwards as before.
func TestAPeerOfTheFirstMeshProtocolGetsNoStatus(t *testing.T) {
	ca := newTestCA(t)
	a := startMesh(t, ca, "edge-a", &fakeLocal{})
	a.SetControlHeard(true)
	tlsConf := testIdentity(t, ca, "edge-old").serverTLS()
	tlsConf.NextProtos = []string{ALPN}
	ln, err := quic.ListenAddr("127.0.0.1:0", tlsConf, quicConfig(time.Minute, true))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	a.SetMembers([]Member{{ID: "edge-old", MeshAddr: ln.Addr().String()}})

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn, err := ln.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.CloseWithError(0, "")
	if p := conn.ConnectionState().TLS.NegotiatedProtocol; p != ALPN {
		t.Fatalf("negotiated %q, want %q", p, ALPN)
	}
	str, err := conn.AcceptStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	_ = str.SetReadDeadline(time.Now().Add(30 * time.Second))
	r := bufio.NewReader(str)
	var kinds []string
	var buf []byte
	for {
		f := &edgev1.MeshFrame{}
		if buf, err = readFrame(r, buf, f); err != nil {
			t.Fatalf("after %v: %v", kinds, err)
		}
		kinds = append(kinds, fmt.Sprintf("%T", f.GetKind()))
		switch {
		case f.GetPresenceSet() != nil:
			// The link is up: a status change, then a forward to mark
			// where the stream is.
			a.SetControlHeard(false)
			a.Forward("edge-old", &edgev1.Forward{DeviceId: "d", UserId: "u", Event: []byte("x")}, nil)
		case f.GetForward() != nil:
			want := []string{"*edgev1.MeshFrame_Hello", "*edgev1.MeshFrame_PresenceSet", "*edgev1.MeshFrame_Forward"}
			if !slices.Equal(kinds, want) {
				t.Fatalf("a relay-mesh/1 peer got %v, want %v", kinds, want)
			}
			return
		}
	}
}

// A peer's status also comes back on this edge's own link to it, so a
// peer that no longer links to this edge (it dropped this edge from its
// member list, as the control plane does once this edge's lease runs
// out) still counts while this edge links to it; the link going down
// forgets it.
func TestAStatusComesBackOnTheDialersLink(t *testing.T) {
	ca := newTestCA(t)
	a, b := startMesh(t, ca, "edge-a", &fakeLocal{}), startMesh(t, ca, "edge-b", &fakeLocal{})
	b.SetControlHeard(true)
	// Only a links to b.
	a.SetMembers([]Member{{ID: "edge-b", MeshAddr: b.Addr().String()}})
	waitFor(t, "a learns b hears the control plane", func() bool { return slices.Equal(a.PeersHearingControl(), []string{"edge-b"}) })
	if st := b.Stats(); st.LinksUp != 0 {
		t.Fatalf("b links to %d peers, want none", st.LinksUp)
	}
	b.SetControlHeard(false)
	waitFor(t, "a learns b no longer hears it", func() bool { return len(a.PeersHearingControl()) == 0 })
	b.SetControlHeard(true)
	waitFor(t, "a learns b hears it again", func() bool { return len(a.PeersHearingControl()) == 1 })
	a.SetMembers(nil)
	waitFor(t, "a forgets b with its link", func() bool { return len(a.PeersHearingControl()) == 0 })
}

// A dialer that speaks relay-mesh/1 only (an edge not upgraded yet,
// which ends a link on a frame it does not know) gets no status back:
// only the results of its forwards.
func TestADialerOfTheFirstMeshProtocolGetsNoStatus(t *testing.T) {
	ca := newTestCA(t)
	a := startMesh(t, ca, "edge-a", &fakeLocal{outcome: edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED})
	a.SetMembers([]Member{{ID: "edge-old", MeshAddr: "127.0.0.1:9"}})
	a.SetControlHeard(true)
	tlsConf := testIdentity(t, ca, "edge-old").clientTLS("edge-a", nil)
	tlsConf.NextProtos = []string{ALPN}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, str := rawLink(ctx, t, a.Addr().String(), tlsConf, time.Minute)
	var buf []byte
	var err error
	for _, f := range []*edgev1.MeshFrame{
		{Kind: &edgev1.MeshFrame_Hello{Hello: &edgev1.MeshHello{EdgeId: "edge-old", PeerId: "edge-a"}}},
		{Kind: &edgev1.MeshFrame_PresenceSet{PresenceSet: &edgev1.PresenceSet{}}},
	} {
		if buf, err = writeFrame(str, buf, f); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "a registers the link", func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return a.inbound["edge-old"] != nil
	})
	a.SetControlHeard(false)
	a.SetControlHeard(true)
	if buf, err = writeFrame(str, buf, &edgev1.MeshFrame{Kind: &edgev1.MeshFrame_Forward{Forward: &edgev1.Forward{Id: 1, DeviceId: "d", UserId: "u", Event: []byte("x")}}}); err != nil {
		t.Fatal(err)
	}
	_ = str.SetReadDeadline(time.Now().Add(30 * time.Second))
	f := &edgev1.MeshFrame{}
	if _, err := readFrame(bufio.NewReader(str), nil, f); err != nil {
		t.Fatal(err)
	}
	if r := f.GetForwardResult(); r.GetId() != 1 || r.GetOutcome() != edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED {
		t.Fatalf("a relay-mesh/1 dialer got %v first, want the forward's result, delivered", f)
	}
}

// A peer's status carries over to its reconnected link only when that
// link can correct it (relay-mesh/2, the same key): a process of the
// first protocol that takes over the id does not inherit "hears".
func TestAReconnectedLinkInheritsAStatusItCanCorrect(t *testing.T) {
	a, idn, ctx := meshAndRawPeer(t, &fakeLocal{})
	link := func(tlsConf *tls.Config, frames ...*edgev1.MeshFrame) *quic.Conn {
		return sendOnLink(ctx, t, a.Addr().String(), tlsConf, append([]*edgev1.MeshFrame{
			helloFrom(), {Kind: &edgev1.MeshFrame_PresenceSet{PresenceSet: &edgev1.PresenceSet{}}},
		}, frames...)...)
	}
	first := link(idn.clientTLS("edge-a", nil), statusFrame(true))
	waitFor(t, "a learns x hears the control plane", func() bool { return slices.Equal(a.PeersHearingControl(), []string{"edge-x"}) })
	v1 := idn.clientTLS("edge-a", nil)
	v1.NextProtos = []string{ALPN}
	link(v1)
	waitFor(t, "the first link replaced", func() bool { return first.Context().Err() != nil })
	waitFor(t, "a no longer counts x", func() bool { return len(a.PeersHearingControl()) == 0 })
}

// An edge with tens of thousands of devices sends its full set in frames
// a peer takes: in one it would be over the frame limit, and the peer
// would refuse it and the link each time it came back.
func TestALargeFullSetComesThrough(t *testing.T) {
	ca := newTestCA(t)
	const n = 30000
	devs := make([]*edgev1.DevicePresence, n)
	for i := range devs {
		devs[i] = &edgev1.DevicePresence{DeviceId: fmt.Sprintf("device-%08d-%s", i, strings.Repeat("x", 24)), UserId: fmt.Sprintf("user-%08d", i/3),
			SinceNs: int64(i + 1), Instance: strings.Repeat("i", 64)}
	}
	if size := proto.Size(&edgev1.MeshFrame{Kind: &edgev1.MeshFrame_PresenceSet{PresenceSet: &edgev1.PresenceSet{Devices: devs}}}); size <= maxFrame {
		t.Fatalf("the set is %d bytes, not over the frame limit: the test shows nothing", size)
	}
	frames := presenceFrames(devs)
	if frames[0].GetPresenceSet() == nil {
		t.Fatal("the full set does not start with a PresenceSet")
	}
	for i, f := range frames {
		if size := proto.Size(f); size > maxFrame {
			t.Fatalf("frame %d of the set is %d bytes, over the limit", i, size)
		}
	}
	if got := presenceFrames(nil); len(got) != 1 || got[0].GetPresenceSet() == nil || len(got[0].GetPresenceSet().GetDevices()) != 0 {
		t.Fatalf("an edge with no devices sends %v, want one empty PresenceSet", got)
	}

	la := &fakeLocal{devices: devs}
	a, b := startMesh(t, ca, "edge-a", la), startMesh(t, ca, "edge-b", &fakeLocal{})
	members := []Member{{ID: "edge-a", MeshAddr: a.Addr().String()}, {ID: "edge-b", MeshAddr: b.Addr().String()}}
	a.SetMembers(members)
	b.SetMembers(members)
	for _, i := range []int{0, n / 2, n - 1} {
		waitFor(t, "b learns where a's devices are", func() bool { e, ok := b.Locate(devs[i].GetDeviceId()); return ok && e == "edge-a" })
	}
}

// A frame is read into a buffer that grows with what arrives: a peer
// that declares the largest frame and sends ten bytes of it makes the
// reader hold kilobytes, not the megabyte it declared.
func TestReadFrameGrowsWithWhatArrives(t *testing.T) {
	decl := binary.AppendUvarint(nil, maxFrame)
	buf, err := readFrame(bufio.NewReader(io.MultiReader(bytes.NewReader(decl), bytes.NewReader(make([]byte, 10)))), nil, &edgev1.MeshFrame{})
	if err == nil {
		t.Fatal("a cut frame was read")
	}
	if cap(buf) > 64<<10 {
		t.Fatalf("the reader holds %d bytes for 10 that came", cap(buf))
	}
	// Whole frames still read, the buffer reused.
	var wire bytes.Buffer
	want := &edgev1.MeshFrame{Kind: &edgev1.MeshFrame_Forward{Forward: &edgev1.Forward{DeviceId: "d", Event: bytes.Repeat([]byte("e"), 200<<10)}}}
	for range 2 {
		if _, err := writeFrame(&wire, nil, want); err != nil {
			t.Fatal(err)
		}
	}
	r := bufio.NewReader(&wire)
	for range 2 {
		var got edgev1.MeshFrame
		if buf, err = readFrame(r, buf, &got); err != nil || !proto.Equal(&got, want) {
			t.Fatalf("read back: %v (equal %v)", err, proto.Equal(&got, want))
		}
	}
}

// One user's devices that take forwarded events and never acknowledge
// them hold at most an eighth of a link's outstanding forwards: that
// user's forwards beyond are answered QUEUE_FULL at once, and every other
// user's still come through.
func TestOneUserCannotHoldALink(t *testing.T) {
	ca := newTestCA(t)
	const outstanding = 80 // a user's share: 10
	lb := &fakeLocal{outcome: edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED, hold: map[string]bool{"hog": true},
		devices: []*edgev1.DevicePresence{{DeviceId: "h", UserId: "hog", SinceNs: 1}}}
	b := startMeshWith(t, ca, "edge-b", lb, func(c *Config) { c.MaxOutstanding = outstanding })
	a := startMesh(t, ca, "edge-a", &fakeLocal{devices: []*edgev1.DevicePresence{{DeviceId: "s", UserId: "hog", SinceNs: 1}}})
	members := []Member{{ID: "edge-a", MeshAddr: a.Addr().String()}, {ID: "edge-b", MeshAddr: b.Addr().String()}}
	a.SetMembers(members)
	b.SetMembers(members)
	// a's link to b carries the forwards: up once b heard a's set on it.
	waitFor(t, "a's link to b up", func() bool { e, ok := b.Locate("s"); return ok && e == "edge-a" })
	outcomes := make(chan edgev1.ForwardOutcome, 2*outstanding)
	for range 2 * outstanding {
		a.Forward("edge-b", &edgev1.Forward{DeviceId: "h", UserId: "hog", Event: []byte("x")}, func(o edgev1.ForwardOutcome) { outcomes <- o })
	}
	expect := func(what string, want edgev1.ForwardOutcome) {
		t.Helper()
		select {
		case o := <-outcomes:
			if o != want {
				t.Fatalf("%s: %v, want %v", what, o, want)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("%s got no outcome", what)
		}
	}
	for range 2*outstanding - outstanding/8 {
		expect("a forward of the user beyond its share", edgev1.ForwardOutcome_FORWARD_OUTCOME_QUEUE_FULL)
	}
	a.Forward("edge-b", &edgev1.Forward{DeviceId: "d", UserId: "other", Event: []byte("y")}, func(o edgev1.ForwardOutcome) { outcomes <- o })
	expect("another user's forward", edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED)
}

// Users whose devices never acknowledge, together, hold at most half of
// a link's slots, and a quarter more drawn four at a time by users
// holding fewer: beyond, durable forwards are answered QUEUE_FULL at
// once, and the link is still read, so presence and ephemeral forwards
// keep flowing. (With every slot held the link's reader would wait for
// one, and nothing more from the peer would be read.) While only the
// half is held, a user with nothing outstanding still gets through.
func TestManyUsersCannotHoldALink(t *testing.T) {
	ca := newTestCA(t)
	const outstanding = 80 // a user's share 10, all users' 40, the reserve 20
	hogs := map[string]bool{}
	for i := range 9 {
		hogs[fmt.Sprint("hog", i)] = true
	}
	lb := &fakeLocal{outcome: edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED, hold: hogs}
	b := startMeshWith(t, ca, "edge-b", lb, func(c *Config) { c.MaxOutstanding = outstanding })
	la := &fakeLocal{devices: []*edgev1.DevicePresence{{DeviceId: "s", UserId: "u", SinceNs: 1}}}
	a := startMesh(t, ca, "edge-a", la)
	members := []Member{{ID: "edge-a", MeshAddr: a.Addr().String()}, {ID: "edge-b", MeshAddr: b.Addr().String()}}
	a.SetMembers(members)
	b.SetMembers(members)
	waitFor(t, "a's link to b up", func() bool { e, ok := b.Locate("s"); return ok && e == "edge-a" })
	outcomes := make(chan edgev1.ForwardOutcome, 2*outstanding)
	hog := func(i int) {
		for range outstanding / 8 {
			a.Forward("edge-b", &edgev1.Forward{DeviceId: "h", UserId: fmt.Sprint("hog", i), Event: []byte("x")}, func(o edgev1.ForwardOutcome) { outcomes <- o })
		}
	}
	refused := func(n int, what string) {
		t.Helper()
		for range n {
			if o := nextOutcome(t, outcomes); o != edgev1.ForwardOutcome_FORWARD_OUTCOME_QUEUE_FULL {
				t.Fatalf("%s: %v, want QUEUE_FULL", what, o)
			}
		}
	}
	other := func(name string, want edgev1.ForwardOutcome) {
		t.Helper()
		a.Forward("edge-b", &edgev1.Forward{DeviceId: "d", UserId: name, Event: []byte("y")}, func(o edgev1.ForwardOutcome) { outcomes <- o })
		if o := nextOutcome(t, outcomes); o != want {
			t.Fatalf("%s's forward: %v, want %v", name, o, want)
		}
	}
	// Four users' devices take 10 forwards each and never acknowledge:
	// they fill the half. A user with nothing outstanding still gets
	// through.
	for i := range 4 {
		hog(i)
	}
	other("other", edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED)
	// Five more such users draw four each from the reserve and are
	// refused the rest; then the reserve is held too, and another user's
	// durable forward is refused; its ephemeral forward and a presence
	// change still go through.
	for i := 4; i < 9; i++ {
		hog(i)
	}
	refused(5*(outstanding/8-reserveFloor), "a forward beyond the half and the reserve's four")
	other("another", edgev1.ForwardOutcome_FORWARD_OUTCOME_QUEUE_FULL)
	before := lb.forwards()
	a.Forward("edge-b", &edgev1.Forward{DeviceId: "d", UserId: "other", Event: []byte("ephemeral")}, nil)
	waitFor(t, "the ephemeral forward delivered", func() bool { return lb.forwards() > before })
	la.mu.Lock()
	la.devices = append(la.devices, &edgev1.DevicePresence{DeviceId: "s2", UserId: "u", SinceNs: 2})
	la.mu.Unlock()
	a.Announce(&edgev1.DevicePresence{DeviceId: "s2", UserId: "u", SinceNs: 2}, true)
	waitFor(t, "a presence change heard", func() bool { e, ok := b.Locate("s2"); return ok && e == "edge-a" })
}

// warnings is a slog handler that keeps the messages of warn records.
type warnings struct {
	mu   sync.Mutex
	msgs []string
}

func (w *warnings) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }
func (w *warnings) Handle(_ context.Context, r slog.Record) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.msgs = append(w.msgs, r.Message)
	return nil
}
func (w *warnings) WithAttrs([]slog.Attr) slog.Handler { return w }
func (w *warnings) WithGroup(string) slog.Handler      { return w }

func (w *warnings) has(msg string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Contains(w.msgs, msg)
}

// A link that was up and goes down is logged at warn level (the
// operator's first clue when an edge lacks mesh links); the retries
// after it are not, until they slow to their cap.
func TestALostLinkIsAWarning(t *testing.T) {
	ca := newTestCA(t)
	w := &warnings{}
	a := startMeshWith(t, ca, "edge-a", &fakeLocal{devices: []*edgev1.DevicePresence{{DeviceId: "s", UserId: "u", SinceNs: 1}}},
		func(c *Config) { c.Logger = slog.New(w) })
	b := startMesh(t, ca, "edge-b", &fakeLocal{})
	members := []Member{{ID: "edge-a", MeshAddr: a.Addr().String()}, {ID: "edge-b", MeshAddr: b.Addr().String()}}
	a.SetMembers(members)
	b.SetMembers(members)
	waitFor(t, "a's link to b up", func() bool { e, ok := b.Locate("s"); return ok && e == "edge-a" })
	if w.has("mesh link down; reconnecting") {
		t.Fatal("a link that is up was logged as down")
	}
	_ = b.Close()
	waitFor(t, "the lost link logged at warn level", func() bool { return w.has("mesh link down; reconnecting") })
}

// nextOutcome waits for the next forward outcome on ch, at most 30 s (a
// link that stopped being read fails the test rather than hanging it).
func nextOutcome(t *testing.T, ch <-chan edgev1.ForwardOutcome) edgev1.ForwardOutcome {
	t.Helper()
	select {
	case o := <-ch:
		return o
	case <-time.After(30 * time.Second):
		t.Fatal("no forward outcome within 30 s")
		return 0
	}
}

// presenceOf is one session per device, of user u, since 1.
func presenceOf(devices ...string) []*edgev1.DevicePresence {
	out := make([]*edgev1.DevicePresence, len(devices))
	for i, d := range devices {
		out[i] = &edgev1.DevicePresence{DeviceId: d, UserId: "u", SinceNs: 1}
	}
	return out
}

// A full set replaces what its peer announced before, but the users'
// devices here hear only what changed: a device it names again never
// goes offline, not even for a moment, and one it leaves out goes only
// once the set's last frame is in. Before, a link that came back made
// every device of its peer flap off and on for every device of their
// users here.
func TestAFullSetTellsOnlyWhatChanged(t *testing.T) {
	local := &fakeLocal{}
	m := startMesh(t, newTestCA(t), "edge-a", local)
	wholeSet := setPart{inSet: true, first: true, last: true}

	m.presenceFromPeer("edge-b", nil, wholeSet, presenceOf("d1", "d2", "d3"), nil)
	if got := local.takePresence(); len(got) != 3 {
		t.Fatalf("the first set told %v, want three devices online", got)
	}
	m.presenceFromPeer("edge-b", nil, wholeSet, presenceOf("d1", "d3", "d4"), nil)
	if got := local.takePresence(); !slices.Equal(got, []string{"+d4", "-d2"}) {
		t.Fatalf("a set naming d1 and d3 again, d4 new and d2 gone told %v, want [+d4 -d2]", got)
	}

	// A set in three frames: what the first frames do not name stays
	// where it is until the last is in.
	m.presenceFromPeer("edge-b", nil, setPart{inSet: true, first: true}, presenceOf("d1"), nil)
	m.presenceFromPeer("edge-b", nil, setPart{inSet: true}, presenceOf("d5"), nil)
	if got := local.takePresence(); !slices.Equal(got, []string{"+d5"}) {
		t.Fatalf("mid-set, told %v, want only [+d5]", got)
	}
	for _, d := range []string{"d3", "d4"} {
		if at, ok := m.Locate(d); !ok || at != "edge-b" {
			t.Fatalf("mid-set, %s is at %q %v; want still at edge-b", d, at, ok)
		}
	}
	if st := m.Stats(); st.Settling != 1 {
		t.Fatalf("mid-set stats %+v, want one peer settling", st)
	}
	// A delta of the peer's own mid-set counts too (a session that ended
	// there meanwhile on a link that had not yet brought its set).
	m.presenceFromPeer("edge-b", nil, deltaFrame, nil, presenceOf("d4"))
	if got := local.takePresence(); !slices.Equal(got, []string{"-d4"}) {
		t.Fatalf("an offline mid-set told %v, want [-d4]", got)
	}
	m.presenceFromPeer("edge-b", nil, setPart{inSet: true, last: true}, presenceOf("d6"), nil)
	got := local.takePresence()
	slices.Sort(got)
	if !slices.Equal(got, []string{"+d6", "-d3"}) {
		t.Fatalf("the set's last frame told %v, want [+d6 -d3]", got)
	}
	if on := m.Online("u"); !slices.Equal(on, []string{"d1", "d5", "d6"}) {
		t.Fatalf("u's devices on peers: %v, want [d1 d5 d6]", on)
	}

	// A set is what the peer holds now: an entry it names with an older
	// session than the one recorded (whose offline the link lost) is
	// taken, not kept as a late announcement.
	m.presenceFromPeer("edge-b", nil, deltaFrame, []*edgev1.DevicePresence{{DeviceId: "d1", UserId: "u", SinceNs: 9}}, nil)
	m.presenceFromPeer("edge-b", nil, wholeSet, presenceOf("d1"), nil)
	m.presenceFromPeer("edge-b", nil, deltaFrame, nil, presenceOf("d1"))
	if at, ok := m.Locate("d1"); ok {
		t.Fatalf("d1 is still at %q after the session the set named went offline", at)
	}
	m.presenceFromPeer("edge-b", nil, wholeSet, nil, nil)
	if st := m.Stats(); st.RemoteDevices != 0 || st.RemoteUsers != 0 || st.PeerSets != 0 || st.Settling != 0 {
		t.Fatalf("after an empty set, tables %+v", st)
	}
}

// Through real links: a peer whose link is replaced (it reconnected)
// sends its whole set again, in chunks when it is large, and the users'
// devices here hear nothing, since nothing changed.
func TestAReplacedLinkFlapsNoPresence(t *testing.T) {
	local := &fakeLocal{}
	a, idn, ctx := meshAndRawPeer(t, local)
	const n = 12000
	devs := make([]*edgev1.DevicePresence, n)
	for i := range devs {
		devs[i] = &edgev1.DevicePresence{DeviceId: fmt.Sprintf("device-%08d", i), UserId: fmt.Sprintf("user-%08d", i/3),
			SinceNs: int64(i + 1), Instance: strings.Repeat("i", 16)}
	}
	frames := presenceFrames(devs)
	if len(frames) < 2 || frames[0].GetPresenceSet().GetContinuedIn() != uint32(len(frames)-1) {
		t.Fatalf("the set goes in %d frames, the first saying %d more follow; want several, counted", len(frames), frames[0].GetPresenceSet().GetContinuedIn())
	}
	link := func(frames []*edgev1.MeshFrame) *quic.Conn {
		return sendOnLink(ctx, t, a.Addr().String(), idn.clientTLS("edge-a", nil), append([]*edgev1.MeshFrame{helloFrom()}, frames...)...)
	}
	first := link(frames)
	// Local hears of a frame's changes once a has taken them in (after
	// presMu): wait for what it was told.
	told := func() int {
		local.mu.Lock()
		defer local.mu.Unlock()
		return len(local.presence)
	}
	waitFor(t, "a tells of x's devices", func() bool { return told() >= n })
	if st := a.Stats(); st.RemoteDevices != n || st.Settling != 0 {
		t.Fatalf("after x's set, a's tables %+v, want %d devices and none settling", st, n)
	}
	if got := local.takePresence(); len(got) != n {
		t.Fatalf("the first set told %d changes, want %d", len(got), n)
	}
	// The set again on a new link, with one device gone and one new: a
	// marker delta after it shows when a has read it all.
	again := presenceFrames(append(slices.Clone(devs[1:]), presenceOf("new")...))
	marker := &edgev1.MeshFrame{Kind: &edgev1.MeshFrame_PresenceDelta{PresenceDelta: &edgev1.PresenceDelta{Online: presenceOf("marker")}}}
	link(append(again, marker))
	waitFor(t, "the first link replaced", func() bool { return first.Context().Err() != nil })
	waitFor(t, "a tells of the marker", func() bool {
		local.mu.Lock()
		defer local.mu.Unlock()
		return slices.Contains(local.presence, "+marker")
	})
	got := local.takePresence()
	slices.Sort(got)
	if want := []string{"+marker", "+new", "-" + devs[0].GetDeviceId()}; !slices.Equal(got, want) {
		if len(got) > 6 {
			got = append(got[:6:6], fmt.Sprintf("... %d in all", len(got)))
		}
		t.Fatalf("the replacing link's set told %v, want %v", got, want)
	}
}

// Frames still arriving on a link that the peer's newer link replaced
// are dropped: counted into the newer link's set, a leftover last chunk
// would end that set early (its devices not yet named would flap) and
// a leftover entry would undo what the set says.
func TestAReplacedLinksLeftoversAreDropped(t *testing.T) {
	local := &fakeLocal{}
	m := startMesh(t, newTestCA(t), "edge-a", local)
	old, cur := &inbound{}, &inbound{}
	old.member.Store(true)
	cur.member.Store(true)
	use := func(in *inbound) {
		m.mu.Lock()
		m.inbound["edge-b"] = in
		m.mu.Unlock()
	}
	t.Cleanup(func() {
		m.mu.Lock()
		delete(m.inbound, "edge-b")
		m.mu.Unlock()
	})
	use(old)
	m.presenceFromPeer("edge-b", old, setPart{inSet: true, first: true, last: true}, presenceOf("d1", "d2"), nil)
	local.takePresence()

	use(cur)
	m.presenceFromPeer("edge-b", cur, setPart{inSet: true, first: true}, presenceOf("d1"), nil)
	// The old link's leftovers: the last chunk of a set of its own, and
	// an offline for d1.
	m.presenceFromPeer("edge-b", old, setPart{inSet: true, last: true}, []*edgev1.DevicePresence{{DeviceId: "d1", UserId: "u", SinceNs: 0}}, nil)
	m.presenceFromPeer("edge-b", old, deltaFrame, nil, presenceOf("d1"))
	if st := m.Stats(); st.Settling != 1 || st.RemoteDevices != 2 {
		t.Fatalf("after the old link's leftovers, tables %+v; want the new set still arriving, both devices there", st)
	}
	m.presenceFromPeer("edge-b", cur, setPart{inSet: true, last: true}, presenceOf("d2"), nil)
	if got := local.takePresence(); len(got) != 0 {
		t.Fatalf("the new link's set, naming what the old one did, told %v", got)
	}
	// A peer's first set, in chunks, is settling too.
	m.presenceFromPeer("edge-c", nil, setPart{inSet: true, first: true}, presenceOf("d9"), nil)
	if st := m.Stats(); st.Settling != 1 {
		t.Fatalf("a first set in chunks: tables %+v, want one peer settling", st)
	}
}

// A peer cannot hold a full set open for ever, with the since checks of
// its entries off: a set that claims more frames than any edge's could
// fill cuts its link.
func TestASetClaimingTooManyFramesCutsTheLink(t *testing.T) {
	a, idn, ctx := meshAndRawPeer(t, &fakeLocal{})
	conn := sendOnLink(ctx, t, a.Addr().String(), idn.clientTLS("edge-a", nil), helloFrom(),
		&edgev1.MeshFrame{Kind: &edgev1.MeshFrame_PresenceSet{PresenceSet: &edgev1.PresenceSet{Devices: presenceOf("d1"), ContinuedIn: maxSetFrames + 1}}})
	waitFor(t, "the link cut", func() bool { return conn.Context().Err() != nil })
	if st := a.Stats(); st.RemoteDevices != 0 || st.Settling != 0 {
		t.Fatalf("after the cut, tables %+v", st)
	}
}

// counterValue reads a counter of the mesh's metrics.
func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		panic(err)
	}
	return m.GetCounter().GetValue()
}

// A forward whose frame would be over maxFrame is not sent: the peer
// would refuse the frame and close the link, for every device behind
// it, each time its sender tried again (relayd keeps events far smaller,
// but Mesh does not rely on its caller for that). It is answered
// NOT_DELIVERED at once (its edge then tries the mailbox, which refuses
// what it cannot hold) and counted too_large; a frame of exactly
// maxFrame with the largest id still goes, and the link carries on.
func TestAForwardTooLargeForAFrameIsNotSent(t *testing.T) {
	ca := newTestCA(t)
	la := &fakeLocal{devices: []*edgev1.DevicePresence{{DeviceId: "d1", UserId: "u", SinceNs: 10}}, outcome: edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED}
	a, b := startMesh(t, ca, "edge-a", la), startMesh(t, ca, "edge-b", &fakeLocal{})
	members := []Member{{ID: "edge-a", MeshAddr: a.Addr().String()}, {ID: "edge-b", MeshAddr: b.Addr().String()}}
	a.SetMembers(members)
	b.SetMembers(members)
	waitFor(t, "b learns d1 is on a", func() bool { e, ok := b.Locate("d1"); return ok && e == "edge-a" })
	waitFor(t, "b's link to a up", func() bool { return b.Stats().LinksUp == 1 })

	fw := func(size int) *edgev1.Forward {
		return &edgev1.Forward{DeviceId: "d1", UserId: "u", EventId: "e", SenderDeviceId: "s", Event: make([]byte, size)}
	}
	// The largest event whose frame is at most maxFrame with any id.
	largest := maxFrame
	for {
		f := fw(largest)
		f.Id = math.MaxUint64
		if proto.Size(&edgev1.MeshFrame{Kind: &edgev1.MeshFrame_Forward{Forward: f}}) <= maxFrame {
			break
		}
		largest--
	}
	outcomes := make(chan edgev1.ForwardOutcome, 10)
	report := func(o edgev1.ForwardOutcome) { outcomes <- o }
	b.Forward("edge-a", fw(largest+1), report)
	if o := nextOutcome(t, outcomes); o != edgev1.ForwardOutcome_FORWARD_OUTCOME_NOT_DELIVERED {
		t.Fatalf("a forward over a frame: outcome %v", o)
	}
	b.Forward("edge-a", fw(4<<20), nil) // ephemeral
	if got := counterValue(b.metrics.forwards.WithLabelValues("too_large")); got != 2 {
		t.Fatalf("forwards{outcome=too_large} = %v, want 2", got)
	}
	for _, size := range []int{largest, 1} {
		b.Forward("edge-a", fw(size), report)
		if o := nextOutcome(t, outcomes); o != edgev1.ForwardOutcome_FORWARD_OUTCOME_DELIVERED {
			t.Fatalf("a forward of %d bytes after one too large: outcome %v", size, o)
		}
	}
	if la.forwards() != 2 || b.Stats().Dials != 1 {
		t.Fatalf("a got %d forwards (want 2), b dialed %d times (want 1: the link never broke)", la.forwards(), b.Stats().Dials)
	}
}

// boundedPeer is edge-a's mesh, where a peer may hold 3 devices, with
// its warnings; and edge-x, a member a test drives by hand, with a
// context for a minute of that.
func boundedPeer(t *testing.T) (*Mesh, *warnings, *Identity, context.Context) {
	t.Helper()
	ca := newTestCA(t)
	w := &warnings{}
	a := startMeshWith(t, ca, "edge-a", &fakeLocal{}, func(c *Config) { c.MaxPeerDevices, c.Logger = 3, slog.New(w) })
	a.SetMembers([]Member{{ID: "edge-x", MeshAddr: "127.0.0.1:9"}})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return a, w, testIdentity(t, ca, "edge-x"), ctx
}

// A peer holds at most MaxPeerDevices (3 here) devices in this edge's
// tables: devices it announces beyond are ignored, and logged, until it
// announces some offline. A full set that replaces the peer's devices
// (a reconnect) is not refused for the devices it replaces, which stay
// until its end and then go.
func TestAPeerHoldsAtMostItsBoundOfDevices(t *testing.T) {
	a, w, x, ctx := boundedPeer(t)
	set := &edgev1.MeshFrame{Kind: &edgev1.MeshFrame_PresenceSet{PresenceSet: &edgev1.PresenceSet{Devices: presenceOf("d1", "d2", "d3", "d4", "d5")}}}
	sendOnLink(ctx, t, a.Addr().String(), x.clientTLS("edge-a", nil), helloFrom(), set)
	waitFor(t, "the peer's first three devices located", func() bool {
		for _, d := range []string{"d1", "d2", "d3"} {
			if _, ok := a.Locate(d); !ok {
				return false
			}
		}
		return true
	})
	// One frame: its devices are all taken or ignored once one is located.
	for _, d := range []string{"d4", "d5"} {
		if _, ok := a.Locate(d); ok {
			t.Fatalf("%s, beyond the peer's bound, was located", d)
		}
	}
	if !w.has("mesh peer announced more devices than a peer may hold: those beyond are ignored, and their events go to their mailboxes") {
		t.Fatal("the devices ignored were not logged")
	}
	// An offline makes room (offlines come first in a frame).
	delta := &edgev1.MeshFrame{Kind: &edgev1.MeshFrame_PresenceDelta{PresenceDelta: &edgev1.PresenceDelta{
		Online: presenceOf("d6", "d7"), Offline: presenceOf("d1")}}}
	conn := sendOnLink(ctx, t, a.Addr().String(), x.clientTLS("edge-a", nil), helloFrom(), set, delta)
	waitFor(t, "d6 in d1's place", func() bool { _, on := a.Locate("d6"); _, off := a.Locate("d1"); return on && !off })
	if _, ok := a.Locate("d7"); ok {
		t.Fatal("d7, beyond the peer's bound, was located")
	}
	// A reconnect's full set names three other devices: the three it
	// replaces do not count against it.
	_ = conn.CloseWithError(0, "")
	sendOnLink(ctx, t, a.Addr().String(), x.clientTLS("edge-a", nil), helloFrom(),
		&edgev1.MeshFrame{Kind: &edgev1.MeshFrame_PresenceSet{PresenceSet: &edgev1.PresenceSet{Devices: presenceOf("d8", "d9", "d10")}}})
	waitFor(t, "the new set in place of the old", func() bool {
		for _, d := range []string{"d8", "d9", "d10"} {
			if _, ok := a.Locate(d); !ok {
				return false
			}
		}
		for _, d := range []string{"d2", "d3", "d6"} {
			if _, ok := a.Locate(d); ok {
				return false
			}
		}
		return true
	})
	if st := a.Stats(); st.RemoteDevices != 3 {
		t.Fatalf("the peer holds %d devices here, over its bound of 3", st.RemoteDevices)
	}
}

// A peer cannot get past its bound by beginning full sets it never
// finishes: a second set on one link closes the link, and across links
// (each a new set that marks the last one's devices unconfirmed) the
// peer holds at most twice its bound here. Before, each unfinished set
// took MaxPeerDevices more devices on top of the last one's.
func TestUnfinishedSetsDoNotGrowAPeerPastItsBound(t *testing.T) {
	a, w, x, ctx := boundedPeer(t)
	unfinished := func(devs ...string) *edgev1.MeshFrame {
		return &edgev1.MeshFrame{Kind: &edgev1.MeshFrame_PresenceSet{PresenceSet: &edgev1.PresenceSet{Devices: presenceOf(devs...), ContinuedIn: 1}}}
	}
	located := func(devs ...string) func() bool {
		return func() bool {
			for _, d := range devs {
				if _, ok := a.Locate(d); !ok {
					return false
				}
			}
			return true
		}
	}

	// Two sets on one link: the first counts, the second ends the link.
	conn := sendOnLink(ctx, t, a.Addr().String(), x.clientTLS("edge-a", nil), helloFrom(), unfinished("d1", "d2", "d3"), unfinished("e1", "e2", "e3"))
	waitFor(t, "the first set's devices located", located("d1", "d2", "d3"))
	select {
	case <-conn.Context().Done():
	case <-ctx.Done():
		t.Fatal("the link that sent a second set is still open")
	}
	if !w.has("mesh peer sent a second presence set on one link; its link is closed") {
		t.Fatal("the second set was not logged")
	}
	if _, ok := a.Locate("e1"); ok {
		t.Fatal("the second set's devices were taken")
	}

	// A new link, a new unfinished set: three more, beside the first
	// three it has not confirmed yet (a reconnect's set is not refused for
	// the devices it replaces).
	sendOnLink(ctx, t, a.Addr().String(), x.clientTLS("edge-a", nil), helloFrom(), unfinished("f1", "f2", "f3"))
	waitFor(t, "the second link's devices located", located("f1", "f2", "f3"))
	// A third: the peer holds twice its bound already.
	sendOnLink(ctx, t, a.Addr().String(), x.clientTLS("edge-a", nil), helloFrom(), unfinished("g1", "g2", "g3"))
	waitFor(t, "the third link's devices refused", func() bool {
		return w.has("mesh peer announced more devices than a peer may hold: those beyond are ignored, and their events go to their mailboxes")
	})
	if _, ok := a.Locate("g1"); ok {
		t.Fatal("a device past twice the bound was located")
	}
	if st := a.Stats(); st.RemoteDevices != 6 {
		t.Fatalf("the peer holds %d devices here, want twice its bound of 3", st.RemoteDevices)
	}
}

// A peer's link is its one stream: it can open no other of either kind,
// on which it could park data nobody reads (up to the connection's
// window each).
func TestAPeerOpensNoStreamBesideItsLink(t *testing.T) {
	a, x, ctx := meshAndRawPeer(t, &fakeLocal{})
	conn := sendOnLink(ctx, t, a.Addr().String(), x.clientTLS("edge-a", nil), helloFrom())
	var limit *quic.StreamLimitReachedError
	if _, err := conn.OpenStream(); !errors.As(err, &limit) {
		t.Fatalf("a second stream: %v, want the stream limit", err)
	}
	if _, err := conn.OpenUniStream(); !errors.As(err, &limit) {
		t.Fatalf("a unidirectional stream: %v, want the stream limit", err)
	}
}
