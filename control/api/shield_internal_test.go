package api

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/auth"
	"github.com/edge-relay/relay/control/raftnode"
)

// Who reads a failure as it happened: staff, edges and nodes; a user and
// a caller without credentials read the summary. Codes that describe the
// call itself pass unchanged to everyone, and a shielded error keeps its
// code, its metadata and, on the server, what it wraps.
func TestShieldHidesTheClustersInsideFromPeopleOnly(t *testing.T) {
	detail := fmt.Errorf("read index at 10.0.0.7:7400: %w", raftnode.ErrNoLeader)
	failure := func() error {
		ce := connect.NewError(connect.CodeUnavailable, detail)
		ce.Meta().Set("Retry-After", "1")
		return ce
	}
	base := WithRequestID(context.Background(), "rid-1")
	as := func(role auth.Role, subject string) context.Context {
		return auth.WithClaims(base, auth.Claims{Subject: subject, Role: role})
	}
	for _, tc := range []struct {
		name string
		ctx  context.Context
		sees bool
	}{
		{"admin", as(auth.RoleAdmin, "u_a"), true},
		{"operator", as(auth.RoleOperator, "u_o"), true},
		{"viewer", as(auth.RoleViewer, "u_v"), true},
		{"edge", as(auth.RoleEdge, "u_e"), true},
		{"node", as(RoleNode, "node:n2"), true},
		{"node by subject", as("", "node:n2"), true},
		{"user", as(auth.RoleUser, "u_u"), false},
		{"no credentials", base, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := shield(tc.ctx, http.Header{}, failure())
			var ce *connect.Error
			if !errors.As(err, &ce) || ce.Code() != connect.CodeUnavailable {
				t.Fatalf("%v, want unavailable", err)
			}
			if got := ce.Meta().Get("Retry-After"); got != "1" {
				t.Errorf("Retry-After %q, want 1", got)
			}
			if !errors.Is(err, raftnode.ErrNoLeader) {
				t.Error("the shielded error no longer wraps what happened")
			}
			leaks := strings.Contains(ce.Message(), "10.0.0.7")
			if leaks != tc.sees {
				t.Errorf("message %q: shows the detail %v, want %v", ce.Message(), leaks, tc.sees)
			}
			if !tc.sees && ce.Message() != "the control plane cannot serve this call now; retry shortly (request id rid-1)" {
				t.Errorf("message %q", ce.Message())
			}
			if got := Detail(err); !strings.Contains(got.Error(), "10.0.0.7") || connect.CodeOf(got) != connect.CodeUnavailable {
				t.Errorf("Detail gives %v, want the unavailable failure as it happened", got)
			}
		})
	}
	for _, code := range []connect.Code{connect.CodeInternal, connect.CodeUnknown, connect.CodeDataLoss, connect.CodeDeadlineExceeded} {
		err := shield(base, http.Header{}, connect.NewError(code, detail))
		if strings.Contains(err.Error(), "10.0.0.7") || connect.CodeOf(err) != code {
			t.Errorf("%v: %v, want the code with a generic message", code, err)
		}
	}
	for _, code := range []connect.Code{connect.CodeInvalidArgument, connect.CodeNotFound, connect.CodeFailedPrecondition, connect.CodeResourceExhausted, connect.CodePermissionDenied, connect.CodeUnauthenticated, connect.CodeCanceled} {
		in := connect.NewError(code, errors.New("about the request"))
		if out := shield(base, http.Header{}, in); out != error(in) {
			t.Errorf("%v: %v, want it unchanged", code, out)
		}
	}
	if shield(base, http.Header{}, nil) != nil {
		t.Error("no failure became one")
	}
	plain := errors.New("not shielded")
	if Detail(plain) != plain {
		t.Error("Detail changed an error it does not shield")
	}
	if got := (&ShieldedError{Summary: "s"}).Error(); got != "s" {
		t.Errorf("without a request id: %q", got)
	}
}
