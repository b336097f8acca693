// Builds the dashboard into a temporary folder and compares it, file by file, with the
// committed build in pipeline/static: the committed files must be what the sources make.
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "vite";

const web = resolve(fileURLToPath(new URL("..", import.meta.url)));
const committed = resolve(web, "../pipeline/static");
const fresh = mkdtempSync(join(tmpdir(), "signalbox-web-"));

function files(root) {
  const found = [];
  const walk = (dir) => {
    for (const name of readdirSync(dir)) {
      const path = join(dir, name);
      if (statSync(path).isDirectory()) walk(path);
      else found.push(relative(root, path));
    }
  };
  walk(root);
  return found.sort();
}

try {
  await build({ root: web, logLevel: "error", build: { outDir: fresh, emptyOutDir: true } });
  let built, kept;
  try {
    kept = files(committed);
  } catch {
    kept = [];
  }
  built = files(fresh);
  const problems = [];
  for (const name of built) {
    if (!kept.includes(name)) problems.push(`missing from pipeline/static: ${name}`);
    else if (!readFileSync(join(fresh, name)).equals(readFileSync(join(committed, name)))) {
      problems.push(`differs from a fresh build: pipeline/static/${name}`);
    }
  }
  for (const name of kept) {
    if (!built.includes(name)) problems.push(`not made by the sources: pipeline/static/${name}`);
  }
  if (problems.length) {
    console.error(problems.join("\n"));
    console.error("The committed dashboard does not match web/: run `make web` and commit pipeline/static.");
    process.exitCode = 1;
  } else {
    console.log(`pipeline/static matches a fresh build (${built.length} files)`);
  }
} finally {
  rmSync(fresh, { recursive: true, force: true });
}
