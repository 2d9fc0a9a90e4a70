// Package auth owns the control plane's credentials: roles, password
// hashing (argon2id), access tokens (JWT signed with Ed25519), opaque
// refresh tokens, the RBAC policy type and login rate limiting. It is a
// leaf package: it knows nothing of Raft or the API's services.
package auth

import (
	"context"
	"errors"
	"fmt"
)

// Role is what a principal may do.
type Role string

// The roles. Staff (admin, operator, viewer) act on every account; a user
// on itself; edge is the edge servers' credential; node is a control
// node calling another (never assigned to an account).
const (
	RoleAdmin    Role = "admin"
	RoleOperator Role = "operator"
	RoleViewer   Role = "viewer"
	RoleUser     Role = "user"
	RoleEdge     Role = "edge"
	RoleNode     Role = "node"
)

// ErrUnknownRole is returned for a role name that is not one of the above.
var ErrUnknownRole = errors.New("unknown role")

// ParseRole parses a stored role name; "" means RoleUser.
func ParseRole(s string) (Role, error) {
	switch Role(s) {
	case "":
		return RoleUser, nil
	case RoleAdmin, RoleOperator, RoleViewer, RoleUser, RoleEdge, RoleNode:
		return Role(s), nil
	}
	return "", fmt.Errorf("%w %q", ErrUnknownRole, s)
}

// IsStaff reports whether the role acts on every account.
func (r Role) IsStaff() bool {
	return r == RoleAdmin || r == RoleOperator || r == RoleViewer
}

type claimsKey struct{}

// WithClaims returns a context carrying the caller's verified claims.
func WithClaims(ctx context.Context, c Claims) context.Context {
	return context.WithValue(ctx, claimsKey{}, c)
}

// ClaimsFrom returns the claims WithClaims stored.
func ClaimsFrom(ctx context.Context) (Claims, bool) {
	c, ok := ctx.Value(claimsKey{}).(Claims)
	return c, ok
}

// Errors of Policy.Check.
var (
	ErrUnauthenticated  = errors.New("unauthenticated")
	ErrPermissionDenied = errors.New("permission denied")
	ErrNoPolicy         = errors.New("no policy entry for procedure")
)

// Policy is an RBAC table: which roles may call which procedure, and
// which procedures need no credentials at all.
type Policy struct {
	Public map[string]bool
	Roles  map[string][]Role
	// OutliveToken names the streaming procedures whose streams may run
	// past their access token's expiry (they still end with the account
	// or session behind it); every other stream ends when its token
	// expires.
	OutliveToken map[string]bool
	// MembersOnly names the procedures a node (RoleNode) may call only
	// while it is a member of the cluster (the API layer checks): a node
	// removed from it keeps the cluster's keys and certificate, and must
	// not write to its log nor lead it.
	MembersOnly map[string]bool
}

// Check decides whether a caller with claims (nil: anonymous) may call
// procedure. A procedure missing from the table is refused: new RPCs are
// closed until someone writes their rule.
func (p Policy) Check(procedure string, claims *Claims) error {
	if p.Public[procedure] {
		return nil
	}
	roles, ok := p.Roles[procedure]
	if !ok {
		return fmt.Errorf("%w %s", ErrNoPolicy, procedure)
	}
	if claims == nil {
		return ErrUnauthenticated
	}
	for _, r := range roles {
		if r == claims.Role {
			return nil
		}
	}
	return fmt.Errorf("%w: role %q may not call %s", ErrPermissionDenied, claims.Role, procedure)
}
