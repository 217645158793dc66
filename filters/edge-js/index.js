// agentgate for JS edge runtimes. Load the wasm once (`initialize`, or `initializeSync` with
// the module's bytes or a compiled WebAssembly.Module), then `createGate(policy)` and
// `gate.evaluate(request)` on every request. The Node entry (`node.js`) loads it for you.
import init, { initSync, Gate } from './pkg/agentgate_edge.js';

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

/** Compiles a policy (JSON text or object); throws with the JSON path of what is wrong. */
export function createGate(policy) {
  if (!ready) {
    throw new Error('agentgate: call initialize() first (the Node entry does it on import)');
  }
  const gate = new Gate(typeof policy === 'string' ? policy : JSON.stringify(policy));
  return {
    evaluate(request) {
      const headers = headerObject(request.headers);
      const now = request.now ?? Date.now() / 1000;
      // JSON would turn NaN or Infinity into null: refuse it here, with the reason.
      if (typeof now !== 'number' || !Number.isFinite(now)) {
        throw new Error('invalid request: now must be a finite number of Unix seconds');
      }
      const result = JSON.parse(gate.evaluateJson(JSON.stringify({ ...request, headers, now })));
      if (result.listFilter != null) {
        const handle = result.listFilter;
        // The caller passes the upstream's list response through this before answering.
        result.filterList = (body, contentType = 'application/json') =>
          gate.filterList(handle, body, String(contentType).toLowerCase().startsWith('text/event-stream'));
      }
      return result;
    },
    /** Bytes of body to read for this request (an MCP route), or undefined: header-only. */
    bodyLimit(method, path) {
      return gate.bodyLimit(method, path);
    },
    free() {
      gate.free();
    },
  };
}

// Fetch's Headers or a Map, an array of pairs, or a plain object.
function headerObject(headers) {
  if (!headers) return {};
  if (Array.isArray(headers)) return Object.fromEntries(headers);
  if (typeof headers.entries === 'function') return Object.fromEntries(headers.entries());
  return headers;
}
