package auth

import (
	"context"
	"errors"
	"testing"
)

func TestRoles(t *testing.T) {
	for s, want := range map[string]Role{"": RoleUser, "admin": RoleAdmin, "operator": RoleOperator, "viewer": RoleViewer, "user": RoleUser, "edge": RoleEdge, "node": RoleNode} {
		r, err := ParseRole(s)
		if err != nil || r != want {
			t.Errorf("ParseRole(%q) = %v, %v", s, r, err)
		}
	}
	if _, err := ParseRole("root"); !errors.Is(err, ErrUnknownRole) {
		t.Fatal(err)
	}
	if !RoleViewer.IsStaff() || RoleUser.IsStaff() || RoleEdge.IsStaff() || RoleNode.IsStaff() {
		t.Fatal("IsStaff")
	}
	ctx := WithClaims(context.Background(), Claims{Subject: "u"})
	if c, ok := ClaimsFrom(ctx); !ok || c.Subject != "u" {
		t.Fatal("claims in context")
	}
	if _, ok := ClaimsFrom(context.Background()); ok {
		t.Fatal("claims from empty context")
	}
}

func TestPolicyCheck(t *testing.T) {
	p := Policy{Public: map[string]bool{"/pub": true}, Roles: map[string][]Role{"/staff": {RoleAdmin, RoleViewer}}}
	admin, user := &Claims{Role: RoleAdmin}, &Claims{Role: RoleUser}
	cases := []struct {
		proc   string
		claims *Claims
		want   error
	}{
		{"/pub", nil, nil},
		{"/pub", user, nil},
		{"/staff", admin, nil},
		{"/staff", user, ErrPermissionDenied},
		{"/staff", nil, ErrUnauthenticated},
		{"/new", admin, ErrNoPolicy},
		{"/new", nil, ErrNoPolicy},
	}
	for _, tc := range cases {
		if err := p.Check(tc.proc, tc.claims); !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
			t.Errorf("Check(%s, %v) = %v, want %v", tc.proc, tc.claims, err, tc.want)
		}
	}
}
