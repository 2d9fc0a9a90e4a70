package session

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"testing"
	"time"

	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// A device that connects right after its registration names the
// registration's revision in its Hello: the Challenge comes at once, and
// the edge waits for its directory to reach the revision before it
// checks the signature against the device's key, and the device signs
// in, where without the wait it would have been refused as unknown.
func TestHelloWaitsForItsRevision(t *testing.T) {
	e := newEnv(t, nil)
	e.dir.setFeed(10) // the registration, revision 11, is on its way
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	e.keys["fresh"], e.users["fresh"] = priv, "u"
	d := e.connect("fresh")
	h, ch := d.challenged(func(h *relayv1.Hello) { h.MinRevision = 11 })
	d.answer(h, ch)
	waitFor(t, "the handshake to wait for revision 11", func() bool { return e.dir.revisionWaits.Load() == 1 })
	e.dir.set(DeviceInfo{ID: "fresh", UserID: "u", PublicKey: pub, State: DeviceActive})
	e.dir.setFeed(11)
	if f := d.readDirect(); f.GetWelcome() == nil {
		t.Fatalf("the fresh device was not welcomed: %v", f)
	}
	if n := e.dir.revisionWaits.Load(); n != 1 {
		t.Fatalf("%d waits for one handshake", n)
	}
}

// A resume waits before the ticket is checked (the resume looks the
// device up at once); a revision already reached costs no wait.
func TestResumeWaitsForItsRevision(t *testing.T) {
	e := newEnv(t, nil)
	e.device("u", "back")
	d := e.online("back")
	ticket := d.welcome.GetResumeTicket()
	e.dir.setFeed(10)
	r := e.connect("back")
	hello := r.helloUnproven(ticket)
	hello.GetHello().MinRevision = 11
	proveResume(hello.GetHello(), e.keys["back"])
	r.send(hello)
	waitFor(t, "the resume to wait for revision 11", func() bool { return e.dir.revisionWaits.Load() == 1 })
	e.dir.setFeed(11)
	if w := r.readDirect().GetWelcome(); w == nil || !w.GetResumed() {
		t.Fatalf("the resume after the wait: %v", w)
	}
	e.connect("back").handshakeWith(func(h *relayv1.Hello) { h.MinRevision = 11 })
	if n := e.dir.revisionWaits.Load(); n != 1 {
		t.Fatalf("%d waits, want 1: revision 11 was reached", n)
	}
}

// A draining edge ends the handshakes that wait for a revision at once,
// with GOING_AWAY.
func TestDrainEndsRevisionWaits(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.HandshakeTimeout, c.RevisionWait = time.Minute, time.Minute })
	e.dir.setFeed(10)
	e.device("u", "d")
	d := e.connect("d")
	h, ch := d.challenged(func(h *relayv1.Hello) { h.MinRevision = 1 << 40 })
	d.answer(h, ch)
	waitFor(t, "the handshake to wait", func() bool { return e.dir.revisionWaits.Load() == 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	drained := make(chan error, 1)
	go func() { drained <- e.hub.Drain(ctx, 0) }()
	if c := d.readDirect().GetClose(); c.GetCode() != relayv1.ErrorCode_ERROR_CODE_GOING_AWAY {
		t.Fatalf("a waiting handshake at drain: %v", c)
	}
	if err := <-drained; err != nil {
		t.Fatal(err)
	}
}

// MaxRevisionWaits bounds the handshakes that wait: one more goes on at
// once; a negative RevisionWait never waits.
func TestRevisionWaitsAreBounded(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.HandshakeTimeout, c.RevisionWait, c.MaxRevisionWaits = time.Minute, time.Minute, 1 })
	e.dir.setFeed(10)
	e.devices("u", "a", "b")
	a := e.connect("a")
	h, ch := a.challenged(func(h *relayv1.Hello) { h.MinRevision = 1 << 40 })
	a.answer(h, ch)
	waitFor(t, "a to wait", func() bool { return e.dir.revisionWaits.Load() == 1 })
	e.connect("b").handshakeWith(func(h *relayv1.Hello) { h.MinRevision = 1 << 40 })
	if n := e.dir.revisionWaits.Load(); n != 1 {
		t.Fatalf("%d waits with MaxRevisionWaits 1", n)
	}
	e.dir.setFeed(1 << 40)
	if a.readDirect().GetWelcome() == nil {
		t.Fatal("a was not welcomed once the revision came")
	}

	never := newEnv(t, func(c *Config) { c.RevisionWait = -1 })
	never.dir.setFeed(10)
	never.device("u", "c")
	never.connect("c").handshakeWith(func(h *relayv1.Hello) { h.MinRevision = 11 })
	if n := never.dir.revisionWaits.Load(); n != 0 {
		t.Fatalf("%d waits with RevisionWait < 0", n)
	}
}

// A revision the directory does not reach within RevisionWait holds the
// handshake no longer: it goes on with what the directory knows, a
// device it knows signs in and one it does not is refused as any
// unknown device is. A Hello without a revision never waits.
func TestHelloRevisionNotReached(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.RevisionWait = 50 * time.Millisecond })
	e.dir.setFeed(10)
	e.device("u", "known")
	e.connect("known").handshakeWith(func(h *relayv1.Hello) { h.MinRevision = 1 << 40 })
	if n := e.dir.revisionWaits.Load(); n != 1 {
		t.Fatalf("%d waits for a revision, want 1", n)
	}

	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	e.keys["ghost"], e.users["ghost"] = priv, "u"
	g := e.connect("ghost")
	h, ch := g.challenged(func(h *relayv1.Hello) { h.MinRevision = 1 << 40 })
	g.answer(h, ch)
	if c := g.readDirect().GetClose(); c.GetCode() != relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED {
		t.Fatalf("an unknown device after the wait: %v, want AUTH_FAILED", c)
	}

	e.device("u", "plain")
	e.connect("plain").handshake()
	if n := e.dir.revisionWaits.Load(); n != 2 {
		t.Fatalf("%d waits for a revision after a Hello without one, want 2", n)
	}
}

// RevisionWait defaults to 5 s and never takes more than half of the
// handshake's time, so a client that waited still has time to sign.
func TestRevisionWaitBound(t *testing.T) {
	for _, c := range []struct {
		cfg  Config
		want time.Duration
	}{
		{Config{}, 5 * time.Second},
		{Config{RevisionWait: time.Minute}, 5 * time.Second},
		{Config{HandshakeTimeout: 4 * time.Second}, 2 * time.Second},
		{Config{RevisionWait: time.Second}, time.Second},
		{Config{RevisionWait: -1}, -1},
	} {
		c.cfg.EdgeID, c.cfg.Directory, c.cfg.Ring = "e", newMemDir(), NewRing()
		if err := c.cfg.setDefaults(); err != nil {
			t.Fatal(err)
		}
		if c.cfg.RevisionWait != c.want {
			t.Errorf("RevisionWait %v with handshake timeout %v, want %v", c.cfg.RevisionWait, c.cfg.HandshakeTimeout, c.want)
		}
	}
}
