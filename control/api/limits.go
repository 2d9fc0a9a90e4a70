package api

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/edge-relay/relay/control/auth"
	"github.com/edge-relay/relay/internal/connbound"
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
	// MaxUnauthenticated is how many calls without credentials may be
	// served on the node at once, once their bodies have arrived; more
	// are refused at once with resource_exhausted. Calls an edge or a
	// node makes on its own trusted connection have as many again of
	// their own, so that nobody else's logins can keep an edge from
	// refreshing its token. Default 32.
	MaxUnauthenticated int
	// MaxUnauthenticatedPerSource is how many calls without credentials
	// one source (an IPv4 address, an IPv6 /64; for a call an edge passes
	// on, the browser's) may have arriving at once, their bodies still
	// being read; and four times MaxUnauthenticated may be arriving from
	// all sources. Beyond either they are refused with
	// resource_exhausted. Default 4.
	MaxUnauthenticatedPerSource int
	// MaxCallsPerAccount is how many calls one account that is not an
	// edge's (a person's: admin, operator, viewer, user) may have in
	// flight on the node at once, their bodies arriving or served (a
	// backup stream's whole length); more are refused at once with
	// resource_exhausted. With the bodies of such calls taken only
	// uncompressed, it bounds what one account's holder can make the node
	// hold by what it sends: without it, the calls of its connections'
	// HTTP/2 streams had no bound. Edges and nodes are not bounded here.
	// Default 64.
	MaxCallsPerAccount int
	// PublicBodyTimeout is how long the body of a call without
	// credentials may take to arrive. It is read whole before the call
	// takes one of MaxUnauthenticated, so a caller that sends it slowly
	// holds only its own source's share. Default 5s.
	PublicBodyTimeout time.Duration
	// BodyTimeout is how long any other request body may take to arrive.
	// Default 30s.
	BodyTimeout time.Duration
	// WriteByteTimeout is how long an HTTP/2 connection may take none of
	// what the node has to write to it before the node closes it
	// [DefaultWriteByteTimeout]. A stream's own write deadline (a mailbox
	// fetch's answer, a watch message) cannot end a stream while the
	// connection's writer is stuck on a peer whose TCP window stays shut:
	// its reset waits behind the stuck write.
	WriteByteTimeout time.Duration
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
	if l.MaxUnauthenticatedPerSource <= 0 {
		l.MaxUnauthenticatedPerSource = 4
	}
	if l.MaxCallsPerAccount <= 0 {
		l.MaxCallsPerAccount = 64
	}
	if l.PublicBodyTimeout <= 0 {
		l.PublicBodyTimeout = 5 * time.Second
	}
	if l.BodyTimeout <= 0 {
		l.BodyTimeout = 30 * time.Second
	}
	if l.WriteByteTimeout <= 0 {
		l.WriteByteTimeout = DefaultWriteByteTimeout
	}
}

// DefaultWriteByteTimeout is Limits.WriteByteTimeout's default.
const DefaultWriteByteTimeout = 30 * time.Second

// WithDefaults returns l with every zero field at its default.
func (l Limits) WithDefaults() Limits {
	l.applyDefaults()
	return l
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
// call to a public procedure (Login, Refresh) is read whole within
// Limits.PublicBodyTimeout, holding one of its source's
// Limits.MaxUnauthenticatedPerSource meanwhile, and only then takes one
// of Limits.MaxUnauthenticated slots to be served, or is refused; every
// other call is authorized first (its role's access to the procedure,
// its account and session), a person's takes one of its account's
// Limits.MaxCallsPerAccount places and its body is taken uncompressed
// only, and its body is cut at its procedure's size limit and must arrive
// within Limits.BodyTimeout. The claims it verified travel to the Authenticator
// in the context, so a token is verified once. Wrap the API's HTTP
// handler with it (inside WithClientCert).
func (a *Authenticator) Guard(next http.Handler, limits Limits) http.Handler {
	limits.applyDefaults()
	slots := make(chan struct{}, limits.MaxUnauthenticated)
	perAccount := newGate[string](limits.MaxCallsPerAccount, math.MaxInt)
	reserve := make(chan struct{}, limits.MaxUnauthenticated)
	arriving := newGate[netip.Addr](limits.MaxUnauthenticatedPerSource, 4*limits.MaxUnauthenticated)
	inFlight := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "relay_control_unauthenticated_in_flight",
		Help: "Calls without credentials (logins, refreshes) under way now: their bodies arriving, or served (edges' and nodes' own included).",
	}, func() float64 { return float64(arriving.len() + len(slots) + len(reserve)) })
	refused := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "relay_control_requests_refused_total",
		Help: "Requests refused before they were served, by reason: busy (too many calls without credentials arriving from the caller's source or from all, or being served), unauthenticated (no credentials that verify, or their account or session is gone), forbidden (the caller's role may not call the procedure), account_busy (the caller's account has MaxCallsPerAccount calls in flight), compressed (a person's request body was compressed), slow_body (the body of a call without credentials did not arrive in time).",
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
		switch err.Code() {
		case connect.CodeResourceExhausted:
			status = http.StatusTooManyRequests
		case connect.CodeDeadlineExceeded:
			status = http.StatusRequestTimeout
		case connect.CodePermissionDenied:
			status = http.StatusForbidden
		case connect.CodeInternal:
			status = http.StatusInternalServerError
		}
		http.Error(w, err.Message(), status)
	}
	busy := func(w http.ResponseWriter, r *http.Request, format string, args ...any) {
		refused.WithLabelValues("busy").Inc()
		err := connect.NewError(connect.CodeResourceExhausted, fmt.Errorf(format, args...))
		err.Meta().Set("Retry-After", "1")
		refuse(w, r, err)
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
		// A body as sent may be a little larger than its message: gzip
		// adds a few bytes per block to data that does not compress.
		max := limits.messageLimit(procedure)
		max += max/64 + 1024
		if a.policy.Public[procedure] {
			// An edge's or a node's own call on its trusted connection
			// is served from the reserve; anyone else's body counts
			// against its source while it arrives.
			pool := slots
			if ownCall(ctx, r.Header) {
				pool = reserve
			}
			body, reason, err := a.readPublicBody(w, r, limits, arriving, pool == slots, max)
			if err != nil {
				if reason != "" {
					refused.WithLabelValues(reason).Inc()
				}
				if reason == "busy" {
					err.Meta().Set("Retry-After", "1")
				}
				refuse(w, r, err)
				return
			}
			r.Body = io.NopCloser(bytes.NewReader(body))
			select {
			case pool <- struct{}{}:
				defer func() { <-pool }()
			default:
				busy(w, r, "too many calls without credentials in flight on this node (%d); retry shortly", limits.MaxUnauthenticated)
				return
			}
			next.ServeHTTP(w, r)
			return
		}
		claims, err := a.preauthenticate(ctx, r.Header)
		if err == nil {
			// Before the body: a caller that may not call the procedure
			// (a user's token on an edge's bulk call), or whose account
			// or session is gone, must not have a body of the
			// procedure's size read and decompressed first.
			err = a.authorize(ctx, procedure, claims)
		}
		if err != nil {
			reason := "unauthenticated"
			if err.Code() == connect.CodePermissionDenied {
				reason = "forbidden"
			}
			refused.WithLabelValues(reason).Inc()
			refuse(w, r, err)
			return
		}
		if person(claims) {
			// A person's body is taken as sent: inflated, a few KiB
			// would each make the node hold the procedure's limit.
			if enc := requestEncoding(r); enc != "" {
				refused.WithLabelValues("compressed").Inc()
				refuse(w, r, connect.NewError(connect.CodeUnimplemented, fmt.Errorf("request bodies compressed with %q are taken from edges and control nodes only: send it uncompressed", enc)))
				return
			}
			if perAccount.enter(claims.Subject) != gateEntered {
				refused.WithLabelValues("account_busy").Inc()
				err := connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("this account has %d calls in flight on this node, the most it may; retry when one ends", limits.MaxCallsPerAccount))
				err.Meta().Set("Retry-After", "1")
				refuse(w, r, err)
				return
			}
			defer perAccount.leave(claims.Subject)
		}
		r = r.WithContext(context.WithValue(ctx, preauthKey{}, claims))
		r.Body = newDeadlineBody(w, r.Body, max, limits.BodyTimeout)
		next.ServeHTTP(w, r)
	})
}

// person reports whether claims are a person's (any account's but an
// edge's), not an edge's or a control node's.
func person(c *auth.Claims) bool { return !isNode(c) && c.Role != auth.RoleEdge }

// requestEncoding is the compression a request's message says it is in
// (its Connect, Connect streaming or gRPC header, or a Connect GET's
// compression parameter), "" for none.
func requestEncoding(r *http.Request) string {
	for _, k := range []string{"Content-Encoding", "Connect-Content-Encoding", "Grpc-Encoding"} {
		if v := r.Header.Get(k); v != "" && v != "identity" {
			return v
		}
	}
	if r.Method == http.MethodGet {
		if v := r.URL.Query().Get("compression"); v != "" && v != "identity" {
			return v
		}
	}
	return ""
}

// ownCall reports whether a call is an edge's or a node's own, on its
// trusted connection: not one an edge passes on for a browser, which
// carries the X-Forwarded-For the edge's proxy always sets (and its
// Relay-Forwarded-By, when the edge has a token to vouch with).
func ownCall(ctx context.Context, h http.Header) bool {
	c, ok := connbound.FromContext(ctx)
	return ok && c.State() == connbound.Trusted &&
		h.Get(ForwardedByHeader) == "" && h.Get("X-Forwarded-For") == ""
}

// sourceOf is the source a request counts against: the browser's
// address an edge passed the call on for (when the edge's token in
// Relay-Forwarded-By verifies), else its connection's, or its remote
// address's when it came on a connection connbound does not know; an
// IPv4 address or an IPv6 /64.
func (a *Authenticator) sourceOf(ctx context.Context, r *http.Request) netip.Addr {
	addr := r.RemoteAddr
	if r.Header.Get(ForwardedByHeader) != "" {
		if fwd, ok := a.forwardedFor(ctx, r.Header); ok {
			addr = net.JoinHostPort(fwd, "0")
		}
	} else if c, ok := connbound.FromContext(ctx); ok {
		return c.Source()
	}
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return netip.Addr{}
	}
	return connbound.SourceOf(net.UDPAddrFromAddrPort(ap))
}

// readPublicBody reads the body of a call without credentials, of at
// most max bytes as it arrives (its buffer grows with what came, never
// to a length the caller declared), within Limits.PublicBodyTimeout;
// while it arrives, a call that counts (not an edge's or node's own)
// holds one of its source's share of arriving, or is refused. reason is
// the refusal's label of relay_control_requests_refused_total, if any.
func (a *Authenticator) readPublicBody(w http.ResponseWriter, r *http.Request, limits Limits, arriving *gate[netip.Addr], counts bool, max int64) (body []byte, reason string, _ *connect.Error) {
	if counts {
		src := a.sourceOf(r.Context(), r)
		switch arriving.enter(src) {
		case gateSourceFull:
			return nil, "busy", connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("too many calls without credentials arriving from %s (%d); retry shortly", src, limits.MaxUnauthenticatedPerSource))
		case gateFull:
			return nil, "busy", connect.NewError(connect.CodeResourceExhausted, errors.New("too many calls without credentials arriving on this node; retry shortly"))
		}
		defer arriving.leave(src)
	}
	b, err := io.ReadAll(newDeadlineBody(w, r.Body, max, limits.PublicBodyTimeout))
	var tooLarge *http.MaxBytesError
	switch {
	case err == nil:
		return b, "", nil
	case errors.As(err, &tooLarge):
		return nil, "", connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("request body larger than configured max of %d bytes", max))
	case errors.Is(err, os.ErrDeadlineExceeded):
		return nil, "slow_body", connect.NewError(connect.CodeDeadlineExceeded, fmt.Errorf("request body did not arrive within %v", limits.PublicBodyTimeout))
	}
	return nil, "", connect.NewError(connect.CodeCanceled, fmt.Errorf("read request body: %w", err))
}

// gateResult is what gate.enter decided.
type gateResult int

const (
	gateEntered    gateResult = iota
	gateSourceFull            // the key's share is taken
	gateFull
)

// gate counts calls under way by key (a source, an account), bounded per
// key and in all.
type gate[K comparable] struct {
	perKey, total int

	mu    sync.Mutex // guards the fields below
	n     int
	count map[K]int
}

func newGate[K comparable](perKey, total int) *gate[K] {
	return &gate[K]{perKey: perKey, total: total, count: map[K]int{}}
}

func (g *gate[K]) enter(k K) gateResult {
	g.mu.Lock()
	defer g.mu.Unlock()
	switch {
	case g.count[k] >= g.perKey:
		return gateSourceFull
	case g.n >= g.total:
		return gateFull
	}
	g.count[k]++
	g.n++
	return gateEntered
}

func (g *gate[K]) len() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.n
}

func (g *gate[K]) leave(k K) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.n--
	if g.count[k]--; g.count[k] <= 0 {
		delete(g.count, k)
	}
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
