package server

import (
	"context"
	"net"
	"time"

	"github.com/edge-relay/relay/edge/directory"
	"github.com/edge-relay/relay/edge/mesh"
	"github.com/edge-relay/relay/edge/session"
	edgev1 "github.com/edge-relay/relay/proto/edge/v1"
)

// register keeps the edge in the member list: it registers (getting a
// mesh certificate for its key), renews before the lease runs out, and
// retries with backoff while the control plane is unreachable.
func (s *Server) register(ctx context.Context) {
	meshAddr := s.cfg.MeshAdvertise
	if meshAddr == "" {
		meshAddr = s.mesh.Addr().String()
	}
	if host, port, err := net.SplitHostPort(meshAddr); err == nil && (host == "" || net.ParseIP(host).IsUnspecified()) {
		s.log.Warn("the mesh listens on all addresses; set --mesh-advertise to an address other edges can reach", "mesh_addr", meshAddr)
		meshAddr = net.JoinHostPort("127.0.0.1", port)
	}
	backoff := 100 * time.Millisecond
	for {
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		resp, err := s.control.RegisterEdge(rctx, &edgev1.RegisterEdgeRequest{
			EdgeId: s.cfg.EdgeID, MeshAddr: meshAddr, DeviceAddrs: []string{s.Addr()}, MeshPublicKey: s.identity.PublicKey(),
		})
		cancel()
		wait := backoff
		if err == nil {
			err = s.identity.Set(resp.GetMeshCertificate(), resp.GetCaCertificate())
		}
		if err == nil {
			if !s.registered.Swap(true) {
				s.log.Info("registered as a member", "mesh_addr", meshAddr, "lease_until", time.UnixMilli(resp.GetLeaseExpiresAtMs()))
			}
			backoff = 100 * time.Millisecond
			wait = time.Until(time.UnixMilli(resp.GetRenewAfterMs()))
			if wait < 100*time.Millisecond {
				wait = 100 * time.Millisecond
			}
		} else if ctx.Err() == nil {
			s.log.Warn("registration failed; retrying", "err", err, "backoff", backoff)
			backoff = min(2*backoff, 5*time.Second)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// onEdges keeps the mesh linked to the current members.
func (s *Server) onEdges(edges []directory.Edge) {
	members := make([]mesh.Member, 0, len(edges))
	for _, e := range edges {
		members = append(members, mesh.Member{ID: e.ID, MeshAddr: e.MeshAddr})
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
func (l lateLocal) PeerHolds(user, device string, since time.Time, instance string) {
	l.hub().PeerHolds(user, device, since, instance)
}
func (l lateLocal) PeerPresence(user, device string, online bool) {
	l.hub().PeerPresence(user, device, online)
}
