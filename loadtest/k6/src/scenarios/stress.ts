// Stress: above the expected load (VUS users, default 4x average) in
// steps, to see how the edge degrades: ack latency and errors by step.
import { edgeIteration, edgeOptions, edgeSetup, edgeTeardown } from "../lib/edge-scenario.js";
import { num, str } from "../lib/env.js";
import { summarize, type SummaryData } from "../lib/summary.js";
import type { SetupData } from "../lib/provision.js";

const VUS = num("VUS", 200);
const step = str("STEP", "5m");

export const options = edgeOptions("stress", {
  executor: "ramping-vus",
  startVUs: 0,
  stages: [
    { duration: "2m", target: Math.ceil(VUS / 2) },
    { duration: step, target: Math.ceil(VUS / 2) },
    { duration: "2m", target: VUS },
    { duration: step, target: VUS },
    { duration: "2m", target: 0 },
  ],
  gracefulRampDown: "1m",
});

export function setup(): SetupData { return edgeSetup(VUS); }
export const edge = edgeIteration;
export function teardown(data: SetupData): void { edgeTeardown(data); }
export function handleSummary(data: SummaryData): Record<string, string> { return summarize("stress", data); }
