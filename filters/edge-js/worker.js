// Workers entry (Cloudflare Workers, workerd; bundlers pick it by the `workerd` and `worker`
// export conditions): the wasm comes in as a compiled WebAssembly.Module and is loaded on import.
import wasm from './pkg/agentgate_edge_bg.wasm';
import { initializeSync } from './index.js';

initializeSync(wasm);

export { checkPolicy, createGate, initialize, initializeSync } from './index.js';
