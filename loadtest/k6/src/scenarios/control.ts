// Control-API load: users log in (once per VU, then refresh their tokens
// when the access token is about to expire, as clients do), read their
// account, register a device, list their devices and delete it again, at
// RATE iterations per second. Logins are throttled per login and per
// client address, and an account's logins and refreshes per node
// (docs/api.md): a throttled one waits its Retry-After and is counted,
// not failed.
import { check, sleep } from "k6";
import { Counter, Rate } from "k6/metrics";
import { call, ControlError, RPC, type Tokens } from "../lib/control.js";
import { newDeviceKey } from "../lib/ed25519.js";
import { controlURL, num, str } from "../lib/env.js";
import { toBase64 } from "../lib/bytes.js";
import { userOf } from "../lib/exchange.js";
import { deprovision, provision, type SetupData } from "../lib/provision.js";
import { summarize, type SummaryData } from "../lib/summary.js";

const VUS = num("VUS", 20);
const failed = new Rate("relay_control_failed");
const throttled = new Counter("relay_login_throttled");

export const options = {
  scenarios: {
    control: {
      executor: "constant-arrival-rate",
      rate: num("RATE", 20),
      timeUnit: "1s",
      duration: str("DURATION", "5m"),
      preAllocatedVUs: VUS,
      maxVUs: VUS,
      exec: "control",
    },
  },
  thresholds: {
    relay_control_failed: [`rate<${num("MAX_ERROR_RATE", 0.01)}`],
    relay_control_call: [`p(95)<${num("CALL_P95_MS", 250)}`],
    checks: [`rate>${1 - num("MAX_ERROR_RATE", 0.01)}`],
  },
  summaryTrendStats: ["avg", "min", "med", "max", "p(90)", "p(95)", "p(99)"],
  setupTimeout: "10m",
  teardownTimeout: "10m",
};

export function setup(): SetupData { return provision(VUS, 0, { passwords: true }); }

/** This VU's tokens (module state is per VU). */
let tokens: Tokens | null = null;

/** Whether the last attempt was throttled (resource_exhausted). */
let wasThrottled = false;

function attempt<T>(f: () => T): T | null {
  wasThrottled = false;
  try {
    const v = f();
    failed.add(false);
    return v;
  } catch (e) {
    if (e instanceof ControlError && e.code === "resource_exhausted") {
      throttled.add(1);
      wasThrottled = true;
      sleep(Math.min(Math.max(e.retryAfter, 1), 10));
      return null;
    }
    failed.add(true);
    console.warn(String(e));
    return null;
  }
}

export function control(data: SetupData): void {
  const base = controlURL();
  const user = userOf(data);
  const was = tokens;
  const fresh = was !== null && Date.parse(was.accessTokenExpiresAt ?? "") - Date.now() > 30_000;
  tokens = fresh
    ? was
    : was
      ? attempt(() => call<{ tokens: Tokens }>(base, RPC.refresh, { refreshToken: was.refreshToken }).tokens)
      : attempt(() => call<{ tokens: Tokens }>(base, RPC.login, { login: user.login, password: user.password }).tokens);
  if (!tokens) {
    // Throttled (counted): a refresh token not taken is kept for the next
    // iteration; failed (counted): log in again next time.
    if (wasThrottled) tokens = was;
    return;
  }
  check(tokens, { "signed in as the user": (t) => t.userId === user.id });
  const tok = tokens.accessToken;
  const me = attempt(() => call<{ user: { id: string } }>(base, RPC.getMe, {}, tok));
  check(me, { "GetMe answers the user": (m) => m?.user.id === user.id });
  const reg = attempt(() => call<{ device: { id: string } }>(base, RPC.registerDevice, { name: "k6", publicKey: toBase64(newDeviceKey().publicKey) }, tok));
  if (!check(reg, { "device registered": (r) => !!r?.device.id })) return;
  const list = attempt(() => call<{ devices?: { id: string }[] }>(base, RPC.listDevices, {}, tok));
  check(list, { "the new device is listed": (l) => !!l?.devices?.some((d) => d.id === reg!.device.id) });
  const del = attempt(() => call(base, RPC.deleteDevice, { deviceId: reg!.device.id }, tok));
  check(del, { "device deleted": (d) => d !== null });
}

export function teardown(data: SetupData): void { deprovision(data); }
export function handleSummary(data: SummaryData): Record<string, string> { return summarize("control", data); }
