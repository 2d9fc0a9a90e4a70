package server_test

import (
	"bytes"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/edge-relay/relay/control/clustertest"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// A node reports its Raft log's fsync latency and the mailboxes' totals
// on /metrics' registry.
func TestDiskMetrics(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	node := c.Nodes[0].Server
	ctx := ctxT(t, time.Minute)
	for _, cmd := range []*statev1.Command{
		{Op: &statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "u1", Login: "u1"}}}},
		{Op: &statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: "d1", UserId: "u1", Name: "a", PublicKey: bytes.Repeat([]byte{1}, 32)}}}},
		{Op: &statev1.Command_PutMailbox{PutMailbox: &statev1.PutMailbox{Entries: []*statev1.MailboxEntry{
			{UserId: "u1", DeviceId: "d1", SenderDeviceId: "d1", EventId: "e1", Event: []byte("12345"), ExpiresAtMs: time.Now().Add(time.Hour).UnixMilli()},
			{UserId: "u1", DeviceId: "d1", SenderDeviceId: "d1", EventId: "e2", Event: []byte("123"), ExpiresAtMs: time.Now().Add(time.Hour).UnixMilli()},
		}}}},
	} {
		if _, err := node.Node().Apply(ctx, cmd); err != nil {
			t.Fatal(err)
		}
	}
	mfs, err := node.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]*dto.Metric{}
	for _, mf := range mfs {
		got[mf.GetName()] = mf.GetMetric()[0]
	}
	fsync := got["relay_control_raft_log_fsync_seconds"].GetHistogram()
	if fsync.GetSampleCount() == 0 || fsync.GetSampleSum() <= 0 {
		t.Fatalf("fsync histogram %v after synced appends", fsync)
	}
	for name, want := range map[string]float64{"relay_control_mailbox_entries": 2, "relay_control_mailbox_bytes": 8, "relay_control_mailbox_devices": 1} {
		if v := got[name].GetGauge().GetValue(); v != want {
			t.Errorf("%s = %v, want %v", name, v, want)
		}
	}
	// Every snapshot result exists before the first snapshot, so
	// increase() sees the first failure.
	if len(getMetric(mfs, "relay_control_snapshots_total")) != 2 {
		t.Fatalf("relay_control_snapshots_total series: %v", getMetric(mfs, "relay_control_snapshots_total"))
	}
}

func getMetric(mfs []*dto.MetricFamily, name string) []*dto.Metric {
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf.GetMetric()
		}
	}
	return nil
}
