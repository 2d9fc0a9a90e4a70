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

/** What a call that may be throttled gave: its value, or why not. */
type Outcome<T> = { value: T } | { throttled: true } | { failed: true };

/** attempt runs f, counting a throttled call (after waiting its Retry-After) and a failed one. */
function attempt<T>(f: () => T): Outcome<T> {
  try {
    const value = f();
    failed.add(false);
    return { value };
  } catch (e) {
    if (e instanceof ControlError && e.code === "resource_exhausted") {
      throttled.add(1);
      sleep(Math.min(Math.max(e.retryAfter, 1), 10));
      return { throttled: true };
    }
    failed.add(true);
    console.warn(String(e));
    return { failed: true };
  }
}

/** valueOf is an outcome's value, null when the call gave none. */
function valueOf<T>(o: Outcome<T>): T | null {
  return "value" in o ? o.value : null;
}

/** signIn returns the VU's tokens for this iteration: those it holds while their access token has
 *  more than 30 s left, else refreshed (kept, for the next iteration, when the refresh was
 *  throttled), else a login. Null when it has none this iteration. */
function signIn(base: string, user: { login: string; password?: string }): Tokens | null {
  const was = tokens;
  if (was && Date.parse(was.accessTokenExpiresAt ?? "") - Date.now() > 30_000) return was;
  const got = was
    ? attempt(() => call<{ tokens: Tokens }>(base, RPC.refresh, { refreshToken: was.refreshToken }).tokens)
    : attempt(() => call<{ tokens: Tokens }>(base, RPC.login, { login: user.login, password: user.password }).tokens);
  if ("value" in got) {
    tokens = got.value;
    return tokens;
  }
  // Throttled: a refresh token not taken is kept; failed: log in again next time.
  tokens = "throttled" in got ? was : null;
  return null;
}

export function control(data: SetupData): void {
  const base = controlURL();
  const user = userOf(data);
  const signed = signIn(base, user);
  if (!signed) return; // throttled or failed: counted
  check(signed, { "signed in as the user": (t) => t.userId === user.id });
  const tok = signed.accessToken;
  const me = valueOf(attempt(() => call<{ user: { id: string } }>(base, RPC.getMe, {}, tok)));
  check(me, { "GetMe answers the user": (m) => m?.user.id === user.id });
  const reg = valueOf(attempt(() => call<{ device: { id: string } }>(base, RPC.registerDevice, { name: "k6", publicKey: toBase64(newDeviceKey().publicKey) }, tok)));
  if (!check(reg, { "device registered": (r) => !!r?.device.id })) return;
  const list = valueOf(attempt(() => call<{ devices?: { id: string }[] }>(base, RPC.listDevices, {}, tok)));
  check(list, { "the new device is listed": (l) => !!l?.devices?.some((d) => d.id === reg!.device.id) });
  const del = valueOf(attempt(() => call(base, RPC.deleteDevice, { deviceId: reg!.device.id }, tok)));
  check(del, { "device deleted": (d) => d !== null });
}

export function teardown(data: SetupData): void { deprovision(data); }
export function handleSummary(data: SummaryData): Record<string, string> { return summarize("control", data); }
