// Command relayctl is the command-line client of the control plane's
// Connect API.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/internal/flagenv"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

const envPrefix = "RELAYCTL_"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr, os.Getenv)
	stop()
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "relayctl:", oneLine(err))
		}
		os.Exit(1)
	}
}

// oneLine turns an error into the one line relayctl prints, with a hint
// for the errors a user can act on.
func oneLine(err error) string {
	msg := strings.ReplaceAll(err.Error(), "\n", " ")
	switch connect.CodeOf(err) {
	case connect.CodeUnavailable:
		if strings.Contains(msg, "connection refused") || strings.Contains(msg, "no such host") {
			return msg + " (is the control plane running at --server / RELAYCTL_SERVER?)"
		}
		return msg + " (the cluster has no leader right now; retry shortly)"
	case connect.CodeInvalidArgument:
		return msg + " (fix the argument named above)"
	case connect.CodeUnauthenticated:
		if !strings.Contains(msg, "relayctl login") {
			return msg + " (run relayctl login)"
		}
	case connect.CodePermissionDenied:
		return msg + " (your role does not allow this; ask an admin)"
	}
	return msg
}

type app struct {
	stdin          io.Reader
	stdout, stderr io.Writer
	server         string
	output         string
	timeout        time.Duration
	http           *http.Client
	tokens         *tokenStore
	envToken       string // RELAYCTL_TOKEN: an access token used as is
}

const usage = `Usage: relayctl [global flags] <command> [args]

Commands:
  login [--password-stdin] [LOGIN]        log in (prompts for LOGIN on a terminal); tokens are
                                          cached, refreshed, and shared with the cluster's other nodes
  logout                                  end the session
  token                                   print a valid access token (e.g. for relayd --join-token)
  user create --login L [--display-name N] [--role R] [--password-stdin | --no-password]
  user get ID | list | me | delete ID
  user update ID [--display-name N] [--login L] [--status active|disabled] [--role R] [--password-stdin]
  device register --name N (--public-key B64 | --generate-key FILE) [--user ID]
  device list [--user ID]
  device rename ID NAME | revoke ID | delete ID   [--user ID]
  keys rotate-signing | rotate-session | list
  cluster status                          show members, leader and indexes
  cluster join --id ID --raft-addr A [--api-addr B]
                                          add a node as a voter
  cluster remove ID                       remove a node from the cluster
  cluster transfer-leader [ID]            hand leadership to ID (or the best voter)
  backup FILE                             write a consistent backup of the state to FILE
  relay listen --user U --device D --key FILE [--edge ADDR] [--cert-hash B64] [--for DUR]
                                          connect to an edge as a device and print what arrives
  relay send --user U --device D --key FILE [--to D2] [--type T] [--ephemeral] TEXT...
                                          send an event as a device and wait for its delivery

Global flags (also from the environment variables shown):
`

func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer, getenv func(string) string) error {
	a := &app{stdin: stdin, stdout: stdout, stderr: stderr, envToken: getenv("RELAYCTL_TOKEN")}
	store, err := newTokenStore(getenv)
	if err != nil {
		return err
	}
	a.tokens = store
	fs := flag.NewFlagSet("relayctl", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var caFile, certFile, keyFile string
	fs.StringVar(&a.server, "server", "http://127.0.0.1:7400", "control API base URL")
	fs.StringVar(&a.output, "o", "table", "output format: table or json")
	fs.DurationVar(&a.timeout, "timeout", 30*time.Second, "timeout of each request")
	fs.StringVar(&caFile, "tls-ca", "", "PEM CA bundle to trust for an https server")
	fs.StringVar(&certFile, "tls-cert", "", "PEM client certificate (for clusters that require one)")
	fs.StringVar(&keyFile, "tls-key", "", "PEM key of --tls-cert")
	fs.Usage = func() {
		fmt.Fprint(stderr, usage)
		fs.VisitAll(func(f *flag.Flag) {
			fmt.Fprintf(stderr, "  -%s  [%s]  %s (default %q)\n", f.Name, flagenv.EnvName(envPrefix, f.Name), f.Usage, f.DefValue)
		})
	}
	if err = flagenv.Parse(fs, envPrefix, args, getenv); err != nil {
		return err
	}
	if a.output != "table" && a.output != "json" {
		return fmt.Errorf("-o %q: want table or json", a.output)
	}
	client, err := httpClient(a.server, caFile, certFile, keyFile)
	if err != nil {
		return err
	}
	a.http = client
	defer client.CloseIdleConnections()
	rest := fs.Args()
	if len(rest) == 0 {
		fs.Usage()
		return errors.New("missing command (see usage above)")
	}
	switch rest[0] {
	case "login":
		return a.login(ctx, rest[1:])
	case "logout":
		return a.logout(ctx)
	case "token":
		tok, err := a.accessToken(ctx)
		if err != nil {
			return err
		}
		if tok == "" {
			return errors.New("not logged in: run relayctl login")
		}
		return a.report(map[string]any{"accessToken": tok}, "%s", tok)
	case "user":
		return a.user(ctx, rest[1:])
	case "device":
		return a.device(ctx, rest[1:])
	case "keys":
		return a.keys(ctx, rest[1:])
	case "cluster":
		return a.cluster(ctx, rest[1:])
	case "backup":
		return a.backup(ctx, rest[1:])
	case "relay":
		return a.relay(ctx, rest[1:])
	case "help":
		fs.Usage()
		return nil
	}
	return fmt.Errorf("unknown command %q (run relayctl help)", rest[0])
}

func httpClient(server, caFile, certFile, keyFile string) (*http.Client, error) {
	tr := &http.Transport{ForceAttemptHTTP2: true}
	if strings.HasPrefix(server, "http://") {
		// Cleartext HTTP/2 (h2c), which the API speaks without TLS.
		var p http.Protocols
		p.SetUnencryptedHTTP2(true)
		tr.Protocols = &p
		return &http.Client{Transport: tr}, nil
	}
	if !strings.HasPrefix(server, "https://") {
		return nil, fmt.Errorf("--server %q: want an http:// or https:// URL", server)
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("read --tls-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--tls-ca %s holds no PEM certificates", caFile)
		}
		cfg.RootCAs = pool
	}
	if certFile != "" || keyFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("load --tls-cert/--tls-key: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	tr.TLSClientConfig = cfg
	return &http.Client{Transport: tr}, nil
}

func (a *app) clusterClient() controlv1connect.ClusterServiceClient {
	return controlv1connect.NewClusterServiceClient(a.http, a.base(), a.opts())
}

func (a *app) ctx(parent context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(parent, a.timeout)
}

// printJSON writes a message in the API's JSON form.
func (a *app) printJSON(m proto.Message) error {
	b, err := protojson.MarshalOptions{Multiline: true, Indent: "  ", EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(a.stdout, string(b))
	return err
}

func (a *app) table() *tabwriter.Writer {
	return tabwriter.NewWriter(a.stdout, 2, 4, 2, ' ', 0)
}

// report prints the outcome of a command that returns no record: v as
// JSON with -o json (keys in the API's lowerCamel style), else the
// sentence.
func (a *app) report(v map[string]any, format string, args ...any) error {
	if a.output == "json" {
		return printValue(a.stdout, v)
	}
	_, err := fmt.Fprintf(a.stdout, format+"\n", args...)
	return err
}

func printValue(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
