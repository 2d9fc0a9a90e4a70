// What the edge scenarios share: thresholds, setup and teardown, and the
// iteration. Each scenario file only sets its executor (k6's vocabulary:
// smoke, average load, stress, spike, soak, breakpoint).
import type { Options, Scenario } from "k6/options";
import { num } from "./env.js";
import { exchange, exchangeConfig } from "./exchange.js";
import { deprovision, provision, type SetupData } from "./provision.js";

/** The thresholds an edge run must hold; ACK_P95_MS, ACK_P99_MS and
 * MAX_ERROR_RATE move them. */
export function edgeThresholds(abortOnFail = false): NonNullable<Options["thresholds"]> {
  const t = (threshold: string) => (abortOnFail ? { threshold, abortOnFail: true, delayAbortEval: "30s" } : threshold);
  const errors = num("MAX_ERROR_RATE", 0.01);
  return {
    relay_ack_latency: [t(`p(95)<${num("ACK_P95_MS", 50)}`), t(`p(99)<${num("ACK_P99_MS", 100)}`)],
    relay_event_failed: [t(`rate<${errors}`)],
    relay_handshake_failed: [t(`rate<${errors}`)],
    checks: [`rate>${1 - errors}`],
  };
}

/** Options for one edge scenario run by `exec: "edge"`. */
export function edgeOptions(name: string, scenario: Scenario, abortOnFail = false): Options {
  return {
    scenarios: { [name]: { ...scenario, exec: "edge" } as Scenario },
    thresholds: edgeThresholds(abortOnFail),
    // The edge's certificate is self-signed unless it was given one
    // (relayd edge --tls-cert); k6 cannot pin a hash, so it skips the
    // check unless TLS_VERIFY=1.
    insecureSkipTLSVerify: num("TLS_VERIFY", 0) === 0,
    summaryTrendStats: ["avg", "min", "med", "max", "p(90)", "p(95)", "p(99)"],
    setupTimeout: "10m",
    teardownTimeout: "10m",
  };
}

/** One user (with DEVICES_PER_USER devices) per VU. */
export function edgeSetup(maxVUs: number): SetupData {
  return provision(maxVUs, num("DEVICES_PER_USER", 2));
}

export function edgeTeardown(data: SetupData): void {
  deprovision(data);
}

export function edgeIteration(data: SetupData): Promise<void> {
  return exchange(data, exchangeConfig());
}
