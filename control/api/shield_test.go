package api_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/clustertest"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
)

// A caller who is not the cluster's own (a user, or anyone calling
// Login) reads no node's address, store path or library text in the
// failures of a cluster that lost its quorum: a generic message under the
// request id the node answered with, the code unchanged so clients retry
// as before. Staff read the failure as it happened.
func TestInternalFailuresAreShieldedFromPeople(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	admin := c.AdminToken()
	user := c.TokenFor("someone", controlv1.Role_ROLE_USER)
	me := clientsAs(t, c.Nodes[0], user)
	ctx := ctxT(t, 2*time.Minute)
	whoami, err := me.users.GetMe(ctx, connect.NewRequest(&controlv1.GetMeRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	uid := whoami.Msg.GetUser().GetId()
	c.WaitConverged()
	// Two of three nodes gone: the one left has no quorum, no leader it
	// can reach, and answers every write and linearizable read with a
	// failure of its own.
	left := c.Follower()
	for i := range c.Nodes {
		if i != left {
			c.Kill(i)
		}
	}
	n := c.Nodes[left]
	register := func(cl clients) error {
		call, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		_, err := cl.devices.RegisterDevice(call, connect.NewRequest(&controlv1.RegisterDeviceRequest{UserId: uid, Name: "phone", PublicKey: pubKey(t)}))
		return err
	}
	login := func(cl clients) error {
		call, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		_, err := cl.auth.Login(call, connect.NewRequest(&controlv1.LoginRequest{Login: "someone", Password: "password-of-someone"}))
		return err
	}
	shielded := func(what string, err error) {
		t.Helper()
		var ce *connect.Error
		if !errors.As(err, &ce) {
			t.Fatalf("%s: %v, want a Connect error", what, err)
		}
		code := ce.Code()
		if code != connect.CodeUnavailable && code != connect.CodeDeadlineExceeded && code != connect.CodeInternal {
			t.Fatalf("%s: %v, want unavailable, deadline_exceeded or internal", what, err)
		}
		rid := ce.Meta().Get("X-Request-Id")
		if rid == "" {
			t.Fatalf("%s: answered without a request id", what)
		}
		summaries := []string{
			"the control plane failed to serve this call",
			"the control plane cannot serve this call now; retry shortly",
			"the control plane did not finish this call in time; retry shortly",
		}
		for _, s := range summaries {
			if ce.Message() == fmt.Sprintf("%s (request id %s)", s, rid) {
				return
			}
		}
		t.Errorf("%s: the caller read %q, want a generic message with request id %s", what, ce.Message(), rid)
	}
	shielded("a user's write", register(clientsAs(t, n, user)))
	shielded("an anonymous log-in", login(clientsAs(t, n, "")))

	err = register(clientsAs(t, n, admin))
	var ce *connect.Error
	if !errors.As(err, &ce) || (ce.Code() != connect.CodeUnavailable && ce.Code() != connect.CodeDeadlineExceeded) {
		t.Fatalf("an admin's write: %v, want unavailable or deadline_exceeded", err)
	}
	if strings.Contains(ce.Message(), "request id") || !strings.Contains(ce.Message(), "leader") {
		t.Errorf("an admin read %q, want the failure as it happened (no leader)", ce.Message())
	}
}
