package session

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func key(id string, b byte, expiry time.Time) SessionKey {
	return SessionKey{ID: id, Secret: bytes.Repeat([]byte{b}, 32), Expiry: expiry}
}

func TestTickets(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	r := NewRing()
	if _, err := r.Seal(Ticket{}); !errors.Is(err, ErrNoSessionKey) {
		t.Fatal(err)
	}
	r.Set("k1", []SessionKey{key("k1", 1, time.Time{})})
	tk := Ticket{UserID: "u1", DeviceID: "d1", AuthAt: now, ExpiresAt: now.Add(time.Hour)}
	b, err := r.Seal(tk)
	if err != nil {
		t.Fatal(err)
	}
	// Another edge with the same ring opens it.
	other := NewRing()
	other.Set("k1", []SessionKey{key("k1", 1, time.Time{})})
	got, err := other.Open(b, now.Add(time.Minute))
	if err != nil || got.UserID != "u1" || got.DeviceID != "d1" || !got.ExpiresAt.Equal(tk.ExpiresAt) || !got.AuthAt.Equal(now) {
		t.Fatalf("open: %+v %v", got, err)
	}
	if _, err := other.Open(b, now.Add(2*time.Hour)); !errors.Is(err, ErrTicketExpired) {
		t.Fatalf("expired: %v", err)
	}
	// Rotation: the old key stays valid for its grace period, then not.
	other.Set("k2", []SessionKey{key("k1", 1, now.Add(10*time.Minute)), key("k2", 2, time.Time{})})
	if _, err := other.Open(b, now.Add(5*time.Minute)); err != nil {
		t.Fatalf("within grace: %v", err)
	}
	if _, err := other.Open(b, now.Add(11*time.Minute)); !errors.Is(err, ErrTicketUnknownKey) {
		t.Fatalf("after grace: %v", err)
	}
	other.Set("k2", []SessionKey{key("k2", 2, time.Time{})})
	if _, err := other.Open(b, now.Add(time.Minute)); !errors.Is(err, ErrTicketUnknownKey) {
		t.Fatalf("key left the ring: %v", err)
	}
	// Forged: any flipped byte in the sealed part, or a key with the right
	// id but other secret.
	for i := 2 + 2; i < len(b); i++ {
		f := bytes.Clone(b)
		f[i] ^= 1
		if _, err := r.Open(f, now); err == nil {
			t.Fatalf("flipped byte %d accepted", i)
		}
	}
	impostor := NewRing()
	impostor.Set("k1", []SessionKey{key("k1", 9, time.Time{})})
	if _, err := impostor.Open(b, now); !errors.Is(err, ErrTicketForged) {
		t.Fatalf("other secret: %v", err)
	}
	for _, bad := range [][]byte{nil, {1}, {2, 0}, {1, 200}, bytes.Repeat([]byte{1}, 600)} {
		if _, err := r.Open(bad, now); !errors.Is(err, ErrTicketMalformed) {
			t.Errorf("malformed %v: %v", bad, err)
		}
	}
}

func FuzzOpenTicket(f *testing.F) {
	now := time.Unix(1_800_000_000, 0)
	r := NewRing()
	r.Set("k1", []SessionKey{key("k1", 1, time.Time{})})
	good, _ := r.Seal(Ticket{UserID: "u", DeviceID: "d", AuthAt: now, ExpiresAt: now.Add(time.Hour)})
	f.Add(good)
	f.Add([]byte{1, 2, 'k', '1'})
	f.Fuzz(func(t *testing.T, b []byte) {
		tk, err := r.Open(b, now)
		if err == nil && (tk.UserID != "u" || tk.DeviceID != "d") {
			t.Fatalf("opened a ticket nobody sealed: %+v", tk)
		}
	})
}

// lockedBuffer is a bytes.Buffer for a logger that several goroutines use.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// A session's log lines carry its id, transport and peer, and once the
// handshake named them its user and device; with the level off nothing
// is logged.
func TestSessionLogLinesCarryTheSession(t *testing.T) {
	var logs lockedBuffer
	e := newEnv(t, func(c *Config) {
		c.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug, AddSource: true}))
	})
	e.devices("u1", "d1")
	d := e.online("d1")
	id := d.welcome.GetSessionId()
	d.send(&relayv1.Frame{Kind: &relayv1.Frame_Close{Close: &relayv1.Close{}}})
	waitFor(t, "the session closed line", func() bool { return strings.Contains(logs.String(), "session closed") })
	sources := map[string]bool{}
	for _, msg := range []string{"session open", "session closed"} {
		var line string
		for l := range strings.Lines(logs.String()) {
			if strings.Contains(l, "msg=\""+msg+"\"") {
				line = l
			}
		}
		for _, want := range []string{"session=" + id, "transport=pipe", "user=u1", "device=d1"} {
			if !strings.Contains(line, want) {
				t.Errorf("%q line %q lacks %s", msg, line, want)
			}
		}
		// The source is where the line was logged, not the helper.
		_, src, ok := strings.Cut(line, "source=")
		if !ok {
			t.Fatalf("%q line %q has no source", msg, line)
		}
		src, _, _ = strings.Cut(src, " ")
		sources[src] = true
	}
	if len(sources) != 2 {
		t.Errorf("both lines name one source: %v", sources)
	}

	var quiet lockedBuffer
	e2 := newEnv(t, func(c *Config) {
		c.Logger = slog.New(slog.NewTextHandler(&quiet, &slog.HandlerOptions{Level: slog.LevelInfo}))
	})
	e2.devices("u1", "d1")
	e2.online("d1")
	if quiet.String() != "" {
		t.Fatalf("debug lines logged at level info: %s", quiet.String())
	}
}

// A session whose reader is stopped with no close reason recorded (the
// handshake's stop hook firing just after the handshake, as the edge
// shuts down) still ends cleanly: with a reason, its close counted, the
// device told. It used to close with a nil reason, which the writer, the
// abort timer and the metrics dereferenced: a panic that took the edge
// down during its shutdown.
func TestAReaderStoppedWithoutAReasonEndsTheSession(t *testing.T) {
	e := newEnv(t, nil)
	e.device("u", "a")
	d := e.online("a")
	sessions := e.hub.sessionsOf("u", "a")
	if len(sessions) != 1 {
		t.Fatalf("%d sessions of the device, want 1", len(sessions))
	}
	sessions[0].reader.Stop()
	if c := d.nextClose(); c.GetCode() != relayv1.ErrorCode_ERROR_CODE_GOING_AWAY {
		t.Fatalf("close %v, want GOING_AWAY", c)
	}
	_ = d.served()
	if got := e.metric("relay_edge_session_closes_total", "code", "going_away"); got != 1 {
		t.Errorf("closes counted going_away: %v, want 1", got)
	}
}

// A session keeps of its Hello only what it reads later: the resume
// fields and unknown fields a device sent, sized as it likes, are gone
// once the handshake is done, so that a device cannot make each of its
// idle sessions hold tens of KiB of its own choosing.
func TestASessionKeepsOnlyTheHelloFieldsItUses(t *testing.T) {
	e := newEnv(t, nil)
	e.device("u", "a")
	d := e.connect("a")
	d.handshakeWith(func(h *relayv1.Hello) {
		h.ResumeNonce = bytes.Repeat([]byte{1}, 24<<10)
		h.ResumeProof = bytes.Repeat([]byte{2}, 16<<10)
		h.Instance = "i1"
		h.ProtoReflect().SetUnknown(protowire.AppendBytes(protowire.AppendTag(nil, 1000, protowire.BytesType), make([]byte, 16<<10)))
	})
	sessions := e.hub.sessionsOf("u", "a")
	if len(sessions) != 1 {
		t.Fatalf("%d sessions of the device, want 1", len(sessions))
	}
	kept := sessions[0].hs.hello
	if n := proto.Size(kept); n > 256 {
		t.Errorf("the session keeps %d bytes of its Hello, want its ids and flags only", n)
	}
	if kept.GetUserId() != "u" || kept.GetDeviceId() != "a" || kept.GetInstance() != "i1" || kept.GetProtocolVersion() != d.lastHello.GetProtocolVersion() {
		t.Errorf("kept %v, want the ids, the instance and the version", kept)
	}
}
