// Bundles each scenario in src/scenarios into dist/<scenario>.js, an ES
// module k6 runs as it is (the k6 modules stay imports), and writes
// dist/SOURCES.sha256: the hash of everything the bundles come from, so
// `go test ./loadtest/k6` can tell a stale bundle without npm.
import { build } from "esbuild";
import { createHash } from "node:crypto";
import { readFileSync, readdirSync, writeFileSync, mkdirSync, rmSync, statSync } from "node:fs";
import { join } from "node:path";

rmSync("dist", { recursive: true, force: true });
mkdirSync("dist", { recursive: true });
const scenarios = readdirSync("src/scenarios").filter((f) => f.endsWith(".ts")).sort();
await build({
  entryPoints: scenarios.map((f) => `src/scenarios/${f}`),
  outdir: "dist",
  bundle: true,
  format: "esm",
  // What k6's JavaScript engine (sobek) runs without a transform.
  target: "es2020",
  external: ["k6", "k6/*"],
  minify: true,
  sourcemap: false,
  legalComments: "eof",
  logLevel: "warning",
});
writeFileSync("dist/SOURCES.sha256", `sources ${sourcesHash()}\nbundle ${bundleHash()}\n`);

// The stamp's two hashes must match k6_test.go's TestBundlesAreFresh:
// "sources" covers every file the bundles come from (the device
// protocol's .proto files included, since src/gen is generated from
// them); "bundle" covers dist/ itself, so a hand edit there shows too.
function hashFiles(files) {
  const h = createHash("sha256");
  for (const f of [...files].sort()) {
    h.update(f + "\n");
    h.update(createHash("sha256").update(readFileSync(f)).digest("hex") + "\n");
  }
  return h.digest("hex");
}

function walk(dir, out = []) {
  for (const name of readdirSync(dir).sort()) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) walk(p, out);
    else out.push(p);
  }
  return out;
}

function sourcesHash() {
  return hashFiles([...walk("src"), ...walk("../../proto/relay/v1").filter((f) => f.endsWith(".proto")), "build.mjs", "package-lock.json", "tsconfig.json"]);
}

function bundleHash() {
  return hashFiles(walk("dist").filter((f) => f.endsWith(".js")));
}
