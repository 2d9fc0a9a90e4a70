// The control API over Connect's JSON protocol with k6/http: POST
// <base>/<package.Service>/<Method>, a JSON body, errors as
// {"code": "...", "message": "..."} (docs/api.md).
import http from "k6/http";
import { Trend } from "k6/metrics";

/** Time per control-API call, tagged by RPC. */
export const controlCall = new Trend("relay_control_call", true);

/** A Connect error from the control plane. */
export class ControlError extends Error {
  constructor(
    readonly rpc: string,
    readonly status: number,
    readonly code: string,
    message: string,
    /** Seconds to wait before trying again (throttled logins). */
    readonly retryAfter = 0,
  ) {
    super(`${rpc}: ${code || status}: ${message}`);
    this.name = "ControlError";
  }
}

export interface Tokens {
  accessToken: string;
  /** RFC 3339, as protojson writes a Timestamp. */
  accessTokenExpiresAt?: string;
  refreshToken: string;
  userId: string;
}

export type Json = Record<string, unknown>;

export function request(base: string, rpc: string, body: Json, token?: string): { method: "POST"; url: string; body: string; params: { headers: Record<string, string>; tags: Record<string, string>; responseType: "text" } } {
  const headers: Record<string, string> = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  return { method: "POST", url: `${base}/${rpc}`, body: JSON.stringify(body), params: { headers, tags: { name: rpc, rpc }, responseType: "text" } };
}

/** The decoded answer of a call made with request(), or a ControlError. */
export function decode<T>(rpc: string, res: { status: number; body: unknown; headers: Record<string, string>; timings: { duration: number }; error: string }): T {
  controlCall.add(res.timings.duration, { rpc });
  const text = typeof res.body === "string" ? res.body : "";
  if (res.status === 200) return (text ? JSON.parse(text) : {}) as T;
  let code = "", message = res.error || text;
  try {
    const e = JSON.parse(text) as { code?: string; message?: string };
    code = e.code ?? "";
    message = e.message ?? message;
  } catch { /* not JSON: a proxy's page, or no answer at all */ }
  const retry = Number(res.headers["Retry-After"] ?? res.headers["retry-after"] ?? 0);
  throw new ControlError(rpc, res.status, code, message, Number.isFinite(retry) ? retry : 0);
}

/** One call, synchronously. */
export function call<T>(base: string, rpc: string, body: Json, token?: string): T {
  const r = request(base, rpc, body, token);
  return decode<T>(rpc, http.request(r.method, r.url, r.body, r.params));
}

/** Many calls of one RPC in parallel (k6's http.batch), in chunks. */
export function callMany<T>(base: string, rpc: string, bodies: Json[], token: string, parallel = 32): T[] {
  const out: T[] = [];
  for (let i = 0; i < bodies.length; i += parallel) {
    const chunk = bodies.slice(i, i + parallel).map((b) => request(base, rpc, b, token));
    const res = http.batch(chunk.map((r) => [r.method, r.url, r.body, r.params] as [string, string, string, typeof r.params]));
    for (const r of res) out.push(decode<T>(rpc, r as never));
  }
  return out;
}

export const RPC = {
  login: "control.v1.AuthService/Login",
  refresh: "control.v1.AuthService/Refresh",
  logout: "control.v1.AuthService/Logout",
  getMe: "control.v1.UserService/GetMe",
  createUser: "control.v1.UserService/CreateUser",
  deleteUser: "control.v1.UserService/DeleteUser",
  registerDevice: "control.v1.DeviceService/RegisterDevice",
  listDevices: "control.v1.DeviceService/ListDevices",
  deleteDevice: "control.v1.DeviceService/DeleteDevice",
} as const;

/** Exchanges a refresh token for fresh tokens (refresh tokens are single-use). */
export function refresh(base: string, refreshToken: string): Tokens {
  return call<{ tokens: Tokens }>(base, RPC.refresh, { refreshToken }).tokens;
}
