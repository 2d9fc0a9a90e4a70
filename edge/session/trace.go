package session

import (
	"context"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/edge-relay/relay/internal/telemetry"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// eventTrace is the span of one event's life on this edge and the
// context its child spans start from. The zero value traces nothing and
// costs nothing: an edge without a tracer never builds one.
type eventTrace struct {
	ctx  context.Context
	span trace.Span
}

// traceEvent starts an event's span: the root of a trace of its own
// (one trace per event, not per session), linked to the session's
// handshake span in ctx. Ids of users and devices appear hashed
// (telemetry.HashID), the event id as sent.
func (s *Session) traceEvent(ctx context.Context, ev *relayv1.Event) eventTrace {
	if !s.hub.traced {
		return eventTrace{}
	}
	ctx, span := s.hub.cfg.Tracer.Start(ctx, "relay.event", trace.WithNewRoot(), trace.WithSpanKind(trace.SpanKindServer),
		trace.WithLinks(trace.LinkFromContext(ctx)))
	if !span.IsRecording() {
		// Not sampled: nothing more is built for it, and no child spans.
		span.End()
		return eventTrace{}
	}
	span.SetAttributes(
		attribute.String("relay.event.id", ev.GetId()),
		attribute.String("relay.user", telemetry.HashID(s.userID)),
		attribute.String("relay.device", telemetry.HashID(s.deviceID)),
		attribute.Int("relay.targets", len(ev.GetTargets())),
		attribute.Bool("relay.ephemeral", ev.GetEphemeral()),
		attribute.Bool("relay.any_one", ev.GetAnyOne()),
	)
	return eventTrace{ctx: ctx, span: span}
}

// child starts a span under t (nothing when t traces nothing).
func (t eventTrace) child(tracer trace.Tracer, name string, kind trace.SpanKind, attrs ...attribute.KeyValue) eventTrace {
	if t.span == nil {
		return eventTrace{}
	}
	ctx, span := tracer.Start(t.ctx, name, trace.WithSpanKind(kind), trace.WithAttributes(attrs...))
	return eventTrace{ctx: ctx, span: span}
}

// end ends the span, marking it failed with code unless code is
// UNSPECIFIED.
func (t eventTrace) end(code relayv1.ErrorCode) {
	if t.span == nil {
		return
	}
	if code != relayv1.ErrorCode_ERROR_CODE_UNSPECIFIED {
		t.span.SetAttributes(attribute.String("relay.code", codeLabel(code)))
		t.span.SetStatus(codes.Error, code.String())
	}
	t.span.End()
}

// traceparent is what a message carries to continue the trace elsewhere.
func (t eventTrace) traceparent() string {
	if t.span == nil {
		return ""
	}
	return telemetry.Traceparent(t.ctx)
}

// remoteTrace starts a span for work another process began (a forward
// from another edge: its child; a mailbox entry stored earlier: a new
// trace linked to it), from the traceparent the message carried.
func (h *Hub) remoteTrace(name, traceparent string, child bool, attrs ...attribute.KeyValue) eventTrace {
	if !h.traced {
		return eventTrace{}
	}
	sc := telemetry.SpanContext(traceparent)
	if !sc.IsValid() {
		return eventTrace{}
	}
	opts := []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindConsumer), trace.WithAttributes(attrs...)}
	ctx := context.Background()
	if child {
		ctx = trace.ContextWithRemoteSpanContext(ctx, sc)
	} else {
		opts = append(opts, trace.WithNewRoot(), trace.WithLinks(trace.Link{SpanContext: sc}))
	}
	ctx, span := h.cfg.Tracer.Start(ctx, name, opts...)
	return eventTrace{ctx: ctx, span: span}
}
