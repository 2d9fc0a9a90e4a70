package main

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/clustertest"
)

// A typo in a command under a group fails, as one at the top level does,
// instead of printing the group's help and succeeding; the group alone
// still prints its help and succeeds.
func TestUnknownSubcommandFails(t *testing.T) {
	srv, r, env := adminLoggedIn(t)

	for _, args := range [][]string{
		{"user", "lst"}, {"relay", "sned"}, {"device", "nosuch"}, {"keys", "nosuch"}, {"cluster", "nosuch"},
		{"user", "lst", "-o", "json"}, {"-o", "json", "cluster", "statuss"}, {"completion", "bsh"},
	} {
		out, _, err := runEnv(t, env, args...)
		if err == nil || !strings.Contains(err.Error(), "unknown command") {
			t.Errorf("relayctl %s: %v, printed %q; want an unknown command error", strings.Join(args, " "), err, out)
		}
		if strings.Contains(out, "Usage:") {
			t.Errorf("relayctl %s printed its help: %q", strings.Join(args, " "), out)
		}
	}
	if _, _, err := runEnv(t, env, "user", "lst"); err == nil || !strings.Contains(err.Error(), `"lst" for "relayctl user"; did you mean`) || !strings.Contains(err.Error(), "list?") || !strings.Contains(err.Error(), "relayctl user --help") {
		t.Errorf("user lst: %v; want it to name the command and suggest list", err)
	}
	for _, args := range [][]string{{"user"}, {"device"}, {"keys"}, {"cluster"}, {"relay"}, {"completion"}, {"user", "--help"}, {"device", "-h"}} {
		out, _, err := runEnv(t, env, args...)
		if err != nil || !strings.Contains(out, "Usage:") || !strings.Contains(out, "Available Commands:") {
			t.Errorf("relayctl %s: %v, printed %q; want its help", strings.Join(args, " "), err, out)
		}
	}
	// The commands themselves still work.
	if v := r.json(srv, "", "user", "me"); v["id"] != "admin" {
		t.Errorf("user me: %v", v)
	}
}

// A device command run by staff without --user looks under the staff's
// own account; when that finds nothing, it says where the device may be.
func TestDeviceCommandsWithoutUserSayWhereToLook(t *testing.T) {
	srv, r, env := adminLoggedIn(t)
	erin, _ := r.json(srv, "", "user", "create", "--login", "erin", "--no-password")["id"].(string)
	dev, _ := r.json(srv, "", "device", "register", "--user", erin, "--name", "phone", "--generate-key", filepath.Join(t.TempDir(), "phone.key"))["id"].(string)
	if erin == "" || dev == "" {
		t.Fatalf("user %q, device %q", erin, dev)
	}
	const hint = "a device is looked up under --user, by default your own account"
	for _, args := range [][]string{{"device", "revoke", dev}, {"device", "rename", dev, "tablet"}, {"device", "delete", dev}} {
		_, _, err := runEnv(t, env, args...)
		if connect.CodeOf(err) != connect.CodeNotFound || !strings.Contains(oneLine(err), hint) {
			t.Errorf("relayctl %s without --user: %v; want not found with the hint %q", strings.Join(args, " "), err, hint)
		}
	}
	out, stderr, err := runEnv(t, env, "device", "list")
	if err != nil || strings.Contains(out, dev) || !strings.Contains(stderr, hint) {
		t.Errorf("device list without --user: %v, printed %q and %q; want no devices and the hint on stderr", err, out, stderr)
	}
	// Named with --user, the device is found, and no hint is given.
	out, stderr, err = runEnv(t, env, "device", "list", "--user", erin)
	if err != nil || !strings.Contains(out, dev) || strings.Contains(stderr, hint) {
		t.Errorf("device list --user: %v, printed %q and %q", err, out, stderr)
	}
	if v := r.json(srv, "", "device", "revoke", dev, "--user", erin); v["revoked"] != true {
		t.Errorf("device revoke --user: %v", v)
	}
	// A device that exists nowhere, named with --user: no hint about --user.
	_, _, err = runEnv(t, env, "device", "revoke", "d_nosuch", "--user", erin)
	if connect.CodeOf(err) != connect.CodeNotFound || strings.Contains(oneLine(err), hint) {
		t.Errorf("device revoke --user of no device: %v", err)
	}

	// An account of role user may not name another account: the hint
	// about --user would send it nowhere.
	r.must(srv, "password-of-frank\n", "user", "create", "--login", "frank", "--password-stdin", "--role", "user")
	frank := newCLI(t)
	frank.must(srv, "password-of-frank\n", "login", "--password-stdin", "frank")
	fenv := map[string]string{"RELAYCTL_CONFIG_DIR": frank.dir, "RELAYCTL_SERVER": "http://" + srv}
	_, _, err = runEnv(t, fenv, "device", "revoke", dev)
	if connect.CodeOf(err) != connect.CodeNotFound || strings.Contains(oneLine(err), hint) {
		t.Errorf("a user's device revoke of another's device: %v; want not found without the hint", err)
	}
	_, stderr, err = runEnv(t, fenv, "device", "list")
	if err != nil || strings.Contains(stderr, hint) {
		t.Errorf("a user's device list: %v, printed %q; want no hint", err, stderr)
	}
}

// A refused login does not tell the user to log in; a refused
// RELAYCTL_TOKEN says it is that token, which logging in would not
// replace.
func TestUnauthenticatedHints(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	srv := c.Nodes[0].Server.APIAddr()
	r := newCLI(t)
	env := map[string]string{"RELAYCTL_CONFIG_DIR": r.dir, "RELAYCTL_SERVER": "http://" + srv}
	withToken := map[string]string{"RELAYCTL_TOKEN": "not-a-token"}
	for k, v := range env {
		withToken[k] = v
	}

	for _, e := range []map[string]string{env, withToken} {
		var out strings.Builder
		err := run(t.Context(), []string{"login", "--password-stdin", "admin"}, strings.NewReader("wrong password\n"), &out, &out, func(k string) string { return e[k] })
		msg := oneLine(err)
		if connect.CodeOf(err) != connect.CodeUnauthenticated || strings.Contains(msg, "run relayctl login") || strings.Contains(msg, "RELAYCTL_TOKEN") ||
			!strings.Contains(msg, "check the login name and the password") {
			t.Errorf("login with a wrong password (RELAYCTL_TOKEN %q): %s", e["RELAYCTL_TOKEN"], msg)
		}
	}

	_, _, err := runEnv(t, withToken, "user", "me")
	msg := oneLine(err)
	if connect.CodeOf(err) != connect.CodeUnauthenticated || strings.Contains(msg, "run relayctl login") || !strings.Contains(msg, "the access token in RELAYCTL_TOKEN was refused") {
		t.Errorf("user me with a bad RELAYCTL_TOKEN: %s", msg)
	}
	// Without the variable, not logged in: log in.
	_, _, err = runEnv(t, env, "user", "me")
	if msg := oneLine(err); connect.CodeOf(err) != connect.CodeUnauthenticated || !strings.HasSuffix(msg, "(run relayctl login)") {
		t.Errorf("user me, not logged in: %s", msg)
	}
	// A good token in the variable works, and the hint is not added to
	// errors of other kinds.
	r.must(srv, clustertest.AdminPassword+"\n", "login", "--password-stdin", "admin")
	tok := strings.TrimSpace(r.must(srv, "", "token"))
	good := map[string]string{"RELAYCTL_TOKEN": tok, "RELAYCTL_SERVER": "http://" + srv, "RELAYCTL_CONFIG_DIR": t.TempDir()}
	if _, _, err := runEnv(t, good, "user", "me"); err != nil {
		t.Fatalf("user me with a good RELAYCTL_TOKEN: %v", err)
	}
	_, _, err = runEnv(t, good, "user", "get", "nosuch")
	if _, hinted := errors.AsType[*hintedError](err); connect.CodeOf(err) != connect.CodeNotFound || hinted {
		t.Errorf("user get of no user with RELAYCTL_TOKEN: %v; want not found, without a hint", err)
	}
}
