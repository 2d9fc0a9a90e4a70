package session

import (
	"crypto/ed25519"
	"crypto/rand"
	"testing"
	"time"

	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// A device that connects right after its registration names the
// registration's revision in its Hello: the edge waits for its directory
// to reach it before it looks the device up, and the device signs in,
// where without the wait it would have been refused as unknown.
func TestHelloWaitsForItsRevision(t *testing.T) {
	e := newEnv(t, nil)
	e.dir.setFeed(10) // the registration, revision 11, is on its way
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	e.keys["fresh"], e.users["fresh"] = priv, "u"
	d := e.connect("fresh")
	hello := d.hello(nil)
	hello.GetHello().MinRevision = 11
	d.send(hello)
	waitFor(t, "the handshake to wait for revision 11", func() bool { return e.dir.revisionWaits.Load() == 1 })
	if n := e.dir.looked.Load(); n != 0 {
		t.Fatalf("the device was looked up %d times before its revision was reached", n)
	}
	e.dir.set(DeviceInfo{ID: "fresh", UserID: "u", PublicKey: pub, State: DeviceActive})
	e.dir.setFeed(11)
	ch := d.readDirect().GetChallenge()
	if ch == nil {
		t.Fatal("no challenge once the revision was reached")
	}
	d.answer(hello.GetHello(), ch)
	if f := d.readDirect(); f.GetWelcome() == nil {
		t.Fatalf("the fresh device was not welcomed: %v", f)
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
