// The same gate in front of an origin, as a Deno server.
// deno run --config deno.json --allow-net --allow-env --allow-read deno.js
// Environment: AGENTGATE_POLICY (a policy file), ORIGIN_URL, HOST (default 127.0.0.1), PORT (default 8787).
import { createGate } from '@agentgate/edge';
import { gateProxy } from './gate-proxy.js';

const policy = await Deno.readTextFile(Deno.env.get('AGENTGATE_POLICY') ?? 'policy.json');
const handle = gateProxy(createGate(policy, { keys: 'fetch' }), { origin: Deno.env.get('ORIGIN_URL') });

Deno.serve(
  {
    hostname: Deno.env.get('HOST') ?? '127.0.0.1',
    port: Number(Deno.env.get('PORT') ?? 8787),
    onListen: ({ hostname, port }) => console.error(`agentgate edge example on http://${hostname}:${port}`),
  },
  (request, info) => handle(request, { clientAddress: info.remoteAddr.hostname }),
);
