package fsm

import (
	"bytes"
	"errors"
	"slices"

	"google.golang.org/protobuf/proto"

	statev1 "github.com/edge-relay/relay/proto/state/v1"
	"github.com/edge-relay/relay/storage/state"
)

// Bounds of a login throttling policy and of its records.
const (
	AddrHashLen       = 16
	MaxThrottleFree   = 10_000
	MaxThrottleWindow = 30 * 24 * 3600 * 1000 // ms
	MaxThrottleTrust  = 400 * 24 * 3600 * 1000
	MaxTrustedAddrs   = 8
)

func validPolicy(p *statev1.ThrottlePolicy) error {
	switch {
	case p == nil:
		return invalid("policy is missing")
	case p.GetAddrFree() > MaxThrottleFree || p.GetLoginFree() > MaxThrottleFree:
		return invalid("policy: at most %d free failures", MaxThrottleFree)
	case p.GetBaseDelayMs() <= 0 || p.GetMaxDelayMs() < p.GetBaseDelayMs():
		return invalid("policy: want 0 < base_delay_ms <= max_delay_ms")
	case p.GetWindowMs() < p.GetMaxDelayMs() || p.GetWindowMs() > MaxThrottleWindow:
		return invalid("policy: want max_delay_ms <= window_ms <= %d", MaxThrottleWindow)
	case p.GetTrustMs() < 0 || p.GetTrustMs() > MaxThrottleTrust:
		return invalid("policy: want 0 <= trust_ms <= %d", MaxThrottleTrust)
	case p.GetLoginCeiling() > MaxThrottleFree:
		return invalid("policy: login_ceiling at most %d", MaxThrottleFree)
	}
	return nil
}

// ValidateLoginAttempt checks a LoginAttempt as apply does.
func ValidateLoginAttempt(a *statev1.LoginAttempt) error {
	if err := ValidateText("login", a.GetLogin(), MaxLoginLen, true); err != nil {
		return asInvalid(err)
	}
	if len(a.GetAddrHash()) != AddrHashLen {
		return invalid("addr_hash is %d bytes, want %d", len(a.GetAddrHash()), AddrHashLen)
	}
	return validPolicy(a.GetPolicy())
}

// current returns the failures of a record as they count at now: none
// once the window after the last one has passed.
func current(r *statev1.LoginThrottle, p *statev1.ThrottlePolicy, now int64) uint32 {
	if r == nil || now-r.GetLastFailureMs() > p.GetWindowMs() {
		return 0
	}
	return r.GetFailures()
}

// blockedUntil is when a record with failures lets the next attempt
// through: at once while it has fewer than free, else the last failure
// plus a delay that doubles with each failure past the free ones.
func blockedUntil(r *statev1.LoginThrottle, failures, free uint32, p *statev1.ThrottlePolicy) int64 {
	if failures == 0 || failures < free {
		return 0
	}
	d := p.GetBaseDelayMs()
	for i := free; i < failures && d < p.GetMaxDelayMs(); i++ {
		d *= 2
	}
	return r.GetLastFailureMs() + min(d, p.GetMaxDelayMs())
}

// trusted reports whether a login succeeded from the address within the
// trust period.
func trusted(login *statev1.LoginThrottle, hash []byte, p *statev1.ThrottlePolicy, now int64) bool {
	for _, t := range login.GetTrusted() {
		if bytes.Equal(t.GetAddrHash(), hash) && now-t.GetLastSuccessMs() <= p.GetTrustMs() {
			return true
		}
	}
	return false
}

// throttleDecision decides an attempt: how long it must wait (0: it may
// proceed), and whether it counts against its login. An address's own
// failures always apply. Its login's apply unless the address is trusted
// for it (a login succeeded from there) or clean (no failures of its own
// in the window) while the login has taken fewer failures than its
// ceiling (policy.login_ceiling, when set). So guessing from one address
// stops after its free failures; guessing one login from many addresses
// gets, once the login's free failures are used, one guess per fresh
// address, and past the ceiling no more than the login's own waits let
// through (about one per max_delay_ms); and the owner, from an address it
// used before, always gets in, and from one that is not guessing, too,
// until the login's failures reach the ceiling.
func throttleDecision(addr, login *statev1.LoginThrottle, a *statev1.LoginAttempt, now int64) (waitMs int64, countLogin bool) {
	p := a.GetPolicy()
	trust := trusted(login, a.GetAddrHash(), p, now)
	af := current(addr, p, now)
	until := blockedUntil(addr, af, p.GetAddrFree(), p)
	lf := current(login, p, now)
	besieged := p.GetLoginCeiling() > 0 && lf >= p.GetLoginCeiling()
	if (af > 0 || besieged) && !trust {
		until = max(until, blockedUntil(login, lf, p.GetLoginFree(), p))
	}
	return max(0, until-now), !trust
}

// readThrottle loads a throttle record; nil when absent.
func readThrottle(r state.Reader, key []byte) (*statev1.LoginThrottle, error) {
	v, err := r.Get(key)
	if errors.Is(err, state.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var rec statev1.LoginThrottle
	if err := proto.Unmarshal(v, &rec); err != nil {
		return nil, err
	}
	return &rec, nil
}

// LoginWait answers, from this replica's state, how long a login attempt
// must wait before it may proceed (0: it may). The API asks it before it
// proposes the LoginAttempt, so throttled attempts cost no Raft write;
// apply decides again.
func (f *FSM) LoginWait(a *statev1.LoginAttempt, now int64) (int64, error) {
	if err := ValidateLoginAttempt(a); err != nil {
		return 0, err
	}
	addr, err := readThrottle(f.store, throttleAddrKey(a.GetAddrHash()))
	if err != nil {
		return 0, err
	}
	login, err := readThrottle(f.store, throttleLoginKey(a.GetLogin()))
	if err != nil {
		return 0, err
	}
	wait, _ := throttleDecision(addr, login, a, now)
	return wait, nil
}

// putThrottle writes a record with its expiry (the later of the end of
// its failure window and of its last trust), moving its pruning index.
func (t *txn) putThrottle(key []byte, r *statev1.LoginThrottle, p *statev1.ThrottlePolicy) error {
	if r.ExpiresAtMs != 0 {
		if err := t.b.Delete(throttleExpiryKey(r.ExpiresAtMs, key)); err != nil {
			return err
		}
	}
	r.Key = string(key[len(prefixThrottle):])
	r.ExpiresAtMs = r.LastFailureMs + p.GetWindowMs()
	for _, tr := range r.Trusted {
		r.ExpiresAtMs = max(r.ExpiresAtMs, tr.GetLastSuccessMs()+p.GetTrustMs())
	}
	if err := t.put(key, r); err != nil {
		return err
	}
	return t.b.Set(throttleExpiryKey(r.ExpiresAtMs, key), nil)
}

// loginAttempt decides an attempt and, when it may proceed, counts it as
// a failure of its address and (when they apply) of its login, until
// IssueRefreshToken.succeeded gives them back.
func (t *txn) loginAttempt(a *statev1.LoginAttempt) (*statev1.Result, error) {
	if err := ValidateLoginAttempt(a); err != nil {
		return nil, err
	}
	p := a.GetPolicy()
	ak, lk := throttleAddrKey(a.GetAddrHash()), throttleLoginKey(a.GetLogin())
	addr, err := readThrottle(t.b, ak)
	if err != nil {
		return nil, err
	}
	login, err := readThrottle(t.b, lk)
	if err != nil {
		return nil, err
	}
	wait, countLogin := throttleDecision(addr, login, a, t.now)
	if wait > 0 {
		return &statev1.Result{RetryAfterMs: wait}, nil
	}
	fail := func(key []byte, r *statev1.LoginThrottle) error {
		if r == nil {
			r = &statev1.LoginThrottle{}
		}
		r.Failures = current(r, p, t.now) + 1
		r.LastFailureMs = t.now
		return t.putThrottle(key, r, p)
	}
	if err := fail(ak, addr); err != nil {
		return nil, err
	}
	if countLogin {
		if err := fail(lk, login); err != nil {
			return nil, err
		}
	}
	return &statev1.Result{}, nil
}

// loginSucceeded gives back the failure an attempt reserved for its
// address and trusts the address for the login. The login's failures
// stay: a success of the owner must not hand a guesser a fresh budget.
func (t *txn) loginSucceeded(a *statev1.LoginAttempt) error {
	p := a.GetPolicy()
	ak, lk := throttleAddrKey(a.GetAddrHash()), throttleLoginKey(a.GetLogin())
	addr, err := readThrottle(t.b, ak)
	if err != nil {
		return err
	}
	if addr != nil && current(addr, p, t.now) > 0 {
		addr.Failures = current(addr, p, t.now) - 1
		if err := t.putThrottle(ak, addr, p); err != nil {
			return err
		}
	}
	login, err := readThrottle(t.b, lk)
	if err != nil {
		return err
	}
	if login == nil {
		login = &statev1.LoginThrottle{}
	}
	if current(login, p, t.now) > 0 && !trusted(login, a.GetAddrHash(), p, t.now) {
		login.Failures = current(login, p, t.now) - 1 // the attempt counted against it
	}
	login.Trusted = slices.DeleteFunc(login.Trusted, func(tr *statev1.TrustedAddress) bool {
		return bytes.Equal(tr.GetAddrHash(), a.GetAddrHash()) || t.now-tr.GetLastSuccessMs() > p.GetTrustMs()
	})
	login.Trusted = append(login.Trusted, &statev1.TrustedAddress{AddrHash: a.GetAddrHash(), LastSuccessMs: t.now})
	if n := len(login.Trusted); n > MaxTrustedAddrs {
		login.Trusted = login.Trusted[n-MaxTrustedAddrs:]
	}
	return t.putThrottle(lk, login, p)
}

// pruneThrottle drops the throttle records that expired before now.
func (t *txn) pruneThrottle() error {
	if t.now <= 0 {
		return nil
	}
	end := throttleExpiryKey(t.now, nil)
	var keys [][]byte
	err := t.b.Iterate(prefixThrottleExp, end, func(k, _ []byte) (bool, error) {
		if rest, ok := timedSuffix(k, prefixThrottleExp); ok {
			keys = append(keys, bytes.Clone(rest))
		}
		return true, nil
	})
	if err != nil {
		return err
	}
	for _, k := range keys {
		if err := t.b.Delete(k); err != nil {
			return err
		}
	}
	return t.b.DeleteRange(prefixThrottleExp, end)
}
