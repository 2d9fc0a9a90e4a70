// The device console page: sign in as a user, register this browser as a
// device (its key stays in the browser, non-extractable), see the user's
// devices and which are online, send events, watch what arrives with its
// latency, revoke a device, change the account's password. Control-plane
// calls go through the edge (/api/, a fixed set of procedures) in the
// Connect JSON protocol.

import {
  CERT_HASHES_PATH,
  RelayClient,
  RelayError,
  type RelayEvent,
  b64,
  describe,
  forgetDevice,
  generateDeviceKey,
  loadDevice,
  saveDevice,
  type StoredDevice,
} from "./relay.js";

const $ = <T extends HTMLElement = HTMLElement>(id: string) => document.getElementById(id) as T;

let token = sessionStorage.getItem("relay.token") ?? "";
let refreshToken = sessionStorage.getItem("relay.refresh") ?? "";
let device: StoredDevice | undefined;
let client: RelayClient | null = null;
let devices: { id: string; name: string; revoked: boolean }[] = [];

function setStatus(text: string, state = "idle"): void {
  const s = $("status");
  s.textContent = text;
  s.dataset.state = state;
}

function showError(e: unknown): void {
  let text: string;
  if (e instanceof RelayError) text = `${describe(e.code)} (${e.message})`;
  else if (e instanceof Error) text = e.message;
  else text = String(e);
  $("error").textContent = text;
}

/** Calls a control-plane procedure through the edge. */
async function call<T>(procedure: string, body: unknown): Promise<T> {
  const r = await fetch(`/api/${procedure}`, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...(token ? { Authorization: `Bearer ${token}` } : {}) },
    body: JSON.stringify(body),
  });
  const json = (await r.json().catch(() => ({}))) as { message?: string; code?: string } & T;
  if (r.status === 401 && token) {
    // The session ended (expired, or the account changed): sign in again.
    token = "";
    sessionStorage.removeItem("relay.token");
    for (const id of ["current-password", "new-password", "new-password-again"]) $<HTMLInputElement>(id).value = "";
    $("login-section").hidden = false;
    setStatus("Signed out: sign in again.", "idle");
  }
  if (!r.ok) throw new Error(json.message ? `${json.code}: ${json.message}` : `${procedure}: HTTP ${r.status}`);
  return json;
}

interface EdgeInfo { addr: string; webSocketUrl: string }
let edge: EdgeInfo;

async function edgeInfo(): Promise<EdgeInfo> {
  const r = await fetch("/.well-known/relay/edge", { cache: "no-store" });
  const info = (await r.json()) as { addr: string };
  const wsScheme = location.protocol === "https:" ? "wss:" : "ws:";
  return { addr: info.addr, webSocketUrl: `${wsScheme}//${location.host}/relay/v1/ws` };
}

async function refreshDevices(): Promise<void> {
  const r = await call<{ devices?: { id: string; name: string; revoked?: boolean }[] }>("control.v1.DeviceService/ListDevices", {});
  devices = (r.devices ?? []).map((d) => ({ id: d.id, name: d.name, revoked: !!d.revoked }));
  render();
}

function render(): void {
  const online = new Set(client?.online() ?? []);
  const tbody = $("devices");
  tbody.replaceChildren();
  const target = $<HTMLSelectElement>("target");
  const keep = target.value;
  target.replaceChildren(new Option("all my other devices", ""));
  for (const d of devices) {
    const tr = document.createElement("tr");
    tr.dataset.device = d.id;
    const me = d.id === device?.deviceId;
    // Presence comes over the session: without one, the page cannot
    // tell who is online, and says so rather than "offline".
    const state = d.revoked ? "revoked" : me ? (client ? "this browser" : "this browser (not connected)")
      : !client ? "unknown (connect to see)" : online.has(d.id) ? "online" : "offline";
    for (const text of [d.name, d.id, state]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    const td = document.createElement("td");
    if (!d.revoked) {
      const b = document.createElement("button");
      b.textContent = "Revoke";
      b.setAttribute("aria-label", `Revoke ${d.name} (${d.id})`);
      b.className = "revoke";
      b.onclick = () => void revoke(d.id).catch(showError);
      td.append(b);
    }
    tr.append(td);
    tbody.append(tr);
    if (!me && !d.revoked) target.append(new Option(d.name, d.id));
  }
  target.value = keep;
}

async function revoke(id: string): Promise<void> {
  await call("control.v1.DeviceService/RevokeDevice", { deviceId: id });
  await refreshDevices();
}

/** A device's name as the account knows it, else its id. */
function deviceName(id: string): string {
  return devices.find((d) => d.id === id)?.name ?? id;
}

function logRow(className: string, cells: string[], sender = ""): void {
  const tr = document.createElement("tr");
  tr.className = className;
  if (sender) tr.dataset.sender = sender;
  for (const v of cells) {
    const td = document.createElement("td");
    td.textContent = v;
    tr.append(td);
  }
  $("log").prepend(tr);
}

function logEvent(ev: RelayEvent): void {
  const latency = Date.now() + (client?.clockOffsetMs ?? 0) - ev.createdAt.getTime();
  const text = ev.cancelled ? "(taken by another device)" : new TextDecoder().decode(ev.payload);
  logRow(ev.cancelled ? "event cancelled" : "event",
    [new Date().toLocaleTimeString(), `from ${deviceName(ev.sender)}`, ev.type, text, ev.cancelled ? "" : `${latency} ms`], ev.sender);
}

async function connect(): Promise<void> {
  if (!device) throw new Error("register this browser first");
  client?.close();
  setStatus("Connecting...", "connecting");
  const transport = $<HTMLSelectElement>("transport").value as "auto" | "webtransport" | "websocket";
  const me = await RelayClient.connect({
    edge: edge.addr, userId: device.userId, deviceId: device.deviceId, key: device.key, transport,
    certHashesUrl: location.origin + CERT_HASHES_PATH, webSocketUrl: edge.webSocketUrl, minRevision: device.revision,
  });
  client = me;
  // Only the current client speaks to the page (a replaced one may still
  // report its end).
  const on = <T>(type: string, fn: (detail: T) => void) =>
    me.addEventListener(type, (e) => { if (client === me) fn((e as CustomEvent<T>).detail); });
  on<RelayEvent>("event", logEvent);
  on("presence", () => render());
  on<{ connected: boolean; transport?: string; reason?: RelayError | null }>("state", (d) => {
    if (d.connected) setStatus(`Connected over ${d.transport}.`, "connected");
    else setStatus(d.reason ? `Disconnected: ${describe(d.reason.code)} Reconnecting...` : "Disconnected. Reconnecting...", "connecting");
    $("transport-used").textContent = me.transport ?? "-";
  });
  on<RelayError>("closed", (why) => {
    client = null;
    $("send-section").hidden = true;
    // The reason once, in the status line (the error line stays for
    // errors of the page's own actions).
    const done = () => setStatus(`Disconnected for good: ${describe(why.code)}`, "error");
    done();
    // The device list shows what happened (a revoked device is forgotten
    // here, and this browser can register again).
    void signedIn().catch(() => {}).finally(done);
  });
  $("transport-used").textContent = me.transport ?? "-";
  setStatus(`Connected over ${me.transport}.`, "connected");
  $("send-section").hidden = false;
  render();
}

/** Settles once the edge's address and this browser's device are known;
 * every handler waits for it. */
let ready: Promise<void> = Promise.resolve();

async function main(): Promise<void> {
  ready = (async () => {
    edge = await edgeInfo();
    device = await loadDevice();
  })();
  // The handlers go on before anything is awaited, and the buttons are
  // disabled in the page until then: a form submitted before the script
  // runs would navigate, with the password in the URL.
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    void (async () => {
      await ready;
      $("error").textContent = "";
      const r = await call<{ tokens: { accessToken: string; refreshToken: string } }>("control.v1.AuthService/Login", {
        login: $<HTMLInputElement>("login").value, password: $<HTMLInputElement>("password").value,
      });
      // A session this tab signed in before (its access token expired)
      // is ended, not left to live until its refresh token expires.
      const old = refreshToken;
      token = r.tokens.accessToken;
      refreshToken = r.tokens.refreshToken;
      sessionStorage.setItem("relay.token", token);
      sessionStorage.setItem("relay.refresh", refreshToken);
      if (old && old !== refreshToken) await call("control.v1.AuthService/Logout", { refreshToken: old }).catch(() => {});
      $<HTMLInputElement>("password").value = "";
      await signedIn();
    })().catch(showError);
  });
  $("register-form").addEventListener("submit", (e) => {
    e.preventDefault();
    void (async () => {
      await ready;
      $("error").textContent = "";
      const me = await call<{ user: { id: string } }>("control.v1.UserService/GetMe", {});
      const { privateKey, publicKey } = await generateDeviceKey();
      const name = $<HTMLInputElement>("device-name").value;
      const r = await call<{ device: { id: string }; revision?: string }>("control.v1.DeviceService/RegisterDevice", { name, publicKey: b64(publicKey) });
      // The edge may not know the device yet: the first connect names the
      // registration's revision (a uint64, a string in JSON).
      device = { userId: me.user.id, deviceId: r.device.id, key: privateKey, name, revision: BigInt(r.revision ?? "0") };
      await saveDevice(device);
      await signedIn();
      await connect();
    })().catch(showError);
  });
  $("connect-form").addEventListener("submit", (e) => {
    e.preventDefault();
    $("error").textContent = "";
    void ready.then(connect).catch((err) => { setStatus("Not connected.", "error"); showError(err); });
  });
  $("send-form").addEventListener("submit", (e) => {
    e.preventDefault();
    void (async () => {
      if (!client) throw new Error("not connected");
      const target = $<HTMLSelectElement>("target").value;
      const input = $<HTMLInputElement>("text");
      const text = input.value;
      const started = performance.now();
      $("send-result").textContent = "Sending...";
      await client.send({ type: "text", payload: text, targets: target ? [target] : [], anyOne: $<HTMLInputElement>("any-one").checked });
      const took = `${(performance.now() - started).toFixed(2)} ms`;
      $("send-result").textContent = `Delivered (${took}).`;
      input.value = "";
      logRow("sent", [new Date().toLocaleTimeString(), `to ${target ? deviceName(target) : "all my other devices"}`, "text", text, took]);
    })().catch((err) => {
      $("send-result").textContent = err instanceof RelayError ? describe(err.code) : String(err);
      showError(err);
    });
  });
  $("password-form").addEventListener("submit", (e) => {
    e.preventDefault();
    // One change at a time: a second submit of the same form would
    // present a current password the first one replaced.
    const button = $<HTMLButtonElement>("password-button");
    if (button.dataset.busy) return;
    button.dataset.busy = "1";
    button.disabled = true;
    void (async () => {
      await ready;
      $("error").textContent = "";
      const current = $<HTMLInputElement>("current-password");
      const next = $<HTMLInputElement>("new-password");
      const again = $<HTMLInputElement>("new-password-again");
      if (next.value !== again.value) throw new Error("The two new passwords differ; nothing changed.");
      // The control plane counts a password's UTF-8 bytes, not the UTF-16
      // units the minlength attribute counts, so the page checks the same
      // way and lets through what the server takes.
      const bytes = new TextEncoder().encode(next.value).length;
      if (bytes < 12 || bytes > 256) {
        throw new Error(`The new password must be 12 to 256 bytes long in UTF-8; this one is ${bytes}. Nothing changed.`);
      }
      $("password-result").textContent = "Changing...";
      // This page's session goes on; the account's others end.
      await call("control.v1.AuthService/ChangePassword", { currentPassword: current.value, newPassword: next.value });
      for (const input of [current, next, again]) input.value = "";
      $("password-result").textContent = "Password changed; your other sessions have ended.";
    })().catch((err) => {
      $("password-result").textContent = "";
      showError(err);
    }).finally(() => {
      delete button.dataset.busy;
      button.disabled = false;
    });
  });
  $("signout-button").addEventListener("click", () => {
    void (async () => {
      await ready;
      // Logout ends the session on the control plane: its access tokens
      // stop working on every node. The device's key stays in this
      // browser, so signing in again reconnects it.
      if (refreshToken) await call("control.v1.AuthService/Logout", { refreshToken }).catch(() => {});
      client?.close();
      client = null;
      token = refreshToken = "";
      sessionStorage.removeItem("relay.token");
      sessionStorage.removeItem("relay.refresh");
      for (const id of ["device-section", "password-section", "devices-section", "send-section"]) $(id).hidden = true;
      $("password-result").textContent = "";
      $("login-section").hidden = false;
      $("log").replaceChildren();
      setStatus("Signed out.", "idle");
    })().catch(showError);
  });
  for (const id of ["login-button", "register-button", "connect-button", "send-button", "password-button"]) {
    $<HTMLButtonElement>(id).disabled = false;
  }
  await ready;
  if (token) {
    const ok = await signedIn().then(() => true, () => { token = ""; sessionStorage.removeItem("relay.token"); return false; });
    // A browser registered before connects on its own.
    if (ok && device) await connect().catch((err) => { setStatus("Not connected.", "error"); showError(err); });
  }
}

async function signedIn(): Promise<void> {
  $("login-section").hidden = true;
  const me = await call<{ user: { login: string } }>("control.v1.UserService/GetMe", {});
  $("signed-in-as").textContent = me.user.login;
  // For password managers: the account the new password is for.
  $<HTMLInputElement>("password-form-login").value = me.user.login;
  $("device-section").hidden = false;
  $("password-section").hidden = false;
  $("devices-section").hidden = false;
  await refreshDevices();
  if (device && !devices.some((d) => d.id === device!.deviceId && !d.revoked)) {
    await forgetDevice(); // revoked or not this account's
    device = undefined;
  }
  const info = $("device-info");
  info.textContent = device ? `Registered as ${device.name ?? device.deviceId} (${device.deviceId}).` : "Not registered yet.";
  info.dataset.deviceId = device?.deviceId ?? "";
  $("register-form").hidden = !!device;
  $("connect-form").hidden = !device;
  setStatus(device ? "Signed in; not connected." : "Signed in.", "idle");
}

void main().catch(showError);

// For tests and the curious.
(window as unknown as { relayConsole: unknown }).relayConsole = { get client() { return client; } };
