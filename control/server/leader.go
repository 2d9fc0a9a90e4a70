package server

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"time"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/auth"
	"github.com/edge-relay/relay/control/fsm"
	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// leaderTasks runs while this node leads: it initializes a new cluster
// (first admin, first keys, the cluster CA), creates the CA of a cluster
// that has none, rotates keys on schedule, and removes expired mailbox
// entries and edges whose lease ran out. Every step is a Raft command
// whose effect the FSM decides, so two leaders in quick succession cannot
// both initialize or create two CAs, and every replica expires exactly the
// same entries. (Two may both rotate a key that came due: a second
// rotation soon after the first is harmless.)
func (s *Server) leaderTasks(ctx context.Context) {
	select {
	case <-s.ready:
	case <-ctx.Done():
		return
	}
	for ctx.Err() == nil {
		err := s.initCluster(ctx)
		if err == nil {
			if err = s.ensureClusterCA(ctx); err == nil {
				break
			}
		}
		if ctx.Err() == nil {
			s.log.Warn("initialize cluster", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
	}
	rotate := time.NewTicker(min(s.cfg.SessionKeyRotateEvery/10, time.Minute))
	defer rotate.Stop()
	mail := time.NewTicker(s.cfg.MailboxExpireEvery)
	defer mail.Stop()
	edges := time.NewTicker(s.cfg.EdgeExpireEvery)
	defer edges.Stop()
	s.rotateDueKeys(ctx)
	// A new leader removes at once what is due (its predecessor may have
	// stopped in the middle of a purge), rather than a tick later.
	s.expireMailboxes(ctx)
	for {
		select {
		case <-ctx.Done():
			return
		case <-rotate.C:
			s.rotateDueKeys(ctx)
		case <-mail.C:
			s.expireMailboxes(ctx)
		case <-edges.C:
			s.expireEdges(ctx)
		}
	}
}

// ensureClusterCA creates the cluster CA when the state has none (a
// cluster initialized before the CA existed). The key is drawn here, on
// the proposer; SetClusterCA applies at most once.
func (s *Server) ensureClusterCA(ctx context.Context) error {
	if _, err := s.node.FSM().ClusterCA(); err == nil {
		return nil
	} else if !errors.Is(err, fsm.ErrNotFound) {
		return err
	}
	ca, err := api.NewClusterCA(time.Now(), api.CAValidity)
	if err != nil {
		return err
	}
	res, err := s.node.Apply(ctx, &statev1.Command{Op: &statev1.Command_SetClusterCa{SetClusterCa: &statev1.SetClusterCA{Ca: ca}}})
	if err != nil {
		return fmt.Errorf("create the cluster CA: %w", err)
	}
	if res.GetInitialized() {
		s.log.Info("created the cluster CA for the edge mesh")
	}
	return nil
}

// maxExpireRounds bounds the ExpireMailboxes commands of one tick; the
// next tick continues.
const maxExpireRounds = 64

// expireMailboxes proposes ExpireMailboxes while this replica holds
// mailbox entries or event claims whose time has passed, or mailboxes of
// deleted or revoked devices still being emptied (each command removes a
// bounded number). Nothing is proposed when there is nothing to remove.
func (s *Server) expireMailboxes(ctx context.Context) {
	f := s.node.FSM()
	for range maxExpireRounds {
		// Deleted and revoked devices' mailboxes are emptied in the same
		// commands, once every member applies that (feature
		// mailbox_purge), checked before each: a member that withdraws
		// its features as it stops gets none once the withdrawal applied.
		purge := api.PurgeLimit(s.node)
		now := time.Now().UnixMilli()
		due, err := f.MailboxExpiryDue(now, purge > 0)
		if err != nil || !due {
			return
		}
		op := &statev1.ExpireMailboxes{PurgeLimit: purge}
		// One command reads at most DefaultExpireBytes of events, once
		// every member applies that (feature mailbox_expire_bytes).
		if s.node.EveryMemberHas(fsm.FeatureMailboxExpireBytes) {
			op.MaxBytes = fsm.DefaultExpireBytes
		}
		if _, err := s.node.Apply(ctx, &statev1.Command{ProposedAtMs: now, Op: &statev1.Command_ExpireMailboxes{ExpireMailboxes: op}}); err != nil {
			if ctx.Err() == nil {
				s.log.Warn("expire mailbox entries", "err", err)
			}
			return
		}
	}
}

// expireEdges proposes ExpireEdges when some edge's lease ran out.
func (s *Server) expireEdges(ctx context.Context) {
	now := time.Now().UnixMilli()
	list, err := s.node.FSM().Edges()
	if err != nil {
		return
	}
	for _, e := range list {
		if e.GetLeaseExpiresAtMs() <= now {
			if _, err := s.node.Apply(ctx, &statev1.Command{ProposedAtMs: now, Op: &statev1.Command_ExpireEdges{ExpireEdges: &statev1.ExpireEdges{}}}); err != nil && ctx.Err() == nil {
				s.log.Warn("expire edges", "err", err)
			}
			return
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
	ca, err := api.NewClusterCA(time.Now(), api.CAValidity)
	if err != nil {
		return err
	}
	// The bootstrapping node drew the history before Raft started (its
	// Raft connections carry it from the first); every member records
	// that one.
	history, err := s.node.FSM().History()
	if err != nil {
		return err
	}
	if history == "" {
		history = fsm.NewHistoryID()
	}
	res, err := s.node.Apply(ctx, &statev1.Command{Op: &statev1.Command_InitCluster{InitCluster: &statev1.InitCluster{
		Admin: &statev1.User{Id: "admin", Login: "admin", DisplayName: "Administrator", Role: string(auth.RoleAdmin),
			PasswordHash: hash, Status: statev1.UserStatus_USER_STATUS_ACTIVE},
		SigningKey: sk.GetRotateSigningKey().GetKey(),
		SessionKey: ss.GetRotateSessionKey().GetKey(),
		ClusterCa:  ca,
		History:    history,
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
		source := s.cfg.AdminPasswordSource
		if source == "" {
			source = "given in RELAY_ADMIN_PASSWORD"
		}
		s.log.Info("initialized a new cluster; the first admin's password is the one "+source, "login", "admin")
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
