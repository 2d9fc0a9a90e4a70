package web_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/chromedp/cdproto/fetch"
	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/edge/client"
	"github.com/edge-relay/relay/edge/server"
	"github.com/edge-relay/relay/internal/relaytest"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
	relayv1 "github.com/edge-relay/relay/proto/relay/v1"
)

// chromium finds the browser, or skips (fails where RELAY_BROWSER_TESTS
// is "required", as in CI).
func chromium(t testing.TB) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	msg := "Chromium is not installed: apt-get install -y chromium (Debian), then run the browser tests again"
	if os.Getenv("RELAY_BROWSER_TESTS") == "required" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// browser starts a headless Chromium for the test.
func browser(t testing.TB) context.Context {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium(t)), chromedp.NoSandbox, chromedp.DisableGPU,
		chromedp.UserDataDir(t.TempDir()),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelCtx := chromedp.NewContext(actx)
	t.Cleanup(func() { cancelCtx(); cancelAlloc() })
	// The page's console and uncaught errors go to the test log.
	if err := chromedp.Listen(ctx, func(ev any) {
		switch ev := ev.(type) {
		case *runtime.EventConsoleAPICalled:
			var parts []string
			for _, a := range ev.Args {
				if a.Value != nil {
					parts = append(parts, string(a.Value))
				} else {
					parts = append(parts, a.Description)
				}
			}
			t.Logf("page console.%s: %s", ev.Type, strings.Join(parts, " "))
		case *runtime.EventExceptionThrown:
			d := ev.ExceptionDetails
			msg := d.Text
			if d.Exception != nil {
				msg += " " + d.Exception.Description
			}
			t.Logf("page exception at %s:%d: %s", d.URL, d.LineNumber+1, msg)
		}
	}); err != nil {
		t.Fatalf("listen: %v", err)
	}
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	return ctx
}

// do runs steps with a deadline; on failure it says what the page shows.
func do(ctx context.Context, t testing.TB, what string, steps ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := chromedp.Do(sctx, steps...); err != nil {
		status, _ := chromedp.Run(ctx, chromedp.TextContent(chromedp.CSS("#status")))
		errText, _ := chromedp.Run(ctx, chromedp.TextContent(chromedp.CSS("#error")))
		t.Fatalf("%s: %v (status %q, page error %q)", what, err, status, errText)
	}
}

// artifact writes a file where CI keeps test artifacts
// (RELAY_ARTIFACT_DIR, else a directory under the system's temp dir).
func artifact(t testing.TB, name string, b []byte) {
	t.Helper()
	dir := os.Getenv("RELAY_ARTIFACT_DIR")
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "relay-artifacts")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote %s", p)
}

// waitText waits until the element's text contains want.
func waitText(ctx context.Context, t testing.TB, sel, want string) {
	t.Helper()
	js := fmt.Sprintf(`(() => { const e = document.querySelector(%q); return !!e && e.textContent.includes(%q); })()`, sel, want)
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if _, err := chromedp.Run(wctx, chromedp.Poll[bool](js, chromedp.WithPollingInterval(20*time.Millisecond))); err != nil {
		got, _ := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(sel)))
		errText, _ := chromedp.Run(ctx, chromedp.Text(chromedp.CSS("#error")))
		t.Fatalf("%s never said %q (it says %q; page error %q): %v", sel, want, got, errText, err)
	}
}

// fixture is a relay (one control node, one edge with its admin port),
// a user alice with a native phone connected over QUIC, and a headless
// Chromium.
type fixture struct {
	r       *relaytest.Relay
	edge    *server.Server
	browser context.Context
	alice   string
	phone   *client.Client
	phoneID string
	phoneDv relaytest.Device
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	r := relaytest.Start(t, relaytest.Options{Edge: func(_ int, cfg *server.Config) {
		cfg.AdminAddr = "127.0.0.1:0"
		cfg.DrainWindow = 200 * time.Millisecond // clients come back quickly after a restart
	}})
	ctx := browser(t) // started after the relay, so closed before it (cleanups run last first)
	d := api.NewDialer(nil)
	t.Cleanup(func() { d.Close() })
	req := connect.NewRequest(&controlv1.CreateUserRequest{Login: "alice", Password: "alice-password-1"})
	req.Header().Set("Authorization", "Bearer "+r.Cluster.AdminToken())
	resp, err := controlv1connect.NewUserServiceClient(d.HTTPClient(), r.ControlURLs()[0]).CreateUser(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	alice := resp.Msg.GetUser().GetId()
	phoneDev := r.Device(alice, "phone")
	return &fixture{r: r, edge: r.Edges[0], browser: ctx, alice: alice, phone: r.Dial(0, phoneDev, client.QUIC), phoneID: phoneDev.ID, phoneDv: phoneDev}
}

// signIn opens the console (on the edge's admin port: http://127.0.0.1
// is a secure context, and WebTransport pins the self-signed
// certificate) and signs in as alice.
func (f *fixture) signIn(t *testing.T) {
	t.Helper()
	do(f.browser, t, "open the console", chromedp.Navigate(f.edge.AdminURL()+"/"), chromedp.WaitEnabled(chromedp.CSS("#login-button")))
	do(f.browser, t, "sign in",
		chromedp.SendKeys(chromedp.CSS("#login"), "alice"),
		chromedp.SendKeys(chromedp.CSS("#password"), "alice-password-1"),
		chromedp.Click(chromedp.CSS("#login-button")),
		chromedp.WaitVisible(chromedp.CSS("#register-form")))
}

// getMe calls GetMe through the edge with an access token and returns
// the HTTP status: 200 while the token's session is open, 401 once it
// ended.
func (f *fixture) getMe(t *testing.T, tok string) (int, error) {
	t.Helper()
	req, _ := http.NewRequest("POST", f.edge.AdminURL()+"/api/control.v1.UserService/GetMe", strings.NewReader("{}"))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	_ = resp.Body.Close()
	return resp.StatusCode, nil
}

// ended waits until tok's session has ended (GetMe refused).
func (f *fixture) ended(t *testing.T, what, tok string) {
	t.Helper()
	clustertest.Eventually(t, 10*time.Second, func() error {
		code, err := f.getMe(t, tok)
		if err != nil {
			return err
		}
		if code != http.StatusUnauthorized {
			return fmt.Errorf("%s still gets %d", what, code)
		}
		return nil
	})
}

// register registers the browser as a device, connecting with the
// transport chosen on the page, and returns its device id.
func (f *fixture) register(t *testing.T, transport string) string {
	t.Helper()
	do(f.browser, t, "register the browser",
		chromedp.SetValue(chromedp.CSS("#transport"), transport),
		chromedp.Click(chromedp.CSS("#register-button")))
	waitText(f.browser, t, "#status", "Connected over")
	return f.deviceID(t)
}

func (f *fixture) deviceID(t *testing.T) string {
	t.Helper()
	id, err := chromedp.Run(f.browser, chromedp.Evaluate[string](`document.getElementById("device-info").dataset.deviceId`))
	if err != nil || id == "" {
		t.Fatalf("the page shows no device id (%v)", err)
	}
	return id
}

// exchange sends an event from the phone to the browser and one back.
func (f *fixture) exchange(t *testing.T, browserID, label string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	clustertest.Eventually(t, 30*time.Second, func() error {
		if !slices.Contains(f.phone.Online(), browserID) {
			return errors.New("the browser is not online for the phone yet")
		}
		return nil
	})
	// Native -> browser.
	if err := f.phone.Send(ctx, client.Message{Targets: []string{browserID}, Type: "text", Payload: []byte("hello browser over " + label)}); err != nil {
		t.Fatalf("%s: phone -> browser: %v", label, err)
	}
	waitText(f.browser, t, "#log", "hello browser over "+label)
	// Ephemeral: a datagram over WebTransport, on the stream over the
	// WebSocket; never stored, so sent again until one arrives.
	eph := "ephemeral hello over " + label
	clustertest.Eventually(t, 30*time.Second, func() error {
		shown, err := chromedp.Run(f.browser, chromedp.Evaluate[bool](fmt.Sprintf(`document.getElementById("log").textContent.includes(%q)`, eph)))
		if err != nil || shown {
			return err
		}
		if err := f.phone.SendEphemeral(client.Message{Targets: []string{browserID}, Type: "text", Payload: []byte(eph)}); err != nil {
			return err
		}
		return errors.New("the page has not shown the ephemeral event yet")
	})
	// Browser -> native.
	do(f.browser, t, label+": send from the page",
		chromedp.SetValue(chromedp.CSS("#target"), f.phoneID),
		chromedp.SetValue(chromedp.CSS("#text"), "hello phone over "+label),
		chromedp.Click(chromedp.CSS("#send-button")))
	for {
		ev, err := f.phone.Receive(ctx)
		if err != nil {
			t.Fatalf("%s: browser -> phone: %v", label, err)
		}
		if string(ev.Payload) == "hello phone over "+label && ev.Sender == browserID {
			break
		}
	}
	waitText(f.browser, t, "#send-result", "Delivered")
	// The page names the sender, lists what it sent, and empties the box.
	waitText(f.browser, t, "#log", "from phone")
	waitText(f.browser, t, "#log", "to phone")
	if left, err := chromedp.Run(f.browser, chromedp.Value(chromedp.CSS("#text"))); err != nil || left != "" {
		t.Fatalf("%s: the text box kept %q after Send (%v)", label, left, err)
	}
}

func (f *fixture) screenshot(t *testing.T, name string) {
	t.Helper()
	shot, err := chromedp.Run(f.browser, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatal(err)
	}
	artifact(t, name, shot)
}

// The console page, in a real Chromium: sign in, register the browser as
// a device, exchange events both ways with a native Go device over
// WebTransport; reload with WebTransport disabled in the page: the
// device (its key in IndexedDB) reconnects by itself over the WebSocket
// and exchanges again; revoking it with relayctl disconnects the page,
// which says why.
func TestConsoleInChromium(t *testing.T) {
	f := newFixture(t)
	f.signIn(t)
	browserID := f.register(t, "webtransport")
	waitText(f.browser, t, "#status", "Connected over webtransport")
	f.exchange(t, browserID, "webtransport")
	f.screenshot(t, "console-webtransport.png")

	// The same page without WebTransport: it falls back on its own.
	if _, err := chromedp.Call(f.browser, page.AddScriptToEvaluateOnNewDocument,
		page.AddScriptToEvaluateOnNewDocumentParams{Source: "delete globalThis.WebTransport;"}); err != nil {
		t.Fatal(err)
	}
	do(f.browser, t, "reload", chromedp.Reload())
	waitText(f.browser, t, "#status", "Connected over websocket")
	if got := f.deviceID(t); got != browserID {
		t.Fatalf("after a reload the page is device %s, want %s (kept in IndexedDB)", got, browserID)
	}
	f.exchange(t, browserID, "websocket")
	f.screenshot(t, "console-websocket.png")

	// Revoked by an administrator with relayctl.
	out, err := relayctl(t, f.r.Cluster.AdminToken(), "--server", f.r.ControlURLs()[0], "device", "revoke", browserID, "--user", f.alice)
	if err != nil {
		t.Fatalf("relayctl device revoke: %v\n%s", err, out)
	}
	waitText(f.browser, t, "#status", "Disconnected for good: This device was revoked")
	// The page forgot the revoked device and offers to register again.
	do(f.browser, t, "register form", chromedp.WaitVisible(chromedp.CSS("#register-form")))
	waitText(f.browser, t, "#devices", "revoked")
	// The reason is shown once; without a session the page does not
	// claim to know who is online.
	if n, err := chromedp.Run(f.browser, chromedp.Evaluate[int](`document.body.textContent.split("This device was revoked").length - 1`)); err != nil || n != 1 {
		t.Fatalf("the revocation is shown %d times (%v)", n, err)
	}
	waitText(f.browser, t, "#devices", "unknown (connect to see)")
	f.screenshot(t, "console-revoked.png")

	// Signing out ends the session on the control plane: the page's
	// access token stops working.
	tok, err := chromedp.Run(f.browser, chromedp.Evaluate[string](`sessionStorage.getItem("relay.token")`))
	if err != nil || tok == "" {
		t.Fatalf("no access token in the page: %v", err)
	}
	do(f.browser, t, "sign out", chromedp.Click(chromedp.CSS("#signout-button")), chromedp.WaitVisible(chromedp.CSS("#login-form")))
	waitText(f.browser, t, "#status", "Signed out")
	f.ended(t, "the signed-out token", tok)
}

// A user changes its password on the console: a wrong current password,
// two new ones that differ or one out of bounds change nothing and say
// why; the change ends the account's other sessions and keeps the page's;
// a password the server takes is not refused by the page for counting
// differently (seven two-byte letters, typed); the new password signs in.
func TestConsoleChangesThePassword(t *testing.T) {
	f := newFixture(t)
	other := f.r.Cluster.Login("alice", "alice-password-1") // another login of alice's
	f.signIn(t)
	change := func(what, current, next, again string) {
		t.Helper()
		do(f.browser, t, what,
			chromedp.SetValue(chromedp.CSS("#current-password"), current),
			chromedp.SetValue(chromedp.CSS("#new-password"), next),
			chromedp.SetValue(chromedp.CSS("#new-password-again"), again),
			chromedp.Click(chromedp.CSS("#password-button")))
	}
	change("a wrong current password", "not alice's password", "alice-password-2", "alice-password-2")
	waitText(f.browser, t, "#error", "current_password")
	change("new passwords that differ", "alice-password-1", "alice-password-2", "alice-password-3")
	waitText(f.browser, t, "#error", "differ")
	change("a new password of 11 bytes", "alice-password-1", "alice-pw-11", "alice-pw-11")
	waitText(f.browser, t, "#error", "this one is 11")
	if code, err := f.getMe(t, other.GetAccessToken()); code != http.StatusOK {
		t.Fatalf("the other session after the refused changes: %d %v", code, err)
	}
	// Sent twice at once (a double click, a held Enter key): one change,
	// reported as done.
	do(f.browser, t, "the change, sent twice",
		chromedp.SetValue(chromedp.CSS("#current-password"), "alice-password-1"),
		chromedp.SetValue(chromedp.CSS("#new-password"), "alice-password-2"),
		chromedp.SetValue(chromedp.CSS("#new-password-again"), "alice-password-2"))
	if _, err := chromedp.Run(f.browser, chromedp.Evaluate[bool](`(() => { const f = document.getElementById("password-form"); f.requestSubmit(); f.requestSubmit(); return true; })()`)); err != nil {
		t.Fatal(err)
	}
	waitText(f.browser, t, "#password-result", "Password changed")
	if msg, err := chromedp.Run(f.browser, chromedp.Text(chromedp.CSS("#error"))); err != nil || msg != "" {
		t.Fatalf("the page shows an error after a change sent twice: %q (%v)", msg, err)
	}
	f.screenshot(t, "console-password-changed.png")
	f.ended(t, "the other session's token", other.GetAccessToken())
	tok, err := chromedp.Run(f.browser, chromedp.Evaluate[string](`sessionStorage.getItem("relay.token")`))
	if err != nil {
		t.Fatal(err)
	}
	if code, err := f.getMe(t, tok); code != http.StatusOK {
		t.Fatalf("the page's own session after its change: %d %v", code, err)
	}
	// Typed, as a user would: the browser's length checks apply only to
	// what was typed, and minlength would count 7 where the server counts
	// 14 bytes.
	const accented = "ééééééé"
	if _, err := chromedp.Run(f.browser, chromedp.Evaluate[bool](`(() => { document.getElementById("password-result").textContent = ""; return true; })()`)); err != nil {
		t.Fatal(err)
	}
	do(f.browser, t, "type a password of seven two-byte letters",
		chromedp.SetValue(chromedp.CSS("#current-password"), "alice-password-2"),
		chromedp.SendKeys(chromedp.CSS("#new-password"), accented),
		chromedp.SendKeys(chromedp.CSS("#new-password-again"), accented),
		chromedp.Click(chromedp.CSS("#password-button")))
	waitText(f.browser, t, "#password-result", "Password changed")
	do(f.browser, t, "sign out", chromedp.Click(chromedp.CSS("#signout-button")), chromedp.WaitVisible(chromedp.CSS("#login-form")))
	do(f.browser, t, "sign in with the new password",
		chromedp.SetValue(chromedp.CSS("#login"), "alice"),
		chromedp.SetValue(chromedp.CSS("#password"), accented),
		chromedp.Click(chromedp.CSS("#login-button")),
		chromedp.WaitVisible(chromedp.CSS("#register-form")))
}

// Signing in again in a tab whose access token it lost (expired) ends the
// session it signed in before, rather than leave it to live until its
// refresh token expires: that session's access token stops working.
func TestConsoleSigningInAgainEndsTheOldSession(t *testing.T) {
	f := newFixture(t)
	f.signIn(t)
	old, err := chromedp.Run(f.browser, chromedp.Evaluate[string](`sessionStorage.getItem("relay.token")`))
	if err != nil || old == "" {
		t.Fatalf("no access token in the page: %v", err)
	}
	if code, err := f.getMe(t, old); code != http.StatusOK {
		t.Fatalf("the first session's access token: %d before signing in again (%v)", code, err)
	}
	// The page loses its access token (as when it expired) and asks to
	// sign in again.
	if _, err := chromedp.Run(f.browser, chromedp.Evaluate[any](`sessionStorage.removeItem("relay.token")`)); err != nil {
		t.Fatal(err)
	}
	do(f.browser, t, "reload", chromedp.Reload())
	f.signIn(t)
	f.ended(t, "the first session's access token", old)
}

// The edge restarts (with a new self-signed certificate) while the page
// is connected: the page reconnects by itself, resumes with its ticket,
// and an event sent while the edge was away is delivered once it is
// back.
func TestConsoleReconnectsAfterAnEdgeRestart(t *testing.T) {
	f := newFixture(t)
	f.signIn(t)
	browserID := f.register(t, "webtransport")
	f.exchange(t, browserID, "webtransport")

	addr, admin := f.edge.Addr(), strings.TrimPrefix(f.edge.AdminURL(), "http://")
	oldHash := f.edge.CertHashes()[0].SHA256
	f.r.StopEdge(0)
	waitText(f.browser, t, "#status", "Disconnected")
	do(f.browser, t, "send while the edge is away",
		chromedp.SetValue(chromedp.CSS("#target"), f.phoneID),
		chromedp.SetValue(chromedp.CSS("#text"), "sent while the edge was away"),
		chromedp.Click(chromedp.CSS("#send-button")))
	waitText(f.browser, t, "#send-result", "Sending")

	cfg := f.r.EdgeConfig(0)
	cfg.Addr, cfg.AdminAddr = addr, admin
	f.edge = f.r.StartEdgeWith(0, cfg)
	if f.edge.CertHashes()[0].SHA256 == oldHash {
		t.Fatal("the restarted edge kept its certificate; the test wants a new one")
	}
	// The phone pinned the old certificate: it comes back as a new client.
	_ = f.phone.Close()
	f.phone = f.r.Dial(0, f.phoneDv, client.QUIC)
	waitText(f.browser, t, "#status", "Connected over webtransport")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		ev, err := f.phone.Receive(ctx)
		if err != nil {
			t.Fatalf("the event sent while the edge was away: %v", err)
		}
		if string(ev.Payload) == "sent while the edge was away" {
			break
		}
	}
	waitText(f.browser, t, "#send-result", "Delivered")
	if n := relaytest.Counter(t, f.edge, "relay_edge_handshakes_total", "result", "resumed"); n < 1 {
		t.Fatalf("the page did not resume its session (resumed handshakes: %v)", n)
	}
	f.exchange(t, browserID, "webtransport after the restart")
}

// Where UDP does not get through, the page's automatic choice connects
// over the WebSocket (after WebTransport's head start), remembers it for
// this edge, and goes straight to the WebSocket next time. The page also
// revokes another device of the user.
func TestConsoleWhereUDPIsBlocked(t *testing.T) {
	f := newFixture(t)
	// A UDP socket that never answers: packets to it vanish, as behind a
	// firewall that drops UDP. The page learns the edge's UDP address
	// from /.well-known/relay/edge; the browser is given this one.
	hole, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hole.Close() })
	info, err := json.Marshal(map[string]string{"id": "edge-0", "addr": hole.LocalAddr().String()})
	if err != nil {
		t.Fatal(err)
	}
	intercept(t, f.browser, "*"+server.EdgeInfoPath, info)
	tabletDev := f.r.Device(f.alice, "tablet")
	tablet := f.r.Dial(0, tabletDev, client.WebSocket)
	f.signIn(t)
	// Count the page's WebTransport attempts.
	if _, err := chromedp.Run(f.browser, chromedp.Evaluate[bool](`(() => {
		window.wtAttempts = 0;
		const WT = window.WebTransport;
		window.WebTransport = class extends WT { constructor(...a) { super(...a); window.wtAttempts++; } };
		return true;
	})()`)); err != nil {
		t.Fatal(err)
	}
	attempts := func() int {
		t.Helper()
		n, err := chromedp.Run(f.browser, chromedp.Evaluate[int](`window.wtAttempts`))
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	browserID := f.register(t, "auto")
	waitText(f.browser, t, "#status", "Connected over websocket")
	if n := attempts(); n != 1 {
		t.Fatalf("%d WebTransport attempts before falling back, want 1", n)
	}
	remembered, err := chromedp.Run(f.browser, chromedp.Evaluate[string](fmt.Sprintf(`localStorage.getItem("relay.transport." + %q)`, hole.LocalAddr().String())))
	if err != nil || remembered != "websocket" {
		t.Fatalf("remembered transport for the edge: %q (%v), want websocket", remembered, err)
	}
	f.exchange(t, browserID, "websocket")
	// Connecting again goes to the WebSocket at once.
	do(f.browser, t, "connect again", chromedp.Click(chromedp.CSS("#connect-button")))
	waitText(f.browser, t, "#status", "Connected over websocket")
	if n := attempts(); n != 1 {
		t.Fatalf("%d WebTransport attempts in all, want 1: the remembered WebSocket was not used", n)
	}
	f.exchange(t, browserID, "websocket again")

	// The page revokes the tablet: its session ends with REVOKED, and the
	// page's list says so.
	do(f.browser, t, "revoke the tablet", chromedp.Click(chromedp.CSS(fmt.Sprintf(`tr[data-device=%q] button.revoke`, tabletDev.ID))))
	clustertest.Eventually(t, 30*time.Second, func() error {
		if !errors.Is(tablet.Err(), &client.Error{Code: relayv1.ErrorCode_ERROR_CODE_REVOKED}) {
			return fmt.Errorf("the tablet's client: %v, want REVOKED", tablet.Err())
		}
		return nil
	})
	waitText(f.browser, t, fmt.Sprintf(`tr[data-device=%q]`, tabletDev.ID), "revoked")
}

// intercept answers the page's requests for URLs matching pattern with
// body (application/json), as a network in between could.
func intercept(t *testing.T, ctx context.Context, pattern string, body []byte) {
	t.Helper()
	paused := make(chan fetch.RequestID, 16)
	if err := chromedp.Listen(ctx, func(ev any) {
		if ev, ok := ev.(*fetch.EventRequestPaused); ok {
			select {
			case paused <- ev.RequestID:
			default:
			}
		}
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := chromedp.Call(ctx, fetch.Enable, fetch.EnableParams{Patterns: []*fetch.RequestPattern{{URLPattern: pattern}}}); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for {
			select {
			case <-done:
				return
			case id := <-paused:
				_, err := chromedp.Call(ctx, fetch.FulfillRequest, fetch.FulfillRequestParams{
					RequestID: id, ResponseCode: 200, Body: body,
					ResponseHeaders: []*fetch.HeaderEntry{{Name: "Content-Type", Value: "application/json"}},
				})
				if err != nil && ctx.Err() == nil {
					t.Errorf("fulfill %s: %v", pattern, err)
				}
			}
		}
	}()
	t.Cleanup(func() { close(done); <-stopped })
}

// relayctl runs the relayctl command, built from this module, with an
// admin's token.
func relayctl(t *testing.T, token string, args ...string) (string, error) {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "relayctl")
	build := exec.Command("go", "build", "-o", bin, "github.com/edge-relay/relay/cmd/relayctl")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build relayctl: %v\n%s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(), "RELAYCTL_TOKEN="+token, "RELAYCTL_CONFIG_DIR="+dir)
	out, err := cmd.CombinedOutput()
	return string(out), err
}
