package server_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/internal/relaytest"
)

// An event to a device on another edge is one trace: its span on the
// sending edge, the forward, and the delivery on the receiving edge
// (the mesh carries the trace context), which ends when the device
// acknowledged it.
func TestTracesCrossTheMesh(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	r := startMulti(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) { cfg.TracerProvider = tp }})
	u := r.User("traced")
	a, b := r.Device(u, "a"), r.Device(u, "b")
	ca := dial(t, r, 0, a, client.QUIC)
	cb := dial(t, r, 1, b, client.QUIC)
	waitOnline(t, []*client.Client{ca, cb})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := ca.Send(ctx, client.Message{Targets: []string{b.ID}, Payload: []byte("across")}); err != nil {
		t.Fatal(err)
	}
	clustertest.Eventually(t, 10*time.Second, func() error {
		byTrace := map[string]map[string]bool{}
		for _, s := range rec.Ended() {
			id := s.SpanContext().TraceID().String()
			if byTrace[id] == nil {
				byTrace[id] = map[string]bool{}
			}
			byTrace[id][s.Name()] = true
		}
		for _, names := range byTrace {
			if names["relay.event"] && names["relay.mesh.forward"] && names["relay.mesh.deliver"] {
				return nil
			}
		}
		return fmt.Errorf("no trace with the event, its forward and its delivery: %v", byTrace)
	})
	// The event's span links to the handshake span of the session it came
	// in on.
	handshakes := map[trace.SpanID]bool{}
	var event sdktrace.ReadOnlySpan
	for _, s := range rec.Ended() {
		switch s.Name() {
		case "relay.handshake":
			handshakes[s.SpanContext().SpanID()] = true
		case "relay.event":
			event = s
		}
	}
	if event == nil {
		t.Fatal("no relay.event span ended")
	}
	if len(event.Links()) != 1 || !handshakes[event.Links()[0].SpanContext.SpanID()] {
		t.Fatalf("relay.event links %v, not one of the handshakes %v", event.Links(), handshakes)
	}
}
