package server_test

import (
	"bytes"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/server"
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
	for name, want := range map[string]float64{"relay_control_mailbox_entries": 2, "relay_control_mailbox_bytes": 8, "relay_control_mailbox_devices": 1, "relay_control_mailbox_purging_devices": 0} {
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

// A node reports the size and free space of the filesystems holding its
// data and backup directories, as df(1) counts them; without a backup
// directory there is no "backups" series.
func TestDiskSpaceMetrics(t *testing.T) {
	backups := t.TempDir()
	c := clustertest.Start(t, 1, clustertest.Options{Configure: func(cfg *server.Config) { cfg.BackupDir = backups }})
	node := c.Nodes[0].Server
	got := diskSpace(t, node.Registry())
	for dir, path := range map[string]string{"data": c.Nodes[0].DataDir, "backups": backups} {
		size, avail := df(t, path)
		m := got[dir]
		// Other tests write to the same filesystem meanwhile (and some
		// filesystems, such as ZFS, count its size from what is used).
		const slack = 512 << 20
		if m.size+slack < size || m.size > size+slack {
			t.Errorf("%s: size %d bytes, df says %d", dir, m.size, size)
		}
		if m.avail > m.size || m.avail+slack < avail || m.avail > avail+slack {
			t.Errorf("%s: %d bytes available of %d, df says %d", dir, m.avail, m.size, avail)
		}
	}

	plain := clustertest.Start(t, 1, clustertest.Options{})
	if got := diskSpace(t, plain.Nodes[0].Server.Registry()); len(got) != 1 || got["data"].size == 0 {
		t.Errorf("without a backup directory: %v, want data only", got)
	}
}

type space struct{ avail, size uint64 }

// diskSpace reads relay_control_disk_{avail,size}_bytes by dir.
func diskSpace(t *testing.T, reg *prometheus.Registry) map[string]space {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]space{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			dir := ""
			for _, l := range m.GetLabel() {
				if l.GetName() == "dir" {
					dir = l.GetValue()
				}
			}
			s := out[dir]
			switch mf.GetName() {
			case "relay_control_disk_avail_bytes":
				s.avail = uint64(m.GetGauge().GetValue())
			case "relay_control_disk_size_bytes":
				s.size = uint64(m.GetGauge().GetValue())
			default:
				continue
			}
			out[dir] = s
		}
	}
	return out
}

// df returns the size and the available bytes of the filesystem holding
// path, as coreutils' df reads them (statvfs).
func df(t *testing.T, path string) (size, avail uint64) {
	t.Helper()
	out, err := exec.Command("df", "-B1", "--output=size,avail", path).Output()
	if err != nil {
		t.Fatalf("df: %v", err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	f := strings.Fields(lines[len(lines)-1])
	if len(f) != 2 {
		t.Fatalf("df printed %q", out)
	}
	size, err1 := strconv.ParseUint(f[0], 10, 64)
	avail, err2 := strconv.ParseUint(f[1], 10, 64)
	if err1 != nil || err2 != nil {
		t.Fatalf("df printed %q", out)
	}
	return size, avail
}
