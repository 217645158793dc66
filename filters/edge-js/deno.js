// Deno entry: loads the wasm next to this file on import (needs read access to it).
import { initializeSync } from './index.js';

initializeSync(await Deno.readFile(new URL('./pkg/agentgate_edge_bg.wasm', import.meta.url)));

export { checkPolicy, createGate, initialize, initializeSync } from './index.js';
