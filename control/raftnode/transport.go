package raftnode

import (
	"crypto/tls"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// streamLayer carries Raft's RPCs over TCP, optionally TLS. With TLS both
// sides present a certificate and verify the peer's against the cluster's
// CA, so only members can speak Raft.
//
// hashicorp/raft's NetworkTransport.Close stops the listener but leaves
// accepted connections (and their goroutines) open until the peer hangs
// up; the layer tracks them so that Close really stops everything.
type streamLayer struct {
	ln        net.Listener
	advertise net.Addr
	client    *tls.Config // nil: plain TCP

	mu     sync.Mutex // guards the fields below
	conns  map[*trackedConn]struct{}
	closed bool
}

var _ raft.StreamLayer = (*streamLayer)(nil)

func newStreamLayer(bind string, advertise net.Addr, server, client *tls.Config) (*streamLayer, error) {
	ln, err := net.Listen("tcp", bind)
	if err != nil {
		return nil, fmt.Errorf("listen for raft on %s: %w", bind, err)
	}
	if server != nil {
		ln = tls.NewListener(ln, server)
	}
	if advertise == nil {
		// A ":0" bind advertises the port the kernel chose.
		advertise = ln.Addr()
	}
	return &streamLayer{ln: ln, advertise: advertise, client: client, conns: map[*trackedConn]struct{}{}}, nil
}

func (s *streamLayer) Accept() (net.Conn, error) {
	c, err := s.ln.Accept()
	if err != nil {
		return nil, err
	}
	tc := &trackedConn{Conn: c, layer: s}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		_ = c.Close()
		return nil, net.ErrClosed
	}
	s.conns[tc] = struct{}{}
	return tc, nil
}

// Close stops the listener and closes every accepted connection.
func (s *streamLayer) Close() error {
	s.mu.Lock()
	s.closed = true
	conns := s.conns
	s.conns = map[*trackedConn]struct{}{}
	s.mu.Unlock()
	err := s.ln.Close()
	for c := range conns {
		_ = c.Conn.Close()
	}
	return err
}

func (s *streamLayer) Addr() net.Addr { return s.advertise }

func (s *streamLayer) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	d := &net.Dialer{Timeout: timeout}
	var (
		c   net.Conn
		err error
	)
	if s.client != nil {
		c, err = tls.DialWithDialer(d, "tcp", string(address), s.client)
	} else {
		c, err = d.Dial("tcp", string(address))
	}
	if err != nil {
		return nil, fmt.Errorf("dial raft peer %s: %w", address, err)
	}
	return c, nil
}

type trackedConn struct {
	net.Conn
	layer *streamLayer
	once  sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.layer.mu.Lock()
		delete(c.layer.conns, c)
		c.layer.mu.Unlock()
	})
	return c.Conn.Close()
}
