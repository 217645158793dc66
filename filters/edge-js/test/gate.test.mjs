// The JS API: createGate / gate.evaluate, as an edge gateway uses them.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { checkPolicy, createGate } from '../node.js';
import { es256 } from './sign.mjs';

const shared = JSON.parse(readFileSync(new URL('../../../tests/cases/decisions.json', import.meta.url)));
const now = shared.now;
const claims = (extra = {}) => ({
  iss: 'https://idp.example.com', aud: 'https://api.example.com', sub: 'agent-7',
  iat: now - 60, exp: now + 240, scope: 'invoices:read', ...extra,
});
const bearer = (c) => `Bearer ${es256(shared.signing_key, c)}`;

test('a bad policy is refused with the JSON path of what is wrong', () => {
  const policy = structuredClone(shared.policy);
  policy.rules[0].match.methods = 'GET';
  assert.throws(() => createGate(policy), /rules\[0\]\.match\.methods/);
  assert.throws(() => createGate('{"providers": ['), /invalid policy/);
});

test('a policy that fetches keys needs a gate that fetches them (or is given them)', () => {
  const policy = structuredClone(shared.policy);
  delete policy.providers[0].jwks;
  policy.providers[0].jwks_uri = 'https://idp.example.com/keys.json';
  assert.throws(() => createGate(policy), /providers\[0\]\.jwks_uri: provider "corp-idp" fetches its keys: .*keys: 'fetch'/);
  assert.deepEqual(checkPolicy(policy).path, 'providers[0].jwks_uri');
  assert.equal(checkPolicy(policy, { keys: 'manual' }), null, 'no cluster needed at the edge');
  const gate = createGate(policy, { keys: 'manual' });
  const request = { method: 'GET', path: '/invoices/42', headers: { authorization: bearer(claims()) }, now };
  assert.equal(gate.evaluate(request).reason, 'keys_unavailable');
  assert.equal(gate.setKeys('corp-idp', shared.policy.providers[0].jwks, now), 1);
  assert.equal(gate.evaluate(request).decision, 'allow');
  assert.throws(() => gate.setKeys('nobody', shared.policy.providers[0].jwks, now), /no provider "nobody"/);
  assert.throws(() => gate.setKeys('corp-idp', { keys: [] }, now), /not set: no usable signing key/);
});

test('fetch Headers, the source address and the runtime clock are taken as they come', () => {
  const gate = createGate(JSON.stringify(shared.policy));
  const headers = new Headers({ Authorization: bearer(claims({ iat: Math.floor(Date.now() / 1000) - 5, exp: Math.floor(Date.now() / 1000) + 60 })), 'X-Request-Id': 'req-1' });
  const result = gate.evaluate({ method: 'GET', path: '/invoices/42?page=2', headers, sourceIp: '203.0.113.9' });
  assert.equal(result.decision, 'allow', JSON.stringify(result.audit));
  assert.equal(result.headers['x-agent-audit-id'], 'req-1');
  assert.equal(result.audit.source, '203.0.113.9');
  assert.equal(result.audit.path, '/invoices/42', 'the query stays out of the audit record');
  assert.ok(result.removeHeaders.includes('authorization'), 'the token stays at the edge');
});

test('a denial carries the answer: status, RFC 6750 challenge and body', () => {
  const gate = createGate(shared.policy);
  const expired = gate.evaluate({ method: 'GET', path: '/invoices/42', headers: { authorization: bearer(claims({ iat: now - 900, exp: now - 600 })) }, now });
  assert.equal(expired.status, 401);
  assert.match(expired.headers['www-authenticate'], /^Bearer error="invalid_token"/);
  assert.ok(expired.body.length > 0);
  assert.equal(expired.audit.reason, 'expired');
  const missing = gate.evaluate({ method: 'GET', path: '/invoices/42', now });
  assert.equal(missing.headers['www-authenticate'].startsWith('Bearer'), true);
  assert.equal(JSON.stringify(missing).includes('eyJ'), false, 'no token anywhere');
});

test('dry run forwards a request it would deny, and says why', () => {
  const gate = createGate({ ...shared.policy, mode: 'dry_run' });
  const result = gate.evaluate({ method: 'DELETE', path: '/invoices/42', headers: { authorization: bearer(claims()) }, now });
  assert.equal(result.decision, 'allow');
  assert.equal(result.dryRun, true);
  assert.equal(result.reason, 'no_matching_rule');
  assert.equal(result.audit.decision, 'deny');
});

test('a bad request is an error the caller sees, not a crash', () => {
  const gate = createGate(shared.policy);
  assert.throws(() => gate.evaluate({ path: '/invoices/42' }), /invalid request: missing field `method`/);
  const hostile = gate.evaluate({ method: 'GET', path: '/invoices/42', headers: { authorization: 'Bearer ' + 'a.'.repeat(5000) }, now });
  assert.equal(hostile.status, 401);
  for (const clock of [NaN, Infinity, -Infinity, '1800000000']) {
    assert.throws(() => gate.evaluate({ method: 'GET', path: '/invoices/42', now: clock }), /now must be a finite number/);
  }
  gate.free();
});

test('the edge sees raw paths: other spellings meet their rule or are refused', () => {
  const gate = createGate(shared.policy);
  const ok = gate.evaluate({ method: 'GET', path: '/INVOICES/%34%32/', headers: { authorization: bearer(claims()) }, now });
  assert.equal(ok.decision, 'allow', JSON.stringify(ok.audit));
  for (const path of ['/invoices/42;x', '/invoices/%2e%2e/42', '/invoices/%252e', '/invoices/42#x']) {
    const refused = gate.evaluate({ method: 'GET', path, headers: { authorization: bearer(claims()) }, now });
    assert.equal(refused.status, 400, path);
    assert.equal(refused.reason, 'non_canonical_path', path);
  }
  const lower = gate.evaluate({ method: 'get', path: '/invoices/42', headers: { authorization: bearer(claims()) }, now });
  assert.equal(lower.reason, 'non_canonical_method');
});

test('single use across isolates cannot be kept here: refused unless per isolate is asked for', () => {
  const policy = structuredClone(shared.policy);
  Object.assign(policy.providers[0], { single_use: true, max_lifetime_seconds: 600 });
  assert.throws(() => createGate(policy), /single_use_scope/);
  policy.providers[0].single_use_scope = 'worker';
  const gate = createGate(policy);
  const token = bearer(claims({ jti: 'once' }));
  assert.equal(gate.evaluate({ method: 'GET', path: '/invoices/42', headers: { authorization: token }, now }).decision, 'allow');
  assert.equal(gate.evaluate({ method: 'GET', path: '/invoices/42', headers: { authorization: token }, now }).reason, 'replayed');
});

test('explain: each requirement of the matched rule and whether it held, or why no rule was reached', () => {
  const gate = createGate(shared.policy);
  const pay = (scope, identifier) => gate.explain({ method: 'POST', path: '/invoices/42/pay', now,
    headers: { authorization: bearer(claims({ scope, authorization_details: [{ type: 'invoice_processing', actions: ['pay'], identifier }] })) } });
  assert.deepEqual(pay('invoices:pay', '42'), { checks: [
    { requirement: 'scopes', held: true, reason: null },
    { requirement: 'task', held: true, reason: null },
  ], reason: null });
  assert.deepEqual(pay('invoices:read', '43').checks.map((c) => [c.requirement, c.held, c.reason]),
    [['scopes', false, 'insufficient_scope'], ['task', false, 'task_mismatch']]);
  assert.deepEqual(gate.explain({ method: 'GET', path: '/invoices/42', now }), { checks: null, reason: 'missing_token' });
  assert.equal(gate.explain({ method: 'GET', path: '/invoices/..;/x', now, headers: { authorization: bearer(claims()) } }).reason,
    'non_canonical_path');
});
