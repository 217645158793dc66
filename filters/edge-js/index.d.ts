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
   * On an allowed MCP list call (`tools/list`, ...): filters the upstream's response body to
   * the tools this agent may call. Pass the response through it before answering.
   */
  filterList?: (body: string, contentType?: string) => string;
}

export interface AgentGate {
  evaluate(request: EvaluateRequest): Decision;
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
export function createGate(policy: string | object): AgentGate;
