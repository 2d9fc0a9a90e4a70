package controlconn_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"connectrpc.com/connect"
	"go.uber.org/goleak"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/edge/controlconn"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		goleak.IgnoreTopFunction("github.com/cockroachdb/pebble/v2/internal/cache.(*shard).releaseLoop"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
	)
}

func createAccount(t *testing.T, c *clustertest.Cluster, login, password string, role controlv1.Role) {
	t.Helper()
	d := api.NewDialer(nil)
	defer d.Close()
	req := connect.NewRequest(&controlv1.CreateUserRequest{Login: login, Password: password, Role: role})
	req.Header().Set("Authorization", "Bearer "+c.AdminToken())
	if _, err := controlv1connect.NewUserServiceClient(d.HTTPClient(), d.URL(c.Nodes[0].Server.APIAddr())).CreateUser(context.Background(), req); err != nil {
		t.Fatal(err)
	}
}

// The edge logs in, refreshes its token when little of it is left,
// skips a control URL that does not answer, and is refused plainly with
// a wrong password or an account that is not an edge's.
func TestCredentialAndFailover(t *testing.T) {
	// Access tokens shorter than the minute of margin: every Token call
	// after the first refreshes.
	c := clustertest.Start(t, 1, clustertest.Options{Auth: api.AuthConfig{AccessTTL: 30 * time.Second}})
	createAccount(t, c, "edges", "edge-password-1", controlv1.Role_ROLE_EDGE)
	createAccount(t, c, "person", "person-password", controlv1.Role_ROLE_USER)
	d := api.NewDialer(nil)
	defer d.Close()
	live := d.URL(c.Nodes[0].Server.APIAddr())
	dead := "http://127.0.0.1:1"

	cc, err := controlconn.New(controlconn.Config{URLs: []string{dead, live}, Login: "edges", Password: "edge-password-1"})
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	t1, err := cc.Token(ctx)
	if err != nil {
		t.Fatalf("token through a dead and a live URL: %v", err)
	}
	t2, err := cc.Token(ctx)
	if err != nil || t2 == t1 {
		t.Fatalf("refresh: %v (same token: %v)", err, t2 == t1)
	}
	// The watch feed and activity reports work with it.
	stream, err := cc.Watch().Watch(ctx, connect.NewRequest(&edgev1.WatchRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	if !stream.Receive() || stream.Msg().GetResync() == nil {
		t.Fatalf("watch: %v %v", stream.Msg(), stream.Err())
	}
	_ = stream.Close()
	if err := cc.ReportActivity(ctx, nil); err != nil {
		t.Fatal(err)
	}

	for _, bad := range []controlconn.Config{
		{URLs: []string{live}, Login: "edges", Password: "wrong-password"},
		{URLs: []string{live}, Login: "person", Password: "person-password"},
	} {
		cc, err := controlconn.New(bad)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := cc.Token(ctx); err == nil {
			t.Fatalf("%s logged in as an edge", bad.Login)
		}
		cc.Close()
	}
	if _, err := controlconn.New(controlconn.Config{URLs: []string{"ftp://x"}, Login: "a", Password: "b"}); err == nil {
		t.Fatal("accepted an ftp URL")
	}
	var ce *connect.Error
	_, err = controlconn.New(controlconn.Config{})
	if err == nil || errors.As(err, &ce) {
		t.Fatalf("empty config: %v", err)
	}
}
