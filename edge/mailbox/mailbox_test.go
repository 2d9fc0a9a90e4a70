package mailbox_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/goleak"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/server"
	"github.com/edge-relay/relay/edge/controlconn"
	"github.com/edge-relay/relay/edge/mailbox"
	"github.com/edge-relay/relay/edge/session"
	"github.com/edge-relay/relay/internal/relaytest"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		goleak.IgnoreTopFunction("github.com/cockroachdb/pebble/v2/internal/cache.(*shard).releaseLoop"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
	)
}

func authed[T any](m *T, tok string) *connect.Request[T] {
	r := connect.NewRequest(m)
	r.Header().Set("Authorization", "Bearer "+tok)
	return r
}

// failingAcks is the control plane's API whose next fail AckMailbox
// calls fail as they do while it has no leader.
type failingAcks struct {
	mailbox.API
	fail atomic.Int32
}

func (f *failingAcks) AckMailbox(ctx context.Context, deviceID, history string, seqs []uint64) error {
	if f.fail.Add(-1) >= 0 {
		return connect.NewError(connect.CodeUnavailable, errors.New("no leader"))
	}
	return f.API.AckMailbox(ctx, deviceID, history, seqs)
}

// startClient makes a client with cfg and runs it until the returned
// stop, which waits for Run to return (and which cleanup calls too).
func startClient(t *testing.T, cfg mailbox.Config) (*mailbox.Client, func()) {
	t.Helper()
	mb, err := mailbox.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { mb.Run(ctx) })
	stop := func() { cancel(); wg.Wait() }
	t.Cleanup(stop)
	return mb, stop
}

// countingPuts is the control plane's API, counting PutMailbox calls.
type countingPuts struct {
	mailbox.API
	puts atomic.Int32
}

func (c *countingPuts) PutMailbox(ctx context.Context, entries []*edgev1.MailboxEntry) (*edgev1.PutMailboxResponse, error) {
	c.puts.Add(1)
	return c.API.PutMailbox(ctx, entries)
}

// Entries are written in the order they were queued, many to a call,
// each caller told its own outcome; fetch and ack work against a real
// control plane (acks again after a failure); an unreachable control
// plane ends in an error, not a hang.
func TestWriterAgainstAControlPlane(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cc, userID, devIDs := edgeOf(ctx, t, c, 1)
	devID := devIDs[0]
	reg := prometheus.NewRegistry()
	// Its first two acks fail as in a leader change: they are sent again.
	api := &failingAcks{API: cc}
	api.fail.Store(2)
	mb, _ := startClient(t, mailbox.Config{API: api, MaxBatch: 8, RetryFor: 500 * time.Millisecond, Registerer: reg})

	const n = 50
	results := make([]mailbox.Result, n)
	var done sync.WaitGroup
	for i := range n {
		done.Add(1)
		mb.Store(&edgev1.MailboxEntry{DeviceId: devID, UserId: userID, Event: fmt.Appendf(nil, "e%d", i), EventId: fmt.Sprint(i),
			SenderDeviceId: "s", ExpiresAtMs: time.Now().Add(time.Hour).UnixMilli()}, func(r mailbox.Result) {
			results[i] = r
			done.Done()
		})
	}
	done.Wait()
	for i, r := range results {
		if r.Err != nil || r.Status != edgev1.MailboxStatus_MAILBOX_STATUS_STORED || (i > 0 && r.Seq <= results[i-1].Seq) {
			t.Fatalf("entry %d: %+v (previous %+v)", i, r, results[max(i-1, 0)])
		}
	}
	page, err := mb.Fetch(ctx, devID, 0, 100, 0)
	entries := page.Entries
	if err != nil || page.More || len(entries) != n {
		t.Fatalf("fetch: %d entries, more %v, %v", len(entries), page.More, err)
	}
	// The read names a revision that covers every store (each one Raft
	// entry at least, after the device's own).
	if page.Revision < n/8 {
		t.Fatalf("fetch reports revision %d after %d stores", page.Revision, n)
	}
	for i, e := range entries {
		if string(e.GetEvent()) != fmt.Sprintf("e%d", i) {
			t.Fatalf("entry %d is %q", i, e.GetEvent())
		}
	}
	// Fewer calls than entries: they were batched.
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(mfs, func(mf *dto.MetricFamily) bool { return mf.GetName() == "relay_edge_mailbox_batch_entries" })
	if i < 0 {
		t.Fatal("no relay_edge_mailbox_batch_entries histogram")
	}
	if calls := mfs[i].GetMetric()[0].GetHistogram().GetSampleCount(); calls >= n || calls < n/8 {
		t.Fatalf("%d calls for %d entries (at most 8 per call)", calls, n)
	}
	// Acks delete, in the background.
	var seqs []uint64
	for _, e := range entries[:10] {
		seqs = append(seqs, e.GetSeq())
	}
	mb.Ack(devID, page.History, seqs...)
	clustertest.Eventually(t, 10*time.Second, func() error {
		left, err := mb.Fetch(ctx, devID, 0, 100, 0)
		if err != nil || len(left.Entries) != n-10 {
			return fmt.Errorf("%d left, %v", len(left.Entries), err)
		}
		if left.Revision <= page.Revision {
			return fmt.Errorf("revision %d after the acks, %d before", left.Revision, page.Revision)
		}
		return nil
	})
	// A device that does not exist: TARGET_GONE.
	res := make(chan mailbox.Result, 1)
	mb.Store(&edgev1.MailboxEntry{DeviceId: "d_nope", UserId: userID, Event: []byte("x"), EventId: "x", SenderDeviceId: "s",
		ExpiresAtMs: time.Now().Add(time.Hour).UnixMilli()}, func(r mailbox.Result) { res <- r })
	if r := <-res; r.Err != nil || r.Status != edgev1.MailboxStatus_MAILBOX_STATUS_TARGET_GONE {
		t.Fatalf("unknown device: %+v", r)
	}
	if err := mb.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	// An event larger than a mailbox stores is refused alone, at once.
	mb.Store(&edgev1.MailboxEntry{DeviceId: devID, UserId: userID, Event: make([]byte, mailbox.MaxEventBytes+1), EventId: "huge", SenderDeviceId: "s",
		ExpiresAtMs: time.Now().Add(time.Hour).UnixMilli()}, func(r mailbox.Result) { res <- r })
	if r := <-res; !errors.Is(r.Err, mailbox.ErrTooLarge) || !errors.Is(r.Err, session.ErrMailboxEventTooLarge) {
		t.Fatalf("an entry over the size a mailbox stores: %+v, want ErrTooLarge, which the session core tells the sender as such", r)
	}
	// Large entries go in batches the control plane takes (a call over
	// 16 MiB is refused whole): 80 of 250 KiB, with room for 256 a call,
	// each get an outcome of their own.
	counted := &countingPuts{API: cc}
	bigReg := prometheus.NewRegistry()
	big, stopBig := startClient(t, mailbox.Config{API: counted, Registerer: bigReg})
	const nBig = 80
	bigRes := make(chan mailbox.Result, nBig)
	for i := range nBig {
		big.Store(&edgev1.MailboxEntry{DeviceId: devID, UserId: userID, Event: make([]byte, 250<<10), EventId: fmt.Sprintf("big-%d", i), SenderDeviceId: "s",
			ExpiresAtMs: time.Now().Add(time.Hour).UnixMilli()}, func(r mailbox.Result) { bigRes <- r })
	}
	var stored []uint64
	for range nBig {
		r := <-bigRes
		if r.Err != nil {
			t.Fatalf("a large entry failed: %v", r.Err)
		}
		if r.Status == edgev1.MailboxStatus_MAILBOX_STATUS_STORED {
			stored = append(stored, r.Seq)
		}
	}
	// The mailbox filled up on the way (4 MiB a device). Further entries
	// for it are answered FULL by the writer, without a call through
	// Raft, until an ack for the device makes room.
	if len(stored) == nBig || len(stored) == 0 {
		t.Fatalf("%d of %d entries stored: the mailbox did not fill", len(stored), nBig)
	}
	puts := counted.puts.Load()
	entry := func(id string) *edgev1.MailboxEntry {
		return &edgev1.MailboxEntry{DeviceId: devID, UserId: userID, Event: []byte("small"), EventId: id, SenderDeviceId: "s",
			ExpiresAtMs: time.Now().Add(time.Hour).UnixMilli()}
	}
	big.Store(entry("after-full"), func(r mailbox.Result) { bigRes <- r })
	if r := <-bigRes; r.Err != nil || r.Status != edgev1.MailboxStatus_MAILBOX_STATUS_FULL || counted.puts.Load() != puts {
		t.Fatalf("an entry for a full mailbox: %+v after %d more calls, want FULL and none", r, counted.puts.Load()-puts)
	}
	// Both kinds of FULL count under one label.
	byResult := map[string]float64{}
	mfs, err = bigReg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "relay_edge_mailbox_entries_total" {
			for _, m := range mf.GetMetric() {
				byResult[m.GetLabel()[0].GetValue()] += m.GetCounter().GetValue()
			}
		}
	}
	if byResult["full"] != float64(nBig-len(stored)+1) || byResult["stored"] != float64(len(stored)) || len(byResult) != 6 {
		t.Fatalf("entries counted %v, want %d full and %d stored", byResult, nBig-len(stored)+1, len(stored))
	}
	before, err := fetchAll(ctx, big, devID)
	if err != nil {
		t.Fatal(err)
	}
	big.Ack(devID, "", stored...)
	clustertest.Eventually(t, 10*time.Second, func() error {
		left, err := fetchAll(ctx, big, devID)
		if err != nil || left != before-len(stored) {
			return fmt.Errorf("%d entries left, %v", left, err)
		}
		return nil
	})
	big.Store(entry("after-ack"), func(r mailbox.Result) { bigRes <- r })
	if r := <-bigRes; r.Err != nil || r.Status != edgev1.MailboxStatus_MAILBOX_STATUS_STORED {
		t.Fatalf("an entry after the acks made room: %+v", r)
	}
	stopBig()
	// The control plane gone: an error after RetryFor, not a hang.
	c.Stop()
	mb.Store(&edgev1.MailboxEntry{DeviceId: devID, UserId: userID, Event: []byte("x"), EventId: "late", SenderDeviceId: "s",
		ExpiresAtMs: time.Now().Add(time.Hour).UnixMilli()}, func(r mailbox.Result) { res <- r })
	if r := <-res; r.Err == nil {
		t.Fatalf("stored with no control plane: %+v", r)
	}
}

// edgeOf creates an edge account and a user with n devices on c, and
// returns the edge's connection to every node of c (closed by cleanup),
// the user's id and the devices'.
func edgeOf(ctx context.Context, t *testing.T, c *clustertest.Cluster, n int) (*controlconn.Conn, string, []string) {
	t.Helper()
	admin := c.AdminToken()
	d := api.NewDialer(nil)
	t.Cleanup(d.Close)
	var urls []string
	for _, nd := range c.Nodes {
		urls = append(urls, d.URL(nd.Server.APIAddr()))
	}
	users := controlv1connect.NewUserServiceClient(d.HTTPClient(), urls[0])
	if _, err := users.CreateUser(ctx, authed(&controlv1.CreateUserRequest{Login: "edges", Password: "edge-password-1", Role: controlv1.Role_ROLE_EDGE}, admin)); err != nil {
		t.Fatal(err)
	}
	u, err := users.CreateUser(ctx, authed(&controlv1.CreateUserRequest{Login: "u"}, admin))
	if err != nil {
		t.Fatal(err)
	}
	var devIDs []string
	for i := range n {
		pub, _, _ := ed25519.GenerateKey(rand.Reader)
		dev, err := controlv1connect.NewDeviceServiceClient(d.HTTPClient(), urls[0]).RegisterDevice(ctx,
			authed(&controlv1.RegisterDeviceRequest{UserId: u.Msg.GetUser().GetId(), Name: fmt.Sprint("d", i), PublicKey: pub}, admin))
		if err != nil {
			t.Fatal(err)
		}
		devIDs = append(devIDs, dev.Msg.GetDevice().GetId())
	}
	cc, err := controlconn.New(controlconn.Config{URLs: urls, Login: "edges", Password: "edge-password-1"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cc.Close)
	return cc, u.Msg.GetUser().GetId(), devIDs
}

// fetchAll counts a device's entries, page after page (a page holds at
// most 1 MiB of events).
func fetchAll(ctx context.Context, c *mailbox.Client, device string) (int, error) {
	n, after := 0, uint64(0)
	for {
		page, err := c.Fetch(ctx, device, after, 256, 0)
		if err != nil {
			return n, err
		}
		n += len(page.Entries)
		if !page.More || len(page.Entries) == 0 {
			return n, nil
		}
		after = page.Entries[len(page.Entries)-1].GetSeq()
	}
}

// stalledAPI is a control plane that takes calls and does not answer
// them until released (or the call's context ends).
type stalledAPI struct {
	mailbox.API
	release chan struct{}
	calls   atomic.Int32
}

func (a *stalledAPI) wait(ctx context.Context) error {
	a.calls.Add(1)
	select {
	case <-a.release:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (a *stalledAPI) ClaimEvents(ctx context.Context, claims []*edgev1.EventClaim) (*edgev1.ClaimEventsResponse, error) {
	if err := a.wait(ctx); err != nil {
		return nil, err
	}
	won := make([]bool, len(claims))
	for i := range won {
		won[i] = i%2 == 0
	}
	return &edgev1.ClaimEventsResponse{Won: won}, nil
}

func (a *stalledAPI) PutMailbox(ctx context.Context, entries []*edgev1.MailboxEntry) (*edgev1.PutMailboxResponse, error) {
	if err := a.wait(ctx); err != nil {
		return nil, err
	}
	out := &edgev1.PutMailboxResponse{}
	for i := range entries {
		out.Results = append(out.Results, &edgev1.PutMailboxResult{Status: edgev1.MailboxStatus_MAILBOX_STATUS_STORED, Seq: uint64(i + 1)})
	}
	return out, nil
}

// While the control plane does not answer, claims wait up to
// MaxPendingClaims and beyond it count as won at once, instead of piling
// up; a Flush waits for what is queued even when the queue is at its
// bound (it returned at once, as if done); and once the writer stopped,
// a Flush says so.
func TestAStalledControlPlaneBoundsClaimsAndFlushWaits(t *testing.T) {
	api := &stalledAPI{release: make(chan struct{})}
	mb, stop := startClient(t, mailbox.Config{API: api, MaxBatch: 2, MaxPending: 2, MaxPendingClaims: 4, RetryFor: time.Minute})

	won := make(chan bool, 16)
	claim := func(i int) {
		mb.Claim(&edgev1.EventClaim{SenderDeviceId: "s", EventId: fmt.Sprint(i), DeviceId: "d", UserId: "u", ExpiresAtMs: time.Now().Add(time.Hour).UnixMilli()},
			func(w bool) { won <- w })
	}
	claim(0)
	clustertest.Eventually(t, 10*time.Second, func() error {
		if api.calls.Load() != 1 {
			return errors.New("the first claim is not sent yet")
		}
		return nil
	})
	for i := 1; i <= 4; i++ {
		claim(i) // waiting: at the bound
	}
	select {
	case w := <-won:
		t.Fatalf("a claim within the bound was answered (%v) before the control plane", w)
	default:
	}
	claim(5)
	select {
	case w := <-won:
		if !w {
			t.Fatal("a claim beyond the bound was lost")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a claim beyond the bound waits")
	}

	// Entries until one is refused: the first batch in a call under way,
	// the queue then at its bound.
	stored := make(chan mailbox.Result, 8)
	entry := func(i int) *edgev1.MailboxEntry {
		return &edgev1.MailboxEntry{DeviceId: "d", UserId: "u", Event: []byte("e"), EventId: fmt.Sprint(i), SenderDeviceId: "s"}
	}
	mb.Store(entry(0), func(r mailbox.Result) { stored <- r })
	clustertest.Eventually(t, 10*time.Second, func() error {
		if api.calls.Load() != 2 {
			return errors.New("the first batch is not sent yet")
		}
		return nil
	})
	queued := 1
	for refused := false; !refused; {
		mb.Store(entry(queued), func(r mailbox.Result) {
			if errors.Is(r.Err, mailbox.ErrOverloaded) {
				refused = true // (called at once, on this goroutine)
				return
			}
			stored <- r
		})
		if !refused {
			queued++
		}
		if queued > 3 {
			t.Fatalf("%d entries queued, bound 2", queued)
		}
	}
	flushed := make(chan error, 1)
	go func() { flushed <- mb.Flush(context.Background()) }()
	select {
	case err := <-flushed:
		t.Fatalf("Flush returned (%v) with entries still unwritten", err)
	case <-time.After(100 * time.Millisecond): // a bound on a wrong answer, not a wait for a right one
	}
	close(api.release)
	if err := <-flushed; err != nil {
		t.Fatalf("Flush: %v", err)
	}
	for range queued {
		if r := <-stored; r.Err != nil || r.Status != edgev1.MailboxStatus_MAILBOX_STATUS_STORED {
			t.Fatalf("a queued entry: %+v", r)
		}
	}
	got := map[bool]int{}
	for range 5 {
		got[<-won]++
	}
	if got[true] != 3 || got[false] != 2 {
		t.Fatalf("the waiting claims' answers: %v, want the control plane's (3 won, 2 lost)", got)
	}
	stop()
	if err := mb.Flush(context.Background()); !errors.Is(err, mailbox.ErrStopped) {
		t.Fatalf("Flush after the writer stopped: %v", err)
	}
}

// historyChangingAPI answers a fetch after the history moved on (the
// control plane was restored while the read was under way).
type historyChangingAPI struct {
	mailbox.API
	history *atomic.Value
}

func (a historyChangingAPI) FetchMailbox(context.Context, string, uint64, uint32, uint32) (*edgev1.FetchMailboxResponse, error) {
	a.history.Store("restored")
	return &edgev1.FetchMailboxResponse{Entries: []*edgev1.MailboxEntry{{Seq: 1}}}, nil
}

// A page names the history known before it was read: its acks are then
// refused by a control plane restored meanwhile (the entries come again)
// instead of deleting the restored history's entries of the same seqs.
func TestAPageNamesTheHistoryBeforeItsRead(t *testing.T) {
	var history atomic.Value
	history.Store("before")
	mb, err := mailbox.New(mailbox.Config{API: historyChangingAPI{history: &history}, History: func() string { return history.Load().(string) }})
	if err != nil {
		t.Fatal(err)
	}
	page, err := mb.Fetch(context.Background(), "d", 0, 10, 0)
	if err != nil || page.History != "before" || len(page.Entries) != 1 {
		t.Fatalf("page %+v, %v; want history %q", page, err, "before")
	}
}

// refusingPuts is a control plane that refuses every PutMailbox for good.
type refusingPuts struct{ mailbox.API }

func (refusingPuts) PutMailbox(context.Context, []*edgev1.MailboxEntry) (*edgev1.PutMailboxResponse, error) {
	return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("refused"))
}

// A Flush behind entries whose call failed says so: the drain must not
// take hand-offs for stored that were not.
func TestFlushReportsAFailedBatch(t *testing.T) {
	mb, _ := startClient(t, mailbox.Config{API: refusingPuts{}, RetryFor: time.Second})
	res := make(chan mailbox.Result, 1)
	mb.Store(&edgev1.MailboxEntry{DeviceId: "d", UserId: "u", Event: []byte("e"), EventId: "1", SenderDeviceId: "s"}, func(r mailbox.Result) { res <- r })
	ferr := mb.Flush(context.Background())
	if r := <-res; r.Err == nil {
		t.Fatalf("the entry: %+v", r)
	}
	if connect.CodeOf(ferr) != connect.CodeInvalidArgument {
		t.Fatalf("Flush after a refused batch: %v", ferr)
	}
}

// pickyAPI stores every entry, but refuses a whole call with
// invalid_argument when one of its entries is malformed (an event id
// starting "bad"), as the control plane does; its first call waits for
// release, so that what is stored meanwhile goes in one batch.
type pickyAPI struct {
	mailbox.API
	release chan struct{}
	mu      sync.Mutex
	calls   []int // entries per call
}

func (a *pickyAPI) PutMailbox(ctx context.Context, entries []*edgev1.MailboxEntry) (*edgev1.PutMailboxResponse, error) {
	a.mu.Lock()
	first := len(a.calls) == 0
	a.calls = append(a.calls, len(entries))
	a.mu.Unlock()
	if first {
		select {
		case <-a.release:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	out := &edgev1.PutMailboxResponse{}
	for i, e := range entries {
		if strings.HasPrefix(e.GetEventId(), "bad") {
			return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("entries[%d].expires_at_ms is more than 366 days ahead", i))
		}
		out.Results = append(out.Results, &edgev1.PutMailboxResult{Status: edgev1.MailboxStatus_MAILBOX_STATUS_STORED, Seq: 1})
	}
	return out, nil
}

func (a *pickyAPI) callCount() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.calls)
}

// One malformed entry fails alone: the call the control plane refused
// for it is split down to it, and every other entry of the batch (other
// senders' events) is stored, in order, in a few calls.
func TestAMalformedEntryFailsAlone(t *testing.T) {
	api := &pickyAPI{release: make(chan struct{})}
	mb, _ := startClient(t, mailbox.Config{API: api, RetryFor: time.Minute})
	const n = 32
	results := make([]chan mailbox.Result, n)
	store := func(i int) {
		id := fmt.Sprint(i)
		if i == 13 {
			id = "bad"
		}
		results[i] = make(chan mailbox.Result, 1)
		mb.Store(&edgev1.MailboxEntry{DeviceId: "d", UserId: "u", Event: []byte("e"), EventId: id, SenderDeviceId: fmt.Sprint("s", i%4)},
			func(r mailbox.Result) { results[i] <- r })
	}
	store(0)
	clustertest.Eventually(t, 10*time.Second, func() error {
		if api.callCount() != 1 {
			return errors.New("the first entry is not sent yet")
		}
		return nil
	})
	for i := 1; i < n; i++ {
		store(i) // one batch, behind the first call
	}
	close(api.release)
	for i := range n {
		r := <-results[i]
		switch {
		case i == 13 && connect.CodeOf(r.Err) != connect.CodeInvalidArgument:
			t.Errorf("the malformed entry: %+v, want invalid_argument", r)
		case i != 13 && (r.Err != nil || r.Status != edgev1.MailboxStatus_MAILBOX_STATUS_STORED):
			t.Errorf("entry %d: %+v, want stored", i, r)
		}
	}
	// 1 + the batch of 31 halved down to the bad entry: 5 levels, two
	// calls each, the bad half split again.
	if calls := api.callCount(); calls > 1+1+2*5 {
		t.Errorf("%d calls for one bad entry in %d", calls, n)
	}
}

// While the control plane has no quorum, every entry and claim of a long
// queue (many batches) is answered within about RetryFor of its Store or
// Claim, not a RetryFor per batch ahead of it; and once the quorum is
// back the writer stores again, and claims are decided by the control
// plane again.
func TestEveryEntryIsAnsweredWithinRetryForWhileThereIsNoQuorum(t *testing.T) {
	c := clustertest.Start(t, 3, clustertest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cc, userID, devs := edgeOf(ctx, t, c, 2)
	const retryFor = 2 * time.Second
	mb, _ := startClient(t, mailbox.Config{API: cc, MaxBatch: 4, RetryFor: retryFor, ProbeAfter: 500 * time.Millisecond})
	entry := func(id string) *edgev1.MailboxEntry {
		return &edgev1.MailboxEntry{DeviceId: devs[0], UserId: userID, Event: []byte(id), EventId: id, SenderDeviceId: devs[1],
			ExpiresAtMs: time.Now().Add(time.Hour).UnixMilli()}
	}
	// store waits for an entry's result, at most a bound that only a
	// wrong answer reaches.
	store := func(id string) mailbox.Result {
		res := make(chan mailbox.Result, 1)
		mb.Store(entry(id), func(r mailbox.Result) { res <- r })
		select {
		case r := <-res:
			return r
		case <-time.After(time.Minute):
			t.Fatalf("entry %s not answered in a minute", id)
			return mailbox.Result{}
		}
	}
	if r := store("before"); r.Err != nil || r.Status != edgev1.MailboxStatus_MAILBOX_STATUS_STORED {
		t.Fatalf("with a quorum: %+v", r)
	}

	c.Isolate(1)
	c.Isolate(2)
	clustertest.Eventually(t, 30*time.Second, func() error {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		if _, err := cc.PutMailbox(cctx, []*edgev1.MailboxEntry{entry("probe")}); err == nil {
			return errors.New("the control plane still takes writes")
		}
		return nil
	})

	// Ten batches of entries, ten of claims, all queued at once.
	const n = 40
	type answer struct {
		after time.Duration
		err   error
		won   bool
	}
	entries, claims := make(chan answer, n), make(chan answer, n)
	start := time.Now()
	for i := range n {
		mb.Store(entry(fmt.Sprint("e", i)), func(r mailbox.Result) { entries <- answer{after: time.Since(start), err: r.Err} })
		mb.Claim(&edgev1.EventClaim{SenderDeviceId: devs[1], EventId: fmt.Sprint("c", i), DeviceId: devs[0], UserId: userID,
			ExpiresAtMs: time.Now().Add(time.Hour).UnixMilli()}, func(won bool) { claims <- answer{after: time.Since(start), won: won} })
	}
	const bound = retryFor + 3*time.Second // slack for a busy machine under -race
	for i := range n {
		for kind, ch := range map[string]chan answer{"entry": entries, "claim": claims} {
			select {
			case a := <-ch:
				switch {
				case kind == "entry" && !errors.Is(a.err, mailbox.ErrUnavailable):
					t.Fatalf("entry answered %v without a quorum, want ErrUnavailable", a.err)
				case kind == "claim" && !a.won:
					t.Fatal("a claim the control plane could not decide was lost")
				case a.after > bound:
					t.Fatalf("the %dth %s answered after %v, want at most RetryFor (%v) and slack", i+1, kind, a.after, retryFor)
				}
			case <-time.After(time.Minute):
				t.Fatalf("%d %ss answered in a minute", i, kind)
			}
		}
	}
	c.Heal(1)
	c.Heal(2)
	clustertest.Eventually(t, 30*time.Second, func() error {
		if r := store(fmt.Sprint("after-", time.Now().UnixNano())); r.Err != nil || r.Status != edgev1.MailboxStatus_MAILBOX_STATUS_STORED {
			return fmt.Errorf("after the quorum came back: %+v", r)
		}
		return nil
	})
	// Claims are the control plane's again: a second device loses an
	// event the first took.
	clustertest.Eventually(t, 30*time.Second, func() error {
		id := fmt.Sprint("claim-", time.Now().UnixNano())
		won := make(chan bool, 2)
		for _, d := range devs {
			mb.Claim(&edgev1.EventClaim{SenderDeviceId: devs[1], EventId: id, DeviceId: d, UserId: userID,
				ExpiresAtMs: time.Now().Add(time.Hour).UnixMilli()}, func(w bool) { won <- w })
		}
		if first, second := <-won, <-won; !first || second {
			return fmt.Errorf("claims answered %v, %v: not decided by the control plane", first, second)
		}
		return nil
	})
}

// unavailableAPI answers every call Unavailable, as a control plane
// without a leader does, until ok is set; it counts the calls.
type unavailableAPI struct {
	mailbox.API
	ok     atomic.Bool
	puts   atomic.Int32
	claims atomic.Int32
}

func (a *unavailableAPI) PutMailbox(_ context.Context, entries []*edgev1.MailboxEntry) (*edgev1.PutMailboxResponse, error) {
	a.puts.Add(1)
	if !a.ok.Load() {
		return nil, connect.NewError(connect.CodeUnavailable, errors.New("no leader"))
	}
	out := &edgev1.PutMailboxResponse{}
	for range entries {
		out.Results = append(out.Results, &edgev1.PutMailboxResult{Status: edgev1.MailboxStatus_MAILBOX_STATUS_STORED, Seq: 1})
	}
	return out, nil
}

func (a *unavailableAPI) ClaimEvents(_ context.Context, claims []*edgev1.EventClaim) (*edgev1.ClaimEventsResponse, error) {
	a.claims.Add(1)
	if !a.ok.Load() {
		return nil, connect.NewError(connect.CodeUnavailable, errors.New("no leader"))
	}
	return &edgev1.ClaimEventsResponse{Won: make([]bool, len(claims))}, nil
}

// Once a batch gave up on an unavailable control plane, Store and Claim
// answer at once, without a call, until the probe is due; the probe is
// one call, which either finds the control plane back (and the writer
// retries as usual again) or puts the circuit down again.
func TestAfterABatchGaveUpStoresAreAnsweredAtOnce(t *testing.T) {
	api := &unavailableAPI{}
	mb, _ := startClient(t, mailbox.Config{API: api, MaxBatch: 1, RetryFor: 300 * time.Millisecond, ProbeAfter: time.Hour})
	entry := &edgev1.MailboxEntry{DeviceId: "d", UserId: "u", Event: []byte("e"), EventId: "1", SenderDeviceId: "s"}
	claim := &edgev1.EventClaim{SenderDeviceId: "s", EventId: "1", DeviceId: "d", UserId: "u"}
	res, won := make(chan mailbox.Result, 1), make(chan bool, 1)
	mb.Store(entry, func(r mailbox.Result) { res <- r })
	mb.Claim(claim, func(w bool) { won <- w })
	if r := <-res; !errors.Is(r.Err, mailbox.ErrUnavailable) {
		t.Fatalf("an entry the control plane did not take: %+v", r)
	}
	if !<-won {
		t.Fatal("a claim the control plane did not decide was lost")
	}
	puts, claims := api.puts.Load(), api.claims.Load()
	if puts < 2 || claims < 2 {
		t.Fatalf("%d puts, %d claims: the first batches were not retried", puts, claims)
	}
	// Answered on the caller's goroutine, before Store and Claim return.
	answered := false
	mb.Store(entry, func(r mailbox.Result) { answered = errors.Is(r.Err, mailbox.ErrUnavailable) })
	if !answered {
		t.Fatal("a store after a batch gave up was not answered at once")
	}
	answered = false
	mb.Claim(claim, func(w bool) { answered = w })
	if !answered {
		t.Fatal("a claim after a batch gave up was not answered at once")
	}
	if err := mb.Flush(context.Background()); err != nil && !errors.Is(err, mailbox.ErrUnavailable) {
		t.Fatal(err)
	}
	if api.puts.Load() != puts || api.claims.Load() != claims {
		t.Fatalf("calls while the circuit is down: %d puts, %d claims more", api.puts.Load()-puts, api.claims.Load()-claims)
	}

	// The probe: due at once here.
	mb2, _ := startClient(t, mailbox.Config{API: api, MaxBatch: 1, RetryFor: 300 * time.Millisecond, ProbeAfter: time.Nanosecond})
	mb2.Store(entry, func(r mailbox.Result) { res <- r })
	<-res // gave up: the circuit is down
	puts = api.puts.Load()
	mb2.Store(entry, func(r mailbox.Result) { res <- r })
	if r := <-res; !errors.Is(r.Err, mailbox.ErrUnavailable) || api.puts.Load() != puts+1 {
		t.Fatalf("the probe: %+v after %d calls, want ErrUnavailable after one", r, api.puts.Load()-puts)
	}
	api.ok.Store(true)
	mb2.Store(entry, func(r mailbox.Result) { res <- r })
	if r := <-res; r.Err != nil || r.Status != edgev1.MailboxStatus_MAILBOX_STATUS_STORED {
		t.Fatalf("the probe once the control plane is back: %+v", r)
	}
	// Back to retrying.
	api.ok.Store(false)
	puts = api.puts.Load()
	mb2.Store(entry, func(r mailbox.Result) { res <- r })
	if r := <-res; !errors.Is(r.Err, mailbox.ErrUnavailable) || api.puts.Load() < puts+2 {
		t.Fatalf("after the control plane came back and went: %+v after %d calls, want retries", r, api.puts.Load()-puts)
	}
}

// slowPuts stores every entry, taking delay to answer unless the call's
// context ends first.
type slowPuts struct {
	mailbox.API
	delay time.Duration
}

func (s *slowPuts) PutMailbox(ctx context.Context, entries []*edgev1.MailboxEntry) (*edgev1.PutMailboxResponse, error) {
	select {
	case <-time.After(s.delay):
	case <-ctx.Done():
		return nil, connect.NewError(connect.CodeDeadlineExceeded, ctx.Err())
	}
	out := &edgev1.PutMailboxResponse{}
	for range entries {
		out.Results = append(out.Results, &edgev1.PutMailboxResult{Status: edgev1.MailboxStatus_MAILBOX_STATUS_STORED, Seq: 1})
	}
	return out, nil
}

// A call whose batch is near its RetryFor still gets at least a second:
// cut off sooner, a slow but working control plane may commit it all the
// same, and its entries, answered unavailable, come back as resends.
func TestACallNearItsDeadlineStillGetsItsSecond(t *testing.T) {
	api := &slowPuts{delay: 300 * time.Millisecond}
	mb, _ := startClient(t, mailbox.Config{API: api, MaxBatch: 1, RetryFor: 100 * time.Millisecond})
	res := make(chan mailbox.Result, 1)
	mb.Store(&edgev1.MailboxEntry{DeviceId: "d", UserId: "u", Event: []byte("e"), EventId: "1", SenderDeviceId: "s"}, func(r mailbox.Result) { res <- r })
	if r := <-res; r.Err != nil || r.Status != edgev1.MailboxStatus_MAILBOX_STATUS_STORED {
		t.Fatalf("an entry a slow control plane stored: %+v", r)
	}
}

// A control node that reads as many mailboxes as it may at once refuses
// a fetch as busy: the client tells that apart from other failures
// (session.ErrMailboxBusy: the session reads again without refusing what
// it holds behind the mailbox), counts it and warns once for many.
func TestABusyControlNodeIsToldApart(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{Configure: func(cfg *server.Config) {
		cfg.Mailbox.Fetches = api.FetchLimits{Max: 1, Wait: 50 * time.Millisecond, WriteTimeout: 10 * time.Minute}
	}})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cc, userID, devIDs := edgeOf(ctx, t, c, 1)
	reg := prometheus.NewRegistry()
	var logs relaytest.Buffer
	mb, _ := startClient(t, mailbox.Config{API: cc, Registerer: reg, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	event := make([]byte, 64<<10)
	_, _ = rand.Read(event) // so that compression cannot shrink the answer
	stored := make(chan mailbox.Result, 1)
	mb.Store(&edgev1.MailboxEntry{DeviceId: devIDs[0], UserId: userID, Event: event, EventId: "big", SenderDeviceId: "s",
		ExpiresAtMs: time.Now().Add(time.Hour).UnixMilli()}, func(r mailbox.Result) { stored <- r })
	if r := <-stored; r.Status != edgev1.MailboxStatus_MAILBOX_STATUS_STORED {
		t.Fatalf("store: %+v", r)
	}
	tok, err := cc.Token(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// A reader that does not take its answer holds the node's one place.
	_, release := clustertest.UnreadCall(t, "http://"+c.Nodes[0].Server.APIAddr(), "127.0.0.1",
		edgev1connect.MailboxServiceFetchMailboxProcedure, tok, &edgev1.FetchMailboxRequest{DeviceId: devIDs[0]})
	for range 3 {
		if _, err := mb.Fetch(ctx, devIDs[0], 0, 10, 0); !errors.Is(err, session.ErrMailboxBusy) {
			t.Fatalf("a fetch while the node's place is held: %v, want session.ErrMailboxBusy", err)
		}
	}
	if n := strings.Count(logs.String(), "refused mailbox reads as busy"); n != 1 {
		t.Fatalf("%d warnings for three busy reads, want 1:\n%s", n, logs.String())
	}
	// Other failures are not busy.
	if _, err := mb.Fetch(ctx, "", 0, 10, 0); err == nil || errors.Is(err, session.ErrMailboxBusy) {
		t.Fatalf("a malformed fetch: %v, want an error other than busy", err)
	}
	release()
	clustertest.Eventually(t, 30*time.Second, func() error {
		page, err := mb.Fetch(ctx, devIDs[0], 0, 10, 0)
		if err == nil && len(page.Entries) != 1 {
			err = fmt.Errorf("fetched %d entries, want 1", len(page.Entries))
		}
		return err
	})
	// Reads the Eventually made before the place came back count busy.
	fetches := func(result string) float64 {
		return clustertest.MetricValue(t, reg, "relay_edge_mailbox_fetches_total", "result", result)
	}
	if ok, busy, failed := fetches("ok"), fetches("busy"), fetches("error"); ok != 1 || busy < 3 || failed != 1 {
		t.Fatalf("relay_edge_mailbox_fetches_total: ok=%v busy=%v error=%v, want ok=1 busy>=3 error=1", ok, busy, failed)
	}
}

// ackRecorder is a control plane whose AckMailbox records each call and
// answers with answer (nil: success); the other calls are not made.
type ackRecorder struct {
	mailbox.API
	mu     sync.Mutex
	calls  []string // device of each call
	acked  map[string]int
	answer func(ctx context.Context, call int) error
}

func (a *ackRecorder) AckMailbox(ctx context.Context, deviceID, _ string, seqs []uint64) error {
	a.mu.Lock()
	a.calls = append(a.calls, deviceID)
	call := len(a.calls)
	a.mu.Unlock()
	if err := a.answer(ctx, call); err != nil {
		return err
	}
	a.mu.Lock()
	a.acked[deviceID] += len(seqs)
	a.mu.Unlock()
	return nil
}

func (a *ackRecorder) snapshot() ([]string, map[string]int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.calls), maps.Clone(a.acked)
}

// A control plane that fails an ack call ends the pass: the acks of the
// other devices are queued again with it and go after the backoff, rather
// than each being sent (each call may wait 10 s) to a control plane that
// just failed. The second call is the first device's again.
func TestAFailedAckEndsThePass(t *testing.T) {
	api := &ackRecorder{acked: map[string]int{}, answer: func(_ context.Context, call int) error {
		if call <= 2 {
			return connect.NewError(connect.CodeUnavailable, errors.New("no leader"))
		}
		return nil
	}}
	mb, _ := startClient(t, mailbox.Config{API: api})
	const devices = 20
	for i := range devices {
		mb.Ack(fmt.Sprintf("d%02d", i), "h", uint64(i+1))
	}
	clustertest.Eventually(t, 30*time.Second, func() error {
		if _, acked := api.snapshot(); len(acked) != devices {
			return fmt.Errorf("%d of %d devices' acks sent", len(acked), devices)
		}
		return nil
	})
	calls, _ := api.snapshot()
	if calls[0] != calls[1] {
		t.Fatalf("calls %v: after the first failed, the pass went on to %s", calls[:2], calls[1])
	}
}

// Acks of a pass that shutdown cuts short go in the last flush: the call
// under way when the writer stops ends with its context, and its acks and
// those not tried yet are sent within the flush's own deadline, not
// dropped.
func TestAcksOfAPassCutShortGoInTheLastFlush(t *testing.T) {
	inCall := make(chan struct{})
	api := &ackRecorder{acked: map[string]int{}, answer: func(ctx context.Context, call int) error {
		if call == 1 {
			close(inCall)
			<-ctx.Done() // the node stops during the first call
			return ctx.Err()
		}
		return nil
	}}
	mb, stop := startClient(t, mailbox.Config{API: api})
	const devices = 5
	for i := range devices {
		mb.Ack(fmt.Sprintf("d%d", i), "h", uint64(i+1), uint64(i+100))
	}
	<-inCall
	stop()
	if _, acked := api.snapshot(); len(acked) != devices {
		t.Fatalf("acks of %d of %d devices sent by the last flush: %v", len(acked), devices, acked)
	}
}

// gatedAPI is the control plane's API with its calls held at will: a
// PutMailbox answered waits for holdPut (when set) before it returns,
// and an AckMailbox waits for holdAck (when set) before it is made.
// ackCalls receives the device of each AckMailbox call as it starts,
// answered a signal as each held PutMailbox got its answer.
type gatedAPI struct {
	mailbox.API
	puts     atomic.Int32
	holdPut  atomic.Pointer[chan struct{}]
	holdAck  atomic.Pointer[chan struct{}]
	ackCalls chan string
	answered chan struct{}
}

func (g *gatedAPI) PutMailbox(ctx context.Context, entries []*edgev1.MailboxEntry) (*edgev1.PutMailboxResponse, error) {
	g.puts.Add(1)
	resp, err := g.API.PutMailbox(ctx, entries)
	if hold := g.holdPut.Load(); hold != nil {
		g.answered <- struct{}{}
		<-*hold
	}
	return resp, err
}

func (g *gatedAPI) AckMailbox(ctx context.Context, deviceID, history string, seqs []uint64) error {
	g.ackCalls <- deviceID
	if hold := g.holdAck.Load(); hold != nil {
		<-*hold
	}
	return g.API.AckMailbox(ctx, deviceID, history, seqs)
}

// An ack written while a call for the same device is on its way makes
// room the call may not have found: a FULL that call gets does not mark
// the mailbox full (which would answer the device's next entries FULL
// for 2 s without asking, though they fit now).
func TestAnAckWrittenDuringACallLiftsTheFullMark(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{Configure: func(cfg *server.Config) { cfg.Mailbox.MaxEntriesPerDevice = 2 }})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cc, userID, devIDs := edgeOf(ctx, t, c, 2)
	dev := devIDs[0]
	g := &gatedAPI{API: cc, ackCalls: make(chan string, 16), answered: make(chan struct{}, 1)}
	mb, _ := startClient(t, mailbox.Config{API: g})
	store := func(id string) mailbox.Result {
		t.Helper()
		res := make(chan mailbox.Result, 1)
		mb.Store(&edgev1.MailboxEntry{DeviceId: dev, UserId: userID, Event: []byte(id), EventId: id, SenderDeviceId: "s",
			ExpiresAtMs: time.Now().Add(time.Hour).UnixMilli()}, func(r mailbox.Result) { res <- r })
		select {
		case r := <-res:
			return r
		case <-ctx.Done():
			t.Fatalf("no answer for %s", id)
			return mailbox.Result{}
		}
	}
	var seqs []uint64
	for _, id := range []string{"e1", "e2"} {
		r := store(id)
		if r.Err != nil || r.Status != edgev1.MailboxStatus_MAILBOX_STATUS_STORED {
			t.Fatalf("%s: %+v", id, r)
		}
		seqs = append(seqs, r.Seq)
	}
	// Full: the control plane says so, and the next entry is answered so
	// without a call.
	if r := store("e3"); r.Status != edgev1.MailboxStatus_MAILBOX_STATUS_FULL {
		t.Fatalf("e3 into a full mailbox: %+v", r)
	}
	puts := g.puts.Load()
	if r := store("e4"); r.Status != edgev1.MailboxStatus_MAILBOX_STATUS_FULL || g.puts.Load() != puts {
		t.Fatalf("e4 into a mailbox marked full: %+v after %d calls, want FULL and none", r, g.puts.Load()-puts)
	}

	// e1's ack is queued (the mark goes) and held before it is written;
	// e5 is answered FULL, and held before its answer is taken; e1's ack
	// is written then.
	ackHold, putHold := make(chan struct{}), make(chan struct{})
	g.holdAck.Store(&ackHold)
	mb.Ack(dev, "", seqs[0])
	if got := <-g.ackCalls; got != dev {
		t.Fatalf("ack call for %s", got)
	}
	g.holdPut.Store(&putHold)
	e5 := make(chan mailbox.Result, 1)
	mb.Store(&edgev1.MailboxEntry{DeviceId: dev, UserId: userID, Event: []byte("e5"), EventId: "e5", SenderDeviceId: "s",
		ExpiresAtMs: time.Now().Add(time.Hour).UnixMilli()}, func(r mailbox.Result) { e5 <- r })
	<-g.answered
	g.holdAck.Store(nil)
	close(ackHold)
	// Another device's ack, queued now, is called only after the pass
	// that wrote e1's has ended.
	mb.Ack(devIDs[1], "", 1)
	if got := <-g.ackCalls; got != devIDs[1] {
		t.Fatalf("ack call for %s, want the second device's", got)
	}
	g.holdPut.Store(nil)
	close(putHold)
	if r := <-e5; r.Status != edgev1.MailboxStatus_MAILBOX_STATUS_FULL {
		t.Fatalf("e5, answered before the ack was written: %+v, want FULL", r)
	}
	// The room e1's ack made is asked for, and found.
	puts = g.puts.Load()
	if r := store("e6"); r.Err != nil || r.Status != edgev1.MailboxStatus_MAILBOX_STATUS_STORED || g.puts.Load() != puts+1 {
		t.Fatalf("e6 after the ack: %+v after %d calls, want STORED by one call", r, g.puts.Load()-puts)
	}
}
