package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"os"

	"connectrpc.com/connect"

	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

func (a *app) deviceClient() controlv1connect.DeviceServiceClient {
	return controlv1connect.NewDeviceServiceClient(a.http, a.base(), a.opts())
}

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

func (a *app) device(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return errors.New("device: missing subcommand: register, list, rename, revoke or delete")
	}
	fs := flag.NewFlagSet("relayctl device "+args[0], flag.ContinueOnError)
	fs.SetOutput(a.stderr)
	user := fs.String("user", "", "the owning account (staff only; default: your own)")
	cctx, cancel := a.ctx(ctx)
	defer cancel()
	switch args[0] {
	case "register":
		name := fs.String("name", "", "device name (required)")
		pub := fs.String("public-key", "", "the device's Ed25519 public key, base64")
		gen := fs.String("generate-key", "", "generate a key pair and write the private key (base64 seed) to this file, mode 0600")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		if *name == "" || (*pub == "") == (*gen == "") {
			return errors.New("usage: relayctl device register --name NAME (--public-key B64 | --generate-key FILE) [--user ID]")
		}
		var key []byte
		if *gen != "" {
			pk, sk, err := ed25519.GenerateKey(rand.Reader)
			if err != nil {
				return err
			}
			f, err := os.OpenFile(*gen, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
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
			k, err := base64.StdEncoding.DecodeString(*pub)
			if err != nil {
				return fmt.Errorf("--public-key is not base64: %w", err)
			}
			key = k
		}
		resp, err := a.deviceClient().RegisterDevice(cctx, connect.NewRequest(&controlv1.RegisterDeviceRequest{UserId: *user, Name: *name, PublicKey: key}))
		if err != nil {
			if *gen != "" {
				_ = os.Remove(*gen)
			}
			return fmt.Errorf("register device: %w", err)
		}
		if a.output == "json" {
			return a.printJSON(resp.Msg.GetDevice())
		}
		return a.printDevices(resp.Msg.GetDevice())
	case "list":
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		resp, err := a.deviceClient().ListDevices(cctx, connect.NewRequest(&controlv1.ListDevicesRequest{UserId: *user}))
		if err != nil {
			return fmt.Errorf("list devices: %w", err)
		}
		if a.output == "json" {
			return a.printJSON(resp.Msg)
		}
		return a.printDevices(resp.Msg.GetDevices()...)
	case "rename", "revoke", "delete":
		want := 2
		if args[0] == "rename" {
			want = 3
		}
		if len(args) < want {
			return fmt.Errorf("usage: relayctl device %s ID%s [--user ID]", args[0], map[bool]string{true: " NAME"}[want == 3])
		}
		if err := fs.Parse(args[want:]); err != nil {
			return err
		}
		id := args[1]
		var (
			dev *controlv1.Device
			err error
		)
		switch args[0] {
		case "rename":
			var r *connect.Response[controlv1.RenameDeviceResponse]
			r, err = a.deviceClient().RenameDevice(cctx, connect.NewRequest(&controlv1.RenameDeviceRequest{UserId: *user, DeviceId: id, Name: args[2]}))
			if err == nil {
				dev = r.Msg.GetDevice()
			}
		case "revoke":
			var r *connect.Response[controlv1.RevokeDeviceResponse]
			r, err = a.deviceClient().RevokeDevice(cctx, connect.NewRequest(&controlv1.RevokeDeviceRequest{UserId: *user, DeviceId: id}))
			if err == nil {
				dev = r.Msg.GetDevice()
			}
		case "delete":
			_, err = a.deviceClient().DeleteDevice(cctx, connect.NewRequest(&controlv1.DeleteDeviceRequest{UserId: *user, DeviceId: id}))
		}
		if err != nil {
			return fmt.Errorf("%s device: %w", args[0], err)
		}
		if dev == nil {
			return a.report(map[string]any{"id": id, "deleted": true}, "deleted device %s", id)
		}
		if a.output == "json" {
			return a.printJSON(dev)
		}
		return a.printDevices(dev)
	}
	return fmt.Errorf("device: unknown subcommand %q: want register, list, rename, revoke or delete", args[0])
}
