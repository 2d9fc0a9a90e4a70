package main

import (
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/spf13/cobra"

	"github.com/edge-relay/relay/edge/client"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// relayFlags are the flags of `relayctl relay listen|send`: act as one
// device on an edge, with the Go client, to see the relay work or to
// debug a device.
type relayFlags struct {
	cfg       client.Config
	keyFile   string
	hashes    []string
	transport string
}

func (f *relayFlags) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.cfg.Addr, "edge", "127.0.0.1:7443", "the edge's address, host:port (UDP for quic and webtransport, TCP for websocket: the edge serves both on one port number)")
	fl.StringVar(&f.cfg.UserID, "user", "", "the device's user id (required)")
	fl.StringVar(&f.cfg.DeviceID, "device", "", "the device id (required)")
	fl.StringVar(&f.keyFile, "key", "", "file with the device's private key, base64 seed as written by device register --generate-key (required)")
	fl.StringSliceVar(&f.hashes, "cert-hash", nil, "base64 SHA-256 of the edge's self-signed certificate to pin (relayd prints it; repeatable)")
	fl.StringVar(&f.transport, "transport", "quic", "quic, webtransport, or websocket (over TCP, for networks that block UDP)")
	fl.Uint64Var(&f.cfg.MinRevision, "min-revision", 0, "the revision that registered the device (device register prints it): the edge waits until it knows the device")
	for _, name := range []string{"user", "device", "key"} {
		_ = cmd.MarkFlagRequired(name)
	}
	_ = cmd.RegisterFlagCompletionFunc("transport", cobra.FixedCompletions(transportNames(), cobra.ShellCompDirectiveNoFileComp))
}

// transports are the client's transports, in the order --transport
// names them.
func transports() []client.Transport {
	return []client.Transport{client.QUIC, client.WebTransport, client.WebSocket}
}

// transportNames are the --transport values: each transport's String.
func transportNames() []string {
	var names []string
	for _, t := range transports() {
		names = append(names, t.String())
	}
	return names
}

// parseTransport reads a --transport.
func parseTransport(s string) (client.Transport, error) {
	for _, t := range transports() {
		if s == t.String() {
			return t, nil
		}
	}
	return 0, fmt.Errorf("--transport %q: want %s", s, strings.Join(transportNames(), ", "))
}

// dial connects to the edge as the device.
func (a *app) dial(ctx context.Context, f *relayFlags) (*client.Client, error) {
	cfg := f.cfg
	key, err := readDeviceKey(f.keyFile)
	if err != nil {
		return nil, err
	}
	cfg.Key = key
	for _, h := range f.hashes {
		b, err := parseCertHash(h)
		if err != nil {
			return nil, err
		}
		cfg.CertHashes = append(cfg.CertHashes, b)
	}
	if cfg.Transport, err = parseTransport(f.transport); err != nil {
		return nil, err
	}
	cfg.Logger = discardLogger()
	cfg.OnSession = f.cfg.OnSession
	dctx, cancel := context.WithTimeout(ctx, a.timeout)
	defer cancel()
	c, err := client.Dial(dctx, cfg)
	if err != nil {
		err = fmt.Errorf("connect to the edge at %s: %w", cfg.Addr, err)
		if len(cfg.CertHashes) == 0 && isCertError(err) {
			err = fmt.Errorf("%w (the edge's certificate is not one this machine trusts; a self-signed edge publishes the hash to pin: pass --cert-hash with the value relayd dev prints in its banner, or the one served at http://EDGE-ADMIN/.well-known/relay/certificate-hashes)", err)
		}
		return nil, authHint(err, f)
	}
	return c, nil
}

// authHint adds to an AUTH_FAILED what to check: the edge says no more,
// on purpose (a wrong key, an unknown or revoked device and a device of
// another user look the same to the device).
func authHint(err error, f *relayFlags) error {
	if !errors.Is(err, &client.Error{Code: relayv1.ErrorCode_ERROR_CODE_AUTH_FAILED}) {
		return err
	}
	hint := fmt.Sprintf("the edge refused --device %s of --user %s with the key in --key %s: check that `relayctl device list --user %s` shows that device, not revoked, and that the key file is the one device register --generate-key wrote for it",
		f.cfg.DeviceID, f.cfg.UserID, f.keyFile, f.cfg.UserID)
	if f.cfg.MinRevision == 0 {
		hint += "; right after device register, pass --min-revision with the revision it printed, so that the edge waits until it knows the device"
	}
	return withHint(err, hint)
}

// isCertError reports whether a dial failed on the edge's certificate.
func isCertError(err error) bool {
	var unknown x509.UnknownAuthorityError
	var invalid x509.CertificateInvalidError
	var hostname x509.HostnameError
	var verify *tls.CertificateVerificationError
	return errors.As(err, &unknown) || errors.As(err, &invalid) || errors.As(err, &hostname) || errors.As(err, &verify) ||
		strings.Contains(err.Error(), "certificate")
}

// parseCertHash reads a --cert-hash: the base64 of a SHA-256, as relayd
// and the edge's certificate-hashes document show it (base64url and hex
// are taken too).
func parseCertHash(h string) ([]byte, error) {
	for _, dec := range []func(string) ([]byte, error){
		base64.StdEncoding.DecodeString, base64.RawStdEncoding.DecodeString,
		base64.URLEncoding.DecodeString, base64.RawURLEncoding.DecodeString, hex.DecodeString,
	} {
		if b, err := dec(h); err == nil && len(b) == sha256.Size {
			return b, nil
		}
	}
	return nil, fmt.Errorf("--cert-hash %q: want the base64 of a SHA-256 (as relayd dev prints it)", h)
}

func (a *app) relayCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "relay", Short: "Act as a device on an edge: listen for events, or send one"}
	var (
		send    relayFlags
		targets []string
		typ     string
		ttl     time.Duration
		eph     bool
	)
	sendCmd := &cobra.Command{
		Use:   "send --user U --device D --key FILE [--to D2] [--type T] [--ephemeral] TEXT...",
		Short: "Send an event as a device; a durable one waits for its acknowledgement (delivered, or in the mailbox of an offline target)",
		RunE: func(cmd *cobra.Command, args []string) error {
			// The protocol counts TTLs in whole milliseconds and refuses
			// 0 (so does the client, with an error that names no flag):
			// said before connecting, in the flag's terms.
			if ttl < time.Millisecond {
				return fmt.Errorf("--ttl must be at least 1ms (got %s)", ttl)
			}
			c, err := a.dial(cmd.Context(), &send)
			if err != nil {
				return err
			}
			defer c.Close()
			m := client.Message{Targets: targets, Type: typ, Payload: []byte(strings.Join(args, " ")), TTL: ttl}
			start := time.Now()
			if eph {
				if err := c.SendEphemeral(m); err != nil {
					return err
				}
				return a.report(map[string]any{"sent": true}, "sent (ephemeral: no acknowledgement)")
			}
			sctx, cancel := context.WithTimeout(cmd.Context(), a.timeout)
			defer cancel()
			if err := c.Send(sctx, m); err != nil {
				return fmt.Errorf("send: %w", err)
			}
			took := time.Since(start)
			// An ack means every target has the event, or holds it in
			// its mailbox while offline (docs/protocol.md).
			return a.report(map[string]any{"acknowledged": true, "ackMs": float64(took.Microseconds()) / 1000},
				"acknowledged after %s: every target has it, or its mailbox holds it while the target is offline", took.Round(10*time.Microsecond))
		},
	}
	send.register(sendCmd)
	sendCmd.Flags().StringSliceVar(&targets, "to", nil, "target device id (repeatable; default: all the user's other devices)")
	sendCmd.Flags().StringVar(&typ, "type", "text", "event type")
	sendCmd.Flags().DurationVar(&ttl, "ttl", client.DefaultTTL, "how long the event may wait for its targets, at least 1ms; the edge expires it only after this plus its clock-skew tolerance (the edge's --skew-tolerance, 5m by default), so a target may still receive it up to that much after the TTL")
	sendCmd.Flags().BoolVar(&eph, "ephemeral", false, "send without storage or acknowledgement")

	var listen relayFlags
	var duration time.Duration
	listenCmd := &cobra.Command{
		Use:   "listen --user U --device D --key FILE [--edge ADDR] [--cert-hash B64] [--for DUR]",
		Short: "Connect to an edge as a device and print what arrives",
		Long: `Connect to an edge as a device and print what arrives: the events of the
user's other devices, and those devices coming online and going offline. The
client reconnects by itself; a note says when the edge went away and when a
session is back (on stderr as text).

With -o json each is one JSON object on a line of its own (stdout):
  an event:     {"id", "sender", "seq", "type", "payload" (base64),
                 "text" (the payload, when it is UTF-8), "createdAt",
                 "ephemeral", "ageMs"}
  presence:     {"presence": "online" or "offline", "device": DEVICE-ID}
  connection:   {"connection": "lost", "edge"} and
                {"connection": "back", "edge", "session", "resumed"}`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.listen(cmd.Context(), &listen, duration)
		},
	}
	listen.register(listenCmd)
	listenCmd.Flags().DurationVar(&duration, "for", 0, "stop after this long (default: until interrupted)")
	cmd.AddCommand(sendCmd, listenCmd)
	return cmd
}

// listen prints what arrives for the device, and when the edge goes
// away and when the session is back.
func (a *app) listen(ctx context.Context, f *relayFlags, duration time.Duration) error {
	sessions := make(chan client.SessionInfo, 16)
	f.cfg.OnSession = func(s client.SessionInfo) {
		select {
		case sessions <- s:
		default: // listen prints the latest state anyway
		}
	}
	lost := make(chan client.SessionLost, 16)
	f.cfg.OnSessionLost = func(l client.SessionLost) {
		select {
		case lost <- l:
		default:
		}
	}
	c, err := a.dial(ctx, f)
	if err != nil {
		return err
	}
	defer c.Close()
	if duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, duration)
		defer cancel()
	}
	first := c.SessionID() // OnSession reports it too
	fmt.Fprintf(a.stderr, "listening as %s on %s (session %s, clock offset %s); Ctrl-C to stop\n",
		f.cfg.DeviceID, c.Edge(), c.SessionID(), c.ClockOffset().Round(time.Millisecond))
	enc := json.NewEncoder(a.stdout)
	// The client reconnects by itself and says when a session went and
	// when one is back.
	away := false
	status := func(state, edge string, extra map[string]any) {
		if a.output == "json" {
			v := map[string]any{"connection": state, "edge": edge}
			for k, x := range extra {
				v[k] = x
			}
			_ = enc.Encode(v)
			return
		}
		if state == "lost" {
			fmt.Fprintf(a.stderr, "%s  the edge at %s went away; reconnecting...\n", time.Now().Format("15:04:05.000"), edge)
		} else {
			fmt.Fprintf(a.stderr, "%s  connected again, to %s (session %s, resumed %v)\n", time.Now().Format("15:04:05.000"), edge, extra["session"], extra["resumed"])
		}
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case l := <-lost:
			if !away {
				away = true
				status("lost", l.Edge, nil)
			}
		case s := <-sessions:
			if !away && s.SessionID == first {
				continue
			}
			if !away {
				status("lost", s.Edge, nil) // its loss was not seen (a full channel)
			}
			away = false
			status("back", s.Edge, map[string]any{"session": s.SessionID, "resumed": s.Resumed})
		case p := <-c.Presence():
			state := "offline"
			if p.Online {
				state = "online"
			}
			if a.output == "json" {
				_ = enc.Encode(map[string]any{"presence": state, "device": p.DeviceID})
				continue
			}
			fmt.Fprintf(a.stdout, "* device %s is %s\n", p.DeviceID, state)
		case ev, ok := <-c.Events():
			if !ok {
				return c.Err()
			}
			age := time.Now().Add(c.ClockOffset()).Sub(ev.CreatedAt)
			if a.output == "json" {
				v := map[string]any{"id": ev.ID, "sender": ev.Sender, "seq": ev.Seq, "type": ev.Type,
					"payload": ev.Payload, "createdAt": ev.CreatedAt, "ephemeral": ev.Ephemeral, "ageMs": age.Milliseconds()}
				if utf8.Valid(ev.Payload) {
					v["text"] = string(ev.Payload) // as text mode prints it; payload stays for scripts that decode it
				}
				_ = enc.Encode(v)
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
