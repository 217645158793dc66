// Starts the real edge runtimes (workerd, Deno from this folder's node_modules) and a
// loopback origin for the end-to-end tests, and sends raw HTTP requests to them.
import http from 'node:http';
import net from 'node:net';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

export const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const MODULES = path.join(ROOT, 'test-harness/edge-runtimes/node_modules');

/**
 * The runtime's own binary, from the package npm installed for this platform
 * (`@cloudflare/workerd-linux-64/bin/workerd`, `@deno/linux-x64-glibc/deno`): the packages'
 * bin scripts are Node wrappers that would outlive a signal sent to them.
 */
function binary(scope, prefix, file) {
  const folder = path.join(MODULES, scope);
  const found = existsSync(folder)
    ? readdirSync(folder).filter((name) => name.startsWith(prefix)).map((name) => path.join(folder, name, file)).find(existsSync)
    : undefined;
  if (!found) throw new Error(`no ${scope}/${prefix}* binary: run make edge-runtimes-install`);
  return found;
}
/** Generated configs and policies (never in the source tree). */
export const WORK = path.join(ROOT, 'target/edge-runtimes');

/** A free port on 127.0.0.1 (the kernel's choice, released for the runtime to take). */
export async function freePort() {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** An HTTP server on 127.0.0.1 with `handler(req, body) → {status, headers, body}`. */
export async function serve(handler) {
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', async () => {
      const answer = await handler(req, Buffer.concat(chunks).toString('utf8'));
      if (answer.destroy) return req.socket.destroy();
      res.writeHead(answer.status ?? 200, answer.headers ?? { 'content-type': 'application/json' });
      res.end(answer.body ?? '');
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    close: () => new Promise((r) => { server.closeAllConnections(); server.close(r); }),
  };
}

/** One request with `path` sent exactly as written (no client-side URL normalization). */
export function send(port, { method = 'GET', path: target, headers = {}, body }) {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path: target, headers }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks).toString('utf8') }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

/** Waits until `port` accepts connections (bounded), failing early if `child` exits. */
async function ready(child, port, output) {
  for (let attempt = 0; attempt < 300; attempt++) {
    if (child.exitCode !== null) throw new Error(`exited with ${child.exitCode}:\n${output()}`);
    const open = await new Promise((resolve) => {
      const socket = net.connect(port, '127.0.0.1', () => { socket.destroy(); resolve(true); });
      socket.on('error', () => resolve(false));
    });
    if (open) return;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`not listening on ${port}:\n${output()}`);
}

function start(command, args, env, port) {
  const child = spawn(command, args, { cwd: ROOT, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout.on('data', (d) => { output += d; });
  child.stderr.on('data', (d) => { output += d; });
  const stop = () => new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve();
    child.once('exit', resolve);
    child.kill('SIGKILL');
  });
  return ready(child, port, () => output).then(() => ({ port, stop, output: () => output }));
}

/**
 * A workerd config for `worker` (a capnp file whose embeds are relative to its folder),
 * written under target/ with its embeds rebased, the POLICY binding from `policy`, and
 * ORIGIN_URL set to `origin`.
 */
function workerdConfig(name, worker, policy, origin) {
  mkdirSync(WORK, { recursive: true });
  const folder = path.dirname(worker);
  const policyFile = `${name}.policy.json`;
  writeFileSync(path.join(WORK, policyFile), JSON.stringify(policy));
  const config = readFileSync(worker, 'utf8')
    .replace(/\(name = "POLICY", json = embed "[^"]*"\)/, `(name = "POLICY", json = embed "${policyFile}")`)
    .replace(/embed "([^"]+)"/g, (all, file) => file === policyFile ? all : `embed "${path.relative(WORK, path.join(folder, file))}"`)
    .replace(/\(name = "ORIGIN_URL", text = "[^"]*"\)/, `(name = "ORIGIN_URL", text = "${origin}")`);
  const file = path.join(WORK, `${name}.capnp`);
  writeFileSync(file, config);
  return file;
}

/** The example Worker (or another capnp config) in workerd on a free loopback port. */
export async function startWorkerd({ name = 'edge-worker', config = path.join(ROOT, 'examples/edge-worker/workerd.capnp'), policy, origin }) {
  const port = await freePort();
  const file = workerdConfig(name, config, policy, origin);
  return start(binary('@cloudflare', 'workerd-', 'bin/workerd'), ['serve', file, '--socket-addr', `http=127.0.0.1:${port}`], {}, port);
}

/** The example Deno server on a free loopback port. */
export async function startDeno({ policy, origin }) {
  const port = await freePort();
  mkdirSync(WORK, { recursive: true });
  const policyFile = path.join(WORK, 'deno.policy.json');
  writeFileSync(policyFile, JSON.stringify(policy));
  const args = ['run', '--config', 'examples/edge-worker/deno.json', '--allow-net=127.0.0.1', '--allow-env',
    '--allow-read', 'examples/edge-worker/deno.js'];
  const env = {
    AGENTGATE_POLICY: policyFile, ORIGIN_URL: origin, PORT: String(port), HOST: '127.0.0.1',
    // Nothing to download: no update check, its cache under target/.
    DENO_NO_UPDATE_CHECK: '1', DENO_NO_PROMPT: '1', DENO_DIR: path.join(WORK, 'deno-dir'),
  };
  return start(binary('@deno', '', 'deno'), args, env, port);
}
