// Breakpoint: sessions start at a rate that grows without pause until a
// threshold fails (k6 then aborts the run): the rate where it failed is
// the edge's capacity on this setup. Each session sends EVENTS events per
// device at EVENT_RATE; MAX_RATE sessions/s at the end of DURATION.
import { edgeIteration, edgeOptions, edgeSetup, edgeTeardown } from "../lib/edge-scenario.js";
import { num, str } from "../lib/env.js";
import { summarize, type SummaryData } from "../lib/summary.js";
import type { SetupData } from "../lib/provision.js";

const MAX_VUS = num("VUS", 1000);

export const options = edgeOptions("breakpoint", {
  executor: "ramping-arrival-rate",
  startRate: 1,
  timeUnit: "1s",
  preAllocatedVUs: Math.min(MAX_VUS, 50),
  maxVUs: MAX_VUS,
  stages: [{ duration: str("DURATION", "20m"), target: num("MAX_RATE", 200) }],
}, true);

export function setup(): SetupData { return edgeSetup(MAX_VUS); }
export const edge = edgeIteration;
export function teardown(data: SetupData): void { edgeTeardown(data); }
export function handleSummary(data: SummaryData): Record<string, string> { return summarize("breakpoint", data); }
