package server

import (
	"context"
	"net"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/edge/directory"
	"github.com/edge-relay/relay/edge/mesh"
	"github.com/edge-relay/relay/edge/session"
	"github.com/edge-relay/relay/internal/jitter"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
)

// register keeps the edge in the member list: it registers (getting a
// mesh certificate for its key), renews before the lease runs out, and
// retries with backoff while the control plane is unreachable or another
// running edge holds the id. The lease is tracked on the edge's own
// clock, counted from each request's sending: once it has run out without
// a renewal other edges no longer route to this one, which
// relay_edge_member and the log say.
func (s *Server) register(ctx context.Context, quit <-chan struct{}) {
	meshAddr := s.cfg.MeshAdvertise
	if meshAddr == "" {
		meshAddr = s.mesh.Addr().String()
	}
	if host, port, err := net.SplitHostPort(meshAddr); err == nil && (host == "" || net.ParseIP(host).IsUnspecified()) {
		s.log.Warn("the mesh listens on all addresses; set --mesh-advertise to an address other edges can reach", "mesh_addr", meshAddr)
		meshAddr = net.JoinHostPort("127.0.0.1", port)
	}
	backoff := 100 * time.Millisecond
	lapseLogged := false
	for {
		sent := time.Now()
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		resp, err := s.control.RegisterEdge(rctx, &edgev1.RegisterEdgeRequest{
			EdgeId: s.cfg.EdgeID, MeshAddr: meshAddr, DeviceAddrs: []string{s.Addr()}, MeshPublicKey: s.identity.PublicKey(),
		})
		cancel()
		wait := backoff
		if err == nil {
			err = s.identity.Set(resp.GetMeshCertificate(), resp.GetCaCertificate())
		}
		switch {
		case err == nil:
			until, renew := time.UnixMilli(resp.GetLeaseExpiresAtMs()), time.UnixMilli(resp.GetRenewAfterMs())
			if ttl := time.Duration(resp.GetLeaseTtlMs()) * time.Millisecond; ttl > 0 {
				until, renew = sent.Add(ttl), sent.Add(ttl/3)
			}
			s.regErr.Store(nil)
			switch prev := s.leaseUntil.Swap(until.UnixNano()); {
			case prev == 0:
				s.log.Info("registered as a member", "mesh_addr", meshAddr, "lease_until", until)
			case prev <= sent.UnixNano():
				s.log.Info("registered as a member again after the lease ran out", "mesh_addr", meshAddr, "lease_until", until)
			}
			lapseLogged = false
			backoff = 100 * time.Millisecond
			wait = max(time.Until(renew), 100*time.Millisecond)
		case ctx.Err() == nil:
			msg := err.Error()
			s.regErr.Store(&msg)
			if connect.CodeOf(err) == connect.CodeAlreadyExists {
				s.log.Error("another running edge holds this edge id; retrying until its lease ends (give every edge its own --edge-id)", "edge_id", s.cfg.EdgeID, "err", err, "backoff", backoff)
			} else {
				s.log.Warn("registration failed; retrying", "err", err, "backoff", backoff)
			}
			wait = jitter.Spread(backoff)
			if until := s.leaseUntil.Load(); until != 0 && until <= time.Now().UnixNano() && !lapseLogged {
				s.log.Error("the membership lease ran out: other edges no longer route to this edge", "lease_until", time.Unix(0, until))
				lapseLogged = true
			}
			backoff = min(2*backoff, 5*time.Second)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-quit:
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// member reports whether the edge holds its membership lease now, on its
// own clock.
func (s *Server) member() bool {
	until := s.leaseUntil.Load()
	return until != 0 && time.Now().UnixNano() < until
}

// onEdges keeps the mesh linked to the current members.
func (s *Server) onEdges(edges []directory.Edge) {
	members := make([]mesh.Member, 0, len(edges))
	for _, e := range edges {
		members = append(members, mesh.Member{ID: e.ID, MeshAddr: e.MeshAddr, Key: e.MeshKey})
	}
	s.mesh.SetMembers(members)
}

// lateLocal gives the mesh the hub, which is created after the mesh;
// nothing reaches it before the hub exists (the mesh links only after
// registration).
type lateLocal struct {
	s     *Server
	ready chan struct{}
}

func (l lateLocal) hub() *session.Hub { <-l.ready; return l.s.hub }

func (l lateLocal) LocalPresence() []*edgev1.DevicePresence { return l.hub().LocalPresence() }
func (l lateLocal) DeliverForwarded(f *edgev1.Forward, report func(edgev1.ForwardOutcome)) {
	l.hub().DeliverForwarded(f, report)
}
func (l lateLocal) PeerHolds(user, device string, since time.Time, instance, edgeID string) {
	l.hub().PeerHolds(user, device, since, instance, edgeID)
}
func (l lateLocal) PeerPresence(user, device string, online bool) {
	l.hub().PeerPresence(user, device, online)
}
