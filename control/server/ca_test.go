package server_test

import (
	"bytes"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/auth"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/server"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
	"github.com/edge-relay/relay/storage/state"
)

// A new cluster gets its CA with InitCluster: one CA, the same on every
// replica, a long-lived self-signed CA certificate for the stored key.
func TestNewClusterHasOneCA(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	clustertest.Eventually(t, 20*time.Second, func() error {
		_, err := c.Nodes[c.Leader()].Server.Node().FSM().ClusterCA()
		return err
	})
	c.WaitConverged()
	var first []byte
	for _, n := range c.Running() {
		ca, err := n.Server.Node().FSM().ClusterCA()
		if err != nil {
			t.Fatal(err)
		}
		if first == nil {
			first = ca.GetCertificate()
		} else if !bytes.Equal(first, ca.GetCertificate()) {
			t.Fatalf("%s holds another CA", n.ID)
		}
	}
	cert, err := x509.ParseCertificate(first)
	if err != nil {
		t.Fatal(err)
	}
	if err := cert.CheckSignatureFrom(cert); err != nil || !cert.IsCA || time.Until(cert.NotAfter) < 9*365*24*time.Hour {
		t.Fatalf("CA certificate: self-signed %v, CA %v, until %v", err, cert.IsCA, cert.NotAfter)
	}
}

// A cluster initialized before the CA existed (here: restored from such a
// state) gets one from its leader, and edges can register.
func TestClusterWithoutCAGetsOne(t *testing.T) {
	// A state initialized without a CA, written as a backup file.
	st, err := state.Open(state.Config{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	f, err := fsm.New(fsm.Config{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	hash, err := auth.HashPassword(clustertest.AdminPassword, auth.TestParams)
	if err != nil {
		t.Fatal(err)
	}
	sk, _, _ := api.NewSigningKeyCommand(time.Hour)
	ss, _, _ := api.NewSessionKeyCommand(time.Hour)
	data, err := proto.Marshal(&statev1.Command{ProposedAtMs: time.Now().UnixMilli(), Op: &statev1.Command_InitCluster{InitCluster: &statev1.InitCluster{
		Admin:      &statev1.User{Id: "admin", Login: "admin", Role: "admin", PasswordHash: hash, Status: statev1.UserStatus_USER_STATUS_ACTIVE},
		SigningKey: sk.GetRotateSigningKey().GetKey(), SessionKey: ss.GetRotateSessionKey().GetKey(),
	}}})
	if err != nil {
		t.Fatal(err)
	}
	if res := f.Apply(&raft.Log{Index: 1, Term: 1, Type: raft.LogCommand, Data: data}).(*statev1.Result); !res.GetInitialized() {
		t.Fatal(res)
	}
	var buf bytes.Buffer
	if _, err := f.WriteBackup(&buf); err != nil {
		t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "no-ca.bin")
	if err := os.WriteFile(file, buf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}

	c := clustertest.Empty(t, clustertest.Options{})
	n := c.StartNode(func(cfg *server.Config) { cfg.RestoreFrom = file })
	c.WaitReady()
	clustertest.Eventually(t, 20*time.Second, func() error {
		ca, err := n.Server.Node().FSM().ClusterCA()
		if err != nil {
			return fmt.Errorf("no CA yet: %w", err)
		}
		if _, err := x509.ParseCertificate(ca.GetCertificate()); err != nil {
			return err
		}
		return nil
	})
	c.AddNode()
	c.WaitReady()
	c.WaitConverged()

	token := c.TokenFor("edges", controlv1.Role_ROLE_EDGE)
	d := api.NewDialer(nil)
	defer d.Close()
	cl := edgev1connect.NewEdgeServiceClient(d.HTTPClient(), d.URL(c.Nodes[1].Server.APIAddr()))
	req := connect.NewRequest(&edgev1.RegisterEdgeRequest{EdgeId: "e1", MeshAddr: "127.0.0.1:7443", MeshPublicKey: make([]byte, 32)})
	req.Header().Set("Authorization", "Bearer "+token)
	resp, err := cl.RegisterEdge(ctxT(t, 20*time.Second), req)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := c.Nodes[1].Server.Node().FSM().ClusterCA()
	if !bytes.Equal(resp.Msg.GetCaCertificate(), ca.GetCertificate()) {
		t.Fatal("registration answered another CA")
	}
}
