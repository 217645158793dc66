// agentgate in front of an origin, for any runtime with fetch's Request and Response
// (Cloudflare Workers / workerd, Deno, Node): allowed requests go to the origin with the
// gate's audit headers and without the token; denied ones are answered here with the gate's
// status, headers and body. MCP routes are decided on their body; a tool list is filtered
// to what the agent may call.

/**
 * @param gate `createGate(policy, ...)` of @agentgate/edge
 * @param options.origin the origin's scheme://host[:port]
 * @param options.fetch the runtime's fetch (default: the global one)
 * @param options.log where each decision's audit record goes (default: console.log)
 */
export function gateProxy(gate, { origin, fetch = globalThis.fetch.bind(globalThis), log = console.log }) {
  const upstream = new URL(origin).origin;
  return async function handle(request, { clientAddress, waitUntil } = {}) {
    // The runtime has parsed the request target already (WHATWG URL: dot segments resolved);
    // the gate decides on exactly the path the origin receives, and refuses what is still
    // ambiguous (`//`, `;` parameters, encoded `/`, ...).
    const url = new URL(request.url);
    let path = url.pathname + url.search;
    const limit = gate.bodyLimit(request.method, path);
    // An MCP route is decided on its JSON-RPC body: read at most one byte over the limit (the
    // gate refuses a larger body).
    const body = limit === undefined ? undefined : await readText(request, limit + 1);
    const decision = await gate.decide(
      { method: request.method, path, headers: request.headers, sourceIp: clientAddress, body },
      { waitUntil },
    );
    log(JSON.stringify(decision.audit));
    if (decision.decision === 'deny') {
      return new Response(decision.body, { status: decision.status, headers: decision.headers });
    }
    const headers = new Headers(request.headers);
    // The runtime's fetch sets these for what is sent (an MCP body is sent as the gate read it).
    for (const name of ['host', 'content-length', 'transfer-encoding']) headers.delete(name);
    for (const name of decision.removeHeaders) headers.delete(name);
    for (const [name, value] of Object.entries(decision.headers)) {
      // A token in the query is taken out of the path too (`:path`).
      if (name === ':path') path = value;
      else headers.set(name, value);
    }
    const forwarded = body ?? (['GET', 'HEAD'].includes(request.method) ? undefined : await request.arrayBuffer());
    const response = await fetch(upstream + path, { method: request.method, headers, body: forwarded, redirect: 'manual' });
    if (!decision.filterList) return response;
    // tools/list (prompts, resources): only what this agent may call reaches it.
    const filtered = decision.filterList(await response.text(), response.headers.get('content-type') ?? '');
    const answer = new Headers(response.headers);
    answer.delete('content-length');
    return new Response(filtered, { status: response.status, headers: answer });
  };
}

/** The body as text, at most `limit` bytes of it. */
async function readText(request, limit) {
  if (!request.body) return '';
  const reader = request.body.getReader();
  const chunks = [];
  let size = 0;
  while (size < limit) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    size += value.byteLength;
  }
  if (size >= limit) await reader.cancel().catch(() => {});
  const bytes = new Uint8Array(Math.min(size, limit));
  let at = 0;
  for (const chunk of chunks) {
    const part = chunk.subarray(0, bytes.length - at);
    bytes.set(part, at);
    at += part.length;
  }
  return new TextDecoder().decode(bytes);
}
