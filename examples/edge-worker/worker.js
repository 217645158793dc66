// A Cloudflare Worker (or workerd) that puts agentgate in front of an origin.
// Bindings: POLICY (the policy, JSON), ORIGIN_URL (scheme://host[:port] of the origin).
import { createGate } from '@agentgate/edge';
import { gateProxy } from './gate-proxy.js';

// One gate per isolate: fetched keys, single-use jtis and rate limits live here.
let handle;

export default {
  async fetch(request, env, ctx) {
    // keys: 'fetch' — providers with jwks_uri or discovery are fetched with this isolate's
    // fetch, on the provider's schedule; inline keys work as they are.
    handle ??= gateProxy(createGate(env.POLICY, { keys: 'fetch' }), { origin: env.ORIGIN_URL });
    return handle(request, {
      // Set by Cloudflare's edge. workerd on its own passes on whatever a client wrote there:
      // behind another proxy, take the address from what that proxy sets (for source_cidrs).
      clientAddress: request.headers.get('cf-connecting-ip') ?? undefined,
      waitUntil: (promise) => ctx.waitUntil(promise),
    });
  },
};
