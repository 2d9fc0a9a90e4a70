// Package telemetry sets up OpenTelemetry tracing for a relay process:
// a tracer provider that samples by parent (so a caller's decision is
// kept), exports over OTLP/HTTP when an endpoint is configured, and the
// W3C trace-context propagator. Without an endpoint spans are still
// created, so trace ids reach the logs and are passed on to other nodes,
// but nothing is exported.
package telemetry

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"

	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.26.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/edge-relay/relay/internal/certpool"
)

// Config configures tracing.
type Config struct {
	// ServiceName names the process in traces, e.g. "relay-control".
	ServiceName string
	// InstanceID tells processes of one service apart (a node id).
	InstanceID string
	// OTLPEndpoint is host:port of an OTLP/HTTP collector; empty exports
	// nothing.
	OTLPEndpoint string
	// OTLPInsecure sends to the collector without TLS.
	OTLPInsecure bool
	// OTLPCAFile is a PEM bundle to verify the collector's certificate
	// with (empty: the system's roots).
	OTLPCAFile string
	// SampleRatio samples new traces with this probability, 0 to 1 (a
	// value outside that range is 1). Spans with a parent follow the
	// parent's decision, so one trace is sampled whole or not at all.
	SampleRatio float64
	// Exporter, if set, receives spans (tests use an in-memory one).
	Exporter sdktrace.SpanExporter
}

// Telemetry owns a tracer provider.
type Telemetry struct {
	tp *sdktrace.TracerProvider
}

// Propagator is the context propagation every process uses.
func Propagator() propagation.TextMapPropagator {
	return propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{})
}

// New builds the tracer provider.
func New(ctx context.Context, cfg Config) (*Telemetry, error) {
	if cfg.SampleRatio < 0 || cfg.SampleRatio > 1 {
		cfg.SampleRatio = 1
	}
	res := resource.NewWithAttributes(semconv.SchemaURL,
		semconv.ServiceName(cfg.ServiceName), semconv.ServiceInstanceID(cfg.InstanceID))
	opts := []sdktrace.TracerProviderOption{
		sdktrace.WithResource(res),
		sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.TraceIDRatioBased(cfg.SampleRatio))),
	}
	if cfg.OTLPEndpoint != "" {
		eopts := []otlptracehttp.Option{otlptracehttp.WithEndpoint(cfg.OTLPEndpoint)}
		if cfg.OTLPInsecure {
			eopts = append(eopts, otlptracehttp.WithInsecure())
		} else if cfg.OTLPCAFile != "" {
			pool, err := certpool.FromFile(cfg.OTLPCAFile)
			if err != nil {
				return nil, fmt.Errorf("the collector's CA: %w", err)
			}
			eopts = append(eopts, otlptracehttp.WithTLSClientConfig(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}))
		}
		exp, err := otlptracehttp.New(ctx, eopts...)
		if err != nil {
			return nil, fmt.Errorf("otlp exporter for %s: %w", cfg.OTLPEndpoint, err)
		}
		opts = append(opts, sdktrace.WithBatcher(exp))
	}
	if cfg.Exporter != nil {
		opts = append(opts, sdktrace.WithSyncer(cfg.Exporter))
	}
	return &Telemetry{tp: sdktrace.NewTracerProvider(opts...)}, nil
}

// TracerProvider returns the provider.
func (t *Telemetry) TracerProvider() trace.TracerProvider { return t.tp }

// Shutdown flushes and stops exporting.
func (t *Telemetry) Shutdown(ctx context.Context) error {
	if err := t.tp.Shutdown(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return fmt.Errorf("shut down tracing: %w", err)
	}
	return nil
}
