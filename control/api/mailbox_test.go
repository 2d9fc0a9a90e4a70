package api_test

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/server"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

func mailboxClient(t *testing.T, n *clustertest.Node, token string) edgev1connect.MailboxServiceClient {
	return edgev1connect.NewMailboxServiceClient(httpClient(t), url(n), connect.WithInterceptors(bearer(token)))
}

// mailboxUsers creates alice (devices a1, a2 and the revoked r1) and bob
// (b1) through the cluster.
func mailboxUsers(t *testing.T, c *clustertest.Cluster) {
	t.Helper()
	ctx := ctxT(t, 30*time.Second)
	for _, u := range []string{"alice", "bob"} {
		if _, err := c.CreateUser(ctx, 0, u); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range [][2]string{{"alice", "a1"}, {"alice", "a2"}, {"alice", "r1"}, {"bob", "b1"}} {
		if _, err := c.RegisterDevice(ctx, 0, d[0], d[1]); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Nodes[0].Server.Node().Apply(ctx, &statev1.Command{Op: &statev1.Command_RevokeDevice{RevokeDevice: &statev1.RevokeDevice{UserId: "alice", DeviceId: "r1"}}}); err != nil {
		t.Fatal(err)
	}
}

// mailboxClients returns clients of a 3-node cluster's two followers and
// of its leader.
func mailboxClients(t *testing.T, c *clustertest.Cluster, token string) (follower0, follower1, leader edgev1connect.MailboxServiceClient) {
	t.Helper()
	l := c.Leader()
	var fs []edgev1connect.MailboxServiceClient
	for i, n := range c.Nodes {
		if i != l {
			fs = append(fs, mailboxClient(t, n, token))
		}
	}
	return fs[0], fs[1], mailboxClient(t, c.Nodes[l], token)
}

func entry(uid, did, id string, size int, expires time.Time) *edgev1.MailboxEntry {
	ev := bytes.Repeat([]byte(id), size/len(id)+1)[:size]
	return &edgev1.MailboxEntry{UserId: uid, DeviceId: did, SenderDeviceId: "sender", EventId: id, Event: ev, ExpiresAtMs: expires.UnixMilli()}
}

func put(t *testing.T, cl edgev1connect.MailboxServiceClient, entries ...*edgev1.MailboxEntry) *edgev1.PutMailboxResponse {
	t.Helper()
	resp, err := cl.PutMailbox(ctxT(t, 20*time.Second), connect.NewRequest(&edgev1.PutMailboxRequest{Entries: entries}))
	if err != nil {
		t.Fatal(err)
	}
	return resp.Msg
}

// results renders per-entry outcomes as "STATUS/seq".
func results(r *edgev1.PutMailboxResponse) string {
	var out []string
	for _, x := range r.GetResults() {
		out = append(out, fmt.Sprintf("%s/%d", strings.TrimPrefix(x.GetStatus().String(), "MAILBOX_STATUS_"), x.GetSeq()))
	}
	return strings.Join(out, " ")
}

func fetch(t *testing.T, cl edgev1connect.MailboxServiceClient, did string, after uint64, limit uint32) ([]*edgev1.MailboxEntry, bool) {
	t.Helper()
	resp, err := cl.FetchMailbox(ctxT(t, 20*time.Second), connect.NewRequest(&edgev1.FetchMailboxRequest{DeviceId: did, AfterSeq: after, Limit: limit}))
	if err != nil {
		t.Fatal(err)
	}
	return resp.Msg.GetEntries(), resp.Msg.GetMore()
}

func ids(entries []*edgev1.MailboxEntry) string {
	var out []string
	for _, e := range entries {
		out = append(out, fmt.Sprintf("%d:%s", e.GetSeq(), e.GetEventId()))
	}
	return strings.Join(out, " ")
}

// Put on one follower, fetch (linearizably) on the other, ack on the
// leader; quotas refuse without dropping anything; retries store once;
// dead targets answer TARGET_GONE; malformed calls name the field.
func TestMailboxThroughTheAPI(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{Configure: func(cfg *server.Config) {
		cfg.Mailbox = api.MailboxConfig{MaxEntriesPerDevice: 3, MaxBytesPerDevice: 1000}
	}})
	mailboxUsers(t, c)
	putter, reader, acker := mailboxClients(t, c, c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE))
	hour := time.Now().Add(time.Hour)

	r := put(t, putter,
		entry("alice", "a1", "e1", 100, hour),
		entry("alice", "a1", "e2", 100, hour),
		entry("alice", "a2", "e3", 100, hour),
		entry("alice", "b1", "e4", 100, hour),   // bob's device
		entry("alice", "r1", "e5", 100, hour),   // revoked
		entry("alice", "nope", "e6", 100, hour), // never existed
		entry("alice", "a1", "e7", 100, time.Now().Add(-time.Second)),
	)
	if got, want := results(r), "STORED/1 STORED/2 STORED/1 TARGET_GONE/0 TARGET_GONE/0 TARGET_GONE/0 EXPIRED/0"; got != want {
		t.Fatalf("put\n got  %s\n want %s", got, want)
	}
	if r.GetRevision() == 0 {
		t.Fatal("no revision")
	}

	// A linearizable fetch on another node sees the committed entries,
	// oldest first, exactly as stored.
	got, more := fetch(t, reader, "a1", 0, 0)
	if ids(got) != "1:e1 2:e2" || more {
		t.Fatalf("fetch a1: %s more=%v", ids(got), more)
	}
	want := entry("alice", "a1", "e2", 100, hour)
	if e := got[1]; !bytes.Equal(e.GetEvent(), want.GetEvent()) || e.GetUserId() != "alice" || e.GetDeviceId() != "a1" ||
		e.GetSenderDeviceId() != "sender" || e.GetExpiresAtMs() != want.GetExpiresAtMs() {
		t.Fatalf("fetched entry %v", e)
	}
	if got, more := fetch(t, reader, "a1", 0, 1); ids(got) != "1:e1" || !more {
		t.Fatalf("fetch with limit 1: %s more=%v", ids(got), more)
	}
	if got, more := fetch(t, reader, "a1", 1, 10); ids(got) != "2:e2" || more {
		t.Fatalf("fetch after 1: %s more=%v", ids(got), more)
	}
	// A byte bound (what the edge has room for) holds fewer: one entry
	// at least.
	resp, err := reader.FetchMailbox(ctxT(t, 20*time.Second), connect.NewRequest(&edgev1.FetchMailboxRequest{DeviceId: "a1", MaxBytes: 1}))
	if err != nil || ids(resp.Msg.GetEntries()) != "1:e1" || !resp.Msg.GetMore() {
		t.Fatalf("fetch of at most 1 byte: %v %v", resp, err)
	}

	// A retry (an edge that did not see the answer) stores nothing new.
	if r := put(t, putter, entry("alice", "a1", "e2", 100, hour), entry("alice", "a1", "e1", 100, hour)); results(r) != "STORED/2 STORED/1" {
		t.Fatalf("retry: %s", results(r))
	}
	// Quotas: a1 holds 2 of 3 entries, a2 100 of 1000 bytes.
	r = put(t, putter,
		entry("alice", "a1", "e8", 10, hour),
		entry("alice", "a1", "e9", 10, hour),
		entry("alice", "a2", "big", 901, hour),
		entry("alice", "a2", "fits", 900, hour),
	)
	if got, want := results(r), "STORED/3 FULL/0 FULL/0 STORED/2"; got != want {
		t.Fatalf("quotas\n got  %s\n want %s", got, want)
	}
	if got, _ := fetch(t, reader, "a1", 0, 0); ids(got) != "1:e1 2:e2 3:e8" {
		t.Fatalf("a full mailbox lost entries: %s", ids(got))
	}
	if got, _ := fetch(t, reader, "a2", 0, 0); ids(got) != "1:e3 2:fits" {
		t.Fatalf("a2: %s", ids(got))
	}

	// An ack of another history (queued before a restore from a backup,
	// whose seqs name other entries here) deletes nothing.
	if _, err := acker.AckMailbox(ctxT(t, 20*time.Second), connect.NewRequest(&edgev1.AckMailboxRequest{DeviceId: "a1", Seqs: []uint64{1, 2}, History: "another-history"})); connect.CodeOf(err) != connect.CodeFailedPrecondition {
		t.Fatalf("an ack of another history: %v, want failed_precondition", err)
	}
	if got, _ := fetch(t, reader, "a1", 0, 0); ids(got) != "1:e1 2:e2 3:e8" {
		t.Fatalf("an ack of another history deleted entries: %s", ids(got))
	}
	// Acks delete (unknown seqs are ignored); seqs are never reused.
	history, err := c.Nodes[c.Leader()].Server.Node().FSM().History()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := acker.AckMailbox(ctxT(t, 20*time.Second), connect.NewRequest(&edgev1.AckMailboxRequest{DeviceId: "a1", Seqs: []uint64{1, 2, 99}, History: history})); err != nil {
		t.Fatal(err)
	}
	if got, _ := fetch(t, reader, "a1", 0, 0); ids(got) != "3:e8" {
		t.Fatalf("after ack: %s", ids(got))
	}
	if r := put(t, putter, entry("alice", "a1", "e10", 10, hour)); results(r) != "STORED/4" {
		t.Fatalf("after ack: %s", results(r))
	}

	// Errors.
	ctx := ctxT(t, 20*time.Second)
	_, err = reader.FetchMailbox(ctx, connect.NewRequest(&edgev1.FetchMailboxRequest{DeviceId: "nope"}))
	if connect.CodeOf(err) != connect.CodeNotFound {
		t.Fatalf("fetch of a missing device: %v", err)
	}
	for _, tc := range []struct {
		name  string
		call  func() error
		field string
	}{
		{"fetch without device", func() error {
			_, err := reader.FetchMailbox(ctx, connect.NewRequest(&edgev1.FetchMailboxRequest{}))
			return err
		}, "device_id"},
		{"ack without device", func() error {
			_, err := acker.AckMailbox(ctx, connect.NewRequest(&edgev1.AckMailboxRequest{Seqs: []uint64{1}}))
			return err
		}, "device_id"},
		{"ack of too many", func() error {
			_, err := acker.AckMailbox(ctx, connect.NewRequest(&edgev1.AckMailboxRequest{DeviceId: "a1", Seqs: make([]uint64, fsm.MaxMailboxAck+1)}))
			return err
		}, "seqs"},
		{"put nothing", func() error {
			_, err := putter.PutMailbox(ctx, connect.NewRequest(&edgev1.PutMailboxRequest{}))
			return err
		}, "entries"},
		{"put without event id", func() error {
			bad := entry("alice", "a2", "x", 10, hour)
			bad.EventId = ""
			_, err := putter.PutMailbox(ctx, connect.NewRequest(&edgev1.PutMailboxRequest{Entries: []*edgev1.MailboxEntry{
				entry("alice", "a2", "x1", 10, hour), bad,
			}}))
			return err
		}, "entries[1].event_id"},
		{"put without expiry", func() error {
			e := entry("alice", "a2", "x2", 10, hour)
			e.ExpiresAtMs = 0
			_, err := putter.PutMailbox(ctx, connect.NewRequest(&edgev1.PutMailboxRequest{Entries: []*edgev1.MailboxEntry{e}}))
			return err
		}, "entries[0].expires_at_ms"},
		{"put an oversized event", func() error {
			_, err := putter.PutMailbox(ctx, connect.NewRequest(&edgev1.PutMailboxRequest{Entries: []*edgev1.MailboxEntry{
				entry("alice", "a2", "x3", fsm.MaxMailboxEventBytes+1, hour),
			}}))
			return err
		}, "entries[0].event"},
	} {
		err := tc.call()
		if connect.CodeOf(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("%s: %v, want InvalidArgument naming %s", tc.name, err, tc.field)
		}
	}
	if got, _ := fetch(t, reader, "a2", 0, 0); ids(got) != "1:e3 2:fits" {
		t.Fatalf("a refused call stored something: %s", ids(got))
	}
	c.WaitConverged()
}

// expiryCluster starts 3 nodes whose leader looks for expired records
// every 50ms, with mailboxUsers, and a follower's client.
func expiryCluster(t *testing.T) (*clustertest.Cluster, edgev1connect.MailboxServiceClient) {
	t.Helper()
	return expiryClusterWith(t, 300*time.Millisecond)
}

// expiryClusterWith is expiryCluster keeping claim records grace past
// their events.
func expiryClusterWith(t *testing.T, grace time.Duration) (*clustertest.Cluster, edgev1connect.MailboxServiceClient) {
	t.Helper()
	c := clustertest.Start(t, 3, clustertest.Options{Configure: func(cfg *server.Config) {
		cfg.MailboxExpireEvery = 50 * time.Millisecond
		cfg.Mailbox.ClaimRecordGrace = grace
	}})
	mailboxUsers(t, c)
	return c, mailboxClient(t, c.Nodes[c.Follower()], c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE))
}

// Expiry is a command the leader proposes: every replica removes the same
// entries, and ends with the same state.
func TestMailboxExpiryOnEveryReplica(t *testing.T) {
	c, cl := expiryCluster(t)
	soon, hour := time.Now().Add(700*time.Millisecond), time.Now().Add(time.Hour)
	r := put(t, cl,
		entry("alice", "a1", "s1", 10, soon), entry("alice", "a1", "s2", 10, soon),
		entry("alice", "a1", "keep", 10, hour), entry("alice", "a2", "s3", 10, soon),
	)
	if results(r) != "STORED/1 STORED/2 STORED/3 STORED/1" {
		t.Fatal(results(r))
	}
	// Before expiry the entries are there; after it, fetch never returns
	// them (even on a replica that has not removed them yet).
	if got, _ := fetch(t, cl, "a1", 0, 0); ids(got) != "1:s1 2:s2 3:keep" {
		t.Fatalf("before expiry: %s", ids(got))
	}
	clustertest.Eventually(t, 20*time.Second, func() error {
		for _, n := range c.Running() {
			f := n.Server.Node().FSM()
			a1, err := f.Mailbox("a1")
			if err != nil {
				return err
			}
			a2, err := f.Mailbox("a2")
			if err != nil {
				return err
			}
			if a1.GetCount() != 1 || a1.GetBytes() != 10 || a2.GetCount() != 0 {
				return fmt.Errorf("%s: a1 %v, a2 %v", n.ID, a1, a2)
			}
			if due, _ := f.MailboxExpiryDue(time.Now().UnixMilli(), true); due {
				return fmt.Errorf("%s: expiry still due", n.ID)
			}
		}
		return nil
	})
	if got, _ := fetch(t, cl, "a1", 0, 0); ids(got) != "3:keep" {
		t.Fatalf("after expiry: %s", ids(got))
	}
	c.WaitConverged()
}

// Deleting a device, or its user, deletes its mailbox with it.
func TestMailboxDeletedWithDeviceAndUser(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	mailboxUsers(t, c)
	edge := c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	cl := mailboxClient(t, c.Nodes[c.Follower()], edge)
	hour := time.Now().Add(time.Hour)
	put(t, cl, entry("alice", "a1", "x", 10, hour), entry("alice", "a2", "y", 10, hour), entry("alice", "a2", "z", 10, hour))
	admin := controlv1connect.NewDeviceServiceClient(httpClient(t), url(c.Nodes[c.Leader()]), connect.WithInterceptors(bearer(c.AdminToken())))
	ctx := ctxT(t, 30*time.Second)
	gone := func(did string, rev uint64) {
		t.Helper()
		for _, n := range c.Running() {
			f := n.Server.Node().FSM()
			if err := f.WaitApplied(ctx, rev); err != nil {
				t.Fatal(err)
			}
			if _, err := f.Mailbox(did); !errors.Is(err, fsm.ErrNotFound) {
				t.Fatalf("%s: mailbox of %s after its deletion: %v", n.ID, did, err)
			}
		}
		if _, err := cl.FetchMailbox(ctx, connect.NewRequest(&edgev1.FetchMailboxRequest{DeviceId: did})); connect.CodeOf(err) != connect.CodeNotFound {
			t.Fatalf("fetch of deleted %s: %v", did, err)
		}
	}
	if _, err := admin.DeleteDevice(ctx, connect.NewRequest(&controlv1.DeleteDeviceRequest{UserId: "alice", DeviceId: "a1"})); err != nil {
		t.Fatal(err)
	}
	gone("a1", c.Nodes[c.Leader()].Server.Node().FSM().AppliedIndex())
	if got, _ := fetch(t, cl, "a2", 0, 0); ids(got) != "1:y 2:z" {
		t.Fatalf("another device's mailbox changed: %s", ids(got))
	}
	users := controlv1connect.NewUserServiceClient(httpClient(t), url(c.Nodes[c.Leader()]), connect.WithInterceptors(bearer(c.AdminToken())))
	if _, err := users.DeleteUser(ctx, connect.NewRequest(&controlv1.DeleteUserRequest{Id: "alice"})); err != nil {
		t.Fatal(err)
	}
	gone("a2", c.Nodes[c.Leader()].Server.Node().FSM().AppliedIndex())
	c.WaitConverged()
}

// The watch feed reports live mailbox changes (one per device per put,
// with the highest seq); a full copy announces each mailbox holding
// entries once (see TestFullCopyAnnouncesStoredMailboxes).
func TestWatchMailboxChanged(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{Watch: api.WatchConfig{ProgressInterval: 50 * time.Millisecond}})
	mailboxUsers(t, c)
	edge := c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	cl := mailboxClient(t, c.Nodes[c.Leader()], edge)
	hour := time.Now().Add(time.Hour)
	first := put(t, cl, entry("alice", "a1", "old", 10, hour))

	node := c.Nodes[c.Follower()]
	if err := node.Server.Node().Barrier(ctxT(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	w := startWatch(t, node, edge, 0, true)
	done, inCopy := w.copyMailboxes(t)
	if done < first.GetRevision() {
		t.Fatalf("full copy at %d, before the put at %d", done, first.GetRevision())
	}
	equalSeq(t, inCopy, []string{"alice/a1/1"})
	r1 := put(t, cl, entry("alice", "a1", "n1", 10, hour), entry("alice", "a2", "n2", 10, hour), entry("alice", "a1", "n3", 10, hour),
		entry("alice", "b1", "gone", 10, hour))
	r2 := put(t, cl, entry("alice", "a1", "n3", 10, hour)) // a retry: nothing stored, nothing to report
	r3 := put(t, cl, entry("alice", "a1", "n4", 10, hour))
	if results(r2) != "STORED/3" || results(r3) != "STORED/4" {
		t.Fatalf("puts: %s / %s", results(r2), results(r3))
	}
	var got []string
	for len(got) < 3 {
		m := w.next(t)
		if mc := m.GetEvent().GetMailboxChanged(); mc != nil {
			got = append(got, fmt.Sprintf("%d:%s/%s/%d", m.GetRevision(), mc.GetUserId(), mc.GetDeviceId(), mc.GetSeq()))
		}
	}
	want := []string{
		fmt.Sprintf("%d:alice/a1/3", r1.GetRevision()), fmt.Sprintf("%d:alice/a2/1", r1.GetRevision()),
		fmt.Sprintf("%d:alice/a1/4", r3.GetRevision()),
	}
	equalSeq(t, got, want)
	// The feed holds exactly these mailbox changes.
	f := node.Server.Node().FSM()
	if err := f.WaitApplied(ctxT(t, 10*time.Second), r3.GetRevision()); err != nil {
		t.Fatal(err)
	}
	var feed []string
	for _, e := range expectedEvents(t, f, first.GetRevision()) {
		if strings.HasSuffix(e, "CHANGE_KIND_MAILBOX_CHANGED") {
			feed = append(feed, e)
		}
	}
	if len(feed) != 3 {
		t.Fatalf("feed holds %v", feed)
	}
	// A new full copy announces each mailbox once, with its highest seq.
	w2 := startWatch(t, node, edge, 0, true)
	_, inCopy = w2.copyMailboxes(t)
	equalSeq(t, inCopy, []string{"alice/a1/4", "alice/a2/1"})
}

// copyMailboxes reads a full copy, from its resync to its snapshot_done,
// and returns the copy's revision and the mailbox changes it held, as
// "user/device/seq". Every message of the copy must carry its revision.
func (w *watcher) copyMailboxes(t *testing.T) (uint64, []string) {
	t.Helper()
	first := w.next(t)
	if first.GetResync() == nil {
		t.Fatalf("first message %v, want resync", first)
	}
	var out []string
	for {
		m := w.next(t)
		if m.GetRevision() != first.GetRevision() {
			t.Fatalf("copy at %d has a message at %d: %v", first.GetRevision(), m.GetRevision(), m)
		}
		if m.GetSnapshotDone() != nil {
			if !m.GetSnapshotDone().GetMailboxesAnnounced() {
				t.Fatal("the copy's end does not say it announced the mailboxes")
			}
			return m.GetRevision(), out
		}
		if mc := m.GetEvent().GetMailboxChanged(); mc != nil {
			out = append(out, fmt.Sprintf("%s/%s/%d", mc.GetUserId(), mc.GetDeviceId(), mc.GetSeq()))
		}
	}
}

// A watcher whose feed was interrupted long enough to resume with a full
// copy lost the live announcements of the gap: the copy announces every
// mailbox that holds entries (its owner, the highest seq), none whose
// entries were all acked, all before snapshot_done; live ones follow.
func TestFullCopyAnnouncesStoredMailboxes(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{FSM: fsm.Config{ChangeRetention: 20, PruneEvery: 8}})
	mailboxUsers(t, c)
	edge := c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	node := c.Nodes[0]
	f := node.Server.Node().FSM()
	w := startWatch(t, node, edge, 0, true)
	base, inCopy := w.copyMailboxes(t)
	equalSeq(t, inCopy, nil)
	w.stop()

	// While the watcher is away: entries for a1 (the oldest acked), a2
	// (all acked) and b1, then enough changes to compact the gap.
	cl := mailboxClient(t, node, edge)
	hour := time.Now().Add(time.Hour)
	if r := put(t, cl, entry("alice", "a1", "x", 10, hour), entry("alice", "a2", "p", 10, hour),
		entry("alice", "a1", "y", 10, hour), entry("bob", "b1", "q", 10, hour), entry("alice", "a1", "z", 10, hour)); results(r) != "STORED/1 STORED/1 STORED/2 STORED/1 STORED/3" {
		t.Fatalf("put: %s", results(r))
	}
	for _, ack := range []*edgev1.AckMailboxRequest{{DeviceId: "a1", Seqs: []uint64{1}}, {DeviceId: "a2", Seqs: []uint64{1}}} {
		if _, err := cl.AckMailbox(ctxT(t, 20*time.Second), connect.NewRequest(ack)); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; ; i++ {
		if h, err := f.Horizon(); err != nil {
			t.Fatal(err)
		} else if h > base+1 { // the resume reads from base+1
			break
		}
		mkUser(t, c, 0, fmt.Sprintf("filler%d", i))
	}

	w2 := startWatch(t, node, edge, base, true)
	rev, inCopy := w2.copyMailboxes(t)
	equalSeq(t, inCopy, []string{"alice/a1/3", "bob/b1/1"})
	if applied := f.AppliedIndex(); rev > applied {
		t.Fatalf("copy at %d, beyond the applied %d", rev, applied)
	}
	// And live announcements follow the copy.
	r := put(t, cl, entry("alice", "a2", "live", 10, hour))
	for {
		m := w2.next(t)
		if m.GetResync() != nil {
			t.Fatalf("a second full copy: %v", m)
		}
		if mc := m.GetEvent().GetMailboxChanged(); mc != nil {
			if got, want := fmt.Sprintf("%d:%s/%s/%d", m.GetRevision(), mc.GetUserId(), mc.GetDeviceId(), mc.GetSeq()),
				fmt.Sprintf("%d:alice/a2/2", r.GetRevision()); got != want {
				t.Fatalf("live mailbox change %s, want %s", got, want)
			}
			return
		}
	}
}

// A deleted device's mailbox larger than one command's purge goes in
// steps: the deletion removes fsm.DefaultPurgeLimit entries, the leader
// the rest (here the next leader, at once; this one's tick is an hour
// away), on every replica alike; meanwhile the id cannot be registered
// again.
func TestALargeMailboxIsEmptiedInSteps(t *testing.T) {
	const n = fsm.DefaultPurgeLimit + 904
	c := clustertest.Start(t, 3, clustertest.Options{Configure: func(cfg *server.Config) {
		cfg.MailboxExpireEvery = time.Hour
		cfg.Mailbox.MaxEntriesPerDevice = 2 * n
	}})
	mailboxUsers(t, c)
	c.WaitFeature(fsm.FeatureMailboxPurge)
	ctx := ctxT(t, 2*time.Minute)
	// Terms tell whether a leader was elected meanwhile, which empties
	// what is left at once (read before anything a new leader's first
	// round could find to remove).
	maxTerm := func() uint64 {
		var m uint64
		for _, nd := range c.Running() {
			m = max(m, nd.Server.Node().Term())
		}
		return m
	}
	term := maxTerm()
	cl := mailboxClient(t, c.Nodes[c.Leader()], c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE))
	hour := time.Now().Add(time.Hour)
	for i := 0; i < n; {
		var batch []*edgev1.MailboxEntry
		for ; len(batch) < fsm.MaxMailboxBatch && i < n; i++ {
			batch = append(batch, entry("alice", "a1", fmt.Sprint("e", i), 10, hour))
		}
		if r := put(t, cl, batch...); strings.Count(results(r), "STORED/") != len(batch) {
			t.Fatalf("put: %s", results(r))
		}
	}
	leader := c.Leader()
	devices := controlv1connect.NewDeviceServiceClient(httpClient(t), url(c.Nodes[leader]), connect.WithInterceptors(bearer(c.AdminToken())))
	if _, err := devices.DeleteDevice(ctx, connect.NewRequest(&controlv1.DeleteDeviceRequest{UserId: "alice", DeviceId: "a1"})); err != nil {
		t.Fatal(err)
	}
	rev := c.Nodes[leader].Server.Node().FSM().AppliedIndex()
	if _, err := cl.FetchMailbox(ctx, connect.NewRequest(&edgev1.FetchMailboxRequest{DeviceId: "a1"})); connect.CodeOf(err) != connect.CodeNotFound {
		t.Fatalf("fetch of the deleted a1: %v", err)
	}
	var left []string
	for _, nd := range c.Running() {
		f := nd.Server.Node().FSM()
		if err := f.WaitApplied(ctx, rev); err != nil {
			t.Fatal(err)
		}
		mb, err := f.Mailbox("a1")
		left = append(left, fmt.Sprintf("%s: %d entries (%v)", nd.ID, mb.GetCount(), err))
	}
	// (The API draws new devices' ids; a command can name one.)
	_, regErr := c.RegisterDevice(ctx, leader, "bob", "a1")
	if maxTerm() == term {
		want := fmt.Sprint(n - fsm.DefaultPurgeLimit)
		for _, l := range left {
			if !strings.Contains(l, ": "+want+" entries (<nil>)") {
				t.Fatalf("after the deletion: %v; want %s entries left on each", left, want)
			}
		}
		if !errors.Is(regErr, fsm.ErrFailedPrecondition) {
			t.Fatalf("registering a1 again while its mailbox is emptied: %v", regErr)
		}
	} else {
		t.Logf("a leader was elected meanwhile: not checking what the deletion left (%v)", left)
	}
	c.TransferLeadership(ctx, (c.Leader()+1)%3)
	clustertest.Eventually(t, time.Minute, func() error {
		for _, nd := range c.Running() {
			f := nd.Server.Node().FSM()
			tot, err := f.MailboxTotals()
			if err != nil {
				return err
			}
			if _, err := f.Mailbox("a1"); !errors.Is(err, fsm.ErrNotFound) || tot.Purging != 0 {
				return fmt.Errorf("%s: a1's mailbox %v, %d purging", nd.ID, err, tot.Purging)
			}
		}
		return nil
	})
	if regErr != nil {
		if _, err := c.RegisterDevice(ctx, c.Leader(), "bob", "a1"); err != nil {
			t.Fatalf("registering a1 again once its mailbox is gone: %v", err)
		}
	}
	c.WaitConverged()
}

// A call holding more than MaxCommandEventBytes of events goes as several
// commands, in order, each entry decided as in one (a copy of an earlier
// entry is the same stored event): Raft then never carries a command of
// more than about a megabyte.
func TestALargePutGoesAsSeveralCommands(t *testing.T) {
	const size = 100 << 10 // ten to a command
	c := clustertest.Start(t, 3, clustertest.Options{Configure: func(cfg *server.Config) { cfg.Mailbox.MaxBytesPerDevice = 64 << 20 }})
	mailboxUsers(t, c)
	leader := c.Nodes[c.Leader()].Server.Node().FSM()
	before := leader.AppliedIndex()
	cl := mailboxClient(t, c.Nodes[c.Follower()], c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE))
	hour := time.Now().Add(time.Hour)
	var batch []*edgev1.MailboxEntry
	var want []string
	for i := range 100 {
		batch = append(batch, entry("alice", "a1", fmt.Sprint("e", i), size, hour))
		want = append(want, fmt.Sprintf("STORED/%d", i+1))
	}
	batch = append(batch, entry("alice", "a1", "e5", size, hour))
	want = append(want, "STORED/6")
	r := put(t, cl, batch...)
	if got := results(r); got != strings.Join(want, " ") {
		t.Fatalf("results\n got  %s\n want %s", got, strings.Join(want, " "))
	}
	if err := leader.WaitApplied(ctxT(t, 30*time.Second), r.GetRevision()); err != nil {
		t.Fatal(err)
	}
	// One MAILBOX_CHANGED per command that stored something, with its
	// highest seq: ten of ten entries; the copy of e5, an eleventh command
	// of its own, stores nothing and changes nothing.
	cs, err := leader.Changes(before, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	var seqs []string
	for _, ch := range cs {
		if mc := ch.GetMailboxChanged(); mc != nil && mc.GetDeviceId() == "a1" {
			seqs = append(seqs, fmt.Sprint(mc.GetSeq()))
		}
	}
	if got := strings.Join(seqs, " "); got != "10 20 30 40 50 60 70 80 90 100" {
		t.Fatalf("commands ended at seqs %s, want every tenth", got)
	}
	if got, _ := fetch(t, cl, "a1", 99, 0); ids(got) != "100:e99" {
		t.Fatalf("the last entry: %s", ids(got))
	}
	c.WaitConverged()
}
