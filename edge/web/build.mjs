// Bundles the browser client and the console page into dist/, and writes
// dist/SOURCES.sha256: the hash of everything the bundles come from, so
// `go test ./edge/web` can tell a stale bundle without npm.
import { build } from "esbuild";
import { createHash } from "node:crypto";
import { readFileSync, readdirSync, writeFileSync, mkdirSync, copyFileSync, statSync } from "node:fs";
import { join } from "node:path";

mkdirSync("dist", { recursive: true });
const common = { bundle: true, format: "esm", target: "es2022", minify: true, sourcemap: false, legalComments: "none", logLevel: "warning" };
// relay.js is the client, usable on its own; the console page imports it
// at run time rather than carrying a second copy.
await build({ ...common, entryPoints: ["src/relay.ts"], outfile: "dist/relay.js" });
await build({ ...common, entryPoints: ["src/console.ts"], outfile: "dist/console.js", external: ["./relay.js"] });
copyFileSync("static/index.html", "dist/index.html");
copyFileSync("static/favicon.svg", "dist/favicon.svg");
writeFileSync("dist/SOURCES.sha256", `sources ${sourcesHash()}\nbundle ${bundleHash()}\n`);

// The stamp's two hashes must match web_test.go's TestBundleIsFresh:
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

export function sourcesHash() {
  return hashFiles([...walk("src"), ...walk("static"), ...walk("../../proto/relay/v1").filter((f) => f.endsWith(".proto")), "build.mjs", "package-lock.json", "tsconfig.json"]);
}

export function bundleHash() {
  return hashFiles(["dist/console.js", "dist/favicon.svg", "dist/index.html", "dist/relay.js"]);
}
