/** A request as the edge runtime sees it. */
export interface EvaluateRequest {
  method: string;
  /** Path and query, as sent (`/invoices/42?x=1`). */
  path: string;
  /** Fetch's Headers, a Map, pairs, or an object; names are matched case-insensitively. */
  headers?: Headers | Map<string, string> | [string, string][] | Record<string, string | string[]>;
  /** The client's address, for `source` rules and the audit record. */
  sourceIp?: string;
  /** The mTLS client certificate's URI SAN, when the runtime terminated mTLS. */
  peerUriSan?: string;
  /** Unix seconds; default: the runtime's clock. */
  now?: number;
  /** The body as text, where `gate.bodyLimit(method, path)` asks for it (MCP routes). */
  body?: string;
}

/** One JSON audit record, as the proxy-wasm filter logs it. */
export interface AuditRecord {
  time: number;
  decision: 'allow' | 'deny';
  reason?: string;
  rule?: string;
  agent?: string;
  on_behalf_of?: string;
  actors?: string[];
  [field: string]: unknown;
}

export interface Decision {
  /** What to do: forward (`allow`, also for a dry-run denial) or answer (`deny`). */
  decision: 'allow' | 'deny';
  /** The answer's status on deny (401, 403, 429, ...); null on allow. */
  status: number | null;
  /** Why it was denied (also in dry run), e.g. `expired`, `insufficient_scope`. */
  reason: string | null;
  dryRun: boolean;
  /** On allow: headers to set on the upstream request. On deny: the answer's headers. */
  headers: Record<string, string>;
  /** On allow: headers to remove from the upstream request (forged audit headers, the token). */
  removeHeaders: string[];
  /** On deny: the answer's body. */
  body: string | null;
  audit: AuditRecord;
  /**
   * The provider (that fetches its keys) whose keys did not verify this token
   * (`unknown_kid`, `keys_unavailable`); `gate.decide` fetches and decides again.
   */
  awaitingKeys: string | null;
  /**
   * On an allowed MCP list call (`tools/list`, ...): filters the upstream's response body to
   * the tools this agent may call. Pass the response through it before answering.
   */
  filterList?: (body: string, contentType?: string) => string;
}

/** One requirement of the matched rule, and whether it held. */
export interface Check {
  /** The requirement's name in the policy: `scopes`, `task`, `arguments`, `source_cidrs`, ... */
  requirement: string;
  held: boolean;
  /** Why it did not hold (a reason code), or null. */
  reason: string | null;
}

/** `agentgate eval`'s explanation: the matched rule's checks, or why no rule was reached. */
export interface Explanation {
  checks: Check[] | null;
  reason: string | null;
}

/** What this isolate holds of a provider's fetched keys. */
export interface KeyStatus {
  provider: string;
  /** Bumped with each new key set. */
  version: number;
  keys: number;
  fetchedAt: number | null;
  /** Stale keys verify until then (fetchedAt + max_stale_seconds). */
  usableUntil: number | null;
  nextAttempt: number;
  fetchingUntil: number | null;
  failures: number;
  lastError: string | null;
  discoveredUri: string | null;
  waitMs: number;
}

export interface GateOptions {
  /**
   * Where the keys of providers with `jwks_uri` or `discovery` come from: `inline` (default:
   * such a policy is refused), `fetch` (fetched with `fetch` on the provider's schedule, per
   * isolate), or `manual` (only through `gate.setKeys`).
   */
  keys?: 'inline' | 'fetch' | 'manual';
  /** The fetch for keys (default: the runtime's). */
  fetch?: typeof fetch;
  /** Unix seconds (default: the runtime's clock). */
  clock?: () => number;
  /** Called when a key fetch fails (default: console.warn). */
  onKeyError?: (failure: { provider: string; error: string }) => void;
}

export interface AgentGate {
  /** Decides with the keys this isolate holds; fetches nothing. */
  evaluate(request: EvaluateRequest): Decision;
  /**
   * Decides after starting the key refreshes that are due; a token naming a key this isolate
   * lacks waits (up to `wait_ms`) for a fetch, rate-limited by `min_refetch_seconds`.
   * `waitUntil`: a Worker's `ctx.waitUntil`, so that fetches outlive the response.
   */
  decide(request: EvaluateRequest, options?: { waitUntil?: (promise: Promise<unknown>) => void }): Promise<Decision>;
  /** Each requirement of the rule the gate applies, and whether it held. Counts nothing. */
  explain(request: EvaluateRequest): Explanation;
  /** Installs a provider's JWKS as fetched now (or at `now`); returns how many keys are in use. */
  setKeys(provider: string, jwks: string | { keys: object[] }, now?: number): number;
  /** Runs the key fetches that are due and waits for them. */
  refreshKeys(): Promise<void>;
  keyStatus(): KeyStatus[];
  /** Bytes of body to read for this request (an MCP route), or undefined when headers decide. */
  bodyLimit(method: string, path: string): number | undefined;
  /** Frees the wasm memory of this gate. */
  free(): void;
}

/** Loads the wasm (a URL, Response, bytes or WebAssembly.Module; default: next to this file). */
export function initialize(source?: unknown): Promise<void>;
/** Loads the wasm from bytes or a compiled WebAssembly.Module. */
export function initializeSync(module: BufferSource | WebAssembly.Module): void;
/** Compiles a policy (JSON text or object); throws with the JSON path of what is wrong. */
export function createGate(policy: string | object, options?: GateOptions): AgentGate;
/** What is wrong with a policy (`path`: its JSON path, empty for the document), or null. */
export function checkPolicy(policy: string | object, options?: { keys?: GateOptions['keys'] }): { path: string; message: string } | null;
