// Keys fetched at the edge (keys.js driving the core's KeyRecord through the wasm), with a
// scripted identity provider and a clock the test moves: the schedule, rotation, the
// rate-limited refetch on an unknown kid, stale keys through an outage, discovery.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { generateKeyPairSync } from 'node:crypto';
import { createGate } from '../node.js';
import { es256 } from './sign.mjs';

const shared = JSON.parse(readFileSync(new URL('../../../tests/cases/decisions.json', import.meta.url)));
const ISSUER = 'https://idp.example.com';

function signingKey(kid) {
  const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const jwk = { ...privateKey.export({ format: 'jwk' }), kid };
  const { d: _, ...pub } = jwk;
  return { jwk, pub };
}
const [A, B, C] = ['a', 'b', 'c'].map(signingKey);

/** An identity provider that answers from `state`, and logs what was asked. */
function idp(state) {
  const asked = [];
  const fetch = async (url, init) => {
    asked.push(url);
    if (state.down) throw new TypeError('connection refused');
    if (state.hang) return new Promise((_, reject) => init.signal.addEventListener('abort', () => reject(init.signal.reason)));
    if (state.status) return new Response('busy', { status: state.status });
    if (url.startsWith(`${ISSUER}/.well-known/`)) {
      return Response.json({ issuer: state.discoveryIssuer ?? ISSUER, jwks_uri: `${ISSUER}/discovered/keys` });
    }
    return Response.json({ keys: state.keys.map((k) => k.pub) });
  };
  return { fetch, asked };
}

function setup({ discovery = false, fetch = {} } = {}) {
  const clock = { now: shared.now };
  const state = { keys: [A] };
  const server = idp(state);
  const policy = structuredClone(shared.policy);
  const provider = policy.providers[0];
  delete provider.jwks;
  if (discovery) provider.discovery = true;
  else provider.jwks_uri = `${ISSUER}/keys.json`;
  provider.jwks_fetch = { refresh_seconds: 300, min_refetch_seconds: 30, max_stale_seconds: 3600, ...fetch };
  const errors = [];
  const gate = createGate(policy, {
    keys: 'fetch', fetch: server.fetch, clock: () => clock.now, onKeyError: (e) => errors.push(e.error),
  });
  const background = [];
  const decide = async (key) => {
    const claims = { iss: ISSUER, aud: 'https://api.example.com', sub: 'agent-7', iat: clock.now - 5, exp: clock.now + 120, scope: 'invoices:read' };
    const request = { method: 'GET', path: '/invoices/42', headers: { authorization: `Bearer ${es256(key.jwk, claims)}` } };
    const d = await gate.decide(request, { waitUntil: (p) => background.push(p) });
    await Promise.all(background.splice(0));
    return d.reason ?? d.decision;
  };
  return { clock, state, server, gate, decide, errors };
}

test('keys are fetched before the first decision, then refreshed on schedule', async () => {
  const { clock, server, gate, decide } = setup();
  assert.equal(await decide(A), 'allow');
  assert.deepEqual(server.asked, [`${ISSUER}/keys.json`]);
  clock.now += 299;
  assert.equal(await decide(A), 'allow');
  assert.equal(server.asked.length, 1, 'not due before refresh_seconds');
  clock.now += 1;
  assert.equal(await decide(A), 'allow');
  assert.equal(server.asked.length, 2, 'due at refresh_seconds');
  const [status] = gate.keyStatus();
  assert.equal(status.provider, 'corp-idp');
  assert.equal(status.keys, 1);
  assert.equal(status.fetchedAt, clock.now);
  assert.equal(status.usableUntil, clock.now + 3600);
});

test('a rotated key is fetched when a token names it, at most once per min_refetch_seconds', async () => {
  const { clock, state, server, decide } = setup();
  assert.equal(await decide(A), 'allow');
  state.keys = [B];
  assert.equal(await decide(B), 'allow', 'unknown kid: refetched and decided again');
  assert.equal(server.asked.length, 2);
  assert.equal(await decide(A), 'unknown_kid', 'the retired key verifies nothing at once');
  assert.equal(await decide(C), 'unknown_kid');
  assert.equal(server.asked.length, 2, 'no refetch within min_refetch_seconds');
  clock.now += 30;
  assert.equal(await decide(C), 'unknown_kid');
  assert.equal(server.asked.length, 3, 'refetched after min_refetch_seconds');
});

test('stale keys serve through an outage up to max_stale_seconds, then the provider recovers', async () => {
  const { clock, state, server, gate, decide, errors } = setup();
  assert.equal(await decide(A), 'allow');
  const fetchedAt = clock.now;
  state.status = 503;
  clock.now += 300;
  assert.equal(await decide(A), 'allow', 'the refresh failed: the last good keys still verify');
  assert.equal(server.asked.length, 2);
  assert.equal(gate.keyStatus()[0].failures, 1);
  assert.match(errors.at(-1), /answered 503/);
  state.status = 0;
  state.down = true;
  clock.now = fetchedAt + 3599;
  assert.equal(await decide(A), 'allow');
  assert.match(errors.at(-1), /connection refused/);
  clock.now = fetchedAt + 3600;
  assert.equal(await decide(A), 'keys_unavailable', 'past max_stale_seconds');
  state.down = false;
  clock.now += 60;
  assert.equal(await decide(A), 'allow', 'recovered');
  assert.equal(gate.keyStatus()[0].failures, 0);
});

test('discovery finds the JWKS, and a discovery document for another issuer is refused', async () => {
  const { server, gate, decide } = setup({ discovery: true });
  assert.equal(await decide(A), 'allow');
  assert.deepEqual(server.asked, [`${ISSUER}/.well-known/openid-configuration`, `${ISSUER}/discovered/keys`]);
  assert.equal(gate.keyStatus()[0].discoveredUri, `${ISSUER}/discovered/keys`);
  const other = setup({ discovery: true });
  other.state.discoveryIssuer = 'https://evil.example.com';
  assert.equal(await other.decide(A), 'keys_unavailable');
  assert.match(other.errors.join('\n'), /for issuer Some\("https:\/\/evil.example.com"\)/);
  assert.deepEqual(other.server.asked, [
    `${ISSUER}/.well-known/openid-configuration`,
    `${ISSUER}/.well-known/oauth-authorization-server`,
  ], 'RFC 8414 tried after OpenID discovery, and the JWKS of neither fetched');
});

test('a fetch that hangs is abandoned after timeout_ms; a request waits at most wait_ms', async () => {
  const { state, decide, errors } = setup({ fetch: { timeout_ms: 100, wait_ms: 0 } });
  state.hang = true;
  assert.equal(await decide(A), 'keys_unavailable', 'answered without waiting');
  assert.match(errors.at(-1), /no answer within 100 ms/);
});

test('setKeys installs a key set the caller fetched; fetched keys replace it later', async () => {
  const { clock, gate, decide } = setup();
  assert.equal(gate.setKeys('corp-idp', { keys: [B.pub] }), 1);
  assert.equal(await decide(B), 'allow');
  clock.now += 300;
  assert.equal(await decide(A), 'allow', 'the scheduled refresh brought the provider\'s keys');
  assert.equal(await decide(B), 'unknown_kid');
});
