// The reconnect storm: every VU connects its user's devices, all of them
// drop their sessions at one instant (setup's stormAt) without a goodbye,
// as when an edge or a network dies under them, and come back at once on
// their resume tickets. Time to back is measured from that instant, so
// the metric's max is the storm's time to all back.
import { check } from "k6";
import { Rate, Trend } from "k6/metrics";
import { delay, Session } from "./session.js";
import { edgeURL, num } from "./env.js";
import { connectAll, closeAll, identity, userOf } from "./exchange.js";
import type { SetupData } from "./provision.js";

export const backAfter = new Trend("relay_storm_back", true);
export const backResumed = new Rate("relay_storm_resumed");

export function stormConfig(): { settleMs: number; attempts: number } {
  return { settleMs: num("STORM_SETTLE_MS", 5_000), attempts: num("STORM_ATTEMPTS", 8) };
}

export async function storm(data: SetupData): Promise<void> {
  const user = userOf(data);
  const first = await connectAll(user);
  const up = first.every((s) => s !== null);
  check(first, { "every device's session is up before the storm": () => up });
  if (!up || data.stormAt === undefined) {
    await closeAll(user, first);
    return;
  }
  await delay(data.stormAt - Date.now());
  const tickets = (first as Session[]).map((s) => s.resume());
  await Promise.all((first as Session[]).map((s) => s.drop()));
  const { attempts } = stormConfig();
  // Everyone comes back at once; a refused attempt (the edge's handshake
  // limit, a timeout under the storm) backs off with jitter and tries again.
  const back = await Promise.all(user.devices.map(async (d, i) => {
    let backoff = 100;
    for (let a = 0; a < attempts; a++) {
      try {
        const s = await Session.connect(edgeURL(), identity(d), tickets[i]);
        backAfter.add(Date.now() - data.stormAt!);
        backResumed.add(s.resumed);
        return s;
      } catch {
        await delay(backoff / 2 + Math.random() * backoff / 2);
        backoff = Math.min(backoff * 2, 5_000);
      }
    }
    return null;
  }));
  const allBack = back.every((s) => s !== null);
  check(back, { "every device is back after the storm": () => allBack });
  if (allBack) {
    // Back means working: one acknowledged event each way.
    const [a, b] = back as Session[];
    let got = 0;
    b.onEvent = () => { got++; };
    const ok = await a.send([user.devices[1].id], new Uint8Array(16)).then(() => true, () => false);
    check(null, { "events flow after the storm": () => ok && got === 1 });
  }
  await closeAll(user, back);
}
