package partitiontest

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/internal/relaytest"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
)

// Workload drives the control API with random operations on a few
// accounts and devices, from clients each bound to one control node, and
// records every operation in a History.
type Workload struct {
	s       *relaytest.System
	History *History
	// Initial is each device key's state before the run.
	Initial map[string]objState
	logins  []string
	owner   string   // account owning the devices
	devices []string // device ids
	timeout time.Duration

	mu    sync.Mutex // guards the fields below
	ids   map[string]string
	codes map[string]int // outcome -> count, for the report
	bad   []string       // answers the model does not cover
}

// NewWorkload registers the devices the workload uses (before its
// history starts).
func NewWorkload(s *relaytest.System, logins, devices int, opTimeout time.Duration) *Workload {
	w := &Workload{s: s, History: NewHistory(), Initial: map[string]objState{}, ids: map[string]string{},
		codes: map[string]int{}, timeout: opTimeout}
	for i := range logins {
		w.logins = append(w.logins, fmt.Sprintf("acct%d", i))
	}
	w.owner = s.User("device-owner")
	for i := range devices {
		d := s.Device(w.owner, fmt.Sprintf("dev%d", i))
		w.devices = append(w.devices, d.ID)
		w.Initial["device:"+d.ID] = objState{ID: d.ID, Name: fmt.Sprintf("dev%d", i)}
	}
	return w
}

// Run is one client: operations against node until ctx ends, with think
// times drawn from rng.
func (w *Workload) Run(ctx context.Context, client int, node *relaytest.ControlNode, rng *rand.Rand) {
	users, devices := w.s.Users(node), w.s.Devices(node)
	for seq := 0; ctx.Err() == nil; seq++ {
		if rng.IntN(10) < 3 && len(w.devices) > 0 {
			w.deviceOp(client, node.ID, rng, devices)
		} else {
			w.userOp(client, node.ID, rng, seq, users)
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Duration(rng.IntN(20)) * time.Millisecond):
		}
	}
}

func (w *Workload) userOp(client int, node string, rng *rand.Rand, seq int, users interface {
	CreateUser(context.Context, *connect.Request[controlv1.CreateUserRequest]) (*connect.Response[controlv1.CreateUserResponse], error)
	GetUser(context.Context, *connect.Request[controlv1.GetUserRequest]) (*connect.Response[controlv1.GetUserResponse], error)
	UpdateUser(context.Context, *connect.Request[controlv1.UpdateUserRequest]) (*connect.Response[controlv1.UpdateUserResponse], error)
	DeleteUser(context.Context, *connect.Request[controlv1.DeleteUserRequest]) (*connect.Response[controlv1.DeleteUserResponse], error)
}) {
	login := w.logins[rng.IntN(len(w.logins))]
	key := "user:" + login
	w.mu.Lock()
	id := w.ids[login]
	w.mu.Unlock()
	name := fmt.Sprintf("c%d-%d", client, seq)
	ctx, cancel := context.WithTimeout(context.Background(), w.timeout)
	defer cancel()
	r := rng.IntN(100)
	switch {
	case id == "" || r < 15:
		done := w.History.Invoke(client, Input{Key: key, Kind: OpCreate, Name: name})
		resp, err := users.CreateUser(ctx, relaytest.Admin(w.s, &controlv1.CreateUserRequest{Login: login, DisplayName: name}))
		out := w.outcome(node, OpCreate, err)
		if err == nil {
			out.ID = resp.Msg.GetUser().GetId()
			w.mu.Lock()
			w.ids[login] = out.ID
			w.mu.Unlock()
		}
		done(out)
	case r < 45:
		done := w.History.Invoke(client, Input{Key: key, Kind: OpUpdate, ID: id, Name: name})
		_, err := users.UpdateUser(ctx, relaytest.Admin(w.s, &controlv1.UpdateUserRequest{Id: id, DisplayName: &name}))
		done(w.outcome(node, OpUpdate, err))
	case r < 55:
		done := w.History.Invoke(client, Input{Key: key, Kind: OpDelete, ID: id})
		_, err := users.DeleteUser(ctx, relaytest.Admin(w.s, &controlv1.DeleteUserRequest{Id: id}))
		done(w.outcome(node, OpDelete, err))
	default:
		done := w.History.Invoke(client, Input{Key: key, Kind: OpRead, ID: id})
		resp, err := users.GetUser(ctx, relaytest.Admin(w.s, &controlv1.GetUserRequest{Id: id}))
		out := w.outcome(node, OpRead, err)
		if err == nil {
			out.Name = resp.Msg.GetUser().GetDisplayName()
		}
		if !out.Unknown { // a read that failed tells nothing
			done(out)
		}
	}
}

func (w *Workload) deviceOp(client int, node string, rng *rand.Rand, devices interface {
	ListDevices(context.Context, *connect.Request[controlv1.ListDevicesRequest]) (*connect.Response[controlv1.ListDevicesResponse], error)
	RenameDevice(context.Context, *connect.Request[controlv1.RenameDeviceRequest]) (*connect.Response[controlv1.RenameDeviceResponse], error)
	RevokeDevice(context.Context, *connect.Request[controlv1.RevokeDeviceRequest]) (*connect.Response[controlv1.RevokeDeviceResponse], error)
	DeleteDevice(context.Context, *connect.Request[controlv1.DeleteDeviceRequest]) (*connect.Response[controlv1.DeleteDeviceResponse], error)
}) {
	id := w.devices[rng.IntN(len(w.devices))]
	key := "device:" + id
	ctx, cancel := context.WithTimeout(context.Background(), w.timeout)
	defer cancel()
	r := rng.IntN(100)
	switch {
	case r < 35:
		name := fmt.Sprintf("d%d-%d", client, rng.IntN(1e6))
		done := w.History.Invoke(client, Input{Key: key, Kind: OpUpdate, ID: id, Name: name})
		_, err := devices.RenameDevice(ctx, relaytest.Admin(w.s, &controlv1.RenameDeviceRequest{UserId: w.owner, DeviceId: id, Name: name}))
		done(w.outcome(node, OpUpdate, err))
	case r < 40:
		done := w.History.Invoke(client, Input{Key: key, Kind: OpRevoke, ID: id})
		_, err := devices.RevokeDevice(ctx, relaytest.Admin(w.s, &controlv1.RevokeDeviceRequest{UserId: w.owner, DeviceId: id}))
		done(w.outcome(node, OpRevoke, err))
	case r < 42:
		done := w.History.Invoke(client, Input{Key: key, Kind: OpDelete, ID: id})
		_, err := devices.DeleteDevice(ctx, relaytest.Admin(w.s, &controlv1.DeleteDeviceRequest{UserId: w.owner, DeviceId: id}))
		done(w.outcome(node, OpDelete, err))
	default:
		done := w.History.Invoke(client, Input{Key: key, Kind: OpRead, ID: id})
		resp, err := devices.ListDevices(ctx, relaytest.Admin(w.s, &controlv1.ListDevicesRequest{UserId: w.owner}))
		out := w.outcome(node, OpRead, err)
		if err != nil {
			// A failed read tells nothing; the owner is never deleted, so
			// any other error is one the model flags.
			if out.Err != "" {
				done(out)
			}
			return
		}
		out.NotFound = true
		for _, d := range resp.Msg.GetDevices() {
			if d.GetId() == id {
				out.NotFound, out.Name, out.Revoked = false, d.GetName(), d.GetRevoked()
			}
		}
		done(out)
	}
}

// outcome classifies an API error.
func (w *Workload) outcome(node, kind string, err error) Output {
	var out Output
	code := "ok"
	switch c := connect.CodeOf(err); {
	case err == nil:
	case c == connect.CodeNotFound && kind != OpCreate:
		out.NotFound, code = true, "not_found"
	case c == connect.CodeAlreadyExists && kind == OpCreate:
		out.Exists, code = true, "already_exists"
	case c == connect.CodeUnavailable && certainlyFailed(err):
		// The node made no attempt that may have taken effect (it knew
		// no leader, or a leader refused before proposing: the API says
		// "outcome unknown" otherwise), or the request never left.
		out.Failed, code = true, "unavailable (no effect)"
	case c == connect.CodeUnavailable, c == connect.CodeDeadlineExceeded, c == connect.CodeCanceled, c == connect.CodeUnknown,
		errors.Is(err, context.DeadlineExceeded):
		out.Unknown, code = true, c.String()
	case c == connect.CodeUnimplemented && strings.Contains(err.Error(), "404"):
		// A NotFound whose body the dying server did not finish sending:
		// connect-go then derives the code from the HTTP status (404 ->
		// Unimplemented). The answer was NotFound, but the client cannot
		// tell, so it counts as unknown.
		out.Unknown, code = true, "unimplemented (a cut 404)"
	default:
		out.Err, code = err.Error(), "unexpected "+c.String()
		w.mu.Lock()
		w.bad = append(w.bad, fmt.Sprintf("%s on %s at %s: %v", kind, node, time.Now().Format(time.RFC3339Nano), err))
		w.mu.Unlock()
		out.Unknown = true
	}
	w.mu.Lock()
	w.codes[kind+" "+code]++
	w.mu.Unlock()
	return out
}

// certainlyFailed reports an Unavailable that says no attempt took
// effect.
func certainlyFailed(err error) bool {
	msg := err.Error()
	if strings.Contains(msg, "outcome unknown") {
		return false
	}
	return strings.Contains(msg, "no leader known") || strings.Contains(msg, "connection refused")
}

// Unexpected are the answers outside the model (codes it does not
// expect).
func (w *Workload) Unexpected() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]string(nil), w.bad...)
}

// Summary counts the outcomes by operation and code.
func (w *Workload) Summary() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var parts []string
	for k, v := range w.codes {
		parts = append(parts, fmt.Sprintf("%s=%d", k, v))
	}
	sort.Strings(parts)
	return strings.Join(parts, " ")
}
