# The example Worker in Cloudflare's open-source runtime, workerd:
#   workerd serve examples/edge-worker/workerd.capnp
# (after `make edge-js`; `make edge-runtimes` installs workerd into test-harness/edge-runtimes).
# It listens on 127.0.0.1:8787 and forwards what agentgate allows to ORIGIN_URL. On
# Cloudflare, wrangler.toml does the same with `import ... from '@agentgate/edge'`.
using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (
  services = [
    (name = "gate", worker = .gateWorker),
    # Where fetch() goes: the origin and the identity provider's keys. Loopback and private
    # addresses are allowed here for a local origin; a deployment lists what it needs.
    (name = "internet", network = (allow = ["public", "private", "local"])),
  ],
  sockets = [(name = "http", address = "127.0.0.1:8787", http = (), service = "gate")],
);

const gateWorker :Workerd.Worker = (
  modules = [
    (name = "worker.js", esModule = embed "worker.js"),
    (name = "gate-proxy.js", esModule = embed "gate-proxy.js"),
    # @agentgate/edge as a bundler would resolve it for workerd (its `workerd` export).
    (name = "@agentgate/edge", esModule = embed "../../filters/edge-js/worker.js"),
    (name = "@agentgate/index.js", esModule = embed "../../filters/edge-js/index.js"),
    (name = "@agentgate/keys.js", esModule = embed "../../filters/edge-js/keys.js"),
    (name = "@agentgate/pkg/agentgate_edge.js", esModule = embed "../../filters/edge-js/pkg/agentgate_edge.js"),
    (name = "@agentgate/pkg/agentgate_edge_bg.wasm", wasm = embed "../../filters/edge-js/pkg/agentgate_edge_bg.wasm"),
  ],
  compatibilityDate = "2026-11-01",
  bindings = [
    (name = "POLICY", json = embed "../invoice-agents/policy.json"),
    (name = "ORIGIN_URL", text = "http://127.0.0.1:8080"),
  ],
  globalOutbound = "internet",
);
