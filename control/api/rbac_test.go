package api_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/auth"
	"github.com/edge-relay/relay/control/clustertest"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	_ "github.com/edge-relay/relay/proto/edge/v1" // registers edge.v1 services
)

// procedures lists every RPC of every service of the control API, from
// the registered proto descriptors, so a new RPC cannot escape the test.
func procedures(t *testing.T) map[string]protoreflect.MethodDescriptor {
	out := map[string]protoreflect.MethodDescriptor{}
	protoregistry.GlobalFiles.RangeFiles(func(fd protoreflect.FileDescriptor) bool {
		pkg := string(fd.Package())
		if pkg != "control.v1" && pkg != "edge.v1" {
			return true
		}
		svcs := fd.Services()
		for i := 0; i < svcs.Len(); i++ {
			ms := svcs.Get(i).Methods()
			for j := 0; j < ms.Len(); j++ {
				m := ms.Get(j)
				out["/"+string(svcs.Get(i).FullName())+"/"+string(m.Name())] = m
			}
		}
		return true
	})
	if len(out) < 20 {
		t.Fatalf("found only %d procedures; descriptors not registered?", len(out))
	}
	return out
}

// Every RPC of every service, called with every role and with no token,
// answers exactly as the policy table says: Unauthenticated without a
// token, PermissionDenied for a role not in its entry, and passes the
// gate (any other code) for a role in it.
func TestRBACMatrix(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	admin := c.AdminToken()
	users := controlv1connect.NewUserServiceClient(httpClient(t), url(c.Nodes[0]), connect.WithInterceptors(bearer(admin)))
	tokens := map[auth.Role]string{auth.RoleAdmin: admin}
	for _, r := range []struct {
		role auth.Role
		api  controlv1.Role
	}{{auth.RoleOperator, controlv1.Role_ROLE_OPERATOR}, {auth.RoleViewer, controlv1.Role_ROLE_VIEWER},
		{auth.RoleUser, controlv1.Role_ROLE_USER}, {auth.RoleEdge, controlv1.Role_ROLE_EDGE}} {
		login := "rbac-" + string(r.role)
		if _, err := users.CreateUser(ctx, connect.NewRequest(&controlv1.CreateUserRequest{Login: login, Password: "password-of-" + login, Role: r.api})); err != nil {
			t.Fatal(err)
		}
		tokens[r.role] = c.Login(login, "password-of-"+login).GetAccessToken()
	}
	nodeTok, err := api.NewAuthenticator(c.Nodes[0].Server.Node(), api.AuthConfig{Password: auth.TestParams}).NodeToken()
	if err != nil {
		t.Fatal(err)
	}
	tokens[api.RoleNode] = nodeTok

	policy := api.Policy()
	procs := procedures(t)
	for proc := range policy.OutliveToken {
		if md, ok := procs[proc]; !ok || !md.IsStreamingServer() || policy.Public[proc] {
			t.Errorf("%s may outlive its token, but is not a streaming procedure that needs one", proc)
		}
	}
	hc := httpClient(t)
	for proc, md := range procs {
		allowed, known := policy.Roles[proc]
		if !known && !policy.Public[proc] {
			t.Errorf("%s has no entry in the RBAC table (api.Policy)", proc)
			continue
		}
		call := func(token string) error {
			cl := connect.NewClient[emptypb.Empty, emptypb.Empty](hc, url(c.Nodes[0])+proc, connect.WithInterceptors(bearer(token)))
			cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
			defer ccancel()
			if md.IsStreamingServer() {
				s, err := cl.CallServerStream(cctx, connect.NewRequest(&emptypb.Empty{}))
				if err != nil {
					return err
				}
				defer s.Close()
				s.Receive()
				return s.Err()
			}
			_, err := cl.CallUnary(cctx, connect.NewRequest(&emptypb.Empty{}))
			return err
		}
		t.Run(strings.TrimPrefix(proc, "/"), func(t *testing.T) {
			err := call("")
			if policy.Public[proc] {
				if c := connect.CodeOf(err); c == connect.CodeUnauthenticated && strings.Contains(err.Error(), "access token") {
					t.Fatalf("public procedure refused without a token: %v", err)
				}
				return
			}
			if connect.CodeOf(err) != connect.CodeUnauthenticated {
				t.Fatalf("no token: got %v (%v), want Unauthenticated", connect.CodeOf(err), err)
			}
			for role, tok := range tokens {
				err := call(tok)
				ok := false
				for _, r := range allowed {
					ok = ok || r == role
				}
				code := connect.CodeOf(err)
				if !ok && code != connect.CodePermissionDenied {
					t.Errorf("role %s: got %v (%v), want PermissionDenied", role, code, err)
				}
				if ok && err != nil && (code == connect.CodePermissionDenied && strings.Contains(err.Error(), "may not call") || code == connect.CodeUnauthenticated || code == connect.CodeUnimplemented) {
					t.Errorf("role %s is allowed but got %v (%v)", role, code, err)
				}
			}
		})
	}
	// A garbage token is rejected before the policy.
	err = func() error {
		cl := controlv1connect.NewUserServiceClient(hc, url(c.Nodes[0]), connect.WithInterceptors(bearer("not.a.token")))
		_, err := cl.GetMe(ctx, connect.NewRequest(&controlv1.GetMeRequest{}))
		return err
	}()
	var ce *connect.Error
	if !errors.As(err, &ce) || ce.Code() != connect.CodeUnauthenticated {
		t.Fatalf("garbage token: %v", err)
	}
}

// The procedures whose answers carry the state's secrets (a backup holds
// the signing keys, the cluster CA's key and the session keys) or replace
// them are an admin's alone: anyone else with a backup could mint an
// admin's token. TestRBACMatrix holds the server to the table; this holds
// the table to that rule.
func TestSecretsAreForAdminsOnly(t *testing.T) {
	policy := api.Policy()
	for _, proc := range []string{
		controlv1connect.ClusterServiceBackupProcedure,
		controlv1connect.KeyServiceRotateSigningKeyProcedure,
		controlv1connect.KeyServiceRotateSessionKeyProcedure,
	} {
		if got := policy.Roles[proc]; !slices.Equal(got, []auth.Role{auth.RoleAdmin}) || policy.Public[proc] {
			t.Errorf("%s is open to %v (public %v), want admins only", proc, got, policy.Public[proc])
		}
	}
}
