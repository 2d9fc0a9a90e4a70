// Average load: ramp up to VUS users (each two devices exchanging events
// at EVENT_RATE per device), hold for HOLD, ramp down.
import { edgeIteration, edgeOptions, edgeSetup, edgeTeardown } from "../lib/edge-scenario.js";
import { num, str } from "../lib/env.js";
import { summarize, type SummaryData } from "../lib/summary.js";
import type { SetupData } from "../lib/provision.js";

const VUS = num("VUS", 50);

export const options = edgeOptions("average", {
  executor: "ramping-vus",
  startVUs: 0,
  stages: [
    { duration: str("RAMP", "2m"), target: VUS },
    { duration: str("HOLD", "10m"), target: VUS },
    { duration: str("RAMP", "2m"), target: 0 },
  ],
  gracefulRampDown: "1m",
});

export function setup(): SetupData { return edgeSetup(VUS); }
export const edge = edgeIteration;
export function teardown(data: SetupData): void { edgeTeardown(data); }
export function handleSummary(data: SummaryData): Record<string, string> { return summarize("average", data); }
