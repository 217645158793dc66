// The policy playground in a real browser: Debian's chromium, headless, driven by
// playwright-core (which downloads no browser), loading playground/ from a static server on
// loopback. A screenshot is left in target/playground.png.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { mkdirSync, readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { es256 } from '../../filters/edge-js/test/sign.mjs';
import { ROOT } from './runtimes.mjs';

const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const TYPES = { '.html': 'text/html', '.js': 'text/javascript', '.css': 'text/css', '.wasm': 'application/wasm', '.json': 'application/json' };
const shared = JSON.parse(readFileSync(path.join(ROOT, 'tests/cases/decisions.json'), 'utf8'));

let server;
let browser;
let page;
let base;

before(async () => {
  // A static file server of the repository, as `python3 -m http.server` would be.
  server = http.createServer(async (req, res) => {
    const pathname = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    const file = path.join(ROOT, pathname.endsWith('/') ? `${pathname}index.html` : pathname);
    if (!file.startsWith(ROOT)) return res.writeHead(403).end();
    try {
      const body = await readFile(file);
      res.writeHead(200, { 'content-type': TYPES[path.extname(file)] ?? 'application/octet-stream' }).end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  base = `http://127.0.0.1:${server.address().port}`;
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: false, args: ['--headless=new', '--no-sandbox'] });
  page = await browser.newPage({ viewport: { width: 1360, height: 1100 } });
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  // Offline: the page may load nothing but this server's files.
  await page.route('**/*', (route) => (route.request().url().startsWith(base) ? route.continue() : route.abort()));
  await page.goto(`${base}/playground/`);
  await page.waitForSelector('#ready[data-ready="true"]', { timeout: 30_000 }).catch((e) => {
    throw new Error(`${e.message}\npage errors: ${errors.join('\n')}`);
  });
});

after(async () => {
  await browser?.close();
  await new Promise((resolve) => server?.close(resolve) ?? resolve());
});

const verdict = () => page.locator('#verdict').innerText();
const checks = () => page.$$eval('#explanation tr[data-requirement]', (rows) =>
  Object.fromEntries(rows.map((r) => [r.dataset.requirement, r.dataset.held === 'true'])));
async function decide({ policy, token, method = 'GET', url, headers = '', body = '' }) {
  if (policy !== undefined) await page.fill('#policy', typeof policy === 'string' ? policy : JSON.stringify(policy, null, 2));
  if (token !== undefined) await page.fill('#token', token);
  await page.selectOption('#method', method);
  await page.fill('#url', url);
  await page.fill('#headers', headers);
  await page.fill('#body', body);
  await page.click('#decide');
}
const casesToken = (extra = {}) => {
  const now = Math.floor(Date.now() / 1000);
  return es256(shared.signing_key, { iss: 'https://idp.example.com', aud: 'https://api.example.com', sub: 'agent-7',
    iat: now - 5, exp: now + 300, scope: 'invoices:read', ...extra });
};

test('the demo token, signed in the page with Web Crypto, is allowed by the demo policy', async () => {
  assert.match(await verdict(), /^allow/i);
  assert.match(await verdict(), /rule read-invoice/);
  assert.deepEqual(await checks(), { scopes: true });
  const upstream = await page.locator('#upstream').innerText();
  assert.match(upstream, /^GET \/invoices\/42 HTTP\/1.1/);
  assert.match(upstream, /x-agent-id: agent-7/);
  assert.equal(await page.locator('#upstream del').first().innerText().then((t) => t.startsWith('authorization: Bearer')), true,
    'the token is struck from what the upstream gets');
});

test('a pasted policy and token: allowed, then denied with each requirement explained', async () => {
  await decide({ policy: shared.policy, token: casesToken(), url: '/invoices/42' });
  assert.match(await verdict(), /^allow/i);
  assert.equal(JSON.parse(await page.locator('#audit').innerText()).agent, 'agent-7');

  await decide({ method: 'POST', url: '/invoices/42/pay' });
  assert.match(await verdict(), /^deny/i);
  assert.match(await verdict(), /403 insufficient_scope · rule pay-invoice/);
  assert.deepEqual(await checks(), { scopes: false, task: false });
  const client = await page.locator('#client').innerText();
  assert.match(client, /^HTTP\/1.1 403/);
  assert.match(client, /www-authenticate: Bearer error="insufficient_scope"/);
  assert.match(await page.locator('#upstream').innerText(), /nothing: the request stops at the gate/);
  assert.equal(JSON.parse(await page.locator('#audit').innerText()).reason, 'insufficient_scope');

  await decide({ token: casesToken({ scope: 'invoices:pay',
    authorization_details: [{ type: 'invoice_processing', actions: ['pay'], identifier: '43' }] }), method: 'POST', url: '/invoices/42/pay' });
  assert.deepEqual(await checks(), { scopes: true, task: false }, 'the task names another invoice');
});

test('no rule reached: the page says why', async () => {
  await decide({ token: '', method: 'GET', url: '/invoices/42' });
  assert.match(await verdict(), /401 missing_token/);
  assert.match(await page.locator('#explanation').innerText(), /missing_token — the request carries no token/);
  await decide({ token: casesToken(), url: '/invoices/42/..;/admin' });
  assert.match(await verdict(), /400 non_canonical_path/);
});

test('an MCP body is decided on its arguments', async () => {
  const policy = { ...shared.policy, rules: [{ name: 'pay-tool', match: { methods: ['POST'], path: '/mcp', mcp: { tool: 'pay_invoice' } },
    require: { scopes: ['invoices:pay'], arguments: [{ path: 'amount', lte: 500 }] } }] };
  const call = (amount) => JSON.stringify({ jsonrpc: '2.0', id: 9, method: 'tools/call', params: { name: 'pay_invoice', arguments: { amount } } });
  await decide({ policy, token: casesToken({ scope: 'invoices:pay' }), method: 'POST', url: '/mcp', body: call(900) });
  assert.match(await verdict(), /403 argument_mismatch · rule pay-tool/);
  assert.deepEqual(await checks(), { scopes: true, arguments: false });
  assert.match(await page.locator('#client').innerText(), /"id":9/);
  await decide({ method: 'POST', url: '/mcp', body: call(120) });
  assert.match(await verdict(), /^allow/i);
  assert.deepEqual(await checks(), { scopes: true, arguments: true });
});

test('a policy error shows its JSON path', async () => {
  const policy = structuredClone(shared.policy);
  policy.rules[1].match.methods = 'POST';
  await decide({ policy, url: '/invoices/42' });
  assert.match(await page.locator('#policy-error').innerText(), /^rules\[1\]\.match\.methods: /);
  assert.match(await verdict(), /policy error/i);
  await decide({ policy: '{"providers": [', url: '/invoices/42' });
  assert.ok(await page.locator('#policy-error').isVisible());
});

test('a screenshot for people to look at (target/playground.png)', async () => {
  await page.click('#demo summary');
  await page.click('#demo-policy');
  await page.click('#sign');
  await decide({ method: 'POST', url: '/invoices/42/pay' });
  await decide({ method: 'POST', url: '/invoices/43/pay' });
  assert.match(await verdict(), /403 task_mismatch/);
  mkdirSync(path.join(ROOT, 'target'), { recursive: true });
  await page.screenshot({ path: path.join(ROOT, 'target/playground.png'), fullPage: true });
});
