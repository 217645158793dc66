// A test Worker for keys fetched in workerd: the gate decides each request and answers with
// its decision; /__clock moves this isolate's clock (so the test needs no sleeping) and
// /__keys shows (POST: refreshes, then shows) the key state. Test only: never deploy this.
import { createGate } from '@agentgate/edge';

let gate;
let offset = 0;

export default {
  async fetch(request, env, ctx) {
    gate ??= createGate(env.POLICY, { keys: 'fetch', clock: () => Date.now() / 1000 + offset, onKeyError: () => {} });
    const url = new URL(request.url);
    if (url.pathname === '/__clock') {
      offset = Number(url.searchParams.get('offset'));
      return Response.json({ now: Date.now() / 1000 + offset });
    }
    if (url.pathname === '/__keys') {
      if (request.method === 'POST') await gate.refreshKeys();
      return Response.json(gate.keyStatus());
    }
    const decision = await gate.decide(
      { method: request.method, path: url.pathname + url.search, headers: request.headers },
      { waitUntil: (promise) => ctx.waitUntil(promise) },
    );
    return Response.json({ decision: decision.decision, reason: decision.reason, status: decision.status });
  },
};
