package raftnode_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/raftnode"
	"github.com/edge-relay/relay/control/server"
	"github.com/edge-relay/relay/internal/testcerts"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// With certificates configured, Raft and node-to-node calls use mutual
// TLS: a cluster forms and replicates, and a node whose certificate comes
// from another CA cannot join it.
func TestTLSClusterRefusesForeignCA(t *testing.T) {
	dir := t.TempDir()
	ca, err := testcerts.NewCA(dir, "cluster")
	if err != nil {
		t.Fatal(err)
	}
	other, err := testcerts.NewCA(dir, "other")
	if err != nil {
		t.Fatal(err)
	}
	withCert := func(ca *testcerts.CA, name string, join []string) func(*server.Config) {
		return func(cfg *server.Config) {
			cert, key, err := ca.Issue(name)
			if err != nil {
				t.Fatal(err)
			}
			cfg.CertFile, cfg.KeyFile, cfg.CAFile = cert, key, ca.CertFile
			cfg.Bootstrap = len(join) == 0
			cfg.Join = join
		}
	}
	c := clustertest.Empty(t, clustertest.Options{})
	first := c.StartNode(withCert(ca, "n1", nil))
	c.StartNode(withCert(ca, "n2", []string{first.Server.APIAddr()}))
	c.StartNode(withCert(ca, "n3", []string{first.Server.APIAddr()}))
	c.WaitReady()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for i := 0; i < 10; i++ {
		if _, err := c.CreateUser(ctx, i%3, fmt.Sprintf("tls%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	c.WaitConverged()

	// An intruder with a certificate of another CA: its join call fails
	// the TLS handshake, so Start gives up when its context ends.
	jctx, jcancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer jcancel()
	cert, key, err := other.Issue("intruder")
	if err != nil {
		t.Fatal(err)
	}
	s, err := server.Start(jctx, server.Config{
		NodeID: "intruder", DataDir: t.TempDir(), RaftAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0",
		Join: []string{first.Server.APIAddr()}, CertFile: cert, KeyFile: key, CAFile: other.CertFile,
		Raft: clustertest.FastRaft(),
	})
	if err == nil {
		_ = s.Shutdown(context.Background())
		t.Fatal("a node with a foreign CA's certificate joined the cluster")
	}
	// A node without certificates: the members drop its plaintext, and
	// it says they may speak TLS.
	pctx, pcancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer pcancel()
	s, err = server.Start(pctx, server.Config{
		NodeID: "plain", DataDir: t.TempDir(), RaftAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0",
		Join: []string{first.Server.APIAddr()}, Raft: clustertest.FastRaft(),
	})
	if err == nil {
		_ = s.Shutdown(context.Background())
		t.Fatal("a node without certificates joined a TLS cluster")
	}
	if !strings.Contains(err.Error(), "--tls-cert, --tls-key and --tls-ca") {
		t.Fatalf("a plaintext join of a TLS cluster: %v; want it to name the TLS flags", err)
	}
	if got := c.VoterIDs(c.Leader()); len(got) != 3 {
		t.Fatalf("voters %v, want the 3 original ones", got)
	}

	// A client that trusts the cluster's CA but has neither a certificate
	// of its own nor a token cannot use the node-to-node API to push
	// commands into the log, nor read the cluster status.
	pem, err := os.ReadFile(ca.CertFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	d := api.NewDialer(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13})
	defer d.Close()
	leaderAPI := c.Nodes[c.Leader()].Server.APIAddr()
	_, err = d.Apply(ctx, leaderAPI, []byte{})
	if err == nil || !strings.Contains(err.Error(), "access token") {
		t.Fatalf("PeerService.Apply without credentials: %v", err)
	}
	if _, err := d.Cluster(leaderAPI).Status(ctx, connect.NewRequest(&controlv1.StatusRequest{})); connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("status over TLS without credentials: %v, want Unauthenticated", err)
	}

	// A certificate of the cluster's CA makes a node, not a member (a
	// removed node keeps its certificate): a node outside the cluster may
	// ask its status (to learn it was removed) but not push commands into
	// its log, read an index or take the lead.
	pair, err := ca.IssuePair("ghost")
	if err != nil {
		t.Fatal(err)
	}
	ghost := api.NewDialer(&tls.Config{RootCAs: pool, Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS13})
	defer ghost.Close()
	cmd, err := proto.Marshal(&statev1.Command{RequestId: "ghost-1", Op: &statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{
		User: &statev1.User{Id: "ghost-user", Login: "ghost", DisplayName: "ghost"}}}})
	if err != nil {
		t.Fatal(err)
	}
	// (The dialer reports the refusal as raftnode.ErrRemoved: only a node
	// outside the cluster is refused PeerService.)
	if _, err := ghost.Apply(ctx, leaderAPI, cmd); !errors.Is(err, raftnode.ErrRemoved) || !strings.Contains(err.Error(), "permission_denied: node \"ghost\" is not a member") {
		t.Fatalf("PeerService.Apply from a node outside the cluster: %v, want PermissionDenied (ErrRemoved)", err)
	}
	if _, err := ghost.ReadIndex(ctx, leaderAPI); !errors.Is(err, raftnode.ErrRemoved) {
		t.Fatalf("PeerService.ReadIndex from a node outside the cluster: %v, want PermissionDenied (ErrRemoved)", err)
	}
	if _, err := ghost.Members(ctx, leaderAPI); err != nil {
		t.Fatalf("ClusterService.Status from a node outside the cluster: %v", err)
	}
	if _, err := c.Nodes[c.Leader()].Server.Node().FSM().GetUser("ghost-user"); err == nil {
		t.Fatal("a node outside the cluster wrote to its log")
	}
}

// A graceful stop of the leader hands leadership over before the node is
// gone: when Shutdown returns, another node already leads.
func TestGracefulLeaderShutdownTransfersLeadership(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	l := c.Leader()
	c.Shutdown(l)
	leaders := 0
	for i, n := range c.Nodes {
		if i != l && n.Server.Node().IsLeader() {
			leaders++
		}
	}
	if leaders != 1 {
		t.Fatalf("right after the leader's graceful shutdown, %d nodes lead; want 1 (leadership handed over)", leaders)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.CreateUser(ctx, c.Follower(), "after-handover"); err != nil {
		t.Fatal(err)
	}
}
