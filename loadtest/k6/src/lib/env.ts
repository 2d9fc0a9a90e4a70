// Settings from the environment (k6 run -e NAME=value, or the shell's).

export function str(name: string, def: string): string {
  const v = __ENV[name];
  return v === undefined || v === "" ? def : v;
}

export function num(name: string, def: number): number {
  const v = __ENV[name];
  if (v === undefined || v === "") return def;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new Error(`${name}=${v} is not a number`);
  return n;
}

/** The control API (Connect, JSON over HTTP). */
export const controlURL = () => str("CONTROL_URL", "http://127.0.0.1:7400").replace(/\/+$/, "");
/** The edge's WebSocket endpoint (docs/protocol.md). */
export const edgeURL = () => str("EDGE_URL", "wss://127.0.0.1:7443/relay/v1/ws");
