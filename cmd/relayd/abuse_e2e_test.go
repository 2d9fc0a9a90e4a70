package main_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/internal/relaytest"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// The binary under abuse: devices that stop reading on every transport
// cost relayd nothing once their sessions end (counted in the process's
// own goroutine profile), and SIGTERM stops it within its shutdown bound
// while they are stuck. The old close path left such sessions behind and
// hung in shutdown for minutes.
func TestSIGTERMWithStuckDevices(t *testing.T) {
	dir := t.TempDir()
	api, raft, admin, edgeAdmin := freePort(t), freePort(t), freePort(t), freePort(t)
	edge := freeUDPPort(t)
	p := startRelayd(t, "dev", "--data-dir", filepath.Join(dir, "data"), "--api-addr", api, "--raft-addr", raft,
		"--admin-addr", admin, "--edge-addr", edge, "--edge-admin-addr", edgeAdmin, "--edge-handshakes-per-second", "1000")
	p.waitLog(t, "edge listening", 60*time.Second)
	users, devices := adminClients(t, "http://"+api)
	user := users(&controlv1.CreateUserRequest{Login: "mallory"})
	register := func(name string) relaytest.Device {
		pub, priv, _ := ed25519.GenerateKey(rand.Reader)
		return relaytest.Device{ID: devices(&controlv1.RegisterDeviceRequest{UserId: user, Name: name, PublicKey: pub}), UserID: user, Key: priv}
	}
	sender := register("sender")
	victims := map[client.Transport]relaytest.Device{}
	for _, tr := range []client.Transport{client.QUIC, client.WebTransport, client.WebSocket} {
		victims[tr] = register(tr.String())
	}
	// The edge follows the control plane's feed: wait until it knows the
	// last device.
	waitKnown(t, edge, victims[client.WebSocket])

	base := edgeSessionGoroutines(t, edgeAdmin)
	// A device stuck with a full stream, then closed (a flood of pings
	// overflows its control queue): its goroutines go.
	v, s := relaytest.Stall(t, edge, client.QUIC, victims[client.QUIC], sender)
	for n := range 5000 {
		if v.Send(&relayv1.Frame{Kind: &relayv1.Frame_Ping{Ping: &relayv1.Ping{Nonce: uint64(n)}}}) != nil {
			break
		}
	}
	// Reading now would let the pongs drain: wait for the edge to give up
	// on the device first.
	eventually(t, 60*time.Second, func() error {
		resp, err := http.Get("http://" + edgeAdmin + "/metrics")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if !bytes.Contains(b, []byte(`relay_edge_session_closes_total{code="slow_consumer"} 1`)) {
			return fmt.Errorf("no slow consumer closed yet")
		}
		return nil
	})
	if end, err := v.WaitEnd(60 * time.Second); err != nil || end.Code != relayv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER {
		t.Fatalf("the stuck device ended with %+v (%v), want SLOW_CONSUMER\n%s", end, err, p.LastLogs(30))
	}
	s.Close()
	eventually(t, 30*time.Second, func() error {
		if n := edgeSessionGoroutines(t, edgeAdmin); n > base {
			return fmt.Errorf("%d session goroutines in relayd, %d before", n, base)
		}
		return nil
	})

	// Stuck devices on every transport, then SIGTERM.
	for tr, d := range victims {
		if tr != client.QUIC {
			relaytest.Stall(t, edge, tr, d, sender)
		}
	}
	start := time.Now()
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// relayd dev drains for 10 s, each session lingers 2 s and its
	// transport waits 1 s; the rest is slack for a busy machine.
	select {
	case <-p.Done():
		if p.Err() != nil {
			t.Fatalf("relayd exited with %v\n%s", p.Err(), p.LastLogs(20))
		}
	case <-time.After(45 * time.Second):
		t.Fatalf("relayd did not stop within 45 s of SIGTERM\n%s", p.LastLogs(20))
	}
	t.Logf("relayd stopped %s after SIGTERM", time.Since(start).Round(time.Millisecond))
}

// adminClients logs in as the first admin and returns helpers that
// create a user and register a device, returning their ids.
func adminClients(t *testing.T, url string) (func(*controlv1.CreateUserRequest) string, func(*controlv1.RegisterDeviceRequest) string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	hc := &http.Client{}
	t.Cleanup(hc.CloseIdleConnections)
	var token string
	eventually(t, 30*time.Second, func() error {
		resp, err := controlv1connect.NewAuthServiceClient(hc, url).Login(ctx, connect.NewRequest(&controlv1.LoginRequest{Login: "admin", Password: adminPassword}))
		if err != nil {
			return err
		}
		token = resp.Msg.GetTokens().GetAccessToken()
		return nil
	})
	auth := func(r connect.AnyRequest) { r.Header().Set("Authorization", "Bearer "+token) }
	users := func(m *controlv1.CreateUserRequest) string {
		t.Helper()
		req := connect.NewRequest(m)
		auth(req)
		resp, err := controlv1connect.NewUserServiceClient(hc, url).CreateUser(ctx, req)
		if err != nil {
			t.Fatalf("create user: %v", err)
		}
		return resp.Msg.GetUser().GetId()
	}
	devices := func(m *controlv1.RegisterDeviceRequest) string {
		t.Helper()
		req := connect.NewRequest(m)
		auth(req)
		resp, err := controlv1connect.NewDeviceServiceClient(hc, url).RegisterDevice(ctx, req)
		if err != nil {
			t.Fatalf("register device: %v", err)
		}
		return resp.Msg.GetDevice().GetId()
	}
	return users, devices
}

// waitKnown waits until the edge at addr lets d sign in.
func waitKnown(t *testing.T, addr string, d relaytest.Device) {
	t.Helper()
	eventually(t, 30*time.Second, func() error {
		raw, err := relaytest.DialRawOrigin(t, addr, client.QUIC, "")
		if err != nil {
			return err
		}
		defer raw.Close()
		h := &relayv1.Hello{UserId: d.UserID, DeviceId: d.ID, ProtocolVersion: 1, ClientTimeMs: time.Now().UnixMilli()}
		if err := raw.SendHello(h); err != nil {
			return err
		}
		f, err := raw.Next(10 * time.Second)
		if err != nil || f.GetChallenge() == nil {
			return fmt.Errorf("no challenge: %v %v", f, err)
		}
		raw.Answer(f.GetChallenge(), d.Key)
		if f, err = raw.Next(10 * time.Second); err != nil || f.GetWelcome() == nil {
			return fmt.Errorf("not welcome yet: %v %v", f, err)
		}
		return nil
	})
}

// edgeSessionGoroutines counts the goroutines of relayd's edge that run
// the session core, from its goroutine profile on the admin port.
func edgeSessionGoroutines(t *testing.T, admin string) int {
	t.Helper()
	resp, err := http.Get("http://" + admin + "/debug/pprof/goroutine?debug=2")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, g := range bytes.Split(b, []byte("\n\n")) {
		if bytes.Contains(g, []byte("github.com/edge-relay/relay/edge/session.")) ||
			bytes.Contains(g, []byte("github.com/edge-relay/relay/edge/transport.(*wsConn).pump")) {
			n++
		}
	}
	return n
}
