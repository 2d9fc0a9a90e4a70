package auth

import (
	"container/list"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// LimiterConfig configures a LoginLimiter.
type LimiterConfig struct {
	// PerLogin / PerLoginBurst: attempts per second and burst for one
	// login name.
	PerLogin      rate.Limit
	PerLoginBurst int
	// PerAddr / PerAddrBurst: the same per client address.
	PerAddr      rate.Limit
	PerAddrBurst int
	// MaxEntries bounds the number of tracked keys; the least recently
	// used is forgotten first. Default 100000.
	MaxEntries int
	// Now is the clock; default time.Now.
	Now func() time.Time
}

// LoginLimiter throttles login attempts per login name and per client
// address with token buckets, in bounded memory. Safe for concurrent use;
// it owns no goroutines.
type LoginLimiter struct {
	cfg LimiterConfig

	mu    sync.Mutex // guards the fields below
	items map[string]*list.Element
	lru   *list.List // front: most recently used
}

type limEntry struct {
	key string
	lim *rate.Limiter
}

// NewLoginLimiter returns a limiter.
func NewLoginLimiter(cfg LimiterConfig) *LoginLimiter {
	if cfg.MaxEntries <= 0 {
		cfg.MaxEntries = 100_000
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &LoginLimiter{cfg: cfg, items: map[string]*list.Element{}, lru: list.New()}
}

func (l *LoginLimiter) limiter(key string, r rate.Limit, burst int) *rate.Limiter {
	if e, ok := l.items[key]; ok {
		l.lru.MoveToFront(e)
		return e.Value.(*limEntry).lim
	}
	for l.lru.Len() >= l.cfg.MaxEntries {
		old := l.lru.Back()
		l.lru.Remove(old)
		delete(l.items, old.Value.(*limEntry).key)
	}
	lim := rate.NewLimiter(r, burst)
	l.items[key] = l.lru.PushFront(&limEntry{key: key, lim: lim})
	return lim
}

// Allow reports whether a login attempt for login from addr may proceed
// now; if not, how long until it may.
func (l *LoginLimiter) Allow(login, addr string) (bool, time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.cfg.Now()
	byLogin := l.limiter("l:"+login, l.cfg.PerLogin, l.cfg.PerLoginBurst)
	byAddr := l.limiter("a:"+addr, l.cfg.PerAddr, l.cfg.PerAddrBurst)
	rl := byLogin.ReserveN(now, 1)
	ra := byAddr.ReserveN(now, 1)
	wait := max(rl.DelayFrom(now), ra.DelayFrom(now))
	if !rl.OK() || !ra.OK() || wait > 0 {
		rl.CancelAt(now)
		ra.CancelAt(now)
		if wait <= 0 {
			wait = time.Second
		}
		return false, wait
	}
	return true, 0
}

// Len returns the number of keys tracked.
func (l *LoginLimiter) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lru.Len()
}
