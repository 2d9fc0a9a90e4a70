package main

import (
	"context"
	"fmt"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/proto"

	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

func (a *app) keysCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "keys", Short: "Rotate and list the token signing and resume-ticket keys"}
	keys := func(base string) controlv1connect.KeyServiceClient {
		return controlv1connect.NewKeyServiceClient(a.http, base, a.opts(base))
	}
	// rotate is a rotation command. One the cluster may have taken is
	// not repeated: the retry would rotate once more.
	var retireNow bool
	rotate := func(use, short, kind string, do func(context.Context, controlv1connect.KeyServiceClient) (proto.Message, string, error)) *cobra.Command {
		c := &cobra.Command{
			Use: use, Short: short, Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				var msg proto.Message
				var id string
				err := a.call(cmd.Context(), "rotate "+kind+" key", retryIfNotSent, func(ctx context.Context, base string) (err error) {
					msg, id, err = do(ctx, keys(base))
					return err
				})
				if err != nil {
					return err
				}
				return a.print(msg, func() error {
					if _, err := fmt.Fprintf(a.stdout, "new %s key %s\n", kind, id); err != nil {
						return err
					}
					if r, ok := msg.(interface{ GetOlderRetired() bool }); ok && retireNow && !r.GetOlderRetired() {
						_, err := fmt.Fprintf(a.stdout, "the %s keys retired by earlier rotations keep their time: some control node does not record "+
							"the feature retire_all_keys (an older release, or a node stopped or restarting); see relayctl keys list and relayctl "+
							"cluster status, and rotate with --now again once every node runs\n", kind)
						return err
					}
					return nil
				})
			},
		}
		c.Flags().BoolVar(&retireNow, "now", false, "the replaced key, and those retired by earlier rotations, stop at once instead of after their grace (after a leak: what they signed or sealed is refused from then on)")
		return c
	}
	cmd.AddCommand(rotate("rotate-signing", "Rotate the access-token signing key", "signing",
		func(ctx context.Context, cl controlv1connect.KeyServiceClient) (proto.Message, string, error) {
			r, err := cl.RotateSigningKey(ctx, connect.NewRequest(&controlv1.RotateSigningKeyRequest{RetireNow: retireNow}))
			if err != nil {
				return nil, "", err
			}
			return r.Msg, r.Msg.GetKeyId(), nil
		}), rotate("rotate-session", "Rotate the resume-ticket (session) key", "session",
		func(ctx context.Context, cl controlv1connect.KeyServiceClient) (proto.Message, string, error) {
			r, err := cl.RotateSessionKey(ctx, connect.NewRequest(&controlv1.RotateSessionKeyRequest{RetireNow: retireNow}))
			if err != nil {
				return nil, "", err
			}
			return r.Msg, r.Msg.GetKeyId(), nil
		}), &cobra.Command{
		Use: "list", Short: "List key ids and ages (never key material)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var r *connect.Response[controlv1.ListKeysResponse]
			err := a.call(cmd.Context(), "list keys", retryAlways, func(ctx context.Context, base string) (err error) {
				r, err = keys(base).ListKeys(ctx, connect.NewRequest(&controlv1.ListKeysRequest{}))
				return err
			})
			if err != nil {
				return err
			}
			return a.print(r.Msg, func() error {
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
			})
		},
	})
	return cmd
}
