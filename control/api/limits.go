package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/edge-relay/relay/control/auth"
	"github.com/edge-relay/relay/internal/gzipbound"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
)

// Limits bound the work a request can make a node do, above all before
// its caller is known: how many bytes its body may hold as sent and once
// decompressed, how long the body may take to arrive, and how many calls
// without credentials (logins and refreshes) may be in flight at once.
type Limits struct {
	// MaxMessage bounds a request message after decompression (and its
	// body as sent) for procedures not named below. Default 4 MiB.
	MaxMessage int64
	// MaxBulkMessage is MaxMessage for the procedures that carry batches
	// of events: MailboxService and the forwarded writes of PeerService
	// (a PutMailbox holds up to 16 MiB of events). Default 32 MiB.
	MaxBulkMessage int64
	// MaxPublicMessage is MaxMessage for the procedures callable without
	// credentials (Login, Refresh). Default 64 KiB.
	MaxPublicMessage int64
	// MaxUnauthenticated is how many calls without credentials may be in
	// flight on the node at once; more are refused at once with
	// resource_exhausted. Default 32.
	MaxUnauthenticated int
	// BodyTimeout is how long a request body may take to arrive. Default
	// 30s.
	BodyTimeout time.Duration
	// Metrics registers relay_control_unauthenticated_in_flight and
	// relay_control_requests_refused_total; nil registers nothing.
	Metrics prometheus.Registerer
}

func (l *Limits) applyDefaults() {
	if l.MaxMessage <= 0 {
		l.MaxMessage = 4 << 20
	}
	if l.MaxBulkMessage <= 0 {
		l.MaxBulkMessage = 32 << 20
	}
	if l.MaxPublicMessage <= 0 {
		l.MaxPublicMessage = 64 << 10
	}
	if l.MaxUnauthenticated <= 0 {
		l.MaxUnauthenticated = 32
	}
	if l.BodyTimeout <= 0 {
		l.BodyTimeout = 30 * time.Second
	}
}

// CompressMinBytes is the smallest response message a node gzips (when
// the client accepts gzip). Smaller ones go as they are: gzip saves
// little on them and costs the client a decompressor per call (about
// 40 KiB of allocations), which an edge opening a mailbox per session
// paid on every handshake.
const CompressMinBytes = 1024

// messageOptions are the handler options that bound a service's request
// messages to limit bytes, decompressed, enforced while decompressing,
// and compress only responses of CompressMinBytes or more.
func messageOptions(limit int64) connect.HandlerOption {
	return connect.WithHandlerOptions(
		connect.WithReadMaxBytes(int(limit)),
		connect.WithCompressMinBytes(CompressMinBytes),
		connect.WithCompression("gzip", gzipbound.Decompressor(limit), gzipbound.Compressor),
	)
}

// HandlerOptions returns the options for the handler of service (its
// package-qualified name, e.g. "control.v1.AuthService"): its message
// size limit.
func (l Limits) HandlerOptions(service string) connect.HandlerOption {
	l.applyDefaults()
	return messageOptions(l.messageLimit("/" + service + "/"))
}

// messageLimit returns the size limit of a procedure's request.
func (l Limits) messageLimit(procedure string) int64 {
	switch {
	case Policy().Public[procedure], strings.HasPrefix(procedure, "/"+controlv1connect.AuthServiceName+"/"):
		return l.MaxPublicMessage
	case strings.HasPrefix(procedure, "/"+edgev1connect.MailboxServiceName+"/"),
		strings.HasPrefix(procedure, "/"+controlv1connect.PeerServiceName+"/"):
		return l.MaxBulkMessage
	}
	return l.MaxMessage
}

type preauthKey struct{}

// Guard bounds the work of every request before a handler decodes it: a
// call that needs credentials and presents none that verify (a bearer
// access token signed by a key this node knows, unexpired, or a client
// certificate of the cluster CA) is refused before its body is read; a
// call to a public procedure (Login, Refresh) takes one of
// Limits.MaxUnauthenticated slots or is refused; every body is cut at its
// procedure's size limit and must arrive within Limits.BodyTimeout. The
// claims it verified travel to the Authenticator in the context, so a
// token is verified once. Wrap the API's HTTP handler with it (inside
// WithClientCert).
func (a *Authenticator) Guard(next http.Handler, limits Limits) http.Handler {
	limits.applyDefaults()
	slots := make(chan struct{}, limits.MaxUnauthenticated)
	inFlight := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "relay_control_unauthenticated_in_flight",
		Help: "Calls without credentials (logins, refreshes) being served now.",
	}, func() float64 { return float64(len(slots)) })
	refused := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "relay_control_requests_refused_total",
		Help: "Requests refused before their body was read, by reason: busy (too many calls without credentials in flight), unauthenticated (no credentials that verify).",
	}, []string{"reason"})
	if limits.Metrics != nil {
		limits.Metrics.MustRegister(inFlight, refused)
	}
	ew := connect.NewErrorWriter()
	refuse := func(w http.ResponseWriter, r *http.Request, err *connect.Error) {
		if ew.IsSupported(r) {
			_ = ew.Write(w, r, err)
			return
		}
		status := http.StatusUnauthorized
		if err.Code() == connect.CodeResourceExhausted {
			status = http.StatusTooManyRequests
		}
		http.Error(w, err.Message(), status)
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		procedure := r.URL.Path
		if r.Method == http.MethodGet && !ew.IsSupported(r) {
			// jwks.json, openapi.json: no body worth reading.
			r.Body = http.MaxBytesReader(w, r.Body, 0)
			next.ServeHTTP(w, r)
			return
		}
		ctx := r.Context()
		if _, known := a.policy.Roles[procedure]; !known && !a.policy.Public[procedure] {
			// Not a procedure of this API: the mux answers 404.
			r.Body = http.MaxBytesReader(w, r.Body, 0)
			next.ServeHTTP(w, r)
			return
		}
		if a.policy.Public[procedure] {
			select {
			case slots <- struct{}{}:
				defer func() { <-slots }()
			default:
				refused.WithLabelValues("busy").Inc()
				err := connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("too many calls without credentials in flight on this node (%d); retry shortly", limits.MaxUnauthenticated))
				err.Meta().Set("Retry-After", "1")
				refuse(w, r, err)
				return
			}
		} else {
			claims, err := a.preauthenticate(ctx, r.Header)
			if err != nil {
				refused.WithLabelValues("unauthenticated").Inc()
				refuse(w, r, err)
				return
			}
			ctx = context.WithValue(ctx, preauthKey{}, claims)
			r = r.WithContext(ctx)
		}
		// A body as sent may be a little larger than its message: gzip
		// adds a few bytes per block to data that does not compress.
		max := limits.messageLimit(procedure)
		r.Body = newDeadlineBody(w, r.Body, max+max/64+1024, limits.BodyTimeout)
		next.ServeHTTP(w, r)
	})
}

// preauthenticate establishes who calls from the headers alone: a bearer
// token that verifies, else a client certificate of the cluster CA.
func (a *Authenticator) preauthenticate(ctx context.Context, h http.Header) (*auth.Claims, *connect.Error) {
	if authz := h.Get("Authorization"); authz != "" {
		tok, ok := strings.CutPrefix(authz, "Bearer ")
		if !ok {
			return nil, connect.NewError(connect.CodeUnauthenticated, errors.New("Authorization header must be \"Bearer <access token>\""))
		}
		c, err := a.verifyToken(ctx, tok)
		if err != nil {
			return nil, connect.NewError(connect.CodeUnauthenticated, fmt.Errorf("access token rejected: %w", err))
		}
		return &c, nil
	}
	if cn, ok := ctx.Value(certKey{}).(string); ok {
		return &auth.Claims{Subject: "node:" + cn, Role: RoleNode}, nil
	}
	return nil, connect.NewError(connect.CodeUnauthenticated, errors.New("this call needs an access token (Authorization: Bearer ...); log in first"))
}

// deadlineBody cuts a request body at a size and gives it a deadline to
// arrive; the deadline is lifted once the body ended, so long-lived
// response streams are not cut by it.
type deadlineBody struct {
	io.ReadCloser
	rc   *http.ResponseController
	done bool
}

func newDeadlineBody(w http.ResponseWriter, body io.ReadCloser, max int64, timeout time.Duration) io.ReadCloser {
	rc := http.NewResponseController(w)
	if err := rc.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		rc = nil // the connection cannot take a deadline: the size cap still holds
	}
	return &deadlineBody{ReadCloser: http.MaxBytesReader(w, body, max), rc: rc}
}

func (b *deadlineBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && !b.done {
		b.done = true
		if b.rc != nil {
			_ = b.rc.SetReadDeadline(time.Time{})
		}
	}
	return n, err
}
