package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/edge/client"
	edgesession "github.com/edge-relay/relay/edge/session"
	"github.com/edge-relay/relay/internal/relaytest"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// relayFixture is a running relay (control plane and one edge) with a
// user and two of its devices whose keys are in files, for `relayctl
// relay` to act as them.
type relayFixture struct {
	r      *relaytest.Relay
	user   string
	a, b   relaytest.Device
	keys   map[string]string // device id: key file
	dir    string
	conArg []string // --edge and --cert-hash
}

func startRelay(t *testing.T) *relayFixture {
	t.Helper()
	f := &relayFixture{r: relaytest.Start(t, relaytest.Options{}), keys: map[string]string{}, dir: t.TempDir()}
	f.user = f.r.User("rita")
	f.a, f.b = f.r.Device(f.user, "a"), f.r.Device(f.user, "b")
	for _, d := range []relaytest.Device{f.a, f.b} {
		f.keys[d.ID] = f.keyFile(t, d.ID, d.Key)
	}
	e := f.r.Edges[0]
	f.conArg = []string{"--edge", e.Addr()}
	for _, h := range e.CertHashes() {
		f.conArg = append(f.conArg, "--cert-hash", base64.StdEncoding.EncodeToString(h.SHA256[:]))
	}
	return f
}

// keyFile writes a device key as device register --generate-key does.
func (f *relayFixture) keyFile(t *testing.T, name string, key ed25519.PrivateKey) string {
	t.Helper()
	path := filepath.Join(f.dir, name+".key")
	if err := os.WriteFile(path, []byte(base64.StdEncoding.EncodeToString(key.Seed())+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// as is the flags that make relayctl relay act as device d with key file.
func (f *relayFixture) as(d relaytest.Device, keyFile string) []string {
	return append([]string{"--user", d.UserID, "--device", d.ID, "--key", keyFile}, f.conArg...)
}

// runRelay runs relayctl relay with no control plane to reach (the relay
// commands need none).
func runRelay(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	return runEnv(t, map[string]string{"RELAYCTL_CONFIG_DIR": t.TempDir()}, append([]string{"relay"}, args...)...)
}

// A --ttl the protocol cannot carry (not positive, or under its
// millisecond) is refused by relayctl, naming the flag, before it
// connects; one of a millisecond is sent and acknowledged.
func TestRelaySendRefusesTTLUnderAMillisecond(t *testing.T) {
	f := startRelay(t)
	send := func(ttl string) error {
		_, _, err := runRelay(t, append(append([]string{"send"}, f.as(f.a, f.keys[f.a.ID])...), "--to", f.b.ID, "--ttl", ttl, "hello")...)
		return err
	}
	for _, ttl := range []string{"-5s", "0", "0s", "500us", "999us"} {
		if err := send(ttl); err == nil || !strings.Contains(err.Error(), "--ttl must be at least 1ms") {
			t.Errorf("relay send --ttl %s: %v; want it refused as under 1ms", ttl, err)
		}
	}
	if err := send("1ms"); err != nil {
		t.Errorf("relay send --ttl 1ms: %v", err)
	}
	out, _, err := runRelay(t, "send", "--help")
	if err != nil || !strings.Contains(out, "clock-skew tolerance (the edge's --skew-tolerance, 5m by default)") {
		t.Errorf("relay send --help does not say the event outlives its TTL by the skew tolerance: %v\n%s", err, out)
	}
}

// A device the edge refuses (AUTH_FAILED: a key that is not the
// device's) gets a hint naming what to check, with --min-revision when
// it was not given.
func TestRelayAuthFailedSaysWhatToCheck(t *testing.T) {
	f := startRelay(t)
	_, other, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	wrong := f.keyFile(t, "wrong", other)
	for _, cmd := range [][]string{{"send", "hello"}, {"listen", "--for", "1s"}} {
		args := append([]string{cmd[0]}, append(f.as(f.a, wrong), cmd[1:]...)...)
		_, _, err := runRelay(t, args...)
		msg := oneLine(err)
		if !errors.Is(err, &client.Error{Code: relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED}) ||
			!strings.Contains(msg, "relayctl device list --user "+f.user) || !strings.Contains(msg, "--key "+wrong) ||
			!strings.Contains(msg, "--device "+f.a.ID) || !strings.Contains(msg, "--min-revision") {
			t.Errorf("relay %s with a wrong key: %s; want the checks to make", cmd[0], msg)
		}
	}
	// With --min-revision given, the hint does not suggest it.
	_, _, err = runRelay(t, append(append([]string{"send"}, f.as(f.a, wrong)...), "--min-revision", fmt.Sprint(f.a.Revision), "hello")...)
	if msg := oneLine(err); !strings.Contains(msg, "relayctl device list") || strings.Contains(msg, "--min-revision") {
		t.Errorf("relay send with a wrong key and --min-revision: %s", msg)
	}
	// The right key connects.
	if _, _, err := runRelay(t, append(append([]string{"send"}, f.as(f.a, f.keys[f.a.ID])...), "--to", f.b.ID, "hello")...); err != nil {
		t.Errorf("relay send with the device's key: %v", err)
	}
}

// relay listen and send work over WebSocket too; with -o json, listen
// prints presence changes as JSON lines, as text mode prints them, and
// an event's payload as text beside its base64.
func TestRelayOverWebSocketAndPresenceAsJSON(t *testing.T) {
	f := startRelay(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out, errOut relaytest.Buffer
	done := make(chan struct{})
	var listenErr error // set before done is closed
	env := map[string]string{"RELAYCTL_CONFIG_DIR": t.TempDir()}
	go func() {
		defer close(done)
		args := append([]string{"-o", "json", "relay", "listen", "--transport", "websocket"}, f.as(f.a, f.keys[f.a.ID])...)
		listenErr = run(ctx, args, strings.NewReader(""), &out, &errOut, func(k string) string { return env[k] })
	}()
	stop := func() error {
		cancel()
		<-done
		return listenErr
	}
	defer stop()
	clustertest.Eventually(t, 30*time.Second, func() error {
		select {
		case <-done:
			t.Fatalf("relay listen --transport websocket ended: %v", listenErr)
		default:
		}
		if !strings.Contains(errOut.String(), "listening as "+f.a.ID) {
			return fmt.Errorf("relay listen has not connected: %q", errOut.String())
		}
		return nil
	})
	relaytest.WaitEdge(t, f.r.Edges[0], 10*time.Second, func(st edgesession.Stats) error {
		if st.Sessions != 1 {
			return fmt.Errorf("%d sessions on the edge, want the listener's", st.Sessions)
		}
		return nil
	})

	// b comes online, sends over WebSocket, and goes offline again.
	if _, _, err := runRelay(t, append(append([]string{"send", "--transport", "websocket"}, f.as(f.b, f.keys[f.b.ID])...), "--to", f.a.ID, "héllo", "there")...); err != nil {
		t.Fatalf("relay send --transport websocket: %v", err)
	}
	type line struct {
		Presence, Device, Sender, Text string
		Payload                        []byte
	}
	clustertest.Eventually(t, 30*time.Second, func() error {
		seen := map[string]bool{}
		for _, l := range strings.Split(strings.TrimSpace(out.String()), "\n") {
			if l == "" {
				continue
			}
			var v line
			if err := json.Unmarshal([]byte(l), &v); err != nil {
				return fmt.Errorf("relay listen -o json printed %q, not JSON: %v", l, err)
			}
			switch {
			case v.Presence != "" && v.Device == f.b.ID:
				seen[v.Presence] = true
			case v.Sender == f.b.ID:
				seen["event"] = string(v.Payload) == "héllo there" && v.Text == "héllo there"
			}
		}
		for _, want := range []string{"online", "event", "offline"} {
			if !seen[want] {
				return fmt.Errorf("relay listen -o json printed no %s line for %s:\n%s", want, f.b.ID, out.String())
			}
		}
		return nil
	})
	if err := stop(); err != nil {
		t.Fatalf("relay listen: %v", err)
	}
	if _, _, err := runRelay(t, append([]string{"send", "--transport", "carrier-pigeon"}, f.as(f.b, f.keys[f.b.ID])...)...); err == nil || !strings.Contains(err.Error(), "quic, webtransport, websocket") {
		t.Errorf("relay send --transport carrier-pigeon: %v", err)
	}
}
