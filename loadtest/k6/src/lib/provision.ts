// setup() and teardown(): users and devices through the admin API, with
// an access token from the environment (RELAY_TOKEN) or a refresh token
// (RELAY_REFRESH_TOKEN, for runs longer than an access token lives);
// never a password in the script.
import { fail } from "k6";
import { callMany, refresh, RPC, type Json } from "./control.js";
import { newDeviceKey } from "./ed25519.js";
import { controlURL } from "./env.js";
import { randomHex, toBase64 } from "./bytes.js";

export interface Device {
  id: string;
  userId: string;
  /** The device's Ed25519 seed, base64 (setup data is JSON). */
  secret: string;
  /** The revision that registered it (a uint64 as a decimal string). */
  revision?: string;
}

export interface User {
  id: string;
  login: string;
  /** Only for the control-API scenario, made up here at random. */
  password?: string;
  devices: Device[];
}

export interface SetupData {
  runId: string;
  users: User[];
  /** The next refresh token for teardown when RELAY_REFRESH_TOKEN was given. */
  refreshToken?: string;
  /** The instant (ms since the epoch) the storm scenario drops every session. */
  stormAt?: number;
}

/** The admin's access token, and the refresh token that follows it. */
export function adminToken(refreshToken?: string): { access: string; refresh?: string } {
  const rt = refreshToken ?? __ENV.RELAY_REFRESH_TOKEN;
  if (rt) {
    const t = refresh(controlURL(), rt);
    return { access: t.accessToken, refresh: t.refreshToken };
  }
  const access = __ENV.RELAY_TOKEN;
  if (!access) fail("set RELAY_TOKEN (an admin access token: relayctl token) or RELAY_REFRESH_TOKEN");
  return { access };
}

/** Creates `users` accounts with `perUser` devices each. */
export function provision(users: number, perUser: number, opts: { passwords?: boolean } = {}): SetupData {
  const base = controlURL();
  const tok = adminToken();
  const runId = randomHex(4);
  const made: User[] = [];
  const specs = Array.from({ length: users }, (_, i) => {
    const u: Json = { login: `k6-${runId}-${i}` };
    if (opts.passwords) u.password = randomHex(18);
    return u;
  });
  const created = callMany<{ user: { id: string } }>(base, RPC.createUser, specs, tok.access);
  created.forEach((r, i) => made.push({ id: r.user.id, login: specs[i].login as string, password: specs[i].password as string | undefined, devices: [] }));
  const keys: { user: number; secret: Uint8Array; body: Json }[] = [];
  made.forEach((u, i) => {
    for (let j = 0; j < perUser; j++) {
      const k = newDeviceKey();
      keys.push({ user: i, secret: k.secret, body: { userId: u.id, name: `k6-d${j}`, publicKey: toBase64(k.publicKey) } });
    }
  });
  const devs = callMany<{ device: { id: string }; revision?: string }>(base, RPC.registerDevice, keys.map((k) => k.body), tok.access);
  devs.forEach((r, i) => {
    const u = made[keys[i].user];
    u.devices.push({ id: r.device.id, userId: u.id, secret: toBase64(keys[i].secret), revision: r.revision });
  });
  return { runId, users: made, refreshToken: tok.refresh };
}

/** Deletes what provision() made (a user's devices go with it). */
export function deprovision(data: SetupData | undefined): void {
  if (!data || !data.users) return;
  const tok = adminToken(data.refreshToken);
  callMany(controlURL(), RPC.deleteUser, data.users.map((u) => ({ id: u.id })), tok.access);
}
