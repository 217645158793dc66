// Keys that rotate, at the edge: the providers of a policy with `jwks_uri` or `discovery`
// fetch their key sets with the runtime's `fetch`. The core decides everything about the
// schedule (agentgate::jwks::KeyRecord through the wasm: when a refresh is due, the rate
// limit on refetches for an unknown `kid`, backoff after failures, how long stale keys stay
// usable); this file only does the I/O, one fetch per provider at a time in this isolate.

/** Drives the key fetches of one gate (`createGate(policy, { keys: 'fetch' })` makes one). */
export class KeyFetcher {
  /**
   * @param gate the wasm Gate
   * @param options.fetch the runtime's fetch
   * @param options.clock Unix seconds
   * @param options.onError called with `{provider, error}` when a fetch fails
   */
  constructor(gate, { fetch, clock, onError }) {
    if (typeof fetch !== 'function') throw new TypeError('agentgate: keys: fetch needs a fetch function');
    this.gate = gate;
    this.fetch = fetch;
    this.clock = clock;
    this.onError = onError ?? ((failure) => console.warn(`agentgate: keys of ${failure.provider}: ${failure.error}`));
    /** provider name → the promise of its fetch in flight */
    this.inflight = new Map();
    this.waitMs = new Map(JSON.parse(gate.keyStatus()).map((s) => [s.provider, s.waitMs]));
  }

  /** Starts the fetches due at `now` (only `forced`'s, early, when given); their promises. */
  start(now, forced) {
    const fetches = JSON.parse(this.gate.keyFetches(now, forced));
    return fetches.map((spec) => {
      const run = this.run(spec).finally(() => {
        if (this.inflight.get(spec.provider) === run) this.inflight.delete(spec.provider);
      });
      this.inflight.set(spec.provider, run);
      return run;
    });
  }

  /** One provider's fetch, following discovery to the JWKS; never rejects. */
  async run(spec) {
    let next = spec;
    while (next) {
      const answer = await this.get(next);
      const out = JSON.parse(this.gate.keyResponse(next.provider, next.stage, answer.status ?? 0,
        answer.body ?? new Uint8Array(0), answer.error, this.clock(), Math.random()));
      if (out.error != null) this.onError({ provider: next.provider, error: out.error });
      next = out.fetch;
    }
  }

  /** GET `url` within `timeoutMs`, reading at most `maxBytes` + 1 bytes of the body. */
  async get({ url, timeoutMs, maxBytes }) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs);
    try {
      // Redirects are not followed, as in Envoy: the provider's keys are where the policy says.
      const response = await this.fetch(url, { headers: { accept: 'application/json' }, redirect: 'manual', signal: controller.signal });
      return { status: response.status, body: await readAtMost(response, maxBytes + 1) };
    } catch (e) {
      return { error: `${url}: ${e?.message ?? e}` };
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * Decides `request` (with `evaluate`) after starting the refreshes that are due; a token
   * whose provider has no key for it (`unknown_kid`, `keys_unavailable`) waits up to the
   * provider's `wait_ms` for a fetch (one in flight, or an early one the core allows) and is
   * decided again. `waitUntil` (a Worker's `ctx.waitUntil`) keeps fetches alive after the
   * response.
   */
  async decide(request, evaluate, waitUntil) {
    const now = request.now ?? this.clock();
    const started = this.start(now);
    if (waitUntil) for (const run of started) waitUntil(run);
    const decision = evaluate({ ...request, now });
    const provider = decision.awaitingKeys;
    if (provider == null) return decision;
    let pending = this.inflight.get(provider);
    if (!pending) {
      const [forced] = this.start(now, provider);
      if (forced && waitUntil) waitUntil(forced);
      pending = forced;
    }
    if (!pending || !(await settlesWithin(pending, this.waitMs.get(provider) ?? 0))) return decision;
    return evaluate({ ...request, now: request.now ?? this.clock() });
  }

  /** Runs the fetches that are due now and waits for them and those in flight (a cron job, a health check). */
  async refresh() {
    this.start(this.clock());
    await Promise.all(this.inflight.values());
  }
}

async function readAtMost(response, limit) {
  if (!response.body) return new Uint8Array(await response.arrayBuffer()).subarray(0, limit);
  const reader = response.body.getReader();
  const chunks = [];
  let size = 0;
  while (size < limit) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    size += value.byteLength;
  }
  if (size >= limit) await reader.cancel().catch(() => {});
  const body = new Uint8Array(Math.min(size, limit));
  let at = 0;
  for (const chunk of chunks) {
    const part = chunk.subarray(0, body.length - at);
    body.set(part, at);
    at += part.length;
  }
  return body;
}

async function settlesWithin(promise, ms) {
  let timer;
  const timeout = new Promise((resolve) => { timer = setTimeout(() => resolve(false), ms); });
  try {
    return await Promise.race([promise.then(() => true), timeout]);
  } finally {
    clearTimeout(timer);
  }
}
