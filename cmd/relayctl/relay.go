package main

import (
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/internal/flagenv"
)

// relay runs `relayctl relay listen|send`: act as one device on an edge,
// with the Go client, to see the relay work or to debug a device.
func (a *app) relay(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return errors.New("relay: missing subcommand: listen or send")
	}
	fs := flag.NewFlagSet("relayctl relay "+args[0], flag.ContinueOnError)
	fs.SetOutput(a.stderr)
	var (
		cfg      client.Config
		keyFile  string
		hashes   flagenv.List
		tr       string
		targets  flagenv.List
		typ      string
		ttl      time.Duration
		eph      bool
		duration time.Duration
	)
	fs.StringVar(&cfg.Addr, "edge", "127.0.0.1:7443", "the edge's UDP address")
	fs.StringVar(&cfg.UserID, "user", "", "the device's user id (required)")
	fs.StringVar(&cfg.DeviceID, "device", "", "the device id (required)")
	fs.StringVar(&keyFile, "key", "", "file with the device's private key, base64 seed as written by device register --generate-key (required)")
	fs.Var(&hashes, "cert-hash", "base64 SHA-256 of the edge's self-signed certificate to pin (relayd prints it; repeatable)")
	fs.StringVar(&tr, "transport", "quic", "quic or webtransport")
	switch args[0] {
	case "send":
		fs.Var(&targets, "to", "target device id (repeatable; default: all the user's other devices)")
		fs.StringVar(&typ, "type", "text", "event type")
		fs.DurationVar(&ttl, "ttl", time.Minute, "how long the event may wait for its targets")
		fs.BoolVar(&eph, "ephemeral", false, "send without storage or acknowledgement")
	case "listen":
		fs.DurationVar(&duration, "for", 0, "stop after this long (default: until interrupted)")
	default:
		return fmt.Errorf("relay: unknown subcommand %q: want listen or send", args[0])
	}
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if cfg.UserID == "" || cfg.DeviceID == "" || keyFile == "" {
		return errors.New("usage: relayctl relay " + args[0] + " --user ID --device ID --key FILE [--edge ADDR] [--cert-hash B64] ...")
	}
	key, err := readDeviceKey(keyFile)
	if err != nil {
		return err
	}
	cfg.Key = key
	for _, h := range hashes {
		b, err := base64.StdEncoding.DecodeString(h)
		if err != nil || len(b) != 32 {
			return fmt.Errorf("--cert-hash %q: want the base64 of a SHA-256", h)
		}
		cfg.CertHashes = append(cfg.CertHashes, b)
	}
	switch tr {
	case "quic":
	case "webtransport":
		cfg.Transport = client.WebTransport
	default:
		return fmt.Errorf("--transport %q: want quic or webtransport", tr)
	}
	cfg.Logger = discardLogger()
	dctx, cancel := context.WithTimeout(ctx, a.timeout)
	c, err := client.Dial(dctx, cfg)
	cancel()
	if err != nil {
		return fmt.Errorf("connect to the edge at %s: %w", cfg.Addr, err)
	}
	defer c.Close()
	if args[0] == "send" {
		payload := strings.Join(fs.Args(), " ")
		m := client.Message{Targets: targets, Type: typ, Payload: []byte(payload), TTL: ttl}
		start := time.Now()
		if eph {
			if err := c.SendEphemeral(m); err != nil {
				return err
			}
			return a.report(map[string]any{"sent": true}, "sent (ephemeral: no acknowledgement)")
		}
		sctx, cancel := context.WithTimeout(ctx, a.timeout)
		defer cancel()
		if err := c.Send(sctx, m); err != nil {
			return fmt.Errorf("send: %w", err)
		}
		took := time.Since(start)
		return a.report(map[string]any{"delivered": true, "ackMs": float64(took.Microseconds()) / 1000},
			"delivered to every target (acknowledged after %s)", took.Round(10*time.Microsecond))
	}
	if duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, duration)
		defer cancel()
	}
	fmt.Fprintf(a.stderr, "listening as %s (session %s, clock offset %s); Ctrl-C to stop\n", cfg.DeviceID, c.SessionID(), c.ClockOffset().Round(time.Millisecond))
	enc := json.NewEncoder(a.stdout)
	for {
		select {
		case <-ctx.Done():
			return nil
		case p := <-c.Presence():
			state := "offline"
			if p.Online {
				state = "online"
			}
			if a.output != "json" {
				fmt.Fprintf(a.stdout, "* device %s is %s\n", p.DeviceID, state)
			}
		case ev, ok := <-c.Events():
			if !ok {
				return c.Err()
			}
			age := time.Now().Add(c.ClockOffset()).Sub(ev.CreatedAt)
			if a.output == "json" {
				_ = enc.Encode(map[string]any{"id": ev.ID, "sender": ev.Sender, "seq": ev.Seq, "type": ev.Type,
					"payload": ev.Payload, "createdAt": ev.CreatedAt, "ephemeral": ev.Ephemeral, "ageMs": age.Milliseconds()})
				continue
			}
			body := string(ev.Payload)
			if !utf8.Valid(ev.Payload) {
				body = base64.StdEncoding.EncodeToString(ev.Payload)
			}
			fmt.Fprintf(a.stdout, "%s  from %s  %s  %q  (%s after it was sent)\n",
				time.Now().Format("15:04:05.000"), ev.Sender, ev.Type, body, age.Round(time.Millisecond))
		}
	}
}

// readDeviceKey reads a private key file written by `device register
// --generate-key`: the base64 of the 32-byte Ed25519 seed.
func readDeviceKey(path string) (ed25519.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read the device key: %w", err)
	}
	seed, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(b)))
	if err != nil || len(seed) != ed25519.SeedSize {
		return nil, fmt.Errorf("%s does not hold a base64 Ed25519 seed (as written by relayctl device register --generate-key)", path)
	}
	return ed25519.NewKeyFromSeed(seed), nil
}

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }
