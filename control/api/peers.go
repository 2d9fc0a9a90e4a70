package api

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/raftnode"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

// Dialer builds Connect clients for other control nodes' APIs. It caches
// one client per address and is safe for concurrent use.
type Dialer struct {
	http   *http.Client
	scheme string

	mu      sync.Mutex // guards the fields below
	peers   map[string]controlv1connect.PeerServiceClient
	cluster map[string]controlv1connect.ClusterServiceClient
	token   func() (string, error)
	opts    []connect.ClientOption
}

// SetTokenSource makes node-to-node calls carry a bearer token from fn
// (the node's own token, minted with the cluster's signing key). Without
// it they rely on the TLS client certificate alone.
func (d *Dialer) SetTokenSource(fn func() (string, error)) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.token = fn
}

// authorize adds the node's token to an outgoing peer request.
func (d *Dialer) authorize(h http.Header) {
	d.mu.Lock()
	fn := d.token
	d.mu.Unlock()
	if fn == nil || h.Get("Authorization") != "" {
		return
	}
	if tok, err := fn(); err == nil && tok != "" {
		h.Set("Authorization", "Bearer "+tok)
	}
}

// NewDialer returns a Dialer. With tlsConfig nil it speaks HTTP/2 over
// cleartext (h2c); otherwise HTTPS with that configuration. opts apply to
// every client it builds (tracing, for one).
func NewDialer(tlsConfig *tls.Config, opts ...connect.ClientOption) *Dialer {
	tr := &http.Transport{
		MaxIdleConnsPerHost: 8,
		IdleConnTimeout:     90 * time.Second,
		ForceAttemptHTTP2:   true,
	}
	scheme := "https://"
	if tlsConfig == nil {
		var p http.Protocols
		p.SetUnencryptedHTTP2(true)
		tr.Protocols = &p
		scheme = "http://"
	} else {
		tr.TLSClientConfig = tlsConfig
	}
	return &Dialer{
		http:    &http.Client{Transport: tr},
		scheme:  scheme,
		peers:   map[string]controlv1connect.PeerServiceClient{},
		cluster: map[string]controlv1connect.ClusterServiceClient{},
		opts:    opts,
	}
}

// Close releases idle connections.
func (d *Dialer) Close() { d.http.CloseIdleConnections() }

// URL returns the base URL of the API at addr.
func (d *Dialer) URL(addr string) string { return d.scheme + addr }

func (d *Dialer) peer(addr string) controlv1connect.PeerServiceClient {
	d.mu.Lock()
	defer d.mu.Unlock()
	c, ok := d.peers[addr]
	if !ok {
		c = controlv1connect.NewPeerServiceClient(d.http, d.URL(addr), d.opts...)
		d.peers[addr] = c
	}
	return c
}

// Cluster returns a ClusterService client for the node at addr.
func (d *Dialer) Cluster(addr string) controlv1connect.ClusterServiceClient {
	d.mu.Lock()
	defer d.mu.Unlock()
	c, ok := d.cluster[addr]
	if !ok {
		c = controlv1connect.NewClusterServiceClient(d.http, d.URL(addr), d.opts...)
		d.cluster[addr] = c
	}
	return c
}

var _ raftnode.PeerClient = (*Dialer)(nil)

// Apply forwards an encoded command to the leader at addr. Any failure
// that may have happened after the leader received it is reported as
// raftnode.ErrUnknownOutcome, which the node retries with the same request
// id.
func (d *Dialer) Apply(ctx context.Context, addr string, cmd []byte) ([]byte, error) {
	req := connect.NewRequest(&controlv1.ApplyRequest{Command: cmd})
	d.authorize(req.Header())
	resp, err := d.peer(addr).Apply(ctx, req)
	if err != nil {
		return nil, fromPeer("forward apply", addr, err)
	}
	return resp.Msg.GetResult(), nil
}

// ReadIndex asks the leader at addr for a read index.
func (d *Dialer) ReadIndex(ctx context.Context, addr string) (uint64, error) {
	req := connect.NewRequest(&controlv1.ReadIndexRequest{})
	d.authorize(req.Header())
	resp, err := d.peer(addr).ReadIndex(ctx, req)
	if err != nil {
		return 0, fromPeer("read index", addr, err)
	}
	return resp.Msg.GetIndex(), nil
}

// Members asks the node at addr who leads, how far it committed and
// which members its configuration lists (ClusterService.Status).
func (d *Dialer) Members(ctx context.Context, addr string) (raftnode.PeerView, error) {
	req := connect.NewRequest(&controlv1.StatusRequest{})
	d.authorize(req.Header())
	resp, err := d.Cluster(addr).Status(ctx, req)
	if err != nil {
		return raftnode.PeerView{}, fmt.Errorf("status of %s: %w", addr, err)
	}
	v := raftnode.PeerView{LeaderID: resp.Msg.GetLeaderId(), CommitIndex: resp.Msg.GetCommitIndex()}
	for _, m := range resp.Msg.GetMembers() {
		v.Members = append(v.Members, m.GetId())
	}
	return v, nil
}

// fromPeer maps a peer's error back onto the node's sentinels so the
// node's retry logic can act on it.
func fromPeer(op, addr string, err error) error {
	switch connect.CodeOf(err) {
	case connect.CodeUnavailable, connect.CodeUnknown, connect.CodeDeadlineExceeded, connect.CodeAborted, connect.CodeInternal:
		if op == "read index" {
			return fmt.Errorf("%s at %s: %w: %v", op, addr, raftnode.ErrNoLeader, err)
		}
		return fmt.Errorf("%s at %s: %w: %v", op, addr, raftnode.ErrUnknownOutcome, err)
	case connect.CodeFailedPrecondition:
		// The peer is not (or no longer) the leader: nothing was proposed.
		return fmt.Errorf("%s at %s: %w: %v", op, addr, raftnode.ErrNoLeader, err)
	case connect.CodeInvalidArgument:
		// PeerServer.Apply's answer to a command stamped too far from
		// the leader's clock (the command bytes are this node's own).
		if op == "forward apply" {
			return fmt.Errorf("%s at %s: %w: %v", op, addr, raftnode.ErrClockSkew, err)
		}
	case connect.CodePermissionDenied:
		// PeerService is the nodes' alone: a node is refused it only once
		// the cluster removed it (auth.Policy.MembersOnly).
		return fmt.Errorf("%s at %s: %w: %v", op, addr, raftnode.ErrRemoved, err)
	case connect.CodeUnauthenticated, connect.CodeResourceExhausted, connect.CodeUnimplemented:
		// The leader refused this node's own call before anything was
		// proposed: its node token (a clock beyond the tokens' leeway, a
		// signing key it does not hold yet), a limit, a release without
		// the procedure. Passed on, the code would read as the caller's
		// own (an edge would drop its valid token and stay on this node);
		// another node can take the call.
		return fmt.Errorf("%s at %s: %w: %v", op, addr, raftnode.ErrNoLeader, err)
	}
	return fmt.Errorf("%s at %s: %w", op, addr, err)
}

// HTTPClient returns the dialer's HTTP client, for building other
// service clients that share its connections and TLS settings.
func (d *Dialer) HTTPClient() *http.Client { return d.http }
