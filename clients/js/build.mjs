// Builds the client: dist/herald.mjs (ES module), dist/herald.js (minified IIFE, global
// `Herald`, the file the server embeds at /herald.js) and dist/types/ (declarations).
// `node build.mjs --check` builds into a temporary folder and fails when the committed
// dist/ differs from what the sources build to, so that dist/ never goes stale.
import { build } from "esbuild";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const root = dirname(fileURLToPath(import.meta.url));
const check = process.argv.includes("--check");
const outdir = check ? mkdtempSync(join(tmpdir(), "herald-js-")) : join(root, "dist");

const common = { entryPoints: [join(root, "src/index.ts")], bundle: true, target: "es2020", logLevel: "warning", legalComments: "none" };
await build({ ...common, format: "esm", outfile: join(outdir, "herald.mjs") });
await build({ ...common, format: "iife", globalName: "Herald", minify: true, outfile: join(outdir, "herald.js") });
// Type-checks the sources and writes the declarations.
execFileSync(process.execPath, [join(root, "node_modules/typescript/bin/tsc"), "-p", root, "--outDir", join(outdir, "types")], { stdio: "inherit" });

if (check) {
  const files = (dir) => readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    return statSync(path).isDirectory() ? files(path) : [path];
  });
  const built = files(outdir).map((path) => relative(outdir, path)).sort();
  let committed = [];
  try {
    committed = files(join(root, "dist")).map((path) => relative(join(root, "dist"), path)).sort();
  } catch {}
  const stale = [...new Set([...built, ...committed])].filter((name) => {
    try {
      return !readFileSync(join(outdir, name)).equals(readFileSync(join(root, "dist", name)));
    } catch {
      return true;
    }
  });
  rmSync(outdir, { recursive: true, force: true });
  if (stale.length > 0) {
    console.error(`clients/js/dist is not what the sources build to (${stale.join(", ")}): run \`npm run build\` in clients/js and commit dist/`);
    process.exit(1);
  }
  console.log("clients/js/dist is up to date");
}
