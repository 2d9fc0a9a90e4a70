package telemetry

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"testing"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

func TestTraceparentRoundTrip(t *testing.T) {
	tp := sdktrace.NewTracerProvider()
	defer func() { _ = tp.Shutdown(context.Background()) }()
	ctx, span := tp.Tracer("t").Start(context.Background(), "s")
	defer span.End()
	p := Traceparent(ctx)
	if len(p) != 55 {
		t.Fatalf("traceparent %q", p)
	}
	if sc := SpanContext(p); !sc.Equal(span.SpanContext().WithRemote(true)) {
		t.Fatalf("parsed %v, want %v", sc, span.SpanContext())
	}
	if Traceparent(context.Background()) != "" || SpanContext("").IsValid() || SpanContext("00-garbage").IsValid() {
		t.Fatal("no span must give nothing")
	}
	// An unsampled span is not passed on.
	un := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.NeverSample()))
	uctx, us := un.Tracer("t").Start(context.Background(), "s")
	defer us.End()
	if Traceparent(uctx) != "" {
		t.Fatal("an unsampled span was passed on")
	}
}

func TestLogHandlerAddsTheTrace(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(LogHandler(slog.NewTextHandler(&buf, nil))).With("part", "edge")
	tp := sdktrace.NewTracerProvider()
	defer func() { _ = tp.Shutdown(context.Background()) }()
	ctx, span := tp.Tracer("t").Start(context.Background(), "s")
	defer span.End()
	log.InfoContext(ctx, "traced")
	log.Info("untraced")
	log.InfoContext(ctx, "named", "trace_id", "given")
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	sc := span.SpanContext()
	if !strings.Contains(lines[0], "trace_id="+sc.TraceID().String()) || !strings.Contains(lines[0], "span_id="+sc.SpanID().String()) {
		t.Fatalf("traced line: %s", lines[0])
	}
	if strings.Contains(lines[1], "trace_id") {
		t.Fatalf("untraced line: %s", lines[1])
	}
	if strings.Count(lines[2], "trace_id") != 1 {
		t.Fatalf("a line that names its trace got it twice: %s", lines[2])
	}
}

func TestHashID(t *testing.T) {
	if HashID("d_abc") != HashID("d_abc") || HashID("d_abc") == HashID("d_abd") || len(HashID("x")) != 16 {
		t.Fatal("HashID is not a stable 16-digit hash")
	}
}
