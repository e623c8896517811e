// Drives sandboxd with the released TypeScript SDK (langsmith@0.12.0), unmodified.
// Usage: node scenarios.mjs <dataplane-url> <scenario>  (api key: $SANDBOXD_TEST_API_KEY)
// Prints one JSON object (what the scenario observed) on stdout; exits non-zero on error.
import { Sandbox, SandboxClient } from "langsmith/sandbox";

const [url, scenario] = process.argv.slice(2);
const apiKey = process.env.SANDBOXD_TEST_API_KEY || "dummy-api-key";
const client = new SandboxClient({ apiKey, apiEndpoint: "http://127.0.0.1:9/x" });
const sandbox = new Sandbox({ name: "local", dataplane_url: url }, client);

const scenarios = {
  async run() {
    const r = await sandbox.run("echo héllo; echo warn >&2; exit 3", { timeout: 10 });
    return { stdout: r.stdout, stderr: r.stderr, exit_code: r.exit_code };
  },

  async big() {
    const r = await sandbox.run("head -c 20000000 /dev/zero | tr '\\0' 'z'", { timeout: 60 });
    return { length: r.stdout.length, allZ: /^z*$/.test(r.stdout), exit_code: r.exit_code };
  },

  async bigTtl0() {
    const r = await sandbox.run("head -c 12000000 /dev/zero | tr '\\0' 'z'", {
      timeout: 60,
      ttlSeconds: 0,
    });
    return { length: r.stdout.length, allZ: /^z*$/.test(r.stdout), exit_code: r.exit_code };
  },

  async streaming() {
    const out = [];
    const err = [];
    const r = await sandbox.run("for i in 1 2 3; do echo $i; echo e$i >&2; sleep 0.1; done", {
      timeout: 10,
      onStdout: (d) => out.push(d),
      onStderr: (d) => err.push(d),
    });
    return { out, err, exit_code: r.exit_code };
  },

  async kill() {
    const handle = await sandbox.run("sleep 100 & echo started; wait", { timeout: 30, wait: false });
    const seen = [];
    for await (const chunk of handle) {
      seen.push(chunk.data);
      if (chunk.data.includes("started")) handle.kill();
    }
    const r = await handle.result;
    return { seen, exit_code: r.exit_code };
  },

  async reconnect() {
    const handle = await sandbox.run("echo one; sleep 0.5; echo two; exit 4", {
      timeout: 10,
      wait: false,
    });
    let first = null;
    for await (const chunk of handle) {
      first = chunk.data;
      break;
    }
    const resumed = await sandbox.reconnect(handle.commandId, {
      stdoutOffset: handle.lastStdoutOffset,
    });
    const r = await resumed.result;
    return { first, stdout: r.stdout, exit_code: r.exit_code, id: handle.commandId };
  },

  async input() {
    const handle = await sandbox.run("cat; echo done", {
      timeout: 10,
      wait: false,
      closeInput: false,
    });
    handle.sendInput("from ts\n");
    handle.closeInput();
    const r = await handle.result;
    return { stdout: r.stdout, exit_code: r.exit_code };
  },

  async pty() {
    const r = await sandbox.run("test -t 0 && echo tty", { timeout: 10, pty: true });
    return { stdout: r.stdout, exit_code: r.exit_code };
  },

  async files() {
    const dir = `/tmp/sandboxd-ts-${process.pid}`;
    await sandbox.write(`${dir}/sub/a.txt`, "héllo\nneedle line\n");
    const text = new TextDecoder().decode(await sandbox.read(`${dir}/sub/a.txt`));
    const stat = await sandbox.stat(`${dir}/sub/a.txt`);
    const range = await sandbox.readRange(`${dir}/sub/a.txt`, { start: 7, end: 12 });
    const past = await sandbox.readRange(`${dir}/sub/a.txt`, { start: 100 }).then(
      () => null,
      (e) => e.constructor.name,
    );
    const globbed = await sandbox.glob("**/*.txt", dir);
    const listed = await sandbox.ls(dir);
    const grepped = await sandbox.grep("needle", dir, { glob: "*.txt" });
    const missing = await sandbox.read(`${dir}/nope`).then(
      () => null,
      (e) => e.constructor.name,
    );
    await sandbox.run(`rm -rf ${dir}`, { timeout: 10 });
    return {
      text,
      size: stat.size_bytes ?? stat.sizeBytes,
      range: new TextDecoder().decode(range.content),
      rangeStart: range.start,
      past,
      globbed: globbed.matches.map((m) => [m.path.slice(dir.length), m.is_dir]),
      globTruncated: globbed.truncated,
      listed: listed.matches.map((m) => [m.path.slice(dir.length), m.is_dir]),
      grepped: grepped.matches.map((m) => [m.path.slice(dir.length), m.line, m.text]),
      missing,
    };
  },

  async blocking() {
    // Run as `node --import ./hide-ws.mjs`: without `ws`, run() falls back to POST /execute.
    const r = await sandbox.run("echo blocking; echo err >&2; exit 6", { timeout: 10 });
    return { stdout: r.stdout, stderr: r.stderr, exit_code: r.exit_code };
  },

  async timeout() {
    try {
      await sandbox.run("sleep 30", { timeout: 1 });
      return { raised: null };
    } catch (e) {
      return { raised: e.constructor.name };
    }
  },
};

try {
  const result = await scenarios[scenario]();
  process.stdout.write(JSON.stringify(result) + "\n");
  process.exit(0);
} catch (e) {
  process.stderr.write(`${e?.constructor?.name}: ${e?.message}\n${e?.stack}\n`);
  process.exit(1);
}
