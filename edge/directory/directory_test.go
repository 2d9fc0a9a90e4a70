package directory_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"go.uber.org/goleak"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/edge/directory"
	"github.com/edge-relay/relay/edge/session"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("github.com/cockroachdb/pebble/v2/internal/cache.(*shard).releaseLoop"))
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// captureLogs returns a logger that keeps every record, debug ones
// included, and a function that returns what it kept.
func captureLogs() (*slog.Logger, func() string) {
	var mu sync.Mutex
	var buf bytes.Buffer
	logger := slog.New(slog.NewTextHandler(writerFunc(func(p []byte) (int, error) {
		mu.Lock()
		defer mu.Unlock()
		return buf.Write(p)
	}), &slog.HandlerOptions{Level: slog.LevelDebug}))
	return logger, func() string {
		mu.Lock()
		defer mu.Unlock()
		return buf.String()
	}
}

type removals struct {
	mu  sync.Mutex
	got []directory.Removal
}

func (r *removals) add(x directory.Removal) { r.mu.Lock(); r.got = append(r.got, x); r.mu.Unlock() }
func (r *removals) has(want directory.Removal) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, g := range r.got {
		if g == want {
			return true
		}
	}
	return false
}

// The directory follows a real control plane: full copy, live changes,
// removals for revoked and deleted devices and users, the session-key
// ring, and a resume after the node it follows restarts.
func TestFollowsTheControlPlane(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	edgeTok := c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	apply := func(cmd *statev1.Command) uint64 {
		t.Helper()
		res, err := c.Nodes[c.Leader()].Server.Node().Apply(ctx, cmd)
		if err != nil {
			t.Fatal(err)
		}
		return res.GetRevision()
	}
	apply(&statev1.Command{Op: &statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "u1", Login: "u1"}}}})
	key := bytes.Repeat([]byte{1}, 32)
	apply(&statev1.Command{Op: &statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: "d1", UserId: "u1", Name: "a", PublicKey: key}}}})

	var rm removals
	ring := session.NewRing()
	logger, logs := captureLogs()
	defer func() {
		if t.Failed() {
			t.Log(logs())
		}
	}()
	dir := directory.New(directory.Config{Ring: ring, OnRemove: rm.add, Logger: logger})
	follow := c.Follower()
	// The copy comes from the follower: let it catch up first.
	if err := c.Nodes[follow].Server.Node().Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	d := api.NewDialer(nil)
	defer d.Close()
	client := edgev1connect.NewWatchServiceClient(d.HTTPClient(), d.URL(c.Nodes[follow].Server.APIAddr()))
	fctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		done <- dir.Follow(fctx, client, func(context.Context) (string, error) { return edgeTok, nil })
	}()
	defer func() { stop(); <-done }()

	clustertest.Eventually(t, 20*time.Second, func() error {
		if !dir.Synced() {
			return fmt.Errorf("not synced")
		}
		return nil
	})
	if dv, ok := dir.Device("d1"); !ok || dv.UserID != "u1" || !bytes.Equal(dv.PublicKey, key) || !dir.UserActive("u1") {
		t.Fatalf("full copy: %+v %v", dv, ok)
	}
	// The ring came with the copy: tickets seal and open.
	tk, err := ring.Seal(session.Ticket{UserID: "u1", DeviceID: "d1", AuthAt: time.Now(), ExpiresAt: time.Now().Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	// Live: a new device, a revocation, a session key rotation.
	apply(&statev1.Command{Op: &statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: "d2", UserId: "u1", Name: "b", PublicKey: key}}}})
	rev := apply(&statev1.Command{Op: &statev1.Command_RevokeDevice{RevokeDevice: &statev1.RevokeDevice{UserId: "u1", DeviceId: "d1"}}})
	cmd, _, err := api.NewSessionKeyCommand(time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	rev2 := apply(cmd)
	if err := dir.WaitRevision(ctx, max(rev, rev2)); err != nil {
		t.Fatal(err)
	}
	if dv, _ := dir.Device("d1"); !dv.Revoked {
		t.Fatal("revocation not applied")
	}
	if !rm.has(directory.Removal{UserID: "u1", DeviceID: "d1", Reason: "device revoked"}) {
		t.Fatalf("no removal for the revoked device: %v", rm.got)
	}
	if _, err := ring.Open(tk, time.Now()); err != nil {
		t.Fatalf("ticket of the previous key within its grace: %v", err)
	}

	// The followed node restarts; changes made meanwhile arrive on resume.
	c.Shutdown(follow)
	rev = apply(&statev1.Command{Op: &statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: "u1"}}})
	c.Restart(follow)
	if err := dir.WaitRevision(ctx, rev); err != nil {
		t.Fatal(err)
	}
	if _, ok := dir.Device("d2"); ok || dir.UserActive("u1") {
		t.Fatalf("deletion (revision %d) not applied after resume; directory at %d", rev, dir.Revision())
	}
	for _, want := range []directory.Removal{
		{UserID: "u1", DeviceID: "d2", Reason: "device deleted"},
		{UserID: "u1", Reason: "user deleted"},
	} {
		if !rm.has(want) {
			t.Fatalf("missing removal %+v in %v", want, rm.got)
		}
	}
}

// mailboxCall is one OnMailbox call and what the directory said at the
// time.
type mailboxCall struct {
	note     string // user/device/seq
	synced   bool
	revision uint64
}

type mailboxCalls struct {
	mu  sync.Mutex
	got []mailboxCall
}

func (m *mailboxCalls) add(c mailboxCall) { m.mu.Lock(); m.got = append(m.got, c); m.mu.Unlock() }
func (m *mailboxCalls) all() []mailboxCall {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]mailboxCall(nil), m.got...)
}

// A full copy's mailbox announcements reach OnMailbox once the copy is in
// place (synced, at the copy's revision), not while it is staged; live
// ones reach it as they come; a feed resumed with a full copy after a gap
// announces what was stored during the gap.
func TestFullCopyMailboxesReachOnMailboxAfterTheCopy(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{FSM: fsm.Config{ChangeRetention: 20, PruneEvery: 8}})
	node := c.Nodes[0]
	edgeTok := c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	apply := func(op *statev1.Command) uint64 {
		t.Helper()
		res, err := node.Server.Node().Apply(ctx, op)
		if err != nil {
			t.Fatal(err)
		}
		if res.GetCode() != statev1.ResultCode_RESULT_CODE_OK {
			t.Fatalf("%v: %v", op, res)
		}
		return res.GetRevision()
	}
	put := func(did, id string) uint64 {
		t.Helper()
		return apply(&statev1.Command{Op: &statev1.Command_PutMailbox{PutMailbox: &statev1.PutMailbox{Entries: []*statev1.MailboxEntry{{
			UserId: "u1", DeviceId: did, SenderDeviceId: "sender", EventId: id, Event: []byte(id), ExpiresAtMs: time.Now().Add(time.Hour).UnixMilli(),
		}}}}})
	}
	apply(&statev1.Command{Op: &statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "u1", Login: "u1"}}}})
	for _, did := range []string{"d1", "d2", "d3"} {
		apply(&statev1.Command{Op: &statev1.Command_RegisterDevice{RegisterDevice: &statev1.RegisterDevice{Device: &statev1.Device{Id: did, UserId: "u1", Name: did, PublicKey: bytes.Repeat([]byte{1}, 32)}}}})
	}
	put("d1", "before")

	var calls mailboxCalls
	var dir *directory.Directory
	dir = directory.New(directory.Config{Ring: session.NewRing(), OnMailbox: func(user, device string, seq uint64) {
		calls.add(mailboxCall{note: fmt.Sprintf("%s/%s/%d", user, device, seq), synced: dir.Synced(), revision: dir.Revision()})
	}})
	d := api.NewDialer(nil)
	defer d.Close()
	client := edgev1connect.NewWatchServiceClient(d.HTTPClient(), d.URL(node.Server.APIAddr()))
	follow := func() (stop func()) {
		fctx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() {
			done <- dir.Follow(fctx, client, func(context.Context) (string, error) { return edgeTok, nil })
		}()
		return func() { cancel(); <-done }
	}
	waitCalls := func(n int) []mailboxCall {
		t.Helper()
		clustertest.Eventually(t, 20*time.Second, func() error {
			if got := len(calls.all()); got < n {
				return fmt.Errorf("%d OnMailbox calls, want %d", got, n)
			}
			return nil
		})
		return calls.all()
	}

	// The first copy announces d1, once it is in place.
	stop := follow()
	got := waitCalls(1)
	if got[0].note != "u1/d1/1" || !got[0].synced {
		t.Fatalf("first copy: %+v, want u1/d1/1 once synced", got[0])
	}
	// Live.
	put("d2", "live")
	if got = waitCalls(2); got[1].note != "u1/d2/1" {
		t.Fatalf("live: %+v, want u1/d2/1", got[1])
	}

	// A gap: d3 and d1 receive entries, d2 is emptied, and the changes
	// are compacted, so the feed resumes with a full copy.
	stop()
	put("d3", "gap1")
	put("d1", "gap2")
	last := apply(&statev1.Command{Op: &statev1.Command_AckMailbox{AckMailbox: &statev1.AckMailbox{DeviceId: "d2", Seqs: []uint64{1}}}})
	f := node.Server.Node().FSM()
	for i := 0; ; i++ {
		if h, err := f.Horizon(); err != nil {
			t.Fatal(err)
		} else if h > dir.Revision()+1 { // the resume reads from the next revision
			break
		}
		last = apply(&statev1.Command{Op: &statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: fmt.Sprintf("f%d", i), Login: fmt.Sprintf("f%d", i)}}}})
	}
	resyncs := node.Metric(t, "relay_control_watch_resyncs_total")
	stop = follow()
	defer stop()
	got = waitCalls(4)
	if n := node.Metric(t, "relay_control_watch_resyncs_total"); n != resyncs+1 {
		t.Fatalf("%v full copies sent on resume, want 1", n-resyncs)
	}
	var notes []string
	for _, call := range got[2:] {
		notes = append(notes, call.note)
		if !call.synced || call.revision < last {
			t.Fatalf("%s told at revision %d (synced %v), before the copy at %d or later was in place", call.note, call.revision, call.synced, last)
		}
	}
	if strings.Join(notes, " ") != "u1/d1/2 u1/d3/1" {
		t.Fatalf("after the gap: %v, want u1/d1/2 u1/d3/1 (d2 was emptied)", notes)
	}
}

// The control plane ends a watch stream when its access token expires;
// the directory resumes at once with a fresh token, from its revision (no
// new full copy), and quietly: an expiry is not an interruption to warn
// of. Changes made across the expiries arrive.
func TestFollowsThroughTokenExpiries(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{Auth: api.AuthConfig{AccessTTL: 2 * time.Second, Leeway: time.Millisecond}})
	c.TokenFor("edge-expiring", controlv1.Role_ROLE_EDGE)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	d := api.NewDialer(nil)
	defer d.Close()
	authc := controlv1connect.NewAuthServiceClient(d.HTTPClient(), d.URL(c.Nodes[0].Server.APIAddr()))
	var logins atomic.Int32
	token := func(ctx context.Context) (string, error) {
		r, err := authc.Login(ctx, connect.NewRequest(&controlv1.LoginRequest{Login: "edge-expiring", Password: "password-of-edge-expiring"}))
		if err != nil {
			return "", err
		}
		logins.Add(1)
		return r.Msg.GetTokens().GetAccessToken(), nil
	}
	logger, logs := captureLogs()
	var rm removals
	dir := directory.New(directory.Config{Ring: session.NewRing(), OnRemove: rm.add, Logger: logger})
	client := edgev1connect.NewWatchServiceClient(d.HTTPClient(), d.URL(c.Nodes[0].Server.APIAddr()))
	fctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- dir.Follow(fctx, client, token) }()
	defer func() { stop(); <-done }()
	clustertest.Eventually(t, 20*time.Second, func() error {
		if !dir.Synced() {
			return fmt.Errorf("not synced")
		}
		return nil
	})
	apply := func(cmd *statev1.Command) uint64 {
		t.Helper()
		res, err := c.Nodes[0].Server.Node().Apply(ctx, cmd)
		if err != nil {
			t.Fatal(err)
		}
		return res.GetRevision()
	}
	apply(&statev1.Command{Op: &statev1.Command_CreateUser{CreateUser: &statev1.CreateUser{User: &statev1.User{Id: "u1", Login: "u1"}}}})
	// Three streams ended with their tokens.
	clustertest.Eventually(t, 60*time.Second, func() error {
		if n := logins.Load(); n < 4 {
			return fmt.Errorf("%d tokens taken", n)
		}
		return nil
	})
	rev := apply(&statev1.Command{Op: &statev1.Command_DeleteUser{DeleteUser: &statev1.DeleteUser{Id: "u1"}}})
	if err := dir.WaitRevision(ctx, rev); err != nil {
		t.Fatal(err)
	}
	if !rm.has(directory.Removal{UserID: "u1", Reason: "user deleted"}) {
		t.Fatalf("no removal for the user deleted across the expiries: %v", rm.got)
	}
	if got := logs(); strings.Contains(got, "watch feed interrupted") || strings.Count(got, "watch stream ended with its access token") < 3 {
		t.Fatalf("the directory's log across three expiries:\n%s", got)
	}
}

// The debug log of watch messages leaves the session keys' secrets out
// (they seal resume tickets, and TLS tickets with --cluster-tls-tickets):
// the key's id is there, its secret is not, and the ring got it whole.
func TestTheDebugLogHoldsNoSessionKeySecret(t *testing.T) {
	var logs bytes.Buffer
	ring := session.NewRing()
	dir := directory.New(directory.Config{Ring: ring, Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	secret := bytes.Repeat([]byte("S3cr"), 8)
	msg := &edgev1.WatchResponse{Revision: 7, Kind: &edgev1.WatchResponse_Event{Event: &edgev1.WatchEvent{Kind: &edgev1.WatchEvent_SessionKeys{
		SessionKeys: &edgev1.SessionKeyRing{CurrentId: "ss_kept", Keys: []*edgev1.SessionKey{{Id: "ss_kept", Secret: secret}}}}}}}
	dir.Apply(msg)
	out := logs.String()
	if !strings.Contains(out, "ss_kept") {
		t.Fatalf("the debug log does not show the message: %s", out)
	}
	if strings.Contains(out, "S3cr") || bytes.Contains(logs.Bytes(), secret) {
		t.Fatalf("the debug log holds the session key's secret: %s", out)
	}
	if got := msg.GetEvent().GetSessionKeys().GetKeys()[0].GetSecret(); !bytes.Equal(got, secret) {
		t.Fatal("logging cleared the secret of the message itself")
	}
	if _, err := ring.Seal(session.Ticket{UserID: "u", DeviceID: "d"}); err != nil {
		t.Fatalf("the ring did not get the key: %v", err)
	}
}

// The session keys a full copy carries take effect with the copy, not
// before: a copy cut off after its keys (the feed then resumed from the
// revision before it, perhaps on a node behind the one that sent it)
// leaves the ring as it was, rather than holding keys of a state the
// directory never reached, or going back to an older ring afterwards.
func TestAFullCopysSessionKeysTakeEffectWithTheCopy(t *testing.T) {
	ring := session.NewRing()
	dir := directory.New(directory.Config{Ring: ring})
	keys := func(rev uint64, ids ...string) *edgev1.WatchResponse {
		var ks []*edgev1.SessionKey
		for _, id := range ids {
			ks = append(ks, &edgev1.SessionKey{Id: id, Secret: bytes.Repeat([]byte(id[:1]), 32)})
		}
		return &edgev1.WatchResponse{Revision: rev, Kind: &edgev1.WatchResponse_Event{Event: &edgev1.WatchEvent{Kind: &edgev1.WatchEvent_SessionKeys{
			SessionKeys: &edgev1.SessionKeyRing{CurrentId: ids[len(ids)-1], Keys: ks}}}}}
	}
	resync := &edgev1.WatchResponse{Revision: 10, Kind: &edgev1.WatchResponse_Resync{Resync: &edgev1.Resync{}}}
	dir.Apply(keys(5, "a1"))
	ticket, err := ring.Seal(session.Ticket{UserID: "u", DeviceID: "d", AuthAt: time.Now(), ExpiresAt: time.Now().Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	opens := func() bool {
		_, err := ring.Open(ticket, time.Now())
		return err == nil
	}
	// A copy whose ring retired a1, cut off before its end.
	dir.Apply(resync)
	dir.Apply(keys(10, "b2"))
	if !opens() {
		t.Fatal("a staged copy's keys took effect before the copy was in place")
	}
	dir.Apply(resync) // the next copy: the first was cut off
	if !opens() {
		t.Fatal("a cut-off copy's keys took effect")
	}
	dir.Apply(keys(10, "b2"))
	dir.Apply(&edgev1.WatchResponse{Revision: 10, Kind: &edgev1.WatchResponse_SnapshotDone{SnapshotDone: &edgev1.SnapshotDone{}}})
	if opens() {
		t.Fatal("the copy is in place and the key it retired still opens tickets")
	}
	if _, err := ring.Seal(session.Ticket{UserID: "u", DeviceID: "d", AuthAt: time.Now()}); err != nil {
		t.Fatalf("the copy's ring seals nothing: %v", err)
	}
}
