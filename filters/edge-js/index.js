// agentgate for JS edge runtimes. Load the wasm once (`initialize`, or `initializeSync` with
// the module's bytes or a compiled WebAssembly.Module), then `createGate(policy)` and
// `gate.evaluate(request)` on every request. The Node entry (`node.js`) loads it for you.
import init, { initSync, Gate, policyError } from './pkg/agentgate_edge.js';
import { KeyFetcher } from './keys.js';

let ready = false;

/** Loads the wasm (a URL, Response, bytes or WebAssembly.Module; default: next to this file). */
export async function initialize(source) {
  if (!ready) {
    await init(source === undefined ? undefined : { module_or_path: source });
    ready = true;
  }
}

/** Loads the wasm from bytes or a compiled WebAssembly.Module (Workers import the module). */
export function initializeSync(module) {
  if (!ready) {
    initSync({ module });
    ready = true;
  }
}

const KEY_MODES = ['inline', 'fetch', 'manual'];

/**
 * Compiles a policy (JSON text or object); throws with the JSON path of what is wrong.
 * `options.keys`: `inline` (default: every provider has `jwks`), `fetch` (providers with
 * `jwks_uri` or `discovery` are fetched with `options.fetch`, default the runtime's), or
 * `manual` (their keys come only through `gate.setKeys`). `options.clock`: Unix seconds.
 */
export function createGate(policy, options = {}) {
  if (!ready) {
    throw new Error('agentgate: call initialize() first (the Node entry does it on import)');
  }
  const keys = options.keys ?? 'inline';
  if (!KEY_MODES.includes(keys)) throw new TypeError(`agentgate: keys must be one of ${KEY_MODES.join(', ')}`);
  const clock = options.clock ?? (() => Date.now() / 1000);
  const gate = new Gate(policyText(policy), keys !== 'inline');
  const fetcher = keys === 'fetch'
    ? new KeyFetcher(gate, { fetch: options.fetch ?? globalThis.fetch?.bind(globalThis), clock, onError: options.onKeyError })
    : null;
  // The request as the wasm takes it: headers as an object, the clock filled in.
  const wire = (request) => {
    const now = request.now ?? clock();
    // JSON would turn NaN or Infinity into null: refuse it here, with the reason.
    if (typeof now !== 'number' || !Number.isFinite(now)) {
      throw new Error('invalid request: now must be a finite number of Unix seconds');
    }
    return JSON.stringify({ ...request, headers: headerObject(request.headers), now });
  };
  const evaluate = (request) => {
    const result = JSON.parse(gate.evaluateJson(wire(request)));
    if (result.listFilter != null) {
      const handle = result.listFilter;
      // The caller passes the upstream's list response through this before answering.
      result.filterList = (body, contentType = 'application/json') =>
        gate.filterList(handle, body, String(contentType).toLowerCase().startsWith('text/event-stream'));
    }
    return result;
  };
  return {
    /** Decides with the keys this isolate holds now; fetches nothing. */
    evaluate,
    /**
     * Decides, fetching keys first where the policy says they are due, and waiting (up to
     * `wait_ms`) for new keys when the token names one this isolate does not have.
     * `waitUntil`: a Worker's `ctx.waitUntil`, so that refreshes outlive the response.
     */
    async decide(request, { waitUntil } = {}) {
      return fetcher ? fetcher.decide(request, evaluate, waitUntil) : evaluate(request);
    },
    /** `agentgate eval`'s explanation: each requirement of the matched rule and whether it held. */
    explain(request) {
      return JSON.parse(gate.explainJson(wire(request)));
    },
    /** Bytes of body to read for this request (an MCP route), or undefined: header-only. */
    bodyLimit(method, path) {
      return gate.bodyLimit(method, path);
    },
    /** Installs a provider's JWKS (object or JSON text), as if fetched now; returns the key count. */
    setKeys(provider, jwks, now = clock()) {
      return gate.setKeys(provider, typeof jwks === 'string' ? jwks : JSON.stringify(jwks), now);
    },
    /** Runs the key fetches that are due and waits for them and those in flight (`keys: 'fetch'`). */
    async refreshKeys() {
      if (fetcher) await fetcher.refresh();
    },
    /** Per provider that fetches its keys: version, key count, fetchedAt, usableUntil, failures, lastError. */
    keyStatus() {
      return JSON.parse(gate.keyStatus());
    },
    free() {
      gate.free();
    },
  };
}

/** What is wrong with a policy, `{path, message}` (path: JSON path), or null when it compiles. */
export function checkPolicy(policy, { keys = 'inline' } = {}) {
  if (!ready) throw new Error('agentgate: call initialize() first');
  let text;
  try {
    text = policyText(policy);
  } catch (e) {
    return { path: '', message: String(e?.message ?? e) };
  }
  const error = policyError(text, keys !== 'inline');
  return error == null ? null : JSON.parse(error);
}

function policyText(policy) {
  return typeof policy === 'string' ? policy : JSON.stringify(policy);
}

// Fetch's Headers or a Map, an array of pairs, or a plain object.
function headerObject(headers) {
  if (!headers) return {};
  if (Array.isArray(headers)) return Object.fromEntries(headers);
  if (typeof headers.entries === 'function') return Object.fromEntries(headers.entries());
  return headers;
}
