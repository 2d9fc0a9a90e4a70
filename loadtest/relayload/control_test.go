package main

import (
	"context"
	"encoding/pem"
	"flag"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

// fakeAuth is a control API that knows one login, and records how each
// request came (HTTP version, TLS).
type fakeAuth struct {
	controlv1connect.UnimplementedAuthServiceHandler
	mu   sync.Mutex // guards seen
	seen []string
}

func (f *fakeAuth) Login(_ context.Context, r *connect.Request[controlv1.LoginRequest]) (*connect.Response[controlv1.LoginResponse], error) {
	if r.Msg.GetLogin() != "admin" || r.Msg.GetPassword() != "pw" {
		return nil, connect.NewError(connect.CodeUnauthenticated, nil)
	}
	return connect.NewResponse(&controlv1.LoginResponse{Tokens: &controlv1.Tokens{AccessToken: "token"}}), nil
}

func (f *fakeAuth) handler() http.Handler {
	path, h := controlv1connect.NewAuthServiceHandler(f)
	mux := http.NewServeMux()
	mux.Handle(path, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		how := r.Proto
		if r.TLS != nil {
			how += " over TLS"
		}
		f.mu.Lock()
		f.seen = append(f.seen, how)
		f.mu.Unlock()
		h.ServeHTTP(w, r)
	}))
	return mux
}

func (f *fakeAuth) requests() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.seen...)
}

// login runs the driver's log-in against control with --control-ca ca.
func login(t *testing.T, control, ca string) (string, error) {
	t.Helper()
	d := &driverConfig{control: control, controlCA: ca, adminPassword: "pw"}
	token, err := d.setup()
	if d.http != nil {
		t.Cleanup(d.http.CloseIdleConnections)
	}
	return token, err
}

// The control API over TLS (every Kubernetes overlay and the compose
// cluster serve it so): an https:// --control speaks HTTP/2 over TLS and
// verifies the server against --control-ca; http:// stays HTTP/2 without
// TLS, as relayd serves it without --tls-*.
func TestControlTLS(t *testing.T) {
	auth := &fakeAuth{}
	tlsSrv := httptest.NewUnstartedServer(auth.handler())
	tlsSrv.EnableHTTP2 = true
	tlsSrv.Config.ErrorLog = log.New(io.Discard, "", 0) // the refused handshake below
	tlsSrv.StartTLS()
	t.Cleanup(tlsSrv.Close)
	ca := filepath.Join(t.TempDir(), "ca.crt")
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: tlsSrv.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}

	if token, err := login(t, tlsSrv.URL, ca); err != nil || token != "token" {
		t.Fatalf("https with --control-ca: token %q, %v", token, err)
	}
	if got := auth.requests(); len(got) != 1 || got[0] != "HTTP/2.0 over TLS" {
		t.Fatalf("the login came as %v, want HTTP/2.0 over TLS", got)
	}
	// Without the CA the server is not trusted (the system's roots do
	// not know it), and nothing is sent.
	if _, err := login(t, tlsSrv.URL, ""); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("https without --control-ca: %v, want a certificate error", err)
	}
	if got := auth.requests(); len(got) != 1 {
		t.Fatalf("requests reached an untrusted server: %v", got)
	}

	h2c := &fakeAuth{}
	plainSrv := httptest.NewUnstartedServer(h2c.handler())
	plainSrv.Config.Protocols = new(http.Protocols)
	plainSrv.Config.Protocols.SetHTTP1(true)
	plainSrv.Config.Protocols.SetUnencryptedHTTP2(true)
	plainSrv.Start()
	t.Cleanup(plainSrv.Close)
	if token, err := login(t, plainSrv.URL, ""); err != nil || token != "token" {
		t.Fatalf("http: token %q, %v", token, err)
	}
	if got := h2c.requests(); len(got) != 1 || got[0] != "HTTP/2.0" {
		t.Fatalf("the login came as %v, want HTTP/2.0 without TLS", got)
	}

	for _, c := range []struct{ control, ca, want string }{
		{plainSrv.URL, ca, "--control-ca is for an https://"},
		{"127.0.0.1:7400", "", "want an http:// or https:// URL"},
		{tlsSrv.URL, filepath.Join(t.TempDir(), "missing.crt"), "--control-ca"},
		{tlsSrv.URL, writeTemp(t, "not a certificate"), "holds no PEM certificate"},
	} {
		if _, err := login(t, c.control, c.ca); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("--control %s --control-ca %q: %v, want %q", c.control, c.ca, err, c.want)
		}
	}

	// The flag is relayload's (deploy/loadtest/relayload-job.yaml gives it).
	var d driverConfig
	fs := flag.NewFlagSet("relayload", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	d.register(fs)
	if err := fs.Parse([]string{"--control", "https://relay-control-api.relay:7400", "--control-ca", ca}); err != nil || d.controlCA != ca {
		t.Fatalf("--control-ca: %v, %q", err, d.controlCA)
	}
}

func writeTemp(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// The dialer's UDP sockets can reach the edge wherever it is: bound to
// the loopback address only for an edge on the loopback.
func TestLocalUDPAddr(t *testing.T) {
	for edge, want := range map[string]string{
		"127.0.0.1:7443":           "127.0.0.1:0",
		"[::1]:7443":               "[::1]:0",
		"10.0.1.1:443":             ":0",
		"relay-edge.relay.svc:443": ":0",
		"localhost:7443":           ":0",
		"[2001:db8::1]:443":        ":0",
	} {
		if got := localUDPAddr(edge); got != want {
			t.Errorf("localUDPAddr(%s) = %s, want %s", edge, got, want)
		}
	}
}

// A read from an admin server that stopped answering (an edge paused in
// a fault run) fails within its timeout instead of holding the run.
func TestAnAdminServerThatStopsAnsweringFailsTheRead(t *testing.T) {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(func() { close(release) })
	done := make(chan error, 1)
	go func() {
		resp, err := adminGet(context.Background(), srv.URL+"/metrics", 200*time.Millisecond)
		if err == nil {
			_ = resp.Body.Close()
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("a read from a server that never answered succeeded")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("a read from a server that never answers did not end at its timeout")
	}
}
