package api

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/fsm"
	"github.com/edge-relay/relay/control/raftnode"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// KeyServer serves KeyService.
type KeyServer struct {
	node  *raftnode.Node
	authn *Authenticator
	// SessionGrace is how long a rotated-out session key still opens
	// tickets. Default 24h.
	sessionGrace time.Duration
}

var _ controlv1connect.KeyServiceHandler = (*KeyServer)(nil)

// NewKeyServer returns the KeyService handler.
func NewKeyServer(node *raftnode.Node, authn *Authenticator, sessionGrace time.Duration) *KeyServer {
	if sessionGrace <= 0 {
		sessionGrace = 24 * time.Hour
	}
	return &KeyServer{node: node, authn: authn, sessionGrace: sessionGrace}
}

// NewSigningKeyCommand builds a command that rotates in a fresh signing
// key, keeping the previous one for as long as tokens it signed live.
func NewSigningKeyCommand(retain time.Duration) (*statev1.Command, string, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, "", err
	}
	id := newID("sk")
	return &statev1.Command{Op: &statev1.Command_RotateSigningKey{RotateSigningKey: &statev1.RotateSigningKey{
		Key: &statev1.SigningKey{Id: id, PrivateSeed: priv.Seed(), PublicKey: pub}, RetainMs: retain.Milliseconds(),
	}}}, id, nil
}

// NewSessionKeyCommand builds a command that rotates in a fresh session
// key, keeping the previous one for grace.
func NewSessionKeyCommand(grace time.Duration) (*statev1.Command, string, error) {
	secret := make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		return nil, "", err
	}
	id := newID("ss")
	return &statev1.Command{Op: &statev1.Command_RotateSessionKey{RotateSessionKey: &statev1.RotateSessionKey{
		Key: &statev1.SessionKey{Id: id, Secret: secret}, GraceMs: grace.Milliseconds(),
	}}}, id, nil
}

// RotateSigningKey rotates the token signing key.
func (s *KeyServer) RotateSigningKey(ctx context.Context, req *connect.Request[controlv1.RotateSigningKeyRequest]) (*connect.Response[controlv1.RotateSigningKeyResponse], error) {
	cfg := s.authn.Config()
	retain := cfg.AccessTTL + cfg.Leeway
	if req.Msg.GetRetireNow() {
		retain = 0
	}
	cmd, id, err := NewSigningKeyCommand(retain)
	if err != nil {
		return nil, toConnect(err)
	}
	all, err := s.rotate(ctx, cmd, req.Msg.GetRetireNow(), &cmd.GetRotateSigningKey().RetireAll)
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&controlv1.RotateSigningKeyResponse{KeyId: id, OlderRetired: all}), nil
}

// RotateSessionKey rotates the ticket-sealing key.
func (s *KeyServer) RotateSessionKey(ctx context.Context, req *connect.Request[controlv1.RotateSessionKeyRequest]) (*connect.Response[controlv1.RotateSessionKeyResponse], error) {
	grace := s.sessionGrace
	if req.Msg.GetRetireNow() {
		grace = 0
	}
	cmd, id, err := NewSessionKeyCommand(grace)
	if err != nil {
		return nil, toConnect(err)
	}
	all, err := s.rotate(ctx, cmd, req.Msg.GetRetireNow(), &cmd.GetRotateSessionKey().RetireAll)
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&controlv1.RotateSessionKeyResponse{KeyId: id, OlderRetired: all}), nil
}

// rotate applies a key rotation, cmd. With now (retire_now) it also
// retires the keys retired by earlier rotations (sets *retireAll), where
// every member can apply that: an older release would keep them, and
// replicas would differ on which keys verify. The members' records are
// read after a barrier, so a withdrawal of features already committed (a
// member stopping) is seen. It reports whether the older keys went.
func (s *KeyServer) rotate(ctx context.Context, cmd *statev1.Command, now bool, retireAll *bool) (bool, error) {
	if now {
		if _, err := s.node.Read(ctx, raftnode.Linearizable); err != nil {
			return false, err
		}
		*retireAll = s.node.EveryMemberHas(fsm.FeatureRetireAllKeys)
	}
	if _, err := s.node.Apply(ctx, cmd); err != nil {
		return false, err
	}
	return *retireAll, nil
}

// ListKeys lists key ids and ages, never material.
func (s *KeyServer) ListKeys(ctx context.Context, _ *connect.Request[controlv1.ListKeysRequest]) (*connect.Response[controlv1.ListKeysResponse], error) {
	f, err := s.node.Read(ctx, raftnode.Linearizable)
	if err != nil {
		return nil, toConnect(err)
	}
	sk, cur, err := f.SigningKeys()
	if err != nil {
		return nil, toConnect(err)
	}
	out := &controlv1.ListKeysResponse{}
	for _, k := range sk {
		out.SigningKeys = append(out.SigningKeys, &controlv1.KeyInfo{
			Id: k.GetId(), CreatedAt: ts(k.GetCreatedAtMs()), RetiredAt: ts(k.GetRetiredAtMs()),
			ExpiresAt: ts(k.GetVerifyUntilMs()), Current: k.GetId() == cur,
		})
	}
	ring, err := f.SessionKeyRing()
	if err != nil {
		return nil, toConnect(err)
	}
	for _, k := range ring.GetKeys() {
		out.SessionKeys = append(out.SessionKeys, &controlv1.KeyInfo{
			Id: k.GetId(), CreatedAt: ts(k.GetCreatedAtMs()), RetiredAt: ts(k.GetRetiredAtMs()),
			ExpiresAt: ts(k.GetExpiresAtMs()), Current: k.GetId() == ring.GetCurrentId(),
		})
	}
	return connect.NewResponse(out), nil
}
