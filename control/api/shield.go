package api

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/auth"
)

// requestIDKey holds a request's id in its context (WithRequestID).
type requestIDKey struct{}

// WithRequestID returns ctx carrying rid, the id a request is logged
// and answered under (the control node's X-Request-Id).
func WithRequestID(ctx context.Context, rid string) context.Context {
	return context.WithValue(ctx, requestIDKey{}, rid)
}

// RequestID is the id WithRequestID gave the request of ctx, "" for none.
func RequestID(ctx context.Context) string {
	rid, _ := ctx.Value(requestIDKey{}).(string)
	return rid
}

// shieldedSummary is the message a caller who does not see detail
// (seesDetail) reads for code, and whether code is one whose messages
// describe the cluster's inside rather than the call: a node's address in
// a failed read index or dial, a store's path, a library's text. Every
// other code's message is about the caller's own request (a field, a
// quota, a missing record) and is written for it.
func shieldedSummary(code connect.Code) (string, bool) {
	switch code {
	case connect.CodeInternal, connect.CodeUnknown, connect.CodeDataLoss:
		return "the control plane failed to serve this call", true
	case connect.CodeUnavailable:
		return "the control plane cannot serve this call now; retry shortly", true
	case connect.CodeDeadlineExceeded:
		return "the control plane did not finish this call in time; retry shortly", true
	}
	return "", false
}

// ShieldedError is what a caller who is not the cluster's own (an
// operator, an edge, a control node) sees of a failure inside the
// cluster: a message naming only the code's meaning and the request's
// id, under which the control node logs the detail (at error level for
// an internal failure, at debug level for the others). It wraps the
// detail, so errors.Is and errors.As see through it on the server, and
// Detail gives it to the log.
type ShieldedError struct {
	// RequestID is the id the call was answered under.
	RequestID string
	// Summary is the message the caller reads.
	Summary string
	// Err is the failure as it happened.
	Err error
}

// Error is the message the caller reads.
func (e *ShieldedError) Error() string {
	if e.RequestID == "" {
		return e.Summary
	}
	return fmt.Sprintf("%s (request id %s)", e.Summary, e.RequestID)
}

// Unwrap returns the failure as it happened.
func (e *ShieldedError) Unwrap() error { return e.Err }

// Detail is err as it happened, behind the shield if a ShieldedError
// hides it from the caller: what the control node logs.
func Detail(err error) error {
	var s *ShieldedError
	if errors.As(err, &s) {
		return s.Err
	}
	return err
}

// seesDetail reports whether the caller of a call may read the cluster's
// own failures as they happened: staff (who can list the nodes and their
// addresses anyway), edges and control nodes, known by claims; or, for a
// call without credentials (a log-in), an edge or node on the connection
// it already proved itself on, calling for itself.
func seesDetail(ctx context.Context, h http.Header) bool {
	claims, ok := auth.ClaimsFrom(ctx)
	if !ok {
		return ownCall(ctx, h)
	}
	return slices.Contains(staff, claims.Role) || claims.Role == auth.RoleEdge || isNode(&claims)
}

// shield replaces the message of an error whose code describes the
// cluster's inside by a generic one when the caller is not the cluster's
// own (seesDetail): a user's device, or anyone on the internet through an
// edge's /api/ before a log-in, must learn nothing of the nodes'
// addresses or the stores' paths. The code and the metadata (Retry-After)
// are kept, so clients retry as before.
func shield(ctx context.Context, h http.Header, err error) error {
	if err == nil {
		return nil
	}
	code := connect.CodeOf(err)
	summary, hidden := shieldedSummary(code)
	if !hidden || seesDetail(ctx, h) {
		return err
	}
	out := connect.NewError(code, &ShieldedError{RequestID: RequestID(ctx), Summary: summary, Err: err})
	var ce *connect.Error
	if errors.As(err, &ce) {
		for k, v := range ce.Meta() {
			out.Meta()[k] = append([]string(nil), v...)
		}
	}
	return out
}
