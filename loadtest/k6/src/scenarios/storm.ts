// Reconnect storm: DEVICES devices (two per VU) connect, all drop at the
// same instant and resume on their tickets. relay_storm_back's max is the
// time until all were back; relay_storm_resumed how many skipped the
// signature.
import { edgeThresholds, edgeOptions } from "../lib/edge-scenario.js";
import { num } from "../lib/env.js";
import { deprovision, provision, type SetupData } from "../lib/provision.js";
import { storm } from "../lib/storm.js";
import { summarize, type SummaryData } from "../lib/summary.js";

const VUS = Math.ceil(num("DEVICES", 1000) / 2);
// Time for every device to connect before the storm.
const RAMP_MS = num("STORM_RAMP_MS", Math.max(10_000, VUS * 10));

const base = edgeOptions("storm", { executor: "per-vu-iterations", vus: VUS, iterations: 1, maxDuration: "10m" });
export const options = {
  ...base,
  thresholds: {
    ...edgeThresholds(),
    relay_storm_back: [`max<${num("STORM_MAX_BACK_MS", 60_000)}`],
    relay_storm_resumed: [`rate>${num("STORM_MIN_RESUMED", 0.95)}`],
  },
};

export function setup(): SetupData {
  const data = provision(VUS, 2);
  data.stormAt = Date.now() + RAMP_MS;
  return data;
}
export const edge = storm;
export function teardown(data: SetupData): void { deprovision(data); }
export function handleSummary(data: SummaryData): Record<string, string> { return summarize("storm", data); }
