// Starts a real `herald` binary for the end-to-end tests: its own config, port and
// secrets; killed (SIGKILL, as a crash) and restarted on the same port by the tests.
import { spawn } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const repo = resolve(dirname(fileURLToPath(import.meta.url)), "../../../..");

/** The binary: $HERALD_BIN, else the workspace's debug build (scripts/test builds it). */
export function heraldBinary() {
  const path = process.env.HERALD_BIN ?? join(repo, "target/debug/herald");
  if (!existsSync(path)) throw new Error(`no herald binary at ${path}: run \`cargo build --bin herald\` or set HERALD_BIN`);
  return path;
}

export async function freePort() {
  const server = createServer();
  await new Promise((done) => server.listen(0, "127.0.0.1", done));
  const { port } = server.address();
  await new Promise((done) => server.close(done));
  return port;
}

/** Polls `predicate` until it holds; fails after `timeout` ms with `what` in the message. */
export async function waitFor(predicate, what, timeout = 10_000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((done) => setTimeout(done, 20));
  }
}

/** A throwaway redis-server on its own port, without persistence. */
export class Redis {
  async start() {
    this.port ??= await freePort();
    this.log = "";
    this.process = spawn("redis-server", ["--port", String(this.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.process.stdout.on("data", (chunk) => (this.log += chunk));
    this.process.stderr.on("data", (chunk) => (this.log += chunk));
    this.exited = new Promise((done) => this.process.once("exit", done));
    await waitFor(() => {
      if (this.process.exitCode !== null) throw new Error(`redis-server exited: ${this.log}`);
      return /Ready to accept connections/.test(this.log);
    }, "redis-server to start");
  }

  get url() {
    return `redis://127.0.0.1:${this.port}`;
  }

  async stop() {
    if (this.process && this.process.exitCode === null && this.process.signalCode === null) {
      this.process.kill("SIGKILL");
      await this.exited;
    }
  }
}

export class Herald {
  constructor({ extraConfig = "", leeway = "5s" } = {}) {
    this.secret = randomBytes(24).toString("hex");
    this.apiKey = randomBytes(24).toString("hex");
    this.dir = mkdtempSync(join(tmpdir(), "herald-e2e-"));
    this.config = join(this.dir, "herald.toml");
    this.extraConfig = extraConfig;
    this.leeway = leeway;
    this.log = "";
  }

  get url() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  get http() {
    return `http://127.0.0.1:${this.port}`;
  }

  async start() {
    this.port ??= await freePort();
    writeFileSync(
      this.config,
      `listen = "127.0.0.1:${this.port}"
demo_page = false
[jwt]
secret = "${this.secret}"
leeway = "${this.leeway}"
[api]
key = "${this.apiKey}"
[log]
level = "warn"
[shutdown]
drain_window = "100ms"
[namespaces.feed]
subscribe = "authenticated"
client_publish = true
history_size = 100
[namespaces.room]
subscribe = "authenticated"
client_publish = true
presence = true
${this.extraConfig}
`,
    );
    const env = { ...process.env };
    for (const name of Object.keys(env)) if (name.startsWith("HERALD_")) delete env[name];
    this.process = spawn(heraldBinary(), ["serve", "--config", this.config], { env, stdio: ["ignore", "pipe", "pipe"] });
    this.process.stdout.on("data", (chunk) => (this.log += chunk));
    this.process.stderr.on("data", (chunk) => (this.log += chunk));
    const exited = new Promise((done) => this.process.once("exit", done));
    this.exited = exited;
    await waitFor(async () => {
      if (this.process.exitCode !== null) throw new Error(`herald exited: ${this.log}`);
      try {
        return (await fetch(`${this.http}/health`)).ok;
      } catch {
        return false;
      }
    }, `herald to listen on ${this.port}`);
    // In Redis mode the node is ready once its broker connections are up.
    await waitFor(async () => (await fetch(`${this.http}/ready`)).ok, "herald to be ready");
  }

  /** Kills the process without letting it drain, as a crash would. */
  async kill() {
    this.process.kill("SIGKILL");
    await this.exited;
  }

  async stop() {
    if (this.process && this.process.exitCode === null && this.process.signalCode === null) await this.kill();
  }

  /** A HS256 token for `user`, valid for `ttl` seconds. */
  token(user, { ttl = 3600, channels } = {}) {
    const encode = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
    const claims = { sub: user, exp: Math.floor(Date.now() / 1000) + ttl, ...(channels ? { channels } : {}) };
    const unsigned = `${encode({ alg: "HS256", typ: "JWT" })}.${encode(claims)}`;
    return `${unsigned}.${createHmac("sha256", this.secret).update(unsigned).digest("base64url")}`;
  }

  /** Publishes through the HTTP API with the API key. */
  async publish(channel, data, extra = {}) {
    const response = await fetch(`${this.http}/api/v1/publish`, {
      method: "POST",
      headers: { authorization: `Bearer ${this.apiKey}`, "content-type": "application/json" },
      body: JSON.stringify({ channel, data, ...extra }),
    });
    if (!response.ok) throw new Error(`publish: ${response.status} ${await response.text()}`);
    return response.json();
  }
}
