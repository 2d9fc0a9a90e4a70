// Spike: from nothing to VUS users within SPIKE, a short hold, and back:
// a burst of handshakes (full, then resumed) and traffic at once.
import { edgeIteration, edgeOptions, edgeSetup, edgeTeardown } from "../lib/edge-scenario.js";
import { num, str } from "../lib/env.js";
import { summarize, type SummaryData } from "../lib/summary.js";
import type { SetupData } from "../lib/provision.js";

const VUS = num("VUS", 500);

export const options = edgeOptions("spike", {
  executor: "ramping-vus",
  startVUs: 0,
  stages: [
    { duration: str("SPIKE", "30s"), target: VUS },
    { duration: str("HOLD", "1m"), target: VUS },
    { duration: "30s", target: 0 },
  ],
  gracefulRampDown: "1m",
});

export function setup(): SetupData { return edgeSetup(VUS); }
export const edge = edgeIteration;
export function teardown(data: SetupData): void { edgeTeardown(data); }
export function handleSummary(data: SummaryData): Record<string, string> { return summarize("spike", data); }
