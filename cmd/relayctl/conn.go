package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"
	"time"

	"connectrpc.com/connect"
)

// idempotencyKeyHeader is control/api.IdempotencyKeyHeader (relayctl does
// not link the control plane's packages; a test checks they agree).
const idempotencyKeyHeader = "Idempotency-Key"

// retryMode says when a failed call may be repeated, on the same member
// or another.
type retryMode int

const (
	// retryIfNotSent: only when the request cannot have reached a node
	// (the connection was never made). For calls that must not act twice.
	retryIfNotSent retryMode = iota
	// retryAlways: also after a node took the request and then failed or
	// answered that it cannot now (no leader, outcome unknown). For reads
	// and for writes that carry an Idempotency-Key.
	retryAlways
)

// retryable reports whether err, from a call made in mode, is worth
// trying again.
func retryable(err error, mode retryMode) bool {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return true
	}
	if mode != retryAlways {
		return false
	}
	switch connect.CodeOf(err) {
	case connect.CodeUnavailable, connect.CodeDeadlineExceeded, connect.CodeAborted, connect.CodeUnknown:
		return true
	}
	return false
}

// endpoints are the API URLs a call may go to, in the order tried: the
// --server ones, then the other members of the session's cluster.
func (a *app) endpoints() []string {
	out := append([]string{}, a.servers...)
	if a.sess != nil {
		for _, u := range a.sess.urls() {
			if !contains(out, u) {
				out = append(out, u)
			}
		}
	}
	return out
}

// nodeName names the member behind an API URL, for messages.
func (a *app) nodeName(base string) string {
	if a.sess != nil {
		if id := a.sess.t.MemberIDs[base]; id != "" {
			return "node " + id + " (" + base + ")"
		}
	}
	return base
}

// call runs fn against the cluster's members: the first endpoint, then,
// while the failure is one mode allows retrying, the next ones in turn,
// with a backoff, until it succeeds or the run's --timeout ends. Each
// attempt gets at most a third of the timeout, so a member that stopped
// answering does not take all of it. Failures name the member.
func (a *app) call(ctx context.Context, what string, mode retryMode, fn func(ctx context.Context, base string) error) error {
	a.prepare(ctx)
	return a.callOn(ctx, a.endpoints(), what, mode, fn)
}

func (a *app) callOn(ctx context.Context, eps []string, what string, mode retryMode, fn func(ctx context.Context, base string) error) error {
	ctx, cancel := context.WithTimeout(ctx, a.timeout)
	defer cancel()
	attempt := max(a.timeout/3, time.Second)
	backoff := 100 * time.Millisecond
	var fails failures
	var refused nobodyListens
	for i := 0; ; i++ {
		base := eps[i%len(eps)]
		actx, acancel := context.WithTimeout(ctx, attempt)
		err := fn(actx, base)
		acancel()
		if err == nil {
			if len(fails) > 0 {
				fmt.Fprintf(a.stderr, "relayctl: %s: %s answered, after %s\n", what, a.nodeName(base), fails.String(a))
			}
			return nil
		}
		fails.add(base, err)
		if !retryable(err, mode) || ctx.Err() != nil {
			break
		}
		if grace := max(noListenerGrace, a.timeout/3); refused.add(err, len(eps), time.Now(), grace) {
			return withHint(&callError{msg: fmt.Sprintf("%s: %s", what, fails.String(a)), err: fails.telling()},
				fmt.Sprintf("every member refused the connection for %s: is relayd control running there, and are --server and the session's members right?", grace))
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
		case <-t.C:
		}
		if ctx.Err() != nil {
			break
		}
		backoff = min(2*backoff, 2*time.Second)
	}
	last := fails[len(fails)-1]
	if len(fails) == 1 && last.n == 1 {
		return fmt.Errorf("%s: %s: %w", what, a.nodeName(last.base), last.err)
	}
	return &callError{msg: fmt.Sprintf("%s: no member answered within --timeout %s: %s", what, a.timeout, fails.String(a)), err: fails.telling()}
}

// noListenerGrace is how long at least a call keeps retrying while every
// member refuses the connection (nothing listens at any address it
// knows), a third of --timeout when that is longer: long enough for a
// node that restarts to listen again, and much less than --timeout,
// which a mistyped --server would otherwise wait out.
const noListenerGrace = 5 * time.Second

// nobodyListens tracks a run of attempts that were all refused.
type nobodyListens struct {
	since time.Time // the first refusal of the run; zero: no run
	n     int       // refusals in the run
}

// add counts an attempt's failure and reports whether the call should
// give up: every one of the eps members refused in a run that lasted
// grace.
func (r *nobodyListens) add(err error, eps int, now time.Time, grace time.Duration) bool {
	if !errors.Is(err, syscall.ECONNREFUSED) {
		*r = nobodyListens{}
		return false
	}
	if r.n == 0 {
		r.since = now
	}
	r.n++
	return r.n >= eps && now.Sub(r.since) >= grace
}

// callError reports every member's failure and unwraps to the one that
// tells most (see failures.telling), so that its Connect code still
// tells what went wrong.
type callError struct {
	msg string
	err error
}

func (e *callError) Error() string { return e.msg }
func (e *callError) Unwrap() error { return e.err }

// failures are the failed attempts of a call, one entry per member, the
// member that failed last at the end, with the last error of each; but
// an answer the member sent is kept over a later failure to get one (the
// run's deadline cutting the last attempt short, a refused connection):
// "no leader known" says more than "context deadline exceeded".
type failures []struct {
	base string
	err  error
	n    int
}

func (f *failures) add(base string, err error) {
	for i := range *f {
		if (*f)[i].base == base {
			if !connect.IsWireError((*f)[i].err) || connect.IsWireError(err) {
				(*f)[i].err = err
			}
			(*f)[i].n++
			(*f)[i], (*f)[len(*f)-1] = (*f)[len(*f)-1], (*f)[i] // the last to fail goes last
			return
		}
	}
	*f = append(*f, struct {
		base string
		err  error
		n    int
	}{base, err, 1})
}

// telling is the error that says most of why the call failed: the
// latest a member answered, else the latest of all. (A member down while
// another answers "no leader" is not what an operator must fix first.)
func (f failures) telling() error {
	for i := len(f) - 1; i >= 0; i-- {
		if connect.IsWireError(f[i].err) {
			return f[i].err
		}
	}
	return f[len(f)-1].err
}

func (f failures) String(a *app) string {
	parts := make([]string, 0, len(f))
	for _, x := range f {
		times := ""
		if x.n > 1 {
			times = fmt.Sprintf(" (%d times)", x.n)
		}
		parts = append(parts, fmt.Sprintf("%s failed%s: %v", a.nodeName(x.base), times, x.err))
	}
	return strings.Join(parts, "; ")
}

// keyed marks a write with this run's Idempotency-Key, which makes it
// safe to retry on another member.
func keyed[T any](a *app, m *T) *connect.Request[T] {
	r := connect.NewRequest(m)
	r.Header().Set(idempotencyKeyHeader, a.key)
	return r
}
