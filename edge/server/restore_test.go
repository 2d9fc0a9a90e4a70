package server_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	controlserver "github.com/edge-relay/relay/control/server"
	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/internal/relaytest"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// putMailbox stores one event from a for b as another edge would.
func putMailbox(t *testing.T, apiAddr, token string, a, b relaytest.Device, id, payload string) {
	t.Helper()
	ev, err := proto.Marshal(&relayv1.Event{Id: id, SenderDeviceId: a.ID, Targets: []string{b.ID}, Seq: 1,
		CreatedAtMs: time.Now().UnixMilli(), TtlMs: time.Hour.Milliseconds(), Payload: []byte(payload)})
	if err != nil {
		t.Fatal(err)
	}
	d := api.NewDialer(nil)
	defer d.Close()
	mb := edgev1connect.NewMailboxServiceClient(d.HTTPClient(), d.URL(apiAddr))
	req := connect.NewRequest(&edgev1.PutMailboxRequest{Entries: []*edgev1.MailboxEntry{{
		DeviceId: b.ID, UserId: b.UserID, SenderDeviceId: a.ID, EventId: id, Event: ev, ExpiresAtMs: time.Now().Add(time.Hour).UnixMilli(),
	}}})
	req.Header().Set("Authorization", "Bearer "+token)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	resp, err := mb.PutMailbox(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if st := resp.Msg.GetResults()[0].GetStatus(); st != edgev1.MailboxStatus_MAILBOX_STATUS_STORED {
		t.Fatalf("put %s: %v", id, st)
	}
}

// After the control plane is restored from a backup older than what a
// connected device already received, mailbox sequence numbers start again
// from the backup's. An entry stored then, with a sequence number the
// device's session had already passed, still reaches the device: the
// edge sees the revisions go back and sends every session away to start
// afresh (the device reconnects by itself).
func TestAnEntryStoredAfterARestoreReachesAConnectedDevice(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{
		Edge: func(_ int, cfg *server.Config) { cfg.DrainWindow = 100 * time.Millisecond },
	})
	u := r.User("restored")
	a, b := r.Device(u, "a"), r.Device(u, "b")
	token := r.Cluster.TokenFor("edge-other", controlv1.Role_ROLE_EDGE)
	old := r.Cluster.Nodes[0]
	apiAddr := old.Server.APIAddr()

	// The backup: b's mailbox has had nothing yet.
	file := filepath.Join(t.TempDir(), "backup.bin")
	f, err := os.Create(file)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := old.Server.Node().FSM().WriteBackup(f); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}

	// b gets three entries from its mailbox (seqs 1 to 3) and acknowledges
	// them.
	for i := range 3 {
		putMailbox(t, apiAddr, token, a, b, fmt.Sprintf("before-%d", i), "")
	}
	cb := r.Dial(0, b, client.QUIC)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for i := range 3 {
		ev, err := cb.Receive(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("before-%d", i); ev.ID != want {
			t.Fatalf("b received %q, want %q", ev.ID, want)
		}
	}

	// The cluster is rebuilt from the backup at the same address.
	r.Cluster.Stop()
	restored := clustertest.Empty(t, clustertest.Options{})
	restored.StartNode(func(cfg *controlserver.Config) { cfg.RestoreFrom, cfg.APIAddr = file, apiAddr })
	restored.WaitReady()

	// Stored in the restored history: seq 1 again, which b's session had
	// passed.
	putMailbox(t, apiAddr, token, a, b, "after-restore", "")
	rctx, rcancel := context.WithTimeout(ctx, 30*time.Second)
	defer rcancel()
	for {
		ev, err := cb.Receive(rctx)
		if err != nil {
			t.Fatalf("b did not receive the entry stored after the restore: %v", err)
		}
		if ev.ID == "after-restore" {
			break
		}
		// The restored mailbox has nothing else; anything before it
		// would be a redelivery, which the client drops.
		t.Fatalf("b received %q", ev.ID)
	}
}
