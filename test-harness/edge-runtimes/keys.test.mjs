// Keys that rotate, fetched inside workerd: a local identity provider that rotates its keys,
// fails (500, reset connections) and recovers; the Worker fetches its JWKS (directly, and by
// discovery) with workerd's own fetch. The Worker's clock is moved by the test, not waited for.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { generateKeyPairSync } from 'node:crypto';
import path from 'node:path';
import { es256 } from '../../filters/edge-js/test/sign.mjs';
import { ROOT, send, serve, startWorkerd } from './runtimes.mjs';

const shared = JSON.parse(readFileSync(path.join(ROOT, 'tests/cases/decisions.json'), 'utf8'));

function signingKey(kid) {
  const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const jwk = { ...privateKey.export({ format: 'jwk' }), kid };
  const { d: _, ...pub } = jwk;
  return { jwk, pub };
}
const [A, B, C, D] = ['a', 'b', 'c', 'd'].map(signingKey);

// The identity provider: its keys, how it fails, and what it was asked.
const idp = { keys: [A], tenantKeys: [D], mode: 'ok', asked: [] };
let server;
let worker;
let issuer;

before(async () => {
  server = await serve((req) => {
    idp.asked.push(req.url);
    if (idp.mode === 'reset') return { destroy: true };
    if (idp.mode === 'error') return { status: 500, body: 'internal error' };
    if (req.url === '/tenant/.well-known/openid-configuration') {
      return { body: JSON.stringify({ issuer: `${server.url}/tenant`, jwks_uri: `${server.url}/tenant/keys` }) };
    }
    if (req.url === '/tenant/keys') return { body: JSON.stringify({ keys: idp.tenantKeys.map((k) => k.pub) }) };
    if (req.url === '/keys.json') return { body: JSON.stringify({ keys: idp.keys.map((k) => k.pub) }) };
    return { status: 404 };
  });
  issuer = server.url;
  const policy = structuredClone(shared.policy);
  const fetch = { refresh_seconds: 300, min_refetch_seconds: 30, max_stale_seconds: 3600, timeout_ms: 2000 };
  policy.providers = [
    { name: 'rotating', issuer, audiences: ['https://api.example.com'], algorithms: ['ES256'],
      jwks_uri: `${server.url}/keys.json`, jwks_fetch: fetch },
    { name: 'discovered', issuer: `${server.url}/tenant`, audiences: ['https://api.example.com'], algorithms: ['ES256'],
      discovery: true, jwks_fetch: fetch },
  ];
  worker = await startWorkerd({ name: 'keys-worker', config: path.join(ROOT, 'test-harness/edge-runtimes/keys-worker.capnp'), policy });
});

after(async () => {
  if (process.env.EDGE_TEST_LOG) console.error(worker?.output());
  await worker?.stop();
  await server?.close();
});

let offset = 0;
const clock = async (seconds) => {
  offset = seconds;
  assert.equal((await send(worker.port, { path: `/__clock?offset=${seconds}` })).status, 200);
};
const now = () => Math.floor(Date.now() / 1000) + offset;
const status = async (refresh = false) =>
  JSON.parse((await send(worker.port, { method: refresh ? 'POST' : 'GET', path: '/__keys' })).body);
/** The Worker's decision for a token signed with `key` (by `iss`), as `allow` or the reason. */
async function decide(key, iss = issuer) {
  const claims = { iss, aud: 'https://api.example.com', sub: 'agent-7', iat: now() - 5, exp: now() + 120, scope: 'invoices:read' };
  const answer = await send(worker.port, { path: '/invoices/42', headers: { authorization: `Bearer ${es256(key.jwk, claims)}` } });
  assert.equal(answer.status, 200, answer.body);
  const decision = JSON.parse(answer.body);
  return decision.reason ?? decision.decision;
}
const jwksFetches = () => idp.asked.filter((url) => url === '/keys.json').length;

test('the keys rotate, fail and recover at the edge, on the provider\'s schedule', async (t) => {
  await t.test('the first request waits for the first fetch', async () => {
    assert.equal(await decide(A), 'allow');
    assert.equal(jwksFetches(), 1);
    assert.equal(await decide(A), 'allow');
    assert.equal(jwksFetches(), 1, 'cached in the isolate');
  });

  await t.test('a token with a new kid makes the Worker refetch, at most once per min_refetch_seconds', async () => {
    idp.keys = [B];
    assert.equal(await decide(B), 'allow');
    assert.equal(jwksFetches(), 2);
    assert.equal(await decide(A), 'unknown_kid', 'the retired key is gone at once');
    assert.equal(await decide(C), 'unknown_kid');
    assert.equal(jwksFetches(), 2, 'rate-limited');
    await clock(31);
    assert.equal(await decide(C), 'unknown_kid');
    assert.equal(jwksFetches(), 3, 'refetched once min_refetch_seconds passed');
  });

  await t.test('through an outage the last good keys serve until max_stale_seconds', async () => {
    const [before] = await status();
    idp.mode = 'error';
    await clock(offset + 300);
    const [failed] = await status(true);
    assert.equal(jwksFetches(), 4, 'the scheduled refresh ran');
    assert.equal(failed.failures, 1);
    assert.match(failed.lastError, /answered 500/);
    assert.equal(failed.fetchedAt, before.fetchedAt, 'the last good keys stay');
    assert.equal(await decide(B), 'allow', 'stale keys still verify');
    idp.mode = 'reset';
    await clock(failed.usableUntil - Math.floor(Date.now() / 1000) - 2);
    assert.equal(await decide(B), 'allow', 'two seconds before max_stale_seconds');
    await clock(offset + 3);
    assert.equal(await decide(B), 'keys_unavailable', 'past max_stale_seconds');
    const [down] = await status();
    assert.ok(down.failures >= 2);
    assert.ok(down.lastError.length > 0, 'a reset connection is a failure too');
  });

  await t.test('the provider recovers: its keys are back', async () => {
    idp.mode = 'ok';
    await clock(offset + 61);
    assert.equal(await decide(B), 'allow');
    const [recovered] = await status();
    assert.equal(recovered.failures, 0);
    assert.equal(recovered.lastError, null);
  });

  await t.test('discovery finds the JWKS of a provider (fetched on the same schedule all along)', async () => {
    assert.equal(await decide(D, `${issuer}/tenant`), 'allow');
    const tenant = idp.asked.filter((url) => url.startsWith('/tenant'));
    assert.deepEqual(tenant.slice(0, 3), ['/tenant/.well-known/openid-configuration', '/tenant/keys', '/tenant/keys'],
      'discovered once, then refreshed at the JWKS URL it found');
    const discovered = (await status()).find((s) => s.provider === 'discovered');
    assert.equal(discovered.discoveredUri, `${issuer}/tenant/keys`);
  });
});
