// Soak: a moderate, constant load (VUS users) for DURATION, to find what
// grows (memory, goroutines, latency) only with time. Watch the edge's
// go_memstats_heap_inuse_bytes and go_goroutines meanwhile (or run
// relayload soak, which plots them).
import { edgeIteration, edgeOptions, edgeSetup, edgeTeardown } from "../lib/edge-scenario.js";
import { num, str } from "../lib/env.js";
import { summarize, type SummaryData } from "../lib/summary.js";
import type { SetupData } from "../lib/provision.js";

const VUS = num("VUS", 50);

export const options = edgeOptions("soak", { executor: "constant-vus", vus: VUS, duration: str("DURATION", "1h"), gracefulStop: "1m" });

export function setup(): SetupData { return edgeSetup(VUS); }
export const edge = edgeIteration;
export function teardown(data: SetupData): void { edgeTeardown(data); }
export function handleSummary(data: SummaryData): Record<string, string> { return summarize("soak", data); }
