// Command relayctl is the command-line client of the control plane's
// Connect API.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/edge-relay/relay/internal/certpool"
)

const envPrefix = "RELAYCTL_"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr, os.Getenv)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "relayctl:", oneLine(err))
		os.Exit(1)
	}
}

// oneLine turns an error into the one line relayctl prints, with a hint
// for the errors a user can act on.
func oneLine(err error) string {
	msg := strings.ReplaceAll(err.Error(), "\n", " ")
	if _, ok := errors.AsType[*hintedError](err); ok {
		return msg // it says what to do already, better than its code can
	}
	switch connect.CodeOf(err) {
	case connect.CodeUnavailable:
		// (The failure the code came from, not the others a message
		// naming every member lists.)
		var ce *connect.Error
		if errors.As(err, &ce) && (strings.Contains(ce.Message(), "connection refused") || strings.Contains(ce.Message(), "no such host")) {
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

// hintedError is an error with what to do about it, which the command
// knew better than oneLine's hint for its code would (a refused login is
// not fixed by logging in).
type hintedError struct {
	err  error
	hint string
}

func (e *hintedError) Error() string { return e.err.Error() + " (" + e.hint + ")" }
func (e *hintedError) Unwrap() error { return e.err }

// withHint adds a hint to err, to be printed after it in parentheses.
func withHint(err error, hint string) error { return &hintedError{err: err, hint: hint} }

// app is one run of relayctl: its global flags, the HTTP client, the
// token cache and the session resolved for the servers named.
type app struct {
	stdin          io.Reader
	stdout, stderr io.Writer
	getenv         func(string) string

	servers                   []string // --server: API base URLs, in order
	output                    string
	timeout                   time.Duration
	caFile, certFile, keyFile string

	http     *http.Client
	tokens   *tokenStore
	envToken string // RELAYCTL_TOKEN: an access token used as is
	sess     *session
	prepared bool // sess was resolved (see prepare)
	// key is the Idempotency-Key of this run's write: the same for every
	// retry of it, on any member.
	key string
}

func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer, getenv func(string) string) error {
	a := &app{stdin: stdin, stdout: stdout, stderr: stderr, getenv: getenv, envToken: getenv("RELAYCTL_TOKEN")}
	root := a.rootCommand()
	root.SetArgs(args)
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	defer func() {
		if a.http != nil {
			a.http.CloseIdleConnections()
		}
	}()
	err := root.ExecuteContext(ctx)
	if _, hinted := errors.AsType[*hintedError](err); !hinted && connect.CodeOf(err) == connect.CodeUnauthenticated {
		if hint := a.refusedHint(); hint != "" {
			err = withHint(err, hint)
		}
	}
	return err
}

// refusedHint says what credentials this run sent, when that is not
// what oneLine's "(run relayctl login)" would fix; "" otherwise.
func (a *app) refusedHint() string {
	switch {
	case a.envToken != "":
		// The token was given, not a login: logging in would not change
		// what is sent.
		return "the access token in RELAYCTL_TOKEN was refused (expired, revoked, or another cluster's): unset RELAYCTL_TOKEN to use your relayctl login, or set it to a valid token"
	case a.prepared && a.sess == nil:
		// There are logins, and none of their clusters lists these
		// servers, so none was sent.
		if m, err := a.tokens.load(); err == nil && len(m) > 0 {
			return fmt.Sprintf("relayctl knows no login whose cluster lists %s, so it sent none: "+
				"a spelling other than the one the member advertises, a member your role cannot list, a node removed from the cluster, "+
				"or another cluster; to use it anyway, log in there: relayctl login --server URL", strings.Join(a.servers, ", "))
		}
	}
	return ""
}

func (a *app) rootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:   "relayctl",
		Short: "Command-line client of the relay's control plane",
		Long: `relayctl manages a relay's control plane through its Connect API: accounts,
devices, keys, cluster membership and backups; "relayctl relay" acts as a
device on an edge.

Global flags may come before or after the command, and each can also be set
from the environment variable named in its help (RELAYCTL_SERVER, ...). With
several --server endpoints (or the members a login learnt), calls that are safe
to repeat are retried on another member when one fails.

"relayctl login" keeps its tokens in the user's config directory
($XDG_CONFIG_HOME/relayctl, or RELAYCTL_CONFIG_DIR); set
RELAYCTL_TOKEN to an access token to use it instead (scripts, CI).`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			if cmd.Annotations[groupAnnotation] != "" {
				return nil // it prints its help, needing nothing set up
			}
			if p := cmd.Parent(); p != nil && p.Name() == "completion" && p.Parent() == cmd.Root() {
				// It prints a shell script: a RELAYCTL_* variable the
				// shell holds for other commands must not fail it.
				return nil
			}
			return a.setup(cmd)
		},
	}
	pf := root.PersistentFlags()
	pf.StringSliceVar(&a.servers, "server", []string{"http://127.0.0.1:7400"}, "control API base URL; repeat or separate with commas to name several members [RELAYCTL_SERVER]")
	pf.StringVarP(&a.output, "output", "o", "table", "output format: table or json [RELAYCTL_OUTPUT]")
	pf.DurationVar(&a.timeout, "timeout", 30*time.Second, "how long a command may take, retries included [RELAYCTL_TIMEOUT]")
	pf.StringVar(&a.caFile, "tls-ca", "", "PEM CA bundle to trust for an https server [RELAYCTL_TLS_CA]")
	pf.StringVar(&a.certFile, "tls-cert", "", "PEM client certificate (for clusters that require one) [RELAYCTL_TLS_CERT]")
	pf.StringVar(&a.keyFile, "tls-key", "", "PEM key of --tls-cert [RELAYCTL_TLS_KEY]")
	_ = root.RegisterFlagCompletionFunc("output", cobra.FixedCompletions([]string{"table", "json"}, cobra.ShellCompDirectiveNoFileComp))
	root.AddGroup(&cobra.Group{ID: "api", Title: "Control plane:"}, &cobra.Group{ID: "device", Title: "Acting as a device:"})
	for _, c := range []*cobra.Command{a.loginCommand(), a.logoutCommand(), a.tokenCommand(), a.userCommand(),
		a.deviceCommand(), a.keysCommand(), a.clusterCommand(), a.backupCommand()} {
		c.GroupID = "api"
		root.AddCommand(c)
	}
	relay := a.relayCommand()
	relay.GroupID = "device"
	root.AddCommand(relay, a.versionCommand())
	// Cobra adds its completion group itself, at Execute; added now, it
	// refuses unknown subcommands like the others. (It takes its output
	// writer as it is made: set it first.)
	root.SetOut(a.stdout)
	root.SetErr(a.stderr)
	root.InitDefaultCompletionCmd()
	for _, c := range root.Commands() {
		refuseUnknownSubcommands(c)
	}
	return root
}

// groupAnnotation marks a command that only groups others (see
// refuseUnknownSubcommands).
const groupAnnotation = "relayctl-group"

// refuseUnknownSubcommands makes every command under c (c included) that
// only groups others fail on an argument that names none of them, as
// cobra fails on an unknown command at the top level: left to cobra, such
// a command prints its help and succeeds, so a typo (relayctl user lst)
// looks like success to a script. Alone, or with --help, it still prints
// its help and succeeds.
func refuseUnknownSubcommands(c *cobra.Command) {
	for _, sub := range c.Commands() {
		refuseUnknownSubcommands(sub)
	}
	if !c.HasSubCommands() || c.Runnable() {
		return
	}
	if c.Annotations == nil {
		c.Annotations = map[string]string{}
	}
	c.Annotations[groupAnnotation] = "true"
	c.Args = func(cmd *cobra.Command, args []string) error {
		if len(args) == 0 {
			return nil
		}
		msg := fmt.Sprintf("unknown command %q for %q", args[0], cmd.CommandPath())
		if cmd.SuggestionsMinimumDistance <= 0 {
			cmd.SuggestionsMinimumDistance = 2 // cobra's default
		}
		if s := cmd.SuggestionsFor(args[0]); len(s) > 0 {
			msg += fmt.Sprintf("; did you mean %s?", strings.Join(s, " or "))
		}
		return fmt.Errorf("%s (%s --help lists its commands)", msg, cmd.CommandPath())
	}
	c.RunE = func(cmd *cobra.Command, _ []string) error { return cmd.Help() }
}

// setup reads the environment for global flags not given, checks them,
// and builds the HTTP client and token cache.
func (a *app) setup(cmd *cobra.Command) error {
	var err error
	cmd.Root().PersistentFlags().VisitAll(func(f *pflag.Flag) {
		if err != nil || f.Changed {
			return
		}
		names := []string{envPrefix + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))}
		if f.Shorthand != "" {
			names = append(names, envPrefix+strings.ToUpper(f.Shorthand)) // RELAYCTL_O, as before
		}
		for _, name := range names {
			if v := a.getenv(name); v != "" {
				if f.Value.Type() == "stringSlice" {
					err = f.Value.(pflag.SliceValue).Replace(strings.Split(v, ","))
				} else {
					err = f.Value.Set(v)
				}
				if err != nil {
					err = fmt.Errorf("environment variable %s=%q: %w", name, v, err)
				}
				return
			}
		}
	})
	if err != nil {
		return err
	}
	if a.output != "table" && a.output != "json" {
		return fmt.Errorf("-o %q: want table or json", a.output)
	}
	var servers []string
	for _, s := range a.servers {
		if s = strings.TrimRight(strings.TrimSpace(s), "/"); s != "" && !contains(servers, s) {
			servers = append(servers, s)
		}
	}
	if len(servers) == 0 {
		return errors.New("--server is empty")
	}
	a.servers = servers
	if a.http, err = httpClient(a.servers, a.caFile, a.certFile, a.keyFile); err != nil {
		return err
	}
	var b [16]byte
	_, _ = rand.Read(b[:])
	a.key = hex.EncodeToString(b[:])
	a.tokens, err = newTokenStore(a.getenv)
	return err
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// httpClient returns a client for the servers: HTTP/2 over cleartext
// (h2c) for http:// URLs, TLS with the given CA and client certificate
// for https:// ones.
func httpClient(servers []string, caFile, certFile, keyFile string) (*http.Client, error) {
	for _, s := range servers {
		if !strings.HasPrefix(s, "http://") && !strings.HasPrefix(s, "https://") {
			return nil, fmt.Errorf("--server %q: want an http:// or https:// URL", s)
		}
	}
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pool, err := certpool.FromFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("--tls-ca: %w", err)
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
	return &http.Client{
		Transport: bySchemeTransport{
			h2c: &http.Transport{Protocols: &p},
			tls: &http.Transport{ForceAttemptHTTP2: true, TLSClientConfig: cfg},
		},
		// Redirects are not followed: a call's body may hold a password
		// or a refresh token, which a 307 or 308 would have sent again to
		// wherever it points. The API never redirects.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}, nil
}

// bySchemeTransport sends http:// requests as h2c (which the API speaks
// without TLS) and https:// ones over TLS.
type bySchemeTransport struct{ h2c, tls *http.Transport }

func (t bySchemeTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.URL.Scheme == "http" {
		return t.h2c.RoundTrip(r)
	}
	return t.tls.RoundTrip(r)
}

// CloseIdleConnections lets http.Client.CloseIdleConnections reach both.
func (t bySchemeTransport) CloseIdleConnections() {
	t.h2c.CloseIdleConnections()
	t.tls.CloseIdleConnections()
}

// printJSON writes a message in the API's JSON form.
func (a *app) printJSON(m proto.Message) error {
	b, err := apiJSON(m, nil)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(a.stdout, string(b))
	return err
}

// apiJSON is m in the API's JSON form (protojson, every field present),
// with extra appended as its last keys (each value already JSON), laid out
// the same way by every build: protojson varies its whitespace from build
// to build on purpose, which scripts that diff or grep the output would
// trip on, so the text is compacted and indented here.
func apiJSON(m proto.Message, extra map[string]json.RawMessage) ([]byte, error) {
	b, err := protojson.MarshalOptions{EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		return nil, err
	}
	var compact bytes.Buffer
	if err := json.Compact(&compact, b); err != nil {
		return nil, fmt.Errorf("the API's JSON of %s: %w", m.ProtoReflect().Descriptor().FullName(), err)
	}
	if len(extra) > 0 {
		obj := compact.Bytes()
		if len(obj) < 2 || obj[len(obj)-1] != '}' {
			return nil, fmt.Errorf("the API's JSON of %s is not an object", m.ProtoReflect().Descriptor().FullName())
		}
		compact.Truncate(compact.Len() - 1)
		keys := slices.Sorted(maps.Keys(extra))
		for i, k := range keys {
			if i > 0 || len(obj) > 2 {
				compact.WriteByte(',')
			}
			kb, _ := json.Marshal(k)
			compact.Write(kb)
			compact.WriteByte(':')
			compact.Write(extra[k])
		}
		compact.WriteByte('}')
	}
	var out bytes.Buffer
	if err := json.Indent(&out, compact.Bytes(), "", "  "); err != nil {
		return nil, fmt.Errorf("the API's JSON of %s: %w", m.ProtoReflect().Descriptor().FullName(), err)
	}
	return out.Bytes(), nil
}

// print writes a record: in the API's JSON form with -o json, else as a
// table.
func (a *app) print(m proto.Message, table func() error) error {
	if a.output == "json" {
		return a.printJSON(m)
	}
	return table()
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
