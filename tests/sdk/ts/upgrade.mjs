// The live-upgrade tests' TypeScript client (langsmith@0.12.0, unmodified): streams several
// commands at once through `sandbox.run(..., { wait: false })` and its handle's iteration,
// which reattaches by itself when the daemon closes the socket for an upgrade.
// Usage: node upgrade.mjs <dataplane-url> '<json [{key, command, pty, timeout}]>'
// Prints JSON lines: {"event":"started","key","id","pid"} per command as soon as it runs,
// then {"event":"done","key",stdout:{sha256,length,tail},stderr:{...},exit_code,error}.
import { createHash } from "node:crypto";
import { Sandbox, SandboxClient } from "langsmith/sandbox";

const [url, specText] = process.argv.slice(2);
const apiKey = process.env.SANDBOXD_TEST_API_KEY || "dummy-api-key";
const client = new SandboxClient({ apiKey, apiEndpoint: "http://127.0.0.1:9/x" });
const sandbox = new Sandbox({ name: "local", dataplane_url: url }, client);

function digest() {
  return { hash: createHash("sha256"), length: 0, tail: Buffer.alloc(0) };
}

function update(d, text) {
  const bytes = Buffer.from(text, "utf8");
  d.hash.update(bytes);
  d.length += bytes.length;
  d.tail = Buffer.concat([d.tail, bytes]).subarray(-200);
}

function finish(d) {
  // The tail is cut at a byte count: decode it leniently, only its last line matters.
  return { sha256: d.hash.digest("hex"), length: d.length, tail: d.tail.toString("utf8") };
}

async function one(spec) {
  const out = digest();
  const err = digest();
  let exitCode = null;
  let error = null;
  try {
    const handle = await sandbox.run(spec.command, {
      timeout: spec.timeout,
      pty: spec.pty,
      wait: false,
    });
    process.stdout.write(
      JSON.stringify({ event: "started", key: spec.key, id: handle.commandId, pid: handle.pid }) +
        "\n",
    );
    for await (const chunk of handle) {
      update(chunk.stream === "stdout" ? out : err, chunk.data);
    }
    exitCode = (await handle.result).exit_code;
  } catch (e) {
    error = `${e.name}: ${e.message}`;
  }
  process.stdout.write(
    JSON.stringify({
      event: "done",
      key: spec.key,
      stdout: finish(out),
      stderr: finish(err),
      exit_code: exitCode,
      error,
    }) + "\n",
  );
}

// `node upgrade.mjs <url> runs <stop-file>`: sandbox.run() back to back until the file
// exists, one {"event":"run","i","ok","ms","error"} line each (ok: exact output and code).
async function runs(stopFile) {
  const { existsSync } = await import("node:fs");
  for (let i = 0; !existsSync(stopFile); i++) {
    const t0 = Date.now();
    let ok = false;
    let error = null;
    try {
      const r = await sandbox.run(`echo ts${i}; echo e${i} >&2; exit ${i % 7}`, { timeout: 60 });
      ok = r.stdout === `ts${i}\n` && r.stderr === `e${i}\n` && r.exit_code === i % 7;
      if (!ok) error = JSON.stringify(r);
    } catch (e) {
      error = `${e.name}: ${e.message}`;
    }
    process.stdout.write(JSON.stringify({ event: "run", i, ok, ms: Date.now() - t0, error }) + "\n");
  }
}

if (specText === "runs") {
  await runs(process.argv[4]);
} else {
  await Promise.all(JSON.parse(specText).map(one));
}
