// MCP through the edge build: the body decides, and a tool list is filtered per agent.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { createGate } from '../node.js';
import { es256 } from './sign.mjs';

const shared = JSON.parse(readFileSync(new URL('../../../tests/cases/decisions.json', import.meta.url)));
const now = shared.now;
const policy = {
  ...shared.policy,
  rules: [
    { name: 'pay', match: { methods: ['POST'], path: '/mcp', mcp: { tool: 'pay_invoice' } },
      require: { scopes: ['invoices:pay'], arguments: [{ path: 'amount', lte: 500 }] } },
    { name: 'read', match: { methods: ['POST'], path: '/mcp', mcp: { tool: 'read_*' } }, require: { scopes: ['invoices:read'] } },
    { name: 'list', match: { methods: ['POST'], path: '/mcp', mcp: { method: 'tools/list' } } },
  ],
};
const bearer = (scope) => `Bearer ${es256(shared.signing_key, {
  iss: 'https://idp.example.com', aud: 'https://api.example.com', sub: 'agent-7', iat: now - 5, exp: now + 60, scope,
})}`;
const rpc = (id, method, params) => JSON.stringify({ jsonrpc: '2.0', id, method, params });

test('a tool call is decided on its body; the body is read only on MCP routes', () => {
  const gate = createGate(policy);
  assert.equal(gate.bodyLimit('POST', '/mcp'), 1048576);
  assert.equal(gate.bodyLimit('GET', '/invoices/1'), undefined);
  const call = (amount) => gate.evaluate({
    method: 'POST', path: '/mcp', now, headers: { authorization: bearer('invoices:pay') },
    body: rpc(7, 'tools/call', { name: 'pay_invoice', arguments: { amount } }),
  });
  assert.equal(call(100).decision, 'allow');
  const over = call(900);
  assert.equal(over.status, 403);
  assert.equal(over.reason, 'argument_mismatch');
  assert.deepEqual(JSON.parse(over.body).id, 7, 'a JSON-RPC error for the request id');
  const dup = gate.evaluate({ method: 'POST', path: '/mcp', now, headers: { authorization: bearer('invoices:pay') },
    body: '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_x","name":"pay_invoice"}}' });
  assert.equal(dup.status, 400);
  assert.equal(JSON.parse(dup.body).error.code, -32700);
});

test('tools/list shows each agent only its tools', () => {
  const gate = createGate(policy);
  const listed = gate.evaluate({ method: 'POST', path: '/mcp', now, headers: { authorization: bearer('invoices:read') },
    body: rpc(2, 'tools/list') });
  assert.equal(listed.decision, 'allow');
  assert.equal(typeof listed.filterList, 'function');
  const upstream = JSON.stringify({ jsonrpc: '2.0', id: 2, result: { tools: [{ name: 'pay_invoice' }, { name: 'read_invoice' }] } });
  const filtered = JSON.parse(listed.filterList(upstream, 'application/json'));
  assert.deepEqual(filtered.result.tools.map((t) => t.name), ['read_invoice']);
  const sse = `event: message\r\ndata: ${upstream}\r\n\r\n`;
  const again = gate.evaluate({ method: 'POST', path: '/mcp', now, headers: { authorization: bearer('invoices:read') },
    body: rpc(3, 'tools/list') });
  const stream = again.filterList(sse, 'text/event-stream');
  assert.ok(stream.includes('read_invoice') && !stream.includes('pay_invoice'), stream);
  assert.throws(() => again.filterList(upstream), /unknown or expired list filter/, 'a handle filters once');
});
