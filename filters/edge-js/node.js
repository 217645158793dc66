// Node entry: loads the wasm next to this file on import.
import { readFileSync } from 'node:fs';
import { initializeSync } from './index.js';

initializeSync(readFileSync(new URL('./pkg/agentgate_edge_bg.wasm', import.meta.url)));

export { checkPolicy, createGate, initialize, initializeSync } from './index.js';
