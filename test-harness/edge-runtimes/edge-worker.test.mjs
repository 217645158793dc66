// The example Worker (examples/edge-worker) in real edge runtimes — Cloudflare's workerd and
// Deno — in front of a loopback origin, over real HTTP: the shared decision cases
// (tests/cases/decisions.json), MCP calls decided on their body and tool lists filtered, and
// path spellings that must be refused or meet their own rule. Each answer is compared with
// what the core decides for the same request (the same wasm build, in Node).
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { createGate } from '../../filters/edge-js/node.js';
import { es256 } from '../../filters/edge-js/test/sign.mjs';
import { ROOT, send, serve, startDeno, startWorkerd } from './runtimes.mjs';

const shared = JSON.parse(readFileSync(path.join(ROOT, 'tests/cases/decisions.json'), 'utf8'));
const policy = {
  ...shared.policy,
  rules: [
    ...shared.policy.rules,
    { name: 'approve-invoice', match: { methods: ['POST'], path: '/invoices/{id}/approve' }, require: { scopes: ['invoices:approve'] } },
    { name: 'pay-tool', match: { methods: ['POST'], path: '/mcp', mcp: { tool: 'pay_invoice' } },
      require: { scopes: ['invoices:pay'], arguments: [{ path: 'amount', lte: 500 }] } },
    { name: 'read-tools', match: { methods: ['POST'], path: '/mcp', mcp: { tool: 'read_*' } }, require: { scopes: ['invoices:read'] } },
    { name: 'list-tools', match: { methods: ['POST'], path: '/mcp', mcp: { method: 'tools/list' } } },
  ],
};
// The core, for comparison: the same policy in this process.
const core = createGate(policy);

// The cases' tokens are for the cases' clock; the runtimes use their own, so every time
// claim moves by the same amount (an expired token stays expired).
const shift = (claims) => {
  const delta = Math.floor(Date.now() / 1000) - shared.now;
  const moved = { ...claims };
  for (const name of ['iat', 'nbf', 'exp', 'auth_time']) if (typeof moved[name] === 'number') moved[name] += delta;
  return moved;
};
const token = (claims, tamper = false) => `Bearer ${es256(shared.signing_key, shift(claims), { tamper })}`;
const agent = (scope, extra = {}) => token({
  iss: 'https://idp.example.com', aud: 'https://api.example.com', sub: 'agent-7',
  iat: shared.now - 5, exp: shared.now + 240, jti: 'j-e2e', scope, ...extra,
});
const rpc = (id, method, params) => JSON.stringify({ jsonrpc: '2.0', id, method, params });
const TOOLS = [{ name: 'pay_invoice' }, { name: 'read_invoice' }, { name: 'delete_invoice' }];

/** What the core decides for a request, now. */
const decide = (request) => core.evaluate({ ...request, now: Date.now() / 1000 });

/** The loopback origin: records each request it gets, answers MCP calls. */
async function origin() {
  const received = [];
  const server = await serve((req, body) => {
    const record = { method: req.method, path: req.url, headers: req.headers, body };
    received.push(record);
    if (req.url === '/mcp') {
      const call = JSON.parse(body);
      const result = call.method === 'tools/list' ? { tools: TOOLS } : { content: [{ type: 'text', text: 'done' }] };
      return { body: JSON.stringify({ jsonrpc: '2.0', id: call.id, result }) };
    }
    return { body: JSON.stringify(record) };
  });
  return { ...server, received };
}

const RUNTIMES = { workerd: startWorkerd, deno: startDeno };

for (const [name, startRuntime] of Object.entries(RUNTIMES)) {
  describe(`the example Worker in ${name}`, () => {
    let upstream;
    let runtime;
    before(async () => {
      upstream = await origin();
      runtime = await startRuntime({ policy, origin: upstream.url });
    });
    after(async () => {
      await runtime?.stop();
      await upstream?.close();
    });

    /** Sends `request` through the runtime: the answer, and what reached the origin. */
    async function through(request) {
      const before = upstream.received.length;
      const answer = await send(runtime.port, request);
      const reached = upstream.received.slice(before);
      assert.ok(reached.length <= 1);
      return { answer, reached: reached[0] };
    }

    for (const c of shared.cases) {
      test(`decision case: ${c.name}`, async () => {
        const headers = { ...(c.request.headers ?? {}) };
        if (c.claims) headers.authorization = token(c.claims, c.tamper);
        const { answer, reached } = await through({ ...c.request, headers });
        const expected = decide({ ...c.request, headers });
        assert.equal(expected.decision, c.expect.decision, 'the core agrees with the case');
        if (c.expect.decision === 'deny') {
          assert.equal(answer.status, c.expect.status);
          assert.equal(reached, undefined, 'a denied request never reaches the origin');
          assert.equal(answer.body, expected.body);
          assert.equal(answer.headers['www-authenticate'], expected.headers['www-authenticate']);
        } else {
          assert.equal(answer.status, 200);
          assert.ok(reached, 'forwarded');
          for (const [header, value] of Object.entries(c.expect.headers ?? {})) assert.equal(reached.headers[header], value, header);
          assert.equal(reached.headers.authorization, undefined, 'the token stays at the edge');
          assert.equal(reached.path, c.request.path);
        }
      });
    }

    test('a forged x-agent-id never reaches the origin, in any spelling', async () => {
      const { answer, reached } = await through({ path: '/invoices/42',
        headers: { authorization: agent('invoices:read'), 'X-AGENT-ID': 'admin', 'x-agent-rule': 'pay-invoice' } });
      assert.equal(answer.status, 200);
      assert.equal(reached.headers['x-agent-id'], 'agent-7');
      assert.equal(reached.headers['x-agent-rule'], 'read-invoice');
    });

    test('a tools/call is decided on its body: allowed within the argument limit, denied beyond it', async () => {
      const call = (amount) => through({ method: 'POST', path: '/mcp',
        headers: { authorization: agent('invoices:pay'), 'content-type': 'application/json', accept: 'application/json, text/event-stream' },
        body: rpc(7, 'tools/call', { name: 'pay_invoice', arguments: { amount } }) });
      const small = await call(100);
      assert.equal(small.answer.status, 200);
      assert.equal(JSON.parse(small.reached.body).params.arguments.amount, 100, 'the body reached the origin');
      assert.equal(small.reached.headers['x-agent-rule'], 'pay-tool');
      const large = await call(900);
      assert.equal(large.answer.status, 403);
      assert.equal(large.reached, undefined);
      const error = JSON.parse(large.answer.body);
      assert.equal(error.id, 7, 'a JSON-RPC error for the request id');
      assert.deepEqual(error, JSON.parse(decide({ method: 'POST', path: '/mcp',
        headers: { authorization: agent('invoices:pay') }, body: rpc(7, 'tools/call', { name: 'pay_invoice', arguments: { amount: 900 } }) }).body));
    });

    test('a tools/list answer shows the agent only the tools it may call', async () => {
      const { answer, reached } = await through({ method: 'POST', path: '/mcp',
        headers: { authorization: agent('invoices:read'), 'content-type': 'application/json' }, body: rpc(3, 'tools/list') });
      assert.equal(answer.status, 200);
      assert.ok(reached);
      assert.deepEqual(JSON.parse(answer.body).result.tools.map((t) => t.name), ['read_invoice']);
    });

    // Path spellings an edge runtime may hand over as they came: each is refused (400), or
    // reaches the origin only under the rule its canonical form meets — never a broader one.
    const spellings = [
      { path: '/invoices/42/%61pprove', method: 'POST', scope: 'invoices:read', status: 403 },
      { path: '/invoices/42/%61pprove', method: 'POST', scope: 'invoices:approve', rule: 'approve-invoice' },
      { path: '/invoices/42/APPROVE', method: 'POST', scope: 'invoices:read', status: 403 },
      { path: '/invoices/..;/admin/users', status: 400 },
      { path: '/invoices/42;x=1', status: 400 },
      { path: '//invoices/42', status: 400 },
      { path: '/invoices//42', status: 400 },
      { path: '/invoices/42%2fpay', status: 400 },
      { path: '/invoices/42%252fpay', status: 400 },
      { path: '/invoices/42%5c..%5cpay', status: 400 },
      // Dot segments: resolved by the runtime's URL parser before the Worker sees them, or refused.
      { path: '/admin/%2e%2e/invoices/43', rule: 'read-invoice', canonical: '/invoices/43' },
      { path: '/admin/../invoices/43', rule: 'read-invoice', canonical: '/invoices/43' },
      { path: '/invoices/43/%2E%2e/%2e%2e/admin/users', status: 403, canonical: '/admin/users' },
    ];
    for (const s of spellings) {
      test(`path ${s.method ?? 'GET'} ${s.path} (${s.scope ?? 'invoices:read'})`, async () => {
        const headers = { authorization: agent(s.scope ?? 'invoices:read') };
        const { answer, reached } = await through({ method: s.method ?? 'GET', path: s.path, headers });
        if (reached) {
          // What the origin got is what the gate decided on, and the core allows it under that rule.
          const core = decide({ method: reached.method, path: reached.path, headers });
          assert.equal(answer.status, 200);
          assert.equal(core.decision, 'allow', `${reached.path}: ${core.reason}`);
          assert.equal(reached.headers['x-agent-rule'], core.audit.rule);
          assert.equal(reached.headers['x-agent-rule'], s.rule);
          if (s.canonical) assert.equal(reached.path, s.canonical);
        } else {
          assert.equal(answer.status, s.status, answer.body);
          // The core refuses the spelling as sent, or (resolved by the runtime) its canonical form.
          const core = decide({ method: s.method ?? 'GET', path: s.canonical ?? s.path, headers });
          assert.equal(core.status, s.status, core.reason);
        }
      });
    }
  });
}
