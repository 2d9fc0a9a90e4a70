package server_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/clustertest"
	controlserver "github.com/edge-relay/relay/control/server"
	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/edge/session"
	"github.com/edge-relay/relay/internal/relaytest"
	"github.com/edge-relay/relay/proto/edge/v1/edgev1connect"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// readyz returns the status and body of /readyz at base: an edge's admin
// URL, or its HTTPS URL (whose certificate is not checked).
func readyz(base string) (int, string, error) { return get(base, "/readyz") }

// get fetches path from an edge's port at base.
func get(base, path string) (int, string, error) {
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	defer hc.CloseIdleConnections()
	resp, err := hc.Get(base + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), err
}

// waitNotReady waits until the edge's /readyz is 503 with a reason that
// contains every one of want.
func waitNotReady(t *testing.T, s *server.Server, want ...string) {
	t.Helper()
	clustertest.Eventually(t, 30*time.Second, func() error {
		code, body, err := readyz(s.AdminURL())
		if err != nil {
			return err
		}
		if code != http.StatusServiceUnavailable {
			return fmt.Errorf("/readyz %d %q", code, body)
		}
		for _, w := range want {
			if !strings.Contains(body, w) {
				return fmt.Errorf("/readyz %q, want %q in it", body, w)
			}
		}
		return nil
	})
}

// edgeRecord is the control plane's record of an edge id.
func edgeRecord(t *testing.T, r *relaytest.Relay, id string) *statev1.Edge {
	t.Helper()
	edges, err := r.Cluster.Nodes[0].Server.Node().FSM().Edges()
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range edges {
		if e.GetId() == id {
			return e
		}
	}
	return nil
}

// A second edge started with the id of a running one (a cloned host, a
// copied configuration) is refused and says so, instead of taking the id
// over and making the mesh flap; when it stops it leaves the running
// edge's membership alone. The running edge restarted after a crash, at
// its mesh address, takes its id back at once, without waiting out the
// lease its previous process held.
func TestASecondEdgeWithTheSameIDIsRefused(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{
		// Long enough that only the restart rule can let the restarted
		// edge in within the test's waits.
		Cluster: clustertest.Options{Configure: func(c *controlserver.Config) { c.Edges.LeaseTTL = 10 * time.Minute }},
	})
	first := r.Edges[0]
	held := edgeRecord(t, r, "edge-0")
	if held == nil || held.GetAddrs()[0] != first.Addr() {
		t.Fatalf("edge-0's record: %v", held)
	}

	cfg := r.EdgeConfig(0)
	cfg.AdminAddr = "127.0.0.1:0"
	clone, err := server.Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	waitNotReady(t, clone, "another running edge", "same id")
	// The HTTPS port, which anyone reaches, says only that it is starting:
	// the registration error names the control plane's URLs.
	if code, body, err := readyz(clone.HTTPSURL()); err != nil || code != http.StatusServiceUnavailable || body != "not ready: starting\n" {
		t.Fatalf("public /readyz %d %q %v, want 503 %q", code, body, err, "not ready: starting\n")
	}
	if !first.Ready() {
		t.Fatal("the running edge is not ready any more")
	}
	if e := edgeRecord(t, r, "edge-0"); e.GetAddrs()[0] != first.Addr() || e.GetMeshAddr() != held.GetMeshAddr() {
		t.Fatalf("the clone took the record: %v", e)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := clone.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if e := edgeRecord(t, r, "edge-0"); e == nil || e.GetAddrs()[0] != first.Addr() {
		t.Fatalf("the clone's shutdown removed the running edge: %v", e)
	}

	// A crash, and a restart on the same mesh address.
	r.KillEdge(0)
	cfg = r.EdgeConfig(0)
	cfg.MeshAddr = held.GetMeshAddr()
	restarted := r.StartEdgeWith(0, cfg)
	if e := edgeRecord(t, r, "edge-0"); e.GetAddrs()[0] != restarted.Addr() {
		t.Fatalf("the restarted edge does not hold its id: %v", e)
	}
}

// An edge whose lease renewals keep failing says so once the lease has
// run out on its own clock (relay_edge_member 0: other edges no longer
// route to it), and is a member again once a renewal gets through. It
// stays ready: during an outage of the whole control plane every edge's
// lease runs out, and readiness then follows --control-grace alone.
func TestAnEdgeWhoseLeaseRunsOutSaysSo(t *testing.T) {
	var refuse atomic.Bool
	block := connect.UnaryInterceptorFunc(func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			if refuse.Load() && req.Spec().Procedure == edgev1connect.EdgeServiceRegisterEdgeProcedure {
				return nil, connect.NewError(connect.CodeUnavailable, errors.New("test: registrations refused"))
			}
			return next(ctx, req)
		}
	})
	r := relaytest.Start(t, relaytest.Options{
		Cluster: clustertest.Options{Configure: func(c *controlserver.Config) { c.Edges.LeaseTTL = 1500 * time.Millisecond }},
		Edge: func(_ int, cfg *server.Config) {
			cfg.AdminAddr = "127.0.0.1:0"
			cfg.Control.Options = append(cfg.Control.Options, connect.WithInterceptors(block))
		},
	})
	e := r.Edges[0]
	if code, body, err := readyz(e.AdminURL()); err != nil || code != http.StatusOK {
		t.Fatalf("/readyz %d %q %v", code, body, err)
	}
	member := func(want float64) {
		t.Helper()
		clustertest.Eventually(t, 30*time.Second, func() error {
			if v := relaytest.Gauge(t, e, "relay_edge_member", "", ""); v != want {
				return fmt.Errorf("relay_edge_member %v, want %v", v, want)
			}
			return nil
		})
	}
	member(1)
	refuse.Store(true)
	member(0)
	if code, body, err := readyz(e.AdminURL()); err != nil || code != http.StatusOK {
		t.Fatalf("/readyz %d %q %v with the lease run out", code, body, err)
	}
	refuse.Store(false)
	member(1)
}

// An edge that leaves the member list on shutdown is not put back by its
// own renewal: its registration stops, and a renewal under way ends,
// before it deregisters. Before, renewals went on until the last step of
// the shutdown, and one that started during the deregistration (or
// landed after it) wrote the edge back for a lease, its peers dialing a
// closed mesh port meanwhile. Here renewals come every 200 ms and the
// deregistration takes 600 ms at the control plane (a proxy in front of
// it holds it): no registration starts after the deregistration began.
func TestAnEdgeThatLeftIsNotPutBackByItsRenewal(t *testing.T) {
	var (
		mu           sync.Mutex
		deregistered bool
		late         int // registrations that started after the deregistration did
	)
	r := relaytest.Start(t, relaytest.Options{
		Cluster: clustertest.Options{Configure: func(cfg *controlserver.Config) { cfg.Edges.LeaseTTL = 600 * time.Millisecond }},
		Edge: func(_ int, cfg *server.Config) {
			controlProxy(t, cfg, func(w http.ResponseWriter, req *http.Request, pass http.Handler) {
				switch req.URL.Path {
				case edgev1connect.EdgeServiceRegisterEdgeProcedure:
					mu.Lock()
					if deregistered {
						late++
					}
					mu.Unlock()
				case edgev1connect.EdgeServiceDeregisterEdgeProcedure:
					mu.Lock()
					deregistered = true
					mu.Unlock()
					time.Sleep(600 * time.Millisecond) // a slow control plane, not a synchronisation
				}
				pass.ServeHTTP(w, req)
			})
			cfg.DrainWindow = 0
		},
	})
	id := r.EdgeConfig(0).EdgeID
	e := r.Edges[0]
	r.Edges[0] = nil
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_ = e.Shutdown(ctx)
	mu.Lock()
	gotLate, gotDeregistered := late, deregistered
	mu.Unlock()
	if !gotDeregistered || gotLate != 0 {
		t.Fatalf("deregistered %v; %d registrations started after the deregistration did", gotDeregistered, gotLate)
	}
	if edgeRecord(t, r, id) != nil {
		t.Fatalf("edge %s is still a member after its shutdown", id)
	}
}

// controlProxy puts a proxy before the control plane cfg reaches: every
// call goes through handle, which passes it on (or not) with pass.
func controlProxy(t *testing.T, cfg *server.Config, handle func(w http.ResponseWriter, req *http.Request, pass http.Handler)) {
	t.Helper()
	target, err := url.Parse(cfg.Control.URLs[0])
	if err != nil {
		t.Fatal(err)
	}
	proxy := httputil.NewSingleHostReverseProxy(target)
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: &p}
	t.Cleanup(tr.CloseIdleConnections)
	proxy.Transport, proxy.FlushInterval = tr, -1
	cfg.Control.URLs = []string{relaytest.ServeH2C(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		handle(w, req, proxy)
	}))}
}

// A device whose session ended while the control plane refused the edge's
// activity report still gets its last_seen: the failed report's devices
// go with the next one. Before, they were dropped, and a device that left
// meanwhile was reported by no later report (only those online are).
func TestActivityOfAFailedReportGoesWithTheNext(t *testing.T) {
	var failing atomic.Bool
	failing.Store(true)
	var failed atomic.Int64
	r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
		cfg.ActivityEvery = 100 * time.Millisecond
		controlProxy(t, cfg, func(w http.ResponseWriter, req *http.Request, pass http.Handler) {
			if req.URL.Path == edgev1connect.ActivityServiceReportActivityProcedure && failing.Load() {
				failed.Add(1)
				http.Error(w, "no leader", http.StatusServiceUnavailable)
				return
			}
			pass.ServeHTTP(w, req)
		})
	}})
	u := r.User("seen")
	d := r.Device(u, "phone")
	c := r.Dial(0, d, client.QUIC)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	relaytest.WaitEdge(t, r.Edges[0], 30*time.Second, func(st session.Stats) error {
		if st.Sessions != 0 {
			return fmt.Errorf("%d sessions", st.Sessions)
		}
		return nil
	})
	// Two reports after the session ended fail: the first (or one in
	// flight as it ended) had its activity; with nobody online, only that
	// activity, kept for the next, makes the edge report again.
	n := failed.Load()
	clustertest.Eventually(t, 30*time.Second, func() error {
		if failed.Load() < n+2 {
			return errors.New("the edge reported nothing again after a failed report: it dropped the ended session's activity")
		}
		return nil
	})
	failing.Store(false)
	clustertest.Eventually(t, 30*time.Second, func() error {
		dev, err := r.Cluster.Nodes[0].Server.Node().FSM().GetDevice(u, d.ID)
		if err != nil {
			return err
		}
		if dev.GetLastSeenMs() == 0 {
			return errors.New("no last_seen yet")
		}
		return nil
	})
}

// A device port that stops accepting (a fatal error of its socket) makes
// the edge not ready, and the admin port says which and why, so that a
// load balancer or Kubernetes takes it out and its devices move on;
// before, /readyz answered 200 while no QUIC or WebTransport session
// could come in, and nothing was logged. Only a restart mends it, so
// /healthz fails too, and a liveness probe restarts the edge (before, it
// answered 200 and the edge stayed up, useless, until someone noticed).
func TestADeadDevicePortMakesTheEdgeNotReady(t *testing.T) {
	r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) { cfg.AdminAddr = "127.0.0.1:0" }})
	e := r.Edges[0]
	if !e.Ready() {
		t.Fatal("the edge is not ready before its port failed")
	}
	for _, base := range []string{e.AdminURL(), e.HTTPSURL()} {
		if code, body, err := get(base, "/healthz"); err != nil || code != http.StatusOK || body != "ok\n" {
			t.Fatalf("%s/healthz before the port failed: %d %q %v", base, code, body, err)
		}
	}
	e.KillDevicePort()
	waitNotReady(t, e, "device port down", "quic port")
	if code, body, err := readyz(e.HTTPSURL()); err != nil || code != http.StatusServiceUnavailable || body != "not ready: device port down\n" {
		t.Fatalf("the public /readyz: %d %q %v", code, body, err)
	}
	if code, body, err := get(e.AdminURL(), "/healthz"); err != nil || code != http.StatusServiceUnavailable || !strings.Contains(body, "device port down: quic port") {
		t.Fatalf("the admin /healthz: %d %q %v", code, body, err)
	}
	if code, body, err := get(e.HTTPSURL(), "/healthz"); err != nil || code != http.StatusServiceUnavailable || body != "unhealthy: device port down (restart the edge)\n" {
		t.Fatalf("the public /healthz: %d %q %v", code, body, err)
	}
}
