// Smoke: one user's two devices exchange a few acknowledged events, to
// check the script and the deployment before any load.
import { edgeIteration, edgeOptions, edgeSetup, edgeTeardown } from "../lib/edge-scenario.js";
import { num } from "../lib/env.js";
import { summarize, type SummaryData } from "../lib/summary.js";
import type { SetupData } from "../lib/provision.js";

const VUS = num("VUS", 1);

export const options = edgeOptions("smoke", { executor: "per-vu-iterations", vus: VUS, iterations: num("ITERATIONS", 2), maxDuration: "2m" });

export function setup(): SetupData { return edgeSetup(VUS); }
export const edge = edgeIteration;
export function teardown(data: SetupData): void { edgeTeardown(data); }
export function handleSummary(data: SummaryData): Record<string, string> { return summarize("smoke", data); }
