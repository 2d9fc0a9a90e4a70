// The edge scenarios' iteration: one user's devices connect (resuming
// with the ticket of their previous session when they have one), each
// sends acknowledged events to the others at a fixed rate, open loop, and
// checks that every event was acknowledged and delivered once.
import { check } from "k6";
import exec from "k6/execution";
import { delay, Session, type DeviceIdentity, type Resume } from "./session.js";
import { fromBase64 } from "./bytes.js";
import { edgeURL, num } from "./env.js";
import type { Device, SetupData, User } from "./provision.js";

/** Tickets of this VU's devices from their last sessions (per VU: each
 * VU has its own copy of module state). */
const tickets = new Map<string, Resume>();

export interface ExchangeConfig {
  /** Events each device sends per iteration. */
  events: number;
  /** Events per second each device sends. */
  rate: number;
  payloadBytes: number;
  ackTimeoutMs: number;
}

export function exchangeConfig(): ExchangeConfig {
  return {
    events: num("EVENTS", 300),
    rate: num("EVENT_RATE", 10),
    payloadBytes: num("PAYLOAD_BYTES", 64),
    ackTimeoutMs: num("ACK_TIMEOUT_MS", 10_000),
  };
}

/** The user this VU plays: VUs are numbered from 1 across the whole test
 * (also when the k6 operator splits it across pods). */
export function userOf(data: SetupData): User {
  return data.users[(exec.vu.idInTest - 1) % data.users.length];
}

export function identity(d: Device): DeviceIdentity {
  return { userId: d.userId, deviceId: d.id, secret: fromBase64(d.secret), minRevision: BigInt(d.revision ?? "0") };
}

/** Connects all of a user's devices; the ones that failed are null. */
export async function connectAll(user: User): Promise<(Session | null)[]> {
  const url = edgeURL();
  const out = await Promise.allSettled(user.devices.map((d) => Session.connect(url, identity(d), tickets.get(d.id))));
  return out.map((r, i) => {
    if (r.status === "fulfilled") return r.value;
    tickets.delete(user.devices[i].id); // a refused ticket is not tried again
    console.warn(`device ${user.devices[i].id}: ${(r.reason as Error)?.message ?? r.reason}`);
    return null;
  });
}

/** Closes the sessions, keeping their tickets for the next iteration. */
export async function closeAll(user: User, sessions: (Session | null)[]): Promise<void> {
  await Promise.all(sessions.map((s, i) => {
    if (!s) return undefined;
    if (s.ticket.length > 0) tickets.set(user.devices[i].id, s.resume());
    return s.close();
  }));
}

export async function exchange(data: SetupData, cfg: ExchangeConfig): Promise<void> {
  const user = userOf(data);
  const sessions = await connectAll(user);
  const up = sessions.every((s) => s !== null);
  check(sessions, { "every device's session is up": () => up });
  if (!up) {
    await closeAll(user, sessions);
    return;
  }
  const live = sessions as Session[];
  // Each device counts what reaches it, once per (sender, id).
  const seen = live.map(() => new Set<string>());
  let duplicates = 0;
  live.forEach((s, i) => {
    s.onEvent = (ev) => {
      const k = `${ev.sender}/${ev.id}`;
      if (seen[i].has(k)) duplicates++;
      seen[i].add(k);
    };
  });
  const payload = new Uint8Array(cfg.payloadBytes);
  const interval = 1000 / cfg.rate;
  const start = Date.now();
  let acked = 0, failed = 0;
  const sends: Promise<void>[] = [];
  // Open loop: event n is due at start + n * interval whatever the acks do,
  // so a slow edge shows as ack latency rather than as a lower rate.
  for (let n = 0; n < cfg.events; n++) {
    await delay(start + n * interval - Date.now());
    for (const s of live) {
      sends.push(s.send([], payload, cfg.ackTimeoutMs).then(() => { acked++; }, (e: unknown) => {
        failed++;
        if (failed <= 3) console.warn(`event refused or lost: ${(e as Error)?.message ?? e}`);
      }));
    }
  }
  await Promise.all(sends);
  // Acks come once every target acknowledged, so what was acked arrived;
  // wait briefly for receipts of events whose ack was lost.
  const want = cfg.events * (live.length - 1);
  for (let waited = 0; waited < cfg.ackTimeoutMs && seen.some((s) => s.size < want); waited += 50) await delay(50);
  check(null, {
    "every event acknowledged": () => acked === cfg.events * live.length && failed === 0,
    "every event delivered to every other device": () => seen.every((s) => s.size === want),
    "no event delivered twice": () => duplicates === 0,
  });
  await closeAll(user, live);
}
