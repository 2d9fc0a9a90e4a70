package main_test

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracev1 "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/internal/relaytest"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// otlpReceiver is an OTLP/HTTP trace collector in the test: it decodes
// the export requests relayd sends and keeps every span with the name
// of the service that sent it.
type otlpReceiver struct {
	srv *httptest.Server

	mu    sync.Mutex
	spans []recvSpan
}

type recvSpan struct {
	service string
	span    *tracev1.Span
}

func newOTLPReceiver(t *testing.T, tls bool) *otlpReceiver {
	t.Helper()
	r := &otlpReceiver{}
	h := http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		b, err := io.ReadAll(io.LimitReader(req.Body, 16<<20))
		var ex collectortrace.ExportTraceServiceRequest
		if err != nil || req.URL.Path != "/v1/traces" || proto.Unmarshal(b, &ex) != nil {
			http.Error(w, "bad export", http.StatusBadRequest)
			return
		}
		r.mu.Lock()
		for _, rs := range ex.GetResourceSpans() {
			service := ""
			for _, a := range rs.GetResource().GetAttributes() {
				if a.GetKey() == "service.name" {
					service = a.GetValue().GetStringValue()
				}
			}
			for _, ss := range rs.GetScopeSpans() {
				for _, s := range ss.GetSpans() {
					r.spans = append(r.spans, recvSpan{service, s})
				}
			}
		}
		r.mu.Unlock()
		out, _ := proto.Marshal(&collectortrace.ExportTraceServiceResponse{})
		w.Header().Set("Content-Type", "application/x-protobuf")
		_, _ = w.Write(out)
	})
	if tls {
		r.srv = httptest.NewTLSServer(h)
	} else {
		r.srv = httptest.NewServer(h)
	}
	t.Cleanup(r.srv.Close)
	return r
}

// endpoint is the host:port relayd's --otlp-endpoint takes.
func (r *otlpReceiver) endpoint() string { return r.srv.Listener.Addr().String() }

// caFile writes the receiver's certificate as a PEM file (--otlp-ca).
func (r *otlpReceiver) caFile(t *testing.T) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "otlp-ca.pem")
	if err := os.WriteFile(f, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.srv.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

func (r *otlpReceiver) snapshot() []recvSpan {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]recvSpan(nil), r.spans...)
}

func attr(s *tracev1.Span, key string) string {
	for _, a := range s.GetAttributes() {
		if a.GetKey() == key {
			return a.GetValue().GetStringValue()
		}
	}
	return ""
}

// tracedRelay is a control node and an edge, separate relayd processes,
// exporting to their receivers with the given extra flags.
type tracedRelay struct {
	api, edge string
	devices   func(*controlv1.RegisterDeviceRequest) string
	user      string
}

func startTracedRelay(t *testing.T, controlFlags, edgeFlags []string) *tracedRelay {
	t.Helper()
	dir := t.TempDir()
	n := &node{id: "c1", dir: filepath.Join(dir, "c1"), raft: freePort(t), api: freePort(t), admin: freePort(t)}
	n.start(t, append([]string{"--bootstrap"}, controlFlags...)...)
	users, devices := adminClients(t, "http://"+n.api)
	users(&controlv1.CreateUserRequest{Login: "edges", Password: "edges-password-1", Role: controlv1.Role_ROLE_EDGE})
	pw := filepath.Join(dir, "edge-password")
	if err := os.WriteFile(pw, []byte("edges-password-1"), 0o600); err != nil {
		t.Fatal(err)
	}
	edge := freeUDPPort(t)
	e := startRelayd(t, append([]string{"edge", "--edge-id", "e1", "--addr", edge, "--admin-addr", freePort(t),
		"--control", "http://" + n.api, "--edge-login", "edges", "--edge-password-file", pw}, edgeFlags...)...)
	e.waitLog(t, "edge listening", 60*time.Second)
	return &tracedRelay{api: n.api, edge: edge, devices: devices, user: users(&controlv1.CreateUserRequest{Login: "tracy"})}
}

func (r *tracedRelay) device(t *testing.T, name string) relaytest.Device {
	t.Helper()
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	return relaytest.Device{ID: r.devices(&controlv1.RegisterDeviceRequest{UserId: r.user, Name: name, PublicKey: pub}), UserID: r.user, Key: priv}
}

// sendTo sends one durable event from a raw device and waits for its Ack.
func sendTo(t *testing.T, raw *relaytest.Raw, id string, seq uint64, target string) {
	t.Helper()
	ev := &relayv1.Event{Id: id, Seq: seq, CreatedAtMs: time.Now().UnixMilli(), TtlMs: 60000, Payload: []byte("x"), Targets: []string{target}}
	if err := raw.Send(&relayv1.Frame{Kind: &relayv1.Frame_Event{Event: ev}}); err != nil {
		t.Fatal(err)
	}
	for {
		f, err := raw.Next(30 * time.Second)
		if err != nil {
			t.Fatalf("no ack for %s: %v", id, err)
		}
		if f.GetAck().GetEventId() == id {
			return
		}
		if f.GetReject() != nil {
			t.Fatalf("%s refused: %v", id, f.GetReject())
		}
	}
}

// One event's life is one trace across processes: an event for an
// offline device, on the edge (relay.event, relay.mailbox.store,
// relay.mailbox.put, the Connect call) and on the control plane (the
// Connect server span, raft.apply); its delivery later is a span linked
// to that trace. Exported over OTLP/HTTP by the real binaries, flags as
// an operator sets them.
func TestOneTraceAcrossEdgeAndControlPlane(t *testing.T) {
	rcv := newOTLPReceiver(t, false)
	otlp := []string{"--otlp-endpoint", rcv.endpoint(), "--otlp-insecure"}
	r := startTracedRelay(t, otlp, otlp)
	sender, offline := r.device(t, "sender"), r.device(t, "offline")
	waitKnown(t, r.edge, offline)
	raw := relaytest.DialRaw(t, r.edge, client.QUIC)
	raw.Login(sender)
	sendTo(t, raw, "traced-1", 1, offline.ID)

	var traceID []byte
	eventually(t, 30*time.Second, func() error {
		spans := rcv.snapshot()
		for _, s := range spans {
			if s.span.GetName() == "relay.event" && attr(s.span, "relay.event.id") == "traced-1" {
				traceID = s.span.GetTraceId()
			}
		}
		if traceID == nil {
			return fmt.Errorf("no relay.event span for the event among %d spans", len(spans))
		}
		seen := map[string]bool{}
		for _, s := range spans {
			if string(s.span.GetTraceId()) == string(traceID) {
				seen[s.service+" "+s.span.GetName()] = true
			}
		}
		for _, want := range []string{
			"relay-edge relay.event", "relay-edge relay.mailbox.store", "relay-edge relay.mailbox.put",
			"relay-edge edge.v1.MailboxService/PutMailbox", "relay-control edge.v1.MailboxService/PutMailbox",
			"relay-control raft.apply",
		} {
			if !seen[want] {
				return fmt.Errorf("trace %s has no %q span: %v", hex.EncodeToString(traceID), want, seen)
			}
		}
		return nil
	})
	// Privacy: device and user ids appear only hashed.
	for _, s := range rcv.snapshot() {
		for _, a := range s.span.GetAttributes() {
			if v := a.GetValue().GetStringValue(); v == sender.ID || v == offline.ID || v == r.user {
				t.Fatalf("span %s carries the id %q in %s", s.span.GetName(), v, a.GetKey())
			}
		}
	}

	// The device comes online and gets the event from its mailbox: a
	// span linked to the event's trace.
	rx := relaytest.DialRaw(t, r.edge, client.QUIC)
	rx.Login(offline)
	eventually(t, 30*time.Second, func() error {
		for _, s := range rcv.snapshot() {
			if s.span.GetName() != "relay.mailbox.deliver" {
				continue
			}
			for _, l := range s.span.GetLinks() {
				if string(l.GetTraceId()) == string(traceID) {
					return nil
				}
			}
		}
		return fmt.Errorf("no relay.mailbox.deliver span linked to trace %s", hex.EncodeToString(traceID))
	})
}

// The exporter over TLS (--otlp-ca), and the sample ratio: an edge at
// ratio 0 starts no sampled trace, so the calls it makes carry an
// unsampled context and the control plane, which follows its callers,
// records none of them; the control plane's own calls (ratio 1) arrive.
func TestTracingOverTLSAndSampleRatio(t *testing.T) {
	rcv := newOTLPReceiver(t, true)
	ca := rcv.caFile(t)
	r := startTracedRelay(t,
		[]string{"--otlp-endpoint", rcv.endpoint(), "--otlp-ca", ca},
		[]string{"--otlp-endpoint", rcv.endpoint(), "--otlp-ca", ca, "--trace-sample-ratio", "0"})
	sender, offline := r.device(t, "sender"), r.device(t, "offline")
	waitKnown(t, r.edge, offline)
	raw := relaytest.DialRaw(t, r.edge, client.QUIC)
	raw.Login(sender)
	sendTo(t, raw, "unsampled-1", 1, offline.ID)
	// The control plane's own spans arrive over TLS.
	eventually(t, 30*time.Second, func() error {
		for _, s := range rcv.snapshot() {
			if s.service == "relay-control" {
				return nil
			}
		}
		return fmt.Errorf("no span from the control plane over TLS")
	})
	// Another event, and a round trip through the control plane after
	// it, so whatever the edge would have exported has had time to.
	sendTo(t, raw, "unsampled-2", 2, offline.ID)
	r.device(t, "after")
	eventually(t, 30*time.Second, func() error {
		n := 0
		for _, s := range rcv.snapshot() {
			if s.service == "relay-control" && s.span.GetName() != "" {
				n++
			}
		}
		if n < 3 {
			return fmt.Errorf("only %d control-plane spans yet", n)
		}
		return nil
	})
	for _, s := range rcv.snapshot() {
		if s.service == "relay-edge" {
			t.Fatalf("the edge at ratio 0 exported %s", s.span.GetName())
		}
		if s.span.GetName() == "edge.v1.MailboxService/PutMailbox" {
			t.Fatalf("the control plane recorded a mailbox write of an unsampled edge trace")
		}
	}
}

// An --idle-timeout below two of the clients' WebSocket pings is taken
// (an edge of QUIC devices may want to notice dead ones sooner), with a
// warning at start: WebSocket sessions may end between two pings.
func TestAShortIdleTimeoutIsWarnedOf(t *testing.T) {
	pw := filepath.Join(t.TempDir(), "edge-password")
	if err := os.WriteFile(pw, []byte("edges-password-1"), 0o600); err != nil {
		t.Fatal(err)
	}
	e := startRelayd(t, "edge", "--edge-id", "e1", "--addr", freeUDPPort(t), "--admin-addr", freePort(t),
		"--control", "http://"+freePort(t), "--edge-login", "edges", "--edge-password-file", pw, "--idle-timeout", "5s")
	rec := e.waitLog(t, "--idle-timeout is below two of the clients' WebSocket pings (every 10 s): WebSocket sessions may end TIMEOUT between two pings", 60*time.Second)
	if rec["idle_timeout"] != "5s" {
		t.Fatalf("warning %v, want the timeout named", rec)
	}
}
