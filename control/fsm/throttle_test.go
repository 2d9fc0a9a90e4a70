package fsm

import (
	"bytes"
	"fmt"
	"testing"

	"github.com/edge-relay/relay/control/auth"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// addr is an address hash; its bytes are not UTF-8, as real ones are not.
func addr(b byte) []byte { return bytes.Repeat([]byte{0x80 | b}, AddrHashLen) }

// throttler drives LoginAttempt and IssueRefreshToken.succeeded as the
// API does, on an FSM whose clock is its command count (1 ms each).
type throttler struct {
	*applier
	t      *testing.T
	policy *statev1.ThrottlePolicy
	logins int
}

func (th *throttler) attempt(login string, a []byte) *statev1.LoginAttempt {
	return &statev1.LoginAttempt{Login: login, AddrHash: a, Policy: th.policy}
}

// try makes an attempt and returns how long it must wait (0: it passed
// and counts as a failure).
func (th *throttler) try(login string, a []byte) int64 {
	th.t.Helper()
	at := th.attempt(login, a)
	local, err := th.f.LoginWait(at, 1_000_000+int64(th.idx)+1)
	if err != nil {
		th.t.Fatal(err)
	}
	r := th.apply(&statev1.Command_LoginAttempt{LoginAttempt: at})
	if r.GetCode() != statev1.ResultCode_RESULT_CODE_OK {
		th.t.Fatalf("attempt: %v", r)
	}
	if local != r.GetRetryAfterMs() {
		th.t.Fatalf("LoginWait said %d, apply %d", local, r.GetRetryAfterMs())
	}
	return r.GetRetryAfterMs()
}

// succeed makes an attempt that passes and logs in.
func (th *throttler) succeed(uid, login string, a []byte) {
	th.t.Helper()
	if w := th.try(login, a); w != 0 {
		th.t.Fatalf("login of %s must wait %d ms", login, w)
	}
	th.logins++
	id := string(rune('a' + th.logins))
	r := th.apply(&statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{
		Token: tok("t"+id, "f"+id, uid, byte(th.logins), 1<<50), Succeeded: th.attempt(login, a)}})
	if r.GetCode() != statev1.ResultCode_RESULT_CODE_OK {
		th.t.Fatalf("issue: %v", r)
	}
}

func (th *throttler) records() int {
	n := 0
	_ = th.f.store.Iterate(prefixThrottle, prefixEnd(prefixThrottle), func(_, _ []byte) (bool, error) { n++; return true, nil })
	return n
}

func TestLoginThrottle(t *testing.T) {
	f := newFSM(t, Config{PruneEvery: 64})
	th := &throttler{applier: &applier{t: t, f: f}, t: t, policy: &statev1.ThrottlePolicy{
		AddrFree: 3, LoginFree: 2, BaseDelayMs: 10, MaxDelayMs: 40, WindowMs: 200, TrustMs: 1000,
	}}
	th.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "alice", Login: "alice"}}})
	owner, attacker := addr(1), addr(2)
	th.succeed("alice", "alice", owner)

	// One address trying many logins: its 3 free failures, then waits
	// that double (10, 20, 40 ms) up to the cap.
	spray := addr(3)
	for i := range 3 {
		if w := th.try(fmt.Sprint("login", i), spray); w != 0 {
			t.Fatalf("free failure %d must wait %d", i, w)
		}
	}
	for i, want := range []int64{10, 20, 40, 40} {
		w := th.try(fmt.Sprint("other", i), spray)
		if w < want-1 || w > want {
			t.Fatalf("after a failure past the free ones: wait %d, want about %d", w, want)
		}
		th.advanceTo(1_000_000 + int64(th.idx) + w)
		if w := th.try(fmt.Sprint("next", i), spray); w != 0 {
			t.Fatalf("attempt after waiting: wait %d", w)
		}
	}
	// One address guessing one login: the login's 2 free failures, then
	// it waits, although the address has free failures left.
	for i := range 2 {
		if w := th.try("alice", attacker); w != 0 {
			t.Fatalf("free failure %d at alice must wait %d", i, w)
		}
	}
	if w := th.try("alice", attacker); w == 0 {
		t.Fatal("a third guess at alice got through")
	}
	// The owner, from the address it logged in from before, is not held
	// back by alice's failures; the attacker still is.
	th.succeed("alice", "alice", owner)
	if w := th.try("alice", attacker); w == 0 {
		t.Fatal("the guessing address got through right after its failure")
	}

	// Many addresses, one guess each, at bob: once bob's free failures
	// are used, a clean address still gets its one attempt, an address
	// that failed before (on any login) waits, and a trusted one passes.
	th.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "bob", Login: "bob"}}})
	bobHome := addr(9)
	th.succeed("bob", "bob", bobHome)
	for i := range 4 {
		if w := th.try("bob", addr(byte(10+i))); w != 0 {
			t.Fatalf("clean address %d must wait %d", i, w)
		}
	}
	if w := th.try("bob", addr(10)); w == 0 {
		t.Fatal("an address that failed at bob got through while bob is being guessed")
	}
	if w := th.try("bob", addr(99)); w != 0 {
		t.Fatalf("a clean address must wait %d", w)
	}
	th.succeed("bob", "bob", bobHome) // the owner from home
	// A successful login gives its reserved failure back: an address
	// that only logs in is never throttled.
	for range 10 {
		th.succeed("bob", "bob", bobHome)
	}

	// Failures are forgotten after the window; expired records are
	// pruned at the next pruning revision, trusted ones after their trust.
	before := th.records()
	th.advanceTo(1_000_000 + int64(th.idx) + 201)
	if w := th.try("alice", attacker); w != 0 {
		t.Fatalf("failures outlived the window: wait %d", w)
	}
	th.advanceTo(1_000_000 + int64(th.idx) + 1001 + 64)
	if n := th.records(); n != 0 {
		t.Fatalf("%d throttle records left after every window and trust ended (%d before)", n, before)
	}

	// Malformed attempts are refused whole.
	for name, at := range map[string]*statev1.LoginAttempt{
		"short hash":   {Login: "alice", AddrHash: []byte{1}, Policy: th.policy},
		"no policy":    {Login: "alice", AddrHash: owner},
		"no login":     {AddrHash: owner, Policy: th.policy},
		"window < max": {Login: "alice", AddrHash: owner, Policy: &statev1.ThrottlePolicy{BaseDelayMs: 10, MaxDelayMs: 40, WindowMs: 20}},
		"no delay":     {Login: "alice", AddrHash: owner, Policy: &statev1.ThrottlePolicy{WindowMs: 20}},
	} {
		if r := th.apply(&statev1.Command_LoginAttempt{LoginAttempt: at}); r.GetCode() != statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT {
			t.Errorf("%s: %v", name, r)
		}
		if r := th.apply(&statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{
			Token: tok("tz", "fz", "alice", 1, 1<<50), Succeeded: at}}); r.GetCode() != statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT {
			t.Errorf("issue with %s: %v", name, r)
		}
	}
}

// A password change made with the current password (ChangePassword)
// applies only while the account still has the hash that was checked,
// so two changes that raced on the same old password cannot both pass;
// and, succeeding, it gives back the failure its check reserved, as a
// login does: an owner who changes its password is not throttled for it.
func TestPasswordChangeWithTheCurrentPassword(t *testing.T) {
	f := newFSM(t, Config{})
	th := &throttler{applier: &applier{t: t, f: f}, t: t, policy: &statev1.ThrottlePolicy{
		AddrFree: 100, LoginFree: 2, BaseDelayMs: 1 << 30, MaxDelayMs: 1 << 30, WindowMs: 1 << 30, TrustMs: 1,
	}}
	first, err := auth.HashPassword("the first password", auth.TestParams)
	if err != nil {
		t.Fatal(err)
	}
	second, err := auth.HashPassword("the second password", auth.TestParams)
	if err != nil {
		t.Fatal(err)
	}
	th.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "carol", Login: "carol", PasswordHash: first}}})
	home := addr(1)
	change := func(expect, to string, from []byte) *statev1.Result {
		t.Helper()
		if w := th.try("carol", from); w != 0 {
			t.Fatalf("the change's check must wait %d ms", w)
		}
		return th.apply(&statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{
			Id: "carol", Fields: []string{"password_hash"}, User: &statev1.User{PasswordHash: to},
			Succeeded: th.attempt("carol", from), ExpectPasswordHash: expect,
		}})
	}
	// More changes than the login's free failures: each gives its back.
	for i := range 3 {
		if r := change(first, second, home); r.GetCode() != statev1.ResultCode_RESULT_CODE_OK {
			t.Fatalf("change %d: %v", i, r)
		}
		if r := change(second, first, home); r.GetCode() != statev1.ResultCode_RESULT_CODE_OK {
			t.Fatalf("change %d back: %v", i, r)
		}
	}
	// The losing change of a race checked a hash that is gone (made
	// from an address the account has not logged in from).
	if r := change(second, second, addr(2)); r.GetCode() != statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION {
		t.Fatalf("a change checked against a replaced hash: %v, want FAILED_PRECONDITION", r)
	}
	if u, err := f.GetUser("carol"); err != nil || u.GetPasswordHash() != first {
		t.Fatalf("the refused change changed the password: %v", err)
	}
	// The refused change kept its reserved failure: one more and the
	// login's two free failures are used, so an address that failed
	// once waits (without the kept one the login would have one left).
	th.try("carol", addr(3))
	if w := th.try("carol", addr(3)); w == 0 {
		t.Fatal("a guess at carol got through past the login's free failures")
	}
	if r := th.apply(&statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "carol", Fields: []string{"display_name"},
		Succeeded: &statev1.LoginAttempt{Login: "carol"}}}); r.GetCode() != statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT {
		t.Fatalf("a malformed succeeded attempt: %v, want INVALID_ARGUMENT", r)
	}

	// What ended the caller's standing between its check and this entry
	// wins: its session revoked (or another account's), the account
	// disabled. A change from an open session keeps it and ends the rest.
	far := int64(1 << 50)
	th.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "dave", Login: "dave"}}})
	for i, tk := range []*statev1.RefreshToken{tok("c1", "f-carol", "carol", 1, far), tok("c2", "f-carol-2", "carol", 2, far), tok("d1", "f-dave", "dave", 3, far)} {
		if r := th.apply(&statev1.Command_IssueRefreshToken{IssueRefreshToken: &statev1.IssueRefreshToken{Token: tk}}); r.GetCode() != statev1.ResultCode_RESULT_CODE_OK {
			t.Fatalf("issue %d: %v", i, r)
		}
	}
	th.apply(&statev1.Command_RevokeTokenFamily{RevokeTokenFamily: &statev1.RevokeTokenFamily{FamilyId: "f-carol-2", UserId: "carol", Reason: "logout"}})
	fromSession := func(session string, fields ...string) *statev1.Result {
		return th.apply(&statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{
			Id: "carol", Fields: fields, User: &statev1.User{PasswordHash: second, DisplayName: "C"},
			KeepSessionId: session, Succeeded: th.attempt("carol", home), ExpectPasswordHash: first,
		}})
	}
	for _, tc := range []struct {
		name    string
		session string
		fields  []string
		want    statev1.ResultCode
	}{
		{"a revoked session", "f-carol-2", []string{"password_hash"}, statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION},
		{"another account's session", "f-dave", []string{"password_hash"}, statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION},
		{"a session that never was", "f-none", []string{"password_hash"}, statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION},
		{"more than the password", "f-carol", []string{"password_hash", "display_name"}, statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT},
	} {
		if r := fromSession(tc.session, tc.fields...); r.GetCode() != tc.want {
			t.Errorf("a change from %s: %v, want %v", tc.name, r, tc.want)
		}
	}
	if r := th.apply(&statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "carol", Fields: []string{"password_hash"},
		User: &statev1.User{PasswordHash: second}, Succeeded: th.attempt("carol", home)}}); r.GetCode() != statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT {
		t.Errorf("a change naming no checked hash: %v, want INVALID_ARGUMENT", r)
	}
	if u, err := f.GetUser("carol"); err != nil || u.GetPasswordHash() != first {
		t.Fatalf("a refused change changed the password: %v", err)
	}
	if r := fromSession("f-carol", "password_hash"); r.GetCode() != statev1.ResultCode_RESULT_CODE_OK {
		t.Fatalf("a change from an open session: %v", r)
	}
	if fam, err := f.GetTokenFamily("f-carol"); err != nil || fam.GetRevoked() {
		t.Fatalf("the caller's session after its change: %v (%v)", fam, err)
	}
	th.apply(&statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "carol", Fields: []string{"status"}, User: &statev1.User{Status: statev1.UserStatus_USER_STATUS_DISABLED}}})
	if r := th.apply(&statev1.Command_UpdateUser{UpdateUser: &statev1.UpdateUser{Id: "carol", Fields: []string{"password_hash"},
		User: &statev1.User{PasswordHash: first}, Succeeded: th.attempt("carol", home), ExpectPasswordHash: second}}); r.GetCode() != statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION {
		t.Errorf("a change to a disabled account: %v, want FAILED_PRECONDITION", r)
	}
}

// Past its ceiling, a login guessed from ever new addresses lets a clean
// address through only as its own waits do; an address trusted for it
// goes on at once. Without a ceiling (the policy of releases before
// it), every clean address gets its guess.
func TestLoginCeiling(t *testing.T) {
	for _, ceiling := range []uint32{0, 4} {
		t.Run(fmt.Sprint("ceiling ", ceiling), func(t *testing.T) {
			f := newFSM(t, Config{})
			th := &throttler{applier: &applier{t: t, f: f}, t: t, policy: &statev1.ThrottlePolicy{
				AddrFree: 3, LoginFree: 2, LoginCeiling: ceiling, BaseDelayMs: 10, MaxDelayMs: 80, WindowMs: 10_000, TrustMs: 100_000,
			}}
			th.apply(&statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "carol", Login: "carol"}}})
			home := addr(1)
			th.succeed("carol", "carol", home)
			fresh := byte(10)
			guess := func() int64 {
				fresh++
				return th.try("carol", addr(fresh))
			}
			for i := range 4 { // up to the ceiling, each clean address guesses
				if w := guess(); w != 0 {
					t.Fatalf("clean address %d must wait %d", i, w)
				}
			}
			w := guess()
			if ceiling == 0 {
				for i := range 20 {
					if w != 0 {
						t.Fatalf("without a ceiling, clean address %d must wait %d", 5+i, w)
					}
					w = guess()
				}
				return
			}
			// carol has 4 failures, 2 past her free ones: 40 ms after the last.
			if w < 39 || w > 40 {
				t.Fatalf("a clean address past the ceiling: wait %d, want about 40", w)
			}
			th.succeed("carol", "carol", home) // the owner from home
			th.advanceTo(1_000_000 + int64(th.idx) + w)
			if w := guess(); w != 0 {
				t.Fatalf("a clean address once the login's wait passed: wait %d", w)
			}
			if w := guess(); w < 79 || w > 80 {
				t.Fatalf("the next clean address: wait %d, want about 80 (doubled)", w)
			}
		})
	}
}
