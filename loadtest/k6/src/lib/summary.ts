// handleSummary for every scenario: a readable summary on stdout and a
// compact JSON file for CI (SUMMARY_JSON, default summary-<scenario>.json)
// saying whether every threshold held.
import { str } from "./env.js";

interface MetricData {
  type: string;
  contains: string;
  values: Record<string, number>;
  thresholds?: Record<string, { ok: boolean }>;
}

interface Check { name: string; passes: number; fails: number }
interface Group { name: string; checks: Check[]; groups: Group[] }

export interface SummaryData {
  metrics: Record<string, MetricData>;
  root_group: Group;
  state: { testRunDurationMs: number };
}

function checksOf(g: Group): Check[] {
  return [...(g.checks ?? []), ...(g.groups ?? []).flatMap(checksOf)];
}

function fmt(m: MetricData, key: string, v: number): string {
  if (m.contains === "time" && key !== "count") return v >= 1000 ? `${(v / 1000).toFixed(2)}s` : `${v.toFixed(2)}ms`;
  if (m.type === "rate" && key === "rate") return `${(v * 100).toFixed(2)}%`;
  return Number.isInteger(v) ? String(v) : v.toFixed(2);
}

export function summarize(scenario: string, data: SummaryData): Record<string, string> {
  const thresholds: Record<string, Record<string, boolean>> = {};
  let ok = true;
  for (const [name, m] of Object.entries(data.metrics)) {
    for (const [expr, t] of Object.entries(m.thresholds ?? {})) {
      (thresholds[name] ??= {})[expr] = t.ok;
      ok &&= t.ok;
    }
  }
  const checks = checksOf(data.root_group);
  const report = {
    scenario,
    durationMs: data.state.testRunDurationMs,
    thresholdsOk: ok,
    checksOk: checks.every((c) => c.fails === 0),
    thresholds,
    checks: checks.map((c) => ({ name: c.name, passes: c.passes, fails: c.fails })),
    metrics: Object.fromEntries(Object.entries(data.metrics).map(([k, m]) => [k, m.values])),
  };
  const lines = [`relay k6 ${scenario}: ${(data.state.testRunDurationMs / 1000).toFixed(1)}s, thresholds ${ok ? "passed" : "FAILED"}`, ""];
  for (const c of checks) lines.push(`  ${c.fails === 0 ? "ok  " : "FAIL"} ${c.name}: ${c.passes} passed, ${c.fails} failed`);
  lines.push("");
  for (const name of Object.keys(data.metrics).sort()) {
    const m = data.metrics[name];
    const vals = Object.entries(m.values).map(([k, v]) => `${k}=${fmt(m, k, v)}`).join(" ");
    lines.push(`  ${name.padEnd(28)} ${vals}`);
    for (const [expr, t] of Object.entries(m.thresholds ?? {})) lines.push(`    ${t.ok ? "ok  " : "FAIL"} ${expr}`);
  }
  return {
    stdout: lines.join("\n") + "\n",
    [str("SUMMARY_JSON", `summary-${scenario}.json`)]: JSON.stringify(report, null, 2),
  };
}
