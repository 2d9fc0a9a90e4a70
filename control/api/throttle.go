package api

import (
	"crypto/sha256"
	"net/netip"
	"time"

	"github.com/edge-relay/relay/control/fsm"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// Throttle is the login throttling policy. Failed logins are counted in
// the replicated state, so every node of the cluster sees the same
// counts; see docs/api.md for the rules.
type Throttle struct {
	// AddrFree: failures one client address (an IPv4 address, or the /64
	// of an IPv6 address) may make, across every login, before each
	// further attempt from it must wait. Default 10.
	AddrFree int
	// LoginFree: failures one login may take, from every address, before
	// each further attempt at it must wait, unless it comes from an
	// address that is trusted for the login or has no failures of its
	// own. Default 5.
	LoginFree int
	// LoginCeiling: failures one login may take past which attempts at
	// it from addresses with no failures of their own must wait too, so
	// that guessing it from ever new addresses (an IPv6 /48 holds 65,536
	// /64s) gets about one guess per MaxDelay; only addresses trusted for
	// the login go on at once. Default 100.
	LoginCeiling int
	// BaseDelay is the wait after the first failure past the free ones;
	// it doubles with each further failure, up to MaxDelay. Defaults 1s
	// and 15 minutes.
	BaseDelay, MaxDelay time.Duration
	// Window: failures are forgotten this long after the last one (at
	// least MaxDelay). Default 1 hour.
	Window time.Duration
	// Trust: an address a login succeeded from stays trusted for that
	// login this long. Default 30 days.
	Trust time.Duration
}

func (t *Throttle) applyDefaults() {
	if t.AddrFree <= 0 {
		t.AddrFree = 10
	}
	if t.LoginFree <= 0 {
		t.LoginFree = 5
	}
	if t.LoginCeiling <= 0 {
		t.LoginCeiling = 100
	}
	if t.BaseDelay <= 0 {
		t.BaseDelay = time.Second
	}
	if t.MaxDelay <= 0 {
		t.MaxDelay = 15 * time.Minute
	}
	t.MaxDelay = max(t.MaxDelay, t.BaseDelay)
	if t.Window <= 0 {
		t.Window = time.Hour
	}
	t.Window = max(t.Window, t.MaxDelay)
	if t.Trust <= 0 {
		t.Trust = 30 * 24 * time.Hour
	}
	// Within what apply accepts, so that a configuration cannot make
	// every login fail.
	t.AddrFree, t.LoginFree = min(t.AddrFree, fsm.MaxThrottleFree), min(t.LoginFree, fsm.MaxThrottleFree)
	t.LoginCeiling = min(t.LoginCeiling, fsm.MaxThrottleFree)
	t.Window = min(t.Window, fsm.MaxThrottleWindow*time.Millisecond)
	t.MaxDelay, t.BaseDelay = min(t.MaxDelay, t.Window), min(t.BaseDelay, t.Window)
	t.Trust = min(t.Trust, fsm.MaxThrottleTrust*time.Millisecond)
}

// policy is the policy an attempt carries; the login ceiling only when
// every member of the cluster applies it (ceiling).
func (t Throttle) policy(ceiling bool) *statev1.ThrottlePolicy {
	p := &statev1.ThrottlePolicy{
		AddrFree: uint32(t.AddrFree), LoginFree: uint32(t.LoginFree),
		BaseDelayMs: t.BaseDelay.Milliseconds(), MaxDelayMs: t.MaxDelay.Milliseconds(),
		WindowMs: t.Window.Milliseconds(), TrustMs: t.Trust.Milliseconds(),
	}
	if ceiling {
		p.LoginCeiling = uint32(t.LoginCeiling)
	}
	return p
}

// addrHash is what the throttle records of a client address are kept
// under: a hash (the replicated state and its backups hold no addresses)
// of the address, or of its /64 for IPv6, where one host has many.
func addrHash(addr string) []byte {
	key := addr
	if a, err := netip.ParseAddr(addr); err == nil {
		a = a.Unmap()
		if a.Is6() {
			p, _ := a.Prefix(64)
			key = p.String()
		} else {
			key = a.String()
		}
	}
	h := sha256.Sum256([]byte("relay login address\x00" + key))
	return h[:16]
}
