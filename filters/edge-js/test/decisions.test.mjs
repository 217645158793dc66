// The decision cases the core's tests run (tests/cases/decisions.json), through the wasm
// build: the same policy decides the same way in a JS edge runtime.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { createGate } from '../node.js';
import { es256 } from './sign.mjs';

const shared = JSON.parse(readFileSync(new URL('../../../tests/cases/decisions.json', import.meta.url)));
const gate = createGate(shared.policy);

for (const c of shared.cases) {
  test(c.name, () => {
    const headers = { ...(c.request.headers ?? {}) };
    if (c.claims) headers.authorization = `Bearer ${es256(shared.signing_key, c.claims, { tamper: c.tamper })}`;
    const result = gate.evaluate({ ...c.request, headers, now: shared.now });
    assert.equal(result.decision, c.expect.decision, JSON.stringify(result.audit));
    assert.equal(result.reason, c.expect.reason ?? null);
    assert.equal(result.audit.decision, c.expect.decision);
    if (c.expect.rule) assert.equal(result.audit.rule, c.expect.rule);
    if (c.expect.decision === 'deny') {
      assert.equal(result.status, c.expect.status);
    } else {
      assert.equal(result.status, null);
      for (const [name, value] of Object.entries(c.expect.headers ?? {})) assert.equal(result.headers[name], value, name);
      for (const name of c.expect.remove ?? []) assert.ok(result.removeHeaders.includes(name), `removes ${name}`);
    }
  });
}
