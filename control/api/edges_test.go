package api_test

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/server"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
)

func edgeClient(t *testing.T, n *clustertest.Node, token string) edgev1connect.EdgeServiceClient {
	return edgev1connect.NewEdgeServiceClient(httpClient(t), url(n), connect.WithInterceptors(bearer(token)))
}

func meshKey(t *testing.T) ed25519.PublicKey {
	t.Helper()
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return pub
}

// liveWatch opens a watch on n once n has caught up (the edge account
// must be there) and reads past its full copy.
func liveWatch(t *testing.T, n *clustertest.Node, token string) *watcher {
	t.Helper()
	if err := n.Server.Node().Barrier(ctxT(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	w := startWatch(t, n, token, 0, true)
	for m := w.next(t); m.GetSnapshotDone() == nil; m = w.next(t) {
	}
	return w
}

func register(t *testing.T, cl edgev1connect.EdgeServiceClient, id, mesh string, key ed25519.PublicKey) *edgev1.RegisterEdgeResponse {
	t.Helper()
	resp, err := cl.RegisterEdge(ctxT(t, 20*time.Second), connect.NewRequest(&edgev1.RegisterEdgeRequest{
		EdgeId: id, MeshAddr: mesh, DeviceAddrs: []string{"127.0.0.1:4433"}, MeshPublicKey: key,
	}))
	if err != nil {
		t.Fatal(err)
	}
	return resp.Msg
}

// RegisterEdge on any node issues a certificate for the edge's key that
// verifies against the one cluster CA, with the edge's names and the
// usages of a mesh link; the member list carries the mesh address.
func TestRegisterEdgeIssuesMeshCertificate(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{Watch: api.WatchConfig{ProgressInterval: 50 * time.Millisecond}})
	edge := c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	follower := c.Nodes[c.Follower()]
	w := liveWatch(t, follower, edge)

	key := meshKey(t)
	before := time.Now()
	resp := register(t, edgeClient(t, follower, edge), "edge-a.eu_1", "10.0.0.1:7443", key)
	after := time.Now()

	caCert, err := x509.ParseCertificate(resp.GetCaCertificate())
	if err != nil {
		t.Fatal(err)
	}
	if !caCert.IsCA || caCert.NotAfter.Before(before.Add(9*365*24*time.Hour)) {
		t.Fatalf("CA certificate: CA %v, valid until %v", caCert.IsCA, caCert.NotAfter)
	}
	cert, err := x509.ParseCertificate(resp.GetMeshCertificate())
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(caCert)
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
			t.Fatalf("certificate does not verify for %v: %v", usage, err)
		}
	}
	if cert.Subject.CommonName != "edge-a.eu_1" || len(cert.URIs) != 1 || cert.URIs[0].String() != "relay-edge://edge-a.eu_1" {
		t.Fatalf("names: CN %q URIs %v", cert.Subject.CommonName, cert.URIs)
	}
	if pub, ok := cert.PublicKey.(ed25519.PublicKey); !ok || !pub.Equal(key) {
		t.Fatal("certificate is not for the edge's key")
	}
	if cert.IsCA || cert.KeyUsage&x509.KeyUsageCertSign != 0 {
		t.Fatal("a mesh certificate can sign certificates")
	}
	if cert.NotBefore.After(before.Add(-50*time.Second)) || cert.NotAfter.Before(before.Add(23*time.Hour)) || cert.NotAfter.After(after.Add(25*time.Hour)) {
		t.Fatalf("validity %v .. %v", cert.NotBefore, cert.NotAfter)
	}
	lease, renew := time.UnixMilli(resp.GetLeaseExpiresAtMs()), time.UnixMilli(resp.GetRenewAfterMs())
	if lease.Before(before.Add(29*time.Second)) || lease.After(after.Add(31*time.Second)) || !renew.Before(lease) || renew.Before(before.Add(9*time.Second)) {
		t.Fatalf("lease until %v, renew after %v (called at %v)", lease, renew, before)
	}

	// The watch carries the member with its mesh address.
	for {
		m := w.next(t)
		if e := m.GetEvent().GetEdgePut(); e != nil {
			if e.GetId() != "edge-a.eu_1" || e.GetMeshAddr() != "10.0.0.1:7443" || len(e.GetAddrs()) != 1 {
				t.Fatalf("edge_put %v", e)
			}
			break
		}
	}

	// Every node issues from the same CA; the CA's key is in no answer.
	ca, err := follower.Server.Node().FSM().ClusterCA()
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range c.Running() {
		r := register(t, edgeClient(t, n, edge), "edge-b", "10.0.0.2:7443", meshKey(t))
		if !bytes.Equal(r.GetCaCertificate(), resp.GetCaCertificate()) {
			t.Fatalf("%s answers another CA", n.ID)
		}
		b, _ := proto.Marshal(r)
		if bytes.Contains(b, ca.GetPrivateSeed()) || bytes.Contains(b, ed25519.NewKeyFromSeed(ca.GetPrivateSeed())) {
			t.Fatal("the CA's private key left the control plane")
		}
	}

	// Malformed registrations name the field.
	cl := edgeClient(t, c.Nodes[0], edge)
	ctx := ctxT(t, 20*time.Second)
	for _, tc := range []struct {
		req   *edgev1.RegisterEdgeRequest
		field string
	}{
		{&edgev1.RegisterEdgeRequest{MeshAddr: "h:1", MeshPublicKey: key}, "edge_id"},
		{&edgev1.RegisterEdgeRequest{EdgeId: "a..b", MeshAddr: "h:1", MeshPublicKey: key}, "edge_id"},
		{&edgev1.RegisterEdgeRequest{EdgeId: "a/b", MeshAddr: "h:1", MeshPublicKey: key}, "edge_id"},
		{&edgev1.RegisterEdgeRequest{EdgeId: "e", MeshAddr: "nohost", MeshPublicKey: key}, "mesh_addr"},
		{&edgev1.RegisterEdgeRequest{EdgeId: "e", MeshAddr: ":7443", MeshPublicKey: key}, "mesh_addr"},
		{&edgev1.RegisterEdgeRequest{EdgeId: "e", MeshAddr: "h:0", MeshPublicKey: key}, "mesh_addr"},
		{&edgev1.RegisterEdgeRequest{EdgeId: "e", MeshAddr: "h:1", DeviceAddrs: []string{"h:1", "x"}, MeshPublicKey: key}, "device_addrs[1]"},
		{&edgev1.RegisterEdgeRequest{EdgeId: "e", MeshAddr: "h:1", MeshPublicKey: key[:31]}, "mesh_public_key"},
	} {
		_, err := cl.RegisterEdge(ctx, connect.NewRequest(tc.req))
		if connect.CodeOf(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("%v: %v, want InvalidArgument naming %s", tc.req, err, tc.field)
		}
	}
	if _, err := cl.DeregisterEdge(ctx, connect.NewRequest(&edgev1.DeregisterEdgeRequest{EdgeId: "a b"})); connect.CodeOf(err) != connect.CodeInvalidArgument {
		t.Errorf("deregister with a bad id: %v", err)
	}
}

// An edge that stops renewing leaves the member list once its lease runs
// out (the leader proposes ExpireEdges); one that renews stays; one that
// deregisters leaves at once.
func TestEdgeLeaseExpires(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{Configure: func(cfg *server.Config) {
		cfg.Edges = api.EdgeConfig{LeaseTTL: time.Second}
		cfg.EdgeExpireEvery = 100 * time.Millisecond
	}})
	edge := c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	follower := c.Nodes[c.Follower()]
	w := liveWatch(t, follower, edge)
	cl := edgeClient(t, follower, edge)
	dead := register(t, cl, "dead", "10.0.0.1:7443", meshKey(t))
	aliveKey := meshKey(t)
	alive := register(t, cl, "alive", "10.0.0.2:7443", aliveKey)
	if time.UnixMilli(dead.GetRenewAfterMs()).After(time.UnixMilli(dead.GetLeaseExpiresAtMs()).Add(-600 * time.Millisecond)) {
		t.Fatalf("renew after %d for a lease until %d", dead.GetRenewAfterMs(), dead.GetLeaseExpiresAtMs())
	}
	// "alive" renews as an edge does, once renew_after has passed; only
	// this goroutine touches `alive` until it reports.
	// The goroutine ends by the test's end whatever happens (cleanup).
	stop, done := make(chan struct{}), make(chan struct{})
	var stopOnce sync.Once
	halt := func() { stopOnce.Do(func() { close(stop) }); <-done }
	t.Cleanup(halt)
	renewals := 0
	go func() {
		defer close(done)
		alive := alive
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			if time.Now().UnixMilli() < alive.GetRenewAfterMs() {
				continue
			}
			resp, err := cl.RegisterEdge(ctxT(t, 10*time.Second), connect.NewRequest(&edgev1.RegisterEdgeRequest{
				EdgeId: "alive", MeshAddr: "10.0.0.2:7443", DeviceAddrs: []string{"127.0.0.1:4433"}, MeshPublicKey: aliveKey,
			}))
			if err != nil {
				t.Error(err)
				return
			}
			alive = resp.Msg
			renewals++
		}
	}()
	var events []string
	for {
		m := w.next(t)
		if e := m.GetEvent().GetEdgePut(); e != nil {
			events = append(events, "put:"+e.GetId())
		}
		if id := m.GetEvent().GetEdgeDeleted(); id != "" {
			if time.Now().UnixMilli() < dead.GetLeaseExpiresAtMs() {
				t.Fatalf("%s deleted before its lease ran out", id)
			}
			events = append(events, "deleted:"+id)
			break
		}
	}
	halt()
	if renewals < 2 {
		t.Fatalf("alive renewed %d times", renewals)
	}
	equalSeq(t, events, []string{"put:dead", "put:alive", "deleted:dead"})
	list, err := follower.Server.Node().FSM().Edges()
	if err != nil || len(list) != 1 || list[0].GetId() != "alive" || list[0].GetMeshAddr() != "10.0.0.2:7443" {
		t.Fatalf("edges after expiry: %v %v", list, err)
	}
	// Renewals that change nothing are not news to watchers; deregistering
	// is, at once; deregistering again is fine.
	ctx := ctxT(t, 20*time.Second)
	for i := 0; i < 2; i++ {
		if _, err := cl.DeregisterEdge(ctx, connect.NewRequest(&edgev1.DeregisterEdgeRequest{EdgeId: "alive"})); err != nil {
			t.Fatal(err)
		}
	}
	for {
		m := w.next(t)
		if e := m.GetEvent().GetEdgePut(); e != nil {
			t.Fatalf("a renewal was sent as %v", e)
		}
		if id := m.GetEvent().GetEdgeDeleted(); id != "" {
			if id != "alive" {
				t.Fatal(id)
			}
			break
		}
	}
}
