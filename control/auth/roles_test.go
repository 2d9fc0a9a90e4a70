package auth

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
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

func TestLoginLimiter(t *testing.T) {
	now := t0
	l := NewLoginLimiter(LimiterConfig{PerLogin: 1, PerLoginBurst: 3, PerAddr: 1, PerAddrBurst: 5, MaxEntries: 100, Now: func() time.Time { return now }})
	for i := 0; i < 3; i++ {
		if ok, _ := l.Allow("alice", "1.1.1.1"); !ok {
			t.Fatalf("attempt %d refused", i)
		}
	}
	ok, retry := l.Allow("alice", "1.1.1.1")
	if ok || retry <= 0 {
		t.Fatalf("4th attempt: ok=%v retry=%v", ok, retry)
	}
	// Another login from the same address still has the address budget.
	if ok, _ := l.Allow("bob", "1.1.1.1"); !ok {
		t.Fatal("bob refused")
	}
	// The address limit is independent of the login: alice's three
	// accepted attempts, bob's and carol's use up its burst of 5 (a
	// refused attempt uses nothing), so dave is refused.
	if ok, _ := l.Allow("carol", "1.1.1.1"); !ok {
		t.Fatal("carol refused")
	}
	if ok, _ := l.Allow("dave", "1.1.1.1"); ok {
		t.Fatal("address over its burst: want refusal")
	}
	now = now.Add(2 * time.Second)
	if ok, _ := l.Allow("alice", "2.2.2.2"); !ok {
		t.Fatal("alice after refill refused")
	}
}

func TestLoginLimiterBoundedAndConcurrent(t *testing.T) {
	l := NewLoginLimiter(LimiterConfig{PerLogin: 1, PerLoginBurst: 1, PerAddr: 1000, PerAddrBurst: 1000, MaxEntries: 1000})
	for i := 0; i < 100_000; i++ {
		l.Allow(fmt.Sprint("user", i), "addr")
	}
	if n := l.Len(); n > 1000 {
		t.Fatalf("%d entries tracked, bound is 1000", n)
	}
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 1000; i++ {
				l.Allow(fmt.Sprint("c", i%50), fmt.Sprint("a", g))
			}
		}(g)
	}
	wg.Wait()
}
