package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

func (a *app) printDevices(ds ...*controlv1.Device) error {
	w := a.table()
	fmt.Fprintln(w, "ID\tUSER\tNAME\tPUBLIC KEY\tCREATED\tLAST SEEN\tREVOKED")
	for _, d := range ds {
		rev := "no"
		if d.GetRevoked() {
			rev = "yes, " + when(d.GetRevokedAt())
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", d.GetId(), d.GetUserId(), d.GetName(),
			base64.StdEncoding.EncodeToString(d.GetPublicKey()), when(d.GetCreatedAt()), when(d.GetLastSeen()), rev)
	}
	return w.Flush()
}

// printRegistered prints a registered device with the revision that
// registered it: the device's record with a "revision" key beside its
// fields (-o json), or the table and a line saying what the revision is
// for. An edge that has not applied the revision yet does not know the
// device; a device that connects at once passes it (relay listen/send
// --min-revision, client.Config.MinRevision) and the edge waits for it.
func (a *app) printRegistered(r *controlv1.RegisterDeviceResponse) error {
	if a.output == "json" {
		// The device as every command prints it, with the revision as
		// its last key (a uint64 is a string in the API's JSON).
		b, err := apiJSON(r.GetDevice(), map[string]json.RawMessage{"revision": json.RawMessage(strconv.Quote(strconv.FormatUint(r.GetRevision(), 10)))})
		if err != nil {
			return err
		}
		_, err = fmt.Fprintln(a.stdout, string(b))
		return err
	}
	if err := a.printDevices(r.GetDevice()); err != nil {
		return err
	}
	_, err := fmt.Fprintf(a.stdout, "registered at revision %d (to connect it at once: relay listen/send --min-revision %d)\n", r.GetRevision(), r.GetRevision())
	return err
}

// noUserHint is the hint for a device command run without --user that
// found nothing, for staff (whom --user serves).
const noUserHint = "a device is looked up under --user, by default your own account: staff name the owning account with --user"

// mayNameOwner reports whether this run's account may name another
// account's devices (--user): staff may, users and edges may not. Unknown
// (a token given in RELAYCTL_TOKEN, a cache of an older release) counts
// as may.
func (a *app) mayNameOwner() bool {
	if a.envToken != "" || a.sess == nil {
		return true
	}
	switch a.sess.t.Role {
	case "user", "edge":
		return false
	}
	return true
}

func (a *app) deviceCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "device", Short: "Manage devices (staff name the account with --user)"}
	var user string
	cmd.PersistentFlags().StringVar(&user, "user", "", "the owning account (staff only; default: your own)")
	devices := func(base string) controlv1connect.DeviceServiceClient {
		return controlv1connect.NewDeviceServiceClient(a.http, base, a.opts(base))
	}
	// ownerHint says, when the device was looked up under the caller's
	// own account (no --user), where else it may be: the API answers a
	// device of another account as not found, which an admin reads as
	// "it does not exist".
	ownerHint := func(err error) error {
		if user == "" && connect.CodeOf(err) == connect.CodeNotFound && a.mayNameOwner() {
			return withHint(err, noUserHint)
		}
		return err
	}
	// one makes a DeviceService call that returns a device and prints it.
	one := func(ctx context.Context, what string, fn func(context.Context, controlv1connect.DeviceServiceClient) (*controlv1.Device, error)) error {
		var d *controlv1.Device
		err := a.call(ctx, what, retryAlways, func(ctx context.Context, base string) (err error) {
			d, err = fn(ctx, devices(base))
			return err
		})
		if err != nil {
			return ownerHint(err)
		}
		return a.print(d, func() error { return a.printDevices(d) })
	}

	var name, pub, gen string
	register := &cobra.Command{
		Use:   "register --name NAME (--public-key B64 | --generate-key FILE) [--user ID]",
		Short: "Register a device with its Ed25519 public key",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if name == "" || (pub == "") == (gen == "") {
				return errors.New("give --name and one of --public-key and --generate-key")
			}
			var key []byte
			if gen != "" {
				pk, sk, err := ed25519.GenerateKey(rand.Reader)
				if err != nil {
					return err
				}
				f, err := os.OpenFile(gen, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
				if err != nil {
					return fmt.Errorf("--generate-key: %w", err)
				}
				_, werr := fmt.Fprintln(f, base64.StdEncoding.EncodeToString(sk.Seed()))
				if cerr := f.Close(); werr == nil {
					werr = cerr
				}
				if werr != nil {
					return fmt.Errorf("write private key: %w", werr)
				}
				key = pk
			} else {
				k, err := base64.StdEncoding.DecodeString(pub)
				if err != nil {
					return fmt.Errorf("--public-key is not base64: %w", err)
				}
				key = k
			}
			var resp *connect.Response[controlv1.RegisterDeviceResponse]
			err := a.call(cmd.Context(), "register device", retryAlways, func(ctx context.Context, base string) (err error) {
				resp, err = devices(base).RegisterDevice(ctx, keyed(a, &controlv1.RegisterDeviceRequest{UserId: user, Name: name, PublicKey: key}))
				return err
			})
			if err != nil {
				if gen != "" {
					_ = os.Remove(gen)
				}
				return err
			}
			return a.printRegistered(resp.Msg)
		},
	}
	register.Flags().StringVar(&name, "name", "", "device name (required)")
	register.Flags().StringVar(&pub, "public-key", "", "the device's Ed25519 public key, base64")
	register.Flags().StringVar(&gen, "generate-key", "", "generate a key pair and write the private key (base64 seed) to this file, mode 0600")
	register.MarkFlagsMutuallyExclusive("public-key", "generate-key")
	cmd.AddCommand(register)

	cmd.AddCommand(&cobra.Command{
		Use: "list [--user ID]", Short: "List devices", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var resp *connect.Response[controlv1.ListDevicesResponse]
			err := a.call(cmd.Context(), "list devices", retryAlways, func(ctx context.Context, base string) (err error) {
				resp, err = devices(base).ListDevices(ctx, connect.NewRequest(&controlv1.ListDevicesRequest{UserId: user}))
				return err
			})
			if err != nil {
				return err
			}
			if user == "" && len(resp.Msg.GetDevices()) == 0 && a.mayNameOwner() {
				// On stderr: the output stays an empty list for scripts.
				fmt.Fprintf(a.stderr, "relayctl: no devices under your own account (%s)\n", noUserHint)
			}
			return a.print(resp.Msg, func() error { return a.printDevices(resp.Msg.GetDevices()...) })
		},
	}, &cobra.Command{
		Use: "rename ID NAME [--user ID]", Short: "Rename a device", Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return one(cmd.Context(), "rename device", func(ctx context.Context, cl controlv1connect.DeviceServiceClient) (*controlv1.Device, error) {
				resp, err := cl.RenameDevice(ctx, keyed(a, &controlv1.RenameDeviceRequest{UserId: user, DeviceId: args[0], Name: args[1]}))
				if err != nil {
					return nil, err
				}
				return resp.Msg.GetDevice(), nil
			})
		},
	}, &cobra.Command{
		Use: "revoke ID [--user ID]", Short: "Revoke a device: it stays listed and cannot connect", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return one(cmd.Context(), "revoke device", func(ctx context.Context, cl controlv1connect.DeviceServiceClient) (*controlv1.Device, error) {
				resp, err := cl.RevokeDevice(ctx, keyed(a, &controlv1.RevokeDeviceRequest{UserId: user, DeviceId: args[0]}))
				if err != nil {
					return nil, err
				}
				return resp.Msg.GetDevice(), nil
			})
		},
	}, &cobra.Command{
		Use: "delete ID [--user ID]", Short: "Delete a device", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			err := a.call(cmd.Context(), "delete device", retryAlways, func(ctx context.Context, base string) error {
				_, err := devices(base).DeleteDevice(ctx, keyed(a, &controlv1.DeleteDeviceRequest{UserId: user, DeviceId: args[0]}))
				return err
			})
			if err != nil {
				return ownerHint(err)
			}
			return a.report(map[string]any{"id": args[0], "deleted": true}, "deleted device %s", args[0])
		},
	})
	return cmd
}
