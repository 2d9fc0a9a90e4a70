package server

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"time"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/auth"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// leaderTasks runs while this node leads: it initializes a new cluster
// (first admin, first keys) and rotates keys on schedule. Every step is
// a Raft command whose effect the FSM decides, so two leaders in quick
// succession cannot both initialize or double-rotate.
func (s *Server) leaderTasks(ctx context.Context) {
	select {
	case <-s.ready:
	case <-ctx.Done():
		return
	}
	for ctx.Err() == nil {
		if err := s.initCluster(ctx); err == nil {
			break
		} else if ctx.Err() == nil {
			s.log.Warn("initialize cluster", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
	}
	check := min(s.cfg.SessionKeyRotateEvery/10, time.Minute)
	t := time.NewTicker(check)
	defer t.Stop()
	for {
		s.rotateDueKeys(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (s *Server) initCluster(ctx context.Context) error {
	f := s.node.FSM()
	done, err := f.Initialized()
	if err != nil {
		return err
	}
	if done {
		s.log.Debug("cluster already initialized; nothing to do")
		return nil
	}
	password, generated := s.cfg.AdminPassword, false
	if password == "" {
		var b [18]byte
		if _, err := rand.Read(b[:]); err != nil {
			return err
		}
		password, generated = base64.RawURLEncoding.EncodeToString(b[:]), true
	}
	hash, err := auth.HashPassword(password, s.authn.Config().Password)
	if err != nil {
		return err
	}
	cfg := s.authn.Config()
	sk, _, err := api.NewSigningKeyCommand(cfg.AccessTTL + cfg.Leeway)
	if err != nil {
		return err
	}
	ss, _, err := api.NewSessionKeyCommand(s.cfg.SessionKeyGrace)
	if err != nil {
		return err
	}
	res, err := s.node.Apply(ctx, &statev1.Command{Op: &statev1.Command_InitCluster{InitCluster: &statev1.InitCluster{
		Admin: &statev1.User{Id: "admin", Login: "admin", DisplayName: "Administrator", Role: string(auth.RoleAdmin),
			PasswordHash: hash, Status: statev1.UserStatus_USER_STATUS_ACTIVE},
		SigningKey: sk.GetRotateSigningKey().GetKey(),
		SessionKey: ss.GetRotateSessionKey().GetKey(),
	}}})
	if err != nil {
		return err
	}
	if !res.GetInitialized() {
		return nil // another leader did it first
	}
	if generated {
		s.log.Warn("initialized a new cluster; the first admin's password is shown only this once: log in and change it",
			"login", "admin", "password", password)
	} else {
		s.log.Info("initialized a new cluster; the first admin's password is the one given in RELAY_ADMIN_PASSWORD", "login", "admin")
	}
	return nil
}

// rotateDueKeys rotates the session and signing keys whose time has come.
func (s *Server) rotateDueKeys(ctx context.Context) {
	f := s.node.FSM()
	now := time.Now()
	ring, err := f.SessionKeyRing()
	if err == nil {
		for _, k := range ring.GetKeys() {
			if k.GetId() == ring.GetCurrentId() && now.Sub(time.UnixMilli(k.GetCreatedAtMs())) >= s.cfg.SessionKeyRotateEvery {
				if cmd, id, err := api.NewSessionKeyCommand(s.cfg.SessionKeyGrace); err == nil {
					if _, err := s.node.Apply(ctx, cmd); err != nil && !errors.Is(err, context.Canceled) {
						s.log.Warn("scheduled session key rotation", "err", err)
					} else if err == nil {
						s.log.Info("rotated the session key on schedule", "key_id", id)
					}
				}
			}
		}
	}
	keys, cur, err := f.SigningKeys()
	if err == nil {
		for _, k := range keys {
			if k.GetId() == cur && now.Sub(time.UnixMilli(k.GetCreatedAtMs())) >= s.cfg.SigningKeyRotateEvery {
				cfg := s.authn.Config()
				if cmd, id, err := api.NewSigningKeyCommand(cfg.AccessTTL + cfg.Leeway); err == nil {
					if _, err := s.node.Apply(ctx, cmd); err != nil && !errors.Is(err, context.Canceled) {
						s.log.Warn("scheduled signing key rotation", "err", err)
					} else if err == nil {
						s.log.Info("rotated the signing key on schedule", "key_id", id)
					}
				}
			}
		}
	}
}
