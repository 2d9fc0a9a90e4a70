package k6

// The k6 modules of the test adapter (see sim_test.go): only the exports
// the suite uses, with k6's semantics, on real connections.

import (
	"bytes"
	"context"
	"crypto/md5" //nolint:gosec // k6/crypto offers it; scripts choose
	"crypto/rand"
	"crypto/sha1" //nolint:gosec // k6/crypto offers it; scripts choose
	"crypto/sha256"
	"crypto/sha512"
	"crypto/tls"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/coder/websocket"
	"github.com/grafana/sobek"
)

// nativeModule is a k6 module as an ES module record: its exports are
// the properties of one object, which is also its default export, as in
// k6. An import of anything else fails the link.
type nativeModule struct {
	vals map[string]sobek.Value
}

func newNative(rt *sobek.Runtime, exports map[string]any) *nativeModule {
	m := &nativeModule{vals: map[string]sobek.Value{}}
	def := rt.NewObject()
	for k, v := range exports {
		val := rt.ToValue(v)
		m.vals[k] = val
		_ = def.Set(k, val)
	}
	m.vals["default"] = def
	return m
}

func (m *nativeModule) Link() error { return nil }

func (m *nativeModule) ResolveExport(name string, _ ...sobek.ResolveSetElement) (*sobek.ResolvedBinding, bool) {
	if _, ok := m.vals[name]; !ok {
		return nil, false
	}
	return &sobek.ResolvedBinding{Module: m, BindingName: name}, false
}

func (m *nativeModule) Evaluate(rt *sobek.Runtime) *sobek.Promise {
	p, resolve, _ := rt.NewPromise()
	_ = resolve(m)
	return p
}

func (m *nativeModule) GetExportedNames(callback func([]string), _ ...sobek.ModuleRecord) bool {
	callback(sortedKeys(m.vals))
	return true
}

func (m *nativeModule) GetBindingValue(name string) sobek.Value { return m.vals[name] }

func (v *vu) modules(ctx context.Context) map[string]sobek.ModuleRecord {
	rt := v.rt
	return map[string]sobek.ModuleRecord{
		"k6":            newNative(rt, v.k6()),
		"k6/http":       newNative(rt, v.httpModule(ctx)),
		"k6/metrics":    newNative(rt, v.metricsModule()),
		"k6/websockets": newNative(rt, map[string]any{"WebSocket": v.webSocketClass(ctx)}),
		"k6/timers":     newNative(rt, objectMap(v.timers())),
		"k6/crypto":     newNative(rt, v.cryptoModule()),
		"k6/encoding":   newNative(rt, v.encodingModule()),
		"k6/execution":  &nativeModule{vals: map[string]sobek.Value{"default": v.execution()}},
	}
}

func objectMap(o *sobek.Object) map[string]any {
	out := map[string]any{}
	for _, k := range o.Keys() {
		out[k] = o.Get(k)
	}
	return out
}

func (v *vu) throw(format string, args ...any) {
	panic(v.rt.NewGoError(fmt.Errorf(format, args...)))
}

// k6: check, fail, group, sleep.
func (v *vu) k6() map[string]any {
	rt := v.rt
	return map[string]any{
		"check": func(val sobek.Value, sets *sobek.Object, _ sobek.Value) bool {
			all := true
			for _, name := range sets.Keys() {
				c := sets.Get(name)
				ok := c.ToBoolean()
				if fn, isFn := sobek.AssertFunction(c); isFn {
					r, err := fn(sobek.Undefined(), val)
					if err != nil {
						panic(err)
					}
					ok = r.ToBoolean()
				}
				v.s.check(name, ok)
				all = all && ok
			}
			return all
		},
		"fail": func(msg string) {
			panic(rt.NewGoError(errors.New(msg)))
		},
		"group": func(_ string, fn sobek.Callable) sobek.Value {
			r, err := fn(sobek.Undefined())
			if err != nil {
				panic(err)
			}
			return r
		},
		"sleep": func(seconds float64) {
			time.Sleep(time.Duration(seconds * float64(time.Second)))
		},
	}
}

// k6/timers (also k6's global timers).
func (v *vu) timers() *sobek.Object {
	rt := v.rt
	type timer struct {
		t      *time.Timer
		stop   func()
		forget func()
	}
	timers := map[int64]*timer{}
	var next int64
	clear := func(id int64) {
		if t, ok := timers[id]; ok {
			delete(timers, id)
			t.forget()
			t.stop()
		}
	}
	set := func(repeat bool) func(call sobek.FunctionCall) sobek.Value {
		return func(call sobek.FunctionCall) sobek.Value {
			fn := call.Argument(0)
			if _, ok := sobek.AssertFunction(fn); !ok {
				v.throw("the callback is not a function")
			}
			d := time.Duration(call.Argument(1).ToFloat() * float64(time.Millisecond))
			args := append([]sobek.Value(nil), call.Arguments[min(2, len(call.Arguments)):]...)
			next++
			id := next
			tm := &timer{}
			v.loop.hold()
			var once sync.Once
			tm.stop = func() {
				once.Do(func() {
					tm.t.Stop()
					v.loop.release()
				})
			}
			var fire func()
			fire = func() {
				v.loop.enqueue(func() {
					if timers[id] != tm {
						return // cleared meanwhile
					}
					if !repeat {
						delete(timers, id)
						tm.forget()
						tm.stop()
					} else {
						tm.t = time.AfterFunc(max(d, time.Millisecond), fire)
					}
					v.callback(fn, args...)
				})
			}
			tm.t = time.AfterFunc(d, fire)
			tm.forget = v.own(tm.stop)
			timers[id] = tm
			return rt.ToValue(id)
		}
	}
	o := rt.NewObject()
	_ = o.Set("setTimeout", set(false))
	_ = o.Set("setInterval", set(true))
	_ = o.Set("clearTimeout", func(id int64) { clear(id) })
	_ = o.Set("clearInterval", func(id int64) { clear(id) })
	return o
}

// k6/http: request, get, post, del, batch. Responses as k6's: status 0
// and error set when no answer came; http_req_failed by k6's default
// (a status outside 200-399 fails).
type httpReq struct {
	method, url string
	body        []byte
	headers     map[string]string
	timeout     time.Duration
}

type httpRes struct {
	status   int
	body     []byte
	headers  http.Header
	duration time.Duration
	err      error
}

func (v *vu) httpModule(ctx context.Context) map[string]any {
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64, TLSClientConfig: v.tlsConfig()}}
	v.onClose = append(v.onClose, client.CloseIdleConnections)
	do := func(r httpReq) httpRes {
		cctx, cancel := context.WithTimeout(ctx, r.timeout)
		defer cancel()
		req, err := http.NewRequestWithContext(cctx, r.method, r.url, bytes.NewReader(r.body))
		if err != nil {
			return httpRes{err: err}
		}
		for k, val := range r.headers {
			req.Header.Set(k, val)
		}
		start := time.Now()
		resp, err := client.Do(req)
		if err != nil {
			return httpRes{err: err, duration: time.Since(start)}
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return httpRes{status: resp.StatusCode, body: b, headers: resp.Header, duration: time.Since(start), err: err}
	}
	parse := func(method string, url, body, params sobek.Value) httpReq {
		r := httpReq{method: strings.ToUpper(method), url: url.String(), headers: map[string]string{}, timeout: 60 * time.Second}
		if body != nil && !sobek.IsUndefined(body) && !sobek.IsNull(body) {
			r.body = v.bytesOf(body)
		}
		if params != nil && !sobek.IsUndefined(params) && !sobek.IsNull(params) {
			p := params.ToObject(v.rt)
			if h := p.Get("headers"); h != nil && !sobek.IsUndefined(h) {
				ho := h.ToObject(v.rt)
				for _, k := range ho.Keys() {
					r.headers[k] = ho.Get(k).String()
				}
			}
			if t := p.Get("timeout"); t != nil && !sobek.IsUndefined(t) {
				if d, err := time.ParseDuration(t.String()); err == nil {
					r.timeout = d
				} else {
					r.timeout = time.Duration(t.ToFloat() * float64(time.Millisecond))
				}
			}
		}
		return r
	}
	response := func(r httpReq, res httpRes) *sobek.Object {
		v.s.metrics.add("http_reqs", 1)
		v.s.metrics.add("http_req_duration", float64(res.duration.Microseconds())/1e3)
		v.s.metrics.add("http_req_failed", b2f(res.status < 200 || res.status > 399))
		o := v.rt.NewObject()
		_ = o.Set("status", res.status)
		_ = o.Set("url", r.url)
		_ = o.Set("body", string(res.body))
		h := v.rt.NewObject()
		for k := range res.headers {
			_ = h.Set(k, res.headers.Get(k))
		}
		_ = o.Set("headers", h)
		t := v.rt.NewObject()
		_ = t.Set("duration", float64(res.duration.Microseconds())/1e3)
		_ = o.Set("timings", t)
		errText, code := "", 0
		if res.err != nil {
			errText, code = res.err.Error(), 1000
		}
		_ = o.Set("error", errText)
		_ = o.Set("error_code", code)
		_ = o.Set("json", func() sobek.Value { return v.parse(string(res.body)) })
		return o
	}
	request := func(method string, url, body, params sobek.Value) *sobek.Object {
		r := parse(method, url, body, params)
		return response(r, do(r))
	}
	return map[string]any{
		"request": request,
		"get":     func(url, params sobek.Value) *sobek.Object { return request("GET", url, nil, params) },
		"post":    func(url, body, params sobek.Value) *sobek.Object { return request("POST", url, body, params) },
		"del":     func(url, body, params sobek.Value) *sobek.Object { return request("DELETE", url, body, params) },
		"batch": func(reqs *sobek.Object) *sobek.Object {
			keys := reqs.Keys()
			rs := make([]httpReq, len(keys))
			for i, k := range keys {
				e := reqs.Get(k).ToObject(v.rt)
				if e.ClassName() == "Array" {
					rs[i] = parse(e.Get("0").String(), e.Get("1"), e.Get("2"), e.Get("3"))
				} else {
					rs[i] = parse(e.Get("method").String(), e.Get("url"), e.Get("body"), e.Get("params"))
				}
			}
			out := make([]httpRes, len(rs))
			var wg sync.WaitGroup
			for i := range rs {
				wg.Go(func() { out[i] = do(rs[i]) })
			}
			wg.Wait()
			arr := v.rt.NewArray()
			for i := range rs {
				_ = arr.Set(keys[i], response(rs[i], out[i]))
			}
			return arr
		},
	}
}

func (v *vu) tlsConfig() *tls.Config {
	skip, _ := v.s.options["insecureSkipTLSVerify"].(bool)
	return &tls.Config{InsecureSkipVerify: skip} //nolint:gosec // k6's insecureSkipTLSVerify, set by the script
}

// bytesOf is k6's view of a body: a string as UTF-8, an ArrayBuffer or
// a typed array as its bytes.
func (v *vu) bytesOf(val sobek.Value) []byte {
	switch x := val.Export().(type) {
	case string:
		return []byte(x)
	case sobek.ArrayBuffer:
		return append([]byte(nil), x.Bytes()...)
	case []byte:
		return append([]byte(nil), x...)
	}
	v.throw("unsupported body or data type %T", val.Export())
	return nil
}

// k6/metrics: Counter, Gauge, Rate, Trend.
func (v *vu) metricsModule() map[string]any {
	class := func(kind string) func(call sobek.ConstructorCall) *sobek.Object {
		return func(call sobek.ConstructorCall) *sobek.Object {
			name := call.Argument(0).String()
			isTime := call.Argument(1).ToBoolean()
			if err := v.s.metrics.declare(name, kind, isTime); err != nil {
				v.throw("%v", err)
			}
			o := call.This
			_ = o.Set("name", name)
			_ = o.Set("add", func(x sobek.Value, _ sobek.Value) bool {
				f := x.ToFloat()
				if kind == "rate" {
					f = b2f(x.ToBoolean())
				}
				v.s.metrics.add(name, f)
				return true
			})
			return nil
		}
	}
	return map[string]any{"Counter": class("counter"), "Gauge": class("gauge"), "Rate": class("rate"), "Trend": class("trend")}
}

// k6/websockets: WebSocket, event-driven on the VU's loop. Binary
// messages need binaryType "arraybuffer" (k6's Blob is not here).
func (v *vu) webSocketClass(ctx context.Context) func(call sobek.ConstructorCall) *sobek.Object {
	return func(call sobek.ConstructorCall) *sobek.Object {
		rt := v.rt
		url := call.Argument(0).String()
		o := call.This
		_ = o.Set("url", url)
		_ = o.Set("readyState", 0)
		_ = o.Set("binaryType", "blob")
		_ = o.Set("bufferedAmount", 0)
		listeners := map[string][]sobek.Value{}
		_ = o.Set("addEventListener", func(name string, fn sobek.Value) { listeners[name] = append(listeners[name], fn) })
		dispatch := func(name string, ev *sobek.Object) {
			if h := o.Get("on" + name); h != nil {
				v.callback(h, ev)
			}
			for _, l := range listeners[name] {
				v.callback(l, ev)
			}
		}
		event := func(name string) *sobek.Object {
			ev := rt.NewObject()
			_ = ev.Set("type", name)
			_ = ev.Set("timestamp", float64(time.Now().UnixMilli()))
			return ev
		}
		wctx, cancel := context.WithCancel(ctx)
		var (
			mu   sync.Mutex // guards conn
			conn *websocket.Conn
		)
		v.loop.hold()
		var once sync.Once
		ended := func() { once.Do(func() { cancel(); v.loop.release() }) }
		forget := v.own(func() {
			mu.Lock()
			c := conn
			mu.Unlock()
			if c != nil {
				_ = c.CloseNow()
			}
			ended()
		})
		closed := func(errText string) {
			v.loop.enqueue(func() {
				if errText != "" {
					ev := event("error")
					_ = ev.Set("error", errText)
					dispatch("error", ev)
				}
				_ = o.Set("readyState", 3)
				dispatch("close", event("close"))
				forget()
				ended()
			})
		}
		go func() {
			hc := &http.Client{Transport: &http.Transport{TLSClientConfig: v.tlsConfig()}}
			c, _, err := websocket.Dial(wctx, url, &websocket.DialOptions{HTTPClient: hc})
			if err != nil {
				closed(err.Error())
				return
			}
			c.SetReadLimit(1 << 20)
			mu.Lock()
			conn = c
			mu.Unlock()
			v.loop.enqueue(func() {
				_ = o.Set("readyState", 1)
				dispatch("open", event("open"))
			})
			for {
				typ, b, err := c.Read(wctx)
				if err != nil {
					errText := ""
					if websocket.CloseStatus(err) == -1 && wctx.Err() == nil {
						errText = err.Error()
					}
					closed(errText)
					return
				}
				v.loop.enqueue(func() {
					ev := event("message")
					if typ == websocket.MessageText {
						_ = ev.Set("data", string(b))
					} else {
						if bt := o.Get("binaryType").String(); bt != "arraybuffer" {
							v.loop.failed = fmt.Errorf("a binary message with binaryType %q: this test adapter has no Blob; set binaryType = \"arraybuffer\"", bt)
							return
						}
						_ = ev.Set("data", rt.NewArrayBuffer(b))
					}
					dispatch("message", ev)
				})
			}
		}()
		_ = o.Set("send", func(data sobek.Value) {
			mu.Lock()
			c := conn
			mu.Unlock()
			if c == nil || o.Get("readyState").ToInteger() != 1 {
				v.throw("InvalidStateError: the WebSocket is not open")
			}
			typ, b := websocket.MessageBinary, []byte(nil)
			if s, ok := data.Export().(string); ok {
				typ, b = websocket.MessageText, []byte(s)
			} else {
				b = v.bytesOf(data)
			}
			wc, cancelWrite := context.WithTimeout(wctx, 10*time.Second)
			defer cancelWrite()
			if err := c.Write(wc, typ, b); err != nil {
				_ = c.CloseNow() // the reader reports the close
			}
		})
		_ = o.Set("close", func(code, reason sobek.Value) {
			mu.Lock()
			c := conn
			mu.Unlock()
			st := websocket.StatusNormalClosure
			if code != nil && !sobek.IsUndefined(code) {
				st = websocket.StatusCode(code.ToInteger())
			}
			r := ""
			if reason != nil && !sobek.IsUndefined(reason) {
				r = reason.String()
			}
			if o.Get("readyState").ToInteger() >= 2 {
				return
			}
			_ = o.Set("readyState", 2)
			if c == nil {
				cancel() // still dialing: the dial fails and reports the close
				return
			}
			go func() { _ = c.Close(st, r) }()
		})
		_ = o.Set("ping", func() {})
		return nil
	}
}

// k6/crypto: randomBytes and the hash functions.
func (v *vu) cryptoModule() map[string]any {
	rt := v.rt
	out := func(sum []byte, enc string) sobek.Value {
		switch enc {
		case "binary":
			return rt.ToValue(rt.NewArrayBuffer(sum))
		case "hex":
			return rt.ToValue(hex.EncodeToString(sum))
		case "base64":
			return rt.ToValue(base64.StdEncoding.EncodeToString(sum))
		case "base64url":
			return rt.ToValue(base64.URLEncoding.EncodeToString(sum))
		case "base64rawurl":
			return rt.ToValue(base64.RawURLEncoding.EncodeToString(sum))
		}
		v.throw("unknown output encoding %q", enc)
		return nil
	}
	hashFn := func(h func() hash.Hash) func(sobek.Value, string) sobek.Value {
		return func(in sobek.Value, enc string) sobek.Value {
			x := h()
			x.Write(v.bytesOf(in))
			return out(x.Sum(nil), enc)
		}
	}
	return map[string]any{
		"randomBytes": func(n int) sobek.ArrayBuffer {
			b := make([]byte, n)
			_, _ = rand.Read(b)
			return rt.NewArrayBuffer(b)
		},
		"md5":    hashFn(md5.New),
		"sha1":   hashFn(sha1.New),
		"sha256": hashFn(sha256.New),
		"sha384": hashFn(sha512.New384),
		"sha512": hashFn(sha512.New),
	}
}

// k6/encoding: b64encode, b64decode.
func (v *vu) encodingModule() map[string]any {
	variant := func(name string) *base64.Encoding {
		switch name {
		case "", "std":
			return base64.StdEncoding
		case "rawstd":
			return base64.RawStdEncoding
		case "url":
			return base64.URLEncoding
		case "rawurl":
			return base64.RawURLEncoding
		}
		v.throw("unknown base64 variant %q", name)
		return nil
	}
	return map[string]any{
		"b64encode": func(in sobek.Value, enc string) string { return variant(enc).EncodeToString(v.bytesOf(in)) },
		"b64decode": func(in, enc, format string) sobek.Value {
			b, err := variant(enc).DecodeString(in)
			if err != nil {
				v.throw("b64decode: %v", err)
			}
			if format == "s" {
				return v.rt.ToValue(string(b))
			}
			return v.rt.ToValue(v.rt.NewArrayBuffer(b))
		},
	}
}

// k6/execution: the VU's and the scenario's numbers.
func (v *vu) execution() *sobek.Object {
	if v.exec == nil {
		v.exec = v.rt.NewObject()
		v.setExecution()
	}
	return v.exec
}

func (v *vu) setExecution() {
	if v.exec == nil {
		return
	}
	rt := v.rt
	vuo := rt.NewObject()
	_ = vuo.Set("idInTest", v.id)
	_ = vuo.Set("idInInstance", v.id)
	_ = vuo.Set("iterationInInstance", v.iter)
	_ = vuo.Set("iterationInScenario", v.iter)
	sc := rt.NewObject()
	_ = sc.Set("name", v.scenario)
	_ = sc.Set("iterationInTest", v.iter)
	_ = sc.Set("startTime", v.s.started.UnixMilli())
	test := rt.NewObject()
	_ = test.Set("abort", func(msg string) { panic(rt.NewGoError(fmt.Errorf("test aborted: %s", msg))) })
	_ = v.exec.Set("vu", vuo)
	_ = v.exec.Set("scenario", sc)
	_ = v.exec.Set("test", test)
}
