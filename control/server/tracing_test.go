package server_test

import (
	"context"
	"testing"
	"time"

	"connectrpc.com/connect"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

// A caller's trace context reaches the node it calls, the Raft apply,
// and, through the forwarded write, the leader.
func TestTraceContextPropagates(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	c := clustertest.Start(t, 3, clustertest.Options{TracerProvider: tp})
	f := c.Nodes[c.Follower()]
	d := api.NewDialer(nil)
	defer d.Close()
	cl := controlv1connect.NewUserServiceClient(d.HTTPClient(), d.URL(f.Server.APIAddr()))
	const traceID = "4bf92f3577b34da6a3ce929d0e0e4736"
	req := connect.NewRequest(&controlv1.CreateUserRequest{Login: "traced"})
	req.Header().Set("Authorization", "Bearer "+c.AdminToken())
	req.Header().Set("traceparent", "00-"+traceID+"-00f067aa0ba902b7-01")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := cl.CreateUser(ctx, req); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, s := range rec.Ended() {
		if s.SpanContext().TraceID().String() == traceID {
			seen[s.Name()] = true
		}
	}
	for _, want := range []string{"control.v1.UserService/CreateUser", "raft.apply", "control.v1.PeerService/Apply"} {
		if !seen[want] {
			t.Errorf("no span %q in the caller's trace; spans: %v", want, seen)
		}
	}
}
