package api_test

import (
	"bytes"
	"compress/gzip"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/edge-relay/relay/control/api"
	"github.com/edge-relay/relay/control/auth"
	"github.com/edge-relay/relay/control/clustertest"
	"github.com/edge-relay/relay/control/server"
	controlv1 "github.com/edge-relay/relay/proto/control/v1"
	"github.com/edge-relay/relay/proto/control/v1/controlv1connect"
)

// gzipBomb returns a gzip stream of about size bytes that inflates to
// about 1000 times that: a run of gzip members of 1 MiB of zeros each
// (a gzip reader reads concatenated members as one stream).
func gzipBomb(t *testing.T, size int) []byte {
	t.Helper()
	var member bytes.Buffer
	zw, err := gzip.NewWriterLevel(&member, gzip.BestCompression)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := zw.Write(make([]byte, 1<<20)); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	out := bytes.Repeat(member.Bytes(), size/member.Len()+1)
	return out[:len(out)-len(out)%member.Len()]
}

// connectError is a Connect unary error in its JSON form.
type connectError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// postJSON sends a Connect unary call in JSON with the given headers and
// returns the HTTP status and the decoded error (if any).
func postJSON(t *testing.T, hc *http.Client, url string, body io.Reader, header map[string]string) (int, connectError) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url, body)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("post %s: %v", url, err)
	}
	defer resp.Body.Close()
	var ce connectError
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		if err := json.Unmarshal(b, &ce); err != nil {
			t.Fatalf("error body %q: %v", b, err)
		}
	}
	return resp.StatusCode, ce
}

// The gzip bomb of issue 11 (1 MB that inflates to a gigabyte) sent to
// Login, the one procedure anybody may call: the node refuses it with a
// clear error, and the memory it allocates meanwhile stays far below the
// bomb's size. TotalAlloc counts every byte allocated in the process, so
// it bounds the heap's growth from above, however short-lived.
func TestGzipBombAgainstLoginIsRefusedInBoundedMemory(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	hc := httpClient(t)
	login := url(c.Nodes[0]) + "/control.v1.AuthService/Login"
	for _, tc := range []struct {
		name string
		size int
	}{
		// Refused as it arrives: more than Login's 64 KiB as sent.
		{"1 MB as sent", 1 << 20},
		// Small enough as sent, refused while inflating.
		{"60 KiB as sent", 60 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bomb := gzipBomb(t, tc.size)
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			var wg sync.WaitGroup
			for range 4 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					status, ce := postJSON(t, hc, login, bytes.NewReader(bomb), map[string]string{"Content-Encoding": "gzip"})
					if status != http.StatusTooManyRequests || ce.Code != "resource_exhausted" || !strings.Contains(ce.Message, "larger than configured max") {
						t.Errorf("bomb of %d bytes: status %d, error %+v; want 429 resource_exhausted naming the limit", len(bomb), status, ce)
					}
				}()
			}
			wg.Wait()
			runtime.ReadMemStats(&after)
			if grew := after.TotalAlloc - before.TotalAlloc; grew > 64<<20 {
				t.Errorf("four bombs of %d bytes (inflating to %d MiB each) made the process allocate %d MiB; want < 64 MiB",
					len(bomb), len(bomb)/1000, grew>>20)
			}
		})
	}
}

// A call that needs credentials and has none is refused before its body
// is read: the body below never ends, yet the answer comes.
func TestCallWithoutCredentialsRefusedBeforeItsBody(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	hc := httpClient(t)
	for _, header := range []map[string]string{nil, {"Authorization": "Bearer not.a.token"}} {
		pr, pw := io.Pipe()
		t.Cleanup(func() { _ = pw.Close() })
		go func() { _, _ = pw.Write([]byte(`{"login":"`)) }() // and nothing more
		status, ce := postJSON(t, hc, url(c.Nodes[0])+"/control.v1.UserService/CreateUser", pr, header)
		if status != http.StatusUnauthorized || ce.Code != "unauthenticated" {
			t.Errorf("headers %v: status %d, error %+v; want 401 unauthenticated", header, status, ce)
		}
	}
}

// A caller whose token verifies but who may not make the call is refused
// before its body is read too, so a user cannot have an edge's 32 MiB
// body inflated and decoded only to be told no: a user's token on
// PutMailbox gets permission_denied, and the token of an account deleted
// since gets unauthenticated on a call its role may make, though both
// bodies never end. The account's calls before it was deleted were
// served: the check is the one the handler made, made earlier.
func TestACallerThatMayNotCallCostsNoBody(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	hc := httpClient(t)
	base := url(c.Nodes[0])
	mallory := c.TokenFor("mallory", controlv1.Role_ROLE_USER)
	auth := map[string]string{"Authorization": "Bearer " + mallory}
	endless := func() io.Reader {
		pr, pw := io.Pipe()
		t.Cleanup(func() { _ = pw.Close() })
		go func() { _, _ = pw.Write([]byte(`{"entries":[`)) }() // and nothing more
		return pr
	}
	users := controlv1connect.NewUserServiceClient(hc, base)
	meReq := connect.NewRequest(&controlv1.GetMeRequest{})
	meReq.Header().Set("Authorization", "Bearer "+mallory)
	meResp, err := users.GetMe(t.Context(), meReq)
	if err != nil {
		t.Fatalf("GetMe before: %v", err)
	}
	status, ce := postJSON(t, hc, base+"/edge.v1.MailboxService/PutMailbox", endless(), auth)
	if status != http.StatusForbidden || ce.Code != "permission_denied" {
		t.Errorf("a user's PutMailbox: status %d, error %+v; want 403 permission_denied", status, ce)
	}

	del := connect.NewRequest(&controlv1.DeleteUserRequest{Id: meResp.Msg.GetUser().GetId()})
	del.Header().Set("Authorization", "Bearer "+c.AdminToken())
	if _, err := users.DeleteUser(t.Context(), del); err != nil {
		t.Fatalf("delete mallory: %v", err)
	}
	me := base + controlv1connect.UserServiceGetMeProcedure
	status, ce = postJSON(t, hc, me, endless(), auth)
	if status != http.StatusUnauthorized || ce.Code != "unauthenticated" {
		t.Errorf("a deleted account's GetMe: status %d, error %+v; want 401 unauthenticated", status, ce)
	}
}

// A person's account may have MaxCallsPerAccount calls in flight on a
// node (here 4, bodies that never end); one more is refused at once with
// resource_exhausted, while another account's call is served, and calls
// that end give their places back. A person's body is taken uncompressed
// only (inflated, a few KiB would each make the node hold the
// procedure's limit); an edge's compressed body is taken.
func TestAnAccountsCallsInFlightAreBounded(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{Configure: func(cfg *server.Config) { cfg.Limits.MaxCallsPerAccount = 4 }})
	hc := httpClient(t)
	me := url(c.Nodes[0]) + controlv1connect.UserServiceGetMeProcedure
	mallory := map[string]string{"Authorization": "Bearer " + c.TokenFor("mallory", controlv1.Role_ROLE_USER)}
	var ends []*io.PipeWriter
	held := make(chan int, 64)
	hold := func() {
		pr, pw := io.Pipe()
		ends = append(ends, pw)
		t.Cleanup(func() { _ = pw.Close() })
		go func() { _, _ = pw.Write([]byte(`{`)) }() // and nothing more, until the test ends it
		go func() {
			status, _ := postJSON(t, hc, me, pr, mallory)
			held <- status
		}()
	}
	for range 4 {
		hold()
	}
	clustertest.Eventually(t, 30*time.Second, func() error {
		// A probe that came in before a held call took its place: that
		// call was refused, and another takes its place.
		for len(held) > 0 {
			if status := <-held; status != http.StatusTooManyRequests {
				t.Fatalf("a held call ended with status %d", status)
			}
			hold()
		}
		if status, ce := postJSON(t, hc, me, strings.NewReader(`{}`), mallory); status != http.StatusTooManyRequests || ce.Code != "resource_exhausted" {
			return fmt.Errorf("a fifth call: status %d, error %+v; want 429 resource_exhausted", status, ce)
		}
		return nil
	})
	admin := map[string]string{"Authorization": "Bearer " + c.AdminToken()}
	if status, ce := postJSON(t, hc, me, strings.NewReader(`{}`), admin); status != http.StatusOK {
		t.Fatalf("another account's call beside them: status %d, error %+v", status, ce)
	}
	for _, pw := range ends {
		_ = pw.Close() // their bodies end (malformed): the calls end
	}
	clustertest.Eventually(t, 30*time.Second, func() error {
		if status, ce := postJSON(t, hc, me, strings.NewReader(`{}`), mallory); status != http.StatusOK {
			return fmt.Errorf("a call once they ended: status %d, error %+v", status, ce)
		}
		return nil
	})

	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	_, _ = zw.Write([]byte(`{}`))
	_ = zw.Close()
	compressed := map[string]string{"Content-Encoding": "gzip", "Authorization": admin["Authorization"]}
	if status, ce := postJSON(t, hc, me, bytes.NewReader(gz.Bytes()), compressed); status == http.StatusOK || ce.Code != "unimplemented" {
		t.Errorf("a person's compressed body: status %d, error %+v; want unimplemented", status, ce)
	}
	// A Connect GET carries its message in the query, compressed if it
	// says so.
	get, err := http.NewRequest(http.MethodGet, me+"?connect=v1&encoding=json&base64=1&compression=gzip&message="+
		base64.RawURLEncoding.EncodeToString(gz.Bytes()), nil)
	if err != nil {
		t.Fatal(err)
	}
	get.Header.Set("Authorization", admin["Authorization"])
	resp, err := hc.Do(get)
	if err != nil {
		t.Fatal(err)
	}
	var ce connectError
	_ = json.NewDecoder(resp.Body).Decode(&ce)
	_ = resp.Body.Close()
	if resp.StatusCode == http.StatusOK || ce.Code != "unimplemented" {
		t.Errorf("a person's compressed GET: status %d, error %+v; want unimplemented", resp.StatusCode, ce)
	}
	compressed["Authorization"] = "Bearer " + c.TokenFor("edge-1", controlv1.Role_ROLE_EDGE)
	if status, ce := postJSON(t, hc, me, bytes.NewReader(gz.Bytes()), compressed); status != http.StatusOK {
		t.Errorf("an edge's compressed body: status %d, error %+v; want it served", status, ce)
	}
}

// clientFrom is an HTTP/2 (prior knowledge) client whose calls all go
// on one connection from the local address from (any 127.0.0.0/8
// address reaches a node on 127.0.0.1), as one attacker's or one edge's
// would.
func clientFrom(t *testing.T, from string) *http.Client {
	t.Helper()
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 10 * time.Second}
	var protos http.Protocols
	protos.SetUnencryptedHTTP2(true)
	tr := &http.Transport{DialContext: d.DialContext, Protocols: &protos, MaxConnsPerHost: 1}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// slowLogins starts n logins from hc (with header) whose bodies never
// end and returns the channel their errors arrive on.
func slowLogins(t *testing.T, hc *http.Client, login string, n int, header map[string]string) <-chan connectError {
	t.Helper()
	held := make(chan connectError, n)
	for range n {
		pr, pw := io.Pipe()
		t.Cleanup(func() { _ = pw.Close() })
		go func() { _, _ = pw.Write([]byte(`{"login":"admin",`)) }() // and nothing more
		go func() {
			status, ce := postJSON(t, hc, login, pr, header)
			if status == http.StatusOK {
				ce.Code = "ok"
			}
			held <- ce
		}()
	}
	return held
}

func adminLogin() io.Reader {
	return strings.NewReader(fmt.Sprintf(`{"login":"admin","password":%q}`, clustertest.AdminPassword))
}

// A call without credentials is read whole before it takes one of the
// node's MaxUnauthenticated slots, and what it holds while its body
// arrives counts against its source: logins whose bodies trickle in
// from one address (over one HTTP/2 connection, as many streams as it
// likes) hold that address's share only. Others log in meanwhile,
// though the node serves one login at a time; the slow ones end when
// PublicBodyTimeout passes, and their address may log in again.
func TestSlowLoginBodiesHoldOnlyTheirSourcesShare(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{Configure: func(cfg *server.Config) {
		cfg.Limits = api.Limits{MaxUnauthenticated: 1, MaxUnauthenticatedPerSource: 2, PublicBodyTimeout: 3 * time.Second}
	}})
	n := c.Nodes[0]
	login := url(n) + "/control.v1.AuthService/Login"
	attacker, other := clientFrom(t, "127.0.0.2"), clientFrom(t, "127.0.0.3")
	clustertest.Eventually(t, 30*time.Second, func() error { // once the cluster is initialized
		if status, ce := postJSON(t, other, login, adminLogin(), nil); status != http.StatusOK {
			return fmt.Errorf("login: status %d, error %+v", status, ce)
		}
		return nil
	})
	held := slowLogins(t, attacker, login, 2, nil)
	clustertest.Eventually(t, 20*time.Second, func() error {
		if v := n.Metric(t, "relay_control_unauthenticated_in_flight"); v != 2 {
			return fmt.Errorf("%v calls without credentials under way, want the 2 held ones", v)
		}
		return nil
	})
	status, ce := postJSON(t, attacker, login, adminLogin(), nil)
	if status != http.StatusTooManyRequests || ce.Code != "resource_exhausted" || !strings.Contains(ce.Message, "from 127.0.0.2") {
		t.Errorf("a third login from the same address: status %d, error %+v; want 429 resource_exhausted naming the address", status, ce)
	}
	if status, ce := postJSON(t, other, login, adminLogin(), nil); status != http.StatusOK {
		t.Errorf("a login from another address while the slow ones wait: status %d, error %+v; want 200", status, ce)
	}
	for range 2 {
		select {
		case ce := <-held:
			if ce.Code != "deadline_exceeded" {
				t.Errorf("a login whose body never ended: %+v; want deadline_exceeded", ce)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("a login whose body never ended was not cut by PublicBodyTimeout")
		}
	}
	if v := n.LabeledMetric(t, "relay_control_requests_refused_total", "reason", "slow_body"); v != 2 {
		t.Errorf("requests refused for a slow body: %v, want 2", v)
	}
	if v := n.LabeledMetric(t, "relay_control_requests_refused_total", "reason", "busy"); v != 1 {
		t.Errorf("requests refused as busy: %v, want 1", v)
	}
	if status, ce := postJSON(t, attacker, login, adminLogin(), nil); status != http.StatusOK {
		t.Errorf("a login from the slow address once its calls ended: status %d, error %+v; want 200", status, ce)
	}
}

// A browser's login an edge passes on counts against the browser's
// address. And an edge refreshes its token from slots of its own: with
// every call without credentials the node takes arriving (logins
// trickling in from browsers and strangers), a stranger's login is
// refused, and so is a browser's login the edge passes on, but the
// edge's own Refresh on its trusted connection goes through.
func TestAnEdgesRefreshHasSlotsOfItsOwn(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{Configure: func(cfg *server.Config) {
		cfg.Limits = api.Limits{MaxUnauthenticated: 1, MaxUnauthenticatedPerSource: 2, PublicBodyTimeout: time.Minute}
	}})
	n := c.Nodes[0]
	ctx := ctxT(t, time.Minute)
	users := controlv1connect.NewUserServiceClient(httpClient(t), url(n), connect.WithInterceptors(bearer(c.AdminToken())))
	if _, err := users.CreateUser(ctx, connect.NewRequest(&controlv1.CreateUserRequest{
		Login: "edges", Password: "password-of-the-edges", Role: controlv1.Role_ROLE_EDGE})); err != nil {
		t.Fatal(err)
	}
	edgeHC := clientFrom(t, "127.0.0.4")
	edgeAuth := controlv1connect.NewAuthServiceClient(edgeHC, url(n))
	lr, err := edgeAuth.Login(ctx, connect.NewRequest(&controlv1.LoginRequest{Login: "edges", Password: "password-of-the-edges"}))
	if err != nil {
		t.Fatal(err)
	}
	// Its first call that needs credentials makes its connection trusted.
	edgeUsers := controlv1connect.NewUserServiceClient(edgeHC, url(n), connect.WithInterceptors(bearer(lr.Msg.GetTokens().GetAccessToken())))
	if _, err := edgeUsers.GetMe(ctx, connect.NewRequest(&controlv1.GetMeRequest{})); err != nil {
		t.Fatal(err)
	}

	login := url(n) + "/control.v1.AuthService/Login"
	passedOn := func(browser string) map[string]string {
		return map[string]string{api.ForwardedByHeader: "Bearer " + lr.Msg.GetTokens().GetAccessToken(), "Relay-Forwarded-For": browser}
	}
	// A browser's logins the edge passes on count against the browser's
	// address, not the edge's.
	slowLogins(t, edgeHC, login, 2, passedOn("192.0.2.7"))
	waitUnderWay := func(want float64) {
		t.Helper()
		clustertest.Eventually(t, 20*time.Second, func() error {
			if v := n.Metric(t, "relay_control_unauthenticated_in_flight"); v != want {
				return fmt.Errorf("%v calls without credentials under way, want the %v held ones", v, want)
			}
			return nil
		})
	}
	waitUnderWay(2)
	status, ce := postJSON(t, edgeHC, login, adminLogin(), passedOn("192.0.2.7"))
	if status != http.StatusTooManyRequests || !strings.Contains(ce.Message, "from 192.0.2.7") {
		t.Errorf("a third login passed on for the same browser: status %d, error %+v; want 429 naming the browser", status, ce)
	}
	if status, ce := postJSON(t, edgeHC, login, adminLogin(), passedOn("192.0.2.8")); status != http.StatusOK {
		t.Errorf("a login passed on for another browser: status %d, error %+v; want 200", status, ce)
	}
	slowLogins(t, clientFrom(t, "127.0.0.2"), login, 2, nil) // 4 arriving: the node's bound
	waitUnderWay(4)
	status, ce = postJSON(t, clientFrom(t, "127.0.0.3"), login, adminLogin(), nil)
	if status != http.StatusTooManyRequests || ce.Code != "resource_exhausted" || !strings.Contains(ce.Message, "on this node") {
		t.Errorf("a stranger's login: status %d, error %+v; want 429 resource_exhausted", status, ce)
	}
	status, ce = postJSON(t, edgeHC, login, adminLogin(), passedOn("192.0.2.9"))
	if status != http.StatusTooManyRequests || ce.Code != "resource_exhausted" {
		t.Errorf("a browser's login the edge passes on: status %d, error %+v; want 429 resource_exhausted", status, ce)
	}
	rr, err := edgeAuth.Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: lr.Msg.GetTokens().GetRefreshToken()}))
	if err != nil {
		t.Fatalf("the edge's refresh while strangers hold every slot: %v", err)
	}
	if rr.Msg.GetTokens().GetAccessToken() == "" {
		t.Error("the edge's refresh returned no access token")
	}
}

// Tokens signed by keys the node does not know are refused from its own
// key set: however many arrive, at once or one after the other, they
// cost at most one read barrier per KeyRefreshEvery.
func TestUnknownKeyIDsCostAtMostOneRefresh(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{Auth: api.AuthConfig{KeyRefreshEvery: time.Hour}})
	n := c.Nodes[0]
	hc := httpClient(t)
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	junk := func(i int) string {
		now := time.Now()
		tok, err := auth.Sign(auth.SigningKey{ID: fmt.Sprintf("junk-%d", i), Private: priv}, auth.Claims{
			Issuer: "relay", Audience: "relay-api", Subject: "admin", Role: auth.RoleAdmin,
			IssuedAt: now, NotBefore: now, ExpiresAt: now.Add(time.Minute),
		})
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	call := func(i int) {
		status, ce := postJSON(t, hc, url(n)+"/control.v1.UserService/GetMe", strings.NewReader("{}"), map[string]string{"Authorization": "Bearer " + junk(i)})
		if status != http.StatusUnauthorized || !strings.Contains(ce.Message, "unknown key") {
			t.Errorf("token of an unknown key: %d %+v; want unauthenticated, unknown key", status, ce)
		}
	}
	before := n.Metric(t, "relay_control_read_barrier_seconds")
	var wg sync.WaitGroup
	for i := range 50 {
		wg.Add(1)
		go func() { defer wg.Done(); call(i) }()
	}
	wg.Wait()
	for i := range 50 {
		call(50 + i)
	}
	if got := n.Metric(t, "relay_control_read_barrier_seconds") - before; got > 1 {
		t.Errorf("100 tokens of unknown keys made %v read barriers, want at most 1", got)
	}
}

// Refresh tokens of ids nobody issued (anyone can make them up) are
// refused from the local state: however many arrive, at once or one
// after the other, they cost at most one catch-up with the leader per
// KeyRefreshEvery.
func TestUnknownRefreshTokensCostAtMostOneCatchUp(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{Auth: api.AuthConfig{KeyRefreshEvery: time.Hour}})
	n := c.Nodes[0]
	anon := controlv1connect.NewAuthServiceClient(httpClient(t), url(n))
	ctx := ctxT(t, time.Minute)
	call := func() {
		_, _, tok, err := auth.NewRefreshToken(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		_, err = anon.Refresh(ctx, connect.NewRequest(&controlv1.RefreshRequest{RefreshToken: tok}))
		if connect.CodeOf(err) != connect.CodeUnauthenticated || !strings.Contains(err.Error(), "not recognised") {
			t.Errorf("refresh token nobody issued: %v; want unauthenticated, not recognised", err)
		}
	}
	before := n.Metric(t, "relay_control_read_barrier_seconds")
	var wg sync.WaitGroup
	for range 4 { // as many at once as one source may send
		wg.Go(func() {
			for range 25 {
				call()
			}
		})
	}
	wg.Wait()
	if got := n.Metric(t, "relay_control_read_barrier_seconds") - before; got > 1 {
		t.Errorf("100 refresh tokens nobody issued made %v read barriers, want at most 1", got)
	}
}

// A client that accepts gzip gets small responses as they are and large
// ones compressed.
func TestOnlyLargeResponsesAreCompressed(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	tok := c.AdminToken()
	base := "http://" + c.Nodes[0].Server.APIAddr()
	call := func(procedure, body string) (encoding string, size int) {
		t.Helper()
		req, err := http.NewRequest(http.MethodPost, base+procedure, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Accept-Encoding", "gzip")
		req.Header.Set("Authorization", "Bearer "+tok)
		// A transport that leaves the encoding to the test.
		resp, err := (&http.Transport{DisableCompression: true}).RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: %d %s", procedure, resp.StatusCode, b)
		}
		return resp.Header.Get("Content-Encoding"), len(b)
	}
	if enc, n := call("/control.v1.UserService/GetMe", "{}"); enc != "" {
		t.Errorf("GetMe (%d bytes) came %s-encoded", n, enc)
	}
	for i := range 40 {
		if enc, _ := call("/control.v1.UserService/CreateUser", fmt.Sprintf(`{"login":"user-%02d"}`, i)); enc != "" {
			t.Fatalf("CreateUser came %s-encoded", enc)
		}
	}
	if enc, n := call("/control.v1.UserService/ListUsers", "{}"); enc != "gzip" {
		t.Errorf("ListUsers of 41 accounts: %q, %d bytes; want gzip", enc, n)
	}
}

// Tokens signed with the cluster's own key but not of the shape it
// issues, which only a holder of its signing keys can make (a removed
// node keeps them), are refused: an account's without a session (it
// would stand whatever sessions end), one living years, an account's
// naming a node (it would skip the account's checks), a node's naming no
// node (it would skip the membership check). One of the shape the
// cluster issues, signed the same way, is taken.
func TestTokensOfAShapeTheClusterDoesNotIssueAreRefused(t *testing.T) {
	c := clustertest.Start(t, 1, clustertest.Options{})
	n := c.Nodes[0]
	hc := httpClient(t)
	f := n.Server.Node().FSM()
	refreshID, _, err := auth.ParseRefreshToken(c.Login("admin", clustertest.AdminPassword).GetRefreshToken())
	if err != nil {
		t.Fatal(err)
	}
	rt, err := f.GetRefreshToken(refreshID)
	if err != nil {
		t.Fatal(err)
	}
	session := rt.GetFamilyId()
	admin, err := f.GetUserByLogin("admin")
	if err != nil {
		t.Fatal(err)
	}
	keys, cur, err := f.SigningKeys()
	if err != nil {
		t.Fatal(err)
	}
	var key auth.SigningKey
	for _, k := range keys {
		if k.GetId() == cur {
			key = auth.SigningKey{ID: k.GetId(), Private: ed25519.NewKeyFromSeed(k.GetPrivateSeed())}
		}
	}
	if key.Private == nil {
		t.Fatal("no current signing key")
	}
	now := time.Now()
	issued := auth.Claims{Issuer: "relay", Audience: "relay-api", Subject: admin.GetId(), Login: "admin", Role: auth.RoleAdmin,
		IssuedAt: now, NotBefore: now, ExpiresAt: now.Add(15 * time.Minute), ID: "at-test", Session: session}
	getMe := func(change func(*auth.Claims)) (int, connectError) {
		t.Helper()
		cl := issued
		change(&cl)
		tok, err := auth.Sign(key, cl)
		if err != nil {
			t.Fatal(err)
		}
		return postJSON(t, hc, url(n)+"/control.v1.UserService/GetMe", strings.NewReader("{}"), map[string]string{"Authorization": "Bearer " + tok})
	}
	if status, ce := getMe(func(*auth.Claims) {}); status != http.StatusOK {
		t.Fatalf("a token of the shape the cluster issues: %d %+v", status, ce)
	}
	for _, bad := range []struct {
		name   string
		change func(*auth.Claims)
		why    string
	}{
		{"no session", func(c *auth.Claims) { c.Session = "" }, "without a session"},
		{"two years", func(c *auth.Claims) { c.ExpiresAt = now.Add(2 * 365 * 24 * time.Hour) }, "lives longer than"},
		{"no issue time", func(c *auth.Claims) { c.IssuedAt = time.Time{} }, "lives longer than"},
		{"an account naming a node", func(c *auth.Claims) { c.Subject = "node:" + n.ID }, "names a node"},
		{"a node naming no node", func(c *auth.Claims) { c.Role, c.Session = api.RoleNode, "" }, "names no node"},
	} {
		if status, ce := getMe(bad.change); status != http.StatusUnauthorized || !strings.Contains(ce.Message, bad.why) {
			t.Errorf("%s: %d %+v; want unauthenticated, %q", bad.name, status, ce, bad.why)
		}
	}
}
