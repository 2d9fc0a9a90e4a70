package main

import (
	"context"
	"errors"
	"fmt"

	"connectrpc.com/connect"

	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

func (a *app) keys(ctx context.Context, args []string) error {
	if len(args) != 1 {
		return errors.New("usage: relayctl keys rotate-signing|rotate-session|list")
	}
	cl := controlv1connect.NewKeyServiceClient(a.http, a.base(), a.opts())
	cctx, cancel := a.ctx(ctx)
	defer cancel()
	switch args[0] {
	case "rotate-signing":
		r, err := cl.RotateSigningKey(cctx, connect.NewRequest(&controlv1.RotateSigningKeyRequest{}))
		if err != nil {
			return fmt.Errorf("rotate signing key: %w", err)
		}
		if a.output == "json" {
			return a.printJSON(r.Msg)
		}
		fmt.Fprintf(a.stdout, "new signing key %s\n", r.Msg.GetKeyId())
		return nil
	case "rotate-session":
		r, err := cl.RotateSessionKey(cctx, connect.NewRequest(&controlv1.RotateSessionKeyRequest{}))
		if err != nil {
			return fmt.Errorf("rotate session key: %w", err)
		}
		if a.output == "json" {
			return a.printJSON(r.Msg)
		}
		fmt.Fprintf(a.stdout, "new session key %s\n", r.Msg.GetKeyId())
		return nil
	case "list":
		r, err := cl.ListKeys(cctx, connect.NewRequest(&controlv1.ListKeysRequest{}))
		if err != nil {
			return fmt.Errorf("list keys: %w", err)
		}
		if a.output == "json" {
			return a.printJSON(r.Msg)
		}
		w := a.table()
		fmt.Fprintln(w, "KIND\tID\tCURRENT\tCREATED\tRETIRED\tEXPIRES")
		for _, group := range []struct {
			kind string
			list []*controlv1.KeyInfo
		}{{"signing", r.Msg.GetSigningKeys()}, {"session", r.Msg.GetSessionKeys()}} {
			for _, k := range group.list {
				cur := ""
				if k.GetCurrent() {
					cur = "*"
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", group.kind, k.GetId(), cur, when(k.GetCreatedAt()), when(k.GetRetiredAt()), when(k.GetExpiresAt()))
			}
		}
		return w.Flush()
	}
	return fmt.Errorf("keys: unknown subcommand %q: want rotate-signing, rotate-session or list", args[0])
}
