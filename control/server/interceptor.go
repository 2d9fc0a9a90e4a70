package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace"
)

// loggingInterceptor gives every RPC a request id (taken from the
// X-Request-Id header when the caller sent one), counts and times it, and
// logs failures and calls slower than the threshold.
type loggingInterceptor struct {
	log      *slog.Logger
	slow     time.Duration
	duration *prometheus.HistogramVec
}

func newLoggingInterceptor(log *slog.Logger, slow time.Duration, reg prometheus.Registerer) *loggingInterceptor {
	h := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "relay_control_rpc_seconds",
		Help:    "Connect RPCs served by this node, by procedure and code.",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
	}, []string{"procedure", "code"})
	reg.MustRegister(h)
	return &loggingInterceptor{log: log, slow: slow, duration: h}
}

func requestID(h interface{ Get(string) string }) string {
	if id := h.Get("X-Request-Id"); id != "" && len(id) <= 128 {
		return id
	}
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func (i *loggingInterceptor) done(ctx context.Context, procedure, rid string, start time.Time, err error) {
	i.finish(ctx, procedure, rid, start, err, true)
}

// finish records a call; slow marks calls whose duration means something
// (not long-lived streams, which last as long as their client wants).
func (i *loggingInterceptor) finish(ctx context.Context, procedure, rid string, start time.Time, err error, slow bool) {
	traceID := ""
	if sc := trace.SpanContextFromContext(ctx); sc.HasTraceID() {
		traceID = sc.TraceID().String()
	}
	took := time.Since(start)
	code := "ok"
	if err != nil {
		code = connect.CodeOf(err).String()
	}
	i.duration.WithLabelValues(procedure, code).Observe(took.Seconds())
	switch {
	case err != nil && connect.CodeOf(err) == connect.CodeInternal:
		i.log.ErrorContext(ctx, "rpc failed", "procedure", procedure, "request_id", rid, "trace_id", traceID, "duration", took, "err", err)
	case slow && took > i.slow:
		i.log.WarnContext(ctx, "slow rpc", "procedure", procedure, "request_id", rid, "trace_id", traceID, "duration", took, "err", err)
	case err != nil:
		i.log.DebugContext(ctx, "rpc error", "procedure", procedure, "request_id", rid, "trace_id", traceID, "duration", took, "err", err)
	}
}

func (i *loggingInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if req.Spec().IsClient {
			return next(ctx, req)
		}
		start, rid := time.Now(), requestID(req.Header())
		resp, err := next(ctx, req)
		if resp != nil {
			resp.Header().Set("X-Request-Id", rid)
		}
		i.done(ctx, req.Spec().Procedure, rid, start, err)
		return resp, err
	}
}

func (i *loggingInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (i *loggingInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		start, rid := time.Now(), requestID(conn.RequestHeader())
		conn.ResponseHeader().Set("X-Request-Id", rid)
		err := next(ctx, conn)
		i.finish(ctx, conn.Spec().Procedure, rid, start, err, false)
		return err
	}
}
