package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"net/http"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace"

	"github.com/edge-relay/relay/control/api"
)

// loggingInterceptor counts and times every RPC, and logs failures and
// calls slower than the threshold under the request's id
// (withRequestIDs).
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

// withRequestIDs gives every request an id, the caller's X-Request-Id
// when it sent a usable one, and answers with it whatever answers: a
// handler, an interceptor's or the credential guard's refusal, an
// unknown path. A refusal is what a caller most wants to quote.
func withRequestIDs(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rid := r.Header.Get("X-Request-Id")
		if rid == "" || len(rid) > 128 {
			var b [8]byte
			_, _ = rand.Read(b[:])
			rid = hex.EncodeToString(b[:])
		}
		w.Header().Set("X-Request-Id", rid)
		next.ServeHTTP(w, r.WithContext(api.WithRequestID(r.Context(), rid)))
	})
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
	err = api.Detail(err) // what the caller may not have been told
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
		start, rid := time.Now(), api.RequestID(ctx)
		resp, err := next(ctx, req)
		i.done(ctx, req.Spec().Procedure, rid, start, err)
		return resp, err
	}
}

func (i *loggingInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (i *loggingInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		start, rid := time.Now(), api.RequestID(ctx)
		err := next(ctx, conn)
		i.finish(ctx, conn.Spec().Procedure, rid, start, err, false)
		return err
	}
}
